"""The rotation function's per-secret blob lease against Azurite (real azure-storage-blob over TLS on
127.0.0.1), and overlapping deliveries of one event serialised by it: 2 to 8 runs, interleaved through the
rotation's step hook and the lease's wait, no sleeps."""

from __future__ import annotations

import random
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("azure.storage.blob")

from azure.storage.blob import ContainerClient

from apimvault.exceptions import RotationError
from apimvault.local import LocalAzure, temporary_environ
from tests._support.cli import assert_no_key, gateway_status, new_rotating_app
from tests._support.events import near_expiry_event
from tests._support.rotation import ManualClock, Scheduler

from .azurite import Azurite, azurite  # noqa: F401 - the fixture


@pytest.fixture
def container(azurite: Azurite, handler: ModuleType) -> Iterator[ContainerClient]:  # noqa: F811
    client = ContainerClient.from_connection_string(azurite.connection_string, handler.LEASE_CONTAINER)
    yield client
    client.close()


def test_a_held_lease_keeps_a_second_run_out_until_released(
    container: ContainerClient, handler: ModuleType
) -> None:
    clock = ManualClock()
    first = handler.RotationLease(container, "key-lease-a")
    second = handler.RotationLease(container, "key-lease-a", wait=30, clock=clock, sleep=clock.advance)
    other_secret = handler.RotationLease(container, "key-lease-b", wait=0)
    with first:
        assert first.held
        with pytest.raises(RotationError, match="still holds the lease") as info:
            second.acquire()
        assert info.value.permanent is False and not second.held
        assert clock() - 1000.0 >= 30  # it waited (on the injected clock) up to its bound
        with other_secret:  # another secret's lease is independent
            assert other_secret.held
    assert not first.held
    with second:  # free again once released
        assert second.held
    props = container.get_blob_client("key-lease-a.lock").get_blob_properties()
    assert props.lease.state == "available"


def test_lease_from_environment_uses_the_functions_storage_setting(
    azurite: Azurite,  # noqa: F811
    handler: ModuleType,
) -> None:
    with temporary_environ({"AzureWebJobsStorage": azurite.connection_string}):
        lease = handler.lease_from_environment("key-from-env")
    assert lease is not None
    with lease:
        assert lease.held
    with temporary_environ(
        {
            "AzureWebJobsStorage": None,
            "AzureWebJobsStorage__accountName": None,
            "AzureWebJobsStorage__blobServiceUri": None,
        }
    ):
        assert handler.lease_from_environment("key-from-env") is None


def _order(n: int, name: str) -> list[int]:
    if name == "lockstep":
        return [i for _ in range(30) for i in range(n)]
    rng = random.Random(f"{n}-{name}")
    return [rng.randrange(n) for _ in range(30 * n)]


CASES = [(n, name) for n in range(2, 9) for name in ("lockstep", "random")]


@pytest.mark.parametrize(("n", "name"), CASES, ids=[f"{n}-deliveries-{name}" for n, name in CASES])
def test_overlapping_deliveries_are_serialised_by_the_lease(
    azure: LocalAzure, container: ContainerClient, handler: ModuleType, n: int, name: str
) -> None:
    app = new_rotating_app(azure)
    tags = dict(azure.keyvault.latest(app.name).tags or {})
    azure.keyvault.put_secret(
        app.name, app.keys()[0], content_type="text/plain", tags=tags, expires=2_000_000_000
    )
    v1 = azure.keyvault.latest(app.name)
    event = near_expiry_event(vault_url=azure.vault_url, secret=app.name, version=v1.version)
    versions_before = len(azure.keyvault.versions(app.name))
    scheduler = Scheduler(_order(n, name), n)

    def delivery(i: int, hook: Any) -> Any:
        lease = handler.RotationLease(container, app.name, wait=3600, sleep=lambda _s: hook("lease-wait"))
        return handler.handle_event(event, lease=lease, on_step=hook)

    env: dict[str, str | None] = {
        "APIMVAULT_SECRET_NAME": app.name,
        "APIMVAULT_APIM_SUBSCRIPTION_ID": app.resource_id,
        "AZURE_CLIENT_ID": azure.rotator_identity.client_id,  # infra's rotator, granted by new_rotating_app
    }
    with temporary_environ(env):
        results = scheduler.run(delivery)

    assert [r for r in results if isinstance(r, BaseException)] == []
    rotated = [r for r in results if not r.skipped]
    assert len(rotated) == 1  # one rotation; every other delivery found it done
    assert all(r.repaired_versions == () for r in results)  # serialised: nothing ever needed repair
    assert len(azure.keyvault.versions(app.name)) == versions_before + 1
    # While one run held the lease no other run took a rotation step: the runs' steps form one block each.
    steps = [run for run, step in scheduler.trace if step != "lease-wait"]
    blocks = [run for i, run in enumerate(steps) if i == 0 or steps[i - 1] != run]
    assert sorted(blocks) == list(range(n))
    latest = azure.keyvault.latest(app.name)
    primary, secondary = app.keys()
    assert latest.value == secondary and (latest.tags or {})["CredentialId"] == "secondary"
    assert gateway_status(azure, latest.value) == 200 and gateway_status(azure, primary) == 200
    assert_no_key(repr(results), app.seen_keys)


def test_the_handler_takes_and_releases_the_lease_from_its_storage_setting(
    azure: LocalAzure,
    azurite: Azurite,  # noqa: F811
    container: ContainerClient,
    handler: ModuleType,
) -> None:
    app = new_rotating_app(azure)
    tags = dict(azure.keyvault.latest(app.name).tags or {})
    azure.keyvault.put_secret(
        app.name, app.keys()[0], content_type="text/plain", tags=tags, expires=2_000_000_000
    )
    v1 = azure.keyvault.latest(app.name)
    seen: list[str] = []
    blob = container.get_blob_client(f"{app.name}.lock")

    def on_step(step: str) -> None:
        if step == "regenerate":  # mid-rotation: the secret's lease is taken
            seen.append(blob.get_blob_properties().lease.state)

    env: dict[str, str | None] = {
        "APIMVAULT_SECRET_NAME": app.name,
        "APIMVAULT_APIM_SUBSCRIPTION_ID": app.resource_id,
        "AZURE_CLIENT_ID": azure.rotator_identity.client_id,  # infra's rotator, granted by new_rotating_app
        "AzureWebJobsStorage": azurite.connection_string,
    }
    with temporary_environ(env):
        result = handler.handle_event(
            near_expiry_event(vault_url=azure.vault_url, secret=app.name, version=v1.version), on_step=on_step
        )
    assert not result.skipped and seen == ["leased"]
    assert blob.get_blob_properties().lease.state == "available"  # released afterwards
