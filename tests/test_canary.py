"""Key-leak canary: a known key through every core flow and every CLI command with DEBUG logging on for
apimvault, openai, httpx2, httpcore2 and azure; all logs, stdout/stderr, exception messages/reprs/tracebacks
and the str()/repr() of every public object are scanned for the key and every >= 8-character piece of it.
Expected: 0. Plus redirects: a cross-origin 3xx never carries the key, a same-origin one does.

The same scan over the whole suite: ``pytest -p tests._support.canary --canary``
(see tests/_support/canary.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from apimvault import (
    PLACEHOLDER_API_KEY,
    AsyncSubscriptionKeyProvider,
    CachePolicy,
    KeyEvent,
    LiveHeaders,
    SubscriptionKeyAuth,
    SubscriptionKeyProvider,
    create_async_azure_openai,
    create_azure_openai,
    install_log_redaction,
    parse_secret_events,
    refresh_from_event,
)
from apimvault.local import DEPLOYMENT, LocalAzure, ServerThread, Service
from tests._support.canary import (
    CANARY_PRIMARY,
    CANARY_SECONDARY,
    CanaryApp,
    LeakCapture,
    exception_texts,
    find_leaks,
    seed_canary_app,
)
from tests._support.core import FakeClock, user_messages

HEADER = "Ocp-Apim-Subscription-Key"
MESSAGES = user_messages("canary")
# Its own numbers (not a tests._support.policies preset): FAST_REFRESH's, plus a 600 s staleness bound.
POLICY = CachePolicy(ttl=300, jitter=0, refresh_margin=60, max_staleness=600, forced_refresh_interval=5)


class Texts:
    """Everything to scan, by source name."""

    def __init__(self) -> None:
        self.items: dict[str, str] = {}

    def add(self, source: str, value: object) -> None:
        self.items[f"{source} str"] = str(value)
        self.items[f"{source} repr"] = repr(value)

    def exc(self, source: str, error: BaseException) -> None:
        for i, text in enumerate(exception_texts(error)):
            self.items[f"{source} exception[{i}]"] = text


def _event_payload(azure: LocalAzure, name: str, version: str) -> list[dict[str, Any]]:
    return [
        {
            "id": "1",
            "subject": name,
            "eventType": "Microsoft.KeyVault.SecretNewVersionCreated",
            "data": {
                "Id": f"{azure.vault_url}/secrets/{name}/{version}",
                "VaultName": "x",
                "ObjectName": name,
                "Version": version,
            },
        }
    ]


def _rotate_vault_to_secondary(azure: LocalAzure, app: CanaryApp) -> str:
    return azure.keyvault.put_secret(app.name, CANARY_SECONDARY, tags={"CredentialId": "secondary"}).version


# ---------------------------------------------------------------------------------------- core flows


def test_sync_core_flows_never_leak_the_key(azure: LocalAzure, capsys: pytest.CaptureFixture[str]) -> None:
    app = seed_canary_app(azure, "sync")
    texts = Texts()
    events: list[KeyEvent] = []
    with LeakCapture() as capture:
        provider = SubscriptionKeyProvider(
            azure.vault_url,
            app.name,
            clock=FakeClock(),
            policy=POLICY,
            on_refresh=events.append,
            on_error=events.append,
            on_rotate=events.append,
        )
        client = create_azure_openai(provider, max_retries=0)
        assert provider.get() == CANARY_PRIMARY
        client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        assert list(client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True))
        client.embeddings.create(model="text-embedding-3-small", input="canary")
        # Rotation with the old key revoked in flight: 401 -> one refresh -> re-send.
        version = _rotate_vault_to_secondary(azure, app)
        azure.apim_state.regenerate(app.sid, "primary")
        client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        assert provider.get() == CANARY_SECONDARY and provider.stats().resends_401 == 1
        # Push refresh from an event, invalidate, a bad new version (refused), a revoked key (401 surfaces).
        refresh_from_event(_event_payload(azure, app.name, version), [provider])
        texts.add("SecretEvent", parse_secret_events(_event_payload(azure, app.name, version))[0])
        provider.invalidate()
        provider.get_key()  # starts a background refresh of the (still good) latest version
        provider.refresh()  # waits for it, so the bad version below is read by a refresh of its own
        azure.keyvault.put_secret(app.name, "not a\nkey")
        with pytest.raises(Exception) as bad:
            provider.refresh()
        texts.exc("refresh of a bad value", bad.value)
        azure.keyvault.put_secret(app.name, CANARY_SECONDARY)
        provider.refresh()
        azure.apim_state.regenerate(app.sid, "secondary")  # now no valid key anywhere
        with pytest.raises(Exception) as denied:
            client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        texts.exc("AuthenticationError", denied.value)
        # Every public object.
        texts.add("provider", provider)
        texts.add("key", provider.get_key())
        texts.add("stats", provider.stats())
        texts.add("auth", SubscriptionKeyAuth(provider))
        texts.add("LiveHeaders", LiveHeaders(provider, HEADER, {"X-Trace": "1"}))
        texts.add("client", client)
        texts.add("client.with_options", client.with_options(timeout=5))
        texts.add("redaction filter", install_log_redaction())
        for i, event in enumerate(events):
            texts.add(f"event[{i}]", event)
        provider.close()
        client.close()
    out = capsys.readouterr()
    texts.items["stdout"], texts.items["stderr"] = out.out, out.err
    texts.items["logs"] = capture.text()
    keys = app.keys()
    assert capture.records > 50, "DEBUG logging was not really on"
    assert len(events) >= 4
    leaks = find_leaks(texts.items, keys)
    assert leaks == [], "\n".join(map(str, leaks))


async def test_async_core_flows_never_leak_the_key(
    azure: LocalAzure, capsys: pytest.CaptureFixture[str]
) -> None:
    app = seed_canary_app(azure, "async")
    texts = Texts()
    events: list[KeyEvent] = []
    with LeakCapture() as capture:
        provider = AsyncSubscriptionKeyProvider(
            azure.vault_url, app.name, clock=FakeClock(), policy=POLICY, on_refresh=events.append
        )
        client = create_async_azure_openai(provider, max_retries=0)
        await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        stream = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
        assert [c async for c in stream]
        _rotate_vault_to_secondary(azure, app)
        azure.apim_state.regenerate(app.sid, "primary")
        results = await asyncio.gather(
            *(client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES) for _ in range(8))
        )
        assert len(results) == 8 and await provider.get() == CANARY_SECONDARY
        azure.apim_state.regenerate(app.sid, "secondary")
        with pytest.raises(Exception) as denied:  # a revoked key must not be accepted
            await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        texts.exc("AuthenticationError", denied.value)
        texts.add("provider", provider)
        texts.add("key", await provider.get_key())
        texts.add("stats", provider.stats())
        texts.add("auth", SubscriptionKeyAuth(provider))
        texts.add("client", client)
        for i, event in enumerate(events):
            texts.add(f"event[{i}]", event)
        await client.close()
        await provider.close()
    out = capsys.readouterr()
    texts.items["stdout"], texts.items["stderr"] = out.out, out.err
    texts.items["logs"] = capture.text()
    assert capture.records > 50
    leaks = find_leaks(texts.items, app.keys())
    assert leaks == [], "\n".join(map(str, leaks))


def test_openai_default_headers_never_hold_the_key(azure: LocalAzure) -> None:
    """openai's ``client.default_headers`` (a plain dict it builds on each access, frozen into copies)
    never holds the key: only the auth on the client's transport sets it at send time."""
    app = seed_canary_app(azure, "headers")
    with SubscriptionKeyProvider(azure.vault_url, app.name, clock=FakeClock(), policy=POLICY) as provider:
        client = create_azure_openai(provider)
        provider.get_key()
        assert find_leaks({"default_headers": repr(client.default_headers)}, [CANARY_PRIMARY]) == []
        assert find_leaks({"client": repr(client)}, [CANARY_PRIMARY]) == []
        client.close()


