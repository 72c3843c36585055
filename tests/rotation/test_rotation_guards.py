"""Issue 19 (rotation side) and issue 21 items 5 and 7, through public API against the local stack:
the sound probe, K consecutive acceptances on a manual clock, the guards (validity, a second secret on the
same subscription, the right to tag before regenerating, every bad setting named), emergency revocation,
the CLI's --event confirmation and a failed rotation's traceback locals."""

from __future__ import annotations

import itertools
import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.identity import DefaultAzureCredential

from apimvault import AccessDeniedError, ConfigurationError
from apimvault.local import LocalAzure, LocalCA, temporary_environ
from apimvault.rotation import (
    GatewayProbeError,
    RotationConfig,
    RotationError,
    SharedSubscriptionError,
    plan_rotation,
    revoke_current,
    rotate,
)
from tests._support.cli import assert_no_key, gateway_status, new_rotating_app, run_cli
from tests._support.events import near_expiry_event
from tests._support.rotation import ManualClock, RotatorAccess, rotator_access


@pytest.fixture(autouse=True)
def quick_probes() -> Iterator[None]:
    with temporary_environ({"APIMVAULT_PROBE_INTERVAL": "0"}):
        yield


@pytest.fixture
def rotator(azure: LocalAzure) -> Iterator[RotatorAccess]:
    """Infra's rotator identity (not Secrets Officer); each test grants it its own app (for_app)."""
    with rotator_access(azure) as access:
        yield access


# ------------------------------------------------------------------------------ settings (19.6, 19.9)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("APIMVAULT_PROPAGATION_TIMEOUT", "abc"),
        ("APIMVAULT_PROPAGATION_TIMEOUT", "0"),
        ("APIMVAULT_PROPAGATION_TIMEOUT", "nan"),
        ("APIMVAULT_PROBE_SUCCESSES", "0"),
        ("APIMVAULT_PROBE_SUCCESSES", "two"),
        ("APIMVAULT_PROBE_INTERVAL", "-1"),
        ("APIMVAULT_REVOKE_WAIT", "soon"),
        ("APIMVAULT_GATEWAY_URLS", "http://127.0.0.1:1"),
        ("APIMVAULT_ARM_ENDPOINT", "http://127.0.0.1:1"),
        ("APIMVAULT_APIM_SUBSCRIPTION_ID", "/subscriptions/x"),
        ("APIMVAULT_HEADER_NAME", "bad header"),
    ],
)
def test_every_bad_setting_is_a_configuration_error_naming_its_variable(variable: str, value: str) -> None:
    environ = {"APIMVAULT_GATEWAY_URLS": "https://gw.example", variable: value}
    with pytest.raises(ConfigurationError, match=variable):
        RotationConfig.from_env(environ)


def test_config_defaults_overrides_and_the_missing_gateway() -> None:
    config = RotationConfig.from_env({"AZURE_OPENAI_ENDPOINT": "https://gw.example/"})
    assert config.gateway_urls == ("https://gw.example",)
    assert config.propagation_timeout == 600.0 and config.probe_successes == 10
    assert config.probe_interval == 0.5 and config.revoke_wait == 60.0
    assert config.arm_endpoint == "https://management.azure.com"
    tuned = RotationConfig.from_env(
        {"APIMVAULT_GATEWAY_URLS": "https://a.example, https://b.example", "APIMVAULT_PROBE_SUCCESSES": "3"},
        probe_successes=5,
    )
    assert tuned.gateway_urls == ("https://a.example", "https://b.example") and tuned.probe_successes == 5
    with pytest.raises(ConfigurationError, match="APIMVAULT_GATEWAY_URLS"):
        RotationConfig.from_env({})
    with pytest.raises(ConfigurationError, match="probe_interval"):
        RotationConfig(gateway_urls=("https://gw.example",), probe_interval=-1)


