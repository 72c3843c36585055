"""The state a drill's parts share."""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .metrics import ClientSlot, Metrics, RotationRecord
from .target import Target

if TYPE_CHECKING:  # pragma: no cover
    from ..output import Output


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
        ttl = max(4.0, self.duration * 0.6)
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

    # ---------------------------------------------------------------------------- helpers

    def elapsed(self) -> float:
        return time.monotonic() - self._t0 if self._t0 else 0.0

    def log(self, text: str) -> None:
        line = f"t={self.elapsed():5.1f}s  {text}"
        with self._lock:
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
