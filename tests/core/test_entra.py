"""Key plus Entra token, and token only (issue 14, part 3), against the local APIM's validate-azure-ad-token.

The token comes from the stack's managed-identity endpoint through azure-identity (DefaultAzureCredential
restricted to ManagedIdentityCredential by the stack's environment), signed with the key the stack publishes
as JWKS; the gateway checks signature, issuer, audience and expiry with the stack's clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from azure.identity import DefaultAzureCredential
from azure.identity.aio import DefaultAzureCredential as AsyncDefaultAzureCredential

from apimvault import (
    AsyncBearerTokenSource,
    AsyncSubscriptionKeyProvider,
    BearerTokenSource,
    ConfigurationError,
    SubscriptionKeyProvider,
    create_async_azure_openai,
    create_async_token_azure_openai,
    create_azure_openai,
    create_token_azure_openai,
    refusal_stats,
)
from apimvault.local import DEPLOYMENT, LocalAzure, LocalCA
from tests._support.core import FakeClock, new_app_secret, rotate_to_secondary, user_messages
from tests._support.policies import FAST_REFRESH

AUDIENCE = "api://apimvault-gateway"
SCOPE = AUDIENCE + "/.default"
API = "/openai"
HEADER = "Ocp-Apim-Subscription-Key"
MESSAGES = user_messages("hello")
VALIDATE = {"validate_azure_ad_token": {"audiences": [AUDIENCE]}}


@pytest.fixture
def gateway(azure: LocalAzure) -> Iterator[LocalAzure]:
    azure.gateway.policies.set(API, VALIDATE)
    yield azure
    azure.gateway.policies.clear()


@pytest.fixture(scope="module")
def clocked(session_ca: LocalCA) -> Iterator[tuple[LocalAzure, FakeClock]]:
    """A stack of its own whose clock the test moves, so its tokens expire without waiting."""
    clock = FakeClock()
    with LocalAzure(ca=session_ca, clock=clock, policies=VALIDATE) as stack:
        yield stack, clock


def test_key_plus_token_sends_both_and_no_api_key(gateway: LocalAzure) -> None:
    app = new_app_secret(gateway)
    with SubscriptionKeyProvider(gateway.vault_url, app.name, policy=FAST_REFRESH) as provider:
        client = create_azure_openai(provider, token_scope=SCOPE, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=MESSAGES)
        sent = raw.http_response.request.headers
        assert raw.http_response.status_code == 200
        assert sent[HEADER] == provider.get()
        assert sent["authorization"].startswith("Bearer ey")
        assert "api-key" not in sent
        # Without the token the gateway refuses: the token is what got the request through.
        key_only = create_azure_openai(provider, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            key_only.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        client.close()
        key_only.close()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_key_plus_token_through_a_rotation_fails_nothing(gateway: LocalAzure, stream: bool) -> None:
    app = new_app_secret(gateway)
    failures: list[BaseException] = []
    with SubscriptionKeyProvider(
        gateway.vault_url, app.name, clock=FakeClock(), policy=FAST_REFRESH
    ) as provider:
        client = create_azure_openai(provider, token_scope=SCOPE, max_retries=0)

        def call(_: int) -> None:
            try:
                if stream:
                    chunks = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
                    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                else:
                    assert client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices
            except BaseException as exc:
                failures.append(exc)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(call, range(8)))
            rotate_to_secondary(gateway, app)
            list(pool.map(call, range(16)))
        client.close()
        assert failures == []
        refusals = refusal_stats(provider)
        assert refusals.key >= 1 and refusals.key_resends >= 1
        assert refusals.token == 0 and refusals.token_refreshes == 0
        assert provider.stats().rotations == 1


def test_token_expiry_mid_traffic_one_token_refresh_nothing_fails(
    clocked: tuple[LocalAzure, FakeClock],
) -> None:
    stack, clock = clocked
    app = new_app_secret(stack)
    # The provider keeps real time, so the key stays fresh in its cache while the stack's clock jumps.
    with stack.env(), SubscriptionKeyProvider(stack.vault_url, app.name, policy=FAST_REFRESH) as provider:
        client = create_azure_openai(provider, token_scope=SCOPE, max_retries=0)
        for _ in range(3):
            assert client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices
        reads = provider.stats().vault_reads
        clock.advance(stack.tokens.lifetime_s + 60)  # every token issued so far is now expired
        for _ in range(5):  # the first gets a token 401, a new token and one re-send; none fails
            assert client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices
        refusals = refusal_stats(provider)
        assert (refusals.token, refusals.token_refreshes, refusals.token_resends) == (1, 1, 1)
        assert refusals.key == 0
        stats = provider.stats()
        assert stats.vault_reads == reads and stats.forced_refreshes == 0 and stats.resends_401 == 0
        assert stack.gateway.counters.labels()["policy:token"] >= 1
        client.close()


async def test_async_token_expiry_mid_traffic(clocked: tuple[LocalAzure, FakeClock]) -> None:
    stack, clock = clocked
    app = new_app_secret(stack)
    with stack.env():
        async with AsyncSubscriptionKeyProvider(stack.vault_url, app.name, policy=FAST_REFRESH) as provider:
            client = create_async_azure_openai(provider, token_scope=SCOPE, max_retries=0)
            await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
            clock.advance(stack.tokens.lifetime_s + 60)
            replies = await asyncio.gather(
                *[client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES) for _ in range(4)]
            )
            assert all(r.choices for r in replies)
            refusals = refusal_stats(provider)
            # Concurrent refusals of one token share one refresh; each refused request is re-sent once.
            assert refusals.token >= 1 and refusals.token_refreshes >= 1
            assert refusals.token_resends == refusals.token and refusals.key == 0
            assert provider.stats().resends_401 == 0
            await client.close()


async def test_async_key_plus_token_sends_both(gateway: LocalAzure) -> None:
    app = new_app_secret(gateway)
    async with AsyncSubscriptionKeyProvider(gateway.vault_url, app.name, policy=FAST_REFRESH) as provider:
        client = create_async_azure_openai(provider, token_scope=SCOPE, max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=MESSAGES)
        assert raw.http_response.request.headers["authorization"].startswith("Bearer ")
        assert raw.http_response.request.headers[HEADER] == await provider.get()
        await client.close()


def test_token_only_client_for_a_gateway_without_subscription_keys(gateway: LocalAzure) -> None:
    gateway.gateway.policies.set(API, {**VALIDATE, "subscription_required": False})
    credential = DefaultAzureCredential()
    source = BearerTokenSource(credential, SCOPE)
    client = create_token_azure_openai(source, max_retries=0)
    try:
        raw = client.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=MESSAGES)
        assert raw.http_response.status_code == 200
        assert HEADER not in raw.http_response.request.headers
        # A key-requiring API refuses the same client with APIM's key 401, left to the caller.
        gateway.gateway.policies.set(API, VALIDATE)
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        assert refusal_stats(source).key == 1 and refusal_stats(source).token_refreshes == 0
    finally:
        client.close()
        credential.close()


async def test_async_token_only_client(gateway: LocalAzure) -> None:
    gateway.gateway.policies.set(API, {**VALIDATE, "subscription_required": False})
    credential = AsyncDefaultAzureCredential()
    client = create_async_token_azure_openai(SCOPE, credential=credential, max_retries=0)
    try:
        reply = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        assert reply.choices
    finally:
        await client.close()
        await credential.close()


def test_bad_token_configuration_is_a_clear_error(azure: LocalAzure) -> None:
    from azure.keyvault.secrets import SecretClient

    app = new_app_secret(azure)
    credential = DefaultAzureCredential()
    try:
        with SubscriptionKeyProvider(azure.vault_url, app.name, credential=credential) as provider:
            for bad in ("", "two scopes", 42):
                with pytest.raises(ConfigurationError):
                    create_azure_openai(provider, token_scope=bad)  # type: ignore[arg-type]
            with pytest.raises(ConfigurationError):
                create_azure_openai(provider, token_scope=SCOPE, azure_ad_token_provider=lambda: "x")
        with SecretClient(azure.vault_url, credential) as secrets:
            bare = SubscriptionKeyProvider(azure.vault_url, app.name, secret_client=secrets)
            with pytest.raises(ConfigurationError, match="token_credential"):
                create_azure_openai(bare, token_scope=SCOPE)
            client = create_azure_openai(bare, token_scope=SCOPE, token_credential=credential)
            assert isinstance(client, openai.AzureOpenAI)
            client.close()
        with pytest.raises(ConfigurationError, match="AsyncTokenCredential"):
            AsyncBearerTokenSource(credential, SCOPE)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="not a token credential"):
            BearerTokenSource(object(), SCOPE)  # type: ignore[arg-type]
    finally:
        credential.close()


async def test_a_sync_credential_is_refused_for_an_async_token_source() -> None:
    credential = AsyncDefaultAzureCredential()
    try:
        with pytest.raises(ConfigurationError, match="sync TokenCredential"):
            BearerTokenSource(credential, SCOPE)  # type: ignore[arg-type]
    finally:
        await credential.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_token_401_refresh_and_resend_on_a_stream(
    clocked: tuple[LocalAzure, FakeClock], mode: str
) -> None:
    stack, clock = clocked
    app = new_app_secret(stack)
    with stack.env():
        provider: Any
        if mode == "sync":
            provider = SubscriptionKeyProvider(stack.vault_url, app.name, policy=FAST_REFRESH)
            client: Any = create_azure_openai(provider, token_scope=SCOPE, max_retries=0)
            client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
            clock.advance(stack.tokens.lifetime_s + 60)
            chunks = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            client.close()
            provider.close()
        else:
            provider = AsyncSubscriptionKeyProvider(stack.vault_url, app.name, policy=FAST_REFRESH)
            client = create_async_azure_openai(provider, token_scope=SCOPE, max_retries=0)
            await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
            clock.advance(stack.tokens.lifetime_s + 60)
            chunks = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
            await client.close()
            await provider.close()
    assert text
    refusals = refusal_stats(provider)
    assert (refusals.token, refusals.token_refreshes, refusals.token_resends, refusals.key) == (1, 1, 1, 0)


# ------------------------------------------------------------------------------- apimvault check


def test_check_token_step_and_key_plus_token_request(gateway: LocalAzure) -> None:
    from tests._support.cli import assert_no_key, new_rotating_app, run_cli

    audience = "api://apimvault-check"  # its own app registration: the role granted here stays with it
    gateway.tokens.grant_app_role(gateway.default_identity, audience, "Gateway.Call")
    gateway.gateway.policies.set(
        API, {"validate_azure_ad_token": {"audiences": [audience], "required_roles": ["Gateway.Call"]}}
    )
    app = new_rotating_app(gateway)
    run = run_cli(["check", "--json"], {**app.env(), "APIMVAULT_TOKEN_SCOPE": audience + "/.default"})
    assert_no_key(run.out + run.err, app.seen_keys)
    assert "eyJ" not in run.out + run.err  # no JWT is ever printed
    doc = run.json()
    assert run.code == 0 and doc["ok"] is True
    names = [s["name"] for s in doc["steps"]]
    assert names == ["config", "credential", "vault", "access", "secret", "token", "apim"]
    token = doc["token"]
    assert token["audience"] == audience and token["roles"] == ["Gateway.Call"]
    assert token["credential"] == "ManagedIdentityCredential" and 0 < token["expires_in_min"] <= 60
    assert "key and token accepted" in doc["steps"][-1]["detail"]


def test_check_names_a_refused_token(gateway: LocalAzure) -> None:
    from tests._support.cli import assert_no_key, new_rotating_app, run_cli

    app = new_rotating_app(gateway)
    run = run_cli(["check", "--json"], {**app.env(), "APIMVAULT_TOKEN_SCOPE": "api://another-api/.default"})
    assert_no_key(run.out + run.err, app.seen_keys)
    doc = run.json()
    assert run.code == 8 and doc["ok"] is False  # EXIT_KEY_REJECTED: the gateway refused a credential
    token_step, apim_step = doc["steps"][-2:]
    assert token_step["name"] == "token" and token_step["ok"] is True
    assert (
        "WARNING" not in token_step["detail"]
    )  # the token is for the scope asked; the gateway wants another
    assert apim_step["name"] == "apim" and apim_step["ok"] is False
    assert "refused the Entra token" in apim_step["detail"] and "IDX10214" in apim_step["detail"]


# ------------------------------------------------------------------------------- apimvault drill


@pytest.mark.slow
def test_drill_key_plus_token_reports_token_refreshes(gateway: LocalAzure) -> None:
    from tests._support.cli import assert_no_key, new_rotating_app, run_cli

    app = new_rotating_app(gateway)
    gateway.gateway.counters.reset()
    run = run_cli(
        ["drill", "--json", "--duration", "3", "--concurrency", "6", "--token-scope", SCOPE], app.env()
    )
    assert run.code == 0, run.err + run.out[-2000:]
    report = run.json()
    assert report["ok"] is True and report["failed"] == 0 and report["rotations"] >= 2
    assert report["token_scope"] == SCOPE
    assert report["token_refreshes"] == 0 and report["refusals"]["token"] == 0  # tokens outlive the drill
    assert report["key_refreshes"] >= len(report["clients_detail"])
    assert report["refusals"]["key"] == report["recovered_401"]
    # Every client token was accepted, and so was every token the rotation's gateway probes sent (GET
    # /openai/v1/models with the key and a token for --token-scope): the token policy refused nothing.
    assert gateway.gateway.counters.labels().get("policy:token", 0) == 0
    assert gateway.gateway.counters["Models"] > 0  # the probes went through the token policy
    app.keys()
    assert_no_key(run.out + run.err, app.seen_keys)
    assert "eyJ" not in run.out + run.err
    import io

    from apimvault.cli.drill.report import print_report
    from apimvault.cli.output import Output

    human = io.StringIO()
    print_report(Output(False, stdout=human, stderr=io.StringIO()), report)
    assert f"token {report['token_refreshes']} (key plus token for {SCOPE})" in human.getvalue()


def test_tokens_never_in_debug_logs_through_a_token_refresh(clocked: tuple[LocalAzure, FakeClock]) -> None:
    from tests._support.canary import LeakCapture, find_leaks

    stack, clock = clocked
    app = new_app_secret(stack)
    with stack.env(), SubscriptionKeyProvider(stack.vault_url, app.name, policy=FAST_REFRESH) as provider:
        client = create_azure_openai(provider, token_scope=SCOPE, max_retries=0)
        with LeakCapture(["apimvault", "openai", "httpx2", "httpcore2", "azure", "msal"]) as capture:
            client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
            clock.advance(stack.tokens.lifetime_s + 60)
            raw = client.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=MESSAGES)
        client.close()
        key = provider.get()
    token = raw.http_response.request.headers["authorization"].removeprefix("Bearer ")
    assert refusal_stats(provider).token_refreshes == 1 and token.startswith("eyJ")
    text = capture.text()
    assert capture.records > 0 and "authorization" in text.lower()  # headers were logged (redacted)
    assert "eyJ" not in text  # no JWT (header, payload or the whole token) in any DEBUG record
    assert find_leaks({"logs": text}, [token, key]) == []
