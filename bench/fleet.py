"""Fleet simulation: 10,000 processes through one day, driving apimvault's own ``KeyCache``.

A discrete-event simulation with a simulated clock. Each process owns a real
:class:`apimvault._policy.KeyCache` (the class the sync and async providers use) and does what the
providers do with its decisions: ``decide`` on each request (``LOAD`` waits for a single-flight read,
``SERVE_AND_REFRESH`` starts one background read, ``SERVE`` uses the key), ``accept``/``reject`` with the
vault's answer (``Retry-After`` honoured), ``decide_forced``/``note_forced`` on APIM's 401, ``invalidate``
on a push event.

Requests arrive at each process as a Poisson stream (``rate`` per second). While a process is healthy
the simulation jumps straight to the first request after the next instant at which its cache's decision
can change (memoryless arrivals make that exact); while a process has no usable key or holds a revoked
one, every request is an event, so failed requests are counted one by one.

The vault admits ``limit`` secret reads per 10 s window (Key Vault: about 4,000 per vault) and answers
429 with ``Retry-After`` (the rest of the window) beyond that; reads take ``latency`` seconds.

The day: the fleet starts (every process within ``start_window`` seconds); at 08:00 a planned rotation
writes a new version (the old key stays valid at APIM for ``revoke_after`` seconds, then is revoked); at
16:00 an emergency rotation writes a new version and revokes the current key at the same instant — every
process's next request gets APIM's 401 (the 401 storm). With ``push``, each rotation also delivers an Event
Grid ``SecretNewVersionCreated`` to every process (``invalidate()``) within ``push_delay`` seconds.

With ``revoke_wait`` set, the 16:00 emergency follows ``apimvault rotate --revoke-current`` instead: the new
version is written (and pushed, spread over ``push_delay``) while the leaked key stays valid, and the leaked
key is revoked ``revoke_wait`` seconds later (``leaked_dead_s``).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections import Counter

from apimvault._key import SubscriptionKey
from apimvault._policy import Action, CacheEntry, CachePolicy, ForceDecision, KeyCache

HOUR = 3600.0
WINDOW = 10.0


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    processes: int = 10_000
    day: float = 24 * HOUR
    rate: float = 1.0  # requests per second per process
    policy: CachePolicy = dataclasses.field(default_factory=CachePolicy)
    push: bool = False
    push_delay: float = 2.0
    start_window: float = 60.0
    rotation_at: float = 8 * HOUR
    revoke_after: float = HOUR
    storm_at: float = 16 * HOUR
    limit: int = 4000
    latency: float = 0.05
    seed: int = 1
    revoke_wait: float | None = None  # None: the emergency revokes at once; else staged revocation


@dataclasses.dataclass
class FleetResult:
    config: FleetConfig
    peak: dict[str, int]  # phase -> peak vault requests (incl. 429s) per 10 s
    throttled: int  # 429 answers
    reads: int  # vault requests
    failed: dict[str, int]  # phase -> failed application requests
    rotation_converged_s: float  # 08:00 new version -> every process holds it
    storm_converged_s: float  # 16:00 emergency rotation -> every process holds the new key
    start_converged_s: float  # every process holds a key
    events: int
    leaked_dead_s: float = 0.0  # 16:00 -> the leaked key is revoked at APIM


class _Vault:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.requests: Counter[int] = Counter()
        self.served: Counter[int] = Counter()
        self.throttled = 0

    def read(self, now: float) -> float | None:
        """Count one read at ``now``; ``None`` if served, else the ``Retry-After`` (seconds)."""
        window = int(now // WINDOW)
        self.requests[window] += 1
        if self.served[window] >= self.limit:
            self.throttled += 1
            return float(max(1, math.ceil((window + 1) * WINDOW - now)))
        self.served[window] += 1
        return None


class _Throttled(Exception):
    """What a process's cache records for a 429 (the provider maps it to VaultUnavailableError)."""


_WAKE, _RESPONSE, _PUSH, _GLOBAL = 0, 1, 2, 3
_PLANNED, _PLANNED_REVOKE, _EMERGENCY, _STAGED_REVOKE = 0, 1, 2, 3


