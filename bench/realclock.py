"""Real-clock figures: refresh at expiry, and a Key Vault outage longer than ``max_staleness``.

Every contender (sync rows, and async rows on their own event loops) runs *at the same time* against one
in-process stack, so they all see the same injected latency and the same outage. Nothing is simulated:
the caches use ``time.time``/``time.monotonic`` and the policy is scaled down so the run stays short
(:data:`SCALE`: TTL 2 s, refresh margin 0.5 s, ``max_staleness`` 2 s, jitter off so "reads per TTL" can be
stated exactly). Each contender has its own ``SecretClient``; its secret reads are counted by a
:class:`~bench.contenders.ReadLog` on that client (the vault's own counter cannot tell contenders apart).

Callers: ``callers`` threads (tasks for async rows) per contender, each asking for the key, recording
how long the call took and whether it raised, then pausing ``pace`` seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from apimvault import CachePolicy

from .contenders import (
    AsyncKeySource,
    Contender,
    KeySource,
    ReadLog,
    async_key_source,
    key_source,
)
from .figures import BLOCKED_S, Lab, _asettle, _settle


@dataclasses.dataclass(frozen=True)
class Scale:
    """The scaled-down policy and timeline of the real-clock figures (seconds)."""

    ttl: float = 2.0
    margin: float = 0.5
    staleness: float = 2.0
    latency: float = 0.3  # injected on every secret read during the expiry figure
    outage_at: float = 0.5  # after the cold load
    outage: float = 6.0  # > ttl + staleness: apimvault's key passes its hard limit inside it
    recovery_max: float = 12.0  # observe at most this long after the vault is back
    settle: float = 1.5  # ... and stop once every contender has gone this long without a failure
    pace: float = 0.02

    def policy(self) -> CachePolicy:
        return CachePolicy(ttl=self.ttl, jitter=0.0, refresh_margin=self.margin, max_staleness=self.staleness)

    def refresh_period(self) -> float:
        """apimvault's read period here: one read per TTL - margin, plus the read itself."""
        return self.ttl - min(self.margin, self.ttl / 2) + self.latency


SCALE = Scale()


@dataclasses.dataclass
class Call:
    start: float  # time.monotonic()
    duration: float
    ok: bool


class Lane:
    """One contender's callers in a real-clock figure (sync threads or async tasks on a private loop)."""

    def __init__(self, contender: Contender, is_async: bool, name: str) -> None:
        self.contender = contender
        self.is_async = is_async
        self.label = contender.label + (" (async)" if is_async else "")
        self.reads = ReadLog(name)
        self.calls: list[Call] = []
        self.loaded = threading.Event()
        self.failed = threading.Event()  # building the key source failed
        self.last_failure = -math.inf
        self.provider: Any = None

    def record(self, start: float, ok: bool) -> None:
        end = time.monotonic()
        self.calls.append(Call(start, end - start, ok))  # list.append is atomic
        if ok:
            self.loaded.set()
        else:
            self.last_failure = end

    def between(self, start: float, end: float = math.inf) -> list[Call]:
        return [c for c in list(self.calls) if start <= c.start < end]


class Lanes:
    """Run every contender's callers at once; the driver injects faults on the real clock meanwhile."""

    def __init__(
        self,
        lab: Lab,
        sync: list[Contender],
        asynchronous: list[Contender],
        *,
        callers: int,
        scale: Scale = SCALE,
    ) -> None:
        self.lab = lab
        self.scale = scale
        self.callers = callers
        self.target = lab.target()  # one secret for all: each contender caches it on its own
        name = self.target.secret_name
        self.lanes = [Lane(c, False, name) for c in sync] + [Lane(c, True, name) for c in asynchronous]
        self._go = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sources: list[tuple[Lane, KeySource]] = []

    # ------------------------------------------------------------------------------------ running

    def __enter__(self) -> Lanes:
        try:
            self._begin()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _begin(self) -> None:
        ready: list[threading.Event] = []
        for lane in self.lanes:
            if lane.is_async:
                event = threading.Event()
                ready.append(event)
                self._threads.append(
                    threading.Thread(target=self._async_lane, args=(lane, event), name=f"lane-{lane.label}")
                )
            else:
                source = key_source(
                    lane.contender,
                    self.target,
                    policy=self.scale.policy(),
                    ttl=self.scale.ttl,
                    reads=lane.reads,
                )
                lane.provider = source.provider
                self._sources.append((lane, source))
                for _ in range(self.callers):
                    self._threads.append(threading.Thread(target=self._sync_caller, args=(lane, source.get)))
        for t in self._threads:
            t.start()
        for event in ready:
            if not event.wait(60):
                raise RuntimeError("an async lane did not start")

    def start(self, timeout: float = 30.0) -> float:
        """Release every caller; return once each contender has its key (monotonic time then)."""
        self._go.set()
        deadline = time.monotonic() + timeout
        for lane in self.lanes:
            if lane.failed.is_set() or not lane.loaded.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"{lane.label} did not load its key")
        return time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self._go.set()
        self._stop.set()
        for t in self._threads:
            if t.ident is not None:  # started
                t.join(60)
        for lane, source in self._sources:
            _settle(lane.provider)
            source.close()

    def _sync_caller(self, lane: Lane, get: Callable[[], str]) -> None:
        self._go.wait()
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                get()
                ok = True
            except Exception:
                ok = False
            lane.record(start, ok)
            time.sleep(self.scale.pace)

    def _async_lane(self, lane: Lane, ready: threading.Event) -> None:
        async def main() -> None:
            try:
                source: AsyncKeySource = await async_key_source(
                    lane.contender, self.target, policy=self.scale.policy(), reads=lane.reads
                )
            except BaseException:
                lane.failed.set()
                raise
            finally:
                ready.set()
            lane.provider = source.provider
            await asyncio.to_thread(self._go.wait)

            async def caller(get: Callable[[], Awaitable[str]]) -> None:
                while not self._stop.is_set():
                    start = time.monotonic()
                    try:
                        await get()
                        ok = True
                    except Exception:
                        ok = False
                    lane.record(start, ok)
                    await asyncio.sleep(self.scale.pace)

            await asyncio.gather(*(caller(source.get) for _ in range(self.callers)))
            await _asettle(source.provider)
            await source.close()

        asyncio.run(main())

    # ---------------------------------------------------------------------------------- helpers

    @staticmethod
    def sleep_until(instant: float) -> None:
        time.sleep(max(0.0, instant - time.monotonic()))


