"""What the sync and async providers share that is not about threads or tasks.

Configuration, the Azure clients a provider owns, cache decisions under the lock, turning Key Vault answers
into keys, counters and callbacks. No I/O. Next to it: :mod:`apimvault._settings` (environment names,
defaults, the header check), :mod:`apimvault._model` (the data a provider works with and hands out) and
:mod:`apimvault._per_process` (fork safety).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from importlib import import_module
from typing import Any, Generic, NoReturn, Self, TypeVar

from azure.keyvault.secrets import KeyVaultSecret, SecretProperties

from ._key import SubscriptionKey
from ._model import Counters, Fetched, KeyEvent, ProviderStats, PushPlan, Read, Reason
from ._per_process import PROVIDERS
from ._policy import Action, CachePolicy, Clock, ForceDecision, KeyCache
from ._settings import (  # re-exported: imported from here by code written before _settings
    DEFAULT_CLIENT_KWARGS,
    DEFAULT_CREDENTIAL_KWARGS,
    DEFAULT_HEADER,
    ENV_HEADER,
    ENV_SECRET_NAME,
    ENV_SECRET_VERSION,
    ENV_VAULT_URL,
    EXPIRY_WARNING_EVERY,
    EXPIRY_WARNING_WINDOW,
    FLIGHT_WAIT_LIMIT,
    check_header_name,
    check_spread,
    provider_settings_from_env,
)
from ._validation import (
    check_validity,
    newest_valid_version,
    to_key,
    validate_secret_name,
    validate_vault_url,
    validate_version,
)
from ._vault_errors import fresh_copy, map_error, retry_after_of
from ._vaultclient import check_secret_client, checked, secret_client_kwargs, token_deadline
from .exceptions import (
    ConfigurationError,
    InvalidSecretValueError,
    KeyUnavailableError,
    SecretDisabledError,
    SecretExpiredError,
    SecretNotFoundError,
    SecretNotYetValidError,
    VaultUnavailableError,
)

__all__ = [
    "DEFAULT_CLIENT_KWARGS",
    "DEFAULT_CREDENTIAL_KWARGS",
    "DEFAULT_HEADER",
    "ENV_HEADER",
    "ENV_SECRET_NAME",
    "ENV_SECRET_VERSION",
    "ENV_VAULT_URL",
    "EXPIRY_WARNING_EVERY",
    "EXPIRY_WARNING_WINDOW",
    "FLIGHT_WAIT_LIMIT",
    "KeyEvent",
    "ProviderStats",
    "Reason",
    "check_header_name",
]

log = logging.getLogger("apimvault")


#: A version in one of these states is never served (the newest version valid now is looked for instead).
_NOT_SERVABLE = (SecretDisabledError, SecretExpiredError, SecretNotYetValidError)


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


CredentialT = TypeVar("CredentialT")
ClientT = TypeVar("ClientT")


class ProviderBase(Generic[CredentialT, ClientT]):
    """Everything the sync and async providers share that is not about threads or tasks: configuration,
    the owned Azure clients, the cache decisions under the lock, turning Key Vault answers into keys,
    counters, callbacks and repr. No I/O.

    A shell names its flavour of the Azure clients (``_secret_client_class``, ``_identity_module`` whose
    ``DefaultAzureCredential`` it uses when given no credential, ``_retry_policy_class``) and keeps its
    read in flight (a ``_Flight`` holding an event or a task) in ``_flight``.
    """

    _secret_client_class: Callable[..., ClientT]
    _identity_module: str
    _retry_policy_class: Callable[..., Any]
    _default_sleep: Callable[[float], Any]
    _deadline_class: Callable[[Any, float], Any]

    def __init__(
        self,
        vault_url: str,
        secret_name: str,
        *,
        credential: CredentialT | None = None,
        version: str | None = None,
        policy: CachePolicy | None = None,
        clock: Clock | None = None,
        monotonic: Clock | None = None,
        rng: random.Random | None = None,
        header_name: str = DEFAULT_HEADER,
        secret_client: ClientT | None = None,
        client_kwargs: Mapping[str, Any] | None = None,
        credential_kwargs: Mapping[str, Any] | None = None,
        allow_insecure_http: bool = False,
        on_refresh: Callable[[KeyEvent], None] | None = None,
        on_error: Callable[[KeyEvent], None] | None = None,
        on_rotate: Callable[[KeyEvent], None] | None = None,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        self.vault_url = validate_vault_url(vault_url, allow_insecure_http=allow_insecure_http)
        self.secret_name = validate_secret_name(secret_name)
        self.version = validate_version(version)
        self.header_name = check_header_name(header_name)
        self.allow_insecure_http = bool(allow_insecure_http)
        self.policy = policy if policy is not None else CachePolicy()
        if not isinstance(self.policy, CachePolicy):
            raise ConfigurationError("policy must be an apimvault.CachePolicy")
        # Wall clock (Unix time) for expires_on / not_before; scheduling clock for everything else. One
        # injected clock (tests) serves as both.
        self.clock: Clock = clock if clock is not None else time.time
        self.monotonic: Clock = monotonic if monotonic is not None else clock or time.monotonic
        self._cache = KeyCache(self.policy, self.monotonic, rng, wall=self.clock)
        # How a 401 waits for the next allowed forced read (time.sleep / asyncio.sleep; tests inject one
        # that moves their clock). None: the shell's default.
        self._sleep: Callable[[float], Any] = sleep if sleep is not None else self._default_sleep
        self._on_refresh = on_refresh
        self._on_error = on_error
        self._on_rotate = on_rotate
        self.where = f"{self.vault_url}/secrets/{self.secret_name}" + (
            f"/{self.version}" if self.version else ""
        )
        self._n = Counters()
        self._expiry_warned_at = -math.inf  # scheduling clock: the last near-expiry WARNING
        # The current and previous keys for the log redaction filter, as SubscriptionKey objects (their
        # repr is redacted), so no attribute of the provider is the key as a plain string.
        self._recent_values: tuple[SubscriptionKey, ...] = ()
        # Guards the cache state (cachetools' TLRUCache is not thread-safe). Never held across I/O or await.
        self._lock = threading.Lock()
        self._flight: Any = None  # the read in flight: the shell's _Flight (a thread event or a task)
        self._closed = False  # close() was called: every read raises closed_error(), never a raw error
        # Lock-free fast path: (scheduling deadline, wall deadline, key) while decide() answers SERVE.
        self._fast: tuple[float, float, SubscriptionKey] | None = None
        self._owned: list[Any] = []
        self._build = (credential, client_kwargs, credential_kwargs) if secret_client is None else None
        self._rebuild = False
        # The identity this provider reads Key Vault with (also the default for key plus token, _entra).
        self.credential: CredentialT | None = credential
        if secret_client is not None:  # the caller's: refused if it would log bodies or skip verification
            check_secret_client(secret_client, where=self.where)
        self.secret_client: ClientT = secret_client if secret_client is not None else self._make_clients()
        PROVIDERS.add(self)

    @classmethod
    def from_env(cls, **kwargs: Any) -> Self:
        """Build from ``AZURE_KEYVAULT_URL`` and ``APIMVAULT_SECRET_NAME`` (optional
        ``APIMVAULT_SECRET_VERSION``, ``APIMVAULT_HEADER_NAME``); keyword arguments as for the constructor."""
        vault_url, secret_name = provider_settings_from_env(kwargs)
        return cls(vault_url, secret_name, **kwargs)

    # ------------------------------------------------------------------------- owned Azure clients

    def _make_clients(self) -> ClientT:
        """Build the SecretClient (and the credential, if none was given) this provider owns."""
        assert self._build is not None
        credential, client_kwargs, credential_kwargs = self._build
        owned: list[Any] = []
        vault_credential = credential
        if credential is None:
            identity = import_module(self._identity_module)
            bounds = {**DEFAULT_CREDENTIAL_KWARGS, **(credential_kwargs or {})}
            # One deadline for each whole token request (not only per read): a trickling identity endpoint.
            deadline = token_deadline(bounds)
            credential = identity.DefaultAzureCredential(**bounds)
            owned.append(credential)
            vault_credential = self._deadline_class(credential, deadline)
        self.credential = credential
        # Never logs a Key Vault body (the key), whatever logging_enable says: see _vaultclient.
        settings = secret_client_kwargs(DEFAULT_CLIENT_KWARGS, client_kwargs)
        settings.setdefault("retry_policy", self._retry_policy_class(**settings))
        client = self._secret_client_class(self.vault_url, vault_credential, **settings)
        owned.insert(0, client)
        checked(client, owned, where=self.where)
        self._owned = owned
        return client

    def _after_fork(self) -> None:
        """In a forked child: drop what belongs to the parent's threads, tasks and connections.

        The parent's read in flight has no thread here to finish it, and its locks may be held by a
        thread that does not exist here. Clients this provider built share pooled connections with
        the parent: they are rebuilt before the child's first read (never closed here: that would
        touch the parent's sockets). A SecretClient or credential passed in is the caller's to handle.
        """
        self._lock = threading.Lock()
        self._n.after_fork()
        self._flight = None
        self._fast = None
        self._rebuild = self._build is not None

    # ---------------------------------------------------------------------------------- reading

    def _now(self) -> tuple[float, float]:
        """Both clocks, read once for one decision: (scheduling, wall)."""
        return self.monotonic(), self.clock()

    def _fast_key(self) -> SubscriptionKey | None:
        """The hot path: the cached key while it is certainly servable, without a lock."""
        fast = self._fast
        if (
            fast is not None
            and self.monotonic() < fast[0]
            and (fast[1] == math.inf or self.clock() < fast[1])
        ):
            return fast[2]
        return None

    def _closed_error(self) -> ConfigurationError:
        """What every read of a closed provider raises (one typed error, whatever was in flight)."""
        return ConfigurationError(
            f"{type(self).__name__} for {self.where} is closed; create a new provider to read the key again"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    def _mark_closed(self) -> None:
        """Start of ``close()``: no key is served from now on and a read in flight answers with
        :meth:`_closed_error` (the shell then closes the clients)."""
        with self._lock:
            self._closed = True
            self._fast = None

    def _snapshot(self, now: float, wall: float) -> None:
        """Under the lock: refresh the fast-path snapshot from the cache."""
        if self._closed:
            self._fast = None
            return
        entry = self._cache.usable(now, wall)
        until, expiry = self._cache.serve_deadline(now, wall)
        self._fast = (
            (until, expiry, self._cache.served(entry, wall)) if entry is not None and until > now else None
        )

    def _decide(self) -> tuple[Action, SubscriptionKey | None, Reason]:
        """Under the lock: what a ``get_key()`` does now. Raises the last error for a LOAD that may not
        read Key Vault (no read in flight, backing off and no probe due)."""
        self._check_open()
        now, wall = self._now()
        action = self._cache.decide(now, wall)
        entry = self._cache.usable(now, wall)
        self._snapshot(now, wall)
        if action is Action.LOAD:
            if self._flight is None and not self._cache.may_load(now):
                raise self._no_key_error()
            return action, None, "load"
        assert entry is not None
        key = self._cache.served(entry, wall)
        return action, key, "invalidated" if self._cache.invalidated else "refresh ahead"

    def _forced(
        self, sent: SubscriptionKey, *, may_wait: bool = False
    ) -> tuple[bool, SubscriptionKey | None, bool, float]:
        """Under the lock, for a 401 on ``sent``: ``(stop, key, joined, wait)``. ``wait > 0``: the last
        forced read was less than ``forced_refresh_interval`` ago (e.g. both keys revoked one after the
        other): sleep that long, then ask again (only with ``may_wait``, once per 401). ``stop``: return
        ``key`` now; otherwise join the read in flight (``joined``) or start one (counted as forced)."""
        now = self.monotonic()
        entry = self._cache.entry()
        fallback = self._cache.fallback
        if fallback is not None and entry is not None:
            if sent == fallback:  # the previous key is refused too: back to the current one
                self._cache.fallback = None
                self._serve_now(entry.key)
                return True, entry.key, False, 0.0
            return True, fallback, False, 0.0  # a request sent before the fall-back
        decision = self._cache.decide_forced(sent.version, now)
        if decision is ForceDecision.USE_NEWER:
            return True, entry.key if entry is not None else None, False, 0.0
        joined = self._flight is not None
        if not joined and decision is ForceDecision.RATE_LIMITED:
            wait = self._cache.forced_wait(now) if may_wait else 0.0
            return wait <= 0, None, False, wait
        if not joined:
            self._cache.note_forced(now)
            self._n.add("forced")
        return False, None, joined, 0.0

    def _fall_back(self, refused: SubscriptionKey) -> SubscriptionKey | None:
        """The gateway refused the current key and Key Vault has nothing newer (or cannot say): re-send
        with the previous version and serve it until a refresh shows a newer one (e.g. a gateway that
        lags behind a rotation). ``None`` when there is no previous valid version."""
        with self._lock:
            previous = self._cache.fall_back(refused, self.clock())
            if previous is None:
                return None
            self._serve_now(previous)
            self._n.add("fallbacks")
        log.warning(
            "apimvault: %s gateway refused version %s (fp %s) and Key Vault has nothing newer; "
            "falling back to the previous version %s (fp %s)",
            self.where,
            refused.version,
            refused.fingerprint,
            previous.version,
            previous.fingerprint,
        )
        return previous

    def _serve_now(self, key: SubscriptionKey) -> None:
        """Under the lock: make ``key`` what the next ``get_key()`` serves (the fast path is rebuilt)."""
        self._fast = None

    def _push(self) -> int:
        """Under the lock: a ``refresh()`` call; only a read started from now on answers it."""
        return self._cache.push()

    def _begin(self) -> int:
        """Under the lock: a read starts; its push generation."""
        return self._cache.begin(self.monotonic())

    def current(self) -> SubscriptionKey | None:
        """The key served now, without any I/O or refresh (``None`` before the first load or past its
        limit). While falling back (see ``refresh_after_rejection``) that is the previous version."""
        with self._lock:
            entry = self._cache.usable()
            return self._cache.served(entry) if entry is not None else None

    def _redaction_values(self) -> tuple[str, ...]:
        """The current and previous key values, read without locking (for the log redaction filter)."""
        return tuple(key.reveal() for key in self._recent_values)

    def stats(self) -> ProviderStats:
        """Counters and state now (:class:`ProviderStats`): safe to log or export, never the key.

        No I/O; the counters are cumulative since the provider was created (``vault_reads``: Key Vault
        reads started, ``refreshes``: successful ones, ``rotations``: version changes seen,
        ``forced_refreshes``: 401-triggered reads, ``resends_401``: requests re-sent after APIM's 401,
        ``fallbacks_to_previous``: switches to the previous version while a gateway refused the current one).
        """
        now, wall = self._now()
        with self._lock:
            entry = self._cache.usable(now, wall)
            state = self._cache.state(now, wall)
        err = self._cache.last_error
        return ProviderStats(
            secret=self.where,
            version=entry.key.version if entry else None,
            fingerprint=entry.key.fingerprint if entry else None,
            credential_id=entry.key.credential_id if entry else None,
            age_s=(now - entry.loaded_at) if entry else None,
            state=state.value,
            vault_reads=self._n["vault_reads"],
            refreshes=self._n["refreshes"],
            rotations=self._n["rotations"],
            failures=self._n["failures"],
            consecutive_failures=self._cache.failures,
            forced_refreshes=self._n["forced"],
            resends_401=self._n["resends"],
            invalidations=self._n["invalidations"],
            last_error=f"{type(err).__name__}: {err}" if err is not None else None,
            fallbacks_to_previous=self._n["fallbacks"],
            expires_in_s=(
                entry.key.expires_on - wall
                if entry is not None and entry.key.expires_on is not None
                else None
            ),
        )

    def _record_resend(self) -> None:
        """Counted by the auth flow each time it re-sends a request after a 401."""
        self._n.add("resends")

    def record_resend(self) -> None:
        """Public hook of the auth contract (``apimvault._auth.KeySource``): a request was re-sent after
        APIM's 401 (``stats().resends_401``)."""
        self._record_resend()

    def invalidate(self, *, spread: float = 0.0) -> None:
        """Push invalidation: a ``get_key()`` starts a background refresh (no caller waits).

        ``spread`` delays that refresh by a random part of ``spread`` seconds: pass about
        ``fleet_size / 400`` when every process of a fleet is told at once (BENCHMARKS.md). A read
        already in flight does not answer an invalidation (it may predate the change). Push-triggered
        reads are at most one per ``policy.forced_refresh_interval``.
        """
        check_spread(spread)
        with self._lock:
            self._n.add("invalidations")
            self._cache.invalidate(spread, self.monotonic())
            self._fast = None

    def _push_event(self, version: str | None, spread: float) -> PushPlan:
        """An event about this provider's secret (naming ``version``, if it does): what to do.

        An event naming the version already held costs nothing. Otherwise at most one push-triggered
        read per ``policy.forced_refresh_interval`` happens now (``READ``: the caller calls
        ``refresh()``); more events in the interval coalesce into one background refresh when it ends
        (``DEFERRED``), as does every event when ``spread`` scatters the fleet's reads.
        """
        now, wall = self._now()
        with self._lock:
            entry = self._cache.usable(now, wall)
            if version is not None and entry is not None and entry.key.version == version:
                return PushPlan.SKIP
            self._fast = None
            if spread == 0 and self._cache.claim_push_read(now):
                return PushPlan.READ
        self.invalidate(spread=spread)
        return PushPlan.DEFERRED

    # ------------------------------------------------------------------------- Key Vault reads

    def _first_read(self, reason: Reason = "refresh") -> Read:
        """A shell is about to read Key Vault: what to read first (the pinned or the latest version)."""
        if self._rebuild:  # first read in a forked child: new connections, not the parent's
            self._rebuild = False
            self.secret_client = self._make_clients()
        self._n.add("vault_reads")
        return Read(self.version, for_401=reason == "401 from gateway")

    def _raise_typed(self, exc: Exception) -> NoReturn:
        """Called in a shell's ``except`` block for ``get_secret``: raise the typed error (or ``exc``)."""
        mapped = map_error(exc, where=self.where)
        if mapped is None or mapped is exc:  # unknown, or already ours (from _read_done / _pick_version)
            if mapped is None:
                log.debug("apimvault: unexpected error reading %s", self.where, exc_info=True)
            raise
        raise mapped from exc

    def _read_failed(self, exc: Exception, read: Read) -> Fetched | Read:
        """Called in a shell's ``except`` block for a step: the next step, or raise the typed error.

        The latest version refused as disabled (Key Vault's 403 ``SecretDisabled``) is not the end: the
        newest version valid now is looked for (an operator disables a bad version to roll back). A
        failed check of the previous version leaves the key read; the previous one is no fallback when
        Key Vault says it is invalid, and stays as it was when Key Vault could not answer.
        """
        mapped = map_error(exc, where=self.where)
        if read.then is not None:
            invalid = isinstance(mapped, (SecretNotFoundError, InvalidSecretValueError, *_NOT_SERVABLE))
            return read.then._replace(previous_checked=True) if invalid else read.then
        if isinstance(mapped, SecretDisabledError) and self._reads_latest(read):
            self._n.add("vault_reads")
            return read._replace(listing=True, refused=mapped)
        self._raise_typed(exc)

    def _reads_latest(self, read: Read) -> bool:
        """Whether ``read`` asked for the latest version of an unpinned secret."""
        return self.version is None and read.version is None and not read.listing and read.then is None

    def _read_done(self, secret: KeyVaultSecret, read: Read) -> Fetched | Read:
        """A secret read as ``read`` asked: the key to accept, or the next read to do.

        A latest version that is not servable now (disabled, expired, or pre-staged with ``not_before``
        in the future) never replaces a valid key: the versions are listed and the newest one that is
        enabled and valid now is served (kept until a staged one's ``not_before``). A pinned version Key
        Vault reports expired is dropped.
        """
        wall = self.clock()
        if read.then is not None:  # the previous version, checked before it may serve as a fallback
            try:
                previous = check_validity(to_key(secret, where=self.where), where=self.where, wall=wall)
            except KeyUnavailableError:
                return read.then._replace(previous_checked=True)
            return read.then._replace(previous=previous, previous_checked=True)
        try:
            key = check_validity(to_key(secret, where=self.where), where=self.where, wall=wall)
        except _NOT_SERVABLE as exc:
            if self._reads_latest(read):  # find the newest version valid now
                self._n.add("vault_reads")
                staged = (
                    _ts(secret.properties.not_before) if isinstance(exc, SecretNotYetValidError) else None
                )
                return read._replace(listing=True, refused=exc, staged_at=staged)
            if isinstance(exc, SecretExpiredError):
                with self._lock:  # Key Vault says this version expired: never serve it again
                    held = self._cache.entry(wall)
                    if held is not None and held.key.version == secret.properties.version:
                        self._drop()
            raise
        return self._check_previous(Fetched(key, read.staged_at), read)

    def _pick_version(self, versions: Iterable[SecretProperties], read: Read) -> Fetched | Read:
        """The latest version is not servable now: read the newest version that is enabled and valid now
        (the key held already, if it is that one). None: the held key is dropped and ``read.refused``
        raised (nothing in the vault may be served)."""
        wall = self.clock()
        newest = newest_valid_version(versions, wall)
        if newest is None:
            with self._lock:
                self._drop()
            if isinstance(read.refused, SecretNotYetValidError):
                staged = datetime.fromtimestamp(read.staged_at or 0, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                raise SecretNotYetValidError(
                    f"{self.where}: the latest version is not valid before {staged} and no other version "
                    "is valid now",
                    secret=self.where,
                )
            if read.refused is not None:
                raise read.refused
            raise SecretNotFoundError(f"{self.where} has no version valid now", secret=self.where)
        with self._lock:
            held = self._cache.entry(wall)
        if held is not None and held.key.version == newest.version:  # the key held: no read needed
            key = dataclasses.replace(
                held.key,
                expires_on=_ts(newest.expires_on),
                not_before=_ts(newest.not_before),
            )
            return self._check_previous(Fetched(key, read.staged_at), read)
        self._n.add("vault_reads")
        return read._replace(version=newest.version, listing=False)

    def _check_previous(self, fetched: Fetched, read: Read) -> Fetched | Read:
        """The previous version is served only if Key Vault still says it may be: while falling back, and
        when a 401 may lead to falling back, a read that finds no newer version reads the previous one too."""
        with self._lock:
            held = self._cache.entry()
            previous = self._cache.previous
            falling_back = self._cache.fallback is not None
        if (
            previous is None
            or held is None
            or held.key.version != fetched.key.version
            or not (falling_back or read.for_401)
        ):
            return fetched
        self._n.add("vault_reads")
        return Read(previous.version, for_401=read.for_401, then=fetched)

    def _finish(
        self, fetched: Fetched | None, error: BaseException | None, reason: Reason, generation: int
    ) -> list[tuple[Callable[[KeyEvent], None] | None, KeyEvent]]:
        """Under the lock: record a read's outcome; return the callbacks to run outside the lock."""
        self._flight = None
        now, wall = self._now()
        if fetched is not None:
            pending = self._succeeded(fetched, reason, now, wall, generation)
        elif isinstance(error, Exception):
            pending = self._failed(error, reason, now)
        else:
            pending = []
        self._snapshot(now, wall)
        return pending

    def _drop(self) -> None:
        """Under the lock: forget the cached key (Key Vault says it is disabled or expired)."""
        self._cache.clear()
        self._fast = None

    def _no_key_error(self) -> BaseException:
        last = self._cache.last_error
        if last is None:
            return VaultUnavailableError(f"no usable key for {self.where}", secret=self.where)
        return fresh_copy(last)

    # ------------------------------------------------------------------------------- callbacks

    def _emit(self, callback: Callable[[KeyEvent], None] | None, event: KeyEvent) -> None:
        if callback is None:
            return
        try:
            callback(event)
        except Exception:  # a broken callback must not break key delivery
            log.exception("apimvault callback %r failed", getattr(callback, "__name__", callback))

    def _emit_all(self, pending: list[tuple[Callable[[KeyEvent], None] | None, KeyEvent]]) -> None:
        for callback, event in pending:
            self._emit(callback, event)

    def _succeeded(
        self, fetched: Fetched, reason: Reason, now: float, wall: float, generation: int
    ) -> list[tuple[Callable[[KeyEvent], None] | None, KeyEvent]]:
        """Record a fetched key; return the callbacks to run (outside any lock)."""
        key = fetched.key
        _, previous = self._cache.accept(
            key, now, wall=wall, generation=generation, revisit_at=fetched.revisit_at
        )
        if fetched.previous_checked:
            self._cache.confirm_previous(fetched.previous)
        # Lock-free snapshot for the log redaction filter (which may run while _lock is held).
        if not self._recent_values or self._recent_values[0] != key:
            self._recent_values = (key, *self._recent_values[:1])
        self._n.add("refreshes")
        event = KeyEvent(self.where, key.version, key.fingerprint, previous, reason)
        log.debug(
            "apimvault: %s loaded version %s (fp %s, %s)", self.where, key.version, key.fingerprint, reason
        )
        self._warn_expiry(key, now, wall)
        pending = [(self._on_refresh, event)]
        if previous is not None:
            self._n.add("rotations")
            log.info(
                "apimvault: %s rotated %s -> %s (fp %s)", self.where, previous, key.version, key.fingerprint
            )
            pending.append((self._on_rotate, event))
        return pending

    def _warn_expiry(self, key: SubscriptionKey, now: float, wall: float) -> None:
        """Under the lock: a WARNING at most once a day from ``EXPIRY_WARNING_WINDOW`` before ``expires_on``
        (a rotation stuck for weeks must not become an outage with no warning)."""
        if key.expires_on is None:
            return
        left = key.expires_on - wall
        if left > EXPIRY_WARNING_WINDOW or now - self._expiry_warned_at < EXPIRY_WARNING_EVERY:
            return
        self._expiry_warned_at = now
        log.warning(
            "apimvault: %s version %s (fp %s) expires at %s, in %.1f days; after that it is not served. "
            "Rotate the key (apimvault rotate) or extend the expiry",
            self.where,
            key.version,
            key.fingerprint,
            datetime.fromtimestamp(key.expires_on, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            left / 86400,
        )

    def _failed(
        self, error: BaseException, reason: Reason, now: float
    ) -> list[tuple[Callable[[KeyEvent], None] | None, KeyEvent]]:
        """Record a failed fetch; return the callbacks to run (outside any lock).

        A disabled secret is a statement about the key itself (an operator pulled it): the cached key
        is dropped at once, so callers get :class:`SecretDisabledError` instead of a key Azure says is
        off (an expired served version is dropped in :meth:`_read_done`). Other failures keep the
        cached key until its hard limit (stale-if-error).
        """
        if isinstance(error, SecretDisabledError):
            self._drop()
        delay = self._cache.reject(error, retry_after=retry_after_of(error), now=now)
        self._n.add("failures")
        entry = self._cache.entry()
        log.warning(
            "apimvault: %s %s failed (%s: %s); %s; next attempt in %.1fs",
            self.where,
            reason,
            type(error).__name__,
            error,
            f"serving version {entry.key.version} (fp {entry.key.fingerprint})" if entry else "no usable key",
            delay,
        )
        return [
            (
                self._on_error,
                KeyEvent(
                    self.where,
                    entry.key.version if entry else None,
                    entry.key.fingerprint if entry else None,
                    reason=reason,
                    error=error,
                ),
            )
        ]

    def __repr__(self) -> str:
        with self._lock:
            entry = self._cache.entry()
        shown = f"version={entry.key.version!r}, fingerprint={entry.key.fingerprint!r}" if entry else "no key"
        return f"{type(self).__name__}({self.where!r}, {shown})"
