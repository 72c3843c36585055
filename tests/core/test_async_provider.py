"""AsyncSubscriptionKeyProvider on the local stack via the real aio SecretClient (no mocks, no sleeps)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from apimvault import (
    AccessDeniedError,
    AsyncSubscriptionKeyProvider,
    InvalidSecretValueError,
    SecretDisabledError,
    SecretExpiredError,
    SecretNotFoundError,
    VaultUnavailableError,
    arefresh_from_event,
)
from apimvault.local import LocalAzure
from tests._support.core import Events, FakeClock, new_app_secret
from tests._support.providers import async_provider as provider


async def wait_for(predicate: Callable[..., object], limit_s: float = 30) -> None:
    """Yield to the loop until ``predicate()`` holds (bounded by a deadline, not a sleep for time)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_from_env(azure: LocalAzure) -> None:
    async with AsyncSubscriptionKeyProvider.from_env() as p:
        key = await p.get_key()
    assert key.reveal() == azure.keyvault.latest("apim-subscription-key").value


async def test_cold_start_of_1000_tasks_reads_the_vault_once(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    azure.keyvault.faults.inject("latency", operation="GetSecret", seconds=0.3, times=1)
    async with provider(azure, app.name) as p:
        values = await asyncio.gather(*(p.get() for _ in range(1000)))
        assert set(values) == {app.subscription.primary_key}
        assert p.stats().vault_reads == 1
    assert azure.keyvault.counters["GetSecret"] == 1


async def test_no_task_waits_across_ten_expiries_with_slow_vault(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    events = Events()
    async with provider(azure, app.name, clock, **events.callbacks()) as p:
        first = await p.get_key()
        azure.keyvault.faults.inject("latency", operation="GetSecret", seconds=0.3)
        for i in range(1, 11):
            clock.advance(250)
            served = await asyncio.gather(*(p.get_key() for _ in range(100)))
            assert len(events.refreshed) == i, "a task waited for the refresh"
            assert all(k == first for k in served)
            await wait_for(lambda i=i: len(events.refreshed) == i + 1)
            clock.advance(1)
        assert p.stats().vault_reads == 11


async def test_outage_serves_stale_then_recovers(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    events = Events()
    async with provider(azure, app.name, clock, **events.callbacks(), client_kwargs={"retry_total": 0}) as p:
        good = await p.get_key()
        azure.keyvault.faults.inject("status", operation="GetSecret", status=503)
        clock.advance(310)
        assert await p.get_key() == good
        await wait_for(lambda: len(events.errors) == 1)
        assert p.stats().state == "stale"
        azure.keyvault.faults.clear()
        clock.advance(10)
        assert await p.get_key() == good
        await wait_for(lambda: len(events.refreshed) == 2)
        assert p.stats().state == "fresh"
        clock.advance(300 + 600 + 1)
        azure.keyvault.faults.inject("status", operation="GetSecret", status=503)
        with pytest.raises(VaultUnavailableError):
            await p.get_key()


@pytest.mark.parametrize(
    ("setup", "error"),
    [
        ({"grant": False}, AccessDeniedError),
        ({"enabled": False}, SecretDisabledError),
        ({"expires": int(time.time()) - 10}, SecretExpiredError),
        ({"value": "a\r\nb"}, InvalidSecretValueError),
    ],
)
async def test_permanent_failures_are_typed(
    azure: LocalAzure, setup: dict[str, Any], error: type[Exception]
) -> None:
    app = new_app_secret(azure, **setup)
    async with provider(azure, app.name) as p:
        with pytest.raises(error):
            await p.get_key()


async def test_missing_secret(azure: LocalAzure) -> None:
    azure.keyvault.grant(azure.default_identity, "Key Vault Secrets User", secret="nope-async")
    async with provider(azure, "nope-async") as p:
        with pytest.raises(SecretNotFoundError):
            await p.get_key()


async def test_forced_refresh_is_coalesced_across_tasks(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    async with provider(azure, app.name) as p:
        old = await p.get_key()
        azure.keyvault.put_secret(app.name, app.subscription.secondary_key)
        azure.keyvault.faults.inject("latency", operation="GetSecret", seconds=0.2, times=1)
        newer = await asyncio.gather(*(p.refresh_after_rejection(old) for _ in range(200)))
        assert {k.reveal() if k else None for k in newer} == {app.subscription.secondary_key}
        stats = p.stats()
        assert stats.vault_reads == 2 and stats.forced_refreshes == 1
        # Already newer than the refused version: no read at all.
        assert await p.refresh_after_rejection(old) is not None
        assert p.stats().vault_reads == 2


async def test_event_grid_new_version_refreshes(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    async with provider(azure, app.name) as p:
        await p.get_key()
        version = azure.keyvault.put_secret(app.name, app.subscription.secondary_key).version
        event = {
            "id": "1",
            "source": "/subscriptions/x/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/v",
            "specversion": "1.0",
            "type": "Microsoft.KeyVault.SecretNewVersionCreated",
            "subject": app.name,
            "data": {
                "Id": f"{azure.vault_url}/secrets/{app.name}/{version}",
                "VaultName": "v",
                "ObjectType": "Secret",
                "ObjectName": app.name,
                "Version": version,
            },
        }
        assert await arefresh_from_event(event, [p]) == [p]
        assert (await p.get_key()).version == version
        assert await arefresh_from_event(event, [p]) == []  # already current: no read
        assert p.stats().vault_reads == 2
