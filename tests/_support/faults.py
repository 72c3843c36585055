"""One surface driving the sync or the async provider + openai client, so each fault case is written once.

The async harness owns a private event loop and runs every step on it with ``run_until_complete``; the aio
SecretClient, the aio credential and the ``AsyncAzureOpenAI`` client all live on that one loop, and background
refresh tasks run whenever a step runs the loop. Waiting for a callback waits on an ``asyncio.Event`` (async)
or a ``threading.Condition`` (sync) — never on a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Literal, TypeVar

from apimvault import (
    AsyncSubscriptionKeyProvider,
    CachePolicy,
    KeyEvent,
    ProviderStats,
    SubscriptionKey,
    SubscriptionKeyProvider,
    create_async_azure_openai,
    create_azure_openai,
)
from apimvault.local import DEPLOYMENT, LocalAzure
from tests._support.core import FakeClock, user_messages

Api = Literal["sync", "async"]
T = TypeVar("T")
MESSAGES = user_messages("fault matrix")


class Recorder:
    """Collects provider callbacks; waitable from threads (sync) and from the harness loop (async)."""

    def __init__(self) -> None:
        self.refreshed: list[KeyEvent] = []
        self.errors: list[KeyEvent] = []
        self.rotated: list[KeyEvent] = []
        self._cond = threading.Condition()
        self.changed: asyncio.Event | None = None  # set by the async harness, on its loop

    def _add(self, bucket: list[KeyEvent], event: KeyEvent) -> None:
        with self._cond:
            bucket.append(event)
            self._cond.notify_all()
        if self.changed is not None:  # async callbacks run on the harness loop
            self.changed.set()

    def callbacks(self) -> dict[str, Callable[[KeyEvent], None]]:
        return {
            "on_refresh": lambda e: self._add(self.refreshed, e),
            "on_error": lambda e: self._add(self.errors, e),
            "on_rotate": lambda e: self._add(self.rotated, e),
        }

    def count(self, what: str) -> int:
        with self._cond:
            return len(getattr(self, what))

    def wait_sync(self, what: str, n: int, timeout: float) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(getattr(self, what)) >= n, timeout)
        assert ok, f"timed out waiting for {n} {what} (have {self.count(what)})"

    async def wait_async(self, what: str, n: int, limit_s: float) -> None:
        assert self.changed is not None
        try:
            async with asyncio.timeout(limit_s):
                while self.count(what) < n:
                    self.changed.clear()
                    if self.count(what) >= n:
                        break
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {n} {what} (have {self.count(what)})") from None


class Harness:
    """Common surface: ``get_key``, ``refresh``, ``chat(stream)``, ``wait(what, n)``, ``stats``, ``close``."""

    api: Api

    def __init__(
        self,
        azure: LocalAzure,
        secret_name: str,
        *,
        policy: CachePolicy,
        clock: FakeClock | None = None,
        client_kwargs: dict[str, Any] | None = None,
        version: str | None = None,
        vault_url: str | None = None,
    ) -> None:
        self.azure = azure
        self.vault_url = vault_url or azure.vault_url
        self.clock = clock or FakeClock()
        self.rec = Recorder()
        self.kwargs: dict[str, Any] = {
            "policy": policy,
            "clock": self.clock,
            "client_kwargs": {"retry_total": 0, **(client_kwargs or {})},
            "version": version,
            **self.rec.callbacks(),
        }
        self.secret_name = secret_name

    # overridden
    def get_key(self) -> SubscriptionKey:
        raise NotImplementedError

    def refresh(self) -> SubscriptionKey:
        raise NotImplementedError

    def chat(self, stream: bool) -> str:
        raise NotImplementedError

    def wait(self, what: str, n: int, timeout: float = 30) -> None:
        raise NotImplementedError

    def settle(self) -> None:
        """Let background work that is already scheduled make progress (async: one loop pass)."""

    def close(self) -> None:
        raise NotImplementedError

    # shared
    provider: SubscriptionKeyProvider | AsyncSubscriptionKeyProvider

    def stats(self) -> ProviderStats:
        return self.provider.stats()

    def current(self) -> SubscriptionKey | None:
        return self.provider.current()

    def current_key(self) -> SubscriptionKey:
        """The cached key, which the test expects to be there."""
        key = self.provider.current()
        assert key is not None, "no key cached"
        return key

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


class SyncHarness(Harness):
    api: Api = "sync"
    provider: SubscriptionKeyProvider

    def __init__(self, azure: LocalAzure, secret_name: str, **kwargs: Any) -> None:
        super().__init__(azure, secret_name, **kwargs)
        self.provider = SubscriptionKeyProvider(self.vault_url, secret_name, **self.kwargs)
        self.client = create_azure_openai(self.provider, max_retries=0, timeout=20)

    def get_key(self) -> SubscriptionKey:
        return self.provider.get_key()

    def refresh(self) -> SubscriptionKey:
        return self.provider.refresh()

    def chat(self, stream: bool) -> str:
        if stream:
            chunks = self.client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reply = self.client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        return reply.choices[0].message.content or ""

    def wait(self, what: str, n: int, timeout: float = 30) -> None:
        self.rec.wait_sync(what, n, timeout)

    def close(self) -> None:
        self.client.close()
        self.provider.close()


class AsyncHarness(Harness):
    api: Api = "async"
    provider: AsyncSubscriptionKeyProvider

    def __init__(self, azure: LocalAzure, secret_name: str, **kwargs: Any) -> None:
        super().__init__(azure, secret_name, **kwargs)
        self.loop = asyncio.new_event_loop()

        async def build() -> None:
            self.rec.changed = asyncio.Event()
            self.provider = AsyncSubscriptionKeyProvider(self.vault_url, secret_name, **self.kwargs)
            self.client = create_async_azure_openai(self.provider, max_retries=0, timeout=20)

        self.run(build())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def get_key(self) -> SubscriptionKey:
        assert isinstance(self.provider, AsyncSubscriptionKeyProvider)
        return self.run(self.provider.get_key())

    def refresh(self) -> SubscriptionKey:
        assert isinstance(self.provider, AsyncSubscriptionKeyProvider)
        return self.run(self.provider.refresh())

    def chat(self, stream: bool) -> str:
        async def go() -> str:
            if stream:
                chunks = await self.client.chat.completions.create(
                    model=DEPLOYMENT,
                    messages=MESSAGES,
                    stream=True,
                )
                return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
            reply = await self.client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
            return reply.choices[0].message.content or ""

        return self.run(go())

    def wait(self, what: str, n: int, timeout: float = 30) -> None:
        self.run(self.rec.wait_async(what, n, timeout))

    def settle(self) -> None:
        self.run(asyncio.sleep(0))

    def close(self) -> None:
        async def shut() -> None:
            await self.client.close()
            assert isinstance(self.provider, AsyncSubscriptionKeyProvider)
            await self.provider.close()

        try:
            self.run(shut())
        finally:
            self.loop.close()


def make(api: Api, azure: LocalAzure, secret_name: str, **kwargs: Any) -> Harness:
    return (SyncHarness if api == "sync" else AsyncHarness)(azure, secret_name, **kwargs)


def outcome(fn: Callable[[], object]) -> tuple[str, BaseException | None]:
    """``("ok", None)`` or ``(exception class name, exception)``."""
    try:
        fn()
    except Exception as exc:
        return type(exc).__name__, exc
    return "ok", None


# ------------------------------------------------------------------------------------------- outcomes


class OutcomeLog:
    """Each fault case's row (what the caller saw), by case id; ``tests/faults/conftest.py`` writes them."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def record(self, case_id: str, **row: Any) -> None:
        self.rows[case_id] = {"id": case_id, **row}


@contextlib.contextmanager
def recorded(log: OutcomeLog, case_id: str, **fixed: Any) -> Iterator[dict[str, Any]]:
    """Record a case's row whatever happens: ``verdict`` is "as documented" only if the block completed.

    A failing (or xfail'ed) case still lands in the table, flagged, with what was observed up to the failure.
    """
    row: dict[str, Any] = {**fixed, "verdict": "DEVIATES (known bug, see xfail)"}
    try:
        yield row
        row["verdict"] = "as documented"
    finally:
        log.record(case_id, **row)
