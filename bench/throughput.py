"""Throughput through the local stack, which runs in a child process (:class:`bench._stack.RemoteStack`).

* Stack capacity: ``SecretClient.get_secret`` calls/s and chat completions/s at concurrency 32, measured
  twice: one client process with 32 threads sharing one client (the way an app runs), and 4 client
  processes x 8 threads (``bench._worker``), which takes the client's GIL out of the way and so shows
  what the stack itself sustains.
* Contender throughput: chat completions/s at concurrency 32 (32 threads sharing one client; 32 tasks
  for the async clients), in interleaved pairs (:func:`_pairs`: static and one contender back to back,
  order alternating), reported as the median and interquartile range over pairs of the contender's rate
  divided by the static contender's rate *in the same pair*, plus the client process's CPU time per
  request (the stack's CPU is in the other process), also per pair.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .contenders import (
    APIMVAULT,
    PER_REQUEST,
    STATIC,
    Contender,
    Target,
    achat_once,
    async_chat_client,
    async_key_source,
    chat_client,
    chat_once,
    key_source,
    secret_client,
)

CONCURRENCY = 32


def remote_target(environ: dict[str, str]) -> Target:
    return Target(
        environ["AZURE_KEYVAULT_URL"],
        environ["APIMVAULT_SECRET_NAME"],
        environ["AZURE_OPENAI_ENDPOINT"],
        environ["OPENAI_API_VERSION"],
        environ["APIMVAULT_DEPLOYMENT"],
    )


def run_threads(
    fn: Callable[[], Any], seconds: float, threads: int = CONCURRENCY
) -> tuple[int, float, float]:
    """Call ``fn`` from ``threads`` threads for ``seconds``; (calls, wall seconds, process CPU seconds)."""
    stop = threading.Event()
    counts = [0] * threads
    errors = [0]

    def worker(i: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                fn()
            except Exception:
                errors[0] += 1
                continue
            n += 1
        counts[i] = n

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    cpu, start = time.process_time(), time.perf_counter()
    for t in pool:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if errors[0]:
        raise RuntimeError(f"{errors[0]} requests failed during a throughput run")
    return sum(counts), wall, cpu


async def run_tasks(
    fn: Callable[[], Any], seconds: float, tasks: int = CONCURRENCY
) -> tuple[int, float, float]:
    stop = asyncio.Event()
    counts = [0]

    async def worker() -> None:
        while not stop.is_set():
            await fn()
            counts[0] += 1

    cpu, start = time.process_time(), time.perf_counter()
    running = [asyncio.create_task(worker()) for _ in range(tasks)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*running)
    return counts[0], time.perf_counter() - start, time.process_time() - cpu


# ----------------------------------------------------------------------------------- stack capacity


@dataclasses.dataclass
class StackThroughput:
    kv_threads: float
    kv_procs: float
    chat_threads: float
    chat_procs: float
    procs: int
    threads_per_proc: int


def _multi_process(environ: dict[str, str], mode: str, seconds: float, procs: int, threads: int) -> float:
    start_at = time.time() + 4.0  # every worker imports its SDKs first, then all start together
    env = {**os.environ, **environ}
    workers = [
        subprocess.Popen(  # noqa: S603 - our interpreter, our module
            [sys.executable, "-m", "bench._worker", mode, str(seconds), str(threads), str(start_at)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )
        for _ in range(procs)
    ]
    results = []
    for w in workers:
        out, _ = w.communicate(timeout=seconds + 120)
        if w.returncode != 0:
            raise RuntimeError(f"benchmark worker failed ({mode})")
        results.append(json.loads(out))
    return float(sum(r["calls"] for r in results) / max(r["wall"] for r in results))


def stack_throughput(environ: dict[str, str], seconds: float, procs: int = 4) -> StackThroughput:
    target = remote_target(environ)
    client, credential = secret_client(target)
    client.get_secret(target.secret_name)
    n, wall, _ = run_threads(lambda: client.get_secret(target.secret_name), seconds)
    kv_threads = n / wall
    source = key_source(STATIC, target)
    chat = chat_client(STATIC, target, source)
    chat_once(chat, target)
    n, wall, _ = run_threads(lambda: chat_once(chat, target), seconds)
    chat_threads = n / wall
    chat.close()
    source.close()
    client.close()
    credential.close()
    per = CONCURRENCY // procs
    return StackThroughput(
        kv_threads,
        _multi_process(environ, "kv", seconds, procs, per),
        chat_threads,
        _multi_process(environ, "chat", seconds, procs, per),
        procs,
        per,
    )


# ---------------------------------------------------------------------------- contender throughput


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


@dataclasses.dataclass
class Throughput:
    """Per contender, one entry per interleaved pair (the static contender has one per pair it was in)."""

    rates: dict[str, list[float]]  # contender key -> requests/s per run
    ratios: dict[str, list[float]]  # contender key -> rate / static's rate in the same pair
    cpu_us: dict[str, list[float]]  # contender key -> client CPU µs per request per run
    cpu_ratios: dict[str, list[float]]  # contender key -> CPU µs/request / static's in the same pair

    def median_rate(self, key: str) -> float:
        return statistics.median(self.rates[key])

    def median_ratio(self, key: str) -> float:
        return statistics.median(self.ratios[key])

    def ratio_iqr(self, key: str) -> tuple[float, float]:
        return _quartiles(self.ratios[key])

    def median_cpu(self, key: str) -> float:
        return statistics.median(self.cpu_us[key])

    def cpu_iqr(self, key: str) -> tuple[float, float]:
        return _quartiles(self.cpu_us[key])

    def median_cpu_ratio(self, key: str) -> float:
        return statistics.median(self.cpu_ratios[key])

    def cpu_ratio_iqr(self, key: str) -> tuple[float, float]:
        return _quartiles(self.cpu_ratios[key])


def _pairs(
    names: list[str], run: Callable[[str], tuple[int, float, float]], rounds: int, baseline: str
) -> Throughput:
    """Interleaved pairs: every round runs (baseline, X) back to back for each other contender X, the
    order of the pairs rotating each round and the order within a pair alternating (A B, then B A), so
    drift in the machine's load hits both halves of a pair alike. Each pair gives one ratio."""
    others = [n for n in names if n != baseline]
    rates: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    cpu_ratios: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(others) if others else 0
        for name in others[shift:] + others[:shift]:
            pair = (baseline, name) if r % 2 == 0 else (name, baseline)
            rate: dict[str, float] = {}
            per_request: dict[str, float] = {}
            for key in pair:
                n, wall, cpu_s = run(key)
                rate[key] = n / wall
                per_request[key] = cpu_s / max(n, 1) * 1e6
                rates[key].append(rate[key])
                cpu[key].append(per_request[key])
            ratios[name].append(rate[name] / rate[baseline])
            cpu_ratios[name].append(per_request[name] / per_request[baseline])
            ratios[baseline].append(1.0)
            cpu_ratios[baseline].append(1.0)
    return Throughput(rates, ratios, cpu, cpu_ratios)