def test_cli_names_the_bad_variable(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    keys = app.keys()
    run = run_cli(["rotate", "--yes"], {**app.env(), "APIMVAULT_PROPAGATION_TIMEOUT": "abc"})
    assert run.code == 2 and "APIMVAULT_PROPAGATION_TIMEOUT" in run.err
    bad = run_cli(["rotate", "--yes", "--probe-successes", "0"], app.env())
    assert bad.code == 2 and "probe_successes" in bad.err
    assert app.keys() == keys


# ---------------------------------------------------------------------------------- the probe (19.2)


def test_an_unrouted_probe_path_is_refused_at_plan_time(azure: LocalAzure, rotator: RotatorAccess) -> None:
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    keys = app.keys()
    before = azure.keyvault.latest(app.name).version
    unrouted = f"{azure.gateway_url}/not-the-api"  # APIM answers 404 before it checks the key
    with pytest.raises(GatewayProbeError, match="404") as info:
        plan_rotation(
            vault_url=azure.vault_url, secret_name=app.name, credential=credential, gateway_urls=unrouted
        )
    assert info.value.url == unrouted and info.value.status == 404
    assert f"{unrouted}/openai/v1/models" in str(info.value) and "GET operation" in str(info.value)
    with pytest.raises(GatewayProbeError, match="404"):
        rotate(vault_url=azure.vault_url, secret_name=app.name, credential=credential, gateway_urls=unrouted)
    assert app.keys() == keys  # refused before any regeneration
    assert azure.keyvault.latest(app.name).version == before
    assert_no_key(str(info.value), app.seen_keys)


@pytest.mark.parametrize("status", [500, 401, 403, 400])
def test_an_answer_that_says_nothing_about_the_key_stops_the_rotation(
    azure: LocalAzure, rotator: RotatorAccess, status: int
) -> None:
    """The backend's 401 (not APIM's key refusal), 403, 400 or 5xx relayed by the gateway: no verdict."""
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    keys = app.keys()
    azure.openai.faults.inject("status", operation="Models", status=status, times=1)
    try:
        with pytest.raises(GatewayProbeError, match=str(status)):
            rotate(vault_url=azure.vault_url, secret_name=app.name, credential=credential)
    finally:
        azure.openai.faults.clear()
    assert app.keys() == keys


@pytest.fixture(scope="module")
def lag_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="module")
def lagging(lag_clock: ManualClock, local_azure: LocalAzure, session_ca: LocalCA) -> Iterator[LocalAzure]:
    with LocalAzure(
        ca=session_ca, propagation_clock=lag_clock, propagation_delay={"region1": 0, "region2": 30}
    ) as stack:
        yield stack


def test_the_new_key_needs_k_consecutive_acceptances_spaced_over_time(
    lagging: LocalAzure, lag_clock: ManualClock
) -> None:
    azure = lagging
    app = new_rotating_app(azure)
    probes: list[float] = []
    with azure.env(APIMVAULT_PROBE_SUCCESSES="4", APIMVAULT_PROBE_INTERVAL="5"):
        access = RotatorAccess(azure)  # infra's rotator roles on this app only, revoked after
        credential = access.for_app(app)
        try:
            plan = plan_rotation(vault_url=azure.vault_url, secret_name=app.name, credential=credential)
            result = rotate(
                vault_url=azure.vault_url,
                secret_name=app.name,
                credential=credential,
                clock=lag_clock,
                sleep=lag_clock.advance,
                on_step=lambda step: probes.append(lag_clock()) if step == "probe" else None,
            )
        finally:
            access.close()
    assert "4 consecutive 2xx 5 s apart" in "\n".join(plan.describe())
    assert not result.skipped and result.propagation_seconds is not None
    # region2 accepts after 30 s; then three more acceptances, 5 s apart, before the vault is written.
    assert result.propagation_seconds >= 30 + 3 * 5
    tail = probes[-4:]
    assert all(b - a >= 5 for a, b in itertools.pairwise(tail))
    assert azure.keyvault.latest(app.name).version == result.new_version


# ------------------------------------------------------------------------------------ guards (19.6)


