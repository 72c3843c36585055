"""The rotation function's logic (``apimvault.rotation.function``), free of ``azure.functions`` so it can be
imported and tested anywhere, and shipped in the wheel: ``infra/rotation_function/function_app.py`` (the
Functions app) and ``apimvault drill`` both run it. Needs only the ``rotation`` extra (the blob lease uses
``azure-storage-blob``, imported when a lease is made). ``infra/rotation_function/rotation_handler.py``
re-exports it for the Functions app's historical import path.

Delivery (issue 19): Event Grid writes each ``SecretNearExpiry`` event to the Storage queue
:data:`ROTATION_QUEUE` on the function's own storage account (answered at once: Event Grid never waits for
a rotation), and ``function_app.py``'s queue trigger hands the message body to
:func:`handle_queue_message`, which decodes the event (:func:`event_from_queue_message`) and calls
:func:`handle_event`: it checks the envelope (:func:`parse_event`), calls
:func:`apimvault.rotation.rotate_from_event` under the secret's lease and logs the outcome: event id, secret
name, versions, credential id. Never a key: the handler does not see one, and logs only what the result
object carries. A run that fails is retried by the queue (host.json ``visibilityTimeout`` later, which is
longer than the longest run) and after ``maxDequeueCount`` (5) failed runs the message is in
``<queue>-poison``, which pages (infra/modules/rotation.bicep). :func:`event_to_dict` remains for the Event
Grid trigger's ``EventGridEvent`` (a direct push subscription).

Serialising overlapping runs (issue 11). Event Grid delivers at least once ("duplicates might still be
received"), and a message whose instance died reappears after the host's 10-minute processing visibility,
so two runs for the same secret can overlap. Each run therefore holds a **blob lease**
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

import base64
import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from .._settings import EVENT_NEAR_EXPIRY
from ..exceptions import ApimVaultError, ConfigurationError, RotationError

if TYPE_CHECKING:  # pragma: no cover
    from azure.core.credentials import TokenCredential

    from .config import RotationConfig

__all__ = [
    "CHANGING_STEPS",
    "DEFAULT_FUNCTION_PROPAGATION_TIMEOUT",
    "DEFAULT_LEASE_WAIT",
    "HANDLED_EVENT_TYPES",
    "LEASE_CONTAINER",
    "LEASE_SECONDS",
    "NO_LEASE",
    "ROTATION_OVERHEAD",
    "ROTATION_QUEUE",
    "SECRET_NEAR_EXPIRY",
    "InvalidEventError",
    "LeaseLostError",
    "RotationLease",
    "event_from_queue_message",
    "event_to_dict",
    "handle_event",
    "handle_queue_message",
    "lease_from_environment",
    "parse_event",
]

log = logging.getLogger("apimvault.rotation_function")

SECRET_NEAR_EXPIRY = EVENT_NEAR_EXPIRY  # the name this module has always exported
HANDLED_EVENT_TYPES = frozenset({SECRET_NEAR_EXPIRY})
"""The Event Grid subscription (infra/modules/rotation.bicep) delivers only these."""
LEASE_CONTAINER = "apimvault-rotation-leases"
LEASE_SECONDS = 60  # the longest finite blob lease; renewed while the run lasts
ROTATION_QUEUE = "apimvault-rotation-events"
"""The Storage queue Event Grid delivers to (rotation.bicep ``rotationQueueName``); poison: ``<it>-poison``"""
# The longest run: waiting for another run's lease + waiting for the gateways + the ARM / Key Vault calls and
# probes around them. host.json's functionTimeout (15 min) and queues.visibilityTimeout (15 min) exceed it
# (tests/infra/test_rotation_delivery.py checks the sum). 600 s of propagation: a Microsoft Q&A answer
# (5922487) reports up to 10 minutes for a regenerated key to reach every gateway.
DEFAULT_LEASE_WAIT = 60.0
DEFAULT_FUNCTION_PROPAGATION_TIMEOUT = 600.0  # RotationConfig's default (tests check they agree)
ROTATION_OVERHEAD = 120.0


class _NoLease:
    """``lease=NO_LEASE``: run without a lease (one caller that serialises its runs itself, e.g. the drill
    without a storage account); the library's verification after every run still repairs an overlap."""

    def __repr__(self) -> str:
        return "NO_LEASE"


