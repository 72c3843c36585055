"""A local Azure OpenAI data plane: chat completions (plain and SSE), embeddings, and the ``/openai/v1`` API.

Only the APIM gateway reaches it in a normal stack: the gateway replaces the caller's ``api-key`` with the
backend's own key (as an APIM backend credential would), and the backend answers any other caller with Azure
OpenAI's 401 body, which carries no APIM ``WWW-Authenticate`` challenge.

Wire shapes follow ``openai/openai-python`` 3.x (``src/openai/lib/azure.py``, ``_streaming.py``; Azure's
streaming sequence with a first ``choices: []`` chunk carrying ``prompt_filter_results``, a role chunk,
content chunks, a finish chunk, an optional usage chunk and ``data: [DONE]``). Replies are deterministic:
a digest of the last user message.

Measured against Microsoft's specs (``tests/local/data/specs/``, ``tests/local/test_conformance_openai.py``):

* **api-version.** The deployment routes need one the service knows (:func:`api_version_supported`); an
  unknown one gets real Azure OpenAI's 400 ``{"error":{"code":"BadRequest","message":"API version not
  supported"}}`` (as quoted in hotovo/aider-desk#460). ``/openai/v1/*`` takes none, or ``v1`` /
  ``preview`` (the spec's ``AzureAIFoundryModelsApiVersion``); ``/openai/responses`` (pre-v1) needs a
  preview version from ``2025-03-01-preview`` on, as Azure's Responses API did.
* **apim-request-id** (the spec's response header for every operation, success and error, streamed too)
  is on every answer.
* **Tools and structured outputs**: ``tools`` + ``tool_choice`` give ``tool_calls`` (``finish_reason``
  ``tool_calls``; streamed as deltas; one call per tool when ``parallel_tool_calls`` is not false), with
  ``arguments`` generated from each function's JSON schema; ``response_format`` ``json_schema`` /
  ``json_object`` give JSON content matching it. The rule for ``auto`` and the generator are in
  :mod:`apimvault.local._oai_shapes`; everything derives from the schema and the last user text, so the
  same request always gets the same answer.
* **Responses API** (``/openai/v1/responses``, ``/openai/responses``): :mod:`apimvault.local.responses`.

The app is a plain ASGI callable (no router) because it sits on the gateway's hot path.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import json
import re
import secrets
import struct
import threading
import time
import uuid
from typing import Any, Literal, NamedTuple

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import _oai_shapes as shapes
from ._chat_shapes import (
    chat_completion,
    chat_stream_events,
    chat_usage,
    count_tokens,
    reply_pieces,
    split_json,
    sse,
    text_of,
)
from ._chat_shapes import (
    embedding_for as embedding_for,
)
from ._chat_shapes import (
    reply_for as reply_for,
)
from ._faults import Faults, take_matching
from ._server import Service, json_response
from .responses import ResponsesApi, ResponsesError, sse_event

CHAT_DEPLOYMENTS: dict[str, str] = {"gpt-4o-mini": "gpt-4o-mini-2024-07-18"}
"""Chat deployments of the local resource: deployment name -> model version reported in responses."""
EMBEDDING_DEPLOYMENTS: dict[str, int] = {"text-embedding-3-small": 1536}
"""Embedding deployments: deployment name -> default vector dimensions."""
MAX_BODY_BYTES = 4 * 1024 * 1024

# Azure OpenAI behind APIM, "Errors" (an azure-sdk-for-js recording).
INVALID_KEY_MESSAGE = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
    "for an active subscription and use a correct regional API endpoint for your resource."
)
DEPLOYMENT_NOT_FOUND_MESSAGE = "The API deployment for this resource does not exist."
MISSING_API_VERSION_MESSAGE = (
    "Missing required query parameter 'api-version'. Supported versions are listed "
    "at https://aka.ms/oai/docs/api-lifecycle."
)
# OpenAI's own message for an unparsable body (Azure OpenAI relays the OpenAI-style error object).
BAD_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
    "library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
)

_DEPLOYMENT_PATH = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|embeddings)/?$")

# GA data-plane versions of the inference spec (azure-rest-api-specs
# specification/cognitiveservices/data-plane/AzureOpenAI/inference/stable/*). Preview versions are many and
# monthly: any ``YYYY-MM-DD-preview`` from the first (2022-03-01-preview) up to today is taken as known.
STABLE_API_VERSIONS = frozenset({"2022-12-01", "2023-05-15", "2024-02-01", "2024-06-01", "2024-10-21"})
V1_API_VERSIONS = frozenset({"v1", "preview"})
RESPONSES_FIRST_PREVIEW = "2025-03-01-preview"
# Real Azure OpenAI's answer to an api-version it does not serve (quoted in hotovo/aider-desk#460, 2025:
# 'API version not supported: {"error":{"code":"BadRequest","message":"API version not supported"}}').
# Older write-ups describe a 404 "Resource not found" for a version a route does not have; the one wire
# body on record is the 400 above, so that is what the local service sends.
API_VERSION_NOT_SUPPORTED = "API version not supported"
_PREVIEW_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})-preview$")


def api_version_supported(version: str, *, responses: bool = False) -> bool:
    """Whether the dated (pre-v1) routes serve ``version``; ``responses`` for ``/openai/responses``."""
    match = _PREVIEW_RE.match(version)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    if responses:
        return version == "preview" or bool(match and "2025-03-01" <= match.group(1) <= today)
    return version in STABLE_API_VERSIONS or bool(match and "2022-03-01" <= match.group(1) <= today)


# --------------------------------------------------------------------------------------------- faults

StreamFaultKind = Literal["slow_stream", "drop_stream"]
STREAM_FAULT_KINDS: tuple[str, ...] = ("slow_stream", "drop_stream")


@dataclasses.dataclass
class StreamFault:
    """A fault applied inside an SSE response (the request itself is answered 200).

    * ``slow_stream``: wait ``seconds`` before each chunk after the first;
    * ``drop_stream``: close the connection after ``after_chunks`` SSE events, without ``[DONE]``.

    ``times=None`` applies it to every matching stream until cleared.
    """

    kind: StreamFaultKind
    operation: str | None = None
    times: int | None = None
    seconds: float = 0.1
    after_chunks: int = 2
    delayed: int = 0
    """How many SSE events a ``slow_stream`` fault held back (what tests assert instead of timing)."""

    def matches(self, operation: str) -> bool:
        return self.operation is None or self.operation == operation


class BackendFaults(Faults):
    """The backend's faults: the shared request faults plus stream faults, cleared together."""

    def __init__(self) -> None:
        super().__init__()
        self._stream_lock = threading.Lock()
        self._stream: list[StreamFault] = []

    def inject_stream(
        self,
        kind: StreamFaultKind,
        *,
        operation: str | None = None,
        times: int | None = None,
        seconds: float = 0.1,
        after_chunks: int = 2,
    ) -> StreamFault:
        if kind not in STREAM_FAULT_KINDS:
            raise ValueError(f"unknown stream fault kind {kind!r}")
        fault = StreamFault(kind, operation, times, seconds, after_chunks)
        with self._stream_lock:
            self._stream.append(fault)
        return fault

    def take_stream(self, operation: str) -> list[StreamFault]:
        with self._stream_lock:
            return take_matching(self._stream, operation)

    @property
    def stream_active(self) -> list[StreamFault]:
        with self._stream_lock:
            return list(self._stream)

    def clear(self) -> None:
        super().clear()
        with self._stream_lock:
            self._stream.clear()


