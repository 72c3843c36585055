"""The guard around the key in openai clients (issue 10, items 2-4), attacked through openai's public API.

* A copy of a factory-made client given another ``http_client`` (``with_options`` / ``copy``) has no
  auth and no redirect hook: it must carry no key at all — not to the origin, not across a 307, not over
  ``http://`` — in ``Ocp-Apim-Subscription-Key`` mode and in ``api-key`` mode, sync and async.
* A copy that keeps the guarded transport but points ``base_url`` elsewhere gets no key either.
* A caller-supplied ``http_client`` that does not verify TLS is refused before anything is sent.
* Nothing a reporter walks (``vars(provider)``, ``vars(client)``, ``default_headers``) holds the key as text.
"""

from __future__ import annotations

import asyncio
import http.server
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import openai
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from apimvault import (
    PLACEHOLDER_API_KEY,
    AsyncSubscriptionKeyProvider,
    InsecureTransportError,
    InvalidSecretValueError,
    SubscriptionKey,
    SubscriptionKeyProvider,
    create_async_azure_openai,
    create_azure_openai,
)
from apimvault.local import DEPLOYMENT, LocalAzure, ServerThread, Service
from tests._support.core import FakeClock, new_app_secret, rotate_to_secondary, user_messages
from tests._support.policies import FAST_REFRESH

HEADER = "Ocp-Apim-Subscription-Key"
CHAT_PATH = f"/openai/deployments/{DEPLOYMENT}/chat/completions"
MESSAGES = user_messages("hello")
COMPLETION = {
    "id": "chatcmpl-guard",
    "object": "chat.completion",
    "created": 0,
    "model": DEPLOYMENT,
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "seen"}}],
}