def simulate(config: FleetConfig) -> FleetResult:
    n = config.processes
    now = [0.0]

    def clock() -> float:
        return now[0]

    master = random.Random(config.seed)
    caches = [KeyCache(config.policy, clock, random.Random(master.random())) for _ in range(n)]
    arrivals = random.Random(master.random())
    keys = [
        SubscriptionKey.create(f"key-{i}-{'k' * 24}", version=f"{i:032x}", secret_id=f"kv/{i}")
        for i in range(3)
    ]
    current = [0]  # index of the vault's latest version
    valid = {0}  # versions APIM accepts
    vault = _Vault(config.limit)
    holding: Counter[int] = Counter()  # version index -> processes whose cache holds it
    held: list[int | None] = [None] * n
    entries: list[CacheEntry | None] = [None] * n
    inflight = [False] * n
    in_flight_version = [0] * n
    waiters = [0] * n  # requests waiting for the in-flight read (LOAD, or a 401 re-send)
    gen = [0] * n
    failed: Counter[str] = Counter()
    heap: list[tuple[float, int, int, int, int]] = []
    seq = [0]
    converged = {"start": math.nan, "rotation": math.nan, "storm": math.nan}
    watching: dict[str, int] = {"start": 0}  # what "converged" waits for: phase -> version index

    def push(t: float, kind: int, pid: int, g: int = 0) -> None:
        seq[0] += 1
        heapq.heappush(heap, (t, seq[0], kind, pid, g))

    def phase(t: float) -> str:
        if t < config.rotation_at:
            return "start" if t < 600 else "steady"
        if t < config.storm_at:
            return "rotation"
        return "storm"

    def schedule(pid: int, t: float, *, explicit: bool = False) -> None:
        """Next request of ``pid`` that can matter, from ``t`` on (none while a read is in flight: the
        requests meanwhile are served, or wait for it, and its answer schedules the next one)."""
        gen[pid] += 1
        if inflight[pid]:
            return
        cache = caches[pid]
        entry = entries[pid]  # what accept() returned; gone past usable_until (as the TLRU drops it)
        if entry is not None and t >= entry.usable_until:
            entry = None
        after = t
        if not explicit and entry is not None:
            revoked = held[pid] is not None and held[pid] not in valid
            if not revoked:
                after = (
                    cache.next_attempt_at
                    if cache.invalidated
                    else max(entry.refresh_at, cache.next_attempt_at)
                )
                after = max(t, min(after, entry.usable_until))
        next_t = after + arrivals.expovariate(config.rate)
        if next_t < config.day:
            push(next_t, _WAKE, pid, gen[pid])

    staged = config.revoke_wait is not None
    revoke_at = config.storm_at + (config.revoke_wait or 0.0)
    globals_at = (config.rotation_at, config.rotation_at + config.revoke_after, config.storm_at, revoke_at)
    busy = [(g - config.latency, g + config.push_delay + config.latency) for g in globals_at]

    def start_read(pid: int, t: float) -> None:
        inflight[pid] = True
        in_flight_version[pid] = current[0]
        retry_after = vault.read(t)
        code = -1 if retry_after is None else int(retry_after)
        if any(lo <= t <= hi for lo, hi in busy):
            push(t + config.latency, _RESPONSE, pid, code)
            return
        # Nothing else can touch this process before the answer arrives: handle it now, at its own time
        # (other processes only share the vault, whose count was taken at send time).
        saved = now[0]
        now[0] = t + config.latency
        respond(pid, now[0], code)
        now[0] = saved

    def respond(pid: int, t: float, code: int) -> None:
        cache = caches[pid]
        inflight[pid] = False
        if code < 0:
            version = in_flight_version[pid]
            entries[pid], _ = cache.accept(keys[version], t)
            set_held(pid, version)
            check_converged(t)
            if version not in valid:
                failed[phase(t)] += waiters[pid]
        else:
            cache.reject(_Throttled("429"), retry_after=float(code), now=t)
            failed[phase(t)] += waiters[pid]
        waiters[pid] = 0
        schedule(pid, t)

    def set_held(pid: int, version: int | None) -> None:
        old = held[pid]
        if old == version:
            return
        if old is not None:
            holding[old] -= 1
        if version is not None:
            holding[version] += 1
        held[pid] = version

    def check_converged(t: float) -> None:
        for name, version in list(watching.items()):
            if holding[version] == n:
                converged[name] = (
                    t - {"start": 0.0, "rotation": config.rotation_at, "storm": config.storm_at}[name]
                )
                del watching[name]

    def global_event(what: int, t: float) -> None:
        if what == _PLANNED:  # planned rotation: new version, old key still valid
            current[0] = 1
            valid.add(1)
            watching["rotation"] = 1
        elif what == _PLANNED_REVOKE:  # the planned rotation's old key is revoked
            valid.discard(0)
        elif what == _EMERGENCY:  # emergency: a new version; the leaked key revoked now or staged
            current[0] = 2
            valid.add(2)
            if not staged:
                valid.difference_update({0, 1})
            watching["storm"] = 2
        else:  # staged revocation: the fleet had revoke_wait seconds; now the leaked key dies
            valid.difference_update({0, 1})
        if what in (_PLANNED, _EMERGENCY) and config.push:
            for p in range(n):
                push(t + master.random() * config.push_delay, _PUSH, p)
        if what != _PLANNED:
            for p in range(n):
                if held[p] is not None and held[p] not in valid:
                    schedule(p, t, explicit=True)

    # start-up: each process makes its first request within the start window
    for pid in range(n):
        push(master.random() * config.start_window, _WAKE, pid, gen[pid])
    push(config.rotation_at, _GLOBAL, 0)
    push(config.rotation_at + config.revoke_after, _GLOBAL, 1)
    push(config.storm_at, _GLOBAL, _EMERGENCY)
    if staged:
        push(revoke_at, _GLOBAL, _STAGED_REVOKE)
    events = 0

    while heap:
        t, _, kind, pid, g = heapq.heappop(heap)
        if t >= config.day:
            break
        now[0] = t
        events += 1
        cache = caches[pid]
        if kind == _WAKE:
            if g != gen[pid]:
                continue
            g0 = gen[pid]  # an answer handled inline below reschedules (and bumps gen) itself
            action = cache.decide(t)
            if action is Action.LOAD:
                if inflight[pid]:
                    waiters[pid] += 1
                elif cache.may_load(t):
                    waiters[pid] += 1
                    start_read(pid, t)
                else:
                    failed[phase(t)] += 1  # no usable key and backing off: the provider raises
                if gen[pid] == g0:
                    schedule(pid, t, explicit=True)
                continue
            if action is Action.SERVE_AND_REFRESH and not inflight[pid]:
                start_read(pid, t)
            if held[pid] in valid:
                if gen[pid] == g0:
                    schedule(pid, t)
                continue
            # APIM refuses the key this process sends: the 401 path
            sent = held[pid]
            assert sent is not None
            decision = cache.decide_forced(keys[sent].version, t)
            if decision is ForceDecision.USE_NEWER:
                pass  # re-sent with the newer key
            elif inflight[pid]:
                waiters[pid] += 1  # joins the read in flight
            elif decision is ForceDecision.REFRESH:
                cache.note_forced(t)
                waiters[pid] += 1
                start_read(pid, t)
            else:
                failed[phase(t)] += 1  # rate limited: the 401 reaches the caller
            if gen[pid] == g0:
                schedule(pid, t, explicit=True)
        elif kind == _RESPONSE:
            respond(pid, t, g)
        elif kind == _PUSH:
            cache.invalidate()
            schedule(pid, t)
        else:  # _GLOBAL
            global_event(pid, t)

    peak: dict[str, int] = {}
    for window, count in vault.requests.items():
        name = phase(window * WINDOW)
        peak[name] = max(peak.get(name, 0), count)
    peak["day"] = max(vault.requests.values(), default=0)
    return FleetResult(
        config,
        peak,
        vault.throttled,
        sum(vault.requests.values()),
        dict(failed),
        converged["rotation"],
        converged["storm"],
        converged["start"],
        events,
        revoke_at - config.storm_at,
    )
