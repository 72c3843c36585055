"""The local Azure OpenAI backend, reached through the APIM gateway by openai's clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from apimvault.local import API_VERSION, DEPLOYMENT, LocalAzure
from apimvault.local.openai_backend import INVALID_KEY_MESSAGE, embedding_for, reply_for
from apimvault.local.stack import APIM_SUBSCRIPTION

EMBEDDING = "text-embedding-3-small"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there"},
]


def key(azure: LocalAzure) -> str:
    sub = azure.apim_state.get(APIM_SUBSCRIPTION)
    assert sub is not None
    return sub.primary_key


_OPENED: list[openai.AzureOpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Every client a test makes here is closed when it ends, not left to the garbage collector."""
    yield
    while _OPENED:
        _OPENED.pop().close()


def client(azure: LocalAzure) -> openai.AzureOpenAI:
    made = openai.AzureOpenAI(
        azure_endpoint=azure.gateway_url,
        api_key="unused",
        api_version=API_VERSION,
        default_headers={"Ocp-Apim-Subscription-Key": key(azure)},
        max_retries=0,
        timeout=10,
    )
    _OPENED.append(made)
    return made


def raw(azure: LocalAzure, method: str, path: str, **kwargs: Any) -> httpx2.Response:
    headers = {"Ocp-Apim-Subscription-Key": key(azure), **kwargs.pop("headers", {})}
    with httpx2.Client(timeout=10) as c:
        return c.request(method, azure.gateway_url + path, headers=headers, **kwargs)


def chat_path(deployment: str = DEPLOYMENT, api_version: str | None = API_VERSION) -> str:
    path = f"/openai/deployments/{deployment}/chat/completions"
    return path + (f"?api-version={api_version}" if api_version else "")


# ------------------------------------------------------------------------------------------------- chat


def test_chat_completion(azure: LocalAzure) -> None:
    reply = client(azure).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == reply_for("hello there")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.total_tokens == reply.usage.prompt_tokens + 5
    assert reply.model == "gpt-4o-mini-2024-07-18"
    again = client(azure).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    assert again.choices[0].message.content == reply.choices[0].message.content  # deterministic
    assert azure.openai.counters["ChatCompletions"] == 2


def test_max_tokens_truncates(azure: LocalAzure) -> None:
    reply = client(azure).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, max_tokens=2)
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == "apimvault local"


