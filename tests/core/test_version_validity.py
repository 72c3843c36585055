"""Issue 21 items 1 and 4: a provider serves the newest version that is enabled and valid now, and the
previous-key fallback obeys the same rules as the current key.

Item 1: a new version created disabled or expired (pushed by an event, found by a refresh, or found at
a cold start) never takes away a valid key; disabling the newest version rolls back to the one before.
Item 4: the previous version is served as a fallback only while Key Vault says it is enabled and it has
not passed its ``expires_on``.

Everything runs against the local stack with the real (sync and aio) SecretClient; the vault is changed
with a real SecretClient under the officer identity or the stack's in-process API.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.identity import DefaultAzureCredential
from azure.keyvault.secrets import SecretClient

from apimvault import (
    AsyncSubscriptionKeyProvider,
    SecretDisabledError,
    SecretExpiredError,
    arefresh_from_event,
    refresh_from_event,
)
from apimvault.local import LocalAzure
from tests._support.core import AppSecret, FakeClock, new_app_secret, new_version_event
from tests._support.faults import Api, AsyncHarness, Harness, make, outcome
from tests._support.policies import SHORT_BACKOFF

STALE = 310
APIS: list[Api] = ["sync", "async"]


@pytest.fixture
def officer(azure: LocalAzure) -> Iterator[SecretClient]:
    credential = DefaultAzureCredential(managed_identity_client_id=azure.officer_identity.client_id)
    client = SecretClient(azure.vault_url, credential)
    try:
        yield client
    finally:
        client.close()
        credential.close()


def harness(api: Api, azure: LocalAzure, app: AppSecret, **kwargs: Any) -> Harness:
    return make(api, azure, app.name, policy=SHORT_BACKOFF, **kwargs)


def slots(azure: LocalAzure, app: AppSecret) -> list[str]:
    """The key slots the gateway saw for ``app`` (refused keys show as no slot of the subscription)."""
    return [u.slot for u in azure.gateway.recent() if u.sid == app.sid]


def push(h: Harness, event: dict[str, Any]) -> list[Any]:
    if isinstance(h, AsyncHarness):
        assert isinstance(h.provider, AsyncSubscriptionKeyProvider)
        return h.run(arefresh_from_event(event, [h.provider]))
    return refresh_from_event(event, [h.provider])  # type: ignore[list-item]


def _past(clock: FakeClock) -> int:
    return int(clock.now) - 60


BAD_NEWER = ["disabled", "expired"]


def put_bad_newer(azure: LocalAzure, app: AppSecret, what: str, clock: FakeClock) -> str:
    """A newer version holding the subscription's secondary key, created disabled or already expired."""
    kwargs: dict[str, Any] = {"enabled": False} if what == "disabled" else {"expires": _past(clock)}
    return azure.keyvault.put_secret(app.name, app.subscription.secondary_key, **kwargs).version


# --------------------------------------------------------------------------------------- item 1


@pytest.mark.parametrize("what", BAD_NEWER)
@pytest.mark.parametrize("api", APIS)
def test_pushed_invalid_new_version_keeps_the_valid_key(azure: LocalAzure, api: Api, what: str) -> None:
    """A SecretNewVersionCreated event for a disabled / expired version: the provider keeps its key."""
    app = new_app_secret(azure)
    clock = FakeClock()
    h = harness(api, azure, app, clock=clock)
    try:
        assert h.chat(False)
        good = h.current_key()
        bad = put_bad_newer(azure, app, what, clock)
        assert push(h, new_version_event(azure, app, bad)) == [h.provider]
        assert h.current() == good  # not dropped, not replaced
        assert h.rec.errors == []
        assert h.chat(False)
        assert slots(azure, app) == ["primary", "primary"]
        assert h.stats().rotations == 0
    finally:
        h.close()


