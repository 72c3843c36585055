"""The cache policy: pure data and decisions, no I/O, no locks, no asyncio. The clock is injected.

The sync and async providers are thin shells around :class:`KeyCache`: they ask it what to do
(:meth:`KeyCache.decide`), do the Key Vault I/O themselves, and report back
(:meth:`KeyCache.accept` / :meth:`KeyCache.reject`). The fleet simulation in ``bench/`` drives the
same class with a simulated clock.

Time is in seconds. All instants come from one clock that returns Unix time (``time.time`` by
default), because a secret's ``expires_on`` / ``not_before`` are Unix times too.
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

__all__ = ["Action", "CacheEntry", "CachePolicy", "Clock", "ForceDecision", "KeyCache"]

Clock = Callable[[], float]
Seconds = float | timedelta


def _seconds(value: Seconds, name: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number of seconds or a timedelta, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """How long a key is trusted, when it is refreshed, and how failures back off.

    Every duration accepts seconds (``float``) or a :class:`~datetime.timedelta`.

    Args:
        ttl: how long a fetched key is fresh. Each provider shortens it once, at random, by up to
            ``jitter`` (a fraction), so a fleet started together does not refresh together.
        jitter: fraction in ``[0, 0.5]`` by which the TTL is shortened per provider (0 = off).
        refresh_margin: a background refresh starts this long before the fresh period ends, while
            everyone keeps using the current key. Capped at half the TTL.
        max_staleness: while refreshes fail *transiently* (timeouts, 5xx, 429, identity endpoint down),
            the last good key is served this long past its fresh period. Never past ``expires_on``.
        backoff_initial / backoff_max / backoff_multiplier: capped exponential back-off between failed
            refresh attempts, with jitter (each delay is drawn from ``[d/2, d]``). A ``Retry-After``
            from Key Vault raises the delay to at least that (up to ``retry_after_max``).
        forced_refresh_interval: at most one 401-triggered refresh per this interval, so a key that is
            really revoked cannot make a fleet hammer Key Vault.

    The defaults (5 min TTL, 20 % jitter, 60 s margin, 1 h staleness) are chosen from the fleet
    simulation in ``BENCHMARKS.md``.
    """

    ttl: Seconds = 300.0
    jitter: float = 0.2
    refresh_margin: Seconds = 60.0
    max_staleness: Seconds = 3600.0
    backoff_initial: Seconds = 1.0
    backoff_max: Seconds = 60.0
    backoff_multiplier: float = 2.0
    retry_after_max: Seconds = 300.0
    forced_refresh_interval: Seconds = 5.0

    def __post_init__(self) -> None:
        for name in (
            "ttl",
            "refresh_margin",
            "max_staleness",
            "backoff_initial",
            "backoff_max",
            "retry_after_max",
            "forced_refresh_interval",
        ):
            value = _seconds(getattr(self, name), name)
            if value < 0:
                raise ConfigurationError(f"{name} must not be negative, got {value}")
            object.__setattr__(self, name, value)
        for name in ("jitter", "backoff_multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigurationError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.ttl <= 0:  # type: ignore[operator]
            raise ConfigurationError("ttl must be positive")
        if not 0 <= self.jitter <= 0.5:
            raise ConfigurationError(f"jitter must be a fraction in [0, 0.5], got {self.jitter!r}")
        if self.backoff_multiplier < 1:
            raise ConfigurationError("backoff_multiplier must be >= 1")
        if self.backoff_max < self.backoff_initial:  # type: ignore[operator]
            raise ConfigurationError("backoff_max must be >= backoff_initial")

    # The fields are floats after __post_init__; these accessors keep mypy honest.
    @property
    def ttl_s(self) -> float:
        return float(self.ttl)  # type: ignore[arg-type]

    @property
    def margin_s(self) -> float:
        return min(float(self.refresh_margin), self.ttl_s / 2)  # type: ignore[arg-type]

    @property
    def staleness_s(self) -> float:
        return float(self.max_staleness)  # type: ignore[arg-type]

    def jittered_ttl(self, rng: random.Random) -> float:
        """The TTL of one provider: ``ttl * (1 - jitter * u)`` for one draw ``u`` in ``[0, 1)``."""
        return self.ttl_s * (1.0 - self.jitter * rng.random())

    def backoff(self, failures: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Delay before the next attempt after ``failures`` consecutive failures (``failures >= 1``)."""
        initial = float(self.backoff_initial)  # type: ignore[arg-type]
        cap = float(self.backoff_max)  # type: ignore[arg-type]
        exponent = min(max(failures - 1, 0), 64)
        try:
            delay = min(cap, initial * self.backoff_multiplier**exponent)
        except OverflowError:  # a large multiplier after many failures: the cap applies
            delay = cap
        delay = delay / 2 + rng.random() * delay / 2
        if retry_after is not None and retry_after > 0:
            delay = max(delay, min(retry_after, float(self.retry_after_max)))  # type: ignore[arg-type]
        return delay


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """A cached key and its deadlines (clock time)."""

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