NO_LEASE = _NoLease()


class InvalidEventError(ValueError):
    """The event is not a Key Vault near-expiry event for the secret this function rotates.

    Raised (not swallowed) so the run fails and, after the queue's ``maxDequeueCount`` tries, the message
    lands in the poison queue, which raises an alert.
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


class LeaseLostError(RotationError):
    """The run lost its rotation lease (broken from outside, taken by another run, or not renewable
    before it expired): it stopped before its next change (tag write, regeneration, vault write, repair),
    so it never runs alongside the run that may hold the lease now. Not permanent: the queue message is
    retried later, and the retry finds the secret rotated (and verifies it) or rotates it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=False)


# Steps of apimvault.rotation's run that change something (rotate's ``on_step`` names): before each the
# lease is renewed synchronously, so the step starts with the lease provably held for LEASE_SECONDS.
CHANGING_STEPS = frozenset({"check", "regenerate", "write", "repair"})


def _lease_lost_for_good(exc: BaseException) -> bool:
    """A renewal error that no retry can mend: the service answered that this lease is not ours any more
    (409 LeaseIdMismatch / LeaseNotPresent / LeaseIsBrokenAndCannotBeRenewed, 412, 404 blob gone, any
    other 4xx but 408 and 429). Timeouts, connection errors, 408, 429 and 5xx are transient."""
    from azure.core.exceptions import HttpResponseError

    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        return 400 <= exc.status_code < 500 and exc.status_code not in (408, 429)
    return False


