"""The pure cache policy, driven by a fake clock (no I/O, no sleeps)."""

from __future__ import annotations

import dataclasses
import random
from datetime import timedelta

import pytest

from apimvault import CachePolicy, ConfigurationError, SubscriptionKey
from apimvault._policy import Action, ForceDecision, KeyCache
from tests._support.core import FakeClock

START = 1_800_000_000.0  # a fixed epoch: the pure policy never meets Key Vault's clock


def key(version: str = "a" * 32, value: str = "k" * 32, expires_on: float | None = None) -> SubscriptionKey:
    return SubscriptionKey.create(
        value, version=version, secret_id=f"https://v/secrets/s/{version}", expires_on=expires_on
    )


def make(policy: CachePolicy | None = None, seed: int = 1) -> tuple[KeyCache, FakeClock]:
    clock = FakeClock(START)
    return KeyCache(policy or CachePolicy(), clock, random.Random(seed)), clock


def test_empty_cache_must_load() -> None:
    cache, _ = make()
    assert cache.decide() is Action.LOAD
    assert cache.may_load()


def test_lifecycle_fresh_then_refresh_ahead_then_stale_then_load() -> None:
    policy = CachePolicy(ttl=300, jitter=0, refresh_margin=60, max_staleness=600)
    cache, clock = make(policy)
    entry, previous = cache.accept(key())
    assert previous is None
    assert (entry.refresh_at, entry.fresh_until, entry.usable_until) == (
        clock.now + 240,
        clock.now + 300,
        clock.now + 900,
    )
    assert cache.decide() is Action.SERVE
    clock.advance(239.9)
    assert cache.decide() is Action.SERVE
    clock.advance(0.2)
    assert cache.decide() is Action.SERVE_AND_REFRESH
    clock.advance(300)  # past fresh, within staleness: still served while refreshing
    assert cache.decide() is Action.SERVE_AND_REFRESH
    clock.advance(400)  # past the hard limit: cachetools has evicted the entry
    assert cache.entry() is None
    assert cache.decide() is Action.LOAD


def test_jitter_shortens_ttl_within_bounds_and_differs_per_provider() -> None:
    policy = CachePolicy(ttl=1000, jitter=0.2)
    ttls = {KeyCache(policy, FakeClock(START), random.Random(seed)).ttl for seed in range(50)}
    assert all(800 <= t <= 1000 for t in ttls)
    assert len(ttls) == 50
    assert KeyCache(CachePolicy(ttl=1000, jitter=0), FakeClock(START)).ttl == 1000


def test_secret_expiry_caps_fresh_and_usable_periods() -> None:
    cache, clock = make(CachePolicy(ttl=300, jitter=0, refresh_margin=60, max_staleness=3600))
    entry, _ = cache.accept(key(expires_on=clock.now + 100))
    assert entry.fresh_until == clock.now + 100
    assert entry.usable_until == clock.now + 100
    assert entry.refresh_at == clock.now + 40
    clock.advance(100)
    assert cache.decide() is Action.LOAD


def test_failure_backs_off_refresh_but_keeps_serving() -> None:
    cache, clock = make(CachePolicy(ttl=300, jitter=0, refresh_margin=60, backoff_initial=2, backoff_max=30))
    cache.accept(key())
    clock.advance(250)
    assert cache.decide() is Action.SERVE_AND_REFRESH
    delay = cache.reject(RuntimeError("boom"))
    assert 1 <= delay <= 2
    assert cache.decide() is Action.SERVE  # backing off: no new attempt yet
    clock.advance(delay)
    assert cache.decide() is Action.SERVE_AND_REFRESH
    assert cache.entry() is not None  # the good key was never dropped


def test_backoff_grows_is_capped_and_honours_retry_after() -> None:
    policy = CachePolicy(backoff_initial=1, backoff_max=30, backoff_multiplier=2, retry_after_max=120)
    rng = random.Random(3)
    delays = [policy.backoff(n, rng) for n in range(1, 10)]
    for n, d in enumerate(delays, start=1):
        nominal = min(30, 2 ** (n - 1))
        assert nominal / 2 <= d <= nominal
    assert policy.backoff(3, rng, retry_after=45) == 45
    assert policy.backoff(3, rng, retry_after=1000) == 120  # capped


def test_load_is_refused_while_backing_off_without_a_key() -> None:
    cache, clock = make(CachePolicy(backoff_initial=4, backoff_max=4))
    delay = cache.reject(RuntimeError("down"))
    assert not cache.may_load()
    clock.advance(delay)
    assert cache.may_load()