def test_streaming_chat_sdk(azure: LocalAzure) -> None:
    stream = client(azure).chat.completions.create(
        model=DEPLOYMENT, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices == []  # Azure's prompt_filter_results chunk
    assert chunks[1].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply_for("hello there")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_streaming_wire_shape(azure: LocalAzure) -> None:
    body = {"messages": MESSAGES, "stream": True}
    with (
        httpx2.Client(timeout=10) as c,
        c.stream(
            "POST",
            azure.gateway_url + chat_path(),
            json=body,
            headers={"Ocp-Apim-Subscription-Key": key(azure)},
        ) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in response.headers
        frames = [line for line in response.iter_lines() if line]
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"
    events = [json.loads(f[6:]) for f in frames[:-1]]
    assert events[0]["choices"] == [] and events[0]["prompt_filter_results"][0]["prompt_index"] == 0
    assert events[0]["id"] == "" and events[0]["created"] == 0
    assert events[1]["choices"][0]["delta"] == {"content": "", "refusal": None, "role": "assistant"}
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and events[-1]["choices"][0]["delta"] == {}
    assert all(e["object"] == "chat.completion.chunk" for e in events[1:])
    assert "usage" not in events[-1]


async def test_async_streaming_and_embeddings(azure: LocalAzure) -> None:
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=azure.gateway_url,
        api_key="unused",
        api_version=API_VERSION,
        max_retries=0,
        timeout=10,
        default_headers={"Ocp-Apim-Subscription-Key": key(azure)},
    ) as c:
        stream = await c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        assert text == reply_for("hello there")
        vectors = await c.embeddings.create(model=EMBEDDING, input="abc")
        assert len(vectors.data[0].embedding) == 1536


# ------------------------------------------------------------------------------------------- embeddings


def test_embeddings_deterministic_in_both_encodings(azure: LocalAzure) -> None:
    c = client(azure)
    default = c.embeddings.create(model=EMBEDDING, input=["alpha", "beta"])  # the SDK asks for base64
    floats = c.embeddings.create(model=EMBEDDING, input=["alpha", "beta"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    expected = embedding_for("alpha", 1536)
    assert floats.data[0].embedding == pytest.approx(expected, abs=1e-6)
    assert default.data[0].embedding == pytest.approx(expected, abs=1e-6)
    assert floats.data[0].embedding != floats.data[1].embedding
    assert sum(v * v for v in floats.data[0].embedding) == pytest.approx(1.0, abs=1e-4)
    small = c.embeddings.create(model=EMBEDDING, input=[[1, 2, 3]], dimensions=8)
    assert len(small.data[0].embedding) == 8
    assert floats.usage.prompt_tokens == 2


# ------------------------------------------------------------------------------------------------ v1 API


def test_v1_api_through_gateway(azure: LocalAzure) -> None:
    c = openai.OpenAI(
        base_url=azure.gateway_url + "/openai/v1/",
        api_key="unused",
        max_retries=0,
        timeout=10,
        default_headers={"Ocp-Apim-Subscription-Key": key(azure)},
    )
    reply = c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    assert reply.choices[0].message.content == reply_for("hello there")
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
        if ch.choices
    )
    assert streamed == reply_for("hello there")
    assert len(c.embeddings.create(model=EMBEDDING, input="x").data) == 1
    assert {m.id for m in c.models.list()} == {DEPLOYMENT, EMBEDDING}
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=MESSAGES)
    seen = azure.openai.seen()[-1]
    assert "authorization" not in seen.header_names  # the caller's "Bearer unused" is not forwarded
    assert seen.query == ""


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_deployment(azure: LocalAzure) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(azure).chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert info.value.response.json() == {
        "error": {
            "code": "DeploymentNotFound",
            "message": "The API deployment for this resource does not exist.",
        }
    }
    with pytest.raises(openai.NotFoundError):
        client(azure).embeddings.create(model="emb-nope", input="x")


def test_wrong_operation_for_model(azure: LocalAzure) -> None:
    with pytest.raises(openai.BadRequestError, match=r"OperationNotSupported|does not work"):
        client(azure).embeddings.create(model=DEPLOYMENT, input="x")
    with pytest.raises(openai.BadRequestError):
        client(azure).chat.completions.create(model=EMBEDDING, messages=MESSAGES)


def test_api_version_required(azure: LocalAzure) -> None:
    response = raw(azure, "POST", chat_path(api_version=None), json={"messages": MESSAGES})
    assert response.status_code == 400
    assert "api-version" in response.json()["error"]["message"]


NOT_SUPPORTED = {"error": {"code": "BadRequest", "message": "API version not supported"}}


@pytest.mark.parametrize("version", ["1999-01-01", "2024-10-22", "v1", "2099-01-01-preview", "latest"])
def test_unknown_api_version_is_refused(azure: LocalAzure, version: str) -> None:
    """Issue 22.1: Azure OpenAI refuses an unknown api-version: 400 BadRequest (hotovo/aider-desk#460)."""
    response = raw(azure, "POST", chat_path(api_version=version), json={"messages": MESSAGES})
    assert (response.status_code, response.json()) == (400, NOT_SUPPORTED)
    assert response.headers["apim-request-id"]
    path = f"/openai/deployments/{EMBEDDING}/embeddings?api-version={version}"
    assert raw(azure, "POST", path, json={"input": "x"}).json() == NOT_SUPPORTED


@pytest.mark.parametrize(
    "version", ["2024-02-01", "2024-06-01", "2024-10-21", "2024-08-01-preview", "2025-04-01-preview"]
)
def test_api_versions_clients_send_are_served(azure: LocalAzure, version: str) -> None:
    with openai.AzureOpenAI(
        azure_endpoint=azure.gateway_url,
        api_key="unused",
        api_version=version,
        default_headers={"Ocp-Apim-Subscription-Key": key(azure)},
        max_retries=0,
    ) as c:
        assert c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices[0].message.content


def test_v1_routes_take_only_v1_api_versions(azure: LocalAzure) -> None:
    for version in ("v1", "preview"):
        body = {"model": DEPLOYMENT, "messages": MESSAGES}
        assert (
            raw(azure, "POST", f"/openai/v1/chat/completions?api-version={version}", json=body).status_code
            == 200
        )
    response = raw(azure, "GET", "/openai/v1/models?api-version=2024-10-21")
    assert (response.status_code, response.json()) == (400, NOT_SUPPORTED)
    # The pre-v1 Responses route needs a preview from 2025-03-01-preview on.
    body = {"model": DEPLOYMENT, "input": "hi"}
    assert raw(azure, "POST", "/openai/responses?api-version=2024-10-21", json=body).json() == NOT_SUPPORTED
    assert (
        raw(azure, "POST", "/openai/responses?api-version=2025-04-01-preview", json=body).status_code == 200
    )
    assert raw(azure, "POST", "/openai/responses", json=body).status_code == 400


def test_apim_request_id_on_every_answer(azure: LocalAzure) -> None:
    """Issue 22.2: the spec names apim-request-id on chat completions, streaming and errors."""
    c = client(azure)
    plain = c.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=MESSAGES)
    with c.chat.completions.with_streaming_response.create(
        model=DEPLOYMENT, messages=MESSAGES, stream=True
    ) as streamed:
        assert streamed.headers["content-type"].startswith("text/event-stream")
        stream_id = streamed.headers["apim-request-id"]
        list(streamed.iter_lines())
    embedded = c.embeddings.with_raw_response.create(model=EMBEDDING, input="x")
    with pytest.raises(openai.NotFoundError) as info:
        c.chat.completions.create(model="gpt-nope", messages=MESSAGES)
    ids = [plain.headers["apim-request-id"], stream_id, embedded.headers["apim-request-id"]]
    ids.append(info.value.response.headers["apim-request-id"])
    ids.append(raw(azure, "GET", "/openai/v1/models").headers["apim-request-id"])
    assert len(set(ids)) == 5 and all(len(i) == 36 for i in ids)


