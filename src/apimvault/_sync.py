"""The synchronous provider: a thin shell of locks and threads over :class:`~apimvault._base.ProviderBase`."""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from types import TracebackType

from azure.core.credentials import TokenCredential
from azure.keyvault.secrets import SecretClient

from . import _telemetry
from ._base import ProviderBase
from ._key import SubscriptionKey
from ._model import Fetched, Read, Reason
from ._policy import Action
from ._retry import NoRetryAfterSleep
from ._settings import FLIGHT_WAIT_LIMIT
from ._vault_errors import flight_timeout, fresh_copy
from ._vaultclient import DeadlineCredential
from .exceptions import KeyUnavailableError

__all__ = ["SubscriptionKeyProvider"]


@dataclasses.dataclass
class _Flight:
    """One in-flight Key Vault read that any number of threads can wait for."""

    reason: Reason
    generation: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    key: SubscriptionKey | None = None
    error: BaseException | None = None

    def settle(self, where: str) -> None:
        """Wait for the read to end, bounded by ``FLIGHT_WAIT_LIMIT`` (then raise VaultUnavailableError)."""
        if not self.done.wait(FLIGHT_WAIT_LIMIT):
            raise flight_timeout(where)

    def outcome(self, where: str) -> SubscriptionKey:
        """Wait (bounded) and return the key or raise the read's error."""
        self.settle(where)
        if self.error is not None:
            raise fresh_copy(self.error)
        assert self.key is not None
        return self.key


