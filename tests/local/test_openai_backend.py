"""The local Azure OpenAI backend, reached through the APIM gateway by openai's clients."""

from __future__ import annotations

import json
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


def client(azure: LocalAzure) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=azure.gateway_url,
        api_key="unused",
        api_version=API_VERSION,
        default_headers={"Ocp-Apim-Subscription-Key": key(azure)},
        max_retries=0,
        timeout=10,
    )


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
    assert raw(azure, "GET", "/openai/v1/responses").status_code == 404
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
