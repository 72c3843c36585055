"""The plain data a provider works with and hands out: read plans, results, events, stats and counters.

Shared by the sync and async providers (:mod:`apimvault._base`); no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from typing import Literal, NamedTuple

from ._key import SubscriptionKey

__all__ = ["Fetched", "KeyEvent", "ProviderStats", "PushPlan", "Read", "Reason"]

Reason = Literal["load", "refresh ahead", "invalidated", "refresh", "401 from gateway"]
"""Why a provider read Key Vault (``KeyEvent.reason``)."""


class PushPlan(enum.Enum):
    """What a provider does about a Key Vault event (see ``ProviderBase._push_event``)."""

    SKIP = "skip"  # it already holds the version the event names
    READ = "read"  # read Key Vault now (refresh)
    DEFERRED = "deferred"  # invalidated: one background refresh, rate limited or spread


class Read(NamedTuple):
    """One Key Vault request to do: ``get_secret(version)`` (``None``: the latest), or with ``listing``
    ``list_properties_of_secret_versions``. ``staged_at``: the latest version is pre-staged, valid from
    then (Unix time). ``refused``: why the latest version is not served (disabled, expired, not yet valid);
    raised if no other version is valid now. ``for_401``: the read answers a gateway's 401. ``then``: the
    key is already read and this read checks the previous version before it may serve as a fallback."""

    version: str | None
    staged_at: float | None = None
    listing: bool = False
    refused: BaseException | None = None
    for_401: bool = False
    then: Fetched | None = None


class Fetched(NamedTuple):
    """A key read from Key Vault, and when (Unix time) to look again for a pre-staged newer version.
    ``previous_checked``: the previous version was read again, and ``previous`` is what Key Vault says of
    it now (``None``: disabled, expired, deleted or unreadable as a key, so never a fallback)."""

    key: SubscriptionKey
    revisit_at: float | None = None
    previous: SubscriptionKey | None = None
    previous_checked: bool = False


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
    state: str  # a apimvault._policy.State value: "empty" | "fresh" | "refresh-due" | "stale" | "expired"
    vault_reads: int
    refreshes: int
    rotations: int
    failures: int
    consecutive_failures: int
    forced_refreshes: int
    resends_401: int
    invalidations: int
    last_error: str | None
    fallbacks_to_previous: int = 0  # times the gateway refused the current key and the previous one was used
    expires_in_s: float | None = None  # seconds until the current key's expires_on (None: none / no key)


class Counters:
    """Thread-safe counters (``+=`` on a shared dict loses increments under contention)."""

    __slots__ = ("_counts", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            (
                "vault_reads",
                "refreshes",
                "rotations",
                "failures",
                "forced",
                "resends",
                "invalidations",
                "fallbacks",
            ),
            0,
        )

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def __getitem__(self, name: str) -> int:
        return self._counts[name]

    def after_fork(self) -> None:
        self._lock = threading.Lock()
