"""Issue 21 item 18: a 401 inside ``forced_refresh_interval`` waits for the next allowed Key Vault read
(bounded by the interval) instead of failing the request.

Both keys are revoked one after the other within the interval (an emergency rotation of both): the first
401 reads the vault at once; the second, a moment later, used to fail for up to the interval. Now it waits
until the interval ends, reads, and the request succeeds. The wait is on the injected clock (``sleep``
moves it), so nothing here depends on real time.
"""

from __future__ import annotations

import pytest

from apimvault import (
    AsyncSubscriptionKeyProvider,
    CachePolicy,
    SubscriptionKeyProvider,
    create_async_azure_openai,
    create_azure_openai,
)
from apimvault.local import DEPLOYMENT, LocalAzure
from tests._support.core import AppSecret, FakeClock, new_app_secret, rotate_to_secondary, user_messages
from tests._support.policies import FAST_REFRESH

INTERVAL = FAST_REFRESH.forced_refresh_interval  # the waits below are computed from it
MESSAGES = user_messages("emergency rotation")


def rotate_back_to_primary(azure: LocalAzure, app: AppSecret) -> str:
    """The second half of an emergency rotation: a new primary is stored, the secondary revoked."""
    azure.apim_state.regenerate(app.sid, "primary")
    sub = azure.apim_state.get(app.sid)
    assert sub is not None
    new = azure.keyvault.put_secret(app.name, sub.primary_key, tags={"CredentialId": "primary"})
    azure.apim_state.regenerate(app.sid, "secondary")
    return new.version


class Sleeps:
    """An injected sleep that moves the fake clock and records how long it was asked to wait."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds)

    async def asleep(self, seconds: float) -> None:
        self(seconds)


def test_second_revocation_within_the_interval_waits_for_the_next_read(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    sleeps = Sleeps(clock)
    provider = SubscriptionKeyProvider(
        azure.vault_url, app.name, clock=clock, policy=FAST_REFRESH, sleep=sleeps
    )
    client = create_azure_openai(provider, max_retries=0)
    try:
        assert client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices
        rotate_to_secondary(azure, app)
        assert client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices  # forced read 1
        clock.advance(1)  # well inside the interval
        second = rotate_back_to_primary(azure, app)
        assert client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices  # waits, reads
        key = provider.current()
        assert key is not None and key.version == second
        assert sleeps.waits == [pytest.approx(INTERVAL - 1)]  # bounded by the interval
        stats = provider.stats()
        assert (stats.forced_refreshes, stats.resends_401) == (2, 2)
    finally:
        client.close()
        provider.close()


async def test_second_revocation_within_the_interval_waits_for_the_next_read_async(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    sleeps = Sleeps(clock)
    provider = AsyncSubscriptionKeyProvider(
        azure.vault_url, app.name, clock=clock, policy=FAST_REFRESH, sleep=sleeps.asleep
    )
    client = create_async_azure_openai(provider, max_retries=0)
    try:
        assert (await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)).choices
        rotate_to_secondary(azure, app)
        assert (await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)).choices
        clock.advance(1)
        second = rotate_back_to_primary(azure, app)
        assert (await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)).choices
        key = provider.current()
        assert key is not None and key.version == second
        assert sleeps.waits == [pytest.approx(INTERVAL - 1)]
        stats = provider.stats()
        assert (stats.forced_refreshes, stats.resends_401) == (2, 2)
    finally:
        await client.close()
        await provider.close()


def test_no_wait_while_backing_off_after_vault_failures(azure: LocalAzure) -> None:
    """The wait is only for the forced-refresh interval: while Key Vault is failing (back-off), a 401 is
    answered at once with what is held, as before."""
    app = new_app_secret(azure)
    clock = FakeClock()
    sleeps = Sleeps(clock)
    policy = CachePolicy(
        ttl=300, jitter=0, forced_refresh_interval=INTERVAL, backoff_initial=30, backoff_max=60
    )
    provider = SubscriptionKeyProvider(azure.vault_url, app.name, clock=clock, policy=policy, sleep=sleeps)
    try:
        key = provider.get_key()
        azure.keyvault.faults.inject("status", operation="GetSecret", status=503)
        assert provider.refresh_after_rejection(key) is None  # read failed; nothing newer, no previous
        assert provider.refresh_after_rejection(key) is None  # backing off: no read, and no wait
        assert sleeps.waits == []
    finally:
        azure.keyvault.faults.clear()
        provider.close()
