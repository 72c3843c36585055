"""Behaviour figures of each contender, one contender at a time, against an in-process local Azure.

Each figure builds a fresh key source (fresh cache) on its own APIM subscription and vault secret, so the
contenders never see each other's state. Vault reads are the stack's own ``GetSecret`` counter. Everything
runs on the real clock; the figures that need TTL expiries and outages (all contenders at once, scaled-down
TTL) are in :mod:`bench.realclock`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import httpx2

from apimvault.local import API_VERSION, DEPLOYMENT, ROLE_USER, LocalAzure
from apimvault.local.stack import APIM_SERVICE, ARM_SUBSCRIPTION, RESOURCE_GROUP

from .contenders import (
    APIM_HEADER,
    APIMVAULT,
    PER_REQUEST,
    Contender,
    Target,
    achat_once,
    async_chat_client,
    async_key_source,
    chat_client,
    chat_once,
    key_source,
)

BLOCKED_S = 0.100  # a call that took longer than this waited on Key Vault (injected latency 300 ms)
WARM_SECRET = "bench-warm"  # noqa: S105 - a secret name


@dataclasses.dataclass
class App:
    """A vault secret holding the primary key of its own APIM subscription."""

    name: str
    sid: str


class Lab:
    """The in-process stack plus helpers: fresh app secrets, rotation, read counts, faults."""

    def __init__(self, azure: LocalAzure) -> None:
        self.azure = azure
        azure.keyvault.put_secret(WARM_SECRET, "warm-up, not a key")
        azure.keyvault.grant(azure.default_identity, ROLE_USER, secret=WARM_SECRET)

    def app(self) -> App:
        suffix = uuid.uuid4().hex[:10]
        sub = self.azure.apim_state.create_subscription(
            ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE, f"bench-{suffix}", display_name=f"bench {suffix}"
        )
        name = f"bench-{suffix}"
        self.azure.keyvault.put_secret(name, sub.primary_key, tags={"CredentialId": "primary"})
        self.azure.keyvault.grant(self.azure.default_identity, ROLE_USER, secret=name)
        return App(name, sub.sid)

    def target(self, app: App | None = None) -> Target:
        app = app or self.app()
        return Target(
            self.azure.vault_url, app.name, self.azure.gateway_url, API_VERSION, DEPLOYMENT, WARM_SECRET
        )

    def rotate(self, app: App) -> None:
        """Microsoft's dual-key rotation: regenerate secondary, store it, then revoke the primary."""
        state = self.azure.apim_state
        state.regenerate(app.sid, "secondary")
        sub = state.get(app.sid)
        assert sub is not None
        self.azure.keyvault.put_secret(app.name, sub.secondary_key, tags={"CredentialId": "secondary"})
        state.regenerate(app.sid, "primary")  # the key clients started with stops working now

    def reads(self) -> int:
        return self.azure.keyvault.counters["GetSecret"]

    def latency(self, seconds: float) -> None:
        self.azure.keyvault.faults.inject("latency", operation="GetSecret", seconds=seconds)

    def outage(self, on: bool) -> None:
        faults = self.azure.keyvault.faults
        if on and not faults.active:
            faults.inject("status", operation="GetSecret", status=503)
        elif not on and faults.active:
            faults.clear()

    def clear(self) -> None:
        self.azure.keyvault.faults.clear()


@dataclasses.dataclass
class Ratio:
    bad: int
    total: int

    def __str__(self) -> str:
        return f"{self.bad} / {self.total}"


def _settle(provider: Any) -> None:
    """Let an apimvault background refresh finish before the source is closed."""
    deadline = time.monotonic() + 5
    while provider is not None and getattr(provider, "_flight", None) is not None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)


async def _asettle(provider: Any) -> None:
    deadline = time.monotonic() + 5
    while provider is not None and getattr(provider, "_task", None) is not None:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------ cold start


def cold_start(lab: Lab, contender: Contender, threads: int = 256, latency: float = 0.05) -> int:
    """Vault reads when ``threads`` threads ask for the key at once on a cold process (incl. start-up)."""
    counts: list[int] = []
    source = key_source(contender, lab.target(), mark=lambda: counts.append(lab.reads()))
    lab.latency(latency)  # a Key Vault-like round trip, so the herd overlaps as it would in Azure
    barrier = threading.Barrier(threads)

    def worker() -> None:
        barrier.wait()
        source.get()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    lab.clear()
    reads = lab.reads() - counts[0]
    source.close()
    return reads


