"""Stress: threads and asyncio tasks sending chat requests through apimvault clients while the key is
rotated (dual-key, old key revoked) and refreshes are pushed every few simulated seconds.

Long form (not run in CI)::

    .venv/bin/python -m bench.stress                       # 60 s, 64 threads + 1,000 asyncio tasks
    .venv/bin/python -m bench.stress --duration 10 --threads 8 --tasks 100 --json

The CI-sized form is ``tests/stress/test_stress.py`` (same engine, small sizes, repeated 20x).

Checked (see :meth:`StressResult.problems`): no exception in any worker; no deadlock (every join and wait is
bounded); every request reached the gateway with a valid key, except requests refused with a just-revoked key
that were then re-sent (``key:invalid`` == re-sends, ``key:missing`` == 0, valid uses == successes + 0); vault
reads within what the cache policy allows for the simulated time, the pushes and the rotations.

Time: a shared fake clock that the driver advances ``step_s`` per step; the driver moves to the next step only
once every worker has completed a request in the current one (a condition, not a sleep).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from apimvault.local import DEPLOYMENT, ROLE_USER, LocalAzure
from apimvault.local.stack import APIM_SERVICE, ARM_SUBSCRIPTION, RESOURCE_GROUP

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

    from apimvault import CachePolicy

# The SDK-facing names (openai, azure-core, aiohttp) are imported inside run_stress: aiohttp reads
# SSL_CERT_FILE once, at import, so main() must trust the stack's CA first (bench._stack.prepare_ca).
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "stress"}]
POLICY_KWARGS: dict[str, float] = {
    "ttl": 10,
    "jitter": 0.2,
    "refresh_margin": 2,
    "max_staleness": 60,
    "backoff_initial": 1,
    "backoff_max": 4,
    "forced_refresh_interval": 5,
}


class SimClock:
    def __init__(self) -> None:
        self.now = time.time()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@dataclasses.dataclass
class StressResult:
    threads: int
    tasks: int
    steps: int
    simulated_s: float
    elapsed_s: float
    rotations: int
    pushes: int
    ok: int = 0
    failed: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    transport: int = 0
    transport_errors: list[str] = dataclasses.field(default_factory=list)
    stuck: list[str] = dataclasses.field(default_factory=list)
    gateway: dict[str, int] = dataclasses.field(default_factory=dict)
    providers: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    read_bound: int = 0

    @property
    def resends(self) -> int:
        return sum(p["resends_401"] for p in self.providers.values())

    def problems(self) -> list[str]:
        out = []
        if self.errors:
            out.append(f"{len(self.errors)} worker error(s), first: {self.errors[0]}")
        out += self.stuck
        invalid = self.gateway.get("key:invalid", 0)
        if invalid != self.resends:
            out.append(f"{invalid} requests with an invalid key but {self.resends} re-sends")
        if self.gateway.get("key:missing", 0):
            out.append(f"{self.gateway['key:missing']} requests without a key")
        valid = self.gateway.get("key:primary", 0) + self.gateway.get("key:secondary", 0)
        # A transport failure may happen before or after the gateway checked the key.
        if not self.ok <= valid <= self.ok + self.transport:
            out.append(
                f"{valid} requests with a valid key but {self.ok} successes "
                f"({self.transport} transport errors)"
            )
        if self.transport > max(1, (self.ok + self.transport) // 100):
            out.append(f"{self.transport} transport errors (> 1%): {self.transport_errors}")
        for name, stats in self.providers.items():
            if stats["vault_reads"] > self.read_bound:
                out.append(f"{name}: {stats['vault_reads']} vault reads > bound {self.read_bound}")
        if self.ok == 0:
            out.append("no request succeeded")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "resends": self.resends, "problems": self.problems()}


class _Progress:
    """Per-worker completed-request counters and a condition the driver waits on."""

    def __init__(self, workers: int) -> None:
        self.done = [0] * workers
        self.cond = threading.Condition()
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self.transport = 0
        self.transport_errors: list[str] = []

    def record(self, worker: int, error: BaseException | None) -> None:
        with self.cond:
            self.done[worker] += 1
            if error is None:
                self.ok += 1
            elif _is_transport(error):
                self.transport += 1
                if len(self.transport_errors) < 5:
                    self.transport_errors.append(f"{type(error).__name__} ({type(error.__cause__).__name__})")
            else:
                self.failed += 1
                if len(self.errors) < 20:
                    self.errors.append(f"{type(error).__name__}: {error}")
            self.cond.notify_all()

    def wait_all_past(self, snapshot: list[int], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(
                lambda: all(d > s for d, s in zip(self.done, snapshot, strict=True)), timeout
            )

    def snapshot(self) -> list[int]:
        with self.cond:
            return list(self.done)


def _is_transport(error: BaseException) -> bool:
    """A connection error or timeout between the client and an overloaded local stack: the test machine,
    not apimvault (apimvault's own errors propagate unwrapped; openai wraps only httpx2 errors)."""
    import openai

    cause = error.__cause__
    return (
        isinstance(error, openai.APIConnectionError)
        and cause is not None
        and type(cause).__module__.split(".")[0] in ("httpx2", "httpcore2", "ssl", "anyio")
    )


def _new_app(azure: LocalAzure) -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:10]
    sub = azure.apim_state.create_subscription(
        ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE, f"stress-{suffix}", display_name=f"stress {suffix}"
    )
    name = f"stress-{suffix}"
    azure.keyvault.put_secret(name, sub.primary_key, tags={"CredentialId": "primary"})
    azure.keyvault.grant(azure.default_identity, ROLE_USER, secret=name)
    return name, sub.sid