@pytest.mark.parametrize("what", BAD_NEWER)
@pytest.mark.parametrize("api", APIS)
def test_refresh_finding_an_invalid_new_version_keeps_the_valid_key(
    azure: LocalAzure, api: Api, what: str
) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    h = harness(api, azure, app, clock=clock)
    try:
        assert h.chat(False)
        good = h.current_key()
        put_bad_newer(azure, app, what, clock)
        assert h.refresh() == good
        for step in range(1, 4):  # three refresh periods, past the old key's hard limit (900 s)
            h.advance(STALE)
            assert h.chat(False)
            h.wait("refreshed", step + 2)
            assert h.current() == good
        assert h.rec.errors == []
        assert set(slots(azure, app)) == {"primary"}
    finally:
        h.close()


@pytest.mark.parametrize("what", BAD_NEWER)
@pytest.mark.parametrize("api", APIS)
def test_cold_start_with_an_invalid_latest_version_serves_the_newest_valid_one(
    azure: LocalAzure, api: Api, what: str
) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    valid = azure.keyvault.latest(app.name).version
    put_bad_newer(azure, app, what, clock)
    h = harness(api, azure, app, clock=clock)
    try:
        assert h.chat(False)
        assert h.current_key().version == valid
        assert slots(azure, app) == ["primary"]
    finally:
        h.close()


@pytest.mark.parametrize("api", APIS)
def test_disabling_the_newest_version_rolls_back_to_the_one_before(
    azure: LocalAzure, officer: SecretClient, api: Api
) -> None:
    """An operator disables a bad version to roll back: the newest valid version is served again."""
    app = new_app_secret(azure)
    clock = FakeClock()
    h = harness(api, azure, app, clock=clock)
    try:
        assert h.chat(False)
        old = h.current_key()
        newer = azure.keyvault.put_secret(app.name, app.subscription.secondary_key).version
        assert h.refresh().version == newer
        assert h.chat(False)
        officer.update_secret_properties(app.name, newer, enabled=False)
        assert h.refresh() == old
        assert h.chat(False)
        assert slots(azure, app) == ["primary", "secondary", "primary"]
    finally:
        h.close()


@pytest.mark.parametrize("api", APIS)
def test_every_version_invalid_still_drops_the_key(
    azure: LocalAzure, officer: SecretClient, api: Api
) -> None:
    """The rule has no loophole: with no version valid now, the held (disabled) key is not served."""
    app = new_app_secret(azure)
    clock = FakeClock()
    h = harness(api, azure, app, clock=clock)
    try:
        assert h.chat(False)
        held = h.current_key().version
        put_bad_newer(azure, app, "disabled", clock)
        officer.update_secret_properties(app.name, held, enabled=False)
        seen, exc = outcome(h.refresh)
        assert isinstance(exc, SecretDisabledError), seen
        assert h.current() is None
        seen, exc = outcome(lambda: h.chat(False))
        assert isinstance(exc, SecretDisabledError), seen
    finally:
        h.close()


# --------------------------------------------------------------------------------------- item 4


def fall_back(h: Harness, azure: LocalAzure, app: AppSecret) -> tuple[Any, Any]:
    """Serve ``app``'s first version, store a version the gateway refuses, and let a request fall back."""
    assert h.chat(False)
    old = h.current_key()
    lagging = azure.keyvault.put_secret(app.name, uuid.uuid4().hex, tags={"CredentialId": "secondary"})
    current = h.refresh()
    assert current.version == lagging.version
    assert h.chat(False)  # 401, nothing newer: re-sent with the previous version
    assert h.current() == old
    assert h.stats().fallbacks_to_previous == 1
    return old, current


@pytest.mark.parametrize("api", APIS)
def test_fallback_never_serves_the_previous_version_past_its_expires_on(azure: LocalAzure, api: Api) -> None:
    clock = FakeClock()
    app = new_app_secret(azure, expires=int(clock.now) + 100)
    h = harness(api, azure, app, clock=clock)
    try:
        _, current = fall_back(h, azure, app)
        uses = slots(azure, app).count("primary")
        clock.advance(101)  # past the previous version's expires_on, not yet time to refresh
        assert h.current() == current
        seen, exc = outcome(lambda: h.chat(False))
        assert exc is not None and "401" in f"{seen} {exc}", seen
        assert slots(azure, app).count("primary") == uses  # the expired version was never sent again
        assert h.stats().fallbacks_to_previous == 1
    finally:
        h.close()