class Recorder(Service):
    """A loopback HTTPS service recording every request's headers; ``/openai/...`` may redirect."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.redirect: str | None = None
        self.status = 200
        self.lock = threading.Lock()

    def build_app(self) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            request = Request(scope, receive)
            await request.body()
            with self.lock:
                self.seen.append((request.url.path, dict(request.headers)))
            response: Response
            if request.url.path.startswith("/openai/") and self.redirect is not None:
                response = RedirectResponse(self.redirect, status_code=307)
            elif self.status != 200:
                response = JSONResponse({"error": {"code": "Boom", "message": "boom"}}, self.status)
            else:
                response = JSONResponse(COMPLETION)
            await response(scope, receive, send)

        return app


class PlainRecorder(http.server.ThreadingHTTPServer):
    """A plain-http loopback server recording request headers (what an ``http://`` base_url reaches)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                outer.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                body = JSONResponse(COMPLETION).body
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


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
def fresh(recorders: tuple[Recorder, Recorder]) -> tuple[Recorder, Recorder]:
    for recorder in recorders:
        recorder.seen.clear()
        recorder.redirect = None
        recorder.status = 200
    return recorders


def carrying(seen: list[tuple[str, dict[str, str]]], key: str) -> list[str]:
    """Paths of recorded requests with the key (or any 8-character piece of it) in any header."""
    pieces = {key[i : i + 8] for i in range(len(key) - 7)}
    return [path for path, headers in seen if any(p in v for v in headers.values() for p in pieces)]


@pytest.fixture
def loop() -> Iterator[asyncio.Runner]:
    """One event loop for a whole test (async providers and clients belong to one loop)."""
    with asyncio.Runner() as runner:
        yield runner


def chat(client: Any, loop: asyncio.Runner) -> str:
    """One chat completion through ``client`` (sync or async), returning the reply text."""
    if isinstance(client, openai.AzureOpenAI):
        return (
            client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices[0].message.content
            or ""
        )

    async def go() -> str:
        reply = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        content: str | None = reply.choices[0].message.content
        return content or ""

    return loop.run(go())


def make_client(api: str, provider: Any, **kwargs: Any) -> Any:
    factory = create_azure_openai if api == "sync" else create_async_azure_openai
    return factory(provider, max_retries=0, **kwargs)


def new_http_client(api: str) -> Any:
    return openai.DefaultHttpxClient() if api == "sync" else openai.DefaultAsyncHttpxClient()


def provider_for(api: str, azure: LocalAzure, name: str, **kwargs: Any) -> Any:
    cls = SubscriptionKeyProvider if api == "sync" else AsyncSubscriptionKeyProvider
    return cls(azure.vault_url, name, clock=FakeClock(), policy=FAST_REFRESH, **kwargs)


def close(loop: asyncio.Runner, *things: Any) -> None:
    for thing in things:
        result = thing.aclose() if isinstance(thing, httpx2.AsyncClient) else thing.close()
        if asyncio.iscoroutine(result):
            loop.run(result)


# ------------------------------------------------------------------------ item 2: copies lose the guard


@pytest.mark.parametrize("header", [HEADER, "api-key"])
@pytest.mark.parametrize("how", ["with_options", "copy"])
@pytest.mark.parametrize("api", ["sync", "async"])
def test_copy_with_another_http_client_carries_no_key(
    azure: LocalAzure, fresh: tuple[Recorder, Recorder], loop: asyncio.Runner, api: str, how: str, header: str
) -> None:
    origin, other = fresh
    app = new_app_secret(azure)
    key = app.subscription.primary_key
    provider = provider_for(api, azure, app.name, header_name=header)
    client = make_client(api, provider, azure_endpoint=origin.url)
    origin.redirect = f"{other.url}/final/cross"
    assert chat(client, loop) == "seen"  # the guarded client: key to the origin, not across the 307
    assert carrying(origin.seen, key) == [CHAT_PATH]
    assert carrying(other.seen, key) == []
    origin.seen.clear()
    other.seen.clear()

    unguarded = getattr(client, how)(http_client=new_http_client(api))  # no auth, no redirect hook
    assert chat(unguarded, loop) == "seen"  # it did reach the origin and followed the 307 ...
    assert [p for p, _ in origin.seen] == [CHAT_PATH]
    assert [p for p, _ in other.seen] == ["/final/cross"]
    assert carrying(origin.seen + other.seen, key) == []  # ... without the key
    assert all(h.get(header.lower()) in (None, PLACEHOLDER_API_KEY) for _, h in origin.seen + other.seen)
    close(loop, unguarded, client, provider)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_copy_to_plain_http_carries_no_key(
    azure: LocalAzure, plain: PlainRecorder, loop: asyncio.Runner, api: str
) -> None:
    app = new_app_secret(azure)
    key = app.subscription.primary_key
    provider = provider_for(api, azure, app.name)
    client = make_client(api, provider)
    assert chat(client, loop)  # the key is cached and in use
    unguarded = client.with_options(http_client=new_http_client(api), base_url=f"{plain.url}/openai")
    assert chat(unguarded, loop) == "seen"
    assert len(plain.seen) == 1 and carrying(plain.seen, key) == []
    # The guarded transport with an http:// base_url refuses before sending anything.
    guarded = client.with_options(base_url=f"{plain.url}/openai")
    with pytest.raises(InsecureTransportError, match="not https"):
        chat(guarded, loop)
    assert len(plain.seen) == 1
    close(loop, unguarded, client, provider)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_copy_with_base_url_elsewhere_keeps_the_key_home(
    azure: LocalAzure, fresh: tuple[Recorder, Recorder], loop: asyncio.Runner, api: str
) -> None:
    origin, other = fresh
    app = new_app_secret(azure)
    key = app.subscription.primary_key
    provider = provider_for(api, azure, app.name)
    client = make_client(api, provider, azure_endpoint=origin.url)
    assert chat(client, loop) == "seen"
    elsewhere = client.with_options(base_url=f"{other.url}/openai")  # same guarded transport
    with pytest.raises(InsecureTransportError, match="this client was made for") as info:
        chat(elsewhere, loop)
    assert key not in str(info.value)
    assert other.seen == []
    close(loop, client, provider)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_unguarded_copy_against_the_gateway_fails_closed(
    azure: LocalAzure, loop: asyncio.Runner, api: str
) -> None:
    """On the local APIM: the copy is refused with 401 (no key sent); guarded copies keep working."""
    app = new_app_secret(azure)
    provider = provider_for(api, azure, app.name)
    client = make_client(api, provider)
    assert chat(client, loop)
    assert chat(client.copy(), loop) and chat(client.with_options(default_headers={"X-Trace": "1"}), loop)
    unguarded = client.with_options(http_client=new_http_client(api))
    with pytest.raises(openai.AuthenticationError, match="missing subscription key"):
        chat(unguarded, loop)
    labels = azure.gateway.counters.labels()
    assert labels[f"sub:{app.sid}:primary"] == 3
    assert labels["key:missing"] == 1
    assert provider.stats().resends_401 == 0
    close(loop, unguarded, client, provider)


# ------------------------------------------------------------------- item 3: TLS verification switched off


def _unverified_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _no_hostname_check(azure: LocalAzure) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(azure.ca_path))
    ctx.check_hostname = False  # certificates still verified, but for any host name
    return ctx


def _http(
    api: str, *, verify: ssl.SSLContext | bool = True, unverified_mount: bool = False
) -> httpx2.Client | httpx2.AsyncClient:
    """A sync or async client; ``unverified_mount`` routes https:// through a non-verifying transport."""
    if api == "sync":
        mounts = {"https://": httpx2.HTTPTransport(verify=False)} if unverified_mount else None
        return httpx2.Client(verify=verify, mounts=mounts)
    amounts = {"https://": httpx2.AsyncHTTPTransport(verify=False)} if unverified_mount else None
    return httpx2.AsyncClient(verify=verify, mounts=amounts)


INSECURE: dict[str, Callable[[LocalAzure, str], httpx2.Client | httpx2.AsyncClient]] = {
    "verify=False": lambda azure, api: _http(api, verify=False),
    "CERT_NONE context": lambda azure, api: _http(api, verify=_unverified_context()),
    "check_hostname=False": lambda azure, api: _http(api, verify=_no_hostname_check(azure)),
    "unverified mount": lambda azure, api: _http(api, unverified_mount=True),
}