def test_forced_refresh_decisions() -> None:
    cache, clock = make(CachePolicy(forced_refresh_interval=10))
    cache.accept(key("b" * 32))
    assert cache.decide_forced("a" * 32) is ForceDecision.USE_NEWER
    assert cache.decide_forced("b" * 32) is ForceDecision.REFRESH
    cache.note_forced()
    clock.advance(5)
    assert cache.decide_forced("b" * 32) is ForceDecision.RATE_LIMITED
    clock.advance(5)
    assert cache.decide_forced("b" * 32) is ForceDecision.REFRESH


def test_accept_reports_rotation_and_resets_failures() -> None:
    cache, _ = make()
    cache.accept(key("a" * 32))
    cache.reject(RuntimeError("x"))
    _, previous = cache.accept(key("b" * 32))
    assert previous == "a" * 32
    assert cache.failures == 0 and cache.last_error is None
    _, previous = cache.accept(key("b" * 32))
    assert previous is None


def test_invalidate_forces_a_background_refresh_without_dropping_the_key() -> None:
    cache, _ = make()
    cache.accept(key())
    cache.invalidate()
    assert cache.decide() is Action.SERVE_AND_REFRESH
    assert cache.entry() is not None


def test_timedelta_durations() -> None:
    policy = CachePolicy(ttl=timedelta(minutes=10), max_staleness=timedelta(hours=2))
    assert policy.ttl == 600
    assert policy.max_staleness == 7200


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl": 0},
        {"ttl": -1},
        {"ttl": float("nan")},
        {"ttl": "300"},
        {"ttl": True},
        {"jitter": 0.9},
        {"jitter": -0.1},
        {"max_staleness": -5},
        {"backoff_multiplier": 0.5},
        {"backoff_initial": 10, "backoff_max": 1},
    ],
)
def test_invalid_policy_is_a_configuration_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        CachePolicy(**kwargs)  # type: ignore[arg-type]


def test_refresh_margin_is_capped_at_half_the_ttl() -> None:
    cache, clock = make(CachePolicy(ttl=100, jitter=0, refresh_margin=1000))
    entry, _ = cache.accept(key())
    assert entry.refresh_at == clock.now + 50


def test_forced_refresh_waits_out_back_off_and_retry_after() -> None:
    cache, clock = make(CachePolicy(forced_refresh_interval=1, backoff_initial=1, backoff_max=1))
    cache.accept(key())
    cache.reject(RuntimeError("429"), retry_after=30)
    clock.advance(5)
    assert cache.decide_forced("a" * 32) is ForceDecision.RATE_LIMITED  # Key Vault said: 30 s
    clock.advance(26)
    assert cache.decide_forced("a" * 32) is ForceDecision.REFRESH


def test_invalidate_with_spread_scatters_the_refresh() -> None:
    starts = []
    for seed in range(20):
        cache, clock = make(CachePolicy(ttl=300, jitter=0), seed=seed)
        cache.accept(key())
        cache.invalidate(spread=30)
        assert cache.decide() is Action.SERVE  # not yet
        waited = 0.0
        while cache.decide() is Action.SERVE:
            clock.advance(0.5)
            waited += 0.5
            assert waited <= 30.5
        starts.append(waited)
    assert len(set(starts)) > 5  # scattered, not all at once


def test_without_a_usable_key_one_probe_per_interval_beats_the_back_off() -> None:
    cache, clock = make(CachePolicy(backoff_initial=30, backoff_max=60, probe_interval=1))
    delay = cache.reject(RuntimeError("down"))
    assert delay >= 15
    assert not cache.may_load()
    clock.advance(1)
    assert cache.may_load()  # a probe, far inside the back-off


def test_retry_after_holds_even_the_probe() -> None:
    cache, clock = make(CachePolicy(probe_interval=1, retry_after_max=120))
    cache.reject(RuntimeError("429"), retry_after=30)
    clock.advance(29)
    assert not cache.may_load()
    clock.advance(1)
    assert cache.may_load()


def test_a_read_that_started_before_a_push_leaves_it_pending() -> None:
    cache, _ = make()
    cache.accept(key("a" * 32))
    generation = cache.begin()  # a read starts
    cache.invalidate()  # then the push
    cache.accept(key("a" * 32), generation=generation)  # the older read lands
    assert cache.invalidated and cache.decide() is Action.SERVE_AND_REFRESH
    cache.accept(key("b" * 32), generation=cache.begin())
    assert not cache.invalidated


def test_push_reads_are_at_most_one_per_interval() -> None:
    cache, clock = make(CachePolicy(forced_refresh_interval=5))
    cache.accept(key())
    assert cache.claim_push_read()
    assert not cache.claim_push_read()
    cache.invalidate()  # the coalesced push waits for the end of the interval
    assert cache.decide() is Action.SERVE
    clock.advance(5)
    assert cache.decide() is Action.SERVE_AND_REFRESH
    assert cache.claim_push_read()