@pytest.mark.parametrize("api", APIS)
def test_fallback_to_a_previous_version_already_expired_does_not_happen(azure: LocalAzure, api: Api) -> None:
    """The previous version expired before the gateway refused the current one: no fallback at all."""
    clock = FakeClock()
    app = new_app_secret(azure, expires=int(clock.now) + 100)
    h = harness(api, azure, app, clock=clock)
    try:
        assert h.chat(False)
        azure.keyvault.put_secret(app.name, uuid.uuid4().hex)
        h.refresh()
        clock.advance(101)
        seen, exc = outcome(lambda: h.chat(False))
        assert exc is not None and "401" in f"{seen} {exc}", seen
        assert slots(azure, app) == ["primary"]
        assert h.stats().fallbacks_to_previous == 0
    finally:
        h.close()


@pytest.mark.parametrize("api", APIS)
def test_fallback_ends_when_the_previous_version_is_disabled(
    azure: LocalAzure, officer: SecretClient, api: Api
) -> None:
    clock = FakeClock()
    app = new_app_secret(azure)
    h = harness(api, azure, app, clock=clock)
    try:
        old, current = fall_back(h, azure, app)
        officer.update_secret_properties(app.name, old.version, enabled=False)
        uses = slots(azure, app).count("primary")
        clock.advance(STALE)  # the next refresh reads the previous version again
        h.get_key()
        h.wait("refreshed", 4)
        assert h.current() == current
        seen, exc = outcome(lambda: h.chat(False))
        assert exc is not None and "401" in f"{seen} {exc}", seen
        assert slots(azure, app).count("primary") == uses  # the disabled version was never sent again
    finally:
        h.close()


@pytest.mark.parametrize("api", APIS)
def test_no_fallback_to_a_previous_version_disabled_in_the_vault(
    azure: LocalAzure, officer: SecretClient, api: Api
) -> None:
    """The 401 that would fall back reads the previous version first: disabled, it is never sent."""
    clock = FakeClock()
    app = new_app_secret(azure)
    h = harness(api, azure, app, clock=clock)
    try:
        assert h.chat(False)
        old = h.current_key()
        azure.keyvault.put_secret(app.name, uuid.uuid4().hex)
        h.refresh()
        officer.update_secret_properties(app.name, old.version, enabled=False)
        seen, exc = outcome(lambda: h.chat(False))
        assert exc is not None and "401" in f"{seen} {exc}", seen
        assert slots(azure, app) == ["primary"]
        assert h.stats().fallbacks_to_previous == 0
    finally:
        h.close()


@pytest.mark.parametrize("api", APIS)
def test_fallback_follows_the_previous_versions_new_expiry(
    azure: LocalAzure, officer: SecretClient, api: Api
) -> None:
    """The previous version's attributes come from Key Vault at each check, not from memory: an expiry
    set on it while falling back applies."""
    clock = FakeClock()
    app = new_app_secret(azure)
    h = harness(api, azure, app, clock=clock)
    try:
        old, current = fall_back(h, azure, app)
        soon = datetime.fromtimestamp(clock.now, tz=UTC) + timedelta(seconds=STALE + 30)
        officer.update_secret_properties(app.name, old.version, expires_on=soon)
        clock.advance(STALE)
        h.get_key()
        h.wait("refreshed", 4)
        assert h.current() == old  # still valid for 30 s
        clock.advance(31)
        assert h.current() == current
    finally:
        h.close()


def test_expired_error_type_is_kept_for_a_lone_expired_version(azure: LocalAzure) -> None:
    """With one version only, and that one expired, the error stays SecretExpiredError (the listing finds
    nothing valid and says why the latest was refused)."""
    clock = FakeClock()
    app = new_app_secret(azure, expires=_past(clock))
    h = harness("sync", azure, app, clock=clock)
    try:
        seen, exc = outcome(h.get_key)
        assert isinstance(exc, SecretExpiredError), seen
    finally:
        h.close()
