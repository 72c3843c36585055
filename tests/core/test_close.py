"""Issue 21 item 16: ``close()`` while a read is in flight. A closed provider raises one typed error,
always: sync callers never get a raw ``ValueError`` (nor one on every later read), async callers never an
unrequested ``CancelledError``. The read is held in flight by a public azure-core per-call policy (a gate)
on the real SecretClient, against the local stack."""

from __future__ import annotations

import asyncio
import threading

import pytest

from apimvault import AsyncSubscriptionKeyProvider, ConfigurationError, SubscriptionKeyProvider
from apimvault.local import LocalAzure
from tests._support.core import AsyncGate, FakeClock, Gate, blocked_in, new_app_secret, wait_until
from tests._support.policies import STEADY


def _closed(exc: object) -> bool:
    return type(exc) is ConfigurationError and "is closed" in str(exc)


def test_sync_close_during_a_read_gives_every_caller_the_closed_error(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    gate = Gate()
    provider = SubscriptionKeyProvider(
        azure.vault_url,
        app.name,
        clock=FakeClock(),
        policy=STEADY,
        client_kwargs={"per_call_policies": [gate], "retry_total": 0},
    )
    errors: dict[str, BaseException | None] = {}

    def read(name: str) -> None:
        try:
            provider.get_key()
            errors[name] = None
        except BaseException as exc:
            errors[name] = exc

    gate.armed.set()
    first = threading.Thread(target=read, args=("first",))
    first.start()
    try:
        assert gate.holding.wait(30)
        second = threading.Thread(target=read, args=("second",))  # joins the read in flight
        second.start()
        wait_until(lambda: blocked_in(second, "settle"), "the second caller to wait for the read")
        provider.close()
    finally:
        gate.open.set()
        first.join(30)
    second.join(30)
    assert _closed(errors["first"]), repr(errors["first"])
    assert _closed(errors["second"]), repr(errors["second"])
    reads = azure.keyvault.counters["GetSecret"]
    for call in (provider.get_key, provider.get, provider.refresh):
        with pytest.raises(ConfigurationError, match="is closed"):
            call()
    assert azure.keyvault.counters["GetSecret"] == reads  # a closed provider reads nothing


def test_sync_closed_provider_never_serves_its_cached_key(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    provider = SubscriptionKeyProvider(azure.vault_url, app.name, clock=FakeClock(), policy=STEADY)
    key = provider.get_key()
    assert provider.get_key() is key  # the lock-free fast path
    provider.close()
    with pytest.raises(ConfigurationError, match="is closed"):
        provider.get_key()
    with pytest.raises(ConfigurationError, match="is closed"):
        provider.refresh_after_rejection(key)


async def test_async_close_during_a_read_gives_every_caller_the_closed_error(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    gate = AsyncGate()
    provider = AsyncSubscriptionKeyProvider(
        azure.vault_url,
        app.name,
        clock=FakeClock(),
        policy=STEADY,
        client_kwargs={"per_call_policies": [gate], "retry_total": 0},
    )
    gate.armed = True
    first = asyncio.create_task(provider.get_key())
    await asyncio.wait_for(gate.holding.wait(), 30)
    second = asyncio.create_task(provider.get_key())  # joins the read in flight
    await asyncio.sleep(0)
    await provider.close()
    gate.open.set()
    results = list(await asyncio.gather(first, second, return_exceptions=True))
    assert all(_closed(r) for r in results), results  # not CancelledError
    reads = azure.keyvault.counters["GetSecret"]
    with pytest.raises(ConfigurationError, match="is closed"):
        await provider.get_key()
    with pytest.raises(ConfigurationError, match="is closed"):
        await provider.refresh()
    assert azure.keyvault.counters["GetSecret"] == reads


async def test_async_caller_cancelled_by_its_own_code_still_gets_cancelled_error(azure: LocalAzure) -> None:
    """The closed error replaces only a cancellation nobody asked for: a caller's own cancel stays one."""
    app = new_app_secret(azure)
    gate = AsyncGate()
    provider = AsyncSubscriptionKeyProvider(
        azure.vault_url,
        app.name,
        clock=FakeClock(),
        policy=STEADY,
        client_kwargs={"per_call_policies": [gate], "retry_total": 0},
    )
    gate.armed = True
    waiter = asyncio.create_task(provider.get_key())
    await asyncio.wait_for(gate.holding.wait(), 30)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.open.set()
    assert (await provider.get_key()).reveal() == app.subscription.primary_key
    await provider.close()
