"""Local Azure API Management: subscription state, the gateway in front of Azure OpenAI, and the ARM plane.

* :class:`ApimState` holds the APIM subscriptions and their two keys (both valid at once; Microsoft Learn,
  "Subscriptions in Azure API Management").
* :class:`ApimGateway` routes a request to the API's operations (APIM's 404 ``Resource not found`` for a
  path or method no operation matches, before any key check), checks ``Ocp-Apim-Subscription-Key`` (or the
  ``subscription-key`` query parameter),
  applies an optional rate-limit policy, strips the key and forwards to the Azure OpenAI backend in-process
  (the backend's ASGI app, faults and counters included), relaying the response, SSE chunks included, as the
  backend sends it.
* :class:`ArmService` is the ``Microsoft.ApiManagement`` management plane for subscriptions: get, list,
  ``listSecrets`` and ``regeneratePrimaryKey`` / ``regenerateSecondaryKey``, behind ARM bearer auth, so the
  unmodified ``azure.mgmt.apimanagement.ApiManagementClient`` works against it.

Propagation (undocumented by Microsoft; Microsoft Q&A question 5922487 reports up to 10 minutes).
Real APIM gateways pick a regenerated key up asynchronously, each gateway
unit (region, self-hosted gateway) on its own: until a unit has synced it refuses the new value with the
ordinary invalid-key 401 and keeps accepting the value it replaced. Here every unit keeps its own replica
of the key table; ``regenerate`` changes the authoritative table (what ARM's ``listSecrets`` answers) at
once and queues the change for each unit, which applies it ``delay`` seconds later on the state's injected
``clock`` (a fixed delay or one drawn uniformly from ``(low, high)`` for each regeneration and unit; the
changes of one unit apply in order). A delay of 0 (the default) applies the change at once, as before.
Units (``routing="balanced"``, the default) share the gateway's one URL as the units of a region share one
hostname behind a load balancer: each routed request goes to one unit, round-robin or seeded random, so
one accepted request proves nothing about the other units. ``routing="per-unit"`` keeps the earlier
model where the first unit answers at the root and every unit also under ``/<unit>/...``. Only regional
and self-hosted gateways have URLs of their own in real APIM. The gateway counts, per
unit, ``propagation-refused`` (a current key refused because the unit has not synced it yet) and
``propagation-stale`` (a replaced key still accepted).
"""

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
from urllib.parse import unquote_plus

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .._key import fingerprint
from ._arm_versions import api_version_problem
from ._server import Service, json_response
from ._tokens import TENANT_ID, TokenError, TokenIssuer
from .openai_backend import OpenAIBackend
from .policies import PolicyEngine, forward_without_key
from .rbac import APIM_SUBSCRIPTIONS, Rbac

Slot = Literal["primary", "secondary"]
UseSlot = Literal["primary", "secondary", "invalid", "missing"]
DelaySpec: TypeAlias = float | tuple[float, float]
"""A propagation delay in seconds: fixed, or ``(low, high)`` to draw one uniformly per regeneration."""
DEFAULT_UNITS = ("region1", "region2")
_UNIT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
Routing = Literal["balanced", "per-unit"]
"""``balanced``: every unit behind the gateway's one URL, one unit chosen per request (real APIM: the units of
a region share one hostname behind a load balancer). ``per-unit``: each unit also at ``/<unit>`` (the first
at the root), for tests written before units shared a URL."""
Balance = Literal["round-robin", "random"]
DEFAULT_API_SUFFIX = "openai"
"""The Azure OpenAI API's URL suffix (infra/modules/apim.bicep: ``path: 'openai'``)."""
DEFAULT_OPERATIONS: tuple[tuple[str, str], ...] = (("POST", "/*"), ("GET", "/*"))
"""The API's operations as infra defines them (``openAiPostOperation`` / ``openAiGetOperation``)."""
_SUFFIX = re.compile(r"^[A-Za-z0-9._~-]+(?:/[A-Za-z0-9._~-]+)*$")
_METHOD = re.compile(r"^(?:\*|[A-Z]{3,7})$")
_SEGMENT = r"(?:[A-Za-z0-9._~:@!$&'()+,;=%-]+|\{[A-Za-z0-9_-]+\}|\*)"
_TEMPLATE = re.compile(rf"^/{_SEGMENT}?(?:/{_SEGMENT})*$")

