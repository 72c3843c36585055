"""Overlapping rotations (issue 11, item 4): 2 to 8 runs of ``rotate`` / ``rotate_from_event`` for the same
secret, interleaved deterministically through the rotation's step hook, must end with Key Vault's latest
version holding a key the gateway accepts, tagged with the slot that holds it, and no run failing.

Real SecretClient and ApiManagementClient against the local stack; the scheduler lets exactly one run go
on at a time, from one step hook to the next, in the order a test names.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from azure.identity import DefaultAzureCredential

from apimvault.local import LocalAzure, LocalCA, temporary_environ
from apimvault.rotation import RotationResult, rotate, rotate_from_event
from tests._support.cli import RotatingApp, assert_no_key, gateway_status, new_rotating_app
from tests._support.events import near_expiry_event
from tests._support.rotation import ManualClock, RotatorAccess, Scheduler, rotator_access


@pytest.fixture(autouse=True)
def quick_probes() -> Iterator[None]:
    """The probe rule's default count (10 consecutive 2xx) back to back: these tests run on the real
    clock, and the spacing is covered on a manual clock."""
    with temporary_environ({"APIMVAULT_PROBE_INTERVAL": "0"}):
        yield


@pytest.fixture
def rotator(azure: LocalAzure) -> Iterator[RotatorAccess]:
    """Infra's rotator identity (not Secrets Officer); each test grants it its own app (for_app)."""
    with rotator_access(azure) as access:
        yield access


def _event(azure: LocalAzure, name: str, version: str) -> dict[str, object]:
    # One id per version: overlapping deliveries of one event share its id, as Event Grid's retries do.
    return near_expiry_event(
        vault_url=azure.vault_url,
        secret=name,
        version=version,
        event_id=f"6f1d2d7e-0000-4000-8000-{version[:12]}",
    )


def assert_vault_live(azure: LocalAzure, app: RotatingApp) -> None:
    """The invariant: the latest version holds the live key of the slot its tag names, and the gateway
    accepts it."""
    latest = azure.keyvault.latest(app.name)
    primary, secondary = app.keys()
    slot = (latest.tags or {})["CredentialId"].lower()
    assert latest.value == {"primary": primary, "secondary": secondary}[slot]
    assert gateway_status(azure, latest.value) == 200
    assert latest.expires is not None  # never a version without expiry


def overlap(
    azure: LocalAzure, credential: DefaultAzureCredential, app: RotatingApp, n: int, order: list[int]
) -> tuple[list[Any], Scheduler]:
    """Run ``n`` overlapping rotations of ``app``: even runs are (re)deliveries of the SecretNearExpiry
    event for the current version, odd runs are rotations started by hand (no expected version)."""
    v1 = azure.keyvault.latest(app.name).version
    event = _event(azure, app.name, v1)

    def run(i: int, hook: Any) -> RotationResult:
        if i % 2 == 0:
            return rotate_from_event(event, credential=credential, on_step=hook)
        return rotate(
            vault_url=azure.vault_url,
            secret_name=app.name,
            apim_subscription_id=None,
            credential=credential,
            on_step=hook,
        )

    scheduler = Scheduler(order, n)
    return scheduler.run(run), scheduler


def _schedules(n: int) -> list[tuple[str, list[int]]]:
    steps = 40  # more hand-overs than any run needs: the rest of each order is ignored
    schedules = [
        ("lockstep", [i for _ in range(steps) for i in range(n)]),
        ("reverse-lockstep", [i for _ in range(steps) for i in reversed(range(n))]),
        # The case: the others read and pass the in-use check, then run 0 finishes, then the rest.
        ("read-then-first-finishes", [i for i in range(1, n) for _ in range(2)] + [0] * steps),
        ("staggered", [i for i in range(n) for _ in range(3)] * 4),
    ]
    for seed in (1, 2, 3):
        rng = random.Random(f"{n}-{seed}")
        schedules.append((f"random-{seed}", [rng.randrange(n) for _ in range(steps * n)]))
    return schedules


