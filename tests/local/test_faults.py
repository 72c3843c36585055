"""Every fault kind of the gateway, backend, identity and ARM services, observed by a real client."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx2
import openai
import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import DefaultAzureCredential
from openai.types.chat import ChatCompletionMessageParam

from apimvault.local import API_VERSION, DEPLOYMENT, LocalAzure
from apimvault.local.openai_backend import reply_for
from apimvault.local.stack import APIM_SUBSCRIPTION

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "fault"}]


_OPENED: list[openai.AzureOpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Every client a test makes is closed when it ends (with its streams' connections), not by the GC."""
    yield
    while _OPENED:
        _OPENED.pop().close()


def client(azure: LocalAzure, timeout: float = 10) -> openai.AzureOpenAI:
    sub = azure.apim_state.get(APIM_SUBSCRIPTION)
    assert sub is not None
    made = openai.AzureOpenAI(
        azure_endpoint=azure.gateway_url,
        api_key="unused",
        api_version=API_VERSION,
        default_headers={"Ocp-Apim-Subscription-Key": sub.primary_key},
        max_retries=0,
        timeout=timeout,
    )
    _OPENED.append(made)
    return made


def chat(azure: LocalAzure, timeout: float = 10) -> str | None:
    return (
        client(azure, timeout)
        .chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        .choices[0]
        .message.content
    )


@pytest.mark.parametrize("service", ["gateway", "openai"])
def test_latency(azure: LocalAzure, service: str) -> None:
    azure.services[service].faults.inject("latency", seconds=0.3, times=1)
    started = time.monotonic()
    assert chat(azure) == reply_for("fault")
    assert time.monotonic() - started >= 0.3
    assert (
        azure.services[service].faults.active == []
    )  # times=1: consumed, so the next request is not delayed
    assert chat(azure) == reply_for("fault")


def test_backend_5xx_passes_through_gateway_unchanged(azure: LocalAzure) -> None:
    azure.openai.faults.fail_next(1, status=500)
    with pytest.raises(openai.InternalServerError) as info:
        chat(azure)
    assert info.value.status_code == 500
    assert info.value.response.json() == {"error": {"code": "500", "message": "Injected fault."}}
    assert chat(azure)


def test_gateway_5xx_has_apim_shape(azure: LocalAzure) -> None:
    azure.gateway.faults.fail_next(1, status=503)
    with pytest.raises(openai.InternalServerError) as info:
        chat(azure)
    assert info.value.response.json() == {"statusCode": 503, "message": "Injected fault."}
    assert azure.openai.counters.total() == 0


@pytest.mark.parametrize("service", ["gateway", "openai"])
def test_throttle_with_retry_after(azure: LocalAzure, service: str) -> None:
    azure.services[service].faults.inject("throttle", retry_after=7, times=1)
    with pytest.raises(openai.RateLimitError) as info:
        chat(azure)
    assert info.value.response.headers["retry-after"] == "7"
    assert chat(azure)


@pytest.mark.parametrize("service", ["gateway", "openai"])
def test_reset(azure: LocalAzure, service: str) -> None:
    azure.services[service].faults.inject("reset", times=1)
    with pytest.raises(openai.APIConnectionError):
        chat(azure)
    assert chat(azure)


@pytest.mark.parametrize("service", ["gateway", "openai"])
def test_hang_past_client_timeout(azure: LocalAzure, service: str) -> None:
    # A hang far longer than the test: the client gives up first. A hang that ended would drop the
    # connection (APIConnectionError), so APITimeoutError itself shows the client's timeout fired first.
    azure.services[service].faults.inject("hang", seconds=300, times=1)
    with pytest.raises(openai.APITimeoutError):
        chat(azure, timeout=0.5)
    assert chat(azure)


def test_fail_n_then_recover(azure: LocalAzure) -> None:
    azure.openai.faults.fail_next(2, status=503, operation="ChatCompletions")
    outcomes: list[str | int | None] = []
    for _ in range(3):
        try:
            outcomes.append(chat(azure))
        except openai.InternalServerError as exc:
            outcomes.append(exc.status_code)
    assert outcomes == [503, 503, reply_for("fault")]
    assert azure.openai.counters["ChatCompletions"] == 3