def test_schedules_follow_the_scheduling_clock_and_expiry_the_wall_clock() -> None:
    mono, wall = FakeClock(100.0), FakeClock(START)
    cache = KeyCache(CachePolicy(ttl=300, jitter=0, refresh_margin=60), mono, random.Random(1), wall=wall)
    entry, _ = cache.accept(key(expires_on=wall.now + 1000))
    assert (entry.refresh_at, entry.fresh_until) == (340.0, 400.0)
    wall.advance(-3600)  # a backward step changes nothing scheduled
    assert cache.decide() is Action.SERVE
    mono.advance(240)
    assert cache.decide() is Action.SERVE_AND_REFRESH
    wall.advance(3600 + 1000)  # past expires_on on the wall clock: gone, whatever the schedule says
    assert cache.decide() is Action.LOAD and cache.entry() is None


def test_policy_stores_plain_floats() -> None:
    policy = CachePolicy(ttl=timedelta(minutes=1), refresh_margin=45, probe_interval=timedelta(seconds=2))
    assert (policy.ttl, policy.refresh_margin, policy.probe_interval) == (60.0, 45.0, 2.0)
    assert all(isinstance(getattr(policy, f.name), float) for f in dataclasses.fields(policy))
    assert policy.margin == 30.0  # capped at half the TTL


def test_fall_back_to_the_previous_version_until_a_newer_one() -> None:
    cache, _ = make()
    a, b, c = key("a" * 32, "k" * 32), key("b" * 32, "m" * 32), key("c" * 32, "n" * 32)
    cache.accept(a)
    assert cache.fall_back(a) is None  # no previous version
    entry, _ = cache.accept(b)
    assert cache.fall_back(a) is None  # only the current key can be refused into a fall-back
    assert cache.fall_back(b) == a
    assert cache.served(entry) == a
    entry, _ = cache.accept(b)  # the same version again: still falling back
    assert cache.served(entry) == a
    entry, _ = cache.accept(c)  # a newer version ends it
    assert cache.served(entry) == c and cache.fallback is None and cache.previous == b


@pytest.mark.parametrize("name", ["ttl", "refresh_margin", "max_staleness", "backoff_multiplier", "jitter"])
def test_an_integer_too_large_for_a_float_is_a_configuration_error(name: str) -> None:
    # Found by tests/core/test_fuzz_config.py once its strategies stopped excluding large numbers: float()
    # raised OverflowError instead of the documented ConfigurationError.
    with pytest.raises(ConfigurationError, match=f"{name} must be .* too large for a float"):
        CachePolicy(**{name: 10**400})


def test_fallback_ends_at_the_previous_keys_expiry() -> None:
    """Issue 21 item 4, the pure rule: the previous key is served only until its own expires_on."""
    cache, clock = make()
    old = key("a" * 32, "o" * 32, expires_on=START + 100)
    new = key("b" * 32, "n" * 32)
    cache.accept(old)
    entry, _ = cache.accept(new)
    assert cache.fall_back(new) == old
    assert cache.served(entry) == old
    clock.advance(100)
    assert cache.served(entry) == new
    assert cache.fallback is None
    assert cache.fall_back(new) is None  # expired: no fallback any more


def test_confirm_previous_drops_or_refreshes_the_fallback() -> None:
    cache, _ = make()
    old, new = key("a" * 32, "o" * 32), key("b" * 32, "n" * 32)
    cache.accept(old)
    entry, _ = cache.accept(new)
    assert cache.fall_back(new) == old
    later = key("a" * 32, "o" * 32, expires_on=START + 50)  # Key Vault now gives it an expiry
    cache.confirm_previous(later)
    assert cache.served(entry).expires_on == START + 50
    cache.confirm_previous(None)  # Key Vault says disabled / gone
    assert (cache.previous, cache.fallback) == (None, None)
    assert cache.served(entry) == new


def test_forced_wait_is_bounded_by_the_interval_and_zero_while_backing_off() -> None:
    cache, clock = make(CachePolicy(ttl=300, jitter=0, forced_refresh_interval=5))
    cache.accept(key())
    cache.note_forced()
    clock.advance(1)
    assert cache.decide_forced("a" * 32) is ForceDecision.RATE_LIMITED
    assert cache.forced_wait() == pytest.approx(4)
    clock.advance(4)
    assert cache.forced_wait() == 0
    cache.note_forced()
    cache.reject(RuntimeError("vault down"))  # backing off: answered at once, no wait
    assert cache.forced_wait() == 0