# Gateway 401 bodies as observed on the wire (raw responses quoted in community write-ups and the Learn
# tutorial): "... to an API.", not the Learn table's "... to this API.".
MISSING_KEY_MESSAGE = (
    "Access denied due to missing subscription key. Make sure to include subscription key when making "
    "requests to an API."
)
INVALID_KEY_MESSAGE = (
    "Access denied due to invalid subscription key. Make sure to provide a valid key for an active "
    "subscription."
)
# APIM's answer when no API/operation matches the request, whatever key it carries (it routes before it
# checks the key: Microsoft Q&A 5743485; body {"statusCode": 404, "message": "Resource not found"} as
# community captures of unmatched operations show, e.g. the Tech Community post on APIM's 404 instead of 405).
NOT_FOUND_MESSAGE = "Resource not found"


def normalize_suffix(suffix: str) -> str:
    """An API URL suffix without surrounding slashes (``""`` allowed); ValueError if malformed."""
    if not isinstance(suffix, str):
        raise ValueError("the API URL suffix must be a string")
    cleaned = suffix.strip().strip("/")
    if cleaned and (len(cleaned) > 400 or not _SUFFIX.match(cleaned)):
        raise ValueError(f"invalid API URL suffix {suffix!r}: path segments of [A-Za-z0-9._~-], or empty")
    return cleaned


def normalize_operations(operations: Sequence[Sequence[str]]) -> tuple[tuple[str, str], ...]:
    """``((METHOD, urlTemplate), ...)``, validated: METHOD upper-case or ``*``; a template starts with ``/``
    and its segments are literals, ``{param}`` (one segment) or ``*`` (the rest of the path, last only)."""
    result: list[tuple[str, str]] = []
    for op in operations:
        if isinstance(op, str) or len(op) != 2 or not all(isinstance(x, str) for x in op):
            raise ValueError(f"an operation is a (method, urlTemplate) pair, not {op!r}")
        method, template = op[0].strip().upper(), op[1].strip()
        if not _METHOD.match(method) or not _TEMPLATE.match(template) or "*" in template.rstrip("*"):
            raise ValueError(f"invalid operation {op!r}: (METHOD or '*', '/literal/{{param}}/*')")
        result.append((method, template))
    if not result:
        raise ValueError("an API needs at least one operation")
    return tuple(result)


def _template_matches(template: str, path: str) -> bool:
    want = template.strip("/").split("/") if template.strip("/") else []
    have = path.strip("/").split("/") if path.strip("/") else []
    for i, segment in enumerate(want):
        if segment == "*":
            return True
        if i >= len(have):
            return False
        if segment.startswith("{") and segment.endswith("}"):
            continue
        if segment.lower() != have[i].lower():
            return False
    return len(have) == len(want)


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
        return f"{self.service_id}/subscriptions/{self.sid}"

    def key(self, which: Slot) -> str:
        return self.primary_key if which == "primary" else self.secondary_key

    def contract(self) -> dict[str, Any]:
        """The ARM GET shape (``SubscriptionContract``); like real APIM it carries no keys."""
        return {
            "id": self.id,
            "type": "Microsoft.ApiManagement/service/subscriptions",
            "name": self.sid,
            "properties": {
                "scope": f"{self.service_id}/apis",
                "displayName": self.display_name,
                "state": self.state,
                "createdDate": self.created_date,
                "startDate": None,
                "expirationDate": None,
                "endDate": None,
                "notificationDate": None,
                "stateComment": None,
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


# ---------------------------------------------------------------------------------------------- gateway


class KeyUse(NamedTuple):
    """One gateway request: when, which subscription and slot, and the key's fingerprint (never the key),
    and the gateway unit that answered."""

    time: float
    sid: str | None
    slot: UseSlot
    fingerprint: str | None
    unit: str = DEFAULT_UNITS[0]


def _apim_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"statusCode": status, "message": message}, status, headers)