def test_sdk_retries_through_fail_n(azure: LocalAzure) -> None:
    azure.openai.faults.inject("throttle", retry_after=0, times=1)
    c = client(azure).with_options(max_retries=1)
    assert c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices
    assert azure.openai.counters["ChatCompletions"] == 2


def test_operation_scoping(azure: LocalAzure) -> None:
    azure.openai.faults.fail_next(1, status=500, operation="Embeddings")
    assert chat(azure)  # chat is not the faulted operation
    with pytest.raises(openai.InternalServerError):
        client(azure).embeddings.create(model="text-embedding-3-small", input="x")


def test_slow_stream(azure: LocalAzure) -> None:
    fault = azure.openai.faults.inject_stream("slow_stream", seconds=0.01, times=1)
    stream = client(azure).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
    chunks = 0
    texts = []
    for chunk in stream:
        chunks += 1
        if chunk.choices:
            texts.append(chunk.choices[0].delta.content or "")
    assert "".join(texts) == reply_for("fault")
    # Every event after the first was held back (the chunks after the first, then [DONE]): a count, not a
    # timing; how a slow stream feels to a client is measured in bench/.
    assert chunks >= 7 and fault.delayed == chunks
    assert azure.openai.faults.stream_active == []  # times=1: the next stream is not slowed
    again = client(azure).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in again if c.choices) == reply_for("fault")


def test_drop_stream(azure: LocalAzure) -> None:
    azure.openai.faults.inject_stream("drop_stream", after_chunks=3, times=1)
    stream = client(azure).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
    received = []
    with pytest.raises((httpx2.HTTPError, openai.APIConnectionError)):
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 3
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == "apimvault"
    assert chat(azure)


def test_stream_faults_cleared_with_faults(azure: LocalAzure) -> None:
    azure.openai.faults.inject_stream("drop_stream")
    assert azure.openai.faults.stream_active
    azure.openai.faults.clear()
    assert azure.openai.faults.stream_active == []
    with pytest.raises(ValueError, match="unknown stream fault"):
        azure.openai.faults.inject_stream("melt")  # type: ignore[arg-type]


async def test_async_client_sees_faults(azure: LocalAzure) -> None:
    sub = azure.apim_state.get(APIM_SUBSCRIPTION)
    assert sub is not None
    azure.openai.faults.inject_stream("drop_stream", after_chunks=2, times=1)
    azure.gateway.faults.inject("throttle", retry_after=3, times=1, operation="Embeddings")
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=azure.gateway_url,
        api_key="unused",
        api_version=API_VERSION,
        max_retries=0,
        timeout=10,
        default_headers={"Ocp-Apim-Subscription-Key": sub.primary_key},
    ) as c:
        with pytest.raises((httpx2.HTTPError, openai.APIConnectionError)):
            async for _ in await c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True):
                pass
        with pytest.raises(openai.RateLimitError):
            await c.embeddings.create(model="text-embedding-3-small", input="x")


def test_identity_faults(azure: LocalAzure) -> None:
    azure.identity.faults.fail_next(1, status=400, operation="GetToken")
    with pytest.raises(ClientAuthenticationError, match="Injected fault"):
        DefaultAzureCredential().get_token("https://vault.azure.net/.default")
    azure.identity.counters.reset()
    azure.identity.faults.fail_next(1, status=500, operation="GetToken")
    # The managed-identity credential's retry policy absorbs one 5xx.
    assert DefaultAzureCredential().get_token("https://vault.azure.net/.default").token
    assert azure.identity.counters["GetToken"] == 2
    azure.identity.faults.inject("hang", seconds=3, times=1)
    with httpx2.Client(timeout=0.5) as c, pytest.raises(httpx2.ReadTimeout):
        c.get(
            azure.identity.endpoint,
            params={"api-version": "2019-08-01", "resource": "r"},
            headers={"X-IDENTITY-HEADER": azure.identity.header_secret},
        )
