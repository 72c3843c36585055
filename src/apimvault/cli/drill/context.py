"""What every part of a drill shares: the target, the output, the clock, the timeline, the versions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .metrics import Metrics
from .target import Target

if TYPE_CHECKING:  # pragma: no cover
    from ..output import Output


class DrillContext:
    """The drill's shared context. The parts (traffic, rotations, schedule, report) own their own state and
    meet here: ``lock`` guards ``versions``, ``timeline`` and what a part changes together with a line of it
    (see :meth:`log_locked`); ``stop`` ends the traffic and the monitor."""

    def __init__(self, target: Target, out: Output, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.target = target
        self.out = out
        self.clock = clock
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.metrics = Metrics()
        self.versions: list[str] = []
        """Every version of the drill, oldest first: a version's rank is its index."""
        self.timeline: list[str] = []
        self.live = False
        """A live table shows the timeline's tail: lines are not printed as they are logged."""
        self._t0: float | None = None

    def start_clock(self) -> None:
        """``t=0``: traffic starts."""
        self._t0 = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self._t0 if self._t0 is not None else 0.0

    def log(self, text: str) -> None:
        """One timeline line, stamped with the time it is logged (printed in timeline order)."""
        with self.lock:
            self.log_locked(text)

    def log_locked(self, *texts: str) -> None:
        """Log lines while holding ``lock`` (with the state change they describe, so no other thread's line
        about that change can come first)."""
        for text in texts:
            line = f"t={self.elapsed():5.1f}s  {text}"
            self.timeline.append(line)
            if not self.live and not self.out.json:
                self.out.line(line)

    def rank(self, version: str | None) -> int:
        """The rank of ``version`` in this drill (``-1``: not one of its versions)."""
        try:
            return self.versions.index(version or "")
        except ValueError:
            return -1
