"""Microsoft Agent Framework: an agent on OpenAIChatCompletionClient with an apimvault client, through a
rotation."""

from __future__ import annotations

import pytest

pytest.importorskip("agent_framework_openai")

from agent_framework import Agent
from agent_framework.openai import OpenAIChatCompletionClient

from apimvault import create_async_azure_openai
from apimvault.local import LocalAzure

from .support import LogCapture, Rotating, assert_no_key

pytestmark = pytest.mark.integrations


async def test_agent_framework_run_and_stream_through_rotation(
    azure: LocalAzure, debug_logs: LogCapture, capsys: pytest.CaptureFixture[str]
) -> None:
    debug_logs.debug("agent_framework")
    stack = Rotating.new(azure)
    async with stack.aprovider() as aprovider, create_async_azure_openai(aprovider) as aclient:
        # as the README block builds it (the block itself runs as a script: test_readme_blocks.py)
        agent = Agent(
            client=OpenAIChatCompletionClient(model="gpt-4o-mini", async_client=aclient),
            instructions="Answer briefly.",
        )
        assert isinstance(agent, Agent)

        response = await agent.run("hello")
        assert response.text
        assert set(stack.slots()) == {"primary"}

        stack.rotate()  # revokes the key the client holds
        response = await agent.run("hello again")
        assert response.text
        assert aprovider.stats().resends_401 == 1

        stack.rotate()
        updates = [update async for update in agent.run("stream please", stream=True)]
        assert "".join(update.text for update in updates)
        assert aprovider.stats().resends_401 == 2
        assert stack.slots()[-1] == "secondary"
    printed = capsys.readouterr()
    assert any(name.startswith("openai") for name in debug_logs.names())  # DEBUG really was on
    assert_no_key(stack.keys, *debug_logs.texts, printed.out, printed.err, repr(agent))
