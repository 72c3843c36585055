"""The cache policy: pure data and decisions, no I/O, no locks, no asyncio. The clock is injected.

The sync and async providers are thin shells around :class:`KeyCache`: they ask it what to do
(:meth:`KeyCache.decide`), do the Key Vault I/O themselves, and report back
(:meth:`KeyCache.accept` / :meth:`KeyCache.reject`). The fleet simulation in ``bench/`` drives the
same class with a simulated clock.

Time is in seconds. Schedules (refresh, back-off, staleness) run on a scheduling clock (``time.monotonic``
in the providers); a secret's ``expires_on`` / ``not_before`` are Unix times and are compared with a
wall clock only. Tests and the simulation inject either or both.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
from collections.abc import Callable
from datetime import timedelta

from cachetools import TLRUCache

from ._key import SubscriptionKey
from .exceptions import ConfigurationError

__all__ = ["Action", "CacheEntry", "CachePolicy", "Clock", "ForceDecision", "KeyCache", "State"]

Clock = Callable[[], float]
Seconds = float | timedelta


def _finite(value: object, name: str, what: str) -> float:
    """``value`` as a finite float, or :class:`ConfigurationError` (also for an int too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be {what}, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise ConfigurationError(f"{name} must be {what}, got an integer too large for a float") from None
    if not math.isfinite(number):
        raise ConfigurationError(f"{name} must be {what}, got {value!r}")
    return number


def _seconds(value: Seconds, name: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    return _finite(value, name, "a finite number of seconds or a timedelta")


_DURATIONS = (
    "ttl",
    "refresh_margin",
    "max_staleness",
    "backoff_initial",
    "backoff_max",
    "retry_after_max",
    "forced_refresh_interval",
    "probe_interval",
)


@dataclasses.dataclass(frozen=True, init=False)
class CachePolicy:
    """How long a key is trusted, when it is refreshed, and how failures back off.

    Every duration accepts seconds (``float``) or a :class:`~datetime.timedelta` and is stored as a
    ``float`` number of seconds.

    Args:
        ttl: how long a fetched key is fresh. Each provider shortens it once, at random, by up to
            ``jitter`` (a fraction), so a fleet started together does not refresh together.
        jitter: fraction in ``[0, 0.5]`` by which the TTL is shortened per provider (0 = off).
        refresh_margin: a background refresh starts this long before the fresh period ends, while
            everyone keeps using the current key. Capped at half the TTL (:attr:`margin`).
        max_staleness: while refreshes fail *transiently* (timeouts, 5xx, 429, identity endpoint down),
            the last good key is served this long past its fresh period. Never past ``expires_on``.
        backoff_initial / backoff_max / backoff_multiplier: capped exponential back-off between failed
            refresh attempts, with jitter (each delay is drawn from ``[d/2, d]``). A ``Retry-After``
            from Key Vault raises the delay to at least that (up to ``retry_after_max``).
        forced_refresh_interval: at most one 401-triggered refresh, and at most one push-triggered
            refresh (Event Grid events, :meth:`invalidate`), per this interval, so a key that is really
            revoked or a flood of (forged) events cannot make a fleet hammer Key Vault.
        probe_interval: while no usable key exists, one caller may read Key Vault (single-flight) once
            per this interval whatever the back-off says, so recovery follows the vault within about
            this long. A ``Retry-After`` from Key Vault is still honoured.

    The defaults (5 min TTL, 20 % jitter, 60 s margin, 1 h staleness) are chosen from the fleet
    simulation in ``BENCHMARKS.md``.
    """

    ttl: float
    jitter: float
    refresh_margin: float
    max_staleness: float
    backoff_initial: float
    backoff_max: float
    backoff_multiplier: float
    retry_after_max: float
    forced_refresh_interval: float
    probe_interval: float

    def __init__(
        self,
        ttl: Seconds = 300.0,
        jitter: float = 0.2,
        refresh_margin: Seconds = 60.0,
        max_staleness: Seconds = 3600.0,
        backoff_initial: Seconds = 1.0,
        backoff_max: Seconds = 60.0,
        backoff_multiplier: float = 2.0,
        retry_after_max: Seconds = 300.0,
        forced_refresh_interval: Seconds = 5.0,
        probe_interval: Seconds = 1.0,
    ) -> None:
        given = dict(locals())
        for name in _DURATIONS:
            value = _seconds(given[name], name)
            if value < 0:
                raise ConfigurationError(f"{name} must not be negative, got {value}")
            object.__setattr__(self, name, value)
        for name in ("jitter", "backoff_multiplier"):
            object.__setattr__(self, name, _finite(given[name], name, "a finite number"))
        if self.ttl <= 0:
            raise ConfigurationError("ttl must be positive")
        if not 0 <= self.jitter <= 0.5:
            raise ConfigurationError(f"jitter must be a fraction in [0, 0.5], got {self.jitter!r}")
        if self.backoff_multiplier < 1:
            raise ConfigurationError("backoff_multiplier must be >= 1")
        if self.backoff_max < self.backoff_initial:
            raise ConfigurationError("backoff_max must be >= backoff_initial")

    @property
    def margin(self) -> float:
        """The refresh margin actually used: ``refresh_margin`` capped at half the TTL."""
        return min(self.refresh_margin, self.ttl / 2)

    def jittered_ttl(self, rng: random.Random) -> float:
        """The TTL of one provider: ``ttl * (1 - jitter * u)`` for one draw ``u`` in ``[0, 1)``."""
        return self.ttl * (1.0 - self.jitter * rng.random())

    def backoff(self, failures: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Delay before the next attempt after ``failures`` consecutive failures (``failures >= 1``)."""
        exponent = min(max(failures - 1, 0), 64)
        try:
            delay = min(self.backoff_max, self.backoff_initial * self.backoff_multiplier**exponent)
        except OverflowError:  # a large multiplier after many failures: the cap applies
            delay = self.backoff_max
        delay = delay / 2 + rng.random() * delay / 2
        if retry_after is not None and retry_after > 0:
            delay = max(delay, min(retry_after, self.retry_after_max))
        return delay


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """A cached key and its deadlines, in scheduling-clock time (the key's own dates are Unix times)."""

    key: SubscriptionKey
    loaded_at: float
    refresh_at: float  # start refreshing ahead from here
    fresh_until: float  # end of the fresh period
    usable_until: float  # hard limit: fresh_until + max_staleness, capped at expires_on


class Action(enum.Enum):
    SERVE = "serve"  # fresh: use the cached key
    SERVE_AND_REFRESH = "serve_and_refresh"  # use the cached key and start one background refresh
    LOAD = "load"  # no usable key: the caller must wait for a (single-flight) fetch


class ForceDecision(enum.Enum):
    USE_NEWER = "use_newer"  # the cache already holds a newer version than the one the server refused
    REFRESH = "refresh"  # read Key Vault now
    RATE_LIMITED = "rate_limited"  # a forced refresh happened too recently; keep what we have


class State(enum.Enum):
    """What :meth:`KeyCache.state` reports (and ``ProviderStats.state`` shows as its value)."""

    EMPTY = "empty"  # never loaded
    FRESH = "fresh"
    REFRESH_DUE = "refresh-due"  # within the refresh margin (or invalidated): a refresh is due
    STALE = "stale"  # past the fresh period, served while refreshes fail (stale-if-error)
    EXPIRED = "expired"  # had a key, now past its hard limit or its expires_on, or dropped


_SLOT = "key"
_NEVER = (-math.inf, -math.inf)


class KeyCache:
    """The state of one provider's cache: the entry (in a cachetools ``TLRUCache`` that drops it at its
    hard limit), failure bookkeeping and the refresh schedule. Not thread-safe: the shells serialise
    access (a lock in sync code, the event loop in async code).

    Two clocks: ``clock`` schedules (refresh, back-off, staleness; the providers use ``time.monotonic``
    so a wall-clock step cannot stall or hurry them), ``wall`` returns Unix time and is only compared
    with a key's ``expires_on`` / ``not_before``. ``wall`` defaults to ``clock`` (one simulated clock).
    Every method takes the instants it needs (``now`` on the scheduling clock, ``wall`` in Unix time),
    so a caller reads each clock once per decision; omitted, they are read here.
    """

    def __init__(
        self,
        policy: CachePolicy,
        clock: Clock,
        rng: random.Random | None = None,
        *,
        wall: Clock | None = None,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.wall = wall if wall is not None else clock
        self.rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not crypto
        self.ttl = policy.jittered_ttl(self.rng)
        self.margin = min(policy.margin, self.ttl / 2)
        self._store: TLRUCache[str, CacheEntry] = TLRUCache(
            maxsize=1, ttu=lambda _k, entry, _now: entry.usable_until, timer=clock
        )
        self.failures = 0
        self.next_attempt_at = -math.inf
        self.retry_after_until = -math.inf  # Key Vault's Retry-After: no read before this, not even a probe
        self.last_failure_at = -math.inf
        self.last_error: BaseException | None = None
        self.last_forced_at = -math.inf
        self.last_push_at = -math.inf
        self.invalidated = False
        self.pushes = 0  # push generation: a read must start at or after a push to answer it
        self.last_version: str | None = None
        # Previous-key fallback: the previous distinct version served, and whether it is served instead of
        # the current one because the gateway refused the current one and Key Vault had nothing newer.
        self.previous: SubscriptionKey | None = None
        self.fallback: SubscriptionKey | None = None

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    def _wall(self, wall: float | None) -> float:
        return self.wall() if wall is None else wall

    # --------------------------------------------------------------------------------- reading

    def entry(self, wall: float | None = None) -> CacheEntry | None:
        """The cached entry; ``None`` past its hard limit (cachetools evicts it) or its ``expires_on``."""
        entry = self._store.get(_SLOT)
        if (
            entry is not None
            and entry.key.expires_on is not None
            and self._wall(wall) >= entry.key.expires_on
        ):
            self._store.clear()  # never served past its known expiry, whatever the scheduling clock says
            return None
        return entry

    def served(self, entry: CacheEntry, wall: float | None = None) -> SubscriptionKey:
        """The key to serve from ``entry``: the current one, or the previous one while falling back (never
        past the previous one's ``expires_on``: then the fallback ends)."""
        fallback = self.fallback
        if fallback is None:
            return entry.key
        if fallback.expires_on is not None and self._wall(wall) >= fallback.expires_on:
            self.fallback = None
            return entry.key
        return fallback

    def usable(self, now: float | None = None, wall: float | None = None) -> CacheEntry | None:
        """The entry if it may be served at this instant."""
        entry = self.entry(wall)
        if entry is None or self._now(now) >= entry.usable_until:
            return None
        return entry

    def decide(self, now: float | None = None, wall: float | None = None) -> Action:
        now = self._now(now)
        entry = self.usable(now, wall)
        if entry is None:
            return Action.LOAD
        due = self.invalidated or now >= entry.refresh_at
        if due and now >= self.next_attempt_at:
            return Action.SERVE_AND_REFRESH
        return Action.SERVE

    def serve_deadline(self, now: float | None = None, wall: float | None = None) -> tuple[float, float]:
        """Until when :meth:`decide` keeps answering SERVE, as ``(scheduling deadline, wall deadline)``
        for a lock-free fast path; ``(-inf, -inf)`` if not now. The wall deadline is the key's
        ``expires_on`` (``inf`` without one)."""
        now = self._now(now)
        entry = self.usable(now, wall)
        if entry is None:
            return _NEVER
        expiry = min(
            k.expires_on if k.expires_on is not None else math.inf
            for k in (entry.key, self.served(entry, wall))
        )
        if self.invalidated:
            if now >= self.next_attempt_at:
                return _NEVER
            return min(self.next_attempt_at, entry.usable_until), expiry
        if now < entry.refresh_at:
            return entry.refresh_at, expiry
        # Refresh due but backing off: SERVE until the next attempt (or the hard limit).
        if now < self.next_attempt_at:
            return min(self.next_attempt_at, entry.usable_until), expiry
        return _NEVER

    def may_load(self, now: float | None = None) -> bool:
        """Whether a blocking load may read Key Vault now, when no usable key exists.

        ``False`` while backing off after a failure, except that one probe per ``probe_interval`` is
        allowed (the shells make it single-flight), so recovery does not wait for a long back-off.
        Key Vault's ``Retry-After`` is honoured even then.
        """
        now = self._now(now)
        if now < self.retry_after_until:
            return False
        return now >= self.next_attempt_at or now >= self.last_failure_at + self.policy.probe_interval

    def decide_forced(self, sent_version: str | None, now: float | None = None) -> ForceDecision:
        """What to do when the gateway refused the key of version ``sent_version`` (a 401)."""
        now = self._now(now)
        entry = self._store.get(_SLOT)
        if entry is not None and sent_version is not None and entry.key.version != sent_version:
            return ForceDecision.USE_NEWER
        if now - self.last_forced_at < self.policy.forced_refresh_interval:
            return ForceDecision.RATE_LIMITED
        if now < self.next_attempt_at and not self.invalidated:
            return ForceDecision.RATE_LIMITED  # backing off after failures (or Key Vault's Retry-After)
        return ForceDecision.REFRESH

    def forced_wait(self, now: float | None = None) -> float:
        """Seconds until a 401 may read Key Vault again, when only ``forced_refresh_interval`` stops it
        (at most that interval); 0 when it may read now or when backing off after failures (no wait then:
        the caller is answered with what is held)."""
        now = self._now(now)
        if now < self.next_attempt_at and not self.invalidated:
            return 0.0
        return max(0.0, self.last_forced_at + self.policy.forced_refresh_interval - now)

    def state(self, now: float | None = None, wall: float | None = None) -> State:
        now = self._now(now)
        entry = self.usable(now, wall)
        if entry is None:
            return State.EXPIRED if self.last_version else State.EMPTY
        if now < entry.refresh_at and not self.invalidated:
            return State.FRESH
        if now < entry.fresh_until:
            return State.REFRESH_DUE
        return State.STALE

    # --------------------------------------------------------------------------------- writing

    def begin(self, now: float | None = None) -> int:
        """A Key Vault read starts now: return its push generation (pass it to :meth:`accept`)."""
        if self.invalidated:
            self.last_push_at = self._now(now)
        return self.pushes

    def accept(
        self,
        key: SubscriptionKey,
        now: float | None = None,
        *,
        wall: float | None = None,
        generation: int | None = None,
        revisit_at: float | None = None,
    ) -> tuple[CacheEntry, str | None]:
        """Store a freshly fetched key; return the entry and the previous version if it changed.

        ``generation`` is what :meth:`begin` returned for this read: a push that came after the read
        started stays pending. ``revisit_at`` (Unix time) brings the next refresh forward, e.g. to
        the ``not_before`` of a pre-staged version.
        """
        now, wall = self._now(now), self._wall(wall)
        fresh_until = now + self.ttl
        usable_until = fresh_until + self.policy.max_staleness
        if key.expires_on is not None:
            left = key.expires_on - wall
            fresh_until = min(fresh_until, now + left)
            usable_until = min(usable_until, now + left)
        refresh_at = max(now, fresh_until - self.margin)
        if revisit_at is not None:
            refresh_at = max(now, min(refresh_at, now + (revisit_at - wall)))
        entry = CacheEntry(key, now, refresh_at, fresh_until, usable_until)
        previous = self.last_version
        held = self._store.get(_SLOT)
        if held is not None and held.key.version != key.version:
            self.previous, self.fallback = held.key, None  # a newer version ends a fallback
        self._store[_SLOT] = entry
        self.failures = 0
        self.next_attempt_at = -math.inf
        self.retry_after_until = -math.inf
        self.last_error = None
        if generation is None or generation >= self.pushes:
            self.invalidated = False
        self.last_version = key.version
        return entry, (previous if previous is not None and previous != key.version else None)

    def reject(
        self, error: BaseException, *, retry_after: float | None = None, now: float | None = None
    ) -> float:
        """Record a failed fetch; return the delay before the next attempt."""
        now = self._now(now)
        self.failures += 1
        self.last_error = error
        self.last_failure_at = now
        delay = self.policy.backoff(self.failures, self.rng, retry_after)
        self.next_attempt_at = now + delay
        if retry_after is not None and retry_after > 0:
            self.retry_after_until = now + min(retry_after, self.policy.retry_after_max)
        return delay

    def note_forced(self, now: float | None = None) -> None:
        self.last_forced_at = self._now(now)

    def push(self) -> int:
        """A push (``refresh()``, an event): only a read that starts from now on answers it."""
        self.pushes += 1
        return self.pushes

    def claim_push_read(self, now: float | None = None) -> bool:
        """May a push read Key Vault now? At most one push-triggered read per ``forced_refresh_interval``;
        ``True`` records it."""
        now = self._now(now)
        if now >= self.last_push_at + self.policy.forced_refresh_interval:
            self.last_push_at = now
            return True
        return False

    def invalidate(self, spread: float = 0.0, now: float | None = None) -> None:
        """Make a read start a background refresh (the current key stays in use meanwhile).

        ``spread`` (seconds) delays that refresh by a random fraction of it, so a fleet told about a new
        version at the same instant does not read the vault at the same instant (see BENCHMARKS.md).
        Push-triggered reads stay at most one per ``forced_refresh_interval``; another invalidation
        while one is pending never postpones it.
        """
        now = self._now(now)
        self.push()
        at = now + self.rng.random() * spread if spread > 0 else -math.inf
        at = max(at, self.last_push_at + self.policy.forced_refresh_interval, self.retry_after_until)
        self.next_attempt_at = min(self.next_attempt_at, at) if self.invalidated else at
        self.invalidated = True

    def fall_back(self, refused: SubscriptionKey, wall: float | None = None) -> SubscriptionKey | None:
        """The gateway refused the current key ``refused`` and Key Vault has nothing newer: serve the
        previous version instead (returned), if there is one still valid; ``None`` otherwise."""
        entry = self.entry(wall)
        previous = self.previous
        if entry is None or entry.key != refused or previous is None or previous == refused:
            return None
        if previous.expires_on is not None and self._wall(wall) >= previous.expires_on:
            return None
        self.fallback = previous
        return previous

    def confirm_previous(self, previous: SubscriptionKey | None) -> None:
        """Key Vault's word on the previous version (read again): ``None`` means it is disabled, expired
        or gone, so it is no fallback any more; otherwise its current attributes replace the held ones."""
        if previous is None or self.previous is None or previous.version != self.previous.version:
            self.previous = self.fallback = None
            return
        self.previous = previous
        if self.fallback is not None:
            self.fallback = previous

    def clear(self) -> None:
        self._store.clear()
        self.fallback = None