class RotationLease:
    """An Azure Storage blob lease that lets one rotation of a secret run at a time (see the module doc).

    ``container`` is an ``azure.storage.blob.ContainerClient``; the blob ``<secret>.lock`` (and the
    container) are created on first use. :meth:`acquire` waits at most ``wait`` seconds for a lease held by
    another run, polling with back-off on the injected ``clock`` / ``sleep``, then raises
    :class:`RotationError` (retryable). While held, a background thread renews the lease every
    ``renew_every`` seconds; :meth:`release` (or leaving the ``with`` block) stops it and releases.

    Held or stop (issue 19): a renewal that fails transiently (timeout, connection error, 408, 429, 5xx) is
    retried with back-off for as long as the lease is still valid (``duration`` after the last renewal
    that succeeded, counted from before that request was sent); a renewal the service refuses (the lease
    was broken, taken by another run or its blob deleted), or no success before the lease would expire,
    marks the lease **lost**. :meth:`ensure_held`, called before every rotation step, then raises
    :class:`LeaseLostError`; before the steps that change something (:data:`CHANGING_STEPS`) it renews
    synchronously first, so a lease broken a moment ago is seen there and not one step later.
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
        self._valid_until = 0.0
        self._lost: str | None = None
        self._renew_lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._lease is not None and self._lost is None

    @property
    def lost(self) -> str | None:
        """Why the lease was lost (``None`` while held or never taken)."""
        return self._lost

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
                sent = self.clock()
                self._lease = blob.acquire_lease(lease_duration=self.duration)
                self._valid_until = sent + self.duration
                self._lost = None
                break
            except HttpResponseError as exc:
                if exc.status_code != 409:  # 409 LeaseAlreadyPresent: another run holds it
                    raise
            now = self.clock()
            if now >= deadline:
                raise RotationError(
                    f"another rotation of {self.blob_name.removesuffix('.lock')} still holds the lease "
                    f"{LEASE_CONTAINER}/{self.blob_name} after {self.wait:g} s; nothing was changed (the "
                    "delivery is retried later)",
                    permanent=False,
                )
            log.info("rotation lease %s is held by another run; waiting", self.blob_name)
            self.sleep(min(delay, max(0.0, deadline - now)))
            delay = min(delay * 2, 10.0)
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name="rotation-lease-renewer", daemon=True)
        self._renewer.start()

    def _mark_lost(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
            log.error("rotation lease %s lost: %s; the run stops before its next change", self.blob_name, why)

    def renew(self) -> None:
        """Renew now, retrying transient errors while the lease is still valid; mark it lost otherwise.
        Raises :class:`LeaseLostError` when the lease is (or already was) lost."""
        with self._renew_lock:
            lease = self._lease
            if lease is None:
                raise LeaseLostError(f"the rotation lease {LEASE_CONTAINER}/{self.blob_name} is not held")
            delay = 1.0
            attempt = 0
            while self._lost is None:
                attempt += 1
                sent = self.clock()
                try:
                    lease.renew()
                except Exception as exc:
                    if _lease_lost_for_good(exc):
                        status = getattr(exc, "status_code", None)
                        code = getattr(exc, "error_code", None) or type(exc).__name__
                        self._mark_lost(f"renewal refused ({status} {code})")
                        break
                    now = self.clock()
                    if now + delay >= self._valid_until:
                        self._mark_lost(
                            f"no renewal succeeded before the lease expired ({attempt} attempts, last: "
                            f"{type(exc).__name__})"
                        )
                        break
                    log.warning(
                        "renewing rotation lease %s failed (%s, attempt %d); retrying in %g s while it is "
                        "still valid (%.0f s left)",
                        self.blob_name,
                        type(exc).__name__,
                        attempt,
                        delay,
                        self._valid_until - now,
                    )
                    self.sleep(delay)
                    delay = min(delay * 2, 8.0)
                    if self._stop.is_set():  # the run ended meanwhile: release() takes over
                        return
                    continue
                self._valid_until = sent + self.duration
                return
        raise self._lost_error()

    def _lost_error(self, step: str | None = None) -> LeaseLostError:
        secret = self.blob_name.removesuffix(".lock")
        where = f" before step {step!r}" if step else ""
        return LeaseLostError(
            f"the rotation lease {LEASE_CONTAINER}/{self.blob_name} was lost ({self._lost}): the rotation of "
            f"{secret} stopped{where} so that it cannot run alongside another run; the delivery is "
            "retried later"
        )

    def ensure_held(self, step: str) -> None:
        """Called before each rotation step: raise :class:`LeaseLostError` if the lease is lost; before a
        step that changes something, renew first (so the step starts with ``duration`` seconds of lease)."""
        if self._lost is not None:
            raise self._lost_error(step)
        if step in CHANGING_STEPS:
            try:
                self.renew()
            except LeaseLostError:
                raise self._lost_error(step) from None

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_every):
            if self._lease is None or self._lost is not None:
                return
            try:
                self.renew()
            except LeaseLostError:
                return  # ensure_held stops the run before its next step

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)
            self._renewer = None
        lease, self._lease = self._lease, None
        if lease is not None and self._lost is None:
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


def _guarded_steps(lease: RotationLease, on_step: Callable[[str], None] | None) -> Callable[[str], None]:
    """The rotation's step hook: the caller's hook, then the lease check (held or stop)."""

    def guarded(step: str) -> None:
        if on_step is not None:
            on_step(step)
        lease.ensure_held(step)  # never a change without the lease

    return guarded


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


def event_from_queue_message(body: bytes | str) -> dict[str, Any]:
    """The Event Grid event in a queue message Event Grid wrote (one event per message, Event Grid schema).

    host.json reads messages with ``messageEncoding: none``, so the body is what Event Grid stored: the
    event's JSON Base64-encoded (what Event Grid writes today, azure-docs#102923) or, as it wrote before,
    the plain JSON (azure-docs#69702). Both are accepted; a one-event array too. Anything else is an
    :class:`InvalidEventError` (after ``maxDequeueCount`` tries the message is in the poison queue)."""
    raw = body if isinstance(body, bytes) else body.encode()
    text = raw.decode("utf-8", errors="replace").strip()
    if not text.startswith(("{", "[")):
        try:
            text = base64.b64decode(text, validate=True).decode("utf-8").strip()
        except (ValueError, UnicodeDecodeError):
            raise InvalidEventError("queue message is neither JSON nor Base64-encoded JSON") from None
    try:
        event = json.loads(text)
    except ValueError:
        raise InvalidEventError("queue message is not JSON") from None
    if isinstance(event, list) and len(event) == 1:
        event = event[0]
    if not isinstance(event, dict):
        raise InvalidEventError("queue message does not hold one Event Grid event")
    return event


def handle_queue_message(
    body: bytes | str,
    *,
    message_id: str | None = None,
    dequeue_count: int | None = None,
    credential: TokenCredential | None = None,
    lease: RotationLease | _NoLease | None = None,
    on_step: Callable[[str], None] | None = None,
    config: RotationConfig | None = None,
) -> RotationResultLike:
    """The queue trigger's entry (``function_app.py``): decode the event Event Grid queued
    (:func:`event_from_queue_message`) and :func:`handle_event` it. An error propagates, so the host makes
    the message visible again after ``visibilityTimeout`` and, after ``maxDequeueCount`` failed runs,
    moves it to ``<queue>-poison`` (which raises an alert)."""
    log.info("queue message %s (dequeue count %s)", message_id, dequeue_count)
    return handle_event(
        event_from_queue_message(body), credential=credential, lease=lease, on_step=on_step, config=config
    )


def handle_event(
    event: Mapping[str, Any],
    *,
    credential: TokenCredential | None = None,
    lease: RotationLease | _NoLease | None = None,
    on_step: Callable[[str], None] | None = None,
    config: RotationConfig | None = None,
) -> RotationResultLike:
    """Rotate the APIM key named by a ``SecretNearExpiry`` event under the secret's lease; log and return
    the outcome.

    ``lease`` defaults to :func:`lease_from_environment` (the function's storage account); :data:`NO_LEASE`
    runs without one; ``on_step`` is
    handed to the rotation (tests use it to force interleavings), after the lease check of
    :meth:`RotationLease.ensure_held` (a lost lease stops the run with :class:`LeaseLostError` before its
    next change). The rotation's settings are read once with
    :meth:`apimvault.rotation.RotationConfig.from_env` (``APIMVAULT_PROPAGATION_TIMEOUT``, default 600 s as
    everywhere and within host.json's 15-minute functionTimeout, ``APIMVAULT_GATEWAY_URLS``, ...): a bad
    value is a ``ConfigurationError`` naming the variable. A caller that holds its settings already (the
    drill) passes ``config`` instead.

    ``credential`` defaults (inside the library) to ``DefaultAzureCredential``, which in the function app
    is the rotator identity (``AZURE_CLIENT_ID``). ``APIMVAULT_ARM_ENDPOINT`` (tests, sovereign clouds) and
    ``APIMVAULT_APIM_SUBSCRIPTION_ID`` (the one APIM subscription this function may rotate) come from the
    environment. Library errors are logged (type and message; they never carry a key) and re-raised so
    the queue message is retried and finally moved to the poison queue.
    """
    parsed = parse_event(event)
    data = parsed["data"]
    event_id, secret, version = parsed["id"], data["ObjectName"], data["Version"]
    log.info("rotation requested: event=%s secret=%s version=%s", event_id, secret, version)

    # the library's rotation (extra "rotation")
    from . import RotationConfig, rotate_from_event

    try:
        if config is None:
            config = RotationConfig.from_env()
        if lease is None:
            lease = lease_from_environment(secret)
        elif isinstance(lease, _NoLease):
            lease = None
        if lease is not None:
            lease.acquire()
            log.info("rotation lease taken: event=%s secret=%s", event_id, secret)
        guarded = on_step if lease is None else _guarded_steps(lease, on_step)
        try:
            result: RotationResultLike = rotate_from_event(
                parsed, credential=credential, on_step=guarded, config=config
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
    _log_outcome(result, event_id, secret, version)
    return result


def _log_outcome(result: RotationResultLike, event_id: str, secret: str, version: str) -> None:
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
