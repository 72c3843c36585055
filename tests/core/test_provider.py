"""SubscriptionKeyProvider against the local stack via the real SecretClient (no mocks, no sleeps)."""

from __future__ import annotations

import threading
import time

import pytest

from apimvault import (
    AccessDeniedError,
    ConfigurationError,
    InvalidSecretValueError,
    SecretDisabledError,
    SecretExpiredError,
    SecretNotFoundError,
    SecretNotYetValidError,
    SubscriptionKeyProvider,
    VaultUnavailableError,
)
from apimvault.local import LocalAzure
from tests._support.core import Events, FakeClock, new_app_secret, new_version_event
from tests._support.providers import sync_provider as provider


def test_from_env_reads_the_seeded_secret(azure: LocalAzure) -> None:
    with SubscriptionKeyProvider.from_env() as p:
        key = p.get_key()
    # Other tests may have rotated the seeded secret: compare with what the vault holds now.
    assert key.reveal() == azure.keyvault.latest("apim-subscription-key").value
    assert key.credential_id in ("primary", "secondary")
    assert azure.keyvault.counters["GetSecret"] >= 1


def test_from_env_without_variables_is_a_configuration_error(
    azure: LocalAzure, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AZURE_KEYVAULT_URL")
    with pytest.raises(ConfigurationError, match="AZURE_KEYVAULT_URL"):
        SubscriptionKeyProvider.from_env()


def test_cold_start_of_256_threads_reads_the_vault_once(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    p = provider(azure, app.name)
    # Hold the single read in flight long enough for every thread to arrive and miss.
    azure.keyvault.faults.inject("latency", operation="GetSecret", seconds=0.5, times=1)
    barrier = threading.Barrier(256)
    results: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(p.get())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(256)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 256 and set(results) == {app.subscription.primary_key}
    assert p.stats().vault_reads == 1
    assert azure.keyvault.counters["GetSecret"] == 1


def test_no_caller_waits_across_ten_expiries_with_slow_vault(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    events = Events()
    p = provider(azure, app.name, clock, **events.callbacks())
    first = p.get_key()
    azure.keyvault.faults.inject("latency", operation="GetSecret", seconds=0.3)
    for i in range(1, 11):
        clock.advance(250)  # into the refresh-ahead window of the current entry
        served = [p.get_key() for _ in range(50)]
        # Every call returned before the background refresh finished: none of them waited on the vault.
        assert len(events.refreshed) == i, "a caller waited for the refresh"
        assert all(k == first for k in served)
        events.wait("refreshed", i + 1)
        assert p.stats().vault_reads == i + 1
        clock.advance(1)
    assert p.stats().failures == 0


def test_refresh_ahead_runs_once_however_many_callers(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    events = Events()
    p = provider(azure, app.name, clock, **events.callbacks())
    p.get_key()
    azure.keyvault.faults.inject("latency", operation="GetSecret", seconds=0.3, times=1)
    clock.advance(250)
    threads = [threading.Thread(target=p.get_key) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events.wait("refreshed", 2)
    assert p.stats().vault_reads == 2


def test_outage_serves_stale_key_then_recovers(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    events = Events()
    p = provider(azure, app.name, clock, **events.callbacks(), client_kwargs={"retry_total": 0})
    good = p.get_key()
    azure.keyvault.faults.inject("status", operation="GetSecret", status=503)
    clock.advance(310)  # past the fresh period, within max_staleness
    assert p.get_key() == good
    events.wait("errors", 1)
    assert isinstance(events.errors[0].error, VaultUnavailableError)
    stats = p.stats()
    assert stats.state == "stale" and stats.consecutive_failures == 1 and stats.version == good.version
    # While backing off no further read happens.
    reads = stats.vault_reads
    assert p.get_key() == good
    assert p.stats().vault_reads == reads
    # Recovery.
    azure.keyvault.faults.clear()
    clock.advance(10)
    assert p.get_key() == good
    events.wait("refreshed", 2)
    assert p.stats().state == "fresh" and p.stats().consecutive_failures == 0


def test_outage_longer_than_max_staleness_raises_typed_error(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    p = provider(azure, app.name, clock, client_kwargs={"retry_total": 0})
    p.get_key()
    azure.keyvault.faults.inject("status", operation="GetSecret", status=500)
    clock.advance(300 + 600 + 1)  # past the hard limit
    with pytest.raises(VaultUnavailableError) as info:
        p.get_key()
    assert app.subscription.primary_key not in str(info.value)
    assert not info.value.permanent


def test_throttled_vault_retry_after_is_honoured(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    events = Events()
    p = provider(azure, app.name, clock, **events.callbacks(), client_kwargs={"retry_total": 0})
    p.get_key()
    azure.keyvault.faults.inject("throttle", operation="GetSecret", retry_after=30)
    clock.advance(250)
    p.get_key()
    events.wait("errors", 1)
    reads = p.stats().vault_reads
    clock.advance(20)  # backoff alone (1-8 s) would have allowed a retry by now; Retry-After says 30
    p.get_key()
    assert p.stats().vault_reads == reads
    azure.keyvault.faults.clear()
    clock.advance(11)
    p.get_key()
    events.wait("refreshed", 2)
    assert p.stats().vault_reads == reads + 1


def test_cold_start_failure_fails_fast_then_backs_off(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    p = provider(azure, app.name, clock, client_kwargs={"retry_total": 0})
    azure.keyvault.faults.inject("status", operation="GetSecret", status=503)
    with pytest.raises(VaultUnavailableError):
        p.get_key()
    with pytest.raises(VaultUnavailableError):
        p.get_key()  # within back-off: no second read
    assert p.stats().vault_reads == 1
    azure.keyvault.faults.clear()
    clock.advance(10)
    assert p.get() == app.subscription.primary_key


def test_missing_role_is_access_denied_naming_role_and_caller(azure: LocalAzure) -> None:
    app = new_app_secret(azure, grant=False)
    with pytest.raises(AccessDeniedError) as info:
        provider(azure, app.name).get_key()
    message = str(info.value)
    assert "Key Vault Secrets User" in message
    assert app.name in message
    assert azure.default_identity.object_id in message
    assert info.value.permanent


def test_missing_secret_is_not_found(azure: LocalAzure) -> None:
    azure.keyvault.grant(azure.default_identity, "Key Vault Secrets User", secret="does-not-exist")
    with pytest.raises(SecretNotFoundError, match="does-not-exist"):
        provider(azure, "does-not-exist").get_key()


def test_disabled_secret_is_refused(azure: LocalAzure) -> None:
    app = new_app_secret(azure, enabled=False)
    with pytest.raises(SecretDisabledError):
        provider(azure, app.name).get_key()


def test_expired_secret_is_refused_although_key_vault_serves_it(azure: LocalAzure) -> None:
    app = new_app_secret(azure, expires=int(time.time()) - 60)
    with pytest.raises(SecretExpiredError, match="expired"):
        provider(azure, app.name).get_key()


def test_not_yet_valid_secret_is_refused(azure: LocalAzure) -> None:
    app = new_app_secret(azure, not_before=int(time.time()) + 3600)
    with pytest.raises(SecretNotYetValidError):
        provider(azure, app.name).get_key()


def test_cached_key_stops_at_secret_expiry(azure: LocalAzure) -> None:
    clock = FakeClock()
    app = new_app_secret(azure, expires=int(clock.now) + 100)
    p = provider(azure, app.name, clock)
    assert p.get() == app.subscription.primary_key
    clock.advance(101)
    with pytest.raises(SecretExpiredError):
        p.get_key()


@pytest.mark.parametrize("value", ["abc\r\nX-Injected: 1", "abc\x00def", "abc\x1bdef", "   ", "clé"])
def test_values_that_cannot_be_headers_are_refused(azure: LocalAzure, value: str) -> None:
    app = new_app_secret(azure, value=value)
    with pytest.raises(InvalidSecretValueError) as info:
        provider(azure, app.name).get_key()
    assert "X-Injected" not in str(info.value)


def test_surrounding_whitespace_is_stripped(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    azure.keyvault.put_secret(app.name, f"  {app.subscription.primary_key}\n")
    assert provider(azure, app.name).get() == app.subscription.primary_key


def test_bad_new_version_never_replaces_the_good_key(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    events = Events()
    p = provider(azure, app.name, clock, **events.callbacks())
    good = p.get_key()
    azure.keyvault.put_secret(app.name, "bad\nvalue")
    p.invalidate()
    assert p.get_key() == good
    events.wait("errors", 1)
    assert isinstance(events.errors[0].error, InvalidSecretValueError)
    assert p.get_key() == good


def test_rotation_via_new_version_is_picked_up_and_reported(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    events = Events()
    p = provider(azure, app.name, clock, **events.callbacks())
    old = p.get_key()
    new_version = azure.keyvault.put_secret(app.name, app.subscription.secondary_key).version
    clock.advance(250)
    assert p.get_key() == old  # served while the refresh runs
    events.wait("rotated", 1)
    assert events.rotated[0].previous_version == old.version
    assert events.rotated[0].version == new_version
    assert p.get() == app.subscription.secondary_key
    assert p.stats().rotations == 1


def test_pinned_version_is_served(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    first = azure.keyvault.latest(app.name).version
    azure.keyvault.put_secret(app.name, app.subscription.secondary_key)
    p = provider(azure, app.name, version=first)
    assert p.get() == app.subscription.primary_key
    assert p.get_key().version == first


def test_refresh_and_invalidate(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    events = Events()
    p = provider(azure, app.name, **events.callbacks())
    p.get_key()
    azure.keyvault.put_secret(app.name, app.subscription.secondary_key)
    assert p.refresh().reveal() == app.subscription.secondary_key
    assert p.stats().vault_reads == 2
    azure.keyvault.put_secret(app.name, app.subscription.primary_key)
    p.invalidate()
    p.get_key()  # served at once; a background refresh starts
    events.wait("refreshed", 3)
    assert p.get() == app.subscription.primary_key
    assert p.stats().invalidations == 1


def test_repr_and_stats_never_show_the_key(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    p = provider(azure, app.name)
    key = p.get()
    for text in (repr(p), str(p), repr(p.stats()), repr(p.get_key()), str(p.current())):
        assert key not in text
        assert key[:8] not in text


def test_a_failing_callback_does_not_break_delivery(azure: LocalAzure) -> None:
    app = new_app_secret(azure)

    def broken(_: object) -> None:
        raise RuntimeError("callback bug")

    p = provider(azure, app.name, on_refresh=broken)
    assert p.get() == app.subscription.primary_key


@pytest.mark.parametrize(
    ("vault_url", "name", "version"),
    [
        ("", "s", None),
        ("not a url", "s", None),
        ("ftp://vault", "s", None),
        ("https://vault.vault.azure.net/secrets/x", "s", None),
        ("https://vault.vault.azure.net", "bad_name", None),
        ("https://vault.vault.azure.net", "x" * 128, None),
        ("https://vault.vault.azure.net", "s", "not-a-version"),
        ("https://[::1", "s", None),
    ],
)
def test_bad_configuration_is_refused_up_front(vault_url: str, name: str, version: str | None) -> None:
    with pytest.raises(ConfigurationError):
        SubscriptionKeyProvider(vault_url, name, version=version, credential=object())  # type: ignore[arg-type]


def test_plain_http_vault_is_refused() -> None:
    from apimvault import InsecureTransportError

    with pytest.raises(InsecureTransportError):
        SubscriptionKeyProvider("http://127.0.0.1:1", "s", credential=object())  # type: ignore[arg-type]


def test_event_grid_new_version_refreshes_only_concerned_providers(azure: LocalAzure) -> None:
    from apimvault import refresh_from_event

    app, other = new_app_secret(azure), new_app_secret(azure)
    p, q = provider(azure, app.name), provider(azure, other.name)
    p.get_key(), q.get_key()
    version = azure.keyvault.put_secret(app.name, app.subscription.secondary_key).version
    event = [
        new_version_event(azure, app, version),
        {"id": "v", "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent", "data": {}},
    ]
    assert refresh_from_event(event, [p, q]) == [p]
    assert p.get_key().version == version
    assert (p.stats().vault_reads, q.stats().vault_reads) == (2, 1)
    assert refresh_from_event(event, [p, q]) == []  # idempotent: already holds that version


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        b"[1, 2]",
        {"eventType": "Microsoft.KeyVault.SecretNewVersionCreated", "data": "x"},
        {"eventType": "Microsoft.KeyVault.SecretNewVersionCreated", "data": {"VaultName": "v"}},
    ],
)
def test_malformed_events_are_configuration_errors(payload: object) -> None:
    from apimvault import parse_secret_events

    with pytest.raises(ConfigurationError):
        parse_secret_events(payload)


def test_invalidate_with_spread_defers_the_background_refresh(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    events = Events()
    p = provider(azure, app.name, clock, **events.callbacks())
    p.get_key()
    p.invalidate(spread=60)
    for _ in range(5):
        p.get_key()
    assert p.stats().vault_reads == 1  # scattered into the next 60 s, not now
    clock.advance(61)
    p.get_key()
    events.wait("refreshed", 2)
    assert p.stats().vault_reads == 2
    with pytest.raises(ConfigurationError):
        p.invalidate(spread=-1)
