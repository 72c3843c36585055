"""The rotation function's logic, free of ``azure.functions`` so it can be imported and tested anywhere.

``function_app.py`` turns the Functions runtime's ``EventGridEvent`` into the plain Event Grid dict
(:func:`event_to_dict`) and calls :func:`handle_event`, which checks the envelope (:func:`parse_event`),
calls :func:`apimvault.rotation.rotate_from_event` and logs the outcome: event id, secret name, versions,
credential id. Never a key: the handler does not see one, and logs only what the result object carries.

Serialising overlapping runs (issue 11). Event Grid delivers at least once and re-delivers an event it got
no answer for within 30 s; a cold start plus ARM calls plus the wait for the gateways to accept the new key
easily takes longer, so two runs for the same secret can overlap. Each run therefore holds a **blob lease**
(:class:`RotationLease`) on ``apimvault-rotation-leases/<secret>.lock`` in the function's own storage
account (``AzureWebJobsStorage``, on which the host identity already has Storage Blob Data Owner) for the
whole rotation; a second run waits for it (bounded, with back-off) and then finds the version already
rotated, verifies it and skips. Chosen over per-instance concurrency 1 with a single instance because:
that is a platform setting (``maximumInstanceCount`` / scale-out limit plus host concurrency) which a
redeploy, a plan change or the portal silently undoes, and nothing in the code would notice; it serialises
only runs on one instance, not a run that outlives its instance (functionTimeout) and its retry; and it
queues unrelated secrets behind each other. A lease holds across instances and restarts, is scoped per
secret, and expires on its own 60 s after a crashed run stops renewing it (renewed every 20 s while the run
is alive), so a dead run never blocks rotation for long. The library's own check (verify the latest
version after every run and skip, repair it if needed) remains the safety net when the lease cannot be
had, e.g. for a rotation started by hand with ``apimvault rotate``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from apimvault.exceptions import ApimVaultError, ConfigurationError, RotationError

if TYPE_CHECKING:  # pragma: no cover
    from azure.core.credentials import TokenCredential

__all__ = [
    "HANDLED_EVENT_TYPES",
    "LEASE_CONTAINER",
    "InvalidEventError",
    "RotationLease",
    "event_to_dict",
    "handle_event",
    "lease_from_environment",
    "parse_event",
]

log = logging.getLogger("apimvault.rotation_function")

SECRET_NEAR_EXPIRY = "Microsoft.KeyVault.SecretNearExpiry"  # noqa: S105 (an event type, not a password)
HANDLED_EVENT_TYPES = frozenset({SECRET_NEAR_EXPIRY})
"""The Event Grid subscription (infra/modules/rotation.bicep) delivers only these."""
LEASE_CONTAINER = "apimvault-rotation-leases"
LEASE_SECONDS = 60  # the longest finite blob lease; renewed while the run lasts
DEFAULT_LEASE_WAIT = 60.0


class InvalidEventError(ValueError):
    """The event is not a Key Vault near-expiry event for the secret this function rotates.

    Raised (not swallowed) so the delivery fails and, after Event Grid's retries, lands in the dead-letter
    container where it is visible.
    """


class RotationResultLike(Protocol):
    @property
    def skipped(self) -> bool: ...
    @property
    def new_version(self) -> str | None: ...
    @property
    def credential_id(self) -> str: ...


class _EventGridEventLike(Protocol):  # azure.functions.EventGridEvent, without importing it
    id: str
    topic: str
    subject: str
    event_type: str
    event_time: datetime | None
    data_version: str

    def get_json(self) -> Any: ...


class RotationLease:
    """An Azure Storage blob lease that lets one rotation of a secret run at a time (see the module doc).

    ``container`` is an ``azure.storage.blob.ContainerClient``; the blob ``<secret>.lock`` (and the
    container) are created on first use. :meth:`acquire` waits at most ``wait`` seconds for a lease held by
    another run, polling with back-off on the injected ``clock`` / ``sleep``, then raises
    :class:`RotationError` (retryable). While held, a background thread renews the lease every
    ``renew_every`` seconds; :meth:`release` (or leaving the ``with`` block) stops it and releases.
    """

    def __init__(
        self,
        container: Any,
        secret_name: str,
        *,
        wait: float = DEFAULT_LEASE_WAIT,
        duration: int = LEASE_SECONDS,
        renew_every: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not re.fullmatch(r"[0-9A-Za-z-]{1,127}", secret_name):
            raise ConfigurationError(f"{secret_name!r} is not a Key Vault secret name")
        self.container = container
        self.blob_name = f"{secret_name}.lock"
        self.wait = wait
        self.duration = duration
        self.renew_every = renew_every
        self.clock = clock
        self.sleep = sleep
        self._lease: Any = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._lease is not None

    def _ensure_blob(self) -> Any:
        from azure.core.exceptions import HttpResponseError, ResourceExistsError

        with contextlib.suppress(ResourceExistsError):
            self.container.create_container()
        blob = self.container.get_blob_client(self.blob_name)
        try:
            blob.upload_blob(b"", overwrite=False)
        except ResourceExistsError:
            pass
        except HttpResponseError as exc:  # 412: the blob exists and is leased right now
            if exc.status_code != 412:
                raise
        return blob

    def acquire(self) -> None:
        from azure.core.exceptions import HttpResponseError

        blob = self._ensure_blob()
        deadline = self.clock() + self.wait
        delay = 1.0
        while True:
            try:
                self._lease = blob.acquire_lease(lease_duration=self.duration)
                break
            except HttpResponseError as exc:
                if exc.status_code != 409:  # 409 LeaseAlreadyPresent: another run holds it
                    raise
            now = self.clock()
            if now >= deadline:
                raise RotationError(
                    f"another rotation of {self.blob_name.removesuffix('.lock')} still holds the lease "
                    f"{LEASE_CONTAINER}/{self.blob_name} after {self.wait:g} s; nothing was changed (Event "
                    "Grid retries the delivery later)",
                    permanent=False,
                )
            log.info("rotation lease %s is held by another run; waiting", self.blob_name)
            self.sleep(min(delay, max(0.0, deadline - now)))
            delay = min(delay * 2, 10.0)
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name="rotation-lease-renewer", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_every):
            lease = self._lease
            if lease is None:
                return
            try:
                lease.renew()
            except Exception as exc:  # the lease is lost: the library's verification still holds
                log.warning("could not renew rotation lease %s: %s", self.blob_name, type(exc).__name__)
                return

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)
            self._renewer = None
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                lease.release()
            except Exception as exc:  # it expires on its own within LEASE_SECONDS
                log.warning("could not release rotation lease %s: %s", self.blob_name, type(exc).__name__)

    def __enter__(self) -> RotationLease:
        self.acquire()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def lease_from_environment(secret_name: str) -> RotationLease | None:
    """The lease on the function's own storage account, configured as the Functions host configures
    ``AzureWebJobsStorage``: a connection string (local development, e.g. Azurite), or identity-based
    ``AzureWebJobsStorage__blobServiceUri`` / ``__accountName`` with ``__clientId`` (the deployed app).
    ``None`` (with a warning) when none is set, i.e. outside the Functions host."""
    from azure.storage.blob import ContainerClient

    connection = os.environ.get("AzureWebJobsStorage", "").strip()  # noqa: SIM112 - the Functions host's names
    wait = float(os.environ.get("APIMVAULT_LEASE_WAIT", "") or DEFAULT_LEASE_WAIT)
    if connection:
        container = ContainerClient.from_connection_string(connection, LEASE_CONTAINER)
        return RotationLease(container, secret_name, wait=wait)
    uri = os.environ.get("AzureWebJobsStorage__blobServiceUri", "").strip()  # noqa: SIM112 - the Functions host's names
    account = os.environ.get("AzureWebJobsStorage__accountName", "").strip()  # noqa: SIM112 - the Functions host's names
    if not uri and account:
        uri = f"https://{account}.blob.core.windows.net"
    if not uri:
        log.warning(
            "no AzureWebJobsStorage configured: rotations of %s are not serialised (the library's "
            "verification after every run still repairs an overlap)",
            secret_name,
        )
        return None
    from azure.identity import ManagedIdentityCredential

    client_id = os.environ.get("AzureWebJobsStorage__clientId", "").strip() or None  # noqa: SIM112 - the Functions host's names
    credential = ManagedIdentityCredential(client_id=client_id)
    return RotationLease(ContainerClient(uri, LEASE_CONTAINER, credential=credential), secret_name, wait=wait)


def event_to_dict(event: _EventGridEventLike) -> dict[str, Any]:
    """The Event Grid schema dict of a Functions ``EventGridEvent`` (what Event Grid POSTed)."""
    return {
        "id": event.id,
        "topic": event.topic,
        "subject": event.subject,
        "eventType": event.event_type,
        "eventTime": event.event_time.isoformat() if event.event_time is not None else None,
        "data": event.get_json(),
        "dataVersion": event.data_version,
        "metadataVersion": "1",
    }


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidEventError(f"event {what} missing or not a string")
    return value


def parse_event(event: Mapping[str, Any], *, expected_secret: str | None = None) -> dict[str, Any]:
    """Check that ``event`` is a near-expiry event for the expected secret; return a plain copy.

    ``expected_secret`` defaults to ``APIMVAULT_SECRET_NAME``; when set, an event about another secret is
    refused even if the Event Grid filter let it through.
    """
    if not isinstance(event, Mapping):
        raise InvalidEventError("event is not an object")
    event_id = _text(event.get("id"), "id")
    event_type = _text(event.get("eventType"), "eventType")
    if event_type not in HANDLED_EVENT_TYPES:
        raise InvalidEventError(f"event {event_id}: type {event_type!r} is not handled")
    subject = _text(event.get("subject"), "subject")
    data = event.get("data")
    if not isinstance(data, Mapping):
        raise InvalidEventError(f"event {event_id}: data missing")
    if data.get("ObjectType", "Secret") != "Secret":
        raise InvalidEventError(f"event {event_id}: object type {data.get('ObjectType')!r} is not Secret")
    name = _text(data.get("ObjectName"), "data.ObjectName")
    _text(data.get("Version"), "data.Version")
    if name != subject:
        raise InvalidEventError(f"event {event_id}: subject {subject!r} and data.ObjectName {name!r} differ")
    if expected_secret is None:
        expected_secret = os.environ.get("APIMVAULT_SECRET_NAME") or None
    if expected_secret is not None and name != expected_secret:
        raise InvalidEventError(f"event {event_id}: secret {name!r} is not {expected_secret!r}")
    parsed = dict(event)
    parsed["data"] = dict(data)
    return parsed


def handle_event(
    event: Mapping[str, Any],
    *,
    credential: TokenCredential | None = None,
    lease: RotationLease | None = None,
    on_step: Callable[[str], None] | None = None,
) -> RotationResultLike:
    """Rotate the APIM key named by a ``SecretNearExpiry`` event under the secret's lease; log and return
    the outcome.

    ``lease`` defaults to :func:`lease_from_environment` (the function's storage account); ``on_step`` is
    handed to the rotation (tests use it to force interleavings). The rotation's settings are read once
    with :meth:`apimvault.rotation.RotationConfig.from_env` (``APIMVAULT_PROPAGATION_TIMEOUT``, default
    600 s as everywhere, ``APIMVAULT_GATEWAY_URLS``, ...): a bad value is a ``ConfigurationError`` naming
    the variable.

    ``credential`` defaults (inside the library) to ``DefaultAzureCredential``, which in the function app
    is the rotator identity (``AZURE_CLIENT_ID``). ``APIMVAULT_ARM_ENDPOINT`` (tests, sovereign clouds) and
    ``APIMVAULT_APIM_SUBSCRIPTION_ID`` (the one APIM subscription this function may rotate) come from the
    environment. Library errors are logged (type and message; they never carry a key) and re-raised so
    Event Grid retries and finally dead-letters the event.
    """
    parsed = parse_event(event)
    data = parsed["data"]
    event_id, secret, version = parsed["id"], data["ObjectName"], data["Version"]
    log.info("rotation requested: event=%s secret=%s version=%s", event_id, secret, version)

    # the library's rotation (extra "rotation")
    from apimvault.rotation import RotationConfig, rotate_from_event

    try:
        config = RotationConfig.from_env()
        if lease is None:
            lease = lease_from_environment(secret)
        if lease is not None:
            lease.acquire()
            log.info("rotation lease taken: event=%s secret=%s", event_id, secret)
        try:
            result: RotationResultLike = rotate_from_event(
                parsed, credential=credential, on_step=on_step, config=config
            )
        finally:
            if lease is not None:
                lease.release()
    except ApimVaultError as exc:
        log.error(
            "rotation failed: event=%s secret=%s version=%s error=%s: %s",
            event_id,
            secret,
            version,
            type(exc).__name__,
            exc,
        )
        raise
    if result.skipped:
        log.info(
            "rotation skipped: event=%s secret=%s version=%s is no longer the latest (credential_id=%s)",
            event_id,
            secret,
            version,
            result.credential_id,
        )
    else:
        log.info(
            "rotated: event=%s secret=%s old_version=%s new_version=%s credential_id=%s",
            event_id,
            secret,
            version,
            result.new_version,
            result.credential_id,
        )
    return result
