"""Issue 21, items 2, 3, 6, 7 (token), 12 and 17: the Entra token gets every guard the key has, token refusals
are bounded and classified from the gateway's own answer, ``SubscriptionKeyAuth`` used directly keeps the
key home across redirects, and a re-send never meets a consumed body.

Real openai / httpx2 / azure-identity clients over TLS to loopback services: the local stack, plus two
recording services of this module (``origin`` and ``other``, two origins on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import http.server
import json
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
from tests._support.core import FakeClock, new_app_secret, rotate_to_secondary, user_messages
from tests._support.policies import FAST_REFRESH

AUDIENCE = "api://apimvault-gateway"
SCOPE = AUDIENCE + "/.default"
API = "/openai"
HEADER = "Ocp-Apim-Subscription-Key"
MESSAGES = user_messages("hello")
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


class PlainRecorder(http.server.ThreadingHTTPServer):
    """A plain-http loopback server recording each request (what a redirect to ``http://`` reaches)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                outer.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                data = json.dumps(COMPLETION).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def plain() -> Iterator[PlainRecorder]:
    server = PlainRecorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


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
            make_source: Any = BearerTokenSource if api == "sync" else AsyncBearerTokenSource
            source = make_source(self.credential, SCOPE)
        self.source = source
        extra: dict[str, Any] = {"http_client": http_client} if http_client is not None else {}
        if mode == "token":
            make: Any = create_token_azure_openai if api == "sync" else create_async_token_azure_openai
            self.client: Any = make(source, azure_endpoint=endpoint, max_retries=0, **extra)
        else:
            app = new_app_secret(azure)
            self.key = app.subscription.primary_key
            cls: Any = SubscriptionKeyProvider if api == "sync" else AsyncSubscriptionKeyProvider
            self.provider = cls(azure.vault_url, app.name, clock=FakeClock(), policy=FAST_REFRESH)
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
            return str(
                client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices[0].message.content
            )

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


# --------------------------------------------------- item 3: token refusals are bounded and classified


def _refusing_gateway(azure: LocalAzure) -> None:
    """The gateway validates tokens for another audience: it refuses every token the clients get."""
    azure.gateway.policies.set(API, {"validate_azure_ad_token": {"audiences": ["api://another-api"]}})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
def test_thirty_refused_tokens_make_one_token_refresh(
    gateway: LocalAzure, loop: asyncio.Runner, api: str, mode: str
) -> None:
    _refusing_gateway(gateway)
    if mode == "token":  # no subscription key needed: the token is all the gateway checks
        gateway.gateway.policies.set(
            API,
            {"validate_azure_ad_token": {"audiences": ["api://another-api"]}, "subscription_required": False},
        )
    credential: Any = DefaultAzureCredential() if api == "sync" else AsyncDefaultAzureCredential()
    clock = FakeClock()  # never moves: every refusal falls inside one min_refresh_interval
    cls: Any = BearerTokenSource if api == "sync" else AsyncBearerTokenSource
    source = cls(credential, SCOPE, clock=clock)
    rig = Rig(gateway, loop, api, mode, gateway.gateway_url, source=source)
    rig.credential = credential
    with pytest.raises(openai.AuthenticationError, match="IDX10214"):
        rig.chat()  # refused, one token refresh, re-sent once, refused again: the caller gets the 401
    first = refusal_stats(rig.owner)
    assert (first.token, first.token_refreshes, first.token_resends) == (1, 1, 1)
    identity_calls = gateway.identity.counters.total()
    failures = _thirty_calls(rig)
    assert failures == {"AuthenticationError": 30}
    refusals = refusal_stats(rig.owner)
    assert (refusals.token, refusals.token_refreshes, refusals.token_resends) == (31, 1, 1)
    assert source.refreshes == 1
    assert gateway.identity.counters.total() == identity_calls  # not one more token request
    if rig.provider is not None:
        stats = rig.provider.stats()
        assert refusals.key == 0 and stats.forced_refreshes == 0 and stats.resends_401 == 0
    # Past the interval a refused token may be refreshed again: the bound is per interval, not forever.
    clock.advance(source.min_refresh_interval)
    with pytest.raises(openai.AuthenticationError):
        rig.chat()
    assert refusal_stats(rig.owner).token_refreshes == 2 and source.refreshes == 2
    rig.close()


def _thirty_calls(rig: Rig) -> dict[str, int]:
    """30 concurrent chats; the count of each error type (all of them are expected to fail)."""
    errors: dict[str, int] = {}

    def note(exc: BaseException) -> None:
        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    if rig.api == "sync":

        def one(_: int) -> None:
            try:
                rig.chat()
            except Exception as exc:
                note(exc)

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(one, range(30)))
        return errors

    async def go() -> None:
        async def one() -> None:
            try:
                await rig.client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
            except Exception as exc:
                note(exc)

        await asyncio.gather(*[one() for _ in range(30)])

    rig.loop.run(go())
    return errors


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
def test_backend_401_with_a_bearer_challenge_is_not_a_token_refusal(
    azure: LocalAzure, fresh: tuple[Recorder, Recorder], loop: asyncio.Runner, api: str, mode: str
) -> None:
    origin, _ = fresh
    rig = Rig(azure, loop, api, mode, origin.url)
    assert rig.chat() == "seen"
    origin.seen.clear()
    challenge = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
    origin.answer = (401, BACKEND_401, challenge)  # Azure OpenAI's own 401, every time
    failures = _thirty_calls(rig)
    assert failures == {"AuthenticationError": 30}
    refusals = refusal_stats(rig.owner)
    assert (refusals.backend, refusals.token, refusals.token_refreshes, refusals.token_resends) == (
        30,
        0,
        0,
        0,
    )
    assert len(origin.seen) == 30  # no re-sends
    assert rig.source.refreshes == 0
    rig.close()


