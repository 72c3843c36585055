"""LangChain (langchain-openai): AzureChatOpenAI and AzureOpenAIEmbeddings through a key rotation."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import pytest

pytest.importorskip("langchain_openai")

from langchain_core.globals import set_debug
from langchain_openai import AzureChatOpenAI, AzureOpenAIEmbeddings
from pydantic import BaseModel

from apimvault import (
    AsyncSubscriptionKeyProvider,
    ConfigurationError,
    SubscriptionKeyProvider,
    create_async_azure_openai,
    create_azure_openai,
)
from apimvault.integrations.langchain import azure_chat_openai, azure_openai_embeddings
from apimvault.local import DEPLOYMENT, LocalAzure

from .support import LogCapture, Rotating, assert_no_key

pytestmark = pytest.mark.integrations


# As the README block builds them (the block itself runs as a script: test_readme_blocks.py).
class Weather(BaseModel):
    city: str
    celsius: int


def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"18 C in {city}"


def _readme_objects(
    provider: SubscriptionKeyProvider, aprovider: AsyncSubscriptionKeyProvider
) -> tuple[AzureChatOpenAI, AzureOpenAIEmbeddings]:
    client, aclient = create_azure_openai(provider), create_async_azure_openai(aprovider)
    llm = azure_chat_openai(client, aclient, deployment="gpt-4o-mini")
    embeddings = azure_openai_embeddings(client, aclient, deployment="text-embedding-3-small")
    return llm, embeddings


async def test_langchain_chat_and_embeddings_through_rotation(
    azure: LocalAzure, debug_logs: LogCapture, capsys: pytest.CaptureFixture[str]
) -> None:
    debug_logs.debug("langchain", "langchain_core", "langchain_openai")
    set_debug(True)  # LangChain's own debug output (printed, not logged): checked for the key too
    stack = Rotating.new(azure)
    provider = stack.provider()
    try:
        async with stack.aprovider() as aprovider:
            llm, embeddings = _readme_objects(provider, aprovider)
            assert isinstance(llm, AzureChatOpenAI) and isinstance(embeddings, AzureOpenAIEmbeddings)

            # One call of each kind on the first key.
            assert llm.invoke("hello").content
            assert (await llm.ainvoke("hello")).content
            assert embeddings.embed_query("hello") and await embeddings.aembed_query("hello")
            assert set(stack.slots()) == {"primary"}

            # Each rotation revokes the key both providers hold; the next call succeeds through a re-send.
            stack.rotate()
            assert llm.invoke("hello again").content
            assert provider.stats().resends_401 == 1

            stack.rotate()
            assert "".join(str(c.content) for c in llm.stream("stream please"))
            assert provider.stats().resends_401 == 2

            stack.rotate()
            assert (await llm.ainvoke("hello again")).content
            assert aprovider.stats().resends_401 == 1

            stack.rotate()
            assert "".join([str(c.content) async for c in llm.astream("stream please")])
            assert aprovider.stats().resends_401 == 2

            stack.rotate()
            assert embeddings.embed_documents(["a", "b"]) and await embeddings.aembed_documents(["a", "b"])
            assert provider.stats().resends_401 == 3 and aprovider.stats().resends_401 == 3
            assert stack.slots()[-1] == "secondary"
            llm.root_client.close()  # the clients the README block opens with `with`
            await llm.root_async_client.close()
    finally:
        set_debug(False)
        provider.close()
    printed = capsys.readouterr()
    assert "[llm/start]" in printed.out  # LangChain's debug tracing really ran
    assert any(name.startswith("openai") for name in debug_logs.names())
    assert_no_key(stack.keys, *debug_logs.texts, printed.out, printed.err, repr(llm), repr(embeddings))


async def test_langchain_structured_output_and_tool_calls_through_rotation(azure: LocalAzure) -> None:
    """Issue 22.3/22.4 done-when: with_structured_output and bind_tools(...).invoke on the local stack."""
    import jsonschema  # type: ignore[import-untyped]

    stack = Rotating.new(azure)
    provider = stack.provider()
    try:
        async with stack.aprovider() as aprovider:
            llm, _ = _readme_objects(provider, aprovider)
            forecaster: Any = llm.with_structured_output(Weather)
            tool_user: Any = llm.bind_tools([get_weather])
            weather = Weather

            first = forecaster.invoke("weather in Oslo?")
            assert isinstance(first, weather)
            assert await forecaster.ainvoke("weather in Oslo?") == first  # deterministic, sync or async
            stack.rotate()
            assert isinstance(await forecaster.ainvoke("weather in Bergen?"), weather)

            stack.rotate()
            message = tool_user.invoke("weather in Oslo?")
            assert [call["name"] for call in message.tool_calls] == ["get_weather"]
            schema = tool_user.kwargs["tools"][0]["function"]["parameters"]
            jsonschema.validate(message.tool_calls[0]["args"], schema)
            assert message.response_metadata["finish_reason"] == "tool_calls"
            stack.rotate()
            chunks = [chunk async for chunk in tool_user.astream("weather in Oslo?")]
            merged = chunks[0]
            for chunk in chunks[1:]:
                merged = merged + chunk
            assert merged.tool_calls == message.tool_calls  # streamed deltas add up to the same call
            assert provider.stats().resends_401 == 1 and aprovider.stats().resends_401 == 2
            llm.root_client.close()  # the clients the README block opens with `with`
            await llm.root_async_client.close()
    finally:
        provider.close()


async def test_langchain_half_not_given_refuses_to_send(azure: LocalAzure, closing: ExitStack) -> None:
    stack = Rotating.new(azure)
    provider = stack.provider()
    try:
        client = closing.enter_context(create_azure_openai(provider))
        llm = azure_chat_openai(client, deployment=DEPLOYMENT)
        assert llm.invoke("hello").content
        sent = azure.gateway.counters.total()
        with pytest.raises(ConfigurationError, match="async_client=create_async_azure_openai"):
            await llm.ainvoke("hello")
        assert azure.gateway.counters.total() == sent  # nothing reached the gateway
        with pytest.raises(ConfigurationError, match="api_key"):
            azure_chat_openai(client, deployment=DEPLOYMENT, api_key="k")
        with pytest.raises(ConfigurationError, match="client="):
            azure_chat_openai(deployment=DEPLOYMENT)
    finally:
        provider.close()
