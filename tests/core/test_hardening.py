"""Issue 10, items 5-14: the holes a red-team pass found in the providers, each reproduced through public API
against the local stack (real SecretClient, real DefaultAzureCredential), sync and async.

Timing is never asserted: the clocks are injected, waits are on events with generous bounds, and what is
checked are counts the code controls (Key Vault and identity request counters, provider stats).
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import threading
import time
import uuid
from typing import Any

import pytest
from azure.core.pipeline.policies import SansIOHTTPPolicy

from apimvault import (
    AsyncSubscriptionKeyProvider,
    CachePolicy,
    ConfigurationError,
    CredentialError,
    SecretExpiredError,
    SubscriptionKey,
    SubscriptionKeyProvider,
    VaultUnavailableError,
    arefresh_from_event,
    refresh_from_event,
)
from apimvault.local import LocalAzure
from tests._support.core import (
    AppSecret,
    AsyncGate,
    Events,
    FakeClock,
    Gate,
    blocked_in,
    new_app_secret,
    new_version_event,
    wait_until,
)
from tests._support.policies import SHORT_BACKOFF

# A long back-off, so that a probe is what makes recovery quick (item 14).
SLOW_BACKOFF = CachePolicy(
    ttl=300, jitter=0, refresh_margin=60, max_staleness=600, backoff_initial=30, backoff_max=60
)

NO_SDK_RETRY = {"retry_total": 0}


def sync_provider(azure: LocalAzure, app: AppSecret, **kwargs: Any) -> SubscriptionKeyProvider:
    kwargs.setdefault("policy", SHORT_BACKOFF)
    kwargs.setdefault("clock", FakeClock())
    return SubscriptionKeyProvider(azure.vault_url, app.name, **kwargs)


def async_provider(azure: LocalAzure, app: AppSecret, **kwargs: Any) -> AsyncSubscriptionKeyProvider:
    kwargs.setdefault("policy", SHORT_BACKOFF)
    kwargs.setdefault("clock", FakeClock())
    return AsyncSubscriptionKeyProvider(azure.vault_url, app.name, **kwargs)


async def until(predicate: Any, what: str, limit_s: float = 30) -> None:
    """Yield to the loop until ``predicate()`` holds (bounded by a deadline, not a sleep for time)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


# ------------------------------------------------------------------------------------- 5: fork


def _in_child(pipe_w: int, action: Any) -> None:
    """Run ``action()`` in a forked child; write its result (a version) to the pipe; never return."""
    code = 1
    try:
        os.write(pipe_w, str(action()).encode())
        code = 0
    except BaseException as exc:  # reported to the parent through the pipe
        os.write(pipe_w, f"error: {type(exc).__name__}: {exc}".encode())
    finally:
        os._exit(code)


