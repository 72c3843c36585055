"""Haystack: AzureOpenAIChatGenerator on apimvault clients (run, run_async, streaming), through a rotation."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

pytest.importorskip("haystack")

from haystack.components.generators.chat import AzureOpenAIChatGenerator
from haystack.dataclasses import ChatMessage, StreamingChunk

from apimvault import ConfigurationError, create_async_azure_openai, create_azure_openai
from apimvault.integrations.haystack import azure_openai_chat_generator
from apimvault.local import DEPLOYMENT, LocalAzure

from .support import LogCapture, Rotating, assert_no_key

pytestmark = pytest.mark.integrations


def _reply(result: dict[str, list[ChatMessage]]) -> str:
    return result["replies"][0].text or ""


async def test_haystack_chat_generator_through_rotation(
    azure: LocalAzure, debug_logs: LogCapture, capsys: pytest.CaptureFixture[str], closing: ExitStack
) -> None:
    debug_logs.debug("haystack")
    stack = Rotating.new(azure)
    provider = stack.provider()
    try:
        async with stack.aprovider() as aprovider, create_async_azure_openai(aprovider) as aclient:
            # as the README block builds it (the block itself runs as a script: test_readme_blocks.py)
            client = closing.enter_context(create_azure_openai(provider))
            generator = azure_openai_chat_generator(client, aclient, deployment="gpt-4o-mini")
            assert isinstance(generator, AzureOpenAIChatGenerator)
            generator.warm_up()  # what a pipeline does first: must keep apimvault's clients
            await generator.warm_up_async()

            assert _reply(generator.run([ChatMessage.from_user("hello")]))
            assert _reply(await generator.run_async([ChatMessage.from_user("hello")]))
            assert set(stack.slots()) == {"primary"}

            stack.rotate()  # revokes the key both providers hold
            assert _reply(generator.run([ChatMessage.from_user("hello again")]))
            assert provider.stats().resends_401 == 1
            assert _reply(await generator.run_async([ChatMessage.from_user("hello again")]))
            assert aprovider.stats().resends_401 == 1

            stack.rotate()
            chunks: list[StreamingChunk] = []
            result = generator.run([ChatMessage.from_user("stream please")], streaming_callback=chunks.append)
            assert _reply(result) and "".join(c.content for c in chunks)
            assert provider.stats().resends_401 == 2

            async def collect(chunk: StreamingChunk) -> None:
                chunks.append(chunk)

            chunks.clear()
            result = await generator.run_async([ChatMessage.from_user("stream")], streaming_callback=collect)
            assert _reply(result) and "".join(c.content for c in chunks)
            assert aprovider.stats().resends_401 == 2
            assert stack.slots()[-1] == "secondary"
    finally:
        provider.close()
    printed = capsys.readouterr()
    assert any(name.startswith("openai") for name in debug_logs.names())  # DEBUG really was on
    assert_no_key(stack.keys, *debug_logs.texts, printed.out, printed.err, repr(generator))


async def test_haystack_half_not_given_refuses_to_send(azure: LocalAzure, closing: ExitStack) -> None:
    stack = Rotating.new(azure)
    provider = stack.provider()
    try:
        client = closing.enter_context(create_azure_openai(provider))
        generator = azure_openai_chat_generator(client, deployment=DEPLOYMENT)
        assert _reply(generator.run([ChatMessage.from_user("hello")]))
        sent = azure.gateway.counters.total()
        with pytest.raises(ConfigurationError, match="async_client=create_async_azure_openai"):
            await generator.run_async([ChatMessage.from_user("hello")])
        assert azure.gateway.counters.total() == sent  # nothing reached the gateway
        with pytest.raises(ConfigurationError, match="api_key"):
            azure_openai_chat_generator(client, deployment=DEPLOYMENT, api_key=None)
        # Serializing would lose apimvault's clients: Haystack refuses the placeholder token secret.
        with pytest.raises(ValueError, match="token-based secret"):
            generator.to_dict()
    finally:
        provider.close()
