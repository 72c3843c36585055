"""The wire shapes of the local Azure OpenAI backend's answers: chat completions (whole and streamed),
embeddings vectors, Azure's content-filter annotations, and the deterministic replies they carry.

Shapes follow ``openai/openai-python`` 3.x and Microsoft's inference specs (see
:mod:`apimvault.local.openai_backend`, which validates requests and sends these).
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

SYSTEM_FINGERPRINT = "fp_apimvault"

_FILTER_OK = {"filtered": False, "severity": "safe"}
CONTENT_FILTER_RESULTS = {
    "hate": _FILTER_OK,
    "self_harm": _FILTER_OK,
    "sexual": _FILTER_OK,
    "violence": _FILTER_OK,
}
_DETECTED_NOT = {"filtered": False, "detected": False}
# The v1 spec's AzureContentFilterResultForPrompt requires "jailbreak" and "indirect_attack" (Prompt Shields).
PROMPT_FILTER_RESULTS = [
    {
        "prompt_index": 0,
        "content_filter_results": {
            **CONTENT_FILTER_RESULTS,
            "jailbreak": _DETECTED_NOT,
            "indirect_attack": _DETECTED_NOT,
        },
    }
]

# ------------------------------------------------------------------------------------------- replies


def reply_for(text: str) -> str:
    """The deterministic assistant reply for a last user message ``text``."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return f"apimvault local reply to {digest}."


def word_pieces(text: str) -> list[str]:
    """``text`` in stream pieces of one word each (joined, they are the text again)."""
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]]


def reply_pieces(text: str) -> list[str]:
    """The reply for ``text`` in stream pieces."""
    return word_pieces(reply_for(text))


def split_json(text: str) -> list[str]:
    """A JSON answer in a few stream pieces (joined, they are the text again)."""
    step = max(1, len(text) // 6)
    return [text[i : i + step] for i in range(0, len(text), step)]


def text_of(content: Any) -> str:
    """The text of a message's ``content`` (a string, or a list of parts with ``text``)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def count_tokens(text: str) -> int:
    """The local service's token count: one per word, at least one."""
    return max(1, len(text.split()))


def embedding_for(item: str, dimensions: int) -> list[float]:
    """The deterministic unit vector for one embeddings input item."""
    raw = hashlib.shake_256(item.encode("utf-8")).digest(2 * dimensions)
    values = [(v - 32768) / 32768.0 for v in struct.unpack(f"<{dimensions}H", raw)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [round(v / norm, 7) for v in values]


def sse(event: dict[str, Any] | str) -> bytes:
    """One server-sent event line (``data: ...``) for a JSON event or a plain string (``[DONE]``)."""
    data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


# ----------------------------------------------------------------------------------- chat completions


def chat_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "completion_tokens": completion_tokens,
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens_details": {
            "accepted_prediction_tokens": 0,
            "audio_tokens": 0,
            "reasoning_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
    }


def chat_completion(
    ident: str,
    created: int,
    model: str,
    pieces: list[str],
    calls: list[dict[str, Any]],
    finish: str,
    usage: dict[str, Any],
) -> dict[str, Any]:
    """A ``chat.completion`` body: the pieces joined as content, or the tool calls."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if calls else "".join(pieces),
        "refusal": None,
        "annotations": [],
    }
    if calls:
        message["tool_calls"] = calls
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "prompt_filter_results": PROMPT_FILTER_RESULTS,
        "choices": [
            {
                "index": 0,
                "finish_reason": finish,
                "logprobs": None,
                "message": message,
                "content_filter_results": CONTENT_FILTER_RESULTS,
            }
        ],
        "usage": usage,
    }


def _chunk(
    ident: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None,
    filters: dict[str, Any],
) -> dict[str, Any]:
    return {
        "choices": [
            {
                "content_filter_results": filters,
                "delta": delta,
                "finish_reason": finish_reason,
                "index": 0,
                "logprobs": None,
            }
        ],
        "created": created,
        "id": ident,
        "model": model,
        "object": "chat.completion.chunk",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def _tool_call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """As OpenAI streams tool calls: a delta with the call's index, id, type and name (arguments ""),
    then argument fragments carrying only the index."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(calls):
        head = {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""},
        }
        delta: dict[str, Any] = {"tool_calls": [head]}
        if index == 0:
            delta = {"content": None, "refusal": None, "role": "assistant", "tool_calls": [head]}
        deltas.append(delta)
        args = call["function"]["arguments"]
        step = max(1, len(args) // 4)
        for at in range(0, len(args), step):
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": args[at : at + step]}}]})
    return deltas


def chat_stream_events(
    ident: str,
    created: int,
    model: str,
    pieces: list[str],
    calls: list[dict[str, Any]],
    finish: str,
    usage: dict[str, Any] | None,
) -> list[dict[str, Any] | str]:
    """Azure's streaming sequence: a first ``choices: []`` chunk carrying ``prompt_filter_results``, a role
    chunk (or the tool calls' deltas), content chunks, a finish chunk, an optional usage chunk, ``[DONE]``."""
    body: list[dict[str, Any]] = []
    if calls:
        body.extend(_chunk(ident, created, model, d, None, {}) for d in _tool_call_deltas(calls))
    else:
        role = {"content": "", "refusal": None, "role": "assistant"}
        body.append(_chunk(ident, created, model, role, None, {}))
        body.extend(
            _chunk(ident, created, model, {"content": p}, None, CONTENT_FILTER_RESULTS) for p in pieces
        )
    events: list[dict[str, Any] | str] = [
        {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": PROMPT_FILTER_RESULTS,
        },
        *body,
        _chunk(ident, created, model, {}, finish, {}),
    ]
    if usage is not None:
        events.append(
            {
                "choices": [],
                "created": created,
                "id": ident,
                "model": model,
                "object": "chat.completion.chunk",
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "usage": usage,
            }
        )
    events.append("[DONE]")
    return events
