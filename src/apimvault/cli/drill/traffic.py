"""The drill's traffic: its clients (:class:`Traffic`) and the workers, threads and asyncio tasks
alternating plain and streaming chat completions.

Both kinds of worker share one body: :func:`alternating` says what the next request is and when to stop,
and :func:`measured` records its outcome; only the request itself differs (:func:`chat` / :func:`achat`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ...exceptions import ApimVaultError
from .config import PreflightFailed
from .metrics import ClientSlot, Metrics

if TYPE_CHECKING:  # pragma: no cover
    from .config import DrillPlan
    from .context import DrillContext

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


# How a client reached a version (the provider's refresh reasons, named for the report). In the drill only
# the Event Grid push calls ``provider.refresh()``.
_VIA = {
    "401 from gateway": "401 -> refresh",
    "refresh ahead": "refresh-ahead",
    "refresh": "Event Grid push",
    "invalidated": "invalidate",
}


class Traffic:
    """The drill's clients (half sync, half async, on one asyncio loop of their own) and its workers.

    Owns the client slots, the loop thread and the worker threads; reads the target, the stop event and
    the metrics from the context. Order of use: :meth:`open`, :meth:`load_async`, :meth:`preflight`,
    :meth:`start`, :meth:`join`; :meth:`release` and :meth:`close` always.
    """

    def __init__(self, ctx: DrillContext, plan: DrillPlan, token_scope: str | None) -> None:
        self.ctx = ctx
        self.plan = plan
        self.token_scope = token_scope
        self.policy = plan.policy
        self.slots: list[ClientSlot] = []
        self.threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._credential: Any = None  # the sync clients' (the async ones close their own)
        self._async_error: BaseException | None = None
        self._async_ready = threading.Event()  # the async clients exist
        self._async_load = threading.Event()  # they may load the key
        self._async_loaded = threading.Event()
        self._go = threading.Event()  # traffic starts
        self._async_done = threading.Event()

    # ---------------------------------------------------------------------------- clients

    def _on_refresh(self, slot: ClientSlot) -> Callable[[Any], None]:
        def record(event: Any) -> None:
            reason = _VIA.get(event.reason, event.reason)
            with self.ctx.lock:
                slot.via.append((event.version, reason))

        return record

    def _client_url(self, n: int) -> str:
        """The gateway unit of the ``n``-th client of a kind: sync client ``i`` gets unit ``i``, async client
        ``i`` unit ``i + 1`` (modulo the units), so with two clients of each kind every unit serves both."""
        urls = self.ctx.target.client_urls
        return urls[n % len(urls)]

    def _new_slot(self, kind: str, i: int, provider_type: Any, credential: Any, create: Any) -> ClientSlot:
        """Client ``i`` of ``kind``: a ``provider_type`` provider and the openai client ``create`` builds."""
        from ..config import header_name

        target = self.ctx.target
        slot = ClientSlot(f"{kind}-{i + 1}", kind, None)
        slot.provider = provider_type(
            target.vault_url,
            target.secret_name,
            credential=credential,
            policy=self.policy,
            header_name=header_name(),
            on_refresh=self._on_refresh(slot),
        )
        slot.gateway_url = self._client_url(i if kind == "sync" else i + 1)
        slot.client = create(
            slot.provider,
            azure_endpoint=slot.gateway_url,
            max_retries=0,
            timeout=30,
            token_scope=self.token_scope,
        )
        return slot

    def open(self) -> None:
        """Build the sync clients, start the loop thread (which builds the async ones) and load the sync
        clients' key."""
        from azure.identity import DefaultAzureCredential

        from ... import SubscriptionKeyProvider, create_azure_openai

        self._credential = DefaultAzureCredential()
        for i in range(self.plan.sync_clients):
            slot = self._new_slot("sync", i, SubscriptionKeyProvider, self._credential, create_azure_openai)
            self.slots.append(slot)
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._run_loop, name="apimvault-drill-async", daemon=True).start()
        if not self._async_ready.wait(60):
            raise RuntimeError("the async clients did not start")
        if self._async_error is not None:
            raise self._async_error
        for slot in self.slots:
            if slot.kind == "sync":
                slot.provider.get_key()

    def load_async(self, version: str) -> None:
        """Let the async clients load the key, then check that every client holds ``version``."""
        self._async_load.set()
        if not self._async_loaded.wait(60):
            raise RuntimeError("the async clients did not load the key")
        if self._async_error is not None:
            raise self._async_error
        for slot in self.slots:
            key = slot.provider.current()
            if key is None or key.version != version:
                raise ApimVaultError(
                    f"{slot.name} loaded version {key.version if key else None}, expected {version}"
                )

    def _run_loop(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._async_main())
        except BaseException as exc:
            self._async_error = exc
            self._async_ready.set()
        finally:
            self._async_done.set()
            self._loop.close()

    async def _async_main(self) -> None:
        from azure.identity.aio import DefaultAzureCredential

        from ... import AsyncSubscriptionKeyProvider, create_async_azure_openai

        credential = DefaultAzureCredential()
        mine: list[ClientSlot] = []
        loop = asyncio.get_running_loop()
        try:
            for i in range(self.plan.async_clients):
                mine.append(
                    self._new_slot(
                        "async", i, AsyncSubscriptionKeyProvider, credential, create_async_azure_openai
                    )
                )
            with self.ctx.lock:
                self.slots.extend(mine)
            self._async_ready.set()
            await loop.run_in_executor(None, self._async_load.wait)
            try:
                for slot in mine:
                    await slot.provider.get_key()
            except BaseException as exc:
                self._async_error = exc
                raise
            finally:
                self._async_loaded.set()
            await loop.run_in_executor(None, self._go.wait)
            stop, metrics, deployment = self.ctx.stop, self.ctx.metrics, self.ctx.target.deployment
            tasks = [
                asyncio.create_task(async_worker(stop, metrics, mine[i % len(mine)], deployment, i))
                for i in range(self.plan.asyncio_tasks)
            ]
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for slot in mine:
                with contextlib.suppress(Exception):
                    await slot.client.close()
                with contextlib.suppress(Exception):
                    await slot.provider.close()
            await credential.close()

    # ---------------------------------------------------------------------------- traffic

    def preflight(self) -> None:
        """One request of each kind (plain and streaming, sync and async) before anything is rotated.

        A wrong deployment, API version or gateway fails every request; rotating the keys then (both of
        them, against real Azure) would prove nothing. Raises :class:`PreflightFailed`.
        """
        deployment = self.ctx.target.deployment
        sync = next(s for s in self.slots if s.kind == "sync")
        asyncs = [s for s in self.slots if s.kind == "async"]
        for streaming in (False, True):
            kind = f"sync {'streaming' if streaming else 'plain'}"
            try:
                chat(sync.client, deployment, streaming)
            except Exception as exc:
                raise PreflightFailed(kind, exc) from exc
            if asyncs and self._loop is not None:
                kind = f"async {'streaming' if streaming else 'plain'}"
                request = achat(asyncs[0].client, deployment, streaming)
                try:
                    asyncio.run_coroutine_threadsafe(request, self._loop).result(60)
                except Exception as exc:
                    raise PreflightFailed(kind, exc) from exc
        self.ctx.log("preflight: a plain and a streaming request of each kind (sync, async) succeeded")

    def start(self) -> None:
        """Start the worker threads and let the asyncio tasks go."""
        self._go.set()
        sync_slots = [s for s in self.slots if s.kind == "sync"]
        stop, metrics, deployment = self.ctx.stop, self.ctx.metrics, self.ctx.target.deployment
        self.threads = [
            threading.Thread(
                target=sync_worker,
                args=(stop, metrics, sync_slots[i % len(sync_slots)], deployment, i),
                daemon=True,
                name=f"drill-{i}",
            )
            for i in range(self.plan.threads)
        ]
        for worker in self.threads:
            worker.start()

    def join(self) -> None:
        """Wait for the workers once ``stop`` is set."""
        for worker in self.threads:
            worker.join(60)
        self._async_done.wait(60)

    def ranks(self) -> list[int]:
        """The rank of each client's current version (hold ``ctx.lock``)."""
        ranks = []
        for slot in self.slots:
            key = slot.provider.current()
            ranks.append(self.ctx.rank(key.version if key is not None else None))
        return ranks

    def push(self, event: dict[str, Any]) -> int:
        """Hand an Event Grid event to every client (the core's helpers); the number refreshed."""
        from ..._events import arefresh_from_event, refresh_from_event

        sync = [s.provider for s in self.slots if s.kind == "sync"]
        refreshed = len(refresh_from_event(event, sync))
        asyncs = [s.provider for s in self.slots if s.kind == "async"]
        if asyncs and self._loop is not None:
            future = asyncio.run_coroutine_threadsafe(arefresh_from_event(event, asyncs), self._loop)
            refreshed += len(future.result(30))
        return refreshed

    def release(self) -> None:
        """Let the loop thread run to its end (also when the drill stopped before traffic)."""
        self._go.set()
        self._async_load.set()

    def close(self) -> None:
        """Close the sync clients, their providers and their credential (the loop closes the async ones)."""
        for slot in self.slots:
            if slot.kind == "sync":
                with contextlib.suppress(Exception):
                    slot.client.close()
                with contextlib.suppress(Exception):
                    slot.provider.close()
        if self._credential is not None:
            with contextlib.suppress(Exception):
                self._credential.close()