# ------------------------------------------------ item 6: SubscriptionKeyAuth used directly, redirects


def _redirect_client(api: str, azure: LocalAzure, auth: SubscriptionKeyAuth) -> Any:
    ctx = ssl.create_default_context(cafile=str(azure.ca_path))
    if api == "sync":
        return httpx2.Client(auth=auth, follow_redirects=True, verify=ctx)
    return httpx2.AsyncClient(auth=auth, follow_redirects=True, verify=ctx)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("api", APIS)
def test_public_auth_never_sends_the_key_across_a_cross_origin_redirect(
    azure: LocalAzure,
    fresh: tuple[Recorder, Recorder],
    plain: PlainRecorder,
    loop: asyncio.Runner,
    api: str,
    status: int,
) -> None:
    origin, other = fresh
    app = new_app_secret(azure)
    key = app.subscription.primary_key
    cls: Any = SubscriptionKeyProvider if api == "sync" else AsyncSubscriptionKeyProvider
    provider = cls(azure.vault_url, app.name, clock=FakeClock(), policy=FAST_REFRESH)
    http = _redirect_client(api, azure, SubscriptionKeyAuth(provider))  # no factory, no request hook
    url = f"{origin.url}/openai/chat"

    def post() -> httpx2.Response:
        async def apost() -> httpx2.Response:
            response: httpx2.Response = await http.post(url, json={"q": 1})
            return response

        return http.post(url, json={"q": 1}) if api == "sync" else loop.run(apost())

    for target in (f"{other.url}/landing", f"{plain.url}/plain", f"{origin.url}/moved"):
        origin.redirect = (status, target)
        response = post()
        assert response.status_code == 200 and len(response.history) == 1
    # The key went home (the first hops, and the same-origin redirect: the strip is about the origin) ...
    assert carrying(origin.seen, key) == ["/openai/chat", "/openai/chat", "/openai/chat", "/moved"]
    # ... and nowhere else: not to the other https origin, not to plain http.
    assert [p for p, _, _ in other.seen] == ["/landing"] and carrying(other.seen, key) == []
    assert [p for p, _, _ in plain.seen] == ["/plain"] and carrying(plain.seen, key) == []
    result = http.close() if api == "sync" else http.aclose()
    if asyncio.iscoroutine(result):
        loop.run(result)
    result = provider.close()
    if asyncio.iscoroutine(result):
        loop.run(result)


# -------------------------------------------- item 7 (token): a failed request's locals hold no token