CASES = [(n, name, order) for n in range(2, 9) for name, order in _schedules(n)]
# The default run keeps 2, 3 and 8 overlapping runs in every order; 4-7 run in the slow set (.ci/run: both).
_PARAMS = [
    pytest.param(n, name, order, id=f"{n}-runs-{name}", marks=[pytest.mark.slow] if 3 < n < 8 else [])
    for n, name, order in CASES
]


@pytest.mark.parametrize(("n", "name", "order"), _PARAMS)
def test_overlapping_runs_end_with_a_live_latest_version(
    azure: LocalAzure, rotator: RotatorAccess, n: int, name: str, order: list[int]
) -> None:
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    azure.keyvault.put_secret(  # a version with an expiry, as the seeding does
        app.name,
        app.keys()[0],
        content_type="text/plain",
        tags=dict(azure.keyvault.latest(app.name).tags or {}),
        expires=2_000_000_000,
    )
    results, scheduler = overlap(azure, credential, app, n, order)

    errors = [r for r in results if not isinstance(r, RotationResult)]
    assert errors == []  # no run failed, none hid anything
    assert any(not r.skipped for r in results)  # something rotated
    assert_vault_live(azure, app)
    latest = azure.keyvault.latest(app.name).version
    # Every run verified the vault before returning; the last to finish saw the final version.
    assert all(r.verified_version is not None for r in results)
    assert latest in {r.verified_version for r in results}
    assert {run for run, _ in scheduler.trace} == set(range(n))
    assert_no_key(repr(results), app.seen_keys)


def test_a_write_of_a_key_revoked_meanwhile_is_repaired(azure: LocalAzure, rotator: RotatorAccess) -> None:
    """Both runs read version 1 and pass the in-use check; run 0 regenerates the secondary and sees the
    gateway accept it; run 1 (which read before run 0 named its key in RotationPending) regenerates the
    secondary again, revoking run 0's key, before run 0 writes. Run 0's write stores a revoked key, and its
    own check right after repairs it with the live secondary."""
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    # run 0: read, check -> at regenerate; run 1: read, check -> at regenerate; run 0: regenerate, probe
    # -> at write; run 1: regenerate -> at probe; then run 0 writes (the revoked key) and verifies.
    order = [0, 0, 1, 1, 0, 0, 1, 0]
    with temporary_environ({"APIMVAULT_PROBE_SUCCESSES": "1"}):  # the schedule names one probe round
        results, scheduler = overlap(azure, credential, app, 2, order)
    first, second = results
    assert isinstance(first, RotationResult) and isinstance(second, RotationResult)
    assert not first.skipped and first.repaired_versions  # wrote, found it revoked, repaired
    assert first.verified_version == first.repaired_versions[-1]
    assert second.skipped and "another rotation" in second.reason
    assert_vault_live(azure, app)
    versions = azure.keyvault.versions(app.name)
    assert versions[-2].version == first.new_version  # the revoked write is history, not the latest
    assert (0, "repair") in scheduler.trace


def test_a_skipped_redelivery_repairs_a_vault_left_with_a_revoked_key(
    azure: LocalAzure, rotator: RotatorAccess
) -> None:
    """The issue's end state (the latest version holds a key revoked by another regeneration) is repaired
    by the next delivery, although that delivery is skipped as 'already rotated'."""
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    v1 = azure.keyvault.latest(app.name).version
    first = rotate_from_event(_event(azure, app.name, v1), credential=credential)
    azure.apim_state.regenerate(app.sid, "secondary")  # revokes the key the vault's latest version holds
    _, live_secondary = app.keys()
    assert gateway_status(azure, azure.keyvault.latest(app.name).value) == 401

    again = rotate_from_event(_event(azure, app.name, v1), credential=credential)
    assert again.skipped and "already rotated" in again.reason and "repaired the vault" in again.reason
    assert again.repaired_versions and again.credential_id == "secondary"
    latest = azure.keyvault.latest(app.name)
    assert latest.version == again.verified_version != first.new_version
    assert latest.value == live_secondary
    assert_vault_live(azure, app)
    assert_no_key(again.reason, app.seen_keys)

    # A skip with nothing to repair writes nothing.
    third = rotate_from_event(_event(azure, app.name, v1), credential=credential)
    assert third.skipped and third.repaired_versions == () and third.verified_version == latest.version


