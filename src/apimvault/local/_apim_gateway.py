"""The local APIM gateway in front of Azure OpenAI: routing, key check, units, forwarding (see
:mod:`apimvault.local.apim`)."""

from __future__ import annotations

import collections
import math
import random
import re
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple
from urllib.parse import unquote_plus

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .._key import fingerprint
from ._apim_state import DEFAULT_UNITS, ApimState, UseSlot
from ._server import Service, json_response
from .openai_backend import OpenAIBackend
from .policies import PolicyEngine

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
        if not key and await self.forward_without_key(self._backend_scope(scope, rest), receive, send):
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
        refused, receive, send = await self.policies.inbound(self.api_id, sub.sid, scope, receive, send)
        if refused is not None:
            await refused(scope, receive, send)
            return
        await self._forward(self._backend_scope(scope, rest), headers, query, receive, send)

    async def forward_without_key(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """For an API with ``subscription_required=False``: apply its policies to a request that carries no
        key (``scope`` as the backend sees it) and forward it as keyed ones are forwarded. Returns False
        when the API requires a key (nothing was sent)."""
        if self.policies.get(self.api_id).subscription_required:
            return False
        _, headers, query = self._extract(scope)
        refused, receive, send = await self.policies.inbound(self.api_id, "", scope, receive, send)
        if refused is not None:
            await refused(scope, receive, send)
            return True
        await self._forward(scope, headers, query, receive, send)
        return True

    async def _forward(
        self, scope: Scope, headers: list[tuple[bytes, bytes]], query: bytes, receive: Receive, send: Send
    ) -> None:
        """Forward as an APIM backend with a key credential would: the caller's key and auth headers are
        removed (``headers``, ``query`` from :meth:`_extract`) and the backend's own api-key set."""
        headers.append((b"host", f"127.0.0.1:{self.backend.port}".encode()))
        headers.append((b"api-key", self.backend.api_key.encode()))
        forwarded = {
            **scope,
            "headers": headers,
            "query_string": query,
            "server": ("127.0.0.1", self.backend.port),
        }
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