def cold_start_async(lab: Lab, contender: Contender, tasks: int = 1000, latency: float = 0.05) -> int:
    async def run() -> int:
        counts: list[int] = []
        source = await async_key_source(contender, lab.target(), mark=lambda: counts.append(lab.reads()))
        lab.latency(latency)
        await asyncio.gather(*(source.get() for _ in range(tasks)))
        lab.clear()
        reads = lab.reads() - counts[0]
        await source.close()
        return reads

    return asyncio.run(run())


# -------------------------------------------------------------------------------------- rotation


def rotation(
    lab: Lab, contender: Contender, *, threads: int = 8, before: float = 0.4, after: float = 1.0
) -> Ratio:
    """Failed chat completions (real requests through the gateway) while the key is rotated and the old
    one revoked at APIM mid-traffic. Real clock: the cachetools TTL (300 s) does not pass."""
    app = lab.app()
    target = lab.target(app)
    source = key_source(contender, target)
    client = chat_client(contender, target, source)
    chat_once(client, target)
    stop = threading.Event()
    counts = [0, 0]  # ok, failed
    lock = threading.Lock()

    def worker() -> None:
        while not stop.is_set():
            try:
                chat_once(client, target)
                index = 0
            except Exception:
                index = 1
            with lock:
                counts[index] += 1

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    time.sleep(before)
    lab.rotate(app)
    time.sleep(after)
    stop.set()
    for t in pool:
        t.join()
    _settle(source.provider)
    client.close()
    source.close()
    return Ratio(counts[1], counts[0] + counts[1])


def rotation_async(
    lab: Lab, contender: Contender, *, tasks: int = 8, before: float = 0.4, after: float = 1.0
) -> Ratio:
    async def run() -> Ratio:
        app = lab.app()
        target = lab.target(app)
        source = await async_key_source(contender, target)
        client = await async_chat_client(contender, target, source)
        await achat_once(client, target)
        stop = asyncio.Event()
        counts = [0, 0]

        async def worker() -> None:
            while not stop.is_set():
                try:
                    await achat_once(client, target)
                    counts[0] += 1
                except Exception:
                    counts[1] += 1

        running = [asyncio.create_task(worker()) for _ in range(tasks)]
        await asyncio.sleep(before)
        await asyncio.to_thread(lab.rotate, app)
        await asyncio.sleep(after)
        stop.set()
        await asyncio.gather(*running)
        await _asettle(source.provider)
        await client.close()
        await source.close()
        return Ratio(counts[1], counts[0] + counts[1])

    return asyncio.run(run())


# ------------------------------------------------------------------------------------ hit cost


def _median_ns(fn: Callable[[], Any], batches: int, batch: int) -> float:
    samples = []
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter_ns() - start) / batch)
    return statistics.median(samples)


