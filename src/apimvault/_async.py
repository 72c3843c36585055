"""The asyncio provider: the twin of :mod:`apimvault._sync` with tasks instead of threads."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from azure.core.credentials_async import AsyncTokenCredential
from azure.keyvault.secrets.aio import SecretClient

from . import _telemetry  # issue 14
from ._base import DEFAULT_CLIENT_KWARGS, DEFAULT_HEADER, KeyEvent, ProviderBase, log
from ._fetch import map_error, retry_after_of, to_key
from ._key import SubscriptionKey
from ._policy import Action, CachePolicy, Clock, ForceDecision
from ._sync import _fresh_copy
from .exceptions import KeyUnavailableError, VaultUnavailableError

__all__ = ["AsyncSubscriptionKeyProvider"]

_Outcome = tuple[SubscriptionKey | None, BaseException | None]


class AsyncSubscriptionKeyProvider(ProviderBase):
    """The asyncio twin of :class:`~apimvault.SubscriptionKeyProvider` (same arguments and behaviour).

    ``credential=None`` means ``azure.identity.aio.DefaultAzureCredential()``. Like the Azure SDK's aio
    clients, one instance belongs to one event loop. Concurrent misses from any number of tasks share
    one Key Vault read; background refreshes run as tasks.
    """

    def __init__(
        self,
        vault_url: str,
        secret_name: str,
        *,
        credential: AsyncTokenCredential | None = None,
        version: str | None = None,
        policy: CachePolicy | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        header_name: str = DEFAULT_HEADER,
        secret_client: SecretClient | None = None,
        client_kwargs: Mapping[str, Any] | None = None,
        allow_insecure_http: bool = False,
        on_refresh: Callable[[KeyEvent], None] | None = None,
        on_error: Callable[[KeyEvent], None] | None = None,
        on_rotate: Callable[[KeyEvent], None] | None = None,
    ) -> None:
        super().__init__(
            vault_url,
            secret_name,
            version=version,
            policy=policy,
            clock=clock,
            rng=rng,
            header_name=header_name,
            allow_insecure_http=allow_insecure_http,
            on_refresh=on_refresh,
            on_error=on_error,
            on_rotate=on_rotate,
        )
        self._owned: list[Any] = []
        if secret_client is None:
            if credential is None:
                from azure.identity.aio import DefaultAzureCredential

                credential = DefaultAzureCredential()
                self._owned.append(credential)
            secret_client = SecretClient(
                self.vault_url, credential, **{**DEFAULT_CLIENT_KWARGS, **(client_kwargs or {})}
            )
            self._owned.insert(0, secret_client)
        self.secret_client = secret_client
        self.credential = credential  # issue 14: reused for key plus token (apimvault._entra)
        self._task: asyncio.Task[_Outcome] | None = None
        self._fast: tuple[float, SubscriptionKey] | None = None

    @classmethod
    def from_env(cls, **kwargs: Any) -> AsyncSubscriptionKeyProvider:
        """Build from ``AZURE_KEYVAULT_URL`` and ``APIMVAULT_SECRET_NAME`` (see the sync twin)."""
        vault_url, secret_name = cls.env_args(kwargs)
        return cls(vault_url, secret_name, **kwargs)

    # ------------------------------------------------------------------------------ public API

    async def get_key(self) -> SubscriptionKey:
        """The current key. Awaits Key Vault only on a cold start or past the hard limit (single-flight)."""
        fast = self._fast
        if fast is not None and self.clock() < fast[0]:
            return fast[1]
        with self._lock:
            action = self._cache.decide()
            entry = self._cache.entry()
            if action is Action.SERVE and entry is not None:
                self._fast = (self._cache.serve_deadline(), entry.key)
                return entry.key
            self._fast = None
            invalidated = self._cache.invalidated
            may_load = self._cache.may_load()
        if action is Action.SERVE_AND_REFRESH and entry is not None:
            if self._task is None:
                self._start("invalidated" if invalidated else "refresh ahead")
            return entry.key
        if self._task is None and not may_load:
            raise self._no_key_error()
        return await self._await(self._task or self._start("load"))

    async def get(self) -> str:
        """The current key's value, for ``api_key=`` style callables. Never log it."""
        return (await self.get_key()).reveal()

    async def refresh(self) -> SubscriptionKey:
        """Read Key Vault now (joining a read in flight); raise the typed error if it fails."""
        return await self._await(self._task or self._start("refresh"))

    def invalidate(self, *, spread: float = 0.0) -> None:
        """Push invalidation: a ``get_key()`` starts a background refresh (no caller waits).

        ``spread`` delays that refresh by a random part of ``spread`` seconds: pass about
        ``fleet_size / 400`` when every process of a fleet is told at once (BENCHMARKS.md).
        """
        with self._lock:
            self._invalidate(spread)
            self._fast = None

    async def refresh_after_rejection(self, sent: SubscriptionKey) -> SubscriptionKey | None:
        """Async twin of :meth:`SubscriptionKeyProvider.refresh_after_rejection`."""
        for _ in range(2):  # see the sync twin: a joined read may predate the rotation
            with self._lock:
                decision = self._cache.decide_forced(sent.version)
                entry = self._cache.entry()
                if decision is ForceDecision.USE_NEWER:
                    return entry.key if entry is not None else None
                joined = self._task is not None
                if not joined and decision is ForceDecision.RATE_LIMITED:
                    return None
                if not joined:
                    self._cache.note_forced()
                    self._n.add("forced")
            task = self._task or self._start("401 from gateway")
            try:
                key = await self._await(task)
            except KeyUnavailableError:
                return None
            if key != sent:
                return key
            if not joined:
                return None
        return None

    async def close(self) -> None:
        """Cancel a background refresh and close the SecretClient/credential this provider created."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
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

    def _drop_fast(self) -> None:
        self._fast = None

    def _start(self, reason: str) -> asyncio.Task[_Outcome]:
        self._task = asyncio.get_running_loop().create_task(self._run(reason), name="apimvault-refresh")
        return self._task

    @staticmethod
    async def _await(task: asyncio.Task[_Outcome]) -> SubscriptionKey:
        key, error = await asyncio.shield(task)
        if error is not None:
            raise _fresh_copy(error)
        assert key is not None
        return key

    async def _run(self, reason: str) -> _Outcome:
        key: SubscriptionKey | None = None
        error: BaseException | None = None
        try:
            key = await _telemetry.atraced_read(self, reason, self._fetch)  # issue 14: span + metrics if on
        except Exception as exc:
            error = exc
        finally:
            self._task = None
        with self._lock:
            if key is not None:
                pending = self._succeeded(key, reason)
                entry = self._cache.entry()
                self._fast = (self._cache.serve_deadline(), entry.key) if entry is not None else None
            else:
                assert error is not None
                pending = self._failed(error, reason, retry_after_of(error))
        self._emit_all(pending)
        return key, error

    async def _fetch(self) -> SubscriptionKey:
        self._n.add("vault_reads")
        try:
            secret = await self.secret_client.get_secret(self.secret_name, self.version)
        except Exception as exc:
            mapped = map_error(exc, where=self.where)
            if mapped is None:
                log.debug("apimvault: unexpected error reading %s", self.where, exc_info=True)
                raise
            raise mapped from exc
        return to_key(secret, where=self.where, now=self.clock())

    def _no_key_error(self) -> BaseException:
        last = self._cache.last_error
        if last is None:
            return VaultUnavailableError(f"no usable key for {self.where}", secret=self.where)
        return _fresh_copy(last)