class SubscriptionKeyProvider(ProviderBase[TokenCredential, SecretClient]):
    """Serves the APIM key from Key Vault: cached, refreshed ahead, single-flight, stale-if-error.

    Args:
        vault_url: ``https://<vault>.vault.azure.net``.
        secret_name: the secret holding the key.
        credential: any ``TokenCredential``; ``None`` means ``DefaultAzureCredential()`` (owned and
            closed by the provider) with bounded timeouts and retries for the identity endpoint
            (``DEFAULT_CREDENTIAL_KWARGS``: 5 s connect, 10 s read, 1 retry), overridable through
            ``credential_kwargs``.
        version: pin one secret version (rotation then needs a new pin).
        policy: a :class:`CachePolicy` (TTL, jitter, refresh margin, max staleness, back-off).
        clock: returns Unix seconds, compared with a secret's ``expires_on`` / ``not_before``.
            ``monotonic``: the scheduling clock (``time.monotonic``; an injected ``clock`` alone serves
            as both). Inject them in tests. ``rng``: the jitter source.
        header_name: the header APIM reads (``Ocp-Apim-Subscription-Key``; ``api-key`` if APIM was
            configured so).
        secret_client: a ready ``SecretClient`` (then ``credential``/``client_kwargs`` are ignored);
            refused if its pipeline would log response bodies (``logging_enable=True``) or skip TLS /
            challenge verification.
        client_kwargs: extra ``SecretClient`` keyword arguments (transport, retries, timeouts); with
            ``logging_enable=True`` the trace never shows bodies or credential headers.
        allow_insecure_http: allow ``http://`` endpoints. **Security:** only for loopback tests.
        on_refresh / on_error / on_rotate: callbacks receiving a :class:`KeyEvent` (never the key).
        sleep: how a 401 arriving within ``policy.forced_refresh_interval`` of the last forced read waits
            for the next allowed read (at most that interval; ``time.sleep``, the async provider
            ``asyncio.sleep``). Inject one that moves your fake clock in tests.

    ``get_key()`` is the hot path: a fresh key costs a clock read and no lock. Within
    ``refresh_margin`` of the end of the fresh period one background thread refreshes while callers
    keep the current key; only a cold start or a key past its hard limit makes callers wait, and then
    all of them wait for the same single read (at most ``FLIGHT_WAIT_LIMIT`` seconds).

    Validity: the provider serves the newest version that is enabled and valid now (``expires_on``,
    ``not_before``); a newer version created disabled, already expired or pre-staged never replaces a
    valid key, and disabling the newest version rolls back to the one before. The previous-key fallback
    (see :meth:`refresh_after_rejection`) obeys the same rules. From 7 days before the current key's
    ``expires_on`` it logs a WARNING once a day (``stats().expires_in_s``; OTel ``apimvault.key.expires_in``).

    Fork-safe: in a child process the provider forgets the parent's read in flight and locks, and
    rebuilds the clients it created before its first read (see README, "fork").
    """

    _secret_client_class = SecretClient

    _identity_module = "azure.identity"
    _retry_policy_class = NoRetryAfterSleep
    _deadline_class = DeadlineCredential
    _default_sleep = staticmethod(time.sleep)

    # ------------------------------------------------------------------------------ public API

    def get_key(self) -> SubscriptionKey:
        """The current key. Blocks only on a cold start or past the hard limit (then single-flight)."""
        return self._fast_key() or self._get_slow()

    def get(self) -> str:
        """The current key's value, for ``api_key=`` style callables. Never log it."""
        return self.get_key().reveal()

    def refresh(self) -> SubscriptionKey:
        """Read Key Vault now and return the result; a read already in flight that started before this
        call is waited for and not trusted (it may predate the change this call is about).

        Raises the typed error if the read fails; the cached key, if any, stays in use.
        """
        with self._lock:
            self._check_open()
            wanted = self._push()
        while True:
            with self._lock:
                self._check_open()
                flight, run = self._join_or_start("refresh")
            if run:
                self._run(flight)
            if flight.generation >= wanted:
                return flight.outcome(self.where)
            flight.settle(self.where)

    def refresh_after_rejection(self, sent: SubscriptionKey) -> SubscriptionKey | None:
        """The gateway refused ``sent`` (APIM 401). Return a different key to re-send with, or ``None``.

        Supported API: :class:`~apimvault.SubscriptionKeyAuth` calls it, and so can a transport of your own
        that sees APIM's 401 (``apimvault.is_apim_key_rejection``) and wants the same coalesced behaviour.

        Coalesced: concurrent 401s share one read; skipped if the cache already holds a newer version;
        rate limited by ``policy.forced_refresh_interval`` (a 401 inside it waits for the next allowed read,
        at most the interval, instead of failing: both keys revoked one after the other) and by back-off
        after failures (answered at once with what is held).

        Previous-key fallback: when Key Vault has nothing newer than the refused current version (a gateway
        that has not picked up a rotation yet), the previous distinct version is returned and served from
        then on, until a refresh shows a newer version (``stats().fallbacks_to_previous``). If the previous
        one is refused as well, the current one is served again.
        """
        # Twice at most: a read joined here may have started before the rotation wrote the new version,
        # and so return the refused key; then one read of our own settles it. Within
        # forced_refresh_interval of the last forced read, wait (once, at most the interval) for the next
        # allowed read instead of failing: both keys revoked one after the other is an emergency rotation.
        may_wait, reads = True, 0
        while reads < 2:
            with self._lock:
                self._check_open()
                stop, newer, joined, wait = self._forced(sent, may_wait=may_wait)
                flight, run = (None, False) if stop or wait > 0 else self._join_or_start("401 from gateway")
            if wait > 0:
                may_wait = False
                self._sleep(wait)
                continue
            reads += 1
            if flight is None:
                return newer or self._fall_back(sent)
            if run:
                self._run(flight)
            try:
                key = flight.outcome(self.where)
            except KeyUnavailableError:
                return self._fall_back(sent)
            if key != sent:
                return key
            if not joined:  # our own read returned the refused key: the vault has nothing newer
                break
        return self._fall_back(sent)

    def close(self) -> None:
        """Close the SecretClient and credential this provider created (not ones passed in).

        From then on every read (``get_key()``, ``get()``, ``refresh()``, a read in flight) raises
        :class:`~apimvault.ConfigurationError` saying the provider is closed."""
        self._mark_closed()
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

    def _get_slow(self) -> SubscriptionKey:
        with self._lock:
            action, key, reason = self._decide()
            if key is not None:
                if action is Action.SERVE_AND_REFRESH and self._flight is None:
                    flight, _ = self._join_or_start(reason)
                    threading.Thread(
                        target=self._run, args=(flight,), name="apimvault-refresh", daemon=True
                    ).start()
                return key
            flight, run = self._join_or_start(reason)
        if run:
            self._run(flight)
        return flight.outcome(self.where)

    def _join_or_start(self, reason: Reason) -> tuple[_Flight, bool]:
        """Under the lock: the flight in progress, or a new one the caller must run."""
        if self._flight is not None:
            return self._flight, False
        self._flight = _Flight(reason, self._begin())
        return self._flight, True

    def _run(self, flight: _Flight) -> None:
        """Read Key Vault once (outside the lock) and publish the outcome to every waiter."""
        fetched: Fetched | None = None
        error: BaseException | None = None
        try:
            fetched = _telemetry.traced_read(
                self, flight.reason, functools.partial(self._fetch, flight.reason)
            )
        except BaseException as exc:  # published to waiters, never lost
            error = exc
        if self._closed and (error is None or isinstance(error, Exception)):  # closed under the read
            fetched, error = None, self._closed_error()
        pending = []
        with self._lock:
            try:
                if self._flight is flight:  # (not after a fork reset it)
                    pending = self._finish(fetched, error, flight.reason, flight.generation)
            finally:
                flight.key, flight.error = (fetched.key if fetched else None), error
                flight.done.set()
        self._emit_all(pending)
        if error is not None and not isinstance(error, Exception):
            raise error

    def _fetch(self, reason: Reason) -> Fetched:
        step: Fetched | Read = self._first_read(reason)
        vault = self.secret_client
        while not isinstance(step, Fetched):
            read = step
            try:
                if read.listing:
                    step = self._pick_version(
                        vault.list_properties_of_secret_versions(self.secret_name), read
                    )
                else:
                    step = self._read_done(vault.get_secret(self.secret_name, read.version), read)
            except Exception as exc:
                step = self._read_failed(exc, read)
        return step
