"""LiteLLM (as a library): completion / acompletion with apimvault clients, through a rotation."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

pytest.importorskip("litellm")

import litellm

from apimvault import create_async_azure_openai, create_azure_openai
from apimvault.local import LocalAzure

from .support import LogCapture, Rotating, assert_no_key

pytestmark = pytest.mark.integrations

MODEL = "azure/gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.mark.slow  # LiteLLM's first calls import much of the library (several seconds on a loaded machine)
async def test_litellm_completion_sync_async_streaming_through_rotation(
    azure: LocalAzure, debug_logs: LogCapture, capsys: pytest.CaptureFixture[str], closing: ExitStack
) -> None:
    debug_logs.debug("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm")
    litellm._turn_on_debug()  # LiteLLM's verbose mode: request details logged at DEBUG
    stack = Rotating.new(azure)
    provider = stack.provider()
    try:
        async with stack.aprovider() as aprovider, create_async_azure_openai(aprovider) as aclient:
            # as the README block calls it (the block itself runs as a script: test_readme_blocks.py)
            client = closing.enter_context(create_azure_openai(provider))
            assert (
                litellm.completion(model=MODEL, messages=MESSAGES, client=client).choices[0].message.content
            )
            areply = await litellm.acompletion(model=MODEL, messages=MESSAGES, client=aclient)
            assert areply.choices[0].message.content
            assert set(stack.slots()) == {"primary"}

            stack.rotate()  # revokes the key both providers hold
            reply = litellm.completion(model=MODEL, messages=MESSAGES, client=client)
            assert reply.choices[0].message.content
            assert provider.stats().resends_401 == 1
            reply = await litellm.acompletion(model=MODEL, messages=MESSAGES, client=aclient)
            assert reply.choices[0].message.content
            assert aprovider.stats().resends_401 == 1

            stack.rotate()
            stream = litellm.completion(model=MODEL, messages=MESSAGES, client=client, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream)
            assert provider.stats().resends_401 == 2
            astream = await litellm.acompletion(model=MODEL, messages=MESSAGES, client=aclient, stream=True)
            assert "".join([c.choices[0].delta.content or "" async for c in astream])
            assert aprovider.stats().resends_401 == 2
            assert stack.slots()[-1] == "secondary"
    finally:
        litellm.suppress_debug_info = True
        vars(litellm)["set_verbose"] = False  # a module attribute its stubs do not declare
        provider.close()
    printed = capsys.readouterr()
    assert any(name.startswith("LiteLLM") for name in debug_logs.names())
    assert_no_key(stack.keys, *debug_logs.texts, printed.out, printed.err)
