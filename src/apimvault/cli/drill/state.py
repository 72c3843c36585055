"""The state a drill's parts share."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .metrics import ClientSlot, Metrics, RotationRecord
from .target import Target

if TYPE_CHECKING:  # pragma: no cover
    from ..output import Output
    from .delivery import Delivery


# How a client reached a version (the provider's refresh reasons, named for the report). In the drill only
# the Event Grid push calls ``provider.refresh()``.
_VIA = {
    "401 from gateway": "401 -> refresh",
    "refresh ahead": "refresh-ahead",
    "refresh": "Event Grid push",
    "invalidated": "invalidate",
}


class DrillState:
    """What every part of a drill shares: the target, the clients, the versions, the timeline."""

    def __init__(self, target: Target, args: argparse.Namespace, out: Output) -> None:
        from ... import CachePolicy

        self.target = target
        self.out = out
        self.duration = float(args.duration)  # the parser refuses nan, inf and less than the minimum
        self.concurrency = max(2, int(args.concurrency))
        self.n_clients = max(2, min(int(args.clients), self.concurrency))
        self.chaos = bool(args.chaos)
        self.token_scope: str | None = getattr(args, "token_scope", None)  # key plus token
        spread = getattr(args, "propagation", None)
        self.propagation = 2.0 if spread is None else max(0.0, float(spread))
        if target.faults is None:  # no local stack to configure: the real gateways propagate as they do
            self.propagation = 0.0
        longest = self.propagation * (1.5 if self.chaos else 1.0)
        ttl = max(4.0, self.duration * 0.6)
        if longest > 0:
            # Rotation 2 must revoke the key the clients still hold: the gateway units stop accepting it
            # only `longest` after it is regenerated, and rotation 1 itself waits up to ~1.5 x longest for
            # them. The earliest refresh-ahead is at 0.55 x TTL (TTL jittered down 20 %, margin a quarter).
            revoked_by = max(0.2 * self.duration, 0.1 * self.duration + 1.5 * longest + 2.5) + longest
            ttl = max(ttl, (revoked_by + 4.0) / 0.55)
        self.policy = CachePolicy(
            ttl=ttl,
            jitter=0.2,
            refresh_margin=ttl / 4,
            max_staleness=max(60.0, self.duration * 2),
            backoff_initial=0.25,
            backoff_max=2.0,
            forced_refresh_interval=1.0,
        )
        self.metrics = Metrics()
        self.stop = threading.Event()
        self.slots: list[ClientSlot] = []
        self.rotations: list[RotationRecord] = []
        self.versions: list[str] = []  # rank of each version in this drill
        self.timeline: list[str] = []
        self.chaos_log: list[str] = []
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._async_ready = threading.Event()
        self._async_done = threading.Event()
        self._async_error: BaseException | None = None
        self._rotation_credential: Any = None
        self._sync_credential: Any = None
        self._started = threading.Event()
        self._async_loaded = threading.Event()
        self._traffic = threading.Event()
        self._ticking = False
        self.live = False
        self.aborted: str | None = None  # why the schedule stopped rotating early
        self.start_credential_id = ""
        self._propagation_before: dict[str, dict[str, float]] | None = None
        self.propagation_settings: dict[str, Any] | None = None  # per unit, as the drill set it
        self.delivery_choice: str = getattr(args, "delivery", None) or "auto"
        self.revoke = bool(getattr(args, "revoke", False))
        self.delivery: Delivery | None = None  # Event Grid -> queue -> the rotation function's handler
        self._exit = contextlib.ExitStack()  # the delivery's queue (and Azurite), closed at cleanup
        self._rotation_config: Any = None  # apimvault.rotation.RotationConfig the rotations run with
        self.rotator: dict[str, Any] | None = None  # who rotates, with which roles

    # ---------------------------------------------------------------------------- helpers

    def elapsed(self) -> float:
        return time.monotonic() - self._t0 if self._t0 else 0.0

    def log(self, text: str) -> None:
        """One timeline line, stamped with the time it is logged (printed in timeline order)."""
        with self._lock:
            self._log_locked(text)

    def _log_locked(self, *texts: str) -> None:
        """Log lines while holding ``_lock`` (with the state change they describe, so no other thread's
        line about that change can come first)."""
        for text in texts:
            line = f"t={self.elapsed():5.1f}s  {text}"
            self.timeline.append(line)
            if not self.live and not self.out.json:
                self.out.line(line)

    def _on_refresh(self, slot: ClientSlot) -> Callable[[Any], None]:
        def record(event: Any) -> None:
            reason = _VIA.get(event.reason, event.reason)
            with self._lock:
                slot.via.append((event.version, reason))

        return record

    def _ranks(self) -> list[int]:
        ranks = []
        for slot in self.slots:
            key = slot.provider.current()
            ranks.append(self.rank(key.version if key is not None else None))
        return ranks

    def rank(self, version: str | None) -> int:
        try:
            return self.versions.index(version or "")
        except ValueError:
            return -1
