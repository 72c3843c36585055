"""Pydantic AI: an agent on AzureProvider(openai_client=...) with an apimvault client, through a rotation."""

from __future__ import annotations

import pytest

pytest.importorskip("pydantic_ai")

from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.azure import AzureProvider

from apimvault import create_async_azure_openai
from apimvault.local import LocalAzure

from .support import LogCapture, Rotating, assert_no_key

pytestmark = pytest.mark.integrations


async def test_pydantic_ai_run_and_stream_through_rotation(
    azure: LocalAzure, debug_logs: LogCapture, capsys: pytest.CaptureFixture[str]
) -> None:
    debug_logs.debug("pydantic_ai")
    stack = Rotating.new(azure)
    async with stack.aprovider() as aprovider, create_async_azure_openai(aprovider) as aclient:
        # as the README block builds it (the block itself runs as a script: test_readme_blocks.py)
        model = OpenAIChatModel("gpt-4o-mini", provider=AzureProvider(openai_client=aclient))
        agent = Agent(model, instructions="Answer briefly.")
        assert isinstance(agent, Agent)

        result = await agent.run("hello")
        assert result.output
        assert set(stack.slots()) == {"primary"}

        stack.rotate()  # revokes the key the client holds
        result = await agent.run("hello again")
        assert result.output
        assert aprovider.stats().resends_401 == 1

        stack.rotate()
        async with agent.run_stream("stream please") as streamed:
            pieces = [piece async for piece in streamed.stream_text(delta=True)]
        assert "".join(pieces)
        assert aprovider.stats().resends_401 == 2
        assert stack.slots()[-1] == "secondary"
    printed = capsys.readouterr()
    assert any(name.startswith("openai") for name in debug_logs.names())
    assert_no_key(stack.keys, *debug_logs.texts, printed.out, printed.err, repr(agent))
