"""Request outcomes and the records of clients and rotations."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import Counter, deque
from typing import Any

BROKEN_WINDOW = 40
BROKEN_SHARE = 0.5


class Metrics:
    """Thread-safe request outcomes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latencies: list[float] = []
        self.requests = 0
        self.failed = 0
        self.streaming = 0
        self.errors: Counter[str] = Counter()
        self._window: list[float] = []
        self._recent: deque[bool] = deque(maxlen=BROKEN_WINDOW)  # outcomes of the latest requests

    def ok(self, seconds: float, streaming: bool) -> None:
        now = time.monotonic()
        with self._lock:
            self.requests += 1
            self.streaming += streaming
            self.latencies.append(seconds)
            self._window.append(now)
            self._recent.append(True)

    def fail(self, seconds: float, streaming: bool, exc: BaseException) -> None:
        now = time.monotonic()
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        with self._lock:
            self.requests += 1
            self.failed += 1
            self.streaming += streaming
            self.latencies.append(seconds)
            self.errors[message] += 1
            self._window.append(now)
            self._recent.append(False)

    def broken(self) -> str | None:
        """Why the traffic itself looks broken (most of the latest requests failed), or None.

        Judged on the latest :data:`BROKEN_WINDOW` requests once there are at least half as many: a
        rotation drill fails a few requests at worst, not most of them.
        """
        with self._lock:
            recent = list(self._recent)
        failed = recent.count(False)
        if len(recent) >= BROKEN_WINDOW // 2 and failed / len(recent) >= BROKEN_SHARE:
            return f"{failed} of the latest {len(recent)} requests failed"
        return None

    def rate(self, window: float = 2.0) -> float:
        now = time.monotonic()
        with self._lock:
            self._window = [t for t in self._window if t > now - window]
            return len(self._window) / window

    def percentiles(self) -> dict[str, float]:
        with self._lock:
            data = sorted(self.latencies)
        if not data:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}

        def q(p: float) -> float:
            return data[min(len(data) - 1, max(0, math.ceil(p * len(data)) - 1))] * 1000

        return {"p50": round(q(0.50), 1), "p99": round(q(0.99), 1), "max": round(data[-1] * 1000, 1)}


@dataclasses.dataclass
class ClientSlot:
    """One provider + client pair that several workers share."""

    name: str
    kind: str  # "sync" | "async"
    provider: Any
    client: Any = None
    via: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (version, reason) loads
    gateway_url: str = ""  # the gateway unit this client talks to


@dataclasses.dataclass
class RotationRecord:
    index: int
    at_s: float
    old_version: str | None
    new_version: str
    credential_id: str
    regenerated: str | None
    fingerprint: str | None
    push: bool
    started_s: float = 0.0
    clients_on_revoked_key: int = 0
    convergence_s: float | None = None
    converged_via: dict[str, int] = dataclasses.field(default_factory=dict)
    revocation_recovery_s: float | None = None
    propagation_s: float | None = None
    """How long the rotation waited for every gateway unit to accept its new key."""
    vault_latest_live: bool | None = None
    """Whether, after the rotation, the vault's latest version held a live key every unit accepts."""
    vault_check: dict[str, Any] | None = None
    deliveries: list[str] = dataclasses.field(default_factory=list)
    """With an overlapped rotation: what each delivery of the event did."""
    overlapped: bool = False
    revoked_rank: int | None = None
    """The rank of the newest version whose key this rotation revoked (default: ``index - 2``, the version
    before the previous one; a revocation also revokes the previous one's, ``index - 1``)."""
    revocation: dict[str, Any] | None = None
    """A revocation's outcome: the leaked slot and fingerprint, the fleet wait, when the key died."""


def counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items())