class StreamDropped(Exception):
    """Raised inside the ASGI app so the server drops the connection in the middle of an SSE response."""


# ------------------------------------------------------------------------------------------- helpers


class _HttpError(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def azure_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """Azure OpenAI's service error shape: ``{"error": {"code", "message"}}``."""
    return json_response({"error": {"code": code, "message": message}}, status, headers)


def invalid_request(message: str, param: str | None = None, status: int = 400) -> Response:
    """The OpenAI-style validation error Azure OpenAI returns for bad request bodies."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return json_response(body, status)


def header(scope: Scope, name: bytes) -> str | None:
    """First value of request header ``name`` (lower-case bytes) or None."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def query_param(scope: Scope, name: str) -> str | None:
    from urllib.parse import unquote_plus

    raw: bytes = scope.get("query_string", b"")
    if not raw:
        return None
    for part in raw.decode("latin-1").split("&"):
        key, _, value = part.partition("=")
        if unquote_plus(key) == name:
            return unquote_plus(value)
    return None


async def read_body(receive: Receive, limit: int) -> bytes:
    """Read the whole request body, or raise a 413 once it grows past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _HttpError(
                azure_error(400, "BadRequest", "The client disconnected before sending the body.")
            )
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _HttpError(
                azure_error(
                    413, "RequestEntityTooLarge", f"The request body is larger than the {limit} byte limit."
                )
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


# -------------------------------------------------------------------------------------------- service


class SeenRequest(NamedTuple):
    method: str
    path: str
    query: str
    header_names: tuple[str, ...]


class OpenAIBackend(Service):
    """The Azure OpenAI resource behind the gateway (deployments ``gpt-4o-mini``, ``text-embedding-3-small``).

    ``api_key`` is the backend's own key; the gateway sends it in ``api-key`` on every forwarded request.
    """

    name = "openai"

    def __init__(self) -> None:
        super().__init__()
        self.faults: BackendFaults = BackendFaults()
        self.api_key = secrets.token_hex(16)
        self.max_body_bytes = MAX_BODY_BYTES
        self._seen: collections.deque[SeenRequest] = collections.deque(maxlen=200)
        self.responses = ResponsesApi(reply_for, lambda d: CHAT_DEPLOYMENTS[d])

    def seen(self) -> list[SeenRequest]:
        """Recent requests as the backend received them: method, path, query and header names (no values)."""
        return list(self._seen)

    # ------------------------------------------------------------------------------ Service protocol

    def classify(self, method: str, path: str) -> str:
        if path.endswith("/chat/completions") or path.endswith("/chat/completions/"):
            return "ChatCompletions"
        if path.endswith("/embeddings") or path.endswith("/embeddings/"):
            return "Embeddings"
        if path.rstrip("/") == "/openai/v1/models":
            return "Models"
        if path.rstrip("/") in ("/openai/v1/responses", "/openai/responses"):
            return "Responses"
        return "unknown"

    def error_response(self, status: int, message: str) -> Response:
        if status == 429:
            message = (
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API have exceeded "
                "call rate limit of your current OpenAI S0 pricing tier. Please retry after 1 second."
            )
        return azure_error(status, str(status), message)

    def build_app(self) -> ASGIApp:
        return self._app

    # ----------------------------------------------------------------------------------------- routing

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request_id = str(uuid.uuid4()).encode()

        async def send_with_id(message: Message) -> None:
            # apim-request-id: the spec's response header on every operation (success, error, streamed).
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"apim-request-id", request_id)],
                }
            await send(message)

        try:
            response = await self._dispatch(scope, receive, send_with_id)
        except _HttpError as exc:
            response = exc.response
        if response is not None:
            await response(scope, receive, send_with_id)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> Response | None:
        self._seen.append(
            SeenRequest(
                scope["method"],
                scope["path"],
                bytes(scope["query_string"]).decode("latin-1"),
                tuple(bytes(k).decode("latin-1") for k, _ in scope["headers"]),
            )
        )
        if header(scope, b"api-key") != self.api_key:
            return azure_error(401, "401", INVALID_KEY_MESSAGE)
        path: str = scope["path"]
        method: str = scope["method"]
        version = query_param(scope, "api-version")
        if path.startswith("/openai/v1/"):
            if version is not None and version not in V1_API_VERSIONS:
                return azure_error(400, "BadRequest", API_VERSION_NOT_SUPPORTED)
            rest = path[len("/openai/v1/") :].rstrip("/")
            if rest == "models":
                if method != "GET":
                    return azure_error(405, "405", "Method not allowed.")
                return self._models()
            if rest in ("chat/completions", "embeddings", "responses"):
                if method != "POST":
                    return azure_error(405, "405", "Method not allowed.")
                body = await self._json_body(scope, receive)
                model = body.get("model")
                if not isinstance(model, str) or not model:
                    raise _HttpError(invalid_request("you must provide a model parameter", "model"))
                if rest == "embeddings":
                    return self._embeddings(model, body)
                if rest == "responses":
                    return await self._responses(send, model, body)
                return await self._chat(scope, send, model, body, "ChatCompletions")
            return azure_error(404, "404", "Resource not found")
        if path.rstrip("/") == "/openai/responses":
            if not version:
                return azure_error(400, "BadRequest", MISSING_API_VERSION_MESSAGE)
            if not api_version_supported(version, responses=True):
                return azure_error(400, "BadRequest", API_VERSION_NOT_SUPPORTED)
            if method != "POST":
                return azure_error(405, "405", "Method not allowed.")
            body = await self._json_body(scope, receive)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise _HttpError(invalid_request("you must provide a model parameter", "model"))
            return await self._responses(send, model, body)
        match = _DEPLOYMENT_PATH.match(path)
        if match is None:
            return azure_error(404, "404", "Resource not found")
        if not version:
            return azure_error(400, "BadRequest", MISSING_API_VERSION_MESSAGE)
        if not api_version_supported(version):
            return azure_error(400, "BadRequest", API_VERSION_NOT_SUPPORTED)
        if method != "POST":
            return azure_error(405, "405", "Method not allowed.")
        deployment, operation = match.group(1), match.group(2)
        body = await self._json_body(scope, receive)
        if operation == "embeddings":
            return self._embeddings(deployment, body)
        return await self._chat(scope, send, deployment, body, "ChatCompletions")

    async def _json_body(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        ctype = (header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise _HttpError(
                invalid_request(
                    f"Invalid Content-Type header ({ctype or 'none'}), expected application/json.", status=415
                )
            )
        raw = await read_body(receive, self.max_body_bytes)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _HttpError(invalid_request(BAD_JSON_MESSAGE)) from None
        if not isinstance(body, dict):
            raise _HttpError(invalid_request(f"{raw[:40]!r} is not of type 'object'"))
        return body

    # ------------------------------------------------------------------------------------ operations

    def _models(self) -> Response:
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "system"}
            for name in (*CHAT_DEPLOYMENTS, *EMBEDDING_DEPLOYMENTS)
        ]
        return json_response({"object": "list", "data": data})

    def _embeddings(self, deployment: str, body: dict[str, Any]) -> Response:
        if deployment not in EMBEDDING_DEPLOYMENTS:
            if deployment in CHAT_DEPLOYMENTS:
                return azure_error(
                    400,
                    "OperationNotSupported",
                    f"The embeddings operation does not work with the specified model, "
                    f"{deployment}. Please choose different model and try again.",
                )
            return azure_error(404, "DeploymentNotFound", DEPLOYMENT_NOT_FOUND_MESSAGE)
        raw_input = body.get("input")
        if isinstance(raw_input, str) or (
            isinstance(raw_input, list) and raw_input and all(isinstance(t, int) for t in raw_input)
        ):
            items: list[Any] = [raw_input]
        elif isinstance(raw_input, list) and raw_input:
            items = raw_input
        else:
            raise _HttpError(invalid_request("'input' is a required property", "input"))
        if len(items) > 2048:
            raise _HttpError(invalid_request("Too many inputs. The max number of inputs is 2048.", "input"))
        dims = body.get("dimensions", EMBEDDING_DEPLOYMENTS[deployment])
        if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 3072:
            raise _HttpError(invalid_request("Invalid value for 'dimensions'.", "dimensions"))
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise _HttpError(invalid_request("Invalid value for 'encoding_format'.", "encoding_format"))
        data = []
        tokens = 0
        for index, item in enumerate(items):
            text = item if isinstance(item, str) else json.dumps(item)
            tokens += count_tokens(text)
            vector = embedding_for(text, dims)
            embedding: list[float] | str = (
                vector if fmt == "float" else base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        return json_response(
            {
                "object": "list",
                "data": data,
                "model": deployment,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def _deployment_problem(self, deployment: str, operation: str) -> Response | None:
        if deployment in CHAT_DEPLOYMENTS:
            return None
        if deployment in EMBEDDING_DEPLOYMENTS:
            return azure_error(
                400,
                "OperationNotSupported",
                f"The {operation} operation does not work with the specified model, "
                f"{deployment}. Please choose different model and try again.",
            )
        return azure_error(404, "DeploymentNotFound", DEPLOYMENT_NOT_FOUND_MESSAGE)

    async def _responses(self, send: Send, deployment: str, body: dict[str, Any]) -> Response | None:
        problem = self._deployment_problem(deployment, "responses")
        if problem is not None:
            return problem
        try:
            response = self.responses.plan(deployment, body)
        except (ResponsesError, shapes.SchemaError) as exc:
            param = exc.param if isinstance(exc, ResponsesError) else "tools"
            raise _HttpError(invalid_request(str(exc), param)) from None
        if body.get("stream") is not True:
            return json_response(response)
        frames = [sse_event(kind, data) for kind, data in self.responses.events(response)]
        await self._send_stream(send, "Responses", response["id"], frames)
        return None

    async def _chat(
        self, scope: Scope, send: Send, deployment: str, body: dict[str, Any], operation: str
    ) -> Response | None:
        problem = self._deployment_problem(deployment, "chatCompletion")
        if problem is not None:
            return problem
        messages = _chat_messages(body)
        users = [m for m in messages if m.get("role") == "user"]
        last = text_of((users or messages)[-1].get("content"))
        prompt_tokens = sum(count_tokens(text_of(m.get("content"))) for m in messages)
        tools = _chat_tools(body)
        has_result = any(m.get("role") == "tool" for m in messages)
        calls, pieces, finish = _chat_answer(body, tools, last, has_result)
        if calls:
            completion_tokens = sum(count_tokens(str(c["function"]["arguments"])) for c in calls)
        else:
            completion_tokens = len(pieces)
        model = CHAT_DEPLOYMENTS[deployment]
        ident = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        usage = chat_usage(prompt_tokens, completion_tokens)
        if body.get("stream") is True:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            events = chat_stream_events(
                ident, created, model, pieces, calls, finish, usage if include_usage else None
            )
            await self._send_stream(send, operation, ident, [sse(e) for e in events])
            return None
        return json_response(chat_completion(ident, created, model, pieces, calls, finish, usage))

    async def _send_stream(self, send: Send, operation: str, ident: str, frames: list[bytes]) -> None:
        faults = self.faults.take_stream(operation)
        delay = sum(f.seconds for f in faults if f.kind == "slow_stream")
        drops = [f.after_chunks for f in faults if f.kind == "drop_stream"]
        drop_after = min(drops) if drops else None
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-request-id", ident.encode()),
                ],
            }
        )
        for index, frame in enumerate(frames):
            if drop_after is not None and index >= drop_after:
                raise StreamDropped(f"stream dropped after {index} events (injected)")
            if delay and index:
                await asyncio.sleep(delay)
                for fault in faults:
                    if fault.kind == "slow_stream":
                        fault.delayed += 1
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's ``messages``, checked as Azure OpenAI checks them."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _HttpError(
            invalid_request("'messages' is a required property and must be a non-empty array", "messages")
        )
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise _HttpError(invalid_request("Each message must be an object with a 'role'.", "messages"))
    return messages


def _chat_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's function tools, with ``tool_choice`` checked against them."""
    tools = shapes.function_tools(body.get("tools"))
    choice = body.get("tool_choice")
    if choice is not None and choice != "none" and not tools:
        # OpenAI's message for tool_choice without tools (Azure OpenAI relays it).
        raise _HttpError(
            invalid_request(
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                "tool_choice",
            )
        )
    if isinstance(choice, dict):
        wanted = (
            (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        )
        if not any(t["name"] == wanted for t in tools):
            raise _HttpError(
                invalid_request(
                    f"Invalid value for 'tool_choice': no function named '{wanted}' was specified in "
                    "the 'tools' parameter.",  # (inference: OpenAI's wording is not on record)
                    "tool_choice",
                )
            )
    return tools


def _chat_answer(
    body: dict[str, Any], tools: list[dict[str, Any]], last: str, has_result: bool
) -> tuple[list[dict[str, Any]], list[str], str]:
    """``(tool calls, content pieces, finish reason)``: the deterministic answer to a chat request."""
    try:
        choice, parallel = body.get("tool_choice"), body.get("parallel_tool_calls")
        chosen = shapes.chosen_tools(tools, choice, parallel, has_result)
        calls: list[dict[str, Any]] = [
            {
                "id": shapes.call_id("call_", last, tool["name"], index),
                "type": "function",
                "function": {"name": tool["name"], "arguments": shapes.arguments_for(tool, last)},
            }
            for index, tool in enumerate(chosen)
        ]
        structured = None if calls else shapes.structured_content(body.get("response_format"), last)
    except shapes.SchemaError as exc:
        raise _HttpError(invalid_request(f"Invalid schema: {exc}", "response_format")) from None
    if calls:
        return calls, [], "tool_calls"
    pieces = split_json(structured) if structured is not None else reply_pieces(last)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < len(pieces):
        return calls, pieces[:limit], "length"
    return calls, pieces, "stop"