_SLOT = "key"


class KeyCache:
    """The state of one provider's cache: the entry (in a cachetools ``TLRUCache`` that drops it at its
    hard limit), failure bookkeeping and the refresh schedule. Not thread-safe: the shells serialise
    access (a lock in sync code, the event loop in async code).
    """

    def __init__(self, policy: CachePolicy, clock: Clock, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not crypto
        self.ttl = policy.jittered_ttl(self.rng)
        self._store: TLRUCache[str, CacheEntry] = TLRUCache(
            maxsize=1, ttu=lambda _k, entry, _now: entry.usable_until, timer=clock
        )
        self.failures = 0
        self.next_attempt_at = -math.inf
        self.last_error: BaseException | None = None
        self.last_forced_at = -math.inf
        self.invalidated = False
        self.last_version: str | None = None

    # --------------------------------------------------------------------------------- reading

    def entry(self) -> CacheEntry | None:
        """The cached entry, or ``None`` once it passed its hard limit (cachetools evicts it)."""
        return self._store.get(_SLOT)

    def decide(self, now: float | None = None) -> Action:
        now = self.clock() if now is None else now
        entry = self.entry()
        if entry is None or now >= entry.usable_until:
            return Action.LOAD
        due = self.invalidated or now >= entry.refresh_at
        if due and now >= self.next_attempt_at:
            return Action.SERVE_AND_REFRESH
        return Action.SERVE

    def serve_deadline(self, now: float | None = None) -> float:
        """Until when :meth:`decide` keeps answering SERVE (for a lock-free fast path); -inf if not now."""
        now = self.clock() if now is None else now
        entry = self.entry()
        if entry is None or now >= entry.usable_until:
            return -math.inf
        if self.invalidated:
            return -math.inf if now >= self.next_attempt_at else self.next_attempt_at
        if now < entry.refresh_at:
            return entry.refresh_at
        # Refresh due but backing off: SERVE until the next attempt (or the hard limit).
        return min(self.next_attempt_at, entry.usable_until) if now < self.next_attempt_at else -math.inf

    def may_load(self, now: float | None = None) -> bool:
        """Whether a blocking load may hit Key Vault now (``False`` while backing off after a failure)."""
        now = self.clock() if now is None else now
        return now >= self.next_attempt_at

    def decide_forced(self, sent_version: str | None, now: float | None = None) -> ForceDecision:
        """What to do when the gateway refused the key of version ``sent_version`` (a 401)."""
        now = self.clock() if now is None else now
        entry = self.entry()
        if entry is not None and sent_version is not None and entry.key.version != sent_version:
            return ForceDecision.USE_NEWER
        if now - self.last_forced_at < float(self.policy.forced_refresh_interval):  # type: ignore[arg-type]
            return ForceDecision.RATE_LIMITED
        if now < self.next_attempt_at and not self.invalidated:
            return ForceDecision.RATE_LIMITED  # backing off after failures (or Key Vault's Retry-After)
        return ForceDecision.REFRESH

    # --------------------------------------------------------------------------------- writing

    def accept(self, key: SubscriptionKey, now: float | None = None) -> tuple[CacheEntry, str | None]:
        """Store a freshly fetched key; return the entry and the previous version if it changed."""
        now = self.clock() if now is None else now
        fresh_until = now + self.ttl
        usable_until = fresh_until + self.policy.staleness_s
        if key.expires_on is not None:
            fresh_until = min(fresh_until, key.expires_on)
            usable_until = min(usable_until, key.expires_on)
        refresh_at = max(now, fresh_until - self.policy.margin_s)
        entry = CacheEntry(key, now, refresh_at, fresh_until, usable_until)
        previous = self.last_version
        self._store[_SLOT] = entry
        self.failures = 0
        self.next_attempt_at = -math.inf
        self.last_error = None
        self.invalidated = False
        self.last_version = key.version
        return entry, (previous if previous is not None and previous != key.version else None)

    def reject(
        self, error: BaseException, *, retry_after: float | None = None, now: float | None = None
    ) -> float:
        """Record a failed fetch; return the delay before the next attempt."""
        now = self.clock() if now is None else now
        self.failures += 1
        self.last_error = error
        delay = self.policy.backoff(self.failures, self.rng, retry_after)
        self.next_attempt_at = now + delay
        return delay

    def note_forced(self, now: float | None = None) -> None:
        self.last_forced_at = self.clock() if now is None else now

    def invalidate(self, spread: float = 0.0, now: float | None = None) -> None:
        """Make a read start a background refresh (the current key stays in use meanwhile).

        ``spread`` (seconds) delays that refresh by a random fraction of it, so a fleet told about a new
        version at the same instant does not read the vault at the same instant (see BENCHMARKS.md).
        """
        now = self.clock() if now is None else now
        self.invalidated = True
        self.next_attempt_at = now + self.rng.random() * spread if spread > 0 else -math.inf

    def clear(self) -> None:
        self._store.clear()
