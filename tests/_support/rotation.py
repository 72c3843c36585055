"""Helpers for the rotation tests: the rotator identity with exactly infra's roles, a manual clock, and a
scheduler that forces how overlapping rotations interleave (each run stops at every step hook until the
schedule lets it go on), so no test sleeps."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from azure.identity import DefaultAzureCredential

from apimvault.local import LocalAzure
from apimvault.local.rbac import Assignment
from tests._support.core import FakeClock


class _AppLike(Protocol):
    """An app secret of the suite (``core.AppSecret``, ``cli.RotatingApp``)."""

    @property
    def name(self) -> str: ...

    @property
    def sid(self) -> str: ...


class RotatorAccess:
    """The stack's rotator identity (:attr:`LocalAzure.rotator_identity`) holding exactly what ``infra/``
    gives the rotation, per app secret: the roles file's secret-rotator role on the secret and its APIM
    key-rotator role on the secret's APIM subscription (infra assigns both on the ONE secret and the ONE
    subscription, so every new app secret needs its own grant: :meth:`for_app`). Not Secrets Officer.

    The identity is shared by the whole test session, so :meth:`close` revokes exactly the assignments made
    here (the seeded secret's grants, made by the stack, stay)."""

    def __init__(self, azure: LocalAzure) -> None:
        self.azure = azure
        self.identity = azure.rotator_identity
        self.client_id: str = azure.rotator_identity.client_id
        self.credential = DefaultAzureCredential(managed_identity_client_id=self.client_id)
        self._granted: list[Assignment] = []

    def grant(self, secret: str, apim_subscription: str) -> DefaultAzureCredential:
        """Grant infra's rotator roles on ``secret`` and APIM subscription ``apim_subscription`` (its sid);
        returns the rotator's credential."""
        existing = set(self.azure.rbac.assignments(self.identity))
        for assignment in self.azure.grant_rotator_roles(
            self.identity, secret=secret, apim_subscription=apim_subscription
        ):
            if assignment not in existing:  # a grant the stack made (the seeded secret) is not ours to revoke
                self._granted.append(assignment)
        return self.credential

    def for_app(self, app: _AppLike) -> DefaultAzureCredential:
        """:meth:`grant` on ``app``'s secret and subscription; returns the rotator's credential."""
        return self.grant(app.name, app.sid)

    def close(self) -> None:
        for assignment in self._granted:
            self.azure.revoke_role(self.identity, assignment.role, assignment.scope)
        self._granted.clear()
        self.credential.close()


@contextlib.contextmanager
def rotator_access(azure: LocalAzure) -> Iterator[RotatorAccess]:
    """A :class:`RotatorAccess` for the block; its grants are revoked and its credential closed after."""
    access = RotatorAccess(azure)
    try:
        yield access
    finally:
        access.close()


class ManualClock(FakeClock):
    """The suite's :class:`~tests._support.core.FakeClock` at a fixed epoch (1000.0); ``advance`` doubles as
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
