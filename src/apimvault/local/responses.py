"""The Responses API of the local Azure OpenAI backend (``POST /openai/v1/responses``, ``/openai/responses``).

Shapes follow Microsoft's v1 spec (``specification/ai/data-plane/OpenAI.v1/azure-v1-v1-generated.json`` in
``Azure/azure-rest-api-specs``: ``OpenAI.Response``, the ``OpenAI.ResponseStreamEvent`` union) and what
openai-python 3.x parses (``src/openai/types/responses/``). Answers are deterministic, as for chat
completions: a text answer (the chat reply for the last user text), JSON for ``text.format``
``json_schema`` / ``json_object``, or ``function_call`` items by the tool rule of
:mod:`apimvault.local._oai_shapes` (a tool result in the input, ``function_call_output``, ends the loop).

Streaming sends the documented event sequence with a ``sequence_number`` on each event:
``response.created``, ``response.in_progress``, per output item ``response.output_item.added``, then for a
message ``response.content_part.added``, ``response.output_text.delta`` (per word),
``response.output_text.done``, ``response.content_part.done``, or for a function call
``response.function_call_arguments.delta`` / ``.done``; ``response.output_item.done``; finally
``response.completed``. No ``[DONE]`` line (the Responses stream ends with the connection).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import _oai_shapes as shapes
from ._chat_shapes import count_tokens as _count
from ._chat_shapes import text_of as _text_of
from ._chat_shapes import word_pieces as _words

Emit = Callable[[str, dict[str, Any]], Awaitable[None]]


class ResponsesError(ValueError):
    """A request the Responses API refuses: message and the offending parameter."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _input_items(raw: Any) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": raw}]
    if isinstance(raw, list) and all(isinstance(i, dict) for i in raw):
        return list(raw)
    raise ResponsesError("Invalid type for 'input': expected a string or an array of input items.", "input")


class ResponsesApi:
    """Builds Responses API answers; the backend owns routing, auth, deployments and faults."""

    def __init__(self, reply_for: Callable[[str], str], model_version: Callable[[str], str]) -> None:
        self._reply_for = reply_for
        self._model_version = model_version

    def plan(self, deployment: str, body: dict[str, Any]) -> dict[str, Any]:
        """Validate the request and decide the output items (without ids' final statuses)."""
        items = _input_items(body.get("input"))
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise ResponsesError("Invalid type for 'instructions': expected a string.", "instructions")
        tools = shapes.function_tools(body.get("tools"))
        choice = body.get("tool_choice")
        if choice in ("required",) and not tools:
            raise ResponsesError(
                "Tool choice 'required' must be specified with 'tools' parameter.", "tool_choice"
            )
        wanted = choice.get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
        if wanted is not None and not any(t["name"] == wanted for t in tools):
            raise ResponsesError(
                f"Tool choice 'function' with name '{wanted}' not found in 'tools' parameter.", "tool_choice"
            )
        users = [i for i in items if i.get("role") == "user"]
        last = _text_of(users[-1].get("content")) if users else ""
        has_result = any(i.get("type") == "function_call_output" for i in items)
        chosen = shapes.chosen_tools(tools, choice, body.get("parallel_tool_calls"), has_result)
        output = self._output(body, chosen, last)
        input_tokens = sum(_count(_text_of(i.get("content", i.get("output", "")))) for i in items)
        if isinstance(instructions, str):
            input_tokens += _count(instructions)
        output_tokens = sum(
            _count(o["arguments"]) if o["type"] == "function_call" else _count(o["content"][0]["text"])
            for o in output
        )
        text_cfg = body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}}
        response = {
            "id": "resp_" + secrets.token_hex(24),
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": instructions,
            "max_output_tokens": body.get("max_output_tokens"),
            "model": self._model_version(deployment),
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True) is not False,
            "temperature": body.get("temperature", 1.0),
            "text": text_cfg,
            "tool_choice": choice if choice is not None else "auto",
            "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0),
            "truncation": body.get("truncation", "disabled"),
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            },
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }
        return response

    def _output(self, body: dict[str, Any], chosen: list[dict[str, Any]], last: str) -> list[dict[str, Any]]:
        """The output items: a ``function_call`` per chosen tool, else one assistant message (structured
        JSON for ``text.format``, else the reply for the last user text)."""
        seed = last
        output: list[dict[str, Any]] = []
        if chosen:
            for index, tool in enumerate(chosen):
                output.append(
                    {
                        "type": "function_call",
                        "id": "fc_" + shapes.call_id("", seed, tool["name"], index),
                        "call_id": shapes.call_id("call_", seed, tool["name"], index),
                        "name": tool["name"],
                        "arguments": shapes.arguments_for(tool, seed),
                        "status": "completed",
                    }
                )
        else:
            text_cfg = body.get("text")
            fmt = text_cfg.get("format") if isinstance(text_cfg, dict) else None
            structured = shapes.structured_content(fmt, seed)
            text = structured if structured is not None else self._reply_for(last)
            output.append(
                {
                    "type": "message",
                    "id": "msg_" + secrets.token_hex(12),
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
                }
            )
        return output

    @staticmethod
    def events(response: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """The streamed event sequence for a planned ``response`` (each with its ``sequence_number``)."""
        events: list[tuple[str, dict[str, Any]]] = []

        def add(kind: str, **fields: Any) -> None:
            events.append((kind, {"type": kind, "sequence_number": len(events), **fields}))

        start = {**response, "status": "in_progress", "output": [], "usage": None}
        add("response.created", response=start)
        add("response.in_progress", response=start)
        for index, item in enumerate(response["output"]):
            if item["type"] == "function_call":
                add(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "arguments": "", "status": "in_progress"},
                )
                args = item["arguments"]
                step = max(1, len(args) // 4)
                for at in range(0, len(args), step):
                    add(
                        "response.function_call_arguments.delta",
                        item_id=item["id"],
                        output_index=index,
                        delta=args[at : at + step],
                    )
                add(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=args,
                )
            else:
                part = item["content"][0]
                add(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "status": "in_progress", "content": []},
                )
                empty = {**part, "text": ""}
                add(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=empty,
                )
                for word in _words(part["text"]):
                    add(
                        "response.output_text.delta",
                        item_id=item["id"],
                        output_index=index,
                        content_index=0,
                        delta=word,
                        logprobs=[],
                    )
                add(
                    "response.output_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=part["text"],
                    logprobs=[],
                )
                add(
                    "response.content_part.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            add("response.output_item.done", output_index=index, item=item)
        add("response.completed", response=response)
        return events


def sse_event(kind: str, data: dict[str, Any]) -> bytes:
    """One Responses API SSE frame: ``event: <type>`` and ``data: <json>``."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
