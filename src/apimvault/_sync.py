"""The synchronous provider: a thin shell of locks and threads around :class:`~apimvault._policy.KeyCache`."""

from __future__ import annotations

import copy
import dataclasses
import random
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from azure.core.credentials import TokenCredential
from azure.keyvault.secrets import SecretClient

from . import _telemetry  # issue 14
from ._base import DEFAULT_CLIENT_KWARGS, DEFAULT_HEADER, KeyEvent, ProviderBase, log
from ._fetch import map_error, retry_after_of, to_key
from ._key import SubscriptionKey
from ._policy import Action, CachePolicy, Clock, ForceDecision
from .exceptions import KeyUnavailableError, VaultUnavailableError

__all__ = ["SubscriptionKeyProvider"]


@dataclasses.dataclass
class _Flight:
    """One in-flight Key Vault read that any number of threads can wait for."""

    reason: str
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    key: SubscriptionKey | None = None
    error: BaseException | None = None

    def outcome(self) -> SubscriptionKey:
        self.done.wait()
        if self.error is not None:
            raise _fresh_copy(self.error)
        assert self.key is not None
        return self.key


def _fresh_copy(error: BaseException) -> BaseException:
    """A copy of ``error`` to raise in one more thread, so threads never share a traceback."""
    clone = copy.copy(error)
    clone.__traceback__ = None
    clone.__cause__ = error.__cause__
    return clone