def test_validity_below_31_days_is_refused_before_anything_changes(
    azure: LocalAzure, rotator: RotatorAccess
) -> None:
    app = new_rotating_app(azure, tags={"ValidityPeriodDays": "7"})
    credential = rotator.for_app(app)
    keys = app.keys()
    with pytest.raises(RotationError, match="between 31 and 3650") as info:
        rotate(vault_url=azure.vault_url, secret_name=app.name, credential=credential)
    assert "30 days before expiry" in str(info.value)
    assert app.keys() == keys and len(azure.keyvault.versions(app.name)) == 1


def test_a_second_secret_on_the_same_subscription_is_refused(
    azure: LocalAzure, rotator: RotatorAccess
) -> None:
    """The guard needs to list the vault's secrets. Infra's rotator holds its roles on its ONE secret and
    may not list (Microsoft.KeyVault/vaults/secrets/readMetadata/action at vault scope), so as deployed the
    guard does not run: the plan says "not checked". The refusal itself is shown with the officer, which
    deliberately holds more rights than infra grants (Secrets Officer on the vault: it may list)."""
    app = new_rotating_app(azure)
    twin = new_rotating_app(azure, tags={"ProviderAddress": app.resource_id})
    keys = app.keys()
    as_rotator = plan_rotation(
        vault_url=azure.vault_url, secret_name=app.name, credential=rotator.for_app(app)
    )
    assert not as_rotator.shared_checked and "not checked" in "\n".join(as_rotator.describe())
    officer = DefaultAzureCredential(managed_identity_client_id=azure.officer_identity.client_id)
    with officer as credential:
        with pytest.raises(SharedSubscriptionError, match=twin.name) as info:
            plan_rotation(vault_url=azure.vault_url, secret_name=app.name, credential=credential)
        assert "one secret per APIM" in str(info.value)
        with pytest.raises(SharedSubscriptionError):
            rotate(vault_url=azure.vault_url, secret_name=app.name, credential=credential)
        assert app.keys() == keys
        azure.keyvault.put_secret(twin.name, "x" * 32, content_type="text/plain", tags={})  # untag the twin
        plan = plan_rotation(vault_url=azure.vault_url, secret_name=app.name, credential=credential)
        assert plan.shared_checked and "no other secret" in "\n".join(plan.describe())


def test_no_right_to_tag_stops_before_regenerating(azure: LocalAzure, rotator: RotatorAccess) -> None:
    """Issue 19.1: the pending tag is what lets a retry resume; without update/action the rotation must
    not regenerate (four attempts would make four regenerations)."""
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    keys = app.keys()
    azure.keyvault.faults.inject("status", operation="UpdateSecret", status=403, times=1)
    try:
        with pytest.raises(AccessDeniedError, match="update/action") as info:
            rotate(vault_url=azure.vault_url, secret_name=app.name, credential=credential)
    finally:
        azure.keyvault.faults.clear()
    assert "apimvault secret rotator" in str(info.value)
    assert app.keys() == keys and len(azure.keyvault.versions(app.name)) == 1


# ------------------------------------------------------------------------- revocation (19.8)


def test_revoke_current_rotates_waits_for_the_fleet_then_kills_the_leaked_key(
    lagging: LocalAzure, lag_clock: ManualClock
) -> None:
    azure = lagging
    app = new_rotating_app(azure)
    leaked, _ = app.keys()
    seen: dict[str, Any] = {}

    def on_step(step: str) -> None:
        if step == "revoke":  # the fleet window is over, the leaked key not yet regenerated
            seen["latest"] = azure.keyvault.latest(app.name).version
            seen["leaked_status"] = gateway_status(azure, leaked)
            seen["at"] = lag_clock()
        if step == "spread":
            seen["spread_at"] = lag_clock()

    with azure.env(APIMVAULT_REVOKE_WAIT="45"):
        access = RotatorAccess(azure)  # infra's rotator roles on this app only, revoked after
        credential = access.for_app(app)
        try:
            result = revoke_current(
                vault_url=azure.vault_url,
                secret_name=app.name,
                credential=credential,
                clock=lag_clock,
                sleep=lag_clock.advance,
                on_step=on_step,
            )
        finally:
            access.close()
    primary, secondary = app.keys()
    latest = azure.keyvault.latest(app.name)
    assert result.rotation.regenerated == "secondary" and result.revoked_slot == "primary"
    assert latest.value == secondary and latest.version == result.rotation.new_version
    assert seen["latest"] == latest.version and seen["leaked_status"] == 200  # stored, then waited
    assert result.waited_seconds >= 45 and float(seen["at"]) - float(seen["spread_at"]) >= 45
    assert primary != leaked  # regenerated...
    assert gateway_status(azure, leaked) == 401  # ...and refused
    assert gateway_status(azure, secondary) == 200
    assert result.dead_after_seconds >= 0 and result.dead_at
    assert_no_key(repr(result) + json.dumps(result.as_dict()), app.seen_keys | {primary, secondary})