def _rotate(azure: LocalAzure, name: str, sid: str, current: str) -> str:
    """Dual-key rotation: regenerate the other key, store it, then revoke the one clients are using."""
    other = "secondary" if current == "primary" else "primary"
    azure.apim_state.regenerate(sid, other)  # type: ignore[arg-type]
    sub = azure.apim_state.get(sid)
    assert sub is not None
    azure.keyvault.put_secret(name, sub.key(other), tags={"CredentialId": other})  # type: ignore[arg-type]
    azure.apim_state.regenerate(sid, current)  # type: ignore[arg-type]
    return other


def run_stress(
    azure: LocalAzure,
    *,
    threads: int,
    tasks: int,
    steps: int | None = None,
    duration_s: float | None = None,
    step_s: float = 2.0,
    rotate_every: int = 5,
    push_every: int = 3,
    policy: CachePolicy | None = None,
    stall_s: float = 30.0,
) -> StressResult:
    """Run the workload; ``steps`` (CI) or ``duration_s`` (long form) bounds it."""
    from apimvault import (
        AsyncSubscriptionKeyProvider,
        CachePolicy,
        SubscriptionKeyProvider,
        create_async_azure_openai,
        create_azure_openai,
    )

    assert steps is not None or duration_s is not None
    policy = policy if policy is not None else CachePolicy(**POLICY_KWARGS)
    name, sid = _new_app(azure)
    clock = SimClock()
    sync_provider = SubscriptionKeyProvider(
        azure.vault_url, name, clock=clock, policy=policy, client_kwargs={"retry_total": 0}
    )
    client = create_azure_openai(sync_provider, max_retries=0, timeout=30)
    progress = _Progress(threads + tasks)
    stop = threading.Event()

    def thread_worker(index: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if n % 2:
                    # `with`: `any` stops at the first chunk with text; leaving the block closes the response.
                    streamed = client.chat.completions.create(
                        model=DEPLOYMENT, messages=MESSAGES, stream=True
                    )
                    with streamed as chunks:
                        assert any(c.choices and c.choices[0].delta.content for c in chunks)
                else:
                    assert client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices
                progress.record(index, None)
            except Exception as exc:
                progress.record(index, exc)

    loop = asyncio.new_event_loop()
    loop_ready = threading.Event()
    holder: dict[str, Any] = {}

    async def async_main() -> None:
        aprovider = AsyncSubscriptionKeyProvider(
            azure.vault_url, name, clock=clock, policy=policy, client_kwargs={"retry_total": 0}
        )
        aclient = create_async_azure_openai(aprovider, max_retries=0, timeout=30)
        astop = asyncio.Event()
        holder.update(provider=aprovider, stop=astop)
        loop_ready.set()

        async def task_worker(index: int) -> None:
            n = 0
            while not astop.is_set():
                n += 1
                try:
                    if n % 2:
                        stream = await aclient.chat.completions.create(
                            model=DEPLOYMENT,
                            messages=MESSAGES,
                            stream=True,
                        )
                        assert [c async for c in stream]
                    else:
                        assert (
                            await aclient.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
                        ).choices
                    progress.record(index, None)
                except Exception as exc:
                    progress.record(index, exc)

        try:
            await asyncio.gather(*(task_worker(threads + i) for i in range(tasks)))
        finally:
            await aclient.close()
            await aprovider.close()

    def loop_thread() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(async_main())
        finally:
            loop_ready.set()
            loop.close()

    result = StressResult(threads, tasks, 0, 0.0, 0.0, 0, 0)
    started = time.monotonic()
    pool = [threading.Thread(target=thread_worker, args=(i,), daemon=True) for i in range(threads)]
    looper = threading.Thread(target=loop_thread, daemon=True)
    current = "primary"
    try:
        if tasks:
            looper.start()
            loop_ready.wait(stall_s)
        for t in pool:
            t.start()
        if not progress.wait_all_past([0] * (threads + tasks), stall_s):
            result.stuck.append("workers did not complete a first request in time")
        step = 0
        while (steps is not None and step < steps) or (
            duration_s is not None and time.monotonic() - started < duration_s
        ):
            step += 1
            snapshot = progress.snapshot()
            clock.advance(step_s)
            if step % rotate_every == 0:
                current = _rotate(azure, name, sid, current)
                result.rotations += 1
            if step % push_every == 0:
                sync_provider.invalidate()
                if tasks:
                    loop.call_soon_threadsafe(holder["provider"].invalidate)
                result.pushes += 1
            if not progress.wait_all_past(snapshot, stall_s):
                lagging = [i for i, (d, s) in enumerate(zip(progress.done, snapshot, strict=True)) if d <= s]
                result.stuck.append(f"step {step}: workers {lagging[:10]} made no progress in {stall_s} s")
                break
        result.steps = step
    finally:
        stop.set()
        if tasks and "stop" in holder:
            loop.call_soon_threadsafe(holder["stop"].set)
        for t in pool:
            t.join(stall_s)
            if t.is_alive():
                result.stuck.append(f"thread {t.name} did not stop (deadlock?)")
        if tasks:
            looper.join(stall_s)
            if looper.is_alive():
                result.stuck.append("asyncio loop did not stop (deadlock?)")
        else:
            loop.close()  # never run (no tasks): loop_thread, which closes it, never started
        client.close()
    result.elapsed_s = round(time.monotonic() - started, 2)
    result.simulated_s = result.steps * step_s
    result.ok = progress.ok
    result.failed = progress.failed
    result.errors = progress.errors
    result.transport = progress.transport
    result.transport_errors = progress.transport_errors
    result.gateway = azure.gateway.counters.labels()
    named: dict[str, Any] = {"sync": sync_provider}
    if tasks and "provider" in holder:
        named["async"] = holder["provider"]
    for label, provider in named.items():
        stats = provider.stats()
        result.providers[label] = {
            "vault_reads": stats.vault_reads,
            "forced_refreshes": stats.forced_refreshes,
            "resends_401": stats.resends_401,
            "rotations": stats.rotations,
            "failures": stats.failures,
            "invalidations": stats.invalidations,
        }
    sync_provider.close()
    # What the policy allows: a cold read, one refresh per (shortest jittered TTL - margin) of simulated time,
    # one forced refresh per forced_refresh_interval, and one read per push.
    cycle = policy.ttl * (1 - policy.jitter) - policy.margin
    forced = policy.forced_refresh_interval
    result.read_bound = (
        1
        + math.ceil(result.simulated_s / cycle)
        + 1
        + math.ceil(result.simulated_s / forced)
        + 1
        + result.pushes
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="apimvault stress (long form)")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from bench._stack import prepare_ca

    ca = prepare_ca()  # before anything imports aiohttp
    with LocalAzure(ca=ca) as azure, azure.env():
        result = run_stress(
            azure, threads=args.threads, tasks=args.tasks, duration_s=args.duration, stall_s=120
        )
    doc = result.as_dict()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(
            f"{result.ok} requests ok in {result.elapsed_s} s ({result.simulated_s:.0f} simulated s, "
            f"{result.rotations} rotations, {result.pushes} pushes), {result.failed} errors, "
            f"{result.transport} transport errors, "
            f"{result.resends} re-sends after 401, vault reads {result.providers} (bound {result.read_bound})"
        )
        for problem in doc["problems"]:
            print(f"PROBLEM: {problem}")
    return 1 if doc["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