class SubscriptionKeyProvider(ProviderBase):
    """Serves the APIM key from Key Vault: cached, refreshed ahead, single-flight, stale-if-error.

    Args:
        vault_url: ``https://<vault>.vault.azure.net``.
        secret_name: the secret holding the key.
        credential: any ``TokenCredential``; ``None`` means ``DefaultAzureCredential()`` (owned and
            closed by the provider).
        version: pin one secret version (rotation then needs a new pin).
        policy: a :class:`CachePolicy` (TTL, jitter, refresh margin, max staleness, back-off).
        clock: returns Unix seconds; inject one in tests. ``rng``: the jitter source.
        header_name: the header APIM reads (``Ocp-Apim-Subscription-Key``; ``api-key`` if APIM was
            configured so).
        secret_client: a ready ``SecretClient`` (then ``credential``/``client_kwargs`` are ignored).
        client_kwargs: extra ``SecretClient`` keyword arguments (transport, retries, timeouts).
        allow_insecure_http: allow ``http://`` endpoints. **Security:** only for loopback tests.
        on_refresh / on_error / on_rotate: callbacks receiving a :class:`KeyEvent` (never the key).

    ``get_key()`` is the hot path: a fresh key costs one clock read and no lock. Within
    ``refresh_margin`` of the end of the fresh period one background thread refreshes while callers
    keep the current key; only a cold start or a key past its hard limit makes callers wait, and then
    all of them wait for the same single read.
    """

    def __init__(
        self,
        vault_url: str,
        secret_name: str,
        *,
        credential: TokenCredential | None = None,
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
                from azure.identity import DefaultAzureCredential

                credential = DefaultAzureCredential()
                self._owned.append(credential)
            secret_client = SecretClient(
                self.vault_url, credential, **{**DEFAULT_CLIENT_KWARGS, **(client_kwargs or {})}
            )
            self._owned.insert(0, secret_client)
        self.secret_client = secret_client
        self.credential = credential  # issue 14: reused for key plus token (apimvault._entra)
        self._flight: _Flight | None = None
        self._fast: tuple[float, SubscriptionKey] | None = None

    @classmethod
    def from_env(cls, **kwargs: Any) -> SubscriptionKeyProvider:
        """Build from ``AZURE_KEYVAULT_URL`` and ``APIMVAULT_SECRET_NAME`` (optional
        ``APIMVAULT_SECRET_VERSION``, ``APIMVAULT_HEADER_NAME``); keyword arguments as for the constructor."""
        vault_url, secret_name = cls.env_args(kwargs)
        return cls(vault_url, secret_name, **kwargs)

    # ------------------------------------------------------------------------------ public API

    def get_key(self) -> SubscriptionKey:
        """The current key. Blocks only on a cold start or past the hard limit (then single-flight)."""
        fast = self._fast
        if fast is not None and self.clock() < fast[0]:
            return fast[1]
        return self._get_slow()

    def get(self) -> str:
        """The current key's value, for ``api_key=`` style callables. Never log it."""
        return self.get_key().reveal()

    def refresh(self) -> SubscriptionKey:
        """Read Key Vault now (joining a read already in flight) and return the result.

        Raises the typed error if the read fails; the cached key, if any, stays in use.
        """
        with self._lock:
            flight, run = self._join_or_start("refresh")
        if run:
            self._run(flight)
        return flight.outcome()

    def invalidate(self, *, spread: float = 0.0) -> None:
        """Push invalidation: a ``get_key()`` starts a background refresh (no caller waits).

        ``spread`` delays that refresh by a random part of ``spread`` seconds: pass about
        ``fleet_size / 400`` when every process of a fleet is told at once (BENCHMARKS.md).
        """
        with self._lock:
            self._invalidate(spread)
            self._fast = None

    def refresh_after_rejection(self, sent: SubscriptionKey) -> SubscriptionKey | None:
        """The gateway refused ``sent`` (APIM 401). Return a different key to re-send with, or ``None``.

        Coalesced: concurrent 401s share one read; skipped if the cache already holds a newer version;
        rate limited by ``policy.forced_refresh_interval`` and by back-off after failures.
        """
        # Twice at most: a read joined here may have started before the rotation wrote the new version,
        # and so return the refused key; then one read of our own settles it.
        for _ in range(2):
            with self._lock:
                decision = self._cache.decide_forced(sent.version)
                if decision is ForceDecision.USE_NEWER:
                    entry = self._cache.entry()
                    return entry.key if entry is not None else None
                joined = self._flight is not None
                if not joined and decision is ForceDecision.RATE_LIMITED:
                    return None
                if not joined:
                    self._cache.note_forced()
                    self._n.add("forced")
                flight, run = self._join_or_start("401 from gateway")
            if run:
                self._run(flight)
            try:
                key = flight.outcome()
            except KeyUnavailableError:
                return None
            if key != sent:
                return key
            if not joined:  # our own read returned the refused key: the vault has nothing newer
                return None
        return None

    def close(self) -> None:
        """Close the SecretClient and credential this provider created (not ones passed in)."""
        for resource in self._owned:
            resource.close()
        self._owned.clear()

    def __enter__(self) -> SubscriptionKeyProvider:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -------------------------------------------------------------------------------- internals

    def _drop_fast(self) -> None:
        self._fast = None

    def _get_slow(self) -> SubscriptionKey:
        with self._lock:
            action = self._cache.decide()
            entry = self._cache.entry()
            if action is Action.SERVE and entry is not None:
                self._fast = (self._cache.serve_deadline(), entry.key)
                return entry.key
            if action is Action.SERVE_AND_REFRESH and entry is not None:
                self._fast = None
                if self._flight is None:
                    flight, _ = self._join_or_start(
                        "refresh ahead" if not self._cache.invalidated else "invalidated"
                    )
                    threading.Thread(
                        target=self._run, args=(flight,), name="apimvault-refresh", daemon=True
                    ).start()
                return entry.key
            # LOAD: no usable key.
            self._fast = None
            if self._flight is None and not self._cache.may_load():
                raise self._no_key_error()
            flight, run = self._join_or_start("load")
        if run:
            self._run(flight)
        return flight.outcome()

    def _join_or_start(self, reason: str) -> tuple[_Flight, bool]:
        """Under the lock: the flight in progress, or a new one the caller must run."""
        if self._flight is not None:
            return self._flight, False
        self._flight = _Flight(reason)
        return self._flight, True

    def _run(self, flight: _Flight) -> None:
        """Read Key Vault once (outside the lock) and publish the outcome to every waiter."""
        key: SubscriptionKey | None = None
        error: BaseException | None = None
        try:
            key = _telemetry.traced_read(self, flight.reason, self._fetch)  # issue 14: span + metrics if on
        except BaseException as exc:  # published to waiters, never lost
            error = exc
        pending = []
        with self._lock:
            try:
                if key is not None:
                    pending = self._succeeded(key, flight.reason)
                    entry = self._cache.entry()
                    self._fast = (self._cache.serve_deadline(), entry.key) if entry is not None else None
                elif isinstance(error, Exception):
                    pending = self._failed(error, flight.reason, retry_after_of(error))
            finally:
                flight.key, flight.error = key, error
                self._flight = None
                flight.done.set()
        self._emit_all(pending)
        if error is not None and not isinstance(error, Exception):
            raise error

    def _fetch(self) -> SubscriptionKey:
        self._n.add("vault_reads")
        try:
            secret = self.secret_client.get_secret(self.secret_name, self.version)
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