# ----------------------------------------------------------------------------------------------- CLI


def test_every_cli_command_never_leaks_the_key(azure: LocalAzure) -> None:
    pytest.importorskip("apimvault.cli")
    from tests._support.cli import run_cli

    app = seed_canary_app(azure, "cli")
    texts = Texts()
    keys: set[str] = set(app.keys())
    commands = [
        ["check"],
        ["check", "--json"],
        ["-v", "check"],
        ["chat", "hello canary"],
        ["chat", "--json", "hello canary"],
        ["rotate", "--json"],
        ["-v", "rotate"],
        ["drill", "--json", "--duration", "1", "--concurrency", "4", "--clients", "2"],
        ["check", "--help"],
    ]
    with LeakCapture() as capture:
        for argv in commands:
            try:
                run = run_cli(argv, app.env())
            except SystemExit as exc:  # --help
                texts.add(f"{argv} exit", exc)
                continue
            texts.items[f"{argv} stdout"] = run.out
            texts.items[f"{argv} stderr"] = run.err
            keys |= app.keys()
            if (
                argv[0] != "drill" and argv[-1] != "--help"
            ):  # a short drill may fail requests: not our concern
                assert run.code == 0, (argv, run.out, run.err)
        # Failure paths print errors: a revoked key (chat fails) and a refused value (check fails).
        azure.apim_state.regenerate(app.sid, "primary")
        azure.apim_state.regenerate(app.sid, "secondary")
        keys |= app.keys()
        failing = run_cli(["chat", "--retries", "0", "hello"], app.env())
        assert failing.code != 0
        texts.items["failing chat"] = failing.out + failing.err
        azure.keyvault.put_secret(app.name, f"{CANARY_PRIMARY}\x00")
        bad = run_cli(["check", "--json"], app.env())
        assert bad.code != 0
        texts.items["check of a NUL value"] = bad.out + bad.err
    texts.items["logs"] = capture.text()
    assert capture.records > 20
    leaks = find_leaks(texts.items, keys)
    assert leaks == [], "\n".join(map(str, leaks))


