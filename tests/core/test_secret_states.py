"""Every state a secret (or its vault, or our access to it) can be in: a clear typed error or the documented
handling, and never a header built from a bad value.

Extends tests/core/test_provider.py (which covers the cold disabled / expired / not-yet-valid / missing cases
and a few bad values): here the states change *mid-run*, go through the openai client (sync and async), and
the vault is changed with a real SecretClient under the officer identity (delete, recover, purge, disable).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from azure.core.credentials import AccessToken
from azure.identity import DefaultAzureCredential
from azure.keyvault.secrets import SecretClient

from apimvault import (
    AccessDeniedError,
    ConfigurationError,
    CredentialError,
    InvalidSecretValueError,
    SecretDisabledError,
    SecretExpiredError,
    SecretNotFoundError,
    SecretNotYetValidError,
    SubscriptionKeyProvider,
    VaultUnavailableError,
    create_azure_openai,
)
from apimvault.local import DEPLOYMENT, ROLE_USER, LocalAzure
from tests._support.core import AppSecret, FakeClock, Gate, new_app_secret, rotate_to_secondary, user_messages
from tests._support.faults import Api, Harness, make, outcome
from tests._support.policies import SHORT_BACKOFF

STALE = 310
HARD_LIMIT = 900
APIS: list[Api] = ["sync", "async"]
MESSAGES_ = user_messages("secret states")


@pytest.fixture
def officer(azure: LocalAzure) -> Iterator[SecretClient]:
    credential = DefaultAzureCredential(managed_identity_client_id=azure.officer_identity.client_id)
    client = SecretClient(azure.vault_url, credential)
    try:
        yield client
    finally:
        client.close()
        credential.close()


def gateway_uses(azure: LocalAzure, app: AppSecret) -> list[str]:
    return [u.slot for u in azure.gateway.recent() if u.sid == app.sid]


def harness(api: Api, azure: LocalAzure, app: AppSecret, **kwargs: Any) -> Harness:
    return make(api, azure, app.name, policy=SHORT_BACKOFF, **kwargs)


# ------------------------------------------------------------------------------------ secret values

BAD_VALUES = {
    "empty": "",
    "only whitespace": " \t\r\n ",
    "inner CR/LF (header injection)": "abcd1234\r\nX-Injected: 1",
    "inner LF": "abcd1234\nabcd1234",
    "NUL": "abcd1234\x00abcd1234",
    "ESC": "abcd1234\x1babcd1234",
    "DEL": "abcd1234\x7fabcd1234",
    "vertical tab": "abcd1234\x0babcd1234",
    "non-ASCII (Latin-1)": "clé-abcd1234",
    "non-ASCII (Cyrillic)": "ключ-abcd1234",
    "non-breaking space": "abcd1234\u00a0abcd1234",
    "emoji": "abcd1234\U0001f511",
    "25 KiB": "a" * 25 * 1024,
    "4097 characters": "b" * 4097,
}


@pytest.mark.parametrize("what", list(BAD_VALUES))
@pytest.mark.parametrize("api", APIS)
def test_bad_value_is_refused_and_no_request_is_sent(azure: LocalAzure, api: Api, what: str) -> None:
    value = BAD_VALUES[what]
    try:
        app = new_app_secret(azure, value=value)
    except ValueError:
        pytest.skip("the vault itself refuses to store this value")
    h = harness(api, azure, app)
    try:
        seen, exc = outcome(lambda: h.chat(False))
        assert isinstance(exc, InvalidSecretValueError), seen
        assert exc.permanent
        message = f"{exc} {exc!r}"
        stripped = value.strip(" \t\r\n")
        if len(stripped) >= 8:
            for i in range(0, len(stripped) - 7, 97):  # spot-check substrings of the value
                assert stripped[i : i + 8] not in message
        assert "X-Injected" not in message
        assert gateway_uses(azure, app) == [], "a request was sent although the key was refused"
        assert h.current() is None
    finally:
        h.close()


@pytest.mark.parametrize("what", list(BAD_VALUES))
def test_bad_new_version_never_replaces_the_good_key(azure: LocalAzure, what: str) -> None:
    app = new_app_secret(azure)
    h = harness("sync", azure, app)
    try:
        assert h.chat(False)
        good = h.current()
        try:
            azure.keyvault.put_secret(app.name, BAD_VALUES[what])
        except ValueError:
            pytest.skip("the vault itself refuses to store this value")
        h.advance(STALE)
        assert h.chat(False)
        h.wait("errors", 1)
        assert isinstance(h.rec.errors[0].error, InvalidSecretValueError)
        assert h.current() == good
        assert set(gateway_uses(azure, app)) == {"primary"}
    finally:
        h.close()


@pytest.mark.parametrize("wrap", [" {} ", "\t{}\t", "{}\n", "{}\r\n", "\r\n {} \r\n"])
def test_whitespace_wrapped_value_is_stripped_and_works(azure: LocalAzure, wrap: str) -> None:
    app = new_app_secret(azure)
    azure.keyvault.put_secret(app.name, wrap.format(app.subscription.primary_key))
    h = harness("sync", azure, app)
    try:
        assert h.chat(False)
        assert h.current_key().reveal() == app.subscription.primary_key
        assert gateway_uses(azure, app) == ["primary"]
    finally:
        h.close()


# ------------------------------------------------------------------------------- attribute states


@pytest.mark.parametrize("api", APIS)
def test_current_version_disabled_mid_run_is_no_longer_served(
    azure: LocalAzure, officer: SecretClient, api: Api
) -> None:
    app = new_app_secret(azure)
    h = harness(api, azure, app)
    try:
        assert h.chat(False)
        version = h.current_key().version
        officer.update_secret_properties(app.name, version, enabled=False)
        h.provider.invalidate()  # e.g. an Event Grid event: refresh now
        h.get_key()
        h.wait("errors", 1)
        assert isinstance(h.rec.errors[0].error, SecretDisabledError)
        seen, exc = outcome(lambda: h.chat(False))
        assert isinstance(exc, SecretDisabledError), seen
    finally:
        h.close()


@pytest.mark.parametrize("api", APIS)
def test_served_version_that_key_vault_reports_expired_is_dropped(
    azure: LocalAzure, officer: SecretClient, api: Api
) -> None:
    """Issue 10 item 10: once Key Vault says the served version expired, it is dropped like a disabled
    one (it was served up to max_staleness as if the error were transient)."""
    app = new_app_secret(azure)
    h = harness(api, azure, app)
    try:
        assert h.chat(False)
        version = h.current_key().version
        past = datetime.now(UTC) - timedelta(minutes=5)
        officer.update_secret_properties(app.name, version, expires_on=past)
        h.provider.invalidate()  # e.g. a SecretExpired event: refresh now
        h.get_key()
        h.wait("errors", 1)
        assert isinstance(h.rec.errors[0].error, SecretExpiredError)
        assert h.current() is None
        seen, exc = outcome(lambda: h.chat(False))
        assert isinstance(exc, SecretExpiredError), seen
        assert h.stats().state == "expired"
    finally:
        h.close()


@pytest.mark.parametrize("api", APIS)
def test_pre_staged_not_yet_valid_version_waits_for_its_not_before(azure: LocalAzure, api: Api) -> None:
    """Issue 10 item 11: a version staged far ahead (not_before past the hard limit) is no outage: the
    cached version is confirmed by id and kept until the staged one becomes valid, then replaced."""
    app = new_app_secret(azure)
    clock = FakeClock()
    h = harness(api, azure, app, clock=clock)
    try:
        assert h.chat(False)
        good = h.current()
        assert good is not None
        staged = azure.keyvault.put_secret(
            app.name, app.subscription.secondary_key, not_before=int(clock.now) + 3 * HARD_LIMIT
        ).version
        for step in range(1, 9):  # 8 x 310 s: well past the old key's hard limit (900 s)
            h.advance(STALE)
            assert h.chat(False)  # the old key keeps working
            h.wait("refreshed", step + 1)
            assert h.current() == good
        assert h.rec.errors == []  # a pre-staged version is not a failure
        h.advance(3 * HARD_LIMIT - 8 * STALE + 1)  # now past not_before: the next read takes it
        assert h.chat(False)
        h.wait("refreshed", 10)
        assert h.current_key().version == staged
        assert h.chat(False)
        assert gateway_uses(azure, app)[-1] == "secondary"
    finally:
        h.close()


@pytest.mark.parametrize("api", APIS)
def test_cold_start_while_the_latest_version_is_pre_staged_serves_the_valid_one(
    azure: LocalAzure, api: Api
) -> None:
    """Issue 10 item 11 at start-up: no key cached and the latest version pre-staged: the newest version
    valid now is found (list versions, read it) instead of failing with SecretNotYetValidError."""
    app = new_app_secret(azure)
    clock = FakeClock()
    valid = azure.keyvault.latest(app.name).version
    staged = azure.keyvault.put_secret(
        app.name, app.subscription.secondary_key, not_before=int(clock.now) + 3600
    ).version
    h = harness(api, azure, app, clock=clock)
    try:
        assert h.chat(False)
        assert h.current_key().version == valid
        assert h.stats().vault_reads == 3  # the latest, the version list, the valid version
        assert gateway_uses(azure, app)[-1] == "primary"
        h.advance(3601)
        assert h.chat(False)
        assert h.current_key().version == staged
        assert gateway_uses(azure, app)[-1] == "secondary"
    finally:
        h.close()


@pytest.mark.parametrize("api", APIS)
def test_cold_start_with_only_pre_staged_versions_is_not_yet_valid(azure: LocalAzure, api: Api) -> None:
    clock = FakeClock()
    app = new_app_secret(azure, not_before=int(clock.now) + 3600)
    h = harness(api, azure, app, clock=clock)
    try:
        seen, exc = outcome(lambda: h.chat(False))
        assert isinstance(exc, SecretNotYetValidError), seen
    finally:
        h.close()


# -------------------------------------------------------------------- delete / recover / purge


@pytest.mark.parametrize("api", APIS)
def test_soft_deleted_then_recovered(azure: LocalAzure, officer: SecretClient, api: Api) -> None:
    app = new_app_secret(azure)
    h = harness(api, azure, app)
    try:
        assert h.chat(False)
        good = h.current()
        officer.begin_delete_secret(app.name).result()
        h.advance(STALE)
        assert h.chat(False)  # served (stale) while the secret is deleted
        h.wait("errors", 1)
        error = h.rec.errors[0].error
        assert isinstance(error, SecretNotFoundError) and "recover" in str(error)
        # A cold provider gets the typed error at once.
        cold = harness(api, azure, app)
        try:
            assert outcome(lambda: cold.chat(False))[0] == "SecretNotFoundError"
        finally:
            cold.close()
        officer.begin_recover_deleted_secret(app.name).result()
        h.advance(9)
        assert h.chat(False)
        h.wait("refreshed", 2)
        assert h.current() == good and h.stats().consecutive_failures == 0
    finally:
        h.close()


@pytest.mark.parametrize("api", APIS)
def test_purged_secret_is_served_until_the_hard_limit_then_not_found(
    azure: LocalAzure, officer: SecretClient, api: Api
) -> None:
    app = new_app_secret(azure)
    h = harness(api, azure, app)
    try:
        assert h.chat(False)
        officer.begin_delete_secret(app.name).result()
        officer.purge_deleted_secret(app.name)
        h.advance(STALE)
        assert h.chat(False)
        h.wait("errors", 1)
        h.advance(HARD_LIMIT - STALE + 1)
        seen, exc = outcome(lambda: h.chat(False))
        assert isinstance(exc, SecretNotFoundError), seen
        assert exc.permanent and h.current() is None
        with pytest.raises(Exception, match=r"(?i)not ?found"):
            officer.get_secret(app.name)  # really gone: nothing left to recover
    finally:
        h.close()


@pytest.mark.parametrize("api", APIS)
def test_pinned_version_then_deleted(azure: LocalAzure, officer: SecretClient, api: Api) -> None:
    app = new_app_secret(azure)
    pinned = azure.keyvault.latest(app.name).version
    azure.keyvault.put_secret(app.name, app.subscription.secondary_key)  # a newer version exists
    h = harness(api, azure, app, version=pinned)
    try:
        assert h.chat(False)
        assert h.current_key().version == pinned
        officer.begin_delete_secret(app.name).result()
        h.advance(STALE)
        assert h.chat(False)
        h.wait("errors", 1)
        assert isinstance(h.rec.errors[0].error, SecretNotFoundError)
        assert pinned in str(h.rec.errors[0].error)  # the message names the pinned version
        h.advance(HARD_LIMIT - STALE + 1)
        assert outcome(lambda: h.chat(False))[0] == "SecretNotFoundError"
        assert gateway_uses(azure, app) == ["primary", "primary"]
    finally:
        h.close()


# ---------------------------------------------------------------------------------- access


@pytest.mark.parametrize("api", APIS)
def test_permission_revoked_mid_run(azure: LocalAzure, api: Api) -> None:
    """403 mid-run: the cached key keeps serving until its hard limit, then AccessDeniedError (permanent)."""
    app = new_app_secret(azure)
    h = harness(api, azure, app)
    try:
        assert h.chat(False)
        good = h.current()
        azure.keyvault.revoke(azure.default_identity, ROLE_USER, secret=app.name)
        h.advance(STALE)
        assert h.chat(False)
        h.wait("errors", 1)
        assert isinstance(h.rec.errors[0].error, AccessDeniedError)
        assert h.current() == good
        h.advance(HARD_LIMIT - STALE - 1)
        assert h.chat(False)  # still within the hard limit
        h.advance(2)
        seen, exc = outcome(lambda: h.chat(False))
        assert isinstance(exc, AccessDeniedError), seen
        assert exc.permanent
        assert "Key Vault Secrets User" in str(exc) and azure.default_identity.object_id in str(exc)
        assert h.current() is None
        # Granting the role back recovers without a restart.
        azure.keyvault.grant(azure.default_identity, ROLE_USER, secret=app.name)
        h.advance(9)
        assert h.chat(False)
        assert h.current() == good
    finally:
        h.close()


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("api", APIS)
def test_wrong_vault_url_nothing_listening(azure: LocalAzure, api: Api) -> None:
    url = f"https://127.0.0.1:{_closed_port()}"
    h = make(api, azure, "apim-subscription-key", policy=SHORT_BACKOFF, vault_url=url)
    try:
        seen, exc = outcome(h.get_key)
        assert isinstance(exc, VaultUnavailableError), seen
        assert not exc.permanent and url in str(exc)
        assert outcome(h.get_key)[0] == "VaultUnavailableError"  # backing off: no second attempt
        assert h.stats().vault_reads == 1
    finally:
        h.close()


@pytest.mark.parametrize("api", APIS)
def test_wrong_vault_url_another_https_service(azure: LocalAzure, api: Api) -> None:
    """Pointed at an https service that is not a vault (the APIM gateway): a typed error, never a key."""
    h = make(api, azure, "apim-subscription-key", policy=SHORT_BACKOFF, vault_url=azure.gateway_url)
    try:
        seen, exc = outcome(h.get_key)
        # The SDK's first request carries no token; the gateway answers 404 without a challenge.
        assert isinstance(exc, SecretNotFoundError), seen
        assert "AZURE_KEYVAULT_URL" in str(exc)
        assert h.current() is None
    finally:
        h.close()


def test_wrong_host_for_the_vault_fails_challenge_verification(azure: LocalAzure) -> None:
    """``localhost`` reaches the same vault, but its challenge names another resource: the SDK's challenge
    verification (never turned off) refuses to send a token there; apimvault reports a ConfigurationError."""
    url = azure.vault_url.replace("127.0.0.1", "localhost")
    with (
        SubscriptionKeyProvider(
            url,
            "apim-subscription-key",
            clock=FakeClock(),
            policy=SHORT_BACKOFF,
            client_kwargs={"retry_total": 0},
        ) as provider,
        pytest.raises(ConfigurationError, match=r"(?i)challenge"),
    ):
        provider.get_key()
    assert azure.keyvault.counters["GetSecret"] == 1  # the unauthenticated challenge request only


class ForeignTenantCredential:
    """A TokenCredential whose tokens come from another tenant (another issuer and signing key)."""

    tenant = str(uuid.uuid4())

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        now = int(time.time())
        claims = {
            "aud": "https://vault.azure.net",
            "iss": f"https://sts.windows.net/{self.tenant}/",
            "tid": self.tenant,
            "oid": str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
        }
        return AccessToken(jwt.encode(claims, "k" * 32, algorithm="HS256"), now + 3600)

    def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        from azure.core.credentials import AccessTokenInfo

        token = self.get_token(*scopes)
        return AccessTokenInfo(token.token, token.expires_on)

    def close(self) -> None:
        return None


def test_wrong_tenant_is_a_credential_error(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    with SubscriptionKeyProvider(
        azure.vault_url,
        app.name,
        credential=ForeignTenantCredential(),
        clock=FakeClock(),
        policy=SHORT_BACKOFF,
        client_kwargs={"retry_total": 0},
    ) as provider:
        with pytest.raises(CredentialError) as info:
            provider.get_key()
        assert "401" in str(info.value) and "tenant" in str(info.value)
        assert provider.current() is None


# --------------------------------------------------------------------- 401 joining an older read


def _blocked_in_flight_join(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == "outcome" and frame.f_code.co_filename.endswith("_sync.py"):
            return True
        frame = frame.f_back
    return False


def test_401_that_joins_a_read_started_before_the_rotation_still_recovers(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    gate = Gate()
    clock = FakeClock()
    provider = SubscriptionKeyProvider(
        azure.vault_url,
        app.name,
        clock=clock,
        policy=SHORT_BACKOFF,
        client_kwargs={"retry_total": 0, "per_call_policies": [gate]},
    )
    client = create_azure_openai(provider, max_retries=0)
    try:
        assert client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES_)
        old = provider.get_key()
        gate.armed.set()
        provider.invalidate()
        provider.get_key()  # starts a background read; its response (the old version) is held at the gate
        assert gate.holding.wait(30)
        rotate_to_secondary(azure, app)  # the vault now has the new key; the old one is revoked
        outcome_box: list[tuple[str, BaseException | None]] = []
        worker = threading.Thread(
            target=lambda: outcome_box.append(
                outcome(lambda: client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES_))
            )
        )
        worker.start()
        deadline = time.monotonic() + 30
        while not _blocked_in_flight_join(worker):  # the 401 has joined the held read
            assert time.monotonic() < deadline and worker.is_alive(), outcome_box
            threading.Event().wait(0.005)
        gate.open.set()
        worker.join(30)
        assert not worker.is_alive()
        seen, exc = outcome_box[0]
        assert seen == "ok", repr(exc)
        assert provider.get_key() != old
    finally:
        gate.open.set()
        client.close()
        provider.close()


# ------------------------------------------------------------------ previous-key fallback (issue 11)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("api", APIS)
def test_gateway_refusing_the_current_key_falls_back_to_the_previous_one(
    azure: LocalAzure, api: Api, stream: bool
) -> None:
    """Issue 11 item 3: the gateway refuses the current version (e.g. it has not picked up a rotation yet)
    and Key Vault has nothing newer: the refused request is re-sent once with the previous version, which
    is then kept until a refresh shows a newer version."""
    app = new_app_secret(azure)
    h = harness(api, azure, app)
    try:
        assert h.chat(stream)
        old = h.current()
        assert old is not None
        # A value the gateway does not accept (yet), stored as the latest version.
        lagging = azure.keyvault.put_secret(app.name, uuid.uuid4().hex, tags={"CredentialId": "secondary"})
        assert h.refresh().version == lagging.version
        assert h.chat(stream)  # 401 with the current key, nothing newer: re-sent with the previous one
        assert h.current() == old
        stats = h.stats()
        assert (stats.fallbacks_to_previous, stats.resends_401) == (1, 1)
        assert h.chat(stream)  # kept: no more 401s
        assert h.stats().resends_401 == 1
        h.advance(STALE)  # a refresh that finds the same refused version keeps the fallback
        h.get_key()
        h.wait("refreshed", 4)
        assert h.current() == old
        assert h.chat(stream) and h.stats().resends_401 == 1
        newest = azure.keyvault.put_secret(app.name, app.subscription.secondary_key)
        assert h.refresh().version == newest.version  # a newer version ends the fallback
        assert h.current_key().version == newest.version
        assert h.chat(stream)
        assert gateway_uses(azure, app)[-1] == "secondary"
        assert h.stats().fallbacks_to_previous == 1
    finally:
        h.close()


@pytest.mark.parametrize("api", APIS)
def test_no_fallback_without_a_previous_version(azure: LocalAzure, api: Api) -> None:
    app = new_app_secret(azure, value=uuid.uuid4().hex)  # the only version holds a key APIM refuses
    h = harness(api, azure, app)
    try:
        seen, exc = outcome(lambda: h.chat(False))
        assert exc is not None and "401" in f"{seen} {exc}"
        assert h.stats().fallbacks_to_previous == 0
    finally:
        h.close()
