"""Push invalidation from Key Vault's Event Grid events (Event Grid schema or CloudEvents 1.0)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ._async import AsyncSubscriptionKeyProvider
from ._model import PushPlan
from ._settings import EVENT_EXPIRED, EVENT_NEAR_EXPIRY, EVENT_NEW_VERSION, check_spread
from ._sync import SubscriptionKeyProvider
from .exceptions import ConfigurationError, KeyUnavailableError

__all__ = ["SecretEvent", "arefresh_from_event", "parse_secret_events", "refresh_from_event"]

NEW_VERSION = EVENT_NEW_VERSION
NEAR_EXPIRY = EVENT_NEAR_EXPIRY
EXPIRED = EVENT_EXPIRED
_SECRET_EVENTS = frozenset({NEW_VERSION, NEAR_EXPIRY, EXPIRED})
P = TypeVar("P", SubscriptionKeyProvider, AsyncSubscriptionKeyProvider)


@dataclasses.dataclass(frozen=True)
class SecretEvent:
    """One Key Vault secret event, normalised from either schema."""

    event_type: str
    vault_name: str
    secret_name: str
    version: str | None
    secret_id: str | None


def _event_list(payload: Any) -> list[Mapping[str, Any]]:
    if isinstance(payload, bytes | str):
        try:
            payload = json.loads(payload)
        except ValueError as exc:
            raise ConfigurationError(f"event payload is not JSON: {exc}") from None
        except RecursionError:  # e.g. 100,000 nested brackets: refused before any event is looked at
            raise ConfigurationError("event payload is nested too deeply to be an event") from None
    if isinstance(payload, Mapping):
        payload = [payload]
    if not isinstance(payload, list) or not all(isinstance(e, Mapping) for e in payload):
        raise ConfigurationError("event payload must be an Event Grid / CloudEvents object or a list of them")
    return payload


def parse_secret_events(payload: Any) -> list[SecretEvent]:
    """Key Vault secret events in an Event Grid or CloudEvents payload (dict, list, str or bytes).

    Other event types (e.g. Event Grid's subscription validation) are ignored; a malformed secret
    event raises :class:`~apimvault.ConfigurationError`.
    """
    events = []
    for raw in _event_list(payload):
        event_type = raw.get("eventType") or raw.get("type")
        if event_type is not None and not isinstance(event_type, str):  # a list or an object (unhashable)
            raise ConfigurationError(
                f"event has an eventType / type of {type(event_type).__name__}, not a string"
            )
        if event_type is None or event_type not in _SECRET_EVENTS:
            continue
        data = raw.get("data")
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"{event_type} event has no data object")
        name = data.get("ObjectName") or raw.get("subject")
        vault = data.get("VaultName")
        version = data.get("Version")
        secret_id = data.get("Id")
        if not isinstance(name, str) or not name or not isinstance(vault, str) or not vault:
            raise ConfigurationError(f"{event_type} event lacks VaultName/ObjectName")
        if version is not None and not isinstance(version, str):
            raise ConfigurationError(f"{event_type} event has a non-string Version")
        if secret_id is not None and not isinstance(secret_id, str):
            raise ConfigurationError(f"{event_type} event has a non-string Id")
        events.append(SecretEvent(str(event_type), vault, name, version or None, secret_id))
    return events


def _concerns(event: SecretEvent, provider: SubscriptionKeyProvider | AsyncSubscriptionKeyProvider) -> bool:
    if event.secret_name.lower() != provider.secret_name.lower():
        return False
    host = (urlsplit(provider.vault_url).hostname or "").lower()
    if event.secret_id:
        try:
            id_parts = urlsplit(event.secret_id)
            same_vault = (id_parts.hostname or "").lower() == host and id_parts.port == urlsplit(
                provider.vault_url
            ).port
        except ValueError:
            same_vault = False
        if same_vault:
            return True
    return host.split(".", 1)[0] == event.vault_name.lower()


def _plans(payload: Any, providers: Iterable[P], spread: float) -> Iterator[tuple[P, PushPlan]]:
    """For each provider an event concerns: the plan (an event naming the version held costs nothing)."""
    check_spread(spread)
    events = parse_secret_events(payload)
    for provider in providers:
        if provider.version is not None:  # pinned: a new version changes nothing for this provider
            continue
        mine = [e for e in events if _concerns(e, provider)]
        if not mine:
            continue
        # Only SecretNewVersionCreated names a version to compare with; near-expiry/expired always push.
        version = mine[-1].version if all(e.event_type == NEW_VERSION for e in mine) else None
        plan = provider._push_event(version, spread)
        if plan is not PushPlan.SKIP:
            yield provider, plan


def refresh_from_event(
    payload: Any, providers: Iterable[SubscriptionKeyProvider], *, spread: float = 0.0
) -> list[SubscriptionKeyProvider]:
    """Refresh the providers a ``SecretNewVersionCreated`` (or near-expiry/expired) event concerns.

    A provider already holding the event's version is skipped (no Key Vault read). Push-triggered reads
    are bounded: at most one per provider per ``policy.forced_refresh_interval`` happens here; further
    events within the interval leave one background refresh pending for when it ends, so a flood of
    (forged) events costs at most one read per interval. Returns the providers refreshed or invalidated.
    Refresh failures are recorded by the provider (which keeps serving its key) and not raised.
    With ``spread > 0`` the providers are only invalidated with that spread (see
    :meth:`SubscriptionKeyProvider.invalidate`): their background refreshes are scattered over ``spread``
    seconds instead of happening now, which keeps a fleet under Key Vault's rate limit.
    """
    done: list[SubscriptionKeyProvider] = []
    for provider, plan in _plans(payload, providers, spread):
        if plan is PushPlan.READ:
            with contextlib.suppress(KeyUnavailableError):
                provider.refresh()
        done.append(provider)
    return done


async def arefresh_from_event(
    payload: Any, providers: Iterable[AsyncSubscriptionKeyProvider], *, spread: float = 0.0
) -> list[AsyncSubscriptionKeyProvider]:
    """The asyncio twin of :func:`refresh_from_event`."""
    done: list[AsyncSubscriptionKeyProvider] = []
    for provider, plan in _plans(payload, providers, spread):
        if plan is PushPlan.READ:
            with contextlib.suppress(KeyUnavailableError):
                await provider.refresh()
        done.append(provider)
    return done