@pytest.mark.parametrize(
    ("content", "ctype", "status", "kind"),
    [
        (b"{not json", "application/json", 400, "invalid_request_error"),
        (b"[1, 2]", "application/json", 400, "invalid_request_error"),
        (b'{"messages": []}', "application/json", 400, "invalid_request_error"),
        (b'{"messages": ["hi"]}', "application/json", 400, "invalid_request_error"),
        (b"\xff\xfe", "application/json", 400, "invalid_request_error"),
        (b'{"messages": []}', "text/plain", 415, "invalid_request_error"),
    ],
)
def test_bad_bodies(azure: LocalAzure, content: bytes, ctype: str, status: int, kind: str) -> None:
    response = raw(azure, "POST", chat_path(), content=content, headers={"Content-Type": ctype})
    assert response.status_code == status
    assert response.json()["error"]["type"] == kind
    assert client(azure).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices


def test_oversize_body_and_bad_embeddings_input(azure: LocalAzure) -> None:
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * (5 * 1024 * 1024) + b'"}]}'
    response = raw(azure, "POST", chat_path(), content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "RequestEntityTooLarge"
    path = f"/openai/deployments/{EMBEDDING}/embeddings?api-version={API_VERSION}"
    bodies: list[dict[str, Any]] = [
        {},
        {"input": []},
        {"input": "x", "dimensions": 0},
        {"input": "x", "encoding_format": "hex"},
    ]
    for body in bodies:
        assert raw(azure, "POST", path, json=body).status_code == 400
    assert client(azure).embeddings.create(model=EMBEDDING, input="still serving").data


def test_unknown_routes_and_methods(azure: LocalAzure) -> None:
    assert raw(azure, "GET", "/openai/deployments").json() == {
        "error": {"code": "404", "message": "Resource not found"}
    }
    assert raw(azure, "GET", chat_path()).status_code == 405
    assert raw(azure, "POST", "/openai/v1/models").status_code == 405
    assert raw(azure, "GET", "/openai/v1/files").status_code == 404
    assert raw(azure, "GET", "/openai/v1/responses").status_code == 405
    assert azure.gateway.counters["OpenAI"] == 2


def test_backend_rejects_requests_not_from_gateway(azure: LocalAzure) -> None:
    with httpx2.Client(timeout=10) as c:
        for headers in ({}, {"api-key": "guess"}, {"Ocp-Apim-Subscription-Key": key(azure)}):
            response = c.post(azure.openai.url + chat_path(), json={"messages": MESSAGES}, headers=headers)
            assert response.status_code == 401
            assert response.json() == {"error": {"code": "401", "message": INVALID_KEY_MESSAGE}}
            assert "www-authenticate" not in response.headers
    direct = openai.AzureOpenAI(
        azure_endpoint=azure.openai.url, api_key="guess", api_version=API_VERSION, max_retries=0, timeout=10
    )
    with pytest.raises(openai.AuthenticationError, match="wrong API endpoint"):
        direct.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)