# ------------------------------------------------------------------------------------------ redirects

COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "gpt-4o-mini",
    "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "redirected"}}
    ],
}


class Recorder(Service):
    """A loopback HTTPS service that records each request's headers; ``/openai/...`` may redirect."""

    name = "redirector"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.redirect: tuple[int, str] | None = None
        self.lock = threading.Lock()

    def build_app(self) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            request = Request(scope, receive)
            await request.body()
            with self.lock:
                self.seen.append((request.method, request.url.path, dict(request.headers)))
            response: Response
            if request.url.path.startswith("/openai/") and self.redirect is not None:
                status, location = self.redirect
                response = RedirectResponse(location, status_code=status)
            else:
                response = JSONResponse(COMPLETION)
            await response(scope, receive, send)

        return app


@pytest.fixture(scope="module")
def redirect_servers(local_azure: LocalAzure) -> Iterator[tuple[Recorder, Recorder]]:
    origin, other = Recorder(), Recorder()
    thread = ServerThread([origin, other], local_azure.ca)
    thread.start()
    try:
        yield origin, other
    finally:
        thread.stop()


def _headers_at(server: Recorder, path_prefix: str) -> list[dict[str, str]]:
    return [h for _, p, h in server.seen if p.startswith(path_prefix)]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("api", ["sync", "async"])
