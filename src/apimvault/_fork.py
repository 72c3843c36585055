"""Fork safety of the factories' clients.

A client built (and used) before ``os.fork()`` holds pooled connections; a child using them would share
the parent's sockets (a prefork server: gunicorn --preload). In the child, each tracked client's pools are
replaced by empty ones of the same configuration; the inherited pools (the parent's connections) are kept
untouched and never closed by the child, so the parent's sockets are left alone.
"""

from __future__ import annotations

import copy
import os
import weakref
from typing import Any

import httpx2

__all__ = ["track_for_fork"]

_TRACKED: weakref.WeakSet[httpx2.Client | httpx2.AsyncClient] = weakref.WeakSet()
_INHERITED: list[object] = []  # the child's references to the parent's pools: never closed, never used


def track_for_fork(client: httpx2.Client | httpx2.AsyncClient) -> None:
    """Give ``client`` fresh connection pools in a forked child (the factories call this)."""
    _TRACKED.add(client)


def _fresh_pool(pool: Any) -> Any:
    fresh = copy.copy(pool)  # the configuration (TLS context, limits, proxy, backend) is shared, read-only
    fresh._connections = []
    fresh._requests = []
    fresh._optional_thread_lock = type(pool._optional_thread_lock)()
    return fresh


def _after_fork_in_child() -> None:
    for client in list(_TRACKED):
        for transport in [client._transport, *client._mounts.values()]:
            pool = getattr(transport, "_pool", None)
            if pool is not None and hasattr(pool, "_connections"):
                _INHERITED.append(pool)
                transport._pool = _fresh_pool(pool)


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