# ------------------------------------------------------------------------------ tools and structured output

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 2},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TIME: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
            "required": ["zone"],
        },
    },
}
PERSON: Any = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "address": {"$ref": "#/$defs/address"},
        "born": {"type": "string", "format": "date"},
    },
    "required": ["name", "age", "tags", "address", "born"],
    "additionalProperties": False,
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "zip": {"type": "string", "maxLength": 5}},
            "required": ["street", "zip"],
            "additionalProperties": False,
        }
    },
}


def _valid(schema: dict[str, Any], value: Any) -> None:
    import jsonschema  # type: ignore[import-untyped]

    jsonschema.Draft202012Validator(schema).validate(value)


def test_forced_function_gives_a_tool_call_matching_its_schema(azure: LocalAzure) -> None:
    c = client(azure)
    reply = c.chat.completions.create(
        model=DEPLOYMENT,
        messages=MESSAGES,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls: list[Any] = list(choice.message.tool_calls or [])
    assert [call.function.name for call in calls] == ["get_weather"]
    args = json.loads(calls[0].function.arguments)
    _valid(WEATHER["function"]["parameters"], args)
    assert calls[0].id.startswith("call_")
    again = c.chat.completions.create(
        model=DEPLOYMENT,
        messages=MESSAGES,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert again.choices[0].message.tool_calls == calls  # deterministic: same request, same call


def test_required_and_auto_call_every_tool_until_a_tool_result(azure: LocalAzure) -> None:
    c = client(azure)
    for choice in ("required", "auto", None):
        extra: dict[str, Any] = {} if choice is None else {"tool_choice": choice}
        reply = c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, tools=[WEATHER, TIME], **extra)
        calls = reply.choices[0].message.tool_calls or []
        assert [call.function.name for call in calls] == ["get_weather", "get_time"], choice
        assert reply.choices[0].finish_reason == "tool_calls"
    single = c.chat.completions.create(
        model=DEPLOYMENT,
        messages=MESSAGES,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assert len(single.choices[0].message.tool_calls or []) == 1
    # With a tool result in the conversation, "auto" answers in text; "none" never calls.
    call: Any = (single.choices[0].message.tool_calls or [])[0]
    history: list[Any] = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    done = c.chat.completions.create(model=DEPLOYMENT, messages=history, tools=[WEATHER])
    assert done.choices[0].finish_reason == "stop" and done.choices[0].message.content
    none = c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, tools=[WEATHER], tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"


def test_tool_calls_stream_as_deltas(azure: LocalAzure) -> None:
    c = client(azure)
    kwargs: dict[str, Any] = {
        "model": DEPLOYMENT,
        "messages": MESSAGES,
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
    }
    plain = c.chat.completions.create(**kwargs).choices[0].message.tool_calls or []
    chunks = list(c.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices == []  # Azure's prompt_filter_results chunk
    built: dict[int, dict[str, str]] = {}
    for chunk in chunks[1:]:
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = built.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta.id or ""
            entry["name"] += (delta.function and delta.function.name) or ""
            entry["arguments"] += (delta.function and delta.function.arguments) or ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert sum(1 for ch in chunks[1:] if ch.choices[0].delta.tool_calls) > 2 * len(plain)  # fragments
    assert [built[i] for i in sorted(built)] == [
        {"id": p.id, "name": p.function.name, "arguments": p.function.arguments} for p in plain
    ]


def test_tool_choice_errors(azure: LocalAzure) -> None:
    c = client(azure)
    with pytest.raises(openai.BadRequestError, match="only allowed when 'tools' are specified"):
        c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="nope"):
        c.chat.completions.create(
            model=DEPLOYMENT,
            messages=MESSAGES,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )


def test_structured_output_json_schema_and_json_object(azure: LocalAzure) -> None:
    c = client(azure)
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    reply = c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, response_format=fmt)
    value = json.loads(reply.choices[0].message.content or "")
    _valid(PERSON, value)
    assert len(value["tags"]) == 2
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(
            model=DEPLOYMENT, messages=MESSAGES, response_format=fmt, stream=True
        )
        if ch.choices
    )
    assert json.loads(streamed) == value  # same answer streamed, deterministic
    other = c.chat.completions.create(
        model=DEPLOYMENT, messages=[{"role": "user", "content": "someone else"}], response_format=fmt
    )
    assert json.loads(other.choices[0].message.content or "") != value  # derived from the request too
    obj = c.chat.completions.create(
        model=DEPLOYMENT, messages=MESSAGES, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)


