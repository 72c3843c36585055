"""Issue 21, items 2, 3, 6, 7 (token), 12 and 17: the Entra token gets every guard the key has, token refusals
are bounded and classified from the gateway's own answer, ``SubscriptionKeyAuth`` used directly keeps the
key home across redirects, and a re-send never meets a consumed body.

Real openai / httpx2 / azure-identity clients over TLS to loopback services: the local stack, plus two
recording services of this module (``origin`` and ``other``, two origins on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import openai
import pytest
from azure.identity import DefaultAzureCredential
from azure.identity.aio import DefaultAzureCredential as AsyncDefaultAzureCredential
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from apimvault import (
    AsyncBearerTokenSource,
    AsyncSubscriptionKeyProvider,
    BearerTokenSource,
    CachePolicy,
    ConfigurationError,
    InsecureTransportError,
    SubscriptionKeyAuth,
    SubscriptionKeyProvider,
    create_async_azure_openai,
    create_async_token_azure_openai,
    create_azure_openai,
    create_token_azure_openai,
    refusal_stats,
)
from apimvault.local import DEPLOYMENT, LocalAzure, ServerThread, Service

from .core_helpers import FakeClock, new_app_secret, rotate_to_secondary, user_messages

AUDIENCE = "api://apimvault-gateway"
SCOPE = AUDIENCE + "/.default"
API = "/openai"
HEADER = "Ocp-Apim-Subscription-Key"
MESSAGES = user_messages("hello")
POLICY = CachePolicy(ttl=300, jitter=0, refresh_margin=60, forced_refresh_interval=5)
CHAT_PATH = f"/openai/deployments/{DEPLOYMENT}/chat/completions"
COMPLETION = {
    "id": "chatcmpl-token-guard",
    "object": "chat.completion",
    "created": 0,
    "model": DEPLOYMENT,
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "seen"}}],
}
APIM_TOKEN_401 = {"statusCode": 401, "message": "Invalid JWT."}
BACKEND_401 = {"error": {"code": "401", "message": "Access denied due to invalid token"}}


class Recorder(Service):
    """A loopback HTTPS service recording each request (path, headers, body); it may redirect, or answer
    ``status`` with ``body`` and ``headers`` for the next ``times`` requests (``None``: always)."""

    name = "token-recorder"

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.redirect: tuple[int, str] | None = None
        self.answer: tuple[int, dict[str, Any], dict[str, str]] | None = None
        self.times: int | None = None

    def build_app(self) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            request = Request(scope, receive)
            body = await request.body()
            with self.lock:
                self.seen.append((request.url.path, dict(request.headers), body))
                answer = self.answer
                if answer is not None and self.times is not None:
                    self.times -= 1
                    if self.times <= 0:
                        self.answer = None
            response: Response
            if request.url.path.startswith("/openai/") and self.redirect is not None:
                status, target = self.redirect
                response = RedirectResponse(target, status_code=status)
            elif answer is not None:
                status, doc, headers = answer
                response = JSONResponse(doc, status, headers=headers)
            else:
                response = JSONResponse(COMPLETION)
            await response(scope, receive, send)

        return app


@pytest.fixture(scope="module")
def recorders(local_azure: LocalAzure) -> Iterator[tuple[Recorder, Recorder]]:
    origin, other = Recorder(), Recorder()
    thread = ServerThread([origin, other], local_azure.ca)
    thread.start()
    try:
        yield origin, other
    finally:
        thread.stop()


@pytest.fixture
def fresh(recorders: tuple[Recorder, Recorder]) -> tuple[Recorder, Recorder]:
    for recorder in recorders:
        recorder.reset()
    return recorders


@pytest.fixture
def loop() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture
def gateway(azure: LocalAzure) -> Iterator[LocalAzure]:
    azure.gateway.policies.clear()
    yield azure
    azure.gateway.policies.clear()


def bearer(seen: list[tuple[str, dict[str, str], bytes]]) -> list[str]:
    """The bearer tokens recorded requests carried."""
    return [h["authorization"].removeprefix("Bearer ") for _, h, _ in seen if "authorization" in h]


def carrying(seen: list[tuple[str, dict[str, str], bytes]], secret: str) -> list[str]:
    """Paths of recorded requests with ``secret`` (or any 8-character piece of it) in any header."""
    pieces = {secret[i : i + 8] for i in range(len(secret) - 7)}
    return [path for path, headers, _ in seen if any(p in v for v in headers.values() for p in pieces)]


class Rig:
    """A token-only or key-plus-token client, sync or async, aimed at ``endpoint``; ``chat`` runs one call."""

    def __init__(
        self,
        azure: LocalAzure,
        loop: asyncio.Runner,
        api: str,
        mode: str,
        endpoint: str,
        *,
        http_client: Any = None,
        source: Any = None,
    ) -> None:
        self.loop = loop
        self.api = api
        self.key: str | None = None
        self.provider: Any = None
        self.credential: Any = DefaultAzureCredential() if api == "sync" else AsyncDefaultAzureCredential()
        if source is None:
            source = (BearerTokenSource if api == "sync" else AsyncBearerTokenSource)(self.credential, SCOPE)
        self.source = source
        extra: dict[str, Any] = {"http_client": http_client} if http_client is not None else {}
        if mode == "token":
            make: Any = create_token_azure_openai if api == "sync" else create_async_token_azure_openai
            self.client: Any = make(source, azure_endpoint=endpoint, max_retries=0, **extra)
        else:
            app = new_app_secret(azure)
            self.key = app.subscription.primary_key
            cls: Any = SubscriptionKeyProvider if api == "sync" else AsyncSubscriptionKeyProvider
            self.provider = cls(azure.vault_url, app.name, clock=FakeClock(), policy=POLICY)
            factory: Any = create_azure_openai if api == "sync" else create_async_azure_openai
            self.client = factory(
                self.provider, azure_endpoint=endpoint, token_scope=source, max_retries=0, **extra
            )

    @property
    def owner(self) -> Any:
        return self.provider if self.provider is not None else self.source

    def chat(self, client: Any = None) -> str:
        client = client if client is not None else self.client
        if self.api == "sync":
            return client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices[0].message.content

        async def go() -> str:
            reply = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
            return reply.choices[0].message.content or ""

        return self.loop.run(go())

    def http(self) -> Any:
        return openai.DefaultHttpxClient() if self.api == "sync" else openai.DefaultAsyncHttpxClient()

    def close(self, *more: Any) -> None:
        for thing in (*more, self.client, self.provider, self.credential):
            if thing is None:
                continue
            result = thing.aclose() if isinstance(thing, httpx2.AsyncClient) else thing.close()
            if asyncio.iscoroutine(result):
                self.loop.run(result)


APIS = ["sync", "async"]
MODES = ["token", "key+token"]


# ----------------------------------------------------------------- item 2: the token is guarded like the key


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
def test_token_copy_with_base_url_elsewhere_or_http_sends_nothing(
    azure: LocalAzure, fresh: tuple[Recorder, Recorder], loop: asyncio.Runner, api: str, mode: str
) -> None:
    origin, other = fresh
    rig = Rig(azure, loop, api, mode, origin.url)
    assert rig.chat() == "seen"
    [token] = bearer(origin.seen)
    assert token.startswith("ey")  # a JWT went to the origin the client was made for
    for target in (f"{other.url}/openai", f"http://127.0.0.1:{other.port}/openai"):
        copy = rig.client.with_options(base_url=target)  # the same guarded transport
        with pytest.raises(InsecureTransportError, match="refusing to send") as info:
            rig.chat(copy)
        assert token not in str(info.value)
    assert other.seen == []  # nothing reached the other origin, not over https, not over http
    rig.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["with_options", "copy"])
@pytest.mark.parametrize("api", APIS)
def test_token_copy_with_another_http_client_fails_closed(
    azure: LocalAzure, fresh: tuple[Recorder, Recorder], loop: asyncio.Runner, api: str, how: str, mode: str
) -> None:
    origin, other = fresh
    rig = Rig(azure, loop, api, mode, origin.url)
    assert rig.chat() == "seen"
    [token] = bearer(origin.seen)
    origin.seen.clear()
    origin.redirect = (307, f"{other.url}/final")
    unguarded = getattr(rig.client, how)(http_client=rig.http())  # no auth, no hooks
    assert rig.chat(unguarded) == "seen"  # it reached the origin and followed the 307 ...
    assert [p for p, _, _ in origin.seen] == [CHAT_PATH] and [p for p, _, _ in other.seen] == ["/final"]
    everything = origin.seen + other.seen
    assert bearer(everything) == [] and carrying(everything, token) == []  # ... without the token
    if rig.key is not None:
        assert carrying(everything, rig.key) == []  # ... and without the key
    rig.close(unguarded)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
def test_token_client_refuses_an_http_client_without_tls_verification(
    azure: LocalAzure, fresh: tuple[Recorder, Recorder], loop: asyncio.Runner, api: str, mode: str
) -> None:
    origin, _ = fresh
    for verify in (False, _no_hostname_check(azure)):
        http: Any = httpx2.Client(verify=verify) if api == "sync" else httpx2.AsyncClient(verify=verify)
        with pytest.raises(InsecureTransportError, match="TLS"):
            Rig(azure, loop, api, mode, origin.url, http_client=http)
        assert http.auth is None
        result = http.close() if api == "sync" else http.aclose()
        if asyncio.iscoroutine(result):
            loop.run(result)
    assert origin.seen == []


def _no_hostname_check(azure: LocalAzure) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(azure.ca_path))
    ctx.check_hostname = False
    return ctx


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
def test_token_and_key_dropped_on_cross_origin_redirects(
    azure: LocalAzure,
    fresh: tuple[Recorder, Recorder],
    loop: asyncio.Runner,
    api: str,
    mode: str,
    status: int,
) -> None:
    origin, other = fresh
    rig = Rig(azure, loop, api, mode, origin.url)
    origin.redirect = (status, f"{other.url}/landing")
    assert rig.chat() == "seen"  # the redirect was followed; the landing page answered
    [token] = bearer(origin.seen)
    assert other.seen and bearer(other.seen) == [] and carrying(other.seen, token) == []
    if rig.key is not None:
        assert carrying(origin.seen, rig.key) == [CHAT_PATH] and carrying(other.seen, rig.key) == []
    rig.close()
