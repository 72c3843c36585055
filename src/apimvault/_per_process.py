"""Fork safety of the providers and of per-process locks.

Every live provider is registered, so a forked child can reset what it inherited
(``ProviderBase._after_fork``); :func:`per_process` makes a lock attribute of another class per process.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["per_process"]

# Every live provider, so a forked child can reset what it inherited (see ProviderBase._after_fork).
PROVIDERS: weakref.WeakSet[Any] = weakref.WeakSet()  # of ProviderBase


def _after_fork_in_child() -> None:
    for provider in list(PROVIDERS):
        provider._after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _PerProcess:
    """A data descriptor for a lock (or any per-process object) held by instances of a class that does not
    itself reset on fork: a forked child reading the attribute gets a fresh one instead of the parent's,
    which a parent thread may have held at the fork (the child would wait for it forever)."""

    _guard = threading.Lock()

    def __init__(self, name: str, factory: Callable[[], Any]) -> None:
        self._slot = f"_{name}_per_process"
        self._factory = factory

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        pid = os.getpid()
        held = obj.__dict__.get(self._slot)
        if held is not None and held[0] == pid:
            return held[1]
        with _PerProcess._guard:  # two threads of a child must get the same fresh lock
            held = obj.__dict__.get(self._slot)
            if held is None or held[0] != pid:
                held = obj.__dict__[self._slot] = (pid, self._factory())
            return held[1]

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self._slot] = (os.getpid(), value)


def per_process(owner: type, name: str, factory: Callable[[], Any]) -> None:
    """Make ``owner().<name>`` per process: a forked child gets ``factory()`` in place of the parent's
    (e.g. ``per_process(BearerTokenSource, "_lock", threading.Lock)``)."""
    setattr(owner, name, _PerProcess(name, factory))


def _fresh_guard() -> None:
    _PerProcess._guard = threading.Lock()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_fresh_guard)
