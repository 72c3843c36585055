"""Fault injection and request counters of a local service, applied by an ASGI middleware."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections import Counter
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:  # pragma: no cover
    from ._server import Service


FaultKind = Literal["latency", "status", "throttle", "reset", "hang"]


@dataclasses.dataclass
class Fault:
    """One injected fault. ``times=None`` applies it until cleared; otherwise to the next ``times`` requests.

    Kinds:
      * ``latency``: add ``seconds`` before the request is handled (the request then succeeds);
      * ``status``: answer ``status`` (default 503) with the service's error body;
      * ``throttle``: answer 429 with ``Retry-After: retry_after``;
      * ``reset``: drop the connection without a complete response;
      * ``hang``: hold the request for ``seconds`` (default 3600) without answering, so clients time out.

    ``after=N`` lets the next ``N`` matching requests through untouched first (a fault that begins mid-run).
    """

    kind: FaultKind
    operation: str | None = None
    times: int | None = None
    seconds: float = 0.0
    status: int = 503
    retry_after: int = 1
    after: dataclasses.InitVar[int] = 0  # not a field: the fault's JSON (admin API) keeps its shape

    def __post_init__(self, after: int) -> None:
        self.waiting: int = after  # matching requests still to let through

    def matches(self, operation: str) -> bool:
        return self.operation is None or self.operation == operation


class _CountedRule(Protocol):
    times: int | None

    def matches(self, operation: str) -> bool: ...


R = TypeVar("R", bound=_CountedRule)


def take_matching(rules: list[R], operation: str) -> list[R]:
    """The rules matching ``operation``, consuming one use of each counted rule (caller holds the lock)."""
    chosen: list[R] = []
    for rule in list(rules):
        if not rule.matches(operation):
            continue
        waiting = getattr(rule, "waiting", 0)
        if waiting > 0:  # not yet: this request passes, and counts towards the start
            rule.waiting = waiting - 1  # type: ignore[attr-defined]
            continue
        chosen.append(rule)
        if rule.times is not None:
            rule.times -= 1
            if rule.times <= 0:
                rules.remove(rule)
    return chosen


class Faults:
    """Runtime-settable faults of one service; thread-safe, consulted by :class:`ServiceMiddleware`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._rules.append(fault)
        return fault

    def inject(
        self,
        kind: FaultKind,
        *,
        operation: str | None = None,
        times: int | None = None,
        seconds: float = 0.0,
        status: int = 503,
        retry_after: int = 1,
        after: int = 0,
    ) -> Fault:
        return self.add(Fault(kind, operation, times, seconds, status, retry_after, after))

    def fail_next(self, n: int, *, status: int = 503, operation: str | None = None) -> Fault:
        """Fail the next ``n`` matching requests with ``status``, then recover."""
        return self.inject("status", operation=operation, times=n, status=status)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def active(self) -> list[Fault]:
        with self._lock:
            return list(self._rules)

    def take(self, operation: str) -> list[Fault]:
        """The faults that apply to this request, consuming one use of each counted fault."""
        with self._lock:
            return take_matching(self._rules, operation)


class Counters:
    """Per-operation request counters of one service, plus free-form labelled counts (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: Counter[str] = Counter()
        self._labels: Counter[str] = Counter()

    def hit(self, operation: str) -> None:
        with self._lock:
            self._ops[operation] += 1

    def label(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._labels[name] += n

    def __getitem__(self, operation: str) -> int:
        with self._lock:
            return self._ops[operation]

    def labels(self) -> dict[str, int]:
        with self._lock:
            return dict(self._labels)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._ops)

    def total(self) -> int:
        with self._lock:
            return sum(self._ops.values())

    def reset(self) -> None:
        with self._lock:
            self._ops.clear()
            self._labels.clear()


class _Reset(Exception):
    """Raised inside the ASGI app to make uvicorn drop the connection mid-response."""


class ServiceMiddleware:
    """ASGI middleware: classify the request, count it, then apply any injected fault.

    ``classify(method, path) -> operation`` names the operation (e.g. ``GetSecret``); unknown routes
    are counted under ``"unknown"``. Faults are applied before the service handles the request.
    """

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        operation = self.service.classify(scope["method"], scope["path"])
        self.service.counters.hit(operation)
        for fault in self.service.faults.take(operation):
            if fault.kind == "latency":
                await asyncio.sleep(fault.seconds)
            elif fault.kind == "hang":
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.service.stopping.wait(), fault.seconds or 3600)
                return
            elif fault.kind == "reset":
                await _drop_connection(send)
                return
            elif fault.kind == "throttle":
                response = self.service.error_response(429, "Too many requests. Retry later.")
                response.headers["Retry-After"] = str(fault.retry_after)
                await response(scope, receive, send)
                return
            else:
                response = self.service.error_response(fault.status, "Injected fault.")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _drop_connection(send: Send) -> None:
    # A response that promises a body it never sends; raising makes uvicorn close the transport,
    # so the client sees the connection go away mid-response (httpx: RemoteProtocolError).
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"1024")],
        }
    )
    await send({"type": "http.response.body", "body": b"{", "more_body": True})
    raise _Reset("connection reset injected")
