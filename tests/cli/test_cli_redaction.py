"""Issue 21, item 13: ``apimvault chat``, ``check`` and ``check --json`` never print a key or token the
process holds, even when the endpoint echoes the request's headers into its error body.

The endpoint here is a loopback HTTPS service (trusted through the stack's CA) that answers every request
with an Azure-OpenAI-shaped error whose message is the request's headers, key and bearer token included.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from apimvault.local import LocalAzure, ServerThread, Service
from tests._support.cli import assert_no_key, new_rotating_app, run_cli

SCOPE = "api://apimvault-gateway/.default"


class Echo(Service):
    """Answers ``status`` with the request headers as the error message (a misconfigured backend)."""

    name = "echo"

    def __init__(self) -> None:
        super().__init__()
        self.status = 400
        self.seen: list[dict[str, str]] = []

    def build_app(self) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            request = Request(scope, receive)
            await request.body()
            headers = dict(request.headers)
            self.seen.append(headers)
            message = f"bad request; you sent headers {json.dumps(headers)}"
            response = JSONResponse({"error": {"code": "Echo", "message": message}}, self.status)
            await response(scope, receive, send)

        return app


@pytest.fixture(scope="module")
def echo(local_azure: LocalAzure) -> Iterator[Echo]:
    service = Echo()
    thread = ServerThread([service], local_azure.ca)
    thread.start()
    try:
        yield service
    finally:
        thread.stop()


def _bearer(echo: Echo) -> str:
    [token] = [h["authorization"].removeprefix("Bearer ") for h in echo.seen if "authorization" in h]
    return token


CASES = [  # (argv, with a token: check's APIMVAULT_TOKEN_SCOPE; chat has no token mode)
    (["chat", "hi"], False),
    (["chat", "--json", "hi"], False),
    (["check"], False),
    (["check", "--json"], False),
    (["check"], True),
    (["check", "--json"], True),
]


@pytest.mark.parametrize(
    ("argv", "with_token"), CASES, ids=[" ".join(a) + (" +token" if t else "") for a, t in CASES]
)
def test_cli_output_never_carries_an_echoed_key_or_token(
    azure: LocalAzure, echo: Echo, argv: list[str], with_token: bool
) -> None:
    echo.seen.clear()
    app = new_rotating_app(azure)
    env = {**app.env(), "AZURE_OPENAI_ENDPOINT": echo.url}
    if with_token:
        env["APIMVAULT_TOKEN_SCOPE"] = SCOPE
    run = run_cli(argv, env)
    text = run.out + run.err
    assert run.code != 0  # the echo refused the request ...
    assert [h["ocp-apim-subscription-key"] for h in echo.seen] == [app.keys()[0]]  # ... with the key
    assert "you sent headers" in text  # its error message was printed ...
    assert "<redacted:" in text  # ... with the key (and token) masked
    assert_no_key(text, app.seen_keys)
    if with_token:
        token = _bearer(echo)
        assert token not in text and token[:40] not in text and "eyJ" not in text
    if "--json" in argv:
        json.loads(run.out)  # still one valid document