class ApimGateway(Service):
    """The APIM gateway for the Azure OpenAI API, forwarding to :class:`OpenAIBackend`.

    ``api_suffix`` is the API's URL suffix (default ``openai``; ``""`` publishes it at the root, so both
    ``https://host/openai/deployments/<dep>/...`` and ``https://host/deployments/<dep>/...`` shapes can be
    served); the backend always sees ``/openai/...`` as an APIM backend URL ending in ``/openai`` makes it.
    ``operations`` are the API's ``(method, urlTemplate)`` pairs (default: infra's ``POST /*`` and
    ``GET /*``). A request no operation matches gets APIM's 404 ``Resource not found`` before any key check.
    ``routing`` / ``balance`` / ``seed``: how requests reach the gateway units (:data:`Routing`).
    """

    name = "gateway"
    api_id = "/openai"
    """The API's name for its policies (``policies.set(gateway.api_id, ...)``); it does not change with the
    URL suffix, as a real APIM API keeps its name when its path changes."""

    def __init__(
        self,
        state: ApimState,
        backend: OpenAIBackend,
        *,
        rate_limit_per_minute: int | None = None,
        header_name: str = "Ocp-Apim-Subscription-Key",
        query_name: str = "subscription-key",
        recent_size: int = 1000,
        api_suffix: str = DEFAULT_API_SUFFIX,
        operations: Sequence[Sequence[str]] = DEFAULT_OPERATIONS,
        routing: Routing = "balanced",
        balance: Balance = "round-robin",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if routing not in ("balanced", "per-unit"):
            raise ValueError(f"routing must be 'balanced' or 'per-unit', not {routing!r}")
        if balance not in ("round-robin", "random"):
            raise ValueError(f"balance must be 'round-robin' or 'random', not {balance!r}")
        self.state = state
        self.backend = backend
        self.rate_limit_per_minute = rate_limit_per_minute
        self.header_name = header_name
        self.query_name = query_name
        self.routing: Routing = routing
        self.balance: Balance = balance
        self._header_bytes = header_name.lower().encode("latin-1")
        self._recent: collections.deque[KeyUse] = collections.deque(maxlen=recent_size)
        self._windows: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()
        self._backend_app: ASGIApp | None = None
        self._suffix = normalize_suffix(api_suffix)
        self._operations = normalize_operations(operations)
        self._turn = 0
        self._rng = random.Random(seed)  # noqa: S311 - load balancing, not security
        self.policies = PolicyEngine(self.counters)  # per-API policies (apimvault.local.policies)

    # ------------------------------------------------------------------------------------ the API

    @property
    def api_suffix(self) -> str:
        """The API URL suffix without slashes (``""``: the API is served at the gateway's root)."""
        return self._suffix

    @property
    def api_path(self) -> str:
        """The API's path prefix on the gateway: ``"/" + api_suffix``, or ``""`` for an empty suffix."""
        return f"/{self._suffix}" if self._suffix else ""

    @property
    def operations(self) -> tuple[tuple[str, str], ...]:
        return self._operations

    def configure_api(
        self, *, suffix: str | None = None, operations: Sequence[Sequence[str]] | None = None
    ) -> None:
        """Change the API's URL suffix and/or operations (ValueError for bad values; nothing changes then)."""
        new_suffix = self._suffix if suffix is None else normalize_suffix(suffix)
        new_ops = self._operations if operations is None else normalize_operations(operations)
        if self.routing == "per-unit" and new_suffix.split("/")[0] in self.state.units:
            raise ValueError(f"the API URL suffix {new_suffix!r} would hide the gateway unit of that name")
        self._suffix, self._operations = new_suffix, new_ops

    def api_config(self) -> dict[str, Any]:
        return {
            "suffix": self._suffix,
            "path": self.api_path,
            "operations": [list(op) for op in self._operations],
            "routing": self.routing,
            "balance": self.balance,
            "units": list(self.state.units),
            "urls": list(self.urls),
        }

    def _route(self, method: str, path: str) -> str | None:
        """The path inside the API (``"/deployments/..."``) if an operation routes ``method path``, else
        None (APIM's 404)."""
        prefix = self.api_path
        if prefix:
            if path != prefix and not path.startswith(prefix + "/"):
                return None
            rest = path[len(prefix) :] or "/"
        else:
            rest = path or "/"
        for op_method, template in self._operations:
            if op_method in ("*", method.upper()) and _template_matches(template, rest):
                return rest
        return None

    # ------------------------------------------------------------------------------------ units

    @property
    def urls(self) -> tuple[str, ...]:
        """The distinct gateway URLs: one when units are balanced, one per unit with ``per-unit``."""
        if self.routing == "balanced":
            return (self.url,)
        return tuple(self.unit_urls().values())

    def unit_urls(self) -> dict[str, str]:
        """Where each gateway unit answers: every unit at the one URL when balanced; with ``per-unit`` the
        first at the root and the others under ``/<unit>``."""
        if self.routing == "balanced":
            return dict.fromkeys(self.state.units, self.url)
        return {u: self.url if i == 0 else f"{self.url}/{u}" for i, u in enumerate(self.state.units)}

    def _pick_unit(self) -> str:
        units = self.state.units
        with self._lock:
            if self.balance == "random":
                return self._rng.choice(units)
            unit = units[self._turn % len(units)]
            self._turn += 1
            return unit

    def _split_unit(self, path: str) -> tuple[str | None, str]:
        """``(unit, path without a unit prefix)``: with ``per-unit`` routing the unit a ``/<unit>`` prefix
        names (the first without one); when balanced no unit yet (chosen per routed request)."""
        if self.routing == "balanced":
            return None, path
        first, _, rest = path.lstrip("/").partition("/")
        if first in self.state.units and first != self._suffix.split("/")[0]:
            return first, "/" + rest
        return self.state.units[0], path

    # ------------------------------------------------------------------------------ Service protocol

    def classify(self, method: str, path: str) -> str:
        rest = self._route(method, self._split_unit(path)[1])
        if rest is None:
            return "unknown"
        operation = self.backend.classify(method, "/openai" + rest)  # the API's operations are the backend's
        return "OpenAI" if operation == "unknown" else operation

    def error_response(self, status: int, message: str) -> Response:
        return _apim_error(status, message)

    def build_app(self) -> ASGIApp:
        self._backend_app = self.backend.asgi()
        return self._app

    # ------------------------------------------------------------------------------------ inspection

    def recent(self) -> list[KeyUse]:
        """Recent requests (bounded), oldest first, as ``(monotonic_time, sid, slot, fingerprint)``."""
        with self._lock:
            return list(self._recent)

    @property
    def challenge(self) -> str:
        return (
            f'AzureApiManagementKey realm="{self.url}{self.api_path}",name="{self.header_name}",type="header"'
        )

    # ------------------------------------------------------------------------------------------ app

    def _record(self, sid: str | None, slot: UseSlot, key: str | None, unit: str = DEFAULT_UNITS[0]) -> None:
        self.counters.label(f"key:{slot}")
        if sid is not None:
            self.counters.label(f"sub:{sid}:{slot}")
        with self._lock:
            self._recent.append(KeyUse(time.monotonic(), sid, slot, fingerprint(key) if key else None, unit))

    def _throttle(self, sid: str) -> int | None:
        """Seconds to wait if ``sid`` is over the rate limit, else None (and count this call)."""
        limit = self.rate_limit_per_minute
        if limit is None:
            return None
        now = time.monotonic()
        with self._lock:
            window = self._windows.setdefault(sid, collections.deque())
            while window and window[0] <= now - 60:
                window.popleft()
            if len(window) >= limit:
                return max(1, math.ceil(window[0] + 60 - now))
            window.append(now)
        return None

    def _extract(self, scope: Scope) -> tuple[str | None, list[tuple[bytes, bytes]], bytes]:
        """The subscription key and the request headers and query string without it."""
        key: str | None = None
        headers: list[tuple[bytes, bytes]] = []
        for name, value in scope["headers"]:
            if name == self._header_bytes:
                if key is None:
                    key = bytes(value).decode("latin-1")
            elif name not in (b"api-key", b"authorization", b"host"):
                headers.append((name, value))
        query: bytes = scope.get("query_string", b"")
        if query and self.query_name.encode() in query:
            kept = []
            for part in query.split(b"&"):
                k, _, v = part.partition(b"=")
                if unquote_plus(k.decode("latin-1")) == self.query_name:
                    if key is None:
                        key = unquote_plus(v.decode("latin-1"))
                else:
                    kept.append(part)
            query = b"&".join(kept)
        return key, headers, query

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        pinned, path = self._split_unit(scope["path"])
        rest = self._route(scope["method"], path)
        if rest is None:  # APIM routes before it checks the key: 404 whatever key the request carries
            await _apim_error(404, NOT_FOUND_MESSAGE)(scope, receive, send)
            return
        unit = pinned if pinned is not None else self._pick_unit()
        key, headers, query = self._extract(scope)
        if not key and await forward_without_key(self, self._backend_scope(scope, rest), receive, send):
            return  # a token-only API
        if not key:
            self._record(None, "missing", None, unit)
            await _apim_error(401, MISSING_KEY_MESSAGE, {"WWW-Authenticate": self.challenge})(
                scope, receive, send
            )
            return
        looked = self.state.gateway_lookup(unit, key)
        if looked.found is None:
            if looked.propagation_refused:
                self.counters.label("propagation-refused")
                self.counters.label(f"propagation-refused:{unit}")
            self._record(None, "invalid", key, unit)
            await _apim_error(401, INVALID_KEY_MESSAGE, {"WWW-Authenticate": self.challenge})(
                scope, receive, send
            )
            return
        if looked.stale:
            self.counters.label("propagation-stale")
            self.counters.label(f"propagation-stale:{unit}")
        sub, slot = looked.found
        self._record(sub.sid, slot, key, unit)
        wait = self._throttle(sub.sid)
        if wait is not None:
            # Wire body of APIM's rate-limit policy (Learn "API Management access restriction policies"
            # example and community captures): {"statusCode":429,"message":"Rate limit is exceeded. Try
            # again in N seconds."} with Retry-After.
            await _apim_error(
                429, f"Rate limit is exceeded. Try again in {wait} seconds.", {"Retry-After": str(wait)}
            )(scope, receive, send)
            return
        refused, receive = await self.policies.inbound(self.api_id, sub.sid, scope, receive)
        if refused is not None:
            await refused(scope, receive, send)
            return
        # Forward as an APIM backend with a key credential would: the caller's key and auth headers are
        # removed and the backend's own api-key set.
        headers.append((b"host", f"127.0.0.1:{self.backend.port}".encode()))
        headers.append((b"api-key", self.backend.api_key.encode()))
        forwarded = self._backend_scope(scope, rest)
        forwarded["headers"] = headers
        forwarded["query_string"] = query
        forwarded["server"] = ("127.0.0.1", self.backend.port)
        assert self._backend_app is not None
        await self._backend_app(forwarded, receive, send)

    @staticmethod
    def _backend_scope(scope: Scope, rest: str) -> dict[str, Any]:
        """``scope`` with the path the backend sees: ``/openai`` + the path inside the API (the API URL
        suffix and any unit prefix replaced, as APIM replaces the API path with the backend URL's)."""
        forwarded = dict(scope)
        backend_path = "/openai" + rest
        if backend_path != scope["path"]:
            forwarded["path"] = backend_path
            forwarded["raw_path"] = backend_path.encode("latin-1")
        return forwarded


# -------------------------------------------------------------------------------------------------- ARM

_ARM_PATH = re.compile(
    r"^/subscriptions/(?P<arm>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.ApiManagement/"
    r"service/(?P<svc>[^/]+)/subscriptions(?:/(?P<sid>[^/]+)(?:/(?P<action>[^/]+))?)?/?$",
    re.IGNORECASE,
)
_ACTIONS = {
    "listsecrets": "ListSecrets",
    "regenerateprimarykey": "RegeneratePrimaryKey",
    "regeneratesecondarykey": "RegenerateSecondaryKey",
}
# The Azure RBAC action each operation needs (Learn, "Azure permissions for Integration":
# Microsoft.ApiManagement/service/subscriptions/...).
RBAC_ACTIONS = {
    "GetSubscription": APIM_SUBSCRIPTIONS + "read",
    "GetSubscriptionEntityTag": APIM_SUBSCRIPTIONS + "read",
    "ListSubscriptions": APIM_SUBSCRIPTIONS + "read",
    "ListSecrets": APIM_SUBSCRIPTIONS + "listSecrets/action",
    "RegeneratePrimaryKey": APIM_SUBSCRIPTIONS + "regeneratePrimaryKey/action",
    "RegenerateSecondaryKey": APIM_SUBSCRIPTIONS + "regenerateSecondaryKey/action",
}
# ARM's 403 when no role assignment grants the action (wire text as ARM returns it, e.g. Azure/ARO-RP#66,
# microsoft/foundry-dev-tools#555): {"error":{"code":"AuthorizationFailed","message":"The client '<id>' with
# object id '<oid>' does not have authorization to perform action '<action>' over scope '<scope>' or the
# scope is invalid. If access was recently granted, please refresh your credentials."}}
AUTHORIZATION_FAILED = (
    "The client '{client}' with object id '{oid}' does not have authorization to perform action "
    "'{action}' over scope '{scope}' or the scope is invalid. If access was recently granted, please "
    "refresh your credentials."
)


def _arm_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


class ArmService(Service):
    """``Microsoft.ApiManagement`` subscription operations behind ARM bearer-token auth.

    azure-mgmt-apimanagement 5.0.0 sends ``api-version=2024-05-01`` and asks for the default scope
    ``https://management.azure.com/.default`` (``_configuration.py``); the local identity endpoint issues
    that audience, so the client needs no ``credential_scopes`` override. An api-version the provider does not
    serve gets ARM's 400 ``NoRegisteredProviderFound`` (:mod:`apimvault.local._arm_versions`).

    With ``rbac`` (as :class:`~apimvault.local.LocalAzure` wires it) every operation needs its action
    (:data:`RBAC_ACTIONS`) from a role assigned to the caller's ``oid`` at the resource or above it, else
    403 ``AuthorizationFailed``; without it any valid token may do everything.
    """

    name = "arm"
    audience_prefix = "https://management."

    def __init__(self, state: ApimState, tokens: TokenIssuer, *, rbac: Rbac | None = None) -> None:
        super().__init__()
        self.state = state
        self.tokens = tokens
        self.rbac = rbac

    def classify(self, method: str, path: str) -> str:
        match = _ARM_PATH.match(path)
        if match is None:
            return "unknown"
        if match.group("action"):
            return _ACTIONS.get(match.group("action").lower(), "unknown")
        if match.group("sid") is None:
            return "ListSubscriptions"
        return {"GET": "GetSubscription", "HEAD": "GetSubscriptionEntityTag"}.get(method, "unknown")

    def error_response(self, status: int, message: str) -> Response:
        code = {429: "TooManyRequests", 500: "InternalServerError", 503: "ServiceUnavailable"}.get(
            status, str(status)
        )
        return _arm_error(status, code, message)

    def build_app(self) -> ASGIApp:
        return self._app

    @staticmethod
    def _challenge(description: str) -> dict[str, str]:
        # The challenge ARM sends (captured in Azure SDK tests, e.g. azure-sdk-for-go's bearer-token policy
        # tests): authorization_uri on login.windows.net with the tenant, error="invalid_token".
        return {
            "WWW-Authenticate": (
                f'Bearer authorization_uri="https://login.windows.net/{TENANT_ID}", '
                f'error="invalid_token", error_description="{description}"'
            )
        }

    def _authenticate(self, request: Request) -> dict[str, Any] | Response:
        # Missing header: ARM's body {"error":{"code":"AuthenticationFailed","message":"Authentication failed.
        # The 'Authorization' header is missing."}} as Azure docs and ARM test doubles record it (e.g. the
        # Azure Monitor resource-scoped query docs, mock ARM servers in Go SDK tests). Bad tokens get ARM's
        # InvalidAuthenticationToken / ExpiredAuthenticationToken / InvalidAuthenticationTokenAudience codes.
        token = TokenIssuer.bearer(request)
        if token is None:
            return _arm_error(
                401,
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is missing.",
                self._challenge("The authentication failed because of missing 'Authorization' header."),
            )
        try:
            claims = self.tokens.verify(token)
        except TokenError as exc:
            code = "ExpiredAuthenticationToken" if "expired" in str(exc) else "InvalidAuthenticationToken"
            message = (
                "The access token expiry UTC time is earlier than current UTC time."
                if code.startswith("Expired")
                else "The access token is invalid."
            )
            return _arm_error(401, code, message, self._challenge("The access token is invalid."))
        audience = str(claims.get("aud", ""))
        if not audience.startswith(self.audience_prefix):
            return _arm_error(
                401,
                "InvalidAuthenticationTokenAudience",
                f"The access token has been obtained for wrong audience or resource '{audience}'. It should "
                "exactly match with one of the allowed audiences 'https://management.core.windows.net/',"
                "'https://management.core.windows.net','https://management.azure.com/',"
                "'https://management.azure.com'.",
                self._challenge("The access token has been obtained for wrong audience or resource."),
            )
        return claims

    def _authorize(self, claims: dict[str, Any], operation: str, match: re.Match[str]) -> Response | None:
        """403 ``AuthorizationFailed`` unless a role assigned to the caller grants the operation's action."""
        action = RBAC_ACTIONS.get(operation)
        if self.rbac is None or action is None:
            return None
        scope = (
            f"/subscriptions/{match.group('arm')}/resourceGroups/{match.group('rg')}/providers/"
            f"Microsoft.ApiManagement/service/{match.group('svc')}/subscriptions"
        )
        if match.group("sid"):
            scope += f"/{match.group('sid')}"
        oid = str(claims.get("oid", ""))
        if self.rbac.allowed(oid, action, scope, data=False):
            return None
        client = str(claims.get("appid", "") or oid)
        message = AUTHORIZATION_FAILED.format(client=client, oid=oid, action=action, scope=scope)
        return _arm_error(403, "AuthorizationFailed", message)

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response = await self._handle(request)
        response.headers.setdefault("x-ms-request-id", str(uuid.uuid4()))
        response.headers.setdefault(
            "x-ms-correlation-request-id", request.headers.get("x-ms-client-request-id", str(uuid.uuid4()))
        )
        await response(scope, receive, send)

    async def _handle(self, request: Request) -> Response:
        claims = self._authenticate(request)
        if isinstance(claims, Response):
            return claims
        if not request.query_params.get("api-version"):
            return _arm_error(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        match = _ARM_PATH.match(request.url.path)
        if match is None:
            return _arm_error(404, "NotFound", f"No route for '{request.method} {request.url.path}'.")
        unserved = api_version_problem(request.query_params["api-version"])
        if unserved is not None:
            return _arm_error(400, *unserved)
        arm, rg, svc = match.group("arm"), match.group("rg"), match.group("svc")
        sid, action = match.group("sid"), match.group("action")
        # ARM authorizes before it looks the resource up ("... or the scope is invalid").
        forbidden = self._authorize(claims, self.classify(request.method, request.url.path), match)
        if forbidden is not None:
            return forbidden
        if not self.state.service_exists(arm, rg, svc):
            return _arm_error(
                404,
                "ResourceNotFound",
                f"The Resource 'Microsoft.ApiManagement/service/{svc}' under resource group '{rg}' was not "
                "found. For more details please go to https://aka.ms/ARMResourceNotFoundFix",
            )
        if sid is None:
            if request.method != "GET":
                return _arm_error(405, "MethodNotAllowed", f"The method '{request.method}' is not allowed.")
            subs = self.state.list(arm, rg, svc)
            return json_response(
                {"value": [s.contract() for s in subs], "count": len(subs), "nextLink": None}
            )
        sub = self.state.find(arm, rg, svc, sid)
        if sub is None:
            return _arm_error(404, "ResourceNotFound", "Subscription not found.")
        if action is None:
            if request.method in ("GET", "HEAD"):
                return json_response(sub.contract(), headers={"ETag": sub.etag})
            return _arm_error(405, "MethodNotAllowed", f"The method '{request.method}' is not allowed.")
        operation = _ACTIONS.get(action.lower())
        if operation is None:
            return _arm_error(404, "NotFound", f"No route for '{request.method} {request.url.path}'.")
        if request.method != "POST":
            return _arm_error(405, "MethodNotAllowed", f"The method '{request.method}' is not allowed.")
        if operation == "ListSecrets":
            return json_response(
                {"primaryKey": sub.primary_key, "secondaryKey": sub.secondary_key}, headers={"ETag": sub.etag}
            )
        self.state.regenerate(sub.sid, "primary" if operation == "RegeneratePrimaryKey" else "secondary")
        return Response(status_code=204)
