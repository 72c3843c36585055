"""Helpers for the rotation tests: a manual clock, and a scheduler that forces how overlapping rotations
interleave (each run stops at every step hook until the schedule lets it go on), so no test sleeps."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from .core_helpers import FakeClock


class ManualClock(FakeClock):
    """The suite's :class:`~tests.core_helpers.FakeClock` at a fixed epoch (1000.0); ``advance`` doubles as
    the rotation's ``sleep``."""

    def __init__(self, start: float = 1000.0) -> None:
        super().__init__(start)


class Scheduler:
    """Runs ``n`` functions in threads, one at a time: a run goes on past a step hook only when the next
    entry of ``order`` names it. When ``order`` is used up the remaining runs take turns (round robin);
    entries naming a finished run are passed over. Every hand-over waits on a condition with a generous
    timeout."""

    def __init__(self, order: Sequence[int], n: int, *, timeout: float = 60.0) -> None:
        self.order = list(order)
        self.n = n
        self.timeout = timeout
        self._cond = threading.Condition()
        self._turn: int | None = None
        self._waiting: set[int] = set()
        self._done: set[int] = set()
        self.trace: list[tuple[int, str]] = []
        self._rr = -1

    def hook(self, run: int) -> Callable[[str], None]:
        def on_step(step: str) -> None:
            with self._cond:
                self.trace.append((run, step))
                self._waiting.add(run)
                self._turn = None if self._turn == run else self._turn
                self._cond.notify_all()
                if not self._cond.wait_for(lambda: self._turn == run, self.timeout):
                    raise TimeoutError(f"run {run} never got its turn at {step}")
                self._waiting.discard(run)

        return on_step

    def _next(self) -> int | None:
        live = [r for r in range(self.n) if r not in self._done]
        while self.order:
            candidate = self.order.pop(0)
            if candidate in live:
                return candidate
        if not live:
            return None
        # Round robin, so that a run waiting for another (a lease) never starves it.
        self._rr = next((r for r in live if r > self._rr), live[0])
        return self._rr

    def run(self, target: Callable[[int, Callable[[str], None]], Any]) -> list[Any]:
        """Start ``target(i, hook)`` for every run; return each one's result or exception."""
        results: list[Any] = [None] * self.n

        def body(i: int) -> None:
            try:
                results[i] = target(i, self.hook(i))
            except BaseException as exc:
                results[i] = exc
            finally:
                with self._cond:
                    self._done.add(i)
                    self._turn = None
                    self._cond.notify_all()

        threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(self.n)]
        for t in threads:
            t.start()
        with self._cond:
            while len(self._done) < self.n:
                # Wait until every live run is parked at a hook (or finished), then hand the turn on.
                ok = self._cond.wait_for(
                    lambda: self._turn is None and self._waiting | self._done == set(range(self.n)),
                    self.timeout,
                )
                if not ok:
                    raise TimeoutError(f"runs did not reach a hook; trace so far {self.trace[-10:]}")
                if len(self._done) == self.n:
                    break
                self._turn = self._next()
                self._cond.notify_all()
        for t in threads:
            t.join(self.timeout)
        return results
