"""OpenTelemetry metrics and spans, through ``opentelemetry-api`` only (the ``otel`` extra).

Nothing here runs on the key's hot path: ``get_key()`` has no hook at all. The hooks sit where a Key Vault
read runs, where a gateway refuses a request and where ``rotate`` ends, and each first asks
:func:`_active`, which returns ``None`` at once when ``opentelemetry-api`` is not installed (the import is
tried once) or when neither a meter provider nor a tracer provider has been configured (the API's proxy /
no-op providers): then no instrument is created and nothing is measured.

Metrics (one meter, ``apimvault``; units as OpenTelemetry's semantic conventions write them):

==================================  =========  ===========================================================
``apimvault.vault.reads``           {read}     Counter; ``apimvault.outcome`` (``success`` or the error
                                               class), ``apimvault.reason`` (``load``, ``refresh ahead``,
                                               ``401 from gateway``...), ``apimvault.secret``
``apimvault.vault.read.duration``   s          Histogram; ``apimvault.outcome``, ``apimvault.secret``
``apimvault.key.age``               s          Observable gauge, from ``stats()``
``apimvault.key.staleness``         s          Observable gauge: seconds past the key's fresh period
``apimvault.key.expires_in``        s          Observable gauge: seconds until the key's ``expires_on``,
                                               only from 7 days before it (none without an expiry)
``apimvault.key.state``             1          Observable gauge: 1 for the provider's current state
                                               (``apimvault.state``), 0 for the others
``apimvault.key.rotations``         {rotation}  Observable counter: version changes seen (``stats()``)
``apimvault.gateway.refusals``      {refusal}  Counter; ``apimvault.refusal.kind`` (key, token, quota,
                                               rate, backend, other)
``apimvault.gateway.resends``       {request}  Counter; ``apimvault.refusal.kind`` (key, token)
``apimvault.rotate.runs``           {run}      Counter; ``apimvault.outcome`` (rotated, skipped, failed)
==================================  =========  ===========================================================

Traces (tracer ``apimvault``): a span ``apimvault.vault.read`` (kind INTERNAL) around every Key Vault read,
current while the Azure SDK runs, so azure-core's own spans (``azure-core-tracing-opentelemetry``) become its
children; attributes ``apimvault.secret``, ``apimvault.reason``, ``apimvault.outcome`` and, on success,
``apimvault.key.version`` and ``apimvault.key.fingerprint``. A re-send after a 401 adds the event
``apimvault.resend`` (``apimvault.refusal.kind``) to the current span.

No attribute ever carries a key or a token: only the secret's address, version, 8-hex fingerprint, reasons,
outcomes and error class names.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

__all__ = ["STATES"]

T = TypeVar("T")
STATES = ("empty", "fresh", "refresh-due", "stale", "expired")
_UNSET: Any = object()
_api: Any = _UNSET  # (metrics module, trace module) once imported, or None if not installed
_lock = threading.Lock()
_instruments: _Instruments | None = None
_providers: weakref.WeakSet[Any] = weakref.WeakSet()


def _import_api() -> Any:
    global _api
    if _api is _UNSET:
        try:
            from opentelemetry import metrics, trace
        except ImportError:
            _api = None
        else:
            _api = (metrics, trace)
    return _api


def _configured(metrics: Any, trace: Any) -> tuple[bool, bool]:
    """Whether a real meter / tracer provider is set (not the API's proxy or no-op default)."""
    mp = metrics.get_meter_provider()
    tp = trace.get_tracer_provider()
    meter_set = not (isinstance(mp, metrics.NoOpMeterProvider) or type(mp).__name__ == "_ProxyMeterProvider")
    tracer_set = not isinstance(tp, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    return meter_set, tracer_set


class _Instruments:
    def __init__(self, metrics: Any, trace: Any, mp: Any, tp: Any) -> None:
        from . import __version__

        self.mp, self.tp, self.trace = mp, tp, trace
        meter = mp.get_meter("apimvault", __version__)
        self.tracer = tp.get_tracer("apimvault", __version__)
        self.reads = meter.create_counter(
            "apimvault.vault.reads", unit="{read}", description="Key Vault reads of the subscription key"
        )
        self.duration = meter.create_histogram(
            "apimvault.vault.read.duration", unit="s", description="Duration of Key Vault reads"
        )
        self.refusals = meter.create_counter(
            "apimvault.gateway.refusals", unit="{refusal}", description="Gateway refusals by kind"
        )
        self.resends = meter.create_counter(
            "apimvault.gateway.resends", unit="{request}", description="Requests re-sent after a 401"
        )
        self.rotate_runs = meter.create_counter(
            "apimvault.rotate.runs", unit="{run}", description="apimvault.rotation.rotate runs by outcome"
        )
        meter.create_observable_gauge(
            "apimvault.key.age", [self._age], unit="s", description="Age of the cached key"
        )
        meter.create_observable_gauge(
            "apimvault.key.staleness",
            [self._staleness],
            unit="s",
            description="Seconds the cached key is past its fresh period (served stale)",
        )
        meter.create_observable_gauge(
            "apimvault.key.expires_in",
            [self._expires_in],
            unit="s",
            description="Seconds until the cached key's expires_on, from 7 days before it",
        )
        meter.create_observable_gauge(
            "apimvault.key.state", [self._state], unit="1", description="1 for the provider's current state"
        )
        meter.create_observable_counter(
            "apimvault.key.rotations",
            [self._rotations],
            unit="{rotation}",
            description="Key version changes seen by the provider",
        )
        self._observation = metrics.Observation

    # Observable callbacks: read from stats(), at collection time only.

    def _each(self) -> Iterable[tuple[Any, Any]]:
        for provider in list(_providers):
            try:
                yield provider, provider.stats()
            except Exception:  # noqa: S112 - a provider being closed must not break collection
                continue

    def _age(self, _options: Any) -> Iterable[Any]:
        for provider, stats in self._each():
            if stats.age_s is not None:
                yield self._observation(stats.age_s, {"apimvault.secret": provider.where})

    def _staleness(self, _options: Any) -> Iterable[Any]:
        for provider, stats in self._each():
            if stats.age_s is not None:
                yield self._observation(_staleness_of(provider, stats), {"apimvault.secret": provider.where})

    def _expires_in(self, _options: Any) -> Iterable[Any]:
        for provider, stats in self._each():
            left = _expires_in_of(provider, stats)
            if left is not None:
                yield self._observation(left, {"apimvault.secret": provider.where})

    def _state(self, _options: Any) -> Iterable[Any]:
        for provider, stats in self._each():
            for state in STATES:
                yield self._observation(
                    1 if stats.state == state else 0,
                    {"apimvault.secret": provider.where, "apimvault.state": state},
                )

    def _rotations(self, _options: Any) -> Iterable[Any]:
        for provider, stats in self._each():
            yield self._observation(stats.rotations, {"apimvault.secret": provider.where})


def _staleness_of(provider: Any, stats: Any) -> float:
    """Seconds past the fresh period of the cached key (0 while fresh).

    ``fresh_until`` is on the provider's scheduling clock (``monotonic``), so it is compared with that
    clock, never with the wall clock (Unix time: ~1.8e9 s apart from ``time.monotonic``)."""
    cache = getattr(provider, "_cache", None)
    entry = cache.entry() if cache is not None and hasattr(cache, "entry") else None
    fresh_until = getattr(entry, "fresh_until", None)
    if isinstance(fresh_until, int | float):
        return max(0.0, float(provider.monotonic()) - fresh_until)
    return max(0.0, float(stats.age_s) - float(provider.policy.ttl))


def _expires_in_of(provider: Any, stats: Any) -> float | None:
    """Seconds until the current key's ``expires_on`` (wall clock), when that is within the warning window
    (``EXPIRY_WARNING_WINDOW``, 7 days); ``None`` otherwise (no expiry, or far away)."""
    from ._settings import EXPIRY_WARNING_WINDOW

    left = getattr(stats, "expires_in_s", None)
    return float(left) if isinstance(left, int | float) and left <= EXPIRY_WARNING_WINDOW else None


def _active() -> _Instruments | None:
    """The instruments when OpenTelemetry is installed and configured; otherwise ``None`` (no work)."""
    global _instruments
    api = _api if _api is not _UNSET else _import_api()
    if api is None:
        return None
    metrics, trace = api
    meter_set, tracer_set = _configured(metrics, trace)
    if not (meter_set or tracer_set):
        return None
    mp, tp = metrics.get_meter_provider(), trace.get_tracer_provider()
    current = _instruments
    if current is not None and current.mp is mp and current.tp is tp:
        return current
    with _lock:
        if _instruments is None or _instruments.mp is not mp or _instruments.tp is not tp:
            _instruments = _Instruments(metrics, trace, mp, tp)
        return _instruments


# ------------------------------------------------------------------------------------------ hooks


def _outcome(error: BaseException | None) -> str:
    return "success" if error is None else type(error).__name__


def _start(inst: _Instruments, provider: Any, reason: str) -> Any:
    _providers.add(provider)
    return inst.tracer.start_as_current_span(
        "apimvault.vault.read",
        attributes={"apimvault.secret": provider.where, "apimvault.reason": reason},
        record_exception=False,
        set_status_on_exception=False,
    )


def _finish(
    inst: _Instruments, provider: Any, span: Any, reason: str, started: float, result: Any, error: Any
) -> None:
    outcome = _outcome(error)
    elapsed = time.perf_counter() - started
    attrs = {"apimvault.secret": provider.where, "apimvault.outcome": outcome}
    inst.reads.add(1, {**attrs, "apimvault.reason": reason})
    inst.duration.record(elapsed, attrs)
    span.set_attribute("apimvault.outcome", outcome)
    if error is None:
        key = getattr(result, "key", result)  # the shells' reads return a Fetched(key, ...)
        span.set_attribute("apimvault.key.version", str(getattr(key, "version", "") or ""))
        span.set_attribute("apimvault.key.fingerprint", str(getattr(key, "fingerprint", "") or ""))
    else:
        span.set_status(inst.trace.Status(inst.trace.StatusCode.ERROR, outcome))
        span.set_attribute("error.type", outcome)


def traced_read(provider: Any, reason: str, fetch: Callable[[], T]) -> T:
    """Hook around a sync Key Vault read: ``fetch()`` plus, when OpenTelemetry is on, a span and metrics."""
    inst = _active()
    if inst is None:
        return fetch()
    with _start(inst, provider, reason) as span:
        started = time.perf_counter()
        try:
            result = fetch()
        except BaseException as exc:
            _finish(inst, provider, span, reason, started, None, exc)
            raise
        _finish(inst, provider, span, reason, started, result, None)
        return result


async def atraced_read(provider: Any, reason: str, fetch: Callable[[], Awaitable[T]]) -> T:
    """Async twin of :func:`traced_read`."""
    inst = _active()
    if inst is None:
        return await fetch()
    with _start(inst, provider, reason) as span:
        started = time.perf_counter()
        try:
            result = await fetch()
        except BaseException as exc:
            _finish(inst, provider, span, reason, started, None, exc)
            raise
        _finish(inst, provider, span, reason, started, result, None)
        return result


def refusal_counted(provider: Any, name: str) -> None:
    """Hook from :mod:`apimvault._refusal`: a refusal kind (resends are counted by :func:`resend_event`)."""
    if name.endswith("_resends") or name == "token_refreshes":
        return
    inst = _active()
    if inst is None:
        return
    _providers.add(provider)
    inst.refusals.add(1, {"apimvault.refusal.kind": name, "apimvault.secret": getattr(provider, "where", "")})


def resend_event(kind: str, provider: Any = None) -> None:
    """Hook: a request is re-sent after a ``kind`` 401: count it and add a span event."""
    inst = _active()
    if inst is None:
        return
    inst.resends.add(1, {"apimvault.refusal.kind": kind, "apimvault.secret": getattr(provider, "where", "")})
    span = inst.trace.get_current_span()
    if span.is_recording():
        span.add_event("apimvault.resend", {"apimvault.refusal.kind": kind})


def rotation_counted(outcome: str, secret: str) -> None:
    """Hook from :func:`apimvault.rotation.rotate`: one run ended with ``outcome``."""
    inst = _active()
    if inst is None:
        return
    inst.rotate_runs.add(1, {"apimvault.outcome": outcome, "apimvault.secret": secret})
