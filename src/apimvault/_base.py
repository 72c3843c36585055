"""What the sync and async providers share: configuration, counters, callbacks and repr. No I/O."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ._fetch import validate_secret_name, validate_vault_url, validate_version
from ._key import SubscriptionKey
from ._policy import CachePolicy, Clock, KeyCache
from .exceptions import ConfigurationError, SecretDisabledError

__all__ = ["KeyEvent", "ProviderStats"]

log = logging.getLogger("apimvault")

DEFAULT_HEADER = "Ocp-Apim-Subscription-Key"
ENV_VAULT_URL = "AZURE_KEYVAULT_URL"
ENV_SECRET_NAME = "APIMVAULT_SECRET_NAME"  # noqa: S105 - a variable name
ENV_SECRET_VERSION = "APIMVAULT_SECRET_VERSION"  # noqa: S105 - a variable name
ENV_HEADER = "APIMVAULT_HEADER_NAME"
_HEADER_NAME = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

# SecretClient settings: apimvault retries on its own schedule (back-off, stale-if-error), so the SDK
# retries little and never holds a caller for long.
DEFAULT_CLIENT_KWARGS: Mapping[str, Any] = {
    "retry_total": 1,
    "retry_backoff_factor": 0.2,
    "retry_backoff_max": 2,
    "connection_timeout": 5,
    "read_timeout": 10,
}


@dataclasses.dataclass(frozen=True)
class KeyEvent:
    """What callbacks receive: never the key, only its version and fingerprint."""

    secret: str
    version: str | None
    fingerprint: str | None
    previous_version: str | None = None
    reason: str = ""
    error: BaseException | None = None


@dataclasses.dataclass(frozen=True)
class ProviderStats:
    """Counters and current state of a provider, safe to log or export."""

    secret: str
    version: str | None
    fingerprint: str | None
    credential_id: str | None
    age_s: float | None
    state: str  # "empty" | "fresh" | "refresh-due" | "stale" | "expired"
    vault_reads: int
    refreshes: int
    rotations: int
    failures: int
    consecutive_failures: int
    forced_refreshes: int
    resends_401: int
    invalidations: int
    last_error: str | None


class _Tally:
    """Thread-safe counters (``+=`` on a shared dict loses increments under contention)."""

    __slots__ = ("_counts", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            ("vault_reads", "refreshes", "rotations", "failures", "forced", "resends", "invalidations"), 0
        )

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def __getitem__(self, name: str) -> int:
        return self._counts[name]


def check_header_name(name: str) -> str:
    if not isinstance(name, str) or not name or any(c not in _HEADER_NAME for c in name):
        raise ConfigurationError(f"header name {name!r} is not a valid HTTP header name")
    return name


class ProviderBase:
    """Configuration, counters and callbacks common to both providers."""

    def __init__(
        self,
        vault_url: str,
        secret_name: str,
        *,
        version: str | None,
        policy: CachePolicy | None,
        clock: Clock | None,
        rng: random.Random | None,
        header_name: str,
        allow_insecure_http: bool,
        on_refresh: Callable[[KeyEvent], None] | None,
        on_error: Callable[[KeyEvent], None] | None,
        on_rotate: Callable[[KeyEvent], None] | None,
    ) -> None:
        self.vault_url = validate_vault_url(vault_url, allow_insecure_http=allow_insecure_http)
        self.secret_name = validate_secret_name(secret_name)
        self.version = validate_version(version)
        self.header_name = check_header_name(header_name)
        self.allow_insecure_http = bool(allow_insecure_http)
        self.policy = policy if policy is not None else CachePolicy()
        if not isinstance(self.policy, CachePolicy):
            raise ConfigurationError("policy must be an apimvault.CachePolicy")
        self.clock: Clock = clock if clock is not None else time.time
        self._cache = KeyCache(self.policy, self.clock, rng)
        self._on_refresh = on_refresh
        self._on_error = on_error
        self._on_rotate = on_rotate
        self.where = f"{self.vault_url}/secrets/{self.secret_name}" + (
            f"/{self.version}" if self.version else ""
        )
        self._n = _Tally()
        # The current and previous keys for the log redaction filter, as SubscriptionKey objects (their
        # repr is redacted), so no attribute of the provider is the key as a plain string.
        self._recent_values: tuple[SubscriptionKey, ...] = ()
        # Guards the cache state (cachetools' TLRUCache is not thread-safe). Never held across I/O or await.
        self._lock = threading.Lock()

    @staticmethod
    def env_args(kwargs: dict[str, Any]) -> tuple[str, str]:
        vault_url = os.environ.get(ENV_VAULT_URL, "").strip()
        secret_name = os.environ.get(ENV_SECRET_NAME, "").strip()
        missing = [n for n, v in ((ENV_VAULT_URL, vault_url), (ENV_SECRET_NAME, secret_name)) if not v]
        if missing:
            raise ConfigurationError(f"environment variable(s) not set: {', '.join(missing)}")
        if "version" not in kwargs and os.environ.get(ENV_SECRET_VERSION, "").strip():
            kwargs["version"] = os.environ[ENV_SECRET_VERSION].strip()
        if "header_name" not in kwargs and os.environ.get(ENV_HEADER, "").strip():
            kwargs["header_name"] = os.environ[ENV_HEADER].strip()
        return vault_url, secret_name

    # ---------------------------------------------------------------------------------- reading

    def current(self) -> SubscriptionKey | None:
        """The cached key without any I/O or refresh (``None`` before the first load or past its limit)."""
        with self._lock:
            entry = self._cache.entry()
        return entry.key if entry is not None else None

    def redaction_values(self) -> tuple[str, ...]:
        """The current and previous key values, read without locking (for the log redaction filter)."""
        return tuple(key.reveal() for key in self._recent_values)

    def stats(self) -> ProviderStats:
        now = self.clock()
        with self._lock:
            entry = self._cache.entry()
        if entry is None:
            state = "expired" if self._cache.last_version else "empty"
        elif now < entry.refresh_at and not self._cache.invalidated:
            state = "fresh"
        elif now < entry.fresh_until:
            state = "refresh-due"
        else:
            state = "stale"
        err = self._cache.last_error
        return ProviderStats(
            secret=self.where,
            version=entry.key.version if entry else None,
            fingerprint=entry.key.fingerprint if entry else None,
            credential_id=entry.key.credential_id if entry else None,
            age_s=(now - entry.loaded_at) if entry else None,
            state=state,
            vault_reads=self._n["vault_reads"],
            refreshes=self._n["refreshes"],
            rotations=self._n["rotations"],
            failures=self._n["failures"],
            consecutive_failures=self._cache.failures,
            forced_refreshes=self._n["forced"],
            resends_401=self._n["resends"],
            invalidations=self._n["invalidations"],
            last_error=f"{type(err).__name__}: {err}" if err is not None else None,
        )

    def record_resend(self) -> None:
        """Counted by the auth flow each time it re-sends a request after a 401."""
        self._n.add("resends")

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
        self, key: SubscriptionKey, reason: str
    ) -> list[tuple[Callable[[KeyEvent], None] | None, KeyEvent]]:
        """Record a fetched key; return the callbacks to run (outside any lock)."""
        _, previous = self._cache.accept(key)
        # Lock-free snapshot for the log redaction filter (which may run while _lock is held).
        self._recent_values = (key, *self._recent_values[:1])
        self._n.add("refreshes")
        event = KeyEvent(self.where, key.version, key.fingerprint, previous, reason)
        log.debug(
            "apimvault: %s loaded version %s (fp %s, %s)", self.where, key.version, key.fingerprint, reason
        )
        pending = [(self._on_refresh, event)]
        if previous is not None:
            self._n.add("rotations")
            log.info(
                "apimvault: %s rotated %s -> %s (fp %s)", self.where, previous, key.version, key.fingerprint
            )
            pending.append((self._on_rotate, event))
        return pending

    def _failed(
        self, error: BaseException, reason: str, retry_after: float | None
    ) -> list[tuple[Callable[[KeyEvent], None] | None, KeyEvent]]:
        """Record a failed fetch; return the callbacks to run (outside any lock).

        A disabled secret is a statement about the key itself (an operator pulled it): the cached key
        is dropped at once, so callers get :class:`SecretDisabledError` instead of a key Azure says is
        off. Other failures keep the cached key until its hard limit (stale-if-error).
        """
        if isinstance(error, SecretDisabledError):
            self._cache.clear()
            self._drop_fast()
        delay = self._cache.reject(error, retry_after=retry_after)
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

    def _drop_fast(self) -> None:
        """Forget the shells' lock-free fast-path snapshot (overridden where there is one)."""

    def _invalidate(self, spread: float) -> None:
        if not isinstance(spread, int | float) or isinstance(spread, bool) or not 0 <= spread < float("inf"):
            raise ConfigurationError(f"spread must be a finite number of seconds >= 0, got {spread!r}")
        self._n.add("invalidations")
        self._cache.invalidate(spread)

    def __repr__(self) -> str:
        with self._lock:
            entry = self._cache.entry()
        shown = f"version={entry.key.version!r}, fingerprint={entry.key.fingerprint!r}" if entry else "no key"
        return f"{type(self).__name__}({self.where!r}, {shown})"