def test_cli_revoke_current(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    leaked, _ = app.keys()
    run = run_cli(["rotate", "--revoke-current", "--revoke-wait", "0", "--json"], app.env())
    assert run.code == 0, run.err
    doc = run.json()
    assert doc["revocation"]["revoked_slot"] == "primary"
    assert gateway_status(azure, leaked) == 401
    assert gateway_status(azure, azure.keyvault.latest(app.name).value) == 200
    assert_no_key(run.out + run.err, app.seen_keys | set(app.keys()))


# ------------------------------------------------------------------------- the CLI's --event (21.5)


def test_event_without_vault_and_arm_variables_asks_as_for_production(
    azure: LocalAzure, tmp_path: Path
) -> None:
    app = new_rotating_app(azure)
    keys = app.keys()
    version = azure.keyvault.latest(app.name).version
    event = tmp_path / "event.json"
    event.write_text(
        json.dumps(near_expiry_event(vault_url=azure.vault_url, secret=app.name, version=version))
    )
    reads = azure.keyvault.counters["GetSecret"]
    unset = {**app.env(), "AZURE_KEYVAULT_URL": None, "APIMVAULT_ARM_ENDPOINT": None}
    run = run_cli(["rotate", "--event", str(event)], unset, stdin="")
    assert run.code == 1 and "without --yes" in run.err
    assert app.keys() == keys and azure.keyvault.counters["GetSecret"] == reads  # nothing contacted
    # Both set and on this machine: the local stack needs no confirmation.
    local = run_cli(["rotate", "--event", str(event)], app.env(), stdin="")
    assert local.code == 0, local.err
    assert app.keys()[1] != keys[1]


# --------------------------------------------------------------------------- traceback locals (21.7)


def _frames(exc: BaseException) -> Iterator[types.FrameType]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        tb = item.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next
        todo += [item.__cause__, item.__context__]


def test_a_failed_rotation_leaves_no_key_in_traceback_locals(
    azure: LocalAzure, rotator: RotatorAccess
) -> None:
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    azure.keyvault.faults.inject("status", operation="SetSecret", status=500, times=5)

    def attempt() -> BaseException:
        try:
            rotate(vault_url=azure.vault_url, secret_name=app.name, credential=credential)
        except Exception as exc:  # the failure is what the test looks at
            return exc
        raise AssertionError("the rotation should have failed")

    try:
        exc = attempt()
    finally:
        azure.keyvault.faults.clear()
    primary, secondary = app.keys()
    assert secondary != azure.keyvault.latest(app.name).value  # it failed after regenerating
    _assert_no_key_in_locals(exc, {primary, secondary}, skip="attempt", at_least=4)

    # A refusal at plan time (the probe path is not routed) keeps the key in use out of its locals too.
    try:
        plan_rotation(
            vault_url=azure.vault_url,
            secret_name=app.name,
            credential=credential,
            gateway_urls=f"{azure.gateway_url}/not-the-api",
        )
    except GatewayProbeError as refused:
        _assert_no_key_in_locals(refused, {primary, secondary}, skip=None, at_least=2)
    else:
        raise AssertionError("the plan should have been refused")


def _assert_no_key_in_locals(exc: BaseException, keys: set[str], *, skip: str | None, at_least: int) -> None:
    frames = [f for f in _frames(exc) if f.f_code.co_name != skip and "test_" not in f.f_code.co_name]
    assert len(frames) >= at_least
    for frame in frames:
        for name, value in frame.f_locals.items():
            text = f"{name}={value!r}"
            assert not any(key in text for key in keys), (frame.f_code.co_name, name)


# ------------------------------------------------------------- units behind one URL (19.3, balanced)


def _balanced_stack_available() -> bool:
    import inspect

    return "gateway_balance" in inspect.signature(LocalAzure).parameters


@pytest.mark.skipif(not _balanced_stack_available(), reason="no balanced gateway units in the stack yet")
def test_a_lagging_unit_behind_one_url_holds_the_vault_back(
    local_azure: LocalAzure, session_ca: LocalCA
) -> None:
    """Four units behind one URL, round-robin, one of them 40 s late: one acceptance per URL (K=1) stores the
    key while that unit still refuses it; the default rule waits for it."""
    clock = ManualClock()
    with LocalAzure(
        ca=session_ca,
        gateway_units=4,
        gateway_balance="round-robin",
        propagation_delay={"unit1": 0, "unit2": 0, "unit3": 40, "unit4": 0},
        propagation_clock=clock,
    ) as azure:
        early, waited = new_rotating_app(azure), new_rotating_app(azure)
        with azure.env(APIMVAULT_PROBE_INTERVAL="0.5"):
            access = RotatorAccess(azure)  # infra's rotator roles on these two apps only, revoked after
            credential = access.for_app(early)
            access.for_app(waited)
            try:
                hasty = rotate(
                    vault_url=azure.vault_url,
                    secret_name=early.name,
                    credential=credential,
                    config=RotationConfig.from_env(subscription_from_env=False, probe_successes=1),
                    clock=clock,
                    sleep=clock.advance,
                )
                clock.advance(100)
                started = clock()
                result = rotate(
                    vault_url=azure.vault_url,
                    secret_name=waited.name,
                    credential=credential,
                    clock=clock,
                    sleep=clock.advance,
                )
            finally:
                access.close()
    assert hasty.propagation_seconds is not None and hasty.propagation_seconds < 40  # the hazard
    assert result.propagation_seconds is not None and result.propagation_seconds >= 40
    assert clock() - started >= 40


def _rotator_stack_available() -> bool:
    import inspect

    return "rotate_as" in inspect.signature(LocalAzure).parameters


@pytest.mark.skipif(not _rotator_stack_available(), reason="no rotator identity with infra's roles yet")
def test_the_rotator_with_infras_roles_times_out_and_resumes_without_regenerating(
    local_azure: LocalAzure, session_ca: LocalCA
) -> None:
    """Issue 19.1: as the identity holding exactly infra's roles, a rotation that times out waiting for a
    slow unit leaves RotationPending, and the retry resumes the wait for the same key (no second
    regeneration, no write the role does not grant)."""
    clock = ManualClock()
    with LocalAzure(ca=session_ca, propagation_clock=clock, propagation_delay={"region2": 3600}) as azure:
        app = new_rotating_app(azure)
        stack: Any = azure  # the rotator's API arrives with the localtwin branch
        stack.grant_rotator_roles(stack.rotator_identity, secret=app.name, apim_subscription=app.sid)
        primary, _ = app.keys()
        rotator = DefaultAzureCredential(managed_identity_client_id=stack.rotator_identity.client_id)
        kwargs: dict[str, Any] = {"propagation_timeout": 120, "clock": clock, "sleep": clock.advance}
        try:
            with azure.env(), pytest.raises(RotationError, match="vault was NOT changed"):
                rotate(vault_url=azure.vault_url, secret_name=app.name, credential=rotator, **kwargs)
            _, pending = app.keys()
            assert (azure.keyvault.latest(app.name).tags or {})["RotationPending"].startswith("secondary:")
            clock.advance(3600)
            with azure.env():
                again = rotate(vault_url=azure.vault_url, secret_name=app.name, credential=rotator, **kwargs)
        finally:
            rotator.close()
        assert "resumed" in again.reason and app.keys() == (primary, pending)
        assert azure.keyvault.latest(app.name).value == pending
