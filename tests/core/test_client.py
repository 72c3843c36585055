"""create_azure_openai / create_async_azure_openai: real openai clients through the local APIM gateway."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, ExitStack

import httpx2
import openai
import pytest

from apimvault import (
    PLACEHOLDER_API_KEY,
    AsyncSubscriptionKeyProvider,
    ConfigurationError,
    InsecureTransportError,
    SubscriptionKeyAuth,
    SubscriptionKeyProvider,
    create_async_azure_openai,
    create_azure_openai,
    fingerprint,
)
from apimvault.local import DEPLOYMENT, LocalAzure, LocalCA
from tests._support.core import AppSecret, FakeClock, new_app_secret, rotate_to_secondary, user_messages
from tests._support.policies import FAST_REFRESH

HEADER = "Ocp-Apim-Subscription-Key"
MESSAGES = user_messages("hello")


def sync_setup(
    azure: LocalAzure, closing: ExitStack, *, clock: FakeClock | None = None
) -> tuple[SubscriptionKeyProvider, openai.AzureOpenAI, AppSecret]:
    """A provider and its client, both closed by ``closing`` when the test ends."""
    app = new_app_secret(azure)
    provider = closing.enter_context(
        SubscriptionKeyProvider(azure.vault_url, app.name, clock=clock or FakeClock(), policy=FAST_REFRESH)
    )
    client = closing.enter_context(create_azure_openai(provider, max_retries=0))
    return provider, client, app


def test_chat_streaming_and_embeddings_carry_the_key(azure: LocalAzure, closing: ExitStack) -> None:
    provider, client, app = sync_setup(azure, closing)
    reply = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    assert reply.choices[0].message.content
    chunks = list(client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    emb = client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert emb.data[0].embedding
    used = [u for u in azure.gateway.recent() if u.sid == app.sid]
    assert [u.slot for u in used] == ["primary"] * 3
    assert {u.fingerprint for u in used} == {fingerprint(provider.get())}
    assert HEADER not in client.default_headers  # only the auth on the transport sets the key


def test_placeholder_api_key_is_never_sent(azure: LocalAzure, closing: ExitStack) -> None:
    _, client, _ = sync_setup(azure, closing)
    raw = client.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=MESSAGES)
    sent = raw.http_response.request.headers
    assert "api-key" not in sent
    assert PLACEHOLDER_API_KEY not in str(dict(sent))
    assert sent[HEADER]


def test_rotation_reaches_copies_and_next_request(azure: LocalAzure, closing: ExitStack) -> None:
    clock = FakeClock()
    provider, client, app = sync_setup(azure, closing, clock=clock)
    frozen = client.with_options(default_headers={"X-Trace": "1"})  # openai freezes a dict copy here
    copied = client.copy()
    client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    old = provider.get()
    new_version = rotate_to_secondary(azure, app)
    provider.refresh()
    assert provider.get_key().version == new_version
    assert provider.get() != old
    assert HEADER not in client.default_headers and HEADER not in copied.default_headers
    for c in (client, frozen, copied):
        c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    used = [u for u in azure.gateway.recent() if u.sid == app.sid][-3:]
    assert [u.slot for u in used] == ["secondary"] * 3
    assert {u.fingerprint for u in used} == {fingerprint(provider.get())}
    assert provider.stats().resends_401 == 0


def test_revoked_key_in_flight_every_request_succeeds_after_one_refresh(
    azure: LocalAzure, closing: ExitStack
) -> None:
    provider, client, app = sync_setup(azure, closing)
    client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)  # warm the cache
    rotate_to_secondary(azure, app)  # the cached key is now revoked at the gateway
    reads_before = provider.stats().vault_reads

    def call(i: int) -> str:
        if i % 2:
            stream = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        reply = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(64)))
    assert all(results)
    stats = provider.stats()
    assert stats.vault_reads == reads_before + 1  # one coalesced refresh for all 401s
    assert stats.forced_refreshes == 1
    assert 1 <= stats.resends_401 <= 64
    labels = azure.gateway.counters.labels()
    assert labels["key:invalid"] == stats.resends_401  # each refused request was re-sent exactly once
    assert labels[f"sub:{app.sid}:secondary"] == 64


def test_second_401_surfaces_and_forced_refresh_is_rate_limited(
    azure: LocalAzure, closing: ExitStack
) -> None:
    clock = FakeClock()
    provider, client, app = sync_setup(azure, closing, clock=clock)
    client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    azure.apim_state.regenerate(app.sid, "primary")  # revoked, and the vault still holds the old key
    with pytest.raises(openai.AuthenticationError, match="invalid subscription key"):
        client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    assert provider.stats().vault_reads == 2 and provider.stats().resends_401 == 0
    for _ in range(5):  # within forced_refresh_interval: no more vault reads
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    assert provider.stats().vault_reads == 2
    clock.advance(6)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    assert provider.stats().vault_reads == 3


def test_backend_401_does_not_trigger_a_refresh(azure: LocalAzure, closing: ExitStack) -> None:
    provider, client, _ = sync_setup(azure, closing)
    client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    azure.openai.faults.inject("status", status=401, times=1)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    stats = provider.stats()
    assert stats.vault_reads == 1 and stats.forced_refreshes == 0 and stats.resends_401 == 0


def test_insecure_endpoint_refused(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    with (
        SubscriptionKeyProvider(azure.vault_url, app.name) as provider,
        pytest.raises(InsecureTransportError),
    ):
        create_azure_openai(provider, azure_endpoint="http://127.0.0.1:9")


def test_insecure_request_url_refused_by_auth(azure: LocalAzure, closing: ExitStack) -> None:
    app = new_app_secret(azure)
    provider = closing.enter_context(SubscriptionKeyProvider(azure.vault_url, app.name))
    auth = SubscriptionKeyAuth(provider)
    with httpx2.Client(auth=auth) as http, pytest.raises(InsecureTransportError):
        http.get("http://127.0.0.1:9/openai")
    assert provider.stats().vault_reads == 1  # the key was read but never sent


def test_conflicting_credentials_are_refused(azure: LocalAzure) -> None:
    provider = SubscriptionKeyProvider(azure.vault_url, "x", credential=object())  # type: ignore[arg-type]
    for kwargs in (
        {"api_key": "k"},
        {"azure_ad_token": "t"},
        {
            "base_url": "https://x/openai/deployments/d",
            "azure_endpoint": "https://x",
        },  # issue 25: one of them
    ):
        with pytest.raises(ConfigurationError):
            create_azure_openai(provider, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        create_async_azure_openai(provider)  # type: ignore[arg-type]


def test_cross_origin_redirect_drops_the_key_same_origin_keeps_it(
    azure: LocalAzure, closing: ExitStack
) -> None:
    app = new_app_secret(azure)
    provider = closing.enter_context(SubscriptionKeyProvider(azure.vault_url, app.name))
    auth = SubscriptionKeyAuth(provider)
    first = httpx2.Request("POST", f"{azure.gateway_url}/openai/x")
    flow = auth.sync_auth_flow(first)
    sent = next(flow)
    assert sent.headers[HEADER] == provider.get()
    same = httpx2.Request(
        "POST", f"{azure.gateway_url}/openai/y", headers=dict(sent.headers), extensions=sent.extensions
    )
    auth.on_request(same)
    assert same.headers[HEADER] == provider.get()
    other = httpx2.Request(
        "POST", f"{azure.vault_url}/elsewhere", headers=dict(sent.headers), extensions=sent.extensions
    )
    auth.on_request(other)
    assert HEADER not in other.headers


def test_key_never_in_debug_logs(
    azure: LocalAzure, closing: ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx2", "httpcore2", "azure", "apimvault"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        provider, client, app = sync_setup(azure, closing)
        client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        list(client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True))
        rotate_to_secondary(azure, app)
        client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)  # 401 -> refresh -> re-send
        keys = {app.subscription.primary_key, provider.get()}
    finally:
        for name in ("openai", "httpx2", "httpcore2", "azure", "apimvault"):
            logging.getLogger(name).setLevel(logging.NOTSET)
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert len(caplog.records) > 10  # debug logging really was on
    for key in keys:
        for i in range(len(key) - 7):
            assert key[i : i + 8] not in text


async def test_async_client_chat_stream_and_revocation(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    async with (
        AsyncExitStack() as stack,
        AsyncSubscriptionKeyProvider(
            azure.vault_url, app.name, clock=FakeClock(), policy=FAST_REFRESH
        ) as provider,
    ):
        client = create_async_azure_openai(provider, max_retries=0)
        await stack.enter_async_context(client)
        reply = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        assert reply.choices[0].message.content
        assert HEADER not in client.default_headers
        rotate_to_secondary(azure, app)

        async def call(i: int) -> str:
            if i % 2:
                stream = await client.chat.completions.create(
                    model=DEPLOYMENT, messages=MESSAGES, stream=True
                )
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            r = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
            return r.choices[0].message.content or ""

        results = await asyncio.gather(*(call(i) for i in range(100)))
        assert all(results)
        stats = provider.stats()
        assert stats.vault_reads == 2 and stats.forced_refreshes == 1 and stats.resends_401 >= 1
        current = provider.current()
        assert current is not None
        assert current.reveal() == app.subscription.secondary_key
        emb = await client.with_options(timeout=30).embeddings.create(
            model="text-embedding-3-small", input="x"
        )
        assert emb.data


def test_many_threads_one_client_one_cold_read(azure: LocalAzure, closing: ExitStack) -> None:
    provider, client, _ = sync_setup(azure, closing)
    azure.keyvault.faults.inject("latency", operation="GetSecret", seconds=0.3, times=1)
    barrier = threading.Barrier(32)

    def call(_: int) -> bool:
        barrier.wait()
        return bool(client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices)

    with ThreadPoolExecutor(32) as pool:
        assert all(pool.map(call, range(32)))
    assert provider.stats().vault_reads == 1


def test_api_key_mode_sends_the_key_in_api_key(
    local_azure: LocalAzure, closing: ExitStack, session_ca: LocalCA
) -> None:
    """APIM reading ``api-key``: the auth puts the key in ``api-key`` (openai holds a placeholder)."""
    with LocalAzure(ca=session_ca, gateway_header_name="api-key") as azure, azure.env():
        provider = closing.enter_context(SubscriptionKeyProvider.from_env(header_name="api-key"))
        client = closing.enter_context(create_azure_openai(provider, max_retries=0))
        raw = client.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=MESSAGES)
        sent = raw.http_response.request.headers
        assert sent["api-key"] == provider.get()
        assert HEADER not in sent
        assert client.api_key == PLACEHOLDER_API_KEY  # openai never holds the key
        assert azure.gateway.counters.labels()["key:primary"] == 1
        # Rotation + revocation also recovers through the re-send in this mode.
        sub = azure.apim_state.get("apimvault-app")
        assert sub is not None
        azure.apim_state.regenerate(sub.sid, "secondary")
        azure.keyvault.put_secret("apim-subscription-key", sub.secondary_key)
        azure.apim_state.regenerate(sub.sid, "primary")
        client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        assert provider.stats().resends_401 == 1
        assert provider.get() == sub.secondary_key
