"""Issue 21, item 19: the factories' clients are fork-safe (a prefork fleet, gunicorn ``--preload`` style).

One provider and one client are built *and used* in the parent (its pool holds a live connection), then a
few workers are forked; each sends requests before and after a rotation that revokes the key they all
started with. A child gets a fresh connection pool; the parent's pool is left alone and keeps working.
Counts, not timing: every request of every worker must succeed, and none goes out on the parent's
connection (the local port of each response's connection, httpcore2's ``network_stream`` extension).
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import pytest
from azure.identity import DefaultAzureCredential

from apimvault import (
    AsyncSubscriptionKeyProvider,
    BearerTokenSource,
    CachePolicy,
    SubscriptionKeyProvider,
    create_async_azure_openai,
    create_azure_openai,
    refusal_stats,
)
from apimvault.local import DEPLOYMENT, Fault, LocalAzure
from tests._support.core import FakeClock, new_app_secret, rotate_to_secondary, user_messages, wait_until
from tests._support.policies import FAST_REFRESH

MESSAGES = user_messages("hello")
# Its own numbers: on the real clock, a forced refresh every 0.5 s lets each rotation's 401 refresh at once.
FAST = CachePolicy(ttl=300, jitter=0, refresh_margin=60, forced_refresh_interval=0.5)
WORKERS = 3
PER_PHASE = 5
WAIT_S = 60  # a generous bound on a stuck child (a deadline, not a measurement)


def _read_line(fd: int) -> str:
    """One line from a child's pipe, bounded by :data:`WAIT_S` (a stuck child fails the test)."""
    data = b""
    deadline = time.monotonic() + WAIT_S
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "a forked worker is stuck (a shared connection, an inherited lock?)"
        chunk = os.read(fd, 4096)
        assert chunk, "a forked worker died"
        data += chunk
    return data.decode().strip()


def _fork(
    work: Callable[[Callable[[str], None], Callable[[], None]], dict[str, Any]],
) -> tuple[int, int, int]:
    """Fork a worker running ``work(say, wait_go)``; its result goes back as JSON. Returns pid and fds."""
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the case under test
        pid = os.fork()
    if pid == 0:  # the worker: never returns into pytest
        code = 1
        try:
            os.close(to_parent_r)
            os.close(to_child_w)

            def say(text: str) -> None:
                os.write(to_parent_w, (text + "\n").encode())

            def wait_go() -> None:
                assert os.read(to_child_r, 1) == b"g"

            say(json.dumps(work(say, wait_go)))
            code = 0
        except BaseException as exc:  # reported, never raised into the forked pytest
            try:
                os.write(to_parent_w, (json.dumps({"crash": repr(exc)}) + "\n").encode())
            finally:
                code = 2
        finally:
            os._exit(code)
    os.close(to_parent_w)
    os.close(to_child_r)
    return pid, to_parent_r, to_child_w


def _run_fleet(
    azure: LocalAzure,
    app: Any,
    work: Callable[[Callable[[str], None], Callable[[], None]], dict[str, Any]],
    workers: int = WORKERS,
    rotations: int = 1,
) -> list[dict[str, Any]]:
    """Fork ``workers``; between their phases (one more than ``rotations``) revoke the key they hold."""
    children = [_fork(work) for _ in range(workers)]
    try:
        for _ in range(rotations):
            for _, read_fd, _ in children:
                assert _read_line(read_fd) == "phase-done"
            rotate_to_secondary(azure, app)  # mid-run: the key every worker holds is revoked
            for _, _, write_fd in children:
                os.write(write_fd, b"g")
        results = [json.loads(_read_line(read_fd)) for _, read_fd, _ in children]
        for pid, _, _ in children:
            assert os.waitpid(pid, 0)[1] == 0
        return results
    finally:
        for pid, read_fd, write_fd in children:
            os.close(read_fd)
            os.close(write_fd)
            try:
                os.kill(pid, signal.SIGKILL)  # only if still there (a failed test); our own child
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


class Sockets:
    """An httpx2 response hook recording the local port of the connection each response came on
    (httpcore2's public ``network_stream`` extension): which pooled connection a process used."""

    def __init__(self) -> None:
        self.ports: list[int] = []

    def __call__(self, response: httpx2.Response) -> None:
        stream = response.extensions["network_stream"]
        self.ports.append(stream.get_extra_info("client_addr")[1])

    async def hook(self, response: httpx2.Response) -> None:
        self(response)