def contender_throughput(
    environ: dict[str, str], contenders: list[Contender], *, rounds: int, seconds: float
) -> Throughput:
    """Sync clients, 32 threads sharing each contender's one client, ``rounds`` rounds of pairs."""
    target = remote_target(environ)
    built = {}
    for c in contenders:
        source = key_source(c, target)
        client = chat_client(c, target, source)
        for _ in range(5):
            chat_once(client, target)
        built[c.key] = (source, client)
    try:
        return _pairs(
            [c.key for c in contenders],
            lambda key: run_threads(lambda: chat_once(built[key][1], target), seconds),
            rounds,
            STATIC.key,
        )
    finally:
        for source, client in built.values():
            client.close()
            source.close()


def async_contender_throughput(
    environ: dict[str, str], *, rounds: int, seconds: float, contenders: tuple[Contender, ...] | None = None
) -> Throughput:
    """Async clients (static, per-request, apimvault), 32 tasks on one loop, interleaved pairs."""
    target = remote_target(environ)
    contenders = contenders or (STATIC, PER_REQUEST, APIMVAULT)
    with asyncio.Runner() as runner:
        built = {}
        for c in contenders:
            source = runner.run(async_key_source(c, target))
            client = runner.run(async_chat_client(c, target, source))
            for _ in range(5):
                runner.run(achat_once(client, target))
            built[c.key] = (source, client)
        try:
            return _pairs(
                [c.key for c in contenders],
                lambda key: runner.run(run_tasks(lambda: achat_once(built[key][1], target), seconds)),
                rounds,
                STATIC.key,
            )
        finally:
            for source, client in built.values():
                runner.run(client.close())
                runner.run(source.close())
