"""Lease held or stop (issue 19 item 5), against Azurite (real azure-storage-blob over TLS on 127.0.0.1).

- A renewal that fails transiently is retried while the lease is still valid; one that keeps failing until
  the lease would expire, or that the service refuses (the lease was broken or taken), marks it lost.
- A lease lost mid-run stops the rotation function's run with the typed ``LeaseLostError`` before its next
  change: before the regeneration (APIM keys untouched) and before the vault write (no new version).

Transient failures are planted with a transport (azure-core's public ``transport=`` argument) that refuses
the connection for the first N lease renewals; time is the injected clock, nothing sleeps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("azure.storage.blob")

from azure.core.exceptions import ServiceRequestError
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import BlobLeaseClient, ContainerClient

from apimvault.exceptions import RotationError
from apimvault.local import LocalAzure, temporary_environ
from tests._support.cli import RotatingApp, gateway_status, new_rotating_app
from tests._support.events import near_expiry_event
from tests._support.rotation import ManualClock

from .azurite import Azurite, azurite  # noqa: F401 - the fixture


class FailingRenewals(RequestsTransport):  # type: ignore[misc]  # azure-core exports it untyped
    """A real HTTP transport that refuses the connection for the first ``failures`` lease renewals."""

    def __init__(self, failures: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures = failures
        self.refused = 0
        self.renewals = 0

    def send(self, request: Any, **kwargs: Any) -> Any:
        if request.headers.get("x-ms-lease-action") == "renew":
            self.renewals += 1
            if self.refused < self.failures:
                self.refused += 1
                raise ServiceRequestError("connection refused (planted)")
        return super().send(request, **kwargs)


@pytest.fixture
def container(azurite: Azurite, handler: ModuleType) -> Iterator[ContainerClient]:  # noqa: F811
    client = ContainerClient.from_connection_string(azurite.connection_string, handler.LEASE_CONTAINER)
    yield client
    client.close()


def _faulty(azurite: Azurite, handler: ModuleType, failures: int) -> tuple[ContainerClient, FailingRenewals]:  # noqa: F811
    transport = FailingRenewals(failures)
    client = ContainerClient.from_connection_string(
        azurite.connection_string,
        handler.LEASE_CONTAINER,
        transport=transport,
        retry_total=0,  # the SDK's own retries off: each planted failure reaches the renewer
    )
    return client, transport


def test_transient_renewal_errors_are_retried_while_the_lease_is_valid(
    azurite: Azurite,  # noqa: F811
    container: ContainerClient,
    handler: ModuleType,
) -> None:
    client, transport = _faulty(azurite, handler, failures=3)
    clock = ManualClock()
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock.advance(seconds)

    lease = handler.RotationLease(client, "key-transient", clock=clock, sleep=sleep)
    with lease:
        lease.ensure_held("regenerate")  # renews now: three refusals, then success
        assert lease.held and lease.lost is None
        assert transport.refused == 3 and transport.renewals == 4
        assert waits == [1.0, 2.0, 4.0]  # back-off, all within the 60 s lease
        props = container.get_blob_client("key-transient.lock").get_blob_properties()
        assert props.lease.state == "leased"
    assert container.get_blob_client("key-transient.lock").get_blob_properties().lease.state == "available"
    client.close()


def test_renewals_failing_until_the_lease_would_expire_mark_it_lost(
    azurite: Azurite,  # noqa: F811
    handler: ModuleType,
) -> None:
    client, transport = _faulty(azurite, handler, failures=1000)
    clock = ManualClock()
    lease = handler.RotationLease(client, "key-expiring", clock=clock, sleep=clock.advance)
    lease.acquire()
    try:
        with pytest.raises(handler.LeaseLostError, match="before step 'write'") as info:
            lease.ensure_held("write")
        assert "no renewal succeeded before the lease expired" in str(info.value)
        assert isinstance(info.value, RotationError) and info.value.permanent is False
        assert clock() - 1000.0 < handler.LEASE_SECONDS  # it gave up while the lease was still valid
        assert transport.renewals >= 3 and not lease.held
        # Once lost, every later step is refused without asking the service again.
        asked = transport.renewals
        with pytest.raises(handler.LeaseLostError, match="before step 'probe'"):
            lease.ensure_held("probe")
        assert transport.renewals == asked
    finally:
        lease.release()
        client.close()


def test_a_refused_renewal_is_not_retried(container: ContainerClient, handler: ModuleType) -> None:
    clock = ManualClock()
    lease = handler.RotationLease(container, "key-broken", clock=clock, sleep=clock.advance)
    lease.acquire()
    try:
        BlobLeaseClient(container.get_blob_client("key-broken.lock")).break_lease(lease_break_period=0)
        with pytest.raises(handler.LeaseLostError, match="LeaseIsBrokenAndCannotBeRenewed"):
            lease.ensure_held("check")
        assert clock() == 1000.0  # no back-off: the service said the lease is gone
    finally:
        lease.release()


def _app_with_version(azure: LocalAzure) -> tuple[RotatingApp, Any]:
    app = new_rotating_app(azure)
    tags = dict(azure.keyvault.latest(app.name).tags or {})
    azure.keyvault.put_secret(
        app.name, app.keys()[0], content_type="text/plain", tags=tags, expires=2_000_000_000
    )
    return app, azure.keyvault.latest(app.name)


def _env(azure: LocalAzure, app: RotatingApp) -> dict[str, str | None]:
    return {
        "APIMVAULT_SECRET_NAME": app.name,
        "APIMVAULT_APIM_SUBSCRIPTION_ID": app.resource_id,
        "AZURE_CLIENT_ID": azure.rotator_identity.client_id,  # infra's rotator, granted by new_rotating_app
    }


@pytest.mark.parametrize(
    ("break_at", "regenerated"),
    [("regenerate", False), ("probe", True)],
    ids=["broken-before-regeneration", "broken-during-the-gateway-wait"],
)
def test_a_lease_broken_from_outside_stops_the_run_before_its_next_change(
    azure: LocalAzure,
    container: ContainerClient,
    handler: ModuleType,
    caplog: pytest.LogCaptureFixture,
    break_at: str,
    regenerated: bool,
) -> None:
    app, v1 = _app_with_version(azure)
    keys_before = app.keys()
    versions_before = len(azure.keyvault.versions(app.name))
    blob = container.get_blob_client(f"{app.name}.lock")
    intruder: list[Any] = []
    steps: list[str] = []

    def on_step(step: str) -> None:
        steps.append(step)
        if step == break_at and not intruder:  # another run breaks the lease and takes it
            BlobLeaseClient(blob).break_lease(lease_break_period=0)
            intruder.append(blob.acquire_lease(lease_duration=60))

    lease = handler.RotationLease(container, app.name)
    event = near_expiry_event(vault_url=azure.vault_url, secret=app.name, version=v1.version)
    with (
        temporary_environ(_env(azure, app)),
        caplog.at_level(logging.INFO),
        pytest.raises(handler.LeaseLostError) as info,
    ):
        handler.handle_event(event, lease=lease, on_step=on_step)

    next_change = "regenerate" if break_at == "regenerate" else "write"
    assert f"before step '{next_change}'" in str(info.value)
    # Never the vault write: the vault still holds v1, whose key the gateway still accepts.
    assert len(azure.keyvault.versions(app.name)) == versions_before
    latest = azure.keyvault.latest(app.name)
    assert latest.version == v1.version and gateway_status(azure, latest.value) == 200
    primary, secondary = app.keys()
    assert primary == keys_before[0]  # the key in use was never touched
    assert (secondary != keys_before[1]) is regenerated  # regenerated only if it was lost after that
    # The run neither released nor renewed the intruder's lease.
    assert blob.get_blob_properties().lease.state == "leased"
    intruder[0].release()
    assert "LeaseLostError" in caplog.text
