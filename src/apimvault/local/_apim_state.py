"""Local APIM subscription state: the subscriptions, their two keys, and per-unit propagation of a
regenerated key (see :mod:`apimvault.local.apim`)."""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import math
import random
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, TypeAlias

Slot = Literal["primary", "secondary"]
UseSlot = Literal["primary", "secondary", "invalid", "missing"]
DelaySpec: TypeAlias = float | tuple[float, float]
"""A propagation delay in seconds: fixed, or ``(low, high)`` to draw one uniformly per regeneration."""
DEFAULT_UNITS = ("region1", "region2")
_UNIT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


def subscription_resource_id(arm_subscription: str, resource_group: str, service: str, sid: str) -> str:
    """The ARM resource id of an APIM subscription."""
    return (
        f"/subscriptions/{arm_subscription}/resourceGroups/{resource_group}/providers/"
        f"Microsoft.ApiManagement/service/{service}/subscriptions/{sid}"
    )


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _new_key() -> str:
    # Real APIM subscription keys are 32 lower-case hex characters.
    return secrets.token_hex(16)


# ------------------------------------------------------------------------------------------------ state


@dataclasses.dataclass
class Subscription:
    """One APIM subscription (``Microsoft.ApiManagement/service/subscriptions``) and its two keys."""

    arm_subscription: str
    resource_group: str
    service: str
    sid: str
    display_name: str
    primary_key: str
    secondary_key: str
    created_date: str
    state: str = "active"
    allow_tracing: bool = False
    etag: str = dataclasses.field(default_factory=lambda: f'"{uuid.uuid4().hex[:16].upper()}"')

    @property
    def service_id(self) -> str:
        return (
            f"/subscriptions/{self.arm_subscription}/resourceGroups/{self.resource_group}/providers/"
            f"Microsoft.ApiManagement/service/{self.service}"
        )

    @property
    def id(self) -> str:
        return subscription_resource_id(self.arm_subscription, self.resource_group, self.service, self.sid)

    def key(self, which: Slot) -> str:
        return self.primary_key if which == "primary" else self.secondary_key

    def contract(self) -> dict[str, Any]:
        """The ARM GET shape (``SubscriptionContract`` of API Management 2024-05-01); like real APIM it
        carries no keys. Unset dates and comments are left out, as in the spec's examples: the spec types
        them as strings, so ``null`` would not validate."""
        return {
            "id": self.id,
            "type": "Microsoft.ApiManagement/service/subscriptions",
            "name": self.sid,
            "properties": {
                "scope": f"{self.service_id}/apis",
                "displayName": self.display_name,
                "state": self.state,
                "createdDate": self.created_date,
                "allowTracing": self.allow_tracing,
            },
        }


