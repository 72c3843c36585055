"""OpenAI Agents SDK: agents on its default OpenAIResponsesModel (a tool, structured output) and on
OpenAIChatCompletionsModel, with apimvault clients, through rotations."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("agents")

from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncAzureOpenAI
from pydantic import BaseModel

from apimvault import create_async_azure_openai
from apimvault.local import LocalAzure

from .support import LogCapture, Rotating, assert_no_key

pytestmark = pytest.mark.integrations

set_tracing_disabled(True)  # the SDK uploads traces to api.openai.com otherwise


# As the README block builds them (the block itself runs as a script: test_readme_blocks.py).
class Weather(BaseModel):
    city: str
    celsius: int


@function_tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"18 C in {city}"


def _weather_agent(responses_client: AsyncAzureOpenAI) -> Agent[Any]:
    return Agent(
        name="forecaster",
        instructions="Look the weather up, then answer.",
        model=OpenAIResponsesModel(model="gpt-4o-mini", openai_client=responses_client),
        tools=[get_weather],
        output_type=Weather,
    )


def _agent(client: AsyncAzureOpenAI) -> Agent[Any]:
    model = OpenAIChatCompletionsModel(model="gpt-4o-mini", openai_client=client)
    return Agent(name="assistant", instructions="Answer briefly.", model=model)


async def test_openai_agents_run_and_stream_through_rotation(
    azure: LocalAzure, debug_logs: LogCapture, capsys: pytest.CaptureFixture[str]
) -> None:
    debug_logs.debug("openai.agents")
    stack = Rotating.new(azure)
    async with stack.aprovider() as aprovider, create_async_azure_openai(aprovider) as client:
        agent = _agent(client)
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


async def test_openai_agents_default_responses_model_calls_a_tool_and_returns_structured_output(
    azure: LocalAzure, debug_logs: LogCapture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 22.7 done-when: the default Responses model runs through rotations with 0 failed calls."""
    debug_logs.debug("openai.agents")
    stack = Rotating.new(azure)
    async with (
        stack.aprovider() as aprovider,
        create_async_azure_openai(aprovider, api_version="2025-04-01-preview") as responses_client,
    ):
        agent, weather = _weather_agent(responses_client), Weather
        assert isinstance(agent, Agent) and issubclass(weather, BaseModel)
        before = azure.openai.counters["Responses"]

        runs: list[Any] = []
        result = await Runner.run(agent, "weather in Oslo?")
        runs.append(result)
        stack.rotate()  # revokes the key the client holds
        runs.append(await Runner.run(agent, "weather in Bergen?"))
        stack.rotate()
        streamed = Runner.run_streamed(agent, "weather in Tromsø?")
        events = [event async for event in streamed.stream_events()]
        assert events
        runs.append(streamed)

        for run in runs:
            assert isinstance(run.final_output, weather)  # schema-valid structured output
            calls: list[Any] = [i for i in run.new_items if i.type == "tool_call_item"]
            outputs: list[Any] = [i for i in run.new_items if i.type == "tool_call_output_item"]
            assert [c.raw_item.name for c in calls] == ["get_weather"]  # the tool was called ...
            assert [o.output for o in outputs] == [f"18 C in {_city(c.raw_item.arguments)}" for c in calls]
        # 0 failed calls: two model calls per run (tool call, then the answer), every one answered; the only
        # refusals are the two revoked keys, each re-sent once.
        assert azure.openai.counters["Responses"] - before == 6
        assert aprovider.stats().resends_401 == 2
        assert stack.slots()[-1] == "secondary"
    printed = capsys.readouterr()
    assert_no_key(stack.keys, *debug_logs.texts, printed.out, printed.err, repr(agent))


def _city(arguments: str) -> str:
    import json

    city = json.loads(arguments)["city"]
    assert isinstance(city, str)
    return city