def _sync_fleet(azure: LocalAzure, workers: int, rotations: int, per_phase: int) -> None:
    app = new_app_secret(azure)
    # One rotation: a clock that never moves (no refresh but the 401's). More: the real clock, so the next
    # revocation's forced read is allowed again (a 401 inside the interval waits for it, issue 21 item 18).
    clocked: dict[str, Any] = (
        {"clock": FakeClock(), "policy": FAST_REFRESH} if rotations == 1 else {"policy": FAST}
    )
    provider = SubscriptionKeyProvider(azure.vault_url, app.name, **clocked)
    sockets = Sockets()
    http = openai.DefaultHttpxClient(event_hooks={"response": [sockets]})
    client = create_azure_openai(provider, max_retries=0, http_client=http)
    assert client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices  # a pooled connection
    [parent_port] = sockets.ports

    def work(say: Callable[[str], None], wait_go: Callable[[], None]) -> dict[str, Any]:
        ok, failed = 0, []
        for phase in range(rotations + 1):
            if phase > 0:
                wait_go()
            for _ in range(per_phase):
                try:
                    assert client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices
                    ok += 1
                except Exception as exc:
                    failed.append(f"{type(exc).__name__}: {exc}")
            if phase < rotations:
                say("phase-done")
        ports = sockets.ports[1:]  # the parent's first one was inherited with the list
        return {"ok": ok, "failed": failed, "resends": refusal_stats(provider).key_resends, "ports": ports}

    results = _run_fleet(azure, app, work, workers, rotations)
    assert [r.get("failed") for r in results] == [[]] * workers, results
    assert sum(r["ok"] for r in results) == workers * (rotations + 1) * per_phase
    assert all(r["resends"] == rotations for r in results)  # each worker met each revocation once
    # No worker ever sent on the parent's pooled connection (the only one they could share: it is the one
    # they inherited; the parent keeps it open, so its local port is not reused meanwhile).
    assert all(parent_port not in r["ports"] for r in results)
    # The parent's client and pool were left alone: it still works (on its own connection, or on a new one
    # if keep-alive expired meanwhile: which one depends on time, so it is not asserted).
    assert client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices
    client.close()
    provider.close()


def test_prefork_fleet_sync_through_a_revoking_rotation(azure: LocalAzure) -> None:
    _sync_fleet(azure, WORKERS, rotations=1, per_phase=PER_PHASE)


@pytest.mark.slow
def test_prefork_fleet_of_sixteen_through_two_revoking_rotations(azure: LocalAzure) -> None:
    """The issue's shape: 16 workers, two revoking rotations mid-run (gunicorn --preload)."""
    _sync_fleet(azure, 16, rotations=2, per_phase=20)


def test_prefork_fleet_async_through_a_revoking_rotation(azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    provider = AsyncSubscriptionKeyProvider(azure.vault_url, app.name, clock=FakeClock(), policy=FAST_REFRESH)
    sockets = Sockets()
    http = openai.DefaultAsyncHttpxClient(event_hooks={"response": [sockets.hook]})
    client = create_async_azure_openai(provider, max_retries=0, http_client=http)

    async def one() -> bool:
        reply = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        return bool(reply.choices)

    parent_loop = asyncio.new_event_loop()
    assert parent_loop.run_until_complete(one())  # built and used in the parent: a pooled connection
    [parent_port] = sockets.ports

    def work(say: Callable[[str], None], wait_go: Callable[[], None]) -> dict[str, Any]:
        async def phase(n: int) -> tuple[int, list[str]]:
            results = await asyncio.gather(*[one() for _ in range(n)], return_exceptions=True)
            return (
                sum(r is True for r in results),
                [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)],
            )

        async def main() -> dict[str, Any]:
            ok1, failed1 = await phase(PER_PHASE)
            say("phase-done")
            wait_go()  # blocking is fine: nothing else runs in this worker
            ok2, failed2 = await phase(PER_PHASE)
            resends = refusal_stats(provider).key_resends
            ports = sockets.ports[1:]
            return {"ok": ok1 + ok2, "failed": failed1 + failed2, "resends": resends, "ports": ports}

        return asyncio.run(main())  # a worker runs its own loop (the provider forgot the parent's)

    try:
        results = _run_fleet(azure, app, work)
    finally:
        parent_loop.run_until_complete(client.close())
        parent_loop.run_until_complete(provider.close())
        parent_loop.close()
    assert [r.get("failed") for r in results] == [[]] * WORKERS, results
    assert sum(r["ok"] for r in results) == WORKERS * 2 * PER_PHASE
    assert all(parent_port not in r["ports"] for r in results)


def test_fork_during_a_token_refresh_leaves_the_child_a_working_token_source(azure: LocalAzure) -> None:
    """Issue 21, item 11: a thread of the parent is inside a token refresh (holding the source's lock) when
    the process forks; the child's token source must not wait forever for that lock."""
    credential = DefaultAzureCredential()
    source = BearerTokenSource(credential, "api://apimvault-gateway/.default")
    sent = source.token()
    before = azure.identity.counters.total()
    azure.identity.faults.add(Fault("hang", seconds=3, times=1))  # the refresh's token request is held
    refresh = threading.Thread(target=source.refresh_after_rejection, args=(sent,), daemon=True)
    refresh.start()
    wait_until(lambda: azure.identity.counters.total() > before, "the refresh to reach the identity endpoint")
    assert refresh.is_alive()  # inside the refresh, holding the lock, when the process forks

    def work(say: Callable[[str], None], wait_go: Callable[[], None]) -> dict[str, Any]:
        # Inside the bound the parent's refresh set, the refused token gets no new request: None, at once.
        again = source.refresh_after_rejection(sent)
        return {"again": again, "token_is_current": source.token() == sent}

    pid, read_fd, write_fd = _fork(work)
    try:
        result = json.loads(_read_line(read_fd))  # was: the child blocked on the inherited lock forever
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        os.close(read_fd)
        os.close(write_fd)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert result == {"again": None, "token_is_current": True}
    azure.identity.faults.clear()
    refresh.join(timeout=WAIT_S)
    credential.close()