def _delay_range(value: DelaySpec, what: str) -> tuple[float, float]:
    """``value`` as ``(low, high)``; ValueError for negatives, NaN or a reversed range."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number of seconds or a (low, high) pair")
    if isinstance(value, int | float):
        low = high = float(value)
    elif isinstance(value, tuple | list) and len(value) == 2 and not any(isinstance(v, bool) for v in value):
        try:
            low, high = float(value[0]), float(value[1])
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a number of seconds or a (low, high) pair") from None
    else:
        raise ValueError(f"{what} must be a number of seconds or a (low, high) pair")
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high < low:
        raise ValueError(f"{what} must be finite, >= 0 and low <= high (got {low}, {high})")
    return low, high


@dataclasses.dataclass
class _Pending:
    apply_at: float
    old: str
    new: str
    sub: Subscription
    slot: Slot


class LookupResult(NamedTuple):
    """What one gateway unit makes of a key: the subscription and slot it accepts it for (or None), and
    whether propagation decided it (a current key not synced yet, or a replaced key still accepted)."""

    found: tuple[Subscription, Slot] | None
    propagation_refused: bool
    stale: bool


class ApimState:
    """Thread-safe store of APIM subscriptions shared by the gateway and the ARM plane.

    ``units`` names the gateway units (the first answers at the gateway's root URL); ``propagation_delay``
    is one :data:`DelaySpec` for every unit or a mapping ``{unit: DelaySpec}`` (units not named get 0);
    ``clock`` is the time source of propagation (inject one in tests: no sleeps); ``seed`` makes the drawn
    delays reproducible.
    """

    def __init__(
        self,
        *,
        units: Sequence[str] = DEFAULT_UNITS,
        propagation_delay: DelaySpec | Mapping[str, DelaySpec] = 0.0,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, Subscription] = {}
        self._keys: dict[str, tuple[Subscription, Slot]] = {}
        names = tuple(units)
        if not names or len(set(names)) != len(names) or not all(_UNIT_NAME.match(u) for u in names):
            raise ValueError(f"units must be distinct lower-case names ([a-z0-9-], 1-40), got {names!r}")
        self.units: tuple[str, ...] = names
        self.clock = clock
        self._rng = random.Random(seed)  # noqa: S311 - simulated delays, not security
        self._delays: dict[str, tuple[float, float]] = {u: (0.0, 0.0) for u in names}
        self._views: dict[str, dict[str, tuple[Subscription, Slot]]] = {u: {} for u in names}
        self._pending: dict[str, collections.deque[_Pending]] = {u: collections.deque() for u in names}
        self.set_propagation(propagation_delay)

    # ---------------------------------------------------------------------------------- propagation

    def set_propagation(self, delay: DelaySpec | Mapping[str, DelaySpec], unit: str | None = None) -> None:
        """Set the propagation delay of ``unit`` (or, with ``unit=None``, of every unit; a mapping sets
        the units it names). Applies to later regenerations; queued changes keep their time."""
        if isinstance(delay, Mapping):
            if unit is not None:
                raise ValueError("give either a mapping of units or one unit, not both")
            unknown = sorted(set(delay) - set(self.units))
            if unknown:
                known = ", ".join(self.units)
                raise ValueError(f"unknown gateway unit(s) {', '.join(unknown)}; known: {known}")
            ranges = {u: _delay_range(v, f"propagation delay of {u}") for u, v in delay.items()}
        else:
            targets = self.units if unit is None else (unit,)
            if unit is not None and unit not in self.units:
                raise ValueError(f"unknown gateway unit {unit!r}; known: {', '.join(self.units)}")
            spec = _delay_range(delay, "propagation delay")
            ranges = dict.fromkeys(targets, spec)
        with self._lock:
            self._delays.update(ranges)

    def propagation(self) -> dict[str, dict[str, float | int]]:
        """Per unit: the delay range and how many key changes it has not applied yet."""
        now = self.clock()
        with self._lock:
            for unit in self.units:
                self._apply_due(unit, now)
            return {
                u: {"min": self._delays[u][0], "max": self._delays[u][1], "pending": len(self._pending[u])}
                for u in self.units
            }

    def settle(self) -> None:
        """Apply every queued key change on every unit now (as if all delays had passed)."""
        with self._lock:
            for unit in self.units:
                self._apply_due(unit, math.inf)

    def _draw(self, unit: str) -> float:
        low, high = self._delays[unit]
        return low if high <= low else self._rng.uniform(low, high)

    def _apply_due(self, unit: str, now: float) -> None:
        queue, view = self._pending[unit], self._views[unit]
        while queue and queue[0].apply_at <= now:
            change = queue.popleft()
            if view.get(change.old, (None,))[0] is change.sub:
                view.pop(change.old, None)
            view[change.new] = (change.sub, change.slot)

    # ---------------------------------------------------------------------------------------- store

    def create_subscription(
        self, arm_subscription: str, resource_group: str, service: str, sid: str, *, display_name: str
    ) -> Subscription:
        sub = Subscription(
            arm_subscription,
            resource_group,
            service,
            sid,
            display_name,
            primary_key=_new_key(),
            secondary_key=_new_key(),
            created_date=_now_iso(),
        )
        with self._lock:
            if sid in self._subs:
                raise ValueError(f"APIM subscription {sid!r} already exists")
            self._subs[sid] = sub
            for table in (self._keys, *self._views.values()):
                table[sub.primary_key] = (sub, "primary")
                table[sub.secondary_key] = (sub, "secondary")
        return sub

    def get(self, sid: str) -> Subscription | None:
        with self._lock:
            return self._subs.get(sid)

    def find(self, arm_subscription: str, resource_group: str, service: str, sid: str) -> Subscription | None:
        """The subscription at this ARM address (resource group and service names are case-insensitive)."""
        with self._lock:
            sub = self._subs.get(sid)
        if sub is None or not self.service_exists(arm_subscription, resource_group, service):
            return None
        if sub.resource_group.lower() != resource_group.lower() or sub.service.lower() != service.lower():
            return None
        return sub

    def service_exists(self, arm_subscription: str, resource_group: str, service: str) -> bool:
        with self._lock:
            return any(
                s.arm_subscription.lower() == arm_subscription.lower()
                and s.resource_group.lower() == resource_group.lower()
                and s.service.lower() == service.lower()
                for s in self._subs.values()
            )

    def list(self, arm_subscription: str, resource_group: str, service: str) -> list[Subscription]:
        with self._lock:
            return [
                s
                for s in self._subs.values()
                if s.arm_subscription.lower() == arm_subscription.lower()
                and s.resource_group.lower() == resource_group.lower()
                and s.service.lower() == service.lower()
            ]

    def regenerate(self, sid: str, which: Slot) -> None:
        """Replace one key of ``sid``. ARM (``listSecrets``) shows the new key at once; each gateway unit
        accepts it, and stops accepting the old one, after its propagation delay (at once with 0)."""
        self.set_key(sid, which, _new_key())

    def set_key(self, sid: str, which: Slot, value: str) -> None:
        """Give one key of ``sid`` a chosen value (ARM's subscription create-or-update can set
        ``primaryKey`` / ``secondaryKey``), propagating to the gateway units as :meth:`regenerate` does."""
        if which not in ("primary", "secondary"):
            raise ValueError(f"which must be 'primary' or 'secondary', not {which!r}")
        if not isinstance(value, str) or not 1 <= len(value) <= 256:
            raise ValueError("a subscription key is 1 to 256 characters")
        now = self.clock()
        with self._lock:
            sub = self._subs.get(sid)
            if sub is None:
                raise KeyError(sid)
            if value in self._keys:
                raise ValueError("that key value is already in use by a subscription")
            old = sub.key(which)
            self._keys.pop(old, None)
            new = value
            if which == "primary":
                sub.primary_key = new
            else:
                sub.secondary_key = new
            self._keys[new] = (sub, which)
            sub.etag = f'"{uuid.uuid4().hex[:16].upper()}"'
            for unit in self.units:
                queue = self._pending[unit]
                apply_at = now + self._draw(unit)
                if queue:  # a unit applies its changes in order
                    apply_at = max(apply_at, queue[-1].apply_at)
                queue.append(_Pending(apply_at, old, new, sub, which))
                self._apply_due(unit, now)

    def lookup(self, key: str) -> tuple[Subscription, Slot] | None:
        """The subscription and slot a key belongs to (the authoritative table, as ARM sees it), or None
        (unknown, regenerated or inactive)."""
        with self._lock:
            found = self._keys.get(key)
        if found is None or found[0].state != "active":
            return None
        return found

    def gateway_lookup(self, unit: str, key: str) -> LookupResult:
        """What gateway ``unit`` makes of ``key`` now, propagation included."""
        now = self.clock()
        with self._lock:
            self._apply_due(unit, now)
            seen = self._views[unit].get(key)
            current = self._keys.get(key)
        if seen is not None and seen[0].state != "active":
            return LookupResult(None, False, False)
        if seen is None:
            refused = current is not None and current[0].state == "active"
            return LookupResult(None, refused, False)
        return LookupResult(seen, False, current is None)