# ------------------------------------------------- overlapping runs while the gateway units are syncing


@pytest.fixture(scope="module")
def sync_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="module")
def syncing(sync_clock: ManualClock, local_azure: LocalAzure, session_ca: LocalCA) -> Iterator[LocalAzure]:
    """A stack whose units take 20 s and 45 s (manual clock) to accept a regenerated key."""
    with LocalAzure(
        ca=session_ca,
        propagation_clock=sync_clock,
        propagation_delay={"region1": 20, "region2": 45},
    ) as stack:  # both units behind one URL (balanced, in turn)
        yield stack  # tests enter stack.env() themselves, so other tests keep the session stack's


SYNC_CASES = [(n, name, order) for n in (2, 3, 5, 8) for name, order in _schedules(n) if name != "staggered"]


@pytest.mark.parametrize(
    ("n", "name", "order"), SYNC_CASES, ids=[f"{n}-runs-{name}" for n, name, _ in SYNC_CASES]
)
def test_overlapping_runs_while_the_gateway_syncs(
    syncing: LocalAzure, sync_clock: ManualClock, n: int, name: str, order: list[int]
) -> None:
    """Runs overlap while they wait for the units to accept their keys (each run's wait advances the
    shared manual clock); the vault must still end live on both units, and never hold an unsynced key."""
    azure = syncing
    app = new_rotating_app(azure)
    tags = dict(azure.keyvault.latest(app.name).tags or {})
    azure.keyvault.put_secret(
        app.name, app.keys()[0], content_type="text/plain", tags=tags, expires=2_000_000_000
    )
    v1 = azure.keyvault.latest(app.name).version
    event = _event(azure, app.name, v1)
    written_unsynced: list[str] = []

    with azure.env():
        access = RotatorAccess(azure)  # infra's rotator roles on this app only, revoked after
        credential = access.for_app(app)

        def run(i: int, hook: Any) -> RotationResult:
            def on_step(step: str) -> None:
                # Whenever any run is about to act, the vault's latest version must work on every unit.
                latest = azure.keyvault.latest(app.name)
                if any(
                    azure.apim_state.gateway_lookup(u, latest.value).found is None
                    for u in azure.apim_state.units
                ):
                    written_unsynced.append(f"{step}:{latest.version}")
                hook(step)

            common: dict[str, Any] = {
                "credential": credential,
                "on_step": on_step,
                "clock": sync_clock,
                "sleep": sync_clock.advance,
            }
            if i % 2 == 0:
                return rotate_from_event(event, **common)
            return rotate(
                vault_url=azure.vault_url, secret_name=app.name, apim_subscription_id=None, **common
            )

        try:
            results = Scheduler(order, n).run(run)
        finally:
            access.close()

    assert [r for r in results if not isinstance(r, RotationResult)] == []
    assert any(not r.skipped for r in results)
    assert all(r.propagation_seconds is None or r.propagation_seconds >= 45 for r in results)
    assert written_unsynced == []  # make-before-break held under overlap too
    latest = azure.keyvault.latest(app.name)
    primary, secondary = app.keys()
    slot = (latest.tags or {})["CredentialId"]
    assert latest.value == {"primary": primary, "secondary": secondary}[slot]
    for unit in azure.apim_state.units:
        assert azure.apim_state.gateway_lookup(unit, latest.value).found is not None