@pytest.mark.parametrize("variant", list(INSECURE))
@pytest.mark.parametrize("api", ["sync", "async"])
def test_http_client_without_tls_verification_is_refused(
    azure: LocalAzure, loop: asyncio.Runner, api: str, variant: str
) -> None:
    app = new_app_secret(azure)
    provider = provider_for(api, azure, app.name)
    http = INSECURE[variant](azure, api)
    with pytest.raises(InsecureTransportError, match="TLS"):
        make_client(api, provider, http_client=http)
    assert http.auth is None  # nothing installed on a refused client
    assert provider.stats().vault_reads == 0  # the key was not even read
    assert azure.gateway.counters.total() == 0
    close(loop, http, provider)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_http_client_trusting_a_private_ca_is_accepted(
    azure: LocalAzure, loop: asyncio.Runner, api: str
) -> None:
    app = new_app_secret(azure)
    provider = provider_for(api, azure, app.name)
    ctx = ssl.create_default_context(cafile=str(azure.ca_path))
    http = httpx2.Client(verify=ctx) if api == "sync" else httpx2.AsyncClient(verify=ctx)
    client = make_client(api, provider, http_client=http)
    assert chat(client, loop)
    assert azure.gateway.counters.labels()[f"sub:{app.sid}:primary"] == 1
    close(loop, client, provider)


# ------------------------------------------------------------------ item 4: the key in walked objects


def _texts(obj: Any) -> str:
    """What an error reporter records of an object: the repr of each attribute."""
    return "\n".join(f"{name}={value!r}" for name, value in vars(obj).items())


@pytest.mark.parametrize("header", [HEADER, "api-key"])
@pytest.mark.parametrize("api", ["sync", "async"])
def test_key_is_not_text_in_provider_or_client_attributes(
    azure: LocalAzure, loop: asyncio.Runner, api: str, header: str
) -> None:
    app = new_app_secret(azure)
    provider = provider_for(api, azure, app.name, header_name=header)
    client = make_client(api, provider, azure_endpoint=azure.gateway_url)
    old = app.subscription.primary_key
    if api == "sync":
        provider.get_key()
        rotate_to_secondary(azure, app)
        new = provider.refresh().reveal()
    else:

        async def go() -> str:
            await provider.get_key()
            rotate_to_secondary(azure, app)
            key: SubscriptionKey = await provider.refresh()
            return key.reveal()

        new = loop.run(go())
    assert new != old
    assert sorted(provider._redaction_values()) == sorted([new, old])  # the log filter still knows both
    walked = "\n".join(
        [_texts(provider), _texts(client), repr(client.default_headers), repr(client.api_key), repr(client)]
    )
    for key in (old, new):
        assert key not in walked
    assert client.api_key == PLACEHOLDER_API_KEY
    assert header not in client.default_headers and header.lower() not in client.default_headers
    close(loop, client, provider)


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
    except Exception:  # a reporter skips what it cannot show
        return ""


def _frame_locals(exc: BaseException) -> str:
    """Every local variable of every library frame of ``exc`` and its chained causes (this test module's own
    frames hold the key on purpose), as a reporter records them."""
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


@pytest.mark.parametrize("header", [HEADER, "api-key"])
@pytest.mark.parametrize("api", ["sync", "async"])
def test_error_reporter_locals_never_hold_the_key(
    azure: LocalAzure, fresh: tuple[Recorder, Recorder], loop: asyncio.Runner, api: str, header: str
) -> None:
    """A failed request's traceback (what Sentry & co. record with local variables) shows no key."""
    origin, _ = fresh
    app = new_app_secret(azure)
    key = app.subscription.primary_key
    provider = provider_for(api, azure, app.name, header_name=header)
    client = make_client(api, provider, azure_endpoint=origin.url)
    origin.status = 500
    with pytest.raises(openai.InternalServerError) as info:
        chat(client, loop)
    assert carrying(origin.seen, key) == [CHAT_PATH]  # the key was sent, and the request failed
    reported = _frame_locals(info.value)
    assert "options=" in reported  # openai's request frames were walked
    assert carrying([("locals", {"all": reported})], key) == []
    close(loop, client, provider)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_refused_value_is_not_in_the_callers_traceback_locals(
    azure: LocalAzure, loop: asyncio.Runner, api: str
) -> None:
    """A vault value that is the key plus a control character is refused; the error a caller (and its
    reporter) gets carries neither the value nor frames that hold it."""
    probe = new_app_secret(azure)
    key = probe.subscription.primary_key
    app = new_app_secret(azure, value=key + "\x01")
    provider = provider_for(api, azure, app.name)
    with pytest.raises(InvalidSecretValueError) as info:
        if api == "sync":
            provider.get_key()
        else:
            loop.run(provider.get_key())
    assert key not in str(info.value)
    assert carrying([("locals", {"all": _frame_locals(info.value)})], key) == []
    close(loop, provider)