def hit_cost(lab: Lab, contender: Contender, *, batches: int = 50, batch: int = 2000) -> float:
    """Median µs per key lookup on a warm cache (real clock); for ``per-request`` a Key Vault read."""
    source = key_source(contender, lab.target())
    source.get()
    if contender is PER_REQUEST:
        batches, batch = max(3, batches // 10), max(10, batch // 100)
    cost = _median_ns(source.get, batches, batch) / 1000
    source.close()
    return cost


def hit_cost_async(lab: Lab, contender: Contender, *, batches: int = 50, batch: int = 2000) -> float:
    async def run() -> float:
        source = await async_key_source(contender, lab.target())
        await source.get()
        get: Callable[[], Awaitable[str]] = source.get
        nb, nbatch = (
            (max(3, batches // 10), max(10, batch // 100)) if contender is PER_REQUEST else (batches, batch)
        )
        samples = []
        for _ in range(nb):
            start = time.perf_counter_ns()
            for _ in range(nbatch):
                await get()
            samples.append((time.perf_counter_ns() - start) / nbatch)
        await source.close()
        return statistics.median(samples) / 1000

    return asyncio.run(run())


def get_key_cost(lab: Lab, *, batches: int = 50, batch: int = 2000) -> float:
    """apimvault's ``get_key()`` (the SubscriptionKey object, what the auth flow calls), median µs."""
    source = key_source(APIMVAULT, lab.target())
    assert source.provider is not None
    source.provider.get_key()
    cost = _median_ns(source.provider.get_key, batches, batch) / 1000
    source.close()
    return cost


# ------------------------------------------------------------------------------ client overhead

_COMPLETION = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)


def _reply(request: httpx2.Request) -> httpx2.Response:
    if not request.headers.get(APIM_HEADER):
        return httpx2.Response(401, json={"statusCode": 401, "message": "missing subscription key"})
    return httpx2.Response(200, content=_COMPLETION, headers={"content-type": "application/json"})


async def _areply(request: httpx2.Request) -> httpx2.Response:
    return _reply(request)


def client_overhead(lab: Lab, contender: Contender, *, batches: int = 15, batch: int = 200) -> float:
    """Median µs per ``chat.completions.create`` with the network replaced by ``httpx2.MockTransport``
    (one thread): the client-side cost of each way of supplying the key, free of server noise."""
    target = lab.target()
    source = key_source(contender, target)
    client = chat_client(contender, target, source, transport=httpx2.MockTransport(_reply))
    call = functools.partial(chat_once, client, target)
    for _ in range(20):
        call()
    if contender is PER_REQUEST:
        batches, batch = max(3, batches // 3), max(10, batch // 10)
    cost = _median_ns(call, batches, batch) / 1000
    client.close()
    source.close()
    return cost


def client_overhead_async(lab: Lab, contender: Contender, *, batches: int = 15, batch: int = 200) -> float:
    async def run() -> float:
        target = lab.target()
        source = await async_key_source(contender, target)
        client = await async_chat_client(contender, target, source, transport=httpx2.MockTransport(_areply))
        for _ in range(20):
            await achat_once(client, target)
        nb, nbatch = (
            (max(3, batches // 3), max(10, batch // 10)) if contender is PER_REQUEST else (batches, batch)
        )
        samples = []
        for _ in range(nb):
            start = time.perf_counter_ns()
            for _ in range(nbatch):
                await achat_once(client, target)
            samples.append((time.perf_counter_ns() - start) / nbatch)
        await client.close()
        await source.close()
        return statistics.median(samples) / 1000

    return asyncio.run(run())


# --------------------------------------------------------------------------------- import time

_DEPS = (
    "import openai, httpx2, azure.identity, azure.identity.aio, azure.keyvault.secrets,"
    " azure.keyvault.secrets.aio, cachetools"
)
_MARK = "apimvault-bench-mark"
_APIMVAULT = "import apimvault; apimvault.SubscriptionKeyProvider; apimvault.create_azure_openai"
_LINE = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s*(.*)$")


class ImportTimes(NamedTuple):
    own: float  # ms, apimvault's modules (self-time)
    deps: float  # ms, the dependencies every contender needs
    own_modules: tuple[str, ...]  # the modules counted as apimvault's (of the last run)


def _self_times(lines: list[str]) -> list[tuple[str, int]]:
    """``(module, self-time µs)`` of each ``-X importtime`` line."""
    return [(m.group(3).strip(), int(m.group(1))) for m in map(_LINE.match, lines) if m]


def import_time_ms(runs: int = 5) -> ImportTimes:
    """(apimvault's own import cost beyond its dependencies, the dependencies' cost), median ms.

    ``python -X importtime`` in a fresh interpreter: first the dependencies every contender needs, then
    ``import apimvault`` and the first touch of its lazy public names; the self-times of every module
    imported after the mark are apimvault's.
    """
    code = f"{_DEPS}\nimport sys\nsys.stderr.write('{_MARK}\\n')\n{_APIMVAULT}\n"
    own: list[float] = []
    deps: list[float] = []
    modules: tuple[str, ...] = ()
    for _ in range(runs):
        proc = subprocess.run(  # noqa: S603 - our interpreter, our code
            [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
        )
        before, _, after = proc.stderr.partition(_MARK)
        deps.append(sum(t for _, t in _self_times(before.splitlines())) / 1000)
        counted = _self_times(after.splitlines())
        own.append(sum(t for _, t in counted) / 1000)
        modules = tuple(name for name, _ in counted)
    return ImportTimes(statistics.median(own), statistics.median(deps), modules)