def test_redirects_keep_the_key_same_origin_only(
    azure: LocalAzure, redirect_servers: tuple[Recorder, Recorder], api: str, status: int
) -> None:
    origin, other = redirect_servers
    app = seed_canary_app(azure, f"redirect-{api}-{status}")
    results: dict[str, dict[str, str]] = {}
    for target in ("same", "cross"):
        origin.seen.clear()
        other.seen.clear()
        base = origin.url if target == "same" else other.url
        origin.redirect = (status, f"{base}/final/{target}")
        if api == "sync":
            with SubscriptionKeyProvider(azure.vault_url, app.name, clock=FakeClock(), policy=POLICY) as p:
                client = create_azure_openai(p, azure_endpoint=origin.url, max_retries=0)
                reply = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
                client.close()
        else:

            async def go() -> Any:
                async with AsyncSubscriptionKeyProvider(
                    azure.vault_url, app.name, clock=FakeClock(), policy=POLICY
                ) as p:
                    client = create_async_azure_openai(p, azure_endpoint=origin.url, max_retries=0)
                    try:
                        return await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
                    finally:
                        await client.close()

            reply = asyncio.run(go())
        assert reply.choices[0].message.content == "redirected"
        first = _headers_at(origin, "/openai/")
        assert len(first) == 1 and first[0][HEADER.lower()] == CANARY_PRIMARY  # the original request has it
        landed = _headers_at(origin if target == "same" else other, "/final/")
        assert len(landed) == 1, f"redirect {status} to {target} origin was not followed"
        results[target] = landed[0]
    assert results["same"].get(HEADER.lower()) == CANARY_PRIMARY, "same-origin redirect lost the key"
    assert HEADER.lower() not in results["cross"], "cross-origin redirect carried the key"
    assert results["cross"].get("api-key") != PLACEHOLDER_API_KEY
    leaks = find_leaks({"cross-origin request": json.dumps(results["cross"])}, [CANARY_PRIMARY])
    assert leaks == []


def test_cross_origin_redirect_in_api_key_mode_drops_the_key(
    azure: LocalAzure, redirect_servers: tuple[Recorder, Recorder]
) -> None:
    """With ``header_name="api-key"`` the key takes openai's own api_key path; still never cross-origin."""
    origin, other = redirect_servers
    app = seed_canary_app(azure, "redirect-api-key")
    origin.seen.clear()
    other.seen.clear()
    origin.redirect = (307, f"{other.url}/final/cross")
    with SubscriptionKeyProvider(
        azure.vault_url, app.name, clock=FakeClock(), policy=POLICY, header_name="api-key"
    ) as p:
        client = create_azure_openai(p, azure_endpoint=origin.url, max_retries=0)
        client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        client.close()
    assert _headers_at(origin, "/openai/")[0]["api-key"] == CANARY_PRIMARY
    landed = _headers_at(other, "/final/")
    assert len(landed) == 1
    assert find_leaks({"cross-origin request": json.dumps(landed[0])}, [CANARY_PRIMARY]) == []


def test_capture_sees_debug_records() -> None:
    """The capture itself works: a DEBUG record on a library logger is collected (so 0 leaks means 0)."""
    with LeakCapture() as capture:
        logging.getLogger("httpcore2.test").debug("probe %s", CANARY_PRIMARY[:8])
    assert find_leaks({"logs": capture.text()}, [CANARY_PRIMARY])


def test_redaction_filter_survives_reentry_from_a_finalizer() -> None:
    """A private filter and logger: if the bug bites, only this probe's daemon thread stays stuck."""
    from apimvault import KeyRedactionFilter

    class Watched:
        def _redaction_values(self) -> list[str]:
            return [CANARY_PRIMARY]

        def current(self) -> None:
            return None

    private = KeyRedactionFilter()
    logger = logging.getLogger("apimvault-test.reentrancy-probe")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addFilter(private)
    watched = Watched()
    private.watch(watched)

    class Finalizer:
        """In a reference cycle, so cyclic GC (which may run anywhere) finalizes it; logs like httpcore2."""

        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            logger.debug("close.started %s", "connection")

    def churn() -> None:
        for i in range(50_000):
            Finalizer()
            logger.debug("tick %d", i)

    worker = threading.Thread(target=churn, daemon=True, name="redaction-reentrancy-probe")
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the redaction filter deadlocked on re-entry"
