"""Traffic workers: threads and asyncio tasks alternating plain and streaming chat completions.

Both kinds share one body: :func:`alternating` says what the next request is and when to stop, and
:func:`measured` records its outcome; only the request itself differs (:func:`chat` / :func:`achat`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from .metrics import ClientSlot, Metrics

MESSAGES = [{"role": "user", "content": "Rotation drill: say something short."}]


def alternating(stop: threading.Event, n: int) -> Iterator[bool]:
    """``streaming`` for each next request of worker ``n`` (odd workers start streaming) until ``stop``."""
    streaming = n % 2 == 1
    while not stop.is_set():
        yield streaming
        streaming = not streaming


@contextlib.contextmanager
def measured(metrics: Metrics, streaming: bool) -> Iterator[None]:
    """Record the request in the block as ok or failed (an ``Exception`` ends the block, not the worker)."""
    started = time.monotonic()
    try:
        yield
    except Exception as exc:
        metrics.fail(time.monotonic() - started, streaming, exc)
    else:
        metrics.ok(time.monotonic() - started, streaming)


def chat(client: Any, deployment: str, streaming: bool) -> None:
    """One chat completion with a sync client, the stream read to its end."""
    if streaming:
        with client.chat.completions.create(
            model=deployment, messages=MESSAGES, max_tokens=16, stream=True
        ) as stream:
            for _chunk in stream:
                pass
    else:
        client.chat.completions.create(model=deployment, messages=MESSAGES, max_tokens=16)


async def achat(client: Any, deployment: str, streaming: bool) -> None:
    """One chat completion with an async client, the stream read to its end."""
    if streaming:
        stream = await client.chat.completions.create(
            model=deployment, messages=MESSAGES, max_tokens=16, stream=True
        )
        async with stream:
            async for _chunk in stream:
                pass
    else:
        await client.chat.completions.create(model=deployment, messages=MESSAGES, max_tokens=16)


def sync_worker(stop: threading.Event, metrics: Metrics, slot: ClientSlot, deployment: str, n: int) -> None:
    for streaming in alternating(stop, n):
        with measured(metrics, streaming):
            chat(slot.client, deployment, streaming)


async def async_worker(
    stop: threading.Event, metrics: Metrics, slot: ClientSlot, deployment: str, n: int
) -> None:
    for streaming in alternating(stop, n):
        with measured(metrics, streaming):
            await achat(slot.client, deployment, streaming)
