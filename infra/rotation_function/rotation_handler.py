"""The rotation function's logic, free of ``azure.functions`` so it can be imported and tested anywhere.

``function_app.py`` turns the Functions runtime's ``EventGridEvent`` into the plain Event Grid dict
(:func:`event_to_dict`) and calls :func:`handle_event`, which checks the envelope (:func:`parse_event`),
calls :func:`apimvault.rotation.rotate_from_event` and logs the outcome: event id, secret name, versions,
credential id. Never a key: the handler does not see one, and logs only what the result object carries.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from apimvault.exceptions import ApimVaultError

if TYPE_CHECKING:  # pragma: no cover
    from azure.core.credentials import TokenCredential

__all__ = ["HANDLED_EVENT_TYPES", "InvalidEventError", "event_to_dict", "handle_event", "parse_event"]

log = logging.getLogger("apimvault.rotation_function")

SECRET_NEAR_EXPIRY = "Microsoft.KeyVault.SecretNearExpiry"  # noqa: S105 (an event type, not a password)
HANDLED_EVENT_TYPES = frozenset({SECRET_NEAR_EXPIRY})
"""The Event Grid subscription (infra/modules/rotation.bicep) delivers only these."""


class InvalidEventError(ValueError):
    """The event is not a Key Vault near-expiry event for the secret this function rotates.

    Raised (not swallowed) so the delivery fails and, after Event Grid's retries, lands in the dead-letter
    container where it is visible.
    """


class RotationResultLike(Protocol):
    skipped: bool
    new_version: str | None
    credential_id: str


class _EventGridEventLike(Protocol):  # azure.functions.EventGridEvent, without importing it
    id: str
    topic: str
    subject: str
    event_type: str
    event_time: datetime | None
    data_version: str

    def get_json(self) -> Any: ...


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
    event: Mapping[str, Any], *, credential: TokenCredential | None = None
) -> RotationResultLike:
    """Rotate the APIM key named by a ``SecretNearExpiry`` event; log and return the outcome.

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

    from apimvault.rotation import rotate_from_event  # the library's rotation (extra "rotation")

    try:
        result: RotationResultLike = rotate_from_event(
            parsed,
            credential=credential,
            arm_endpoint=os.environ.get("APIMVAULT_ARM_ENDPOINT") or None,
            apim_subscription_id=os.environ.get("APIMVAULT_APIM_SUBSCRIPTION_ID") or None,
        )
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