# ------------------------------------------------------------------------------------ the figures


@dataclasses.dataclass
class ExpiryLane:
    label: str
    blocked: int
    calls: int
    worst_ms: float
    reads: int
    seconds: float
    ttl: float

    @property
    def reads_per_ttl(self) -> float:
        return self.reads / (self.seconds / self.ttl)


def expiry(
    lab: Lab,
    sync: list[Contender],
    asynchronous: list[Contender],
    *,
    expiries: int,
    callers: int,
    scale: Scale = SCALE,
) -> list[ExpiryLane]:
    """Callers that waited > 100 ms for the key while Key Vault answers every read ``scale.latency`` late,
    over long enough for every TTL-based contender to pass ``expiries`` expiries (TTL + read time each)."""
    seconds = expiries * (scale.ttl + scale.latency) + scale.ttl / 2
    with Lanes(lab, sync, asynchronous, callers=callers, scale=scale) as lanes:
        lanes.start()
        lab.latency(scale.latency)
        begin = time.monotonic()
        lanes.sleep_until(begin + seconds)
        end = time.monotonic()
    lab.clear()
    rows = []
    for lane in lanes.lanes:
        calls = lane.between(begin, end)
        rows.append(
            ExpiryLane(
                lane.label,
                sum(c.duration > BLOCKED_S for c in calls),
                len(calls),
                max((c.duration for c in calls), default=0.0) * 1000,
                len(lane.reads.between(begin, end)),
                end - begin,
                scale.ttl,
            )
        )
    return rows


@dataclasses.dataclass
class OutageLane:
    label: str
    failed: int
    calls: int
    first_failure: float | None  # seconds into the outage; None: never failed
    hard_limit: float  # seconds into the outage when a key loaded at this lane's first call ends its
    # TTL + max_staleness (the load happened after that call started, so this is a lower bound)
    failing: float  # seconds from the first failed call's start to the last failed call's end
    recovery: float  # seconds from the vault's return to the last failed call's end (0: none after)
    reread: float | None  # seconds from the vault's return to this contender's first good read
    observed: float  # how long after the vault's return the run watched


def outage(
    lab: Lab, sync: list[Contender], asynchronous: list[Contender], *, callers: int, scale: Scale = SCALE
) -> list[OutageLane]:
    """Every secret read answers 503 for ``scale.outage`` seconds (longer than TTL + ``max_staleness``),
    starting ``scale.outage_at`` after the cold load; then the vault is back and the run watches until
    every contender has gone ``scale.settle`` seconds without a failure (at most ``scale.recovery_max``)."""
    with Lanes(lab, sync, asynchronous, callers=callers, scale=scale) as lanes:
        loaded = lanes.start()
        lanes.sleep_until(loaded + scale.outage_at)
        lab.outage(True)
        down = time.monotonic()
        lanes.sleep_until(down + scale.outage)
        lab.outage(False)
        back = time.monotonic()
        while time.monotonic() < back + scale.recovery_max:
            now = time.monotonic()
            if all(now - max(lane.last_failure, back) >= scale.settle for lane in lanes.lanes):
                break
            time.sleep(0.05)
        end = time.monotonic()
    rows = []
    for lane in lanes.lanes:
        calls = lane.between(down, end)
        failures = [c for c in calls if not c.ok]
        after = [c.start + c.duration - back for c in failures if c.start + c.duration > back]
        good = [t for t, status in lane.reads.between(back) if status == 200]
        rows.append(
            OutageLane(
                lane.label,
                len(failures),
                len(calls),
                min(c.start - down for c in failures) if failures else None,
                min(c.start for c in lane.calls) + scale.ttl + scale.staleness - down,
                max(c.start + c.duration for c in failures) - min(c.start for c in failures)
                if failures
                else 0.0,
                max(after, default=0.0),
                good[0] - back if good else None,
                end - back,
            )
        )
    return rows