def _fork_and_read(action: Any, limit_s: float = 60) -> str:
    """Fork; the child runs ``action``. The parent waits (bounded) for its answer, then reaps it."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_end)
        _in_child(write_end, action)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], limit_s)
        answer = os.read(read_end, 4096).decode() if ready else "no answer: the child hangs"
    finally:
        os.close(read_end)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return answer


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_fork_during_a_background_refresh_does_not_hang_the_child(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    gate = Gate()
    p = sync_provider(azure, app, client_kwargs={**NO_SDK_RETRY, "per_call_policies": [gate]})
    try:
        p.get_key()
        new_version = azure.keyvault.put_secret(app.name, app.subscription.secondary_key).version
        gate.armed.set()
        p.invalidate()
        p.get_key()  # a background refresh starts; its answer is held: a read is in flight at fork
        assert gate.holding.wait(30)
        answer = _fork_and_read(lambda: p.refresh().version)
        assert answer == new_version
    finally:
        gate.open.set()
        p.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_fork_of_an_async_provider_reads_in_the_child_on_its_own_loop(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    loop = asyncio.new_event_loop()
    p = async_provider(azure, app, client_kwargs=NO_SDK_RETRY)
    try:
        loop.run_until_complete(p.get_key())  # bound to this loop, with connections opened on it
        new_version = azure.keyvault.put_secret(app.name, app.subscription.secondary_key).version

        def child() -> str:
            return asyncio.run(p.refresh()).version

        assert _fork_and_read(child) == new_version
    finally:
        loop.run_until_complete(p.close())
        loop.close()


# ---------------------------------------------------------------------- 6: Retry-After in a read


def test_retry_after_is_honoured_by_the_provider_not_inside_the_read(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    p = sync_provider(azure, app, clock=clock)  # default SecretClient settings (1 SDK retry)
    azure.keyvault.faults.inject("throttle", operation="GetSecret", retry_after=45)
    try:
        with pytest.raises(VaultUnavailableError) as info:
            p.get_key()
        assert info.value.retry_after == 45
        # azure-core would have slept 45 s in the caller's read and then sent a second request.
        assert azure.keyvault.counters["GetSecret"] == 1
        clock.advance(30)  # back-off and probe interval would allow a read; Retry-After does not
        with pytest.raises(VaultUnavailableError):
            p.get_key()
        assert azure.keyvault.counters["GetSecret"] == 1
        azure.keyvault.faults.clear()
        clock.advance(16)
        assert p.get() == app.subscription.primary_key
    finally:
        p.close()


async def test_retry_after_is_honoured_by_the_async_provider_not_inside_the_read(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    azure.keyvault.faults.inject("throttle", operation="GetSecret", retry_after=45)
    async with async_provider(azure, app, clock=clock) as p:
        with pytest.raises(VaultUnavailableError) as info:
            await p.get_key()
        assert info.value.retry_after == 45
        assert azure.keyvault.counters["GetSecret"] == 1
        clock.advance(30)
        with pytest.raises(VaultUnavailableError):
            await p.get_key()
        assert azure.keyvault.counters["GetSecret"] == 1
        azure.keyvault.faults.clear()
        clock.advance(16)
        assert await p.get() == app.subscription.primary_key


class MillisecondRetryAfter(SansIOHTTPPolicy[Any, Any]):
    """A public azure-core per-retry policy standing for a service that throttles in milliseconds: it turns
    the stack's ``Retry-After: N`` on a 429 into ``<header>: N*1000`` (azure-core's RetryPolicy, which runs
    before it sees the response, would sleep on either)."""

    def __init__(self, header: str) -> None:
        self.header = header

    def on_response(self, request: Any, response: Any) -> None:
        headers = response.http_response.headers
        seconds = headers.get("Retry-After")
        if response.http_response.status_code == 429 and seconds is not None:
            del headers["Retry-After"]
            headers[self.header] = str(int(seconds) * 1000)


MS_HEADERS = ["x-ms-retry-after-ms", "retry-after-ms"]


@pytest.mark.parametrize("header", MS_HEADERS)
def test_millisecond_retry_after_is_honoured_by_the_provider_not_inside_the_read(
    azure: LocalAzure, header: str
) -> None:
    """Issue 21 item 9: a 429 with x-ms-retry-after-ms / retry-after-ms (20 s) held a cold caller 20 s inside
    azure-core's retry and the back-off never saw it. Now: one request, the typed error carries 20 s, and no
    read happens before they have passed (the default SDK retry is on: it would have retried after 20 s)."""
    app = new_app_secret(azure)
    clock = FakeClock()
    p = sync_provider(
        azure, app, clock=clock, client_kwargs={"per_retry_policies": [MillisecondRetryAfter(header)]}
    )
    azure.keyvault.faults.inject("throttle", operation="GetSecret", retry_after=20)
    try:
        with pytest.raises(VaultUnavailableError) as info:
            p.get_key()
        assert info.value.retry_after == 20
        assert azure.keyvault.counters["GetSecret"] == 1  # no second request: no sleep inside the read
        clock.advance(15)  # back-off (1 s) and the probe interval would allow a read; the header does not
        with pytest.raises(VaultUnavailableError):
            p.get_key()
        assert azure.keyvault.counters["GetSecret"] == 1
        azure.keyvault.faults.clear()
        clock.advance(6)
        assert p.get() == app.subscription.primary_key
    finally:
        p.close()


@pytest.mark.parametrize("header", MS_HEADERS)
async def test_millisecond_retry_after_is_honoured_by_the_async_provider_not_inside_the_read(
    azure: LocalAzure, header: str
) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    azure.keyvault.faults.inject("throttle", operation="GetSecret", retry_after=20)
    kwargs = {"per_retry_policies": [MillisecondRetryAfter(header)]}
    async with async_provider(azure, app, clock=clock, client_kwargs=kwargs) as p:
        with pytest.raises(VaultUnavailableError) as info:
            await p.get_key()
        assert info.value.retry_after == 20
        assert azure.keyvault.counters["GetSecret"] == 1
        clock.advance(15)
        with pytest.raises(VaultUnavailableError):
            await p.get_key()
        assert azure.keyvault.counters["GetSecret"] == 1
        azure.keyvault.faults.clear()
        clock.advance(6)
        assert await p.get() == app.subscription.primary_key


def test_retry_after_is_bounded_by_retry_after_max(azure: LocalAzure) -> None:
    """A huge Retry-After (in any header) holds reads back at most ``retry_after_max``."""
    app = new_app_secret(azure)
    clock = FakeClock()
    policy = CachePolicy(ttl=300, jitter=0, backoff_initial=1, backoff_max=8, retry_after_max=60)
    kwargs = {"per_retry_policies": [MillisecondRetryAfter("x-ms-retry-after-ms")]}
    p = sync_provider(azure, app, clock=clock, policy=policy, client_kwargs=kwargs)
    azure.keyvault.faults.inject("throttle", operation="GetSecret", retry_after=86400, times=1)
    try:
        with pytest.raises(VaultUnavailableError):
            p.get_key()
        clock.advance(61)
        assert p.get() == app.subscription.primary_key
        assert azure.keyvault.counters["GetSecret"] == 2
    finally:
        p.close()


# ------------------------------------------------------------------- 7: hanging identity endpoint


def test_own_credential_gives_up_on_a_hanging_identity_endpoint(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    azure.identity.faults.inject("hang", operation="GetToken", seconds=60)
    # The provider's own DefaultAzureCredential: bounded timeouts and retries (a 1 s read timeout here).
    p = sync_provider(azure, app, credential_kwargs={"read_timeout": 1, "retry_total": 0})
    try:
        with pytest.raises(CredentialError):
            p.get_key()
        assert azure.identity.counters["GetToken"] == 1  # no retries behind a hang
    finally:
        p.close()


async def test_own_async_credential_gives_up_on_a_hanging_identity_endpoint(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    azure.identity.faults.inject("hang", operation="GetToken", seconds=60)
    async with async_provider(azure, app, credential_kwargs={"read_timeout": 1, "retry_total": 0}) as p:
        with pytest.raises(CredentialError):
            await p.get_key()
    assert azure.identity.counters["GetToken"] == 1


# ------------------------------------------------------------------------- 8: wall-clock steps


def test_a_backward_wall_clock_step_changes_no_schedule(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    wall, mono = FakeClock(), FakeClock()
    events = Events()
    p = sync_provider(azure, app, clock=wall, monotonic=mono, **events.callbacks())
    try:
        old = p.get_key()
        wall.advance(-3600)  # NTP steps the wall clock back an hour
        azure.keyvault.put_secret(app.name, app.subscription.secondary_key)
        newer = p.refresh_after_rejection(old)  # a 401: the forced refresh is not "rate limited"
        assert newer is not None and newer.reveal() == app.subscription.secondary_key
        mono.advance(6)  # one forced_refresh_interval later (monotonic), another 401 may read again
        wall.advance(-3600)
        assert p.refresh_after_rejection(newer) == old  # read: nothing newer, so the previous version
        assert p.stats().forced_refreshes == 2
        mono.advance(250)  # refresh-ahead runs on the monotonic schedule, whatever the wall clock did
        p.get_key()
        events.wait("refreshed", 4)
        # 4 reads of the latest version, plus the previous version read again by the 401 that fell back
        # to it and by the refresh while falling back (issue 21 item 4)
        assert p.stats().vault_reads == 6
    finally:
        p.close()


async def test_a_backward_wall_clock_step_changes_no_async_schedule(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    wall, mono = FakeClock(), FakeClock()
    events = Events()
    async with async_provider(azure, app, clock=wall, monotonic=mono, **events.callbacks()) as p:
        old = await p.get_key()
        wall.advance(-3600)
        azure.keyvault.put_secret(app.name, app.subscription.secondary_key)
        newer = await p.refresh_after_rejection(old)
        assert newer is not None and newer.reveal() == app.subscription.secondary_key
        mono.advance(6)
        wall.advance(-3600)
        assert await p.refresh_after_rejection(newer) == old
        assert p.stats().forced_refreshes == 2
        mono.advance(250)
        await p.get_key()
        await until(lambda: len(events.refreshed) == 4, "the refresh-ahead")
        assert p.stats().vault_reads == 6  # as in the sync twin: the previous version read again twice


def test_expiry_follows_the_wall_clock_not_the_schedule(azure: LocalAzure) -> None:
    wall, mono = FakeClock(), FakeClock()
    app = new_app_secret(azure, expires=int(wall.now) + 100)
    p = sync_provider(azure, app, clock=wall, monotonic=mono, client_kwargs=NO_SDK_RETRY)
    try:
        assert p.get() == app.subscription.primary_key
        wall.advance(101)  # the scheduling clock hardly moved, but the key's expires_on has passed
        mono.advance(1)
        assert p.current() is None
        with pytest.raises(SecretExpiredError):
            p.get_key()
    finally:
        p.close()


# ---------------------------------------------------------------------- 9: a second event loop


def test_async_provider_in_a_second_asyncio_run_says_what_to_do(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    p = async_provider(azure, app)

    async def first() -> SubscriptionKey:
        key = await p.get_key()
        await p.close()
        return key

    assert asyncio.run(first()).reveal() == app.subscription.primary_key
    with pytest.raises(ConfigurationError, match="event loop"):
        asyncio.run(p.get_key())  # was: RuntimeError('Event loop is closed') on each read


async def test_async_provider_used_from_two_loops_at_once_says_what_to_do(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    async with async_provider(azure, app) as p:
        assert await p.get() == app.subscription.primary_key
        # Another thread runs its own loop while this one runs: it gets the typed error, we keep working.
        with pytest.raises(ConfigurationError, match="one provider per event loop"):
            await asyncio.to_thread(asyncio.run, p.get_key())
        assert await p.get() == app.subscription.primary_key


# --------------------------------------------------------------- 12: push refresh is bounded


def test_a_flood_of_forged_events_costs_one_read_per_interval(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    events = Events()
    p = sync_provider(azure, app, clock=clock, **events.callbacks())
    try:
        held = p.get_key()
        for _ in range(300):
            assert refresh_from_event(new_version_event(azure, app, uuid.uuid4().hex), [p]) == [p]
        assert p.stats().vault_reads == 2  # one push read now; the other 299 wait for the interval
        assert refresh_from_event(new_version_event(azure, app, held.version), [p]) == []  # held: free
        p.get_key()
        assert p.stats().vault_reads == 2
        clock.advance(SHORT_BACKOFF.forced_refresh_interval)  # the coalesced events: one background read
        p.get_key()
        events.wait("refreshed", 3)
        p.get_key()
        assert p.stats().vault_reads == 3
    finally:
        p.close()


async def test_a_flood_of_forged_events_costs_one_async_read_per_interval(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    events = Events()
    async with async_provider(azure, app, clock=clock, **events.callbacks()) as p:
        held = await p.get_key()
        for _ in range(300):
            assert await arefresh_from_event(new_version_event(azure, app, uuid.uuid4().hex), [p]) == [p]
        assert p.stats().vault_reads == 2
        assert await arefresh_from_event(new_version_event(azure, app, held.version), [p]) == []
        await p.get_key()
        assert p.stats().vault_reads == 2
        clock.advance(SHORT_BACKOFF.forced_refresh_interval)
        await p.get_key()
        await until(lambda: len(events.refreshed) == 3, "the coalesced refresh")
        await p.get_key()
        assert p.stats().vault_reads == 3


# ----------------------------------------------------- 13: a push needs a read that started after it


def test_refresh_is_not_answered_by_a_read_that_started_before_it(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    gate = Gate()
    p = sync_provider(azure, app, client_kwargs={**NO_SDK_RETRY, "per_call_policies": [gate]})
    try:
        p.get_key()
        gate.armed.set()
        p.invalidate()
        p.get_key()  # a background read starts; its answer (the old version) is held
        assert gate.holding.wait(30)
        new_version = azure.keyvault.put_secret(app.name, app.subscription.secondary_key).version
        box: list[SubscriptionKey] = []
        worker = threading.Thread(target=lambda: box.append(p.refresh()))
        worker.start()
        wait_until(lambda: blocked_in(worker, "settle", "outcome"), "refresh() to wait for the older read")
        gate.open.set()
        worker.join(30)
        assert box and box[0].version == new_version
    finally:
        gate.open.set()
        p.close()


def test_invalidate_is_not_answered_by_a_read_that_started_before_it(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    gate = Gate()
    clock = FakeClock()
    events = Events()
    p = sync_provider(
        azure,
        app,
        clock=clock,
        client_kwargs={**NO_SDK_RETRY, "per_call_policies": [gate]},
        **events.callbacks(),
    )
    try:
        old = p.get_key()
        gate.armed.set()
        clock.advance(250)
        p.get_key()  # refresh-ahead starts; its answer (the old version) is held
        assert gate.holding.wait(30)
        new_version = azure.keyvault.put_secret(app.name, app.subscription.secondary_key).version
        p.invalidate()  # the push arrives while the older read is in flight
        gate.open.set()
        events.wait("refreshed", 2)
        assert p.current() == old  # the older read landed, and the push is still pending
        p.get_key()
        events.wait("refreshed", 3)
        current = p.current()
        assert current is not None and current.version == new_version
    finally:
        gate.open.set()
        p.close()


async def test_async_refresh_is_not_answered_by_a_read_that_started_before_it(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    gate = AsyncGate()
    async with async_provider(azure, app, client_kwargs={**NO_SDK_RETRY, "per_call_policies": [gate]}) as p:
        await p.get_key()
        gate.armed = True
        p.invalidate()
        await p.get_key()
        await asyncio.wait_for(gate.holding.wait(), 30)
        new_version = azure.keyvault.put_secret(app.name, app.subscription.secondary_key).version
        refresh = asyncio.create_task(p.refresh())
        for _ in range(10):  # let refresh() run up to its wait for the older read (loop passes, not time)
            await asyncio.sleep(0)
        gate.open.set()
        assert (await asyncio.wait_for(refresh, 30)).version == new_version


async def test_async_invalidate_is_not_answered_by_a_read_that_started_before_it(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    gate = AsyncGate()
    clock = FakeClock()
    events = Events()
    kwargs = {"client_kwargs": {**NO_SDK_RETRY, "per_call_policies": [gate]}, **events.callbacks()}
    async with async_provider(azure, app, clock=clock, **kwargs) as p:
        old = await p.get_key()
        gate.armed = True
        clock.advance(250)
        await p.get_key()  # refresh-ahead starts; its answer (the old version) is held
        await asyncio.wait_for(gate.holding.wait(), 30)
        new_version = azure.keyvault.put_secret(app.name, app.subscription.secondary_key).version
        p.invalidate()  # the push arrives while the older read is in flight
        gate.open.set()
        await until(lambda: len(events.refreshed) == 2, "the older read")
        assert p.current() == old  # it landed, and the push is still pending
        await p.get_key()
        await until(lambda: len(events.refreshed) == 3, "a read of the push's own")
        current = p.current()
        assert current is not None and current.version == new_version


# ----------------------------------------------------------------- 14: recovery after an outage


def test_recovery_after_an_outage_follows_the_vault_within_a_probe_interval(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    events = Events()
    p = sync_provider(
        azure, app, clock=clock, policy=SLOW_BACKOFF, client_kwargs=NO_SDK_RETRY, **events.callbacks()
    )
    try:
        key = p.get_key()
        azure.keyvault.faults.inject("status", operation="GetSecret", status=503)
        clock.advance(250)
        assert p.get_key() == key  # refresh-ahead fails in the background: back-off 15-30 s
        events.wait("errors", 1)
        clock.advance(650 + 1)  # past the hard limit: no usable key
        with pytest.raises(VaultUnavailableError):
            p.get_key()  # one read, fails: back-off now 30-60 s
        reads = p.stats().vault_reads
        with pytest.raises(VaultUnavailableError):
            p.get_key()  # fails fast: within the probe interval nobody reads
        assert p.stats().vault_reads == reads
        azure.keyvault.faults.clear()  # Key Vault is back
        clock.advance(SLOW_BACKOFF.probe_interval)  # far inside the back-off, one probe interval on
        assert p.get_key() == key
        assert p.stats().vault_reads == reads + 1
    finally:
        p.close()


async def test_async_recovery_after_an_outage_follows_the_vault_within_a_probe_interval(
    azure: LocalAzure,
) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    azure.keyvault.faults.inject("status", operation="GetSecret", status=503)
    async with async_provider(azure, app, clock=clock, policy=SLOW_BACKOFF, client_kwargs=NO_SDK_RETRY) as p:
        with pytest.raises(VaultUnavailableError):
            await p.get_key()  # cold start fails: back-off 15-30 s
        with pytest.raises(VaultUnavailableError):
            await p.get_key()
        assert p.stats().vault_reads == 1
        azure.keyvault.faults.clear()
        clock.advance(SLOW_BACKOFF.probe_interval)
        assert await p.get() == app.subscription.primary_key
        assert p.stats().vault_reads == 2


# ------------------------------------------------------- issue 21 item 11: fork during a token refresh


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_fork_during_a_token_refresh_does_not_hang_the_child(azure: LocalAzure) -> None:
    """A thread forcing a new Entra token holds the token source's lock while the identity endpoint is slow;
    a child forked then gets a lock of its own and answers (it hung on the parent's held lock)."""
    from azure.identity import DefaultAzureCredential

    from apimvault import BearerTokenSource

    credential = DefaultAzureCredential()
    source = BearerTokenSource(credential, "api://apimvault-gateway/.default")
    token = source()
    requests = azure.identity.counters["GetToken"]
    azure.identity.faults.inject("hang", operation="GetToken", seconds=5, times=1)
    refresher = threading.Thread(target=source.refresh_after_rejection, args=(token,), daemon=True)
    refresher.start()
    try:
        wait_until(lambda: azure.identity.counters["GetToken"] > requests, "the forced token request")
        assert refresher.is_alive()  # it holds the source's lock while the endpoint hangs
        answer = _fork_and_read(
            lambda: "same token" if source.refresh_after_rejection("old") == token else "?"
        )
        assert answer == "same token"
    finally:
        refresher.join(30)
        azure.identity.faults.clear()
        credential.close()
