"""The rotation function's logic: :mod:`apimvault.rotation.function`, re-exported under the name
``function_app.py`` imports (and infra's tests import as the Functions host does).

The logic lives in the package so that the wheel this function deploys (``build_package.sh``) carries it and
``apimvault drill`` runs the very same handler (Event Grid -> Storage queue -> queue trigger ->
:func:`handle_queue_message`). See that module for the delivery, the lease and why a lease.
"""

from __future__ import annotations

from apimvault.rotation.function import (
    CHANGING_STEPS,
    DEFAULT_FUNCTION_PROPAGATION_TIMEOUT,
    DEFAULT_LEASE_WAIT,
    HANDLED_EVENT_TYPES,
    LEASE_CONTAINER,
    LEASE_SECONDS,
    NO_LEASE,
    ROTATION_OVERHEAD,
    ROTATION_QUEUE,
    SECRET_NEAR_EXPIRY,
    InvalidEventError,
    LeaseLostError,
    RotationLease,
    event_from_queue_message,
    event_to_dict,
    handle_event,
    handle_queue_message,
    lease_from_environment,
    log,
    parse_event,
)

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
    "log",
    "parse_event",
]