def _reported(value: Any, depth: int = 0) -> str:
    """A value the way an error reporter records a local variable: containers walked, objects repr'd."""
    if depth > 4:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, dict):
        return " ".join(f"{_reported(k, depth + 1)}={_reported(v, depth + 1)}" for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return " ".join(_reported(v, depth + 1) for v in value)
    try:
        return repr(value)
    except Exception:
        return ""


def _frame_locals(exc: BaseException) -> str:
    """Every local of every library frame of ``exc`` and its chained causes, as a reporter records them."""
    texts: list[str] = []
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename != __file__:
                texts.extend(f"{name}={_reported(value)}" for name, value in tb.tb_frame.f_locals.items())
            tb = tb.tb_next
        pending += [error.__cause__, error.__context__]
    return "\n".join(texts)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
def test_failed_request_locals_hold_no_token(
    azure: LocalAzure, fresh: tuple[Recorder, Recorder], loop: asyncio.Runner, api: str, mode: str
) -> None:
    origin, _ = fresh
    rig = Rig(azure, loop, api, mode, origin.url)
    origin.answer = (500, {"error": {"code": "Boom", "message": "boom"}}, {})
    with pytest.raises(openai.InternalServerError) as info:
        rig.chat()
    [token] = bearer(origin.seen)  # the token was sent, and the request failed
    reported = _frame_locals(info.value)
    assert "options=" in reported  # openai's request frames (and their options) were walked
    assert token not in reported and token[:40] not in reported
    if rig.key is not None:
        assert rig.key not in reported
    rig.close()


# ---------------------------------------------------- item 12: a second event loop, key plus token


@pytest.mark.parametrize("mode", MODES)
def test_async_token_client_on_a_second_loop_is_a_configuration_error(
    azure: LocalAzure, fresh: tuple[Recorder, Recorder], mode: str
) -> None:
    origin, _ = fresh
    with asyncio.Runner() as first:
        rig = Rig(azure, first, "async", mode, origin.url)
        assert rig.chat() == "seen"
        with asyncio.Runner() as second, pytest.raises(ConfigurationError, match="event loop"):
            second.run(rig.client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES))
        assert rig.chat() == "seen"  # the first loop keeps working
        assert len(origin.seen) == 2
        rig.close()


# ------------------------------------------- item 17: a re-send never meets a consumed (generator) body


def _chunks() -> Iterator[bytes]:
    yield b'{"messages": [{"role": "user", '
    yield b'"content": "generated"}]}'


async def _achunks() -> AsyncIterator[bytes]:
    for chunk in _chunks():
        yield chunk


@pytest.mark.parametrize("api", APIS)
def test_key_401_resend_of_a_generator_body(gateway: LocalAzure, loop: asyncio.Runner, api: str) -> None:
    app = new_app_secret(gateway)
    cls: Any = SubscriptionKeyProvider if api == "sync" else AsyncSubscriptionKeyProvider
    provider = cls(gateway.vault_url, app.name, clock=FakeClock(), policy=FAST_REFRESH)
    http = _redirect_client(api, gateway, SubscriptionKeyAuth(provider))
    url = f"{gateway.gateway_url}{CHAT_PATH}?api-version=2024-02-01"

    async def apost() -> httpx2.Response:
        await provider.get_key()
        rotate_to_secondary(gateway, app)  # the held key is refused from now on
        response: httpx2.Response = await http.post(
            url, content=_achunks(), headers={"content-type": "application/json"}
        )
        return response

    if api == "sync":
        provider.get_key()
        rotate_to_secondary(gateway, app)
        response = http.post(url, content=_chunks(), headers={"content-type": "application/json"})
    else:
        response = loop.run(apost())
    assert response.status_code == 200  # was: httpx2.StreamConsumed on the re-send
    assert response.json()["choices"]
    assert provider.stats().resends_401 == 1 and refusal_stats(provider).key_resends == 1
    result = http.close() if api == "sync" else http.aclose()
    if asyncio.iscoroutine(result):
        loop.run(result)
    result = provider.close()
    if asyncio.iscoroutine(result):
        loop.run(result)


@pytest.mark.parametrize("api", APIS)
def test_token_401_resend_of_a_generator_body(
    azure: LocalAzure, fresh: tuple[Recorder, Recorder], loop: asyncio.Runner, api: str
) -> None:
    origin, _ = fresh
    ctx = ssl.create_default_context(cafile=str(azure.ca_path))
    http: Any = httpx2.Client(verify=ctx) if api == "sync" else httpx2.AsyncClient(verify=ctx)
    rig = Rig(azure, loop, api, "token", origin.url, http_client=http)  # its auth is now on `http`
    origin.answer, origin.times = (401, APIM_TOKEN_401, {}), 1  # the gateway refuses the first token once
    url = f"{origin.url}{CHAT_PATH}"
    if api == "sync":
        response = http.post(url, content=_chunks())
    else:

        async def apost() -> httpx2.Response:
            response: httpx2.Response = await http.post(url, content=_achunks())
            return response

        response = loop.run(apost())
    assert response.status_code == 200  # was: httpx2.StreamConsumed on the re-send
    bodies = [body for _, _, body in origin.seen]
    assert bodies == [b"".join(_chunks())] * 2  # sent, refused, re-sent whole
    first, second = bearer(origin.seen)
    assert first != second  # re-sent with a new token
    refusals = refusal_stats(rig.source)
    assert (refusals.token, refusals.token_refreshes, refusals.token_resends) == (1, 1, 1)
    rig.close()
