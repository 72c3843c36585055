"""OpenAI Agents SDK: an agent on OpenAIChatCompletionsModel with an apimvault client, through a rotation."""

from __future__ import annotations

import pytest

pytest.importorskip("agents")

from agents import Agent, Runner

from apimvault.local import LocalAzure

from .support import LogCapture, Rotating, assert_no_key, run_readme_block

pytestmark = pytest.mark.integrations


async def test_openai_agents_run_and_stream_through_rotation(
    azure: LocalAzure, debug_logs: LogCapture, capsys: pytest.CaptureFixture[str]
) -> None:
    debug_logs.debug("openai.agents")
    stack = Rotating.new(azure)
    async with stack.aprovider() as aprovider:
        agent = run_readme_block("OpenAI Agents SDK", aprovider=aprovider)["agent"]
        assert isinstance(agent, Agent)

        result = await Runner.run(agent, "hello")
        assert result.final_output
        assert set(stack.slots()) == {"primary"}

        stack.rotate()  # revokes the key the client holds
        result = await Runner.run(agent, "hello again")
        assert result.final_output
        assert aprovider.stats().resends_401 == 1

        stack.rotate()
        streamed = Runner.run_streamed(agent, "stream please")
        events = [event async for event in streamed.stream_events()]
        assert events and streamed.final_output
        assert aprovider.stats().resends_401 == 2
        assert stack.slots()[-1] == "secondary"
    printed = capsys.readouterr()
    assert any(name.startswith("openai.agents") for name in debug_logs.names())
    assert_no_key(stack.keys, *debug_logs.texts, printed.out, printed.err, repr(agent))