def test_structured_output_parse_helper(azure: LocalAzure) -> None:
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int
        districts: list[str]

    parsed = client(azure).chat.completions.parse(model=DEPLOYMENT, messages=MESSAGES, response_format=City)
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City) and city.districts


# ------------------------------------------------------------------------------------------ Responses API


def v1_client(azure: LocalAzure) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=azure.gateway_url + "/openai/v1/",
        api_key="unused",
        max_retries=0,
        timeout=10,
        default_headers={"Ocp-Apim-Subscription-Key": key(azure)},
    )


def test_responses_text_plain_and_streamed(azure: LocalAzure) -> None:
    c = v1_client(azure)
    response = c.responses.create(model=DEPLOYMENT, input="hello there", instructions="be brief")
    assert response.status == "completed" and response.output_text == reply_for("hello there")
    assert response.usage is not None and response.usage.output_tokens == 5
    events = list(c.responses.create(model=DEPLOYMENT, input="hello there", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == reply_for("hello there")
    # The pre-v1 route on an AzureOpenAI client, with a preview api-version.
    with openai.AzureOpenAI(
        azure_endpoint=azure.gateway_url,
        api_key="unused",
        api_version="2025-04-01-preview",
        default_headers={"Ocp-Apim-Subscription-Key": key(azure)},
        max_retries=0,
    ) as azure_client:
        answer = azure_client.responses.create(model=DEPLOYMENT, input="hello there")
    assert answer.output_text == reply_for("hello there")


def test_responses_tool_calls_and_structured_output(azure: LocalAzure) -> None:
    c = v1_client(azure)
    tool: Any = {
        "type": "function",
        "name": "get_weather",
        "parameters": WEATHER["function"]["parameters"],
        "strict": True,
    }
    first = c.responses.create(model=DEPLOYMENT, input="weather in Oslo?", tools=[tool])
    calls = [o for o in first.output if o.type == "function_call"]
    assert [call.name for call in calls] == ["get_weather"]
    _valid(tool["parameters"], json.loads(calls[0].arguments))
    streamed = list(c.responses.create(model=DEPLOYMENT, input="weather in Oslo?", tools=[tool], stream=True))
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    args = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    assert len(done) == 1 and done[0].arguments == args == calls[0].arguments
    follow = c.responses.create(
        model=DEPLOYMENT,
        tools=[tool],
        input=[
            {"role": "user", "content": "weather in Oslo?"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_weather",
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
        ],
    )
    assert follow.output_text and not [o for o in follow.output if o.type == "function_call"]
    fmt: Any = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    structured = c.responses.create(model=DEPLOYMENT, input="who?", text=fmt)
    _valid(PERSON, json.loads(structured.output_text))


def test_responses_errors(azure: LocalAzure) -> None:
    c = v1_client(azure)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="gpt-nope", input="x")
    with pytest.raises(openai.BadRequestError, match=r"OperationNotSupported|does not work"):
        c.responses.create(model=EMBEDDING, input="x")
    with pytest.raises(openai.BadRequestError, match="'required'"):
        c.responses.create(model=DEPLOYMENT, input="x", tool_choice="required")
    assert (
        raw(azure, "POST", "/openai/v1/responses", json={"model": DEPLOYMENT, "input": 3}).status_code == 400
    )


def test_v1_routes_have_the_gateways_key_checks(azure: LocalAzure) -> None:
    """Issue 22.8: /openai/v1/* (Responses too) sits behind the APIM key check of the dated routes."""
    body = {"model": DEPLOYMENT, "input": "hi"}
    with httpx2.Client(timeout=10) as c:
        for route in ("responses", "chat/completions", "embeddings", "models"):
            url = f"{azure.gateway_url}/openai/v1/{route}"
            missing = c.post(url, json=body) if route != "models" else c.get(url)
            assert missing.status_code == 401 and "missing subscription key" in missing.json()["message"]
            assert missing.headers["www-authenticate"].startswith("AzureApiManagementKey")
            wrong = c.get(url, headers={"Ocp-Apim-Subscription-Key": "0" * 32})
            assert wrong.status_code == 401 and "invalid subscription key" in wrong.json()["message"]
    assert raw(azure, "POST", "/openai/v1/responses", json=body).status_code == 200
    # the backend keeps the last 200 requests of the session's stack: this test's is the newest one
    forwarded = azure.openai.seen()[-1]
    assert forwarded.path == "/openai/v1/responses"
    assert "ocp-apim-subscription-key" not in forwarded.header_names  # the key stops at the gateway
