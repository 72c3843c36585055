"""The asyncio provider: the twin of :mod:`apimvault._sync` with tasks instead of threads."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable
from types import TracebackType

from azure.core.credentials_async import AsyncTokenCredential
from azure.keyvault.secrets.aio import SecretClient

from . import _telemetry
from ._base import ProviderBase
from ._key import SubscriptionKey
from ._model import Fetched, Read, Reason
from ._policy import Action
from ._retry import AsyncNoRetryAfterSleep
from ._settings import FLIGHT_WAIT_LIMIT
from ._vault_errors import flight_timeout, fresh_copy
from ._vaultclient import AsyncDeadlineCredential
from .exceptions import ConfigurationError, KeyUnavailableError

__all__ = ["AsyncSubscriptionKeyProvider"]

_Outcome = tuple[SubscriptionKey | None, BaseException | None]


@dataclasses.dataclass
class _Flight:
    """One in-flight Key Vault read (a task) that any number of tasks can await."""

    reason: Reason
    generation: int
    task: asyncio.Task[_Outcome] | None = None

    async def settle(self, where: str, closed: Callable[[], BaseException]) -> _Outcome:
        """Await the read's end, bounded by ``FLIGHT_WAIT_LIMIT`` (then raise VaultUnavailableError). A read
        cancelled by ``close()`` raises ``closed()``, not a CancelledError nobody asked for."""
        assert self.task is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self.task), FLIGHT_WAIT_LIMIT)
        except TimeoutError:
            raise flight_timeout(where) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.task.cancelled() and (current is None or not current.cancelling()):
                raise closed() from None
            raise

    async def outcome(self, where: str, closed: Callable[[], BaseException]) -> SubscriptionKey:
        """Await (bounded) and return the key or raise the read's error."""
        key, error = await self.settle(where, closed)
        if error is not None:
            raise fresh_copy(error)
        assert key is not None
        return key


class AsyncSubscriptionKeyProvider(ProviderBase[AsyncTokenCredential, SecretClient]):
    """The asyncio twin of :class:`~apimvault.SubscriptionKeyProvider` (same arguments and behaviour).

    ``credential=None`` means ``azure.identity.aio.DefaultAzureCredential()``. Like the Azure SDK's aio
    clients, one instance belongs to one event loop: the first one it runs on. Used from another loop
    (a second ``asyncio.run()``, a loop in another thread) it raises :class:`ConfigurationError` saying
    so, instead of failing every Key Vault read with ``Event loop is closed``. Concurrent misses from
    any number of tasks share one Key Vault read; background refreshes run as tasks.
    """

    _secret_client_class = SecretClient

    _identity_module = "azure.identity.aio"
    _retry_policy_class = AsyncNoRetryAfterSleep
    _deadline_class = AsyncDeadlineCredential
    _default_sleep = staticmethod(asyncio.sleep)

    _loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------------------ public API

    async def get_key(self) -> SubscriptionKey:
        """The current key. Awaits Key Vault only on a cold start or past the hard limit (single-flight)."""
        if asyncio.get_running_loop() is not self._loop:
            self._bind_loop()
        key = self._fast_key()
        if key is not None:
            return key
        with self._lock:
            action, key, reason = self._decide()
            if key is not None:
                if action is Action.SERVE_AND_REFRESH and self._flight is None:
                    self._start(reason)
                return key
            flight = self._flight or self._start(reason)
        return await flight.outcome(self.where, self._closed_error)

    async def get(self) -> str:
        """The current key's value, for ``api_key=`` style callables. Never log it."""
        return (await self.get_key()).reveal()

    async def refresh(self) -> SubscriptionKey:
        """Read Key Vault now (a read in flight that started before this call is awaited, not trusted);
        raise the typed error if it fails."""
        self._bind_loop()
        with self._lock:
            self._check_open()
            wanted = self._push()
        while True:
            with self._lock:
                self._check_open()
                flight = self._flight or self._start("refresh")
            if flight.generation >= wanted:
                return await flight.outcome(self.where, self._closed_error)
            await flight.settle(self.where, self._closed_error)

    async def refresh_after_rejection(self, sent: SubscriptionKey) -> SubscriptionKey | None:
        """Async twin of :meth:`SubscriptionKeyProvider.refresh_after_rejection`."""
        self._bind_loop()
        may_wait, reads = True, 0
        while reads < 2:  # see the sync twin: a joined read may predate the rotation; the wait
            with self._lock:
                self._check_open()
                stop, newer, joined, wait = self._forced(sent, may_wait=may_wait)
                flight = None if stop or wait > 0 else self._flight or self._start("401 from gateway")
            if wait > 0:
                may_wait = False
                await self._sleep(wait)
                continue
            reads += 1
            if flight is None:
                return newer or self._fall_back(sent)
            try:
                key = await flight.outcome(self.where, self._closed_error)
            except KeyUnavailableError:
                return self._fall_back(sent)
            if key != sent:
                return key
            if not joined:
                break
        return self._fall_back(sent)

    async def close(self) -> None:
        """Cancel a background refresh and close the SecretClient/credential this provider created.

        From then on every read (and one in flight) raises :class:`~apimvault.ConfigurationError` saying
        the provider is closed."""
        self._mark_closed()
        flight, self._flight = self._flight, None
        if flight is not None and flight.task is not None and not flight.task.done():
            flight.task.cancel()
        for resource in self._owned:
            await resource.close()
        self._owned.clear()

    async def __aenter__(self) -> AsyncSubscriptionKeyProvider:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -------------------------------------------------------------------------------- internals

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise ConfigurationError(
                f"{type(self).__name__} for {self.where} belongs to the event loop it first ran on (its aio "
                "SecretClient's connections do); this is another loop. Create one provider per event loop "
                "(e.g. inside the coroutine given to asyncio.run()), or SubscriptionKeyProvider from threads"
            )

    def _after_fork(self) -> None:
        super()._after_fork()
        self._loop = None

    def _start(self, reason: Reason) -> _Flight:
        """Under the lock: start a read as a task."""
        flight = self._flight = _Flight(reason, self._begin())
        flight.task = asyncio.get_running_loop().create_task(self._run(flight), name="apimvault-refresh")
        return flight

    async def _run(self, flight: _Flight) -> _Outcome:
        fetched: Fetched | None = None
        error: BaseException | None = None
        pending = []
        try:
            fetched = await _telemetry.atraced_read(
                self, flight.reason, functools.partial(self._fetch, flight.reason)
            )
        except Exception as exc:
            error = exc
        finally:
            if self._closed:  # closed under the read: its outcome is the closed error
                fetched, error = None, self._closed_error()
            with self._lock:
                if self._flight is flight:
                    pending = self._finish(fetched, error, flight.reason, flight.generation)
        self._emit_all(pending)
        return (fetched.key if fetched else None), error

    async def _fetch(self, reason: Reason) -> Fetched:
        step: Fetched | Read = self._first_read(reason)
        vault = self.secret_client
        while not isinstance(step, Fetched):
            read = step
            try:
                if read.listing:
                    found = [v async for v in vault.list_properties_of_secret_versions(self.secret_name)]
                    step = self._pick_version(found, read)
                else:
                    step = self._read_done(await vault.get_secret(self.secret_name, read.version), read)
            except Exception as exc:
                step = self._read_failed(exc, read)
        return step
