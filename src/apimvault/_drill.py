"""``apimvault drill``: rotate the APIM key under live chat traffic and prove no request fails.

Clients are built by the core (:func:`create_azure_openai` / :func:`create_async_azure_openai`); sync
workers are threads, async workers are asyncio tasks on one loop; every worker alternates plain and
streaming chat completions. openai's own retries are off, so every recovery is apimvault's.

Timeline (``D`` = duration; every client loads the key just before traffic starts)::

    0.10 D  rotation 1   regenerates the secondary key and stores it; the primary key the clients hold
                         stays valid
    0.20 D  rotation 2   regenerates the primary key: the key every client started with is revoked while
                         they still hold it (their TTL is longer), so they recover via APIM's 401 -> one
                         coalesced refresh -> one re-send per refused request (landing on rotation 1's
                         version, which is valid); they reach rotation 2's version at their refresh-ahead
    0.45 D  chaos only   Key Vault GetSecret answers 503 for 0.15 D (refreshes fail; stale-if-error)
    0.70 D  rotation 3   regenerates the secondary key; clients converge via the Event Grid helper
                         (``refresh_from_event`` with a SecretNewVersionCreated event)
    0.85 D  chaos only   latency spikes on the gateway and on Key Vault
    D       traffic stops once every client holds the last version (at most TTL + 5 s more)

Gateway propagation (protocols.md H): on a local stack the drill makes each gateway unit accept a
regenerated key only after a delay (``--propagation S``, default 2 s: unit k of n waits ``S * k / n``;
with ``--chaos`` each unit draws a random delay in ``[S / 4, 1.5 S]`` for every regeneration), and the
clients are spread over the units. Every rotation is make-before-break (it stores the new key only once
every unit accepts it) and reports the measured propagation; after each one the drill checks,
independently, that the vault's latest version holds a live key of its tagged slot that every unit
accepts. With ``--chaos`` rotation 3 is two overlapping deliveries of the same ``SecretNearExpiry`` event
(the second starts while the first waits for the gateways), as Event Grid's at-least-once delivery makes
happen; one rotates, the other finds that out and verifies the vault.

The provider TTL is ``max(4 s, 0.6 D)`` (with propagation, long enough that the earliest refresh-ahead
comes 4 s after the gateway units revoke the key of rotation 2), with a quarter of it as refresh margin,
so refresh-ahead happens during the run but not before rotation 2. Convergence
after a rotation is the time from its Key Vault write until every client's current version is that
version (or a later one); revocation recovery is the time from the start of a rotation until no client
holds the key it regenerated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .exceptions import ApimVaultError, ConfigurationError

if TYPE_CHECKING:  # pragma: no cover
    from .cli import Output

MESSAGES = [{"role": "user", "content": "Rotation drill: say something short."}]
# How a client reached a version (the provider's refresh reasons, named for the report). In the drill only
# the Event Grid push calls ``provider.refresh()``.
_VIA = {
    "401 from gateway": "401 -> refresh",
    "refresh ahead": "refresh-ahead",
    "refresh": "Event Grid push",
    "invalidated": "invalidate",
}


# ------------------------------------------------------------------------------------------- targets


class _Faults:
    """Fault injection and counters of a local stack: in-process, or over its admin API."""

    def __init__(self, azure: Any = None, admin: Any = None) -> None:
        self.azure = azure
        self.admin = admin

    def inject(self, service: str, kind: str, **fields: Any) -> None:
        if self.azure is not None:
            self.azure.services[service].faults.inject(kind, **fields)
        else:
            self.admin.add_fault(service, kind, **fields)

    def clear(self, service: str) -> None:
        if self.azure is not None:
            self.azure.services[service].faults.clear()
        else:
            self.admin.clear_faults(service)

    def propagation(self) -> dict[str, dict[str, float]]:
        if self.azure is not None:
            return dict(self.azure.apim_state.propagation())
        return dict(self.admin.propagation())

    def set_propagation(self, delay: float | tuple[float, float], unit: str | None = None) -> None:
        if self.azure is not None:
            self.azure.apim_state.set_propagation(delay, unit)
        else:
            self.admin.set_propagation(delay, unit=unit)

    def counters(self, service: str) -> tuple[dict[str, int], dict[str, int]]:
        if self.azure is not None:
            svc = self.azure.services[service]
            return svc.counters.snapshot(), svc.counters.labels()
        data = self.admin.counters(service)
        return dict(data.get("operations", {})), dict(data.get("labels", {}))

    def close(self) -> None:
        if self.admin is not None:
            self.admin.close()


@dataclasses.dataclass
class Target:
    vault_url: str
    secret_name: str
    gateway_url: str
    deployment: str
    apim_subscription_id: str | None
    arm_endpoint: str | None
    rotator_client_id: str | None
    label: str
    loopback: bool
    faults: _Faults | None
    gateway_urls: tuple[str, ...] = ()
    """Every gateway unit's URL (probed by the rotation; clients are spread over them)."""

    @property
    def client_urls(self) -> tuple[str, ...]:
        return self.gateway_urls or (self.gateway_url,)


# ------------------------------------------------------------------------------------------- metrics


class Metrics:
    """Thread-safe request outcomes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latencies: list[float] = []
        self.requests = 0
        self.failed = 0
        self.streaming = 0
        self.errors: Counter[str] = Counter()
        self._window: list[float] = []

    def ok(self, seconds: float, streaming: bool) -> None:
        now = time.monotonic()
        with self._lock:
            self.requests += 1
            self.streaming += streaming
            self.latencies.append(seconds)
            self._window.append(now)

    def fail(self, seconds: float, streaming: bool, exc: BaseException) -> None:
        now = time.monotonic()
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        with self._lock:
            self.requests += 1
            self.failed += 1
            self.streaming += streaming
            self.latencies.append(seconds)
            self.errors[message] += 1
            self._window.append(now)

    def rate(self, window: float = 2.0) -> float:
        now = time.monotonic()
        with self._lock:
            self._window = [t for t in self._window if t > now - window]
            return len(self._window) / window

    def percentiles(self) -> dict[str, float]:
        with self._lock:
            data = sorted(self.latencies)
        if not data:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}

        def q(p: float) -> float:
            return data[min(len(data) - 1, max(0, math.ceil(p * len(data)) - 1))] * 1000

        return {"p50": round(q(0.50), 1), "p99": round(q(0.99), 1), "max": round(data[-1] * 1000, 1)}


@dataclasses.dataclass
class ClientSlot:
    """One provider + client pair that several workers share."""

    name: str
    kind: str  # "sync" | "async"
    provider: Any
    client: Any = None
    via: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (version, reason) loads


@dataclasses.dataclass
class RotationRecord:
    index: int
    at_s: float
    old_version: str | None
    new_version: str
    credential_id: str
    regenerated: str | None
    fingerprint: str | None
    push: bool
    started_s: float = 0.0
    clients_on_revoked_key: int = 0
    convergence_s: float | None = None
    converged_via: dict[str, int] = dataclasses.field(default_factory=dict)
    revocation_recovery_s: float | None = None
    propagation_s: float | None = None
    vault_latest_live: bool | None = None
    vault_check: dict[str, Any] | None = None
    deliveries: list[str] = dataclasses.field(default_factory=list)
    overlapped: bool = False


# --------------------------------------------------------------------------------------------- drill


class Drill:
    def __init__(self, target: Target, args: argparse.Namespace, out: Output) -> None:
        from . import CachePolicy

        self.target = target
        self.out = out
        self.duration = max(2.0, float(args.duration))
        self.concurrency = max(2, int(args.concurrency))
        self.n_clients = max(2, min(int(args.clients), self.concurrency))
        self.chaos = bool(args.chaos)
        spread = getattr(args, "propagation", None)
        self.propagation = 2.0 if spread is None else max(0.0, float(spread))
        if target.faults is None:  # no local stack to configure: the real gateways propagate as they do
            self.propagation = 0.0
        longest = self.propagation * (1.5 if self.chaos else 1.0)
        ttl = max(4.0, self.duration * 0.6)
        if longest > 0:
            # Rotation 2 must revoke the key the clients still hold: the gateway units stop accepting it
            # only `longest` after it is regenerated, and rotation 1 itself waits up to ~1.5 x longest for
            # them. The earliest refresh-ahead is at 0.55 x TTL (TTL jittered down 20 %, margin a quarter).
            revoked_by = max(0.2 * self.duration, 0.1 * self.duration + 1.5 * longest + 2.5) + longest
            ttl = max(ttl, (revoked_by + 4.0) / 0.55)
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
        self.start_credential_id = ""
        self._propagation_before: dict[str, dict[str, float]] | None = None
        self.propagation_settings: dict[str, Any] | None = None

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

    # ---------------------------------------------------------------------------- setup

    def setup(self) -> None:
        from azure.identity import DefaultAzureCredential

        from . import SubscriptionKeyProvider, create_azure_openai
        from .cli import header_name
        from .rotation import plan_rotation

        with contextlib.suppress(ImportError):  # a heavy import: not during the first rotation
            import azure.mgmt.apimanagement  # noqa: F401

        self._rotation_credential = (
            DefaultAzureCredential(managed_identity_client_id=self.target.rotator_client_id)
            if self.target.rotator_client_id
            else DefaultAzureCredential()
        )
        plan = plan_rotation(  # fail fast: tags, subscription, rotator access, gateway URLs
            vault_url=self.target.vault_url,
            secret_name=self.target.secret_name,
            apim_subscription_id=self.target.apim_subscription_id,
            arm_endpoint=self.target.arm_endpoint,
            credential=self._rotation_credential,
            gateway_urls=self.target.gateway_urls or None,
        )
        self._configure_propagation()
        self.versions.append(plan.current_version)
        self.start_credential_id = plan.credential_id
        self._sync_credential = DefaultAzureCredential()
        n_sync = math.ceil(self.n_clients / 2)
        for i in range(n_sync):
            slot = ClientSlot(f"sync-{i + 1}", "sync", None)
            provider = SubscriptionKeyProvider(
                self.target.vault_url,
                self.target.secret_name,
                credential=self._sync_credential,
                policy=self.policy,
                header_name=header_name(),
                on_refresh=self._on_refresh(slot),
            )
            slot.provider = provider
            slot.client = create_azure_openai(
                provider, azure_endpoint=self._client_url(2 * i), max_retries=0, timeout=30
            )
            self.slots.append(slot)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._run_loop, name="apimvault-drill-async", daemon=True)
        self._loop_thread.start()
        if not self._async_ready.wait(60):
            raise RuntimeError("the async clients did not start")
        if self._async_error is not None:
            raise self._async_error
        for slot in self.slots:
            if slot.kind == "sync":
                slot.provider.get_key()

    def _client_url(self, n: int) -> str:
        urls = self.target.client_urls
        return urls[n % len(urls)]

    def _configure_propagation(self) -> None:
        faults = self.target.faults
        if faults is None:
            return
        try:
            self._propagation_before = faults.propagation()
        except Exception as exc:  # a stack without the propagation model
            raise ConfigurationError(f"the local stack cannot set gateway propagation: {exc}") from None
        units = list(self._propagation_before)
        settings: dict[str, Any] = {}
        for k, unit in enumerate(units, start=1):
            delay: float | tuple[float, float]
            if self.chaos and self.propagation > 0:
                delay = (round(self.propagation / 4, 3), round(self.propagation * 1.5, 3))
            else:
                delay = round(self.propagation * k / len(units), 3)
            faults.set_propagation(delay, unit)
            settings[unit] = list(delay) if isinstance(delay, tuple) else delay
        self.propagation_settings = settings
        self.log(
            f"gateway propagation per unit: {settings} s"
            + (" (random per regeneration)" if self.chaos else "")
        )

    def _restore_propagation(self) -> None:
        faults, before = self.target.faults, self._propagation_before
        if faults is None or before is None:
            return
        for unit, spec in before.items():
            with contextlib.suppress(Exception):
                low, high = float(spec["min"]), float(spec["max"])
                faults.set_propagation(low if low == high else (low, high), unit)

    def _check_loaded(self) -> None:
        for slot in self.slots:
            key = slot.provider.current()
            if key is None or key.version != self.versions[0]:
                raise ApimVaultError(
                    f"{slot.name} loaded version {key.version if key else None}, expected {self.versions[0]}"
                )

    def _run_loop(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._async_main())
        except BaseException as exc:
            self._async_error = exc
            self._async_ready.set()
        finally:
            self._async_done.set()
            self._loop.close()

    async def _async_main(self) -> None:
        from azure.identity.aio import DefaultAzureCredential

        from . import AsyncSubscriptionKeyProvider, create_async_azure_openai
        from .cli import header_name

        credential = DefaultAzureCredential()
        n_async = self.n_clients - math.ceil(self.n_clients / 2)
        mine: list[ClientSlot] = []
        try:
            for i in range(n_async):
                slot = ClientSlot(f"async-{i + 1}", "async", None)
                provider = AsyncSubscriptionKeyProvider(
                    self.target.vault_url,
                    self.target.secret_name,
                    credential=credential,
                    policy=self.policy,
                    header_name=header_name(),
                    on_refresh=self._on_refresh(slot),
                )
                slot.provider = provider
                slot.client = create_async_azure_openai(
                    provider, azure_endpoint=self._client_url(2 * i + 1), max_retries=0, timeout=30
                )
                mine.append(slot)
            with self._lock:
                self.slots.extend(mine)
            self._async_ready.set()
            await asyncio.get_running_loop().run_in_executor(None, self._started.wait)
            try:
                for slot in mine:
                    await slot.provider.get_key()
            except BaseException as exc:
                self._async_error = exc
                raise
            finally:
                self._async_loaded.set()
            await asyncio.get_running_loop().run_in_executor(None, self._traffic.wait)
            n_tasks = self.concurrency // 2
            tasks = [asyncio.create_task(self._async_worker(mine[i % len(mine)], i)) for i in range(n_tasks)]
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for slot in mine:
                with contextlib.suppress(Exception):
                    await slot.client.close()
                with contextlib.suppress(Exception):
                    await slot.provider.close()
            await credential.close()

    async def _async_worker(self, slot: ClientSlot, n: int) -> None:
        streaming = n % 2 == 1
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                if streaming:
                    stream = await slot.client.chat.completions.create(
                        model=self.target.deployment, messages=MESSAGES, max_tokens=16, stream=True
                    )
                    async with stream:
                        async for _chunk in stream:
                            pass
                else:
                    await slot.client.chat.completions.create(
                        model=self.target.deployment, messages=MESSAGES, max_tokens=16
                    )
            except Exception as exc:
                self.metrics.fail(time.monotonic() - started, streaming, exc)
            else:
                self.metrics.ok(time.monotonic() - started, streaming)
            streaming = not streaming

    def _sync_worker(self, slot: ClientSlot, n: int) -> None:
        streaming = n % 2 == 1
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                if streaming:
                    with slot.client.chat.completions.create(
                        model=self.target.deployment, messages=MESSAGES, max_tokens=16, stream=True
                    ) as stream:
                        for _chunk in stream:
                            pass
                else:
                    slot.client.chat.completions.create(
                        model=self.target.deployment, messages=MESSAGES, max_tokens=16
                    )
            except Exception as exc:
                self.metrics.fail(time.monotonic() - started, streaming, exc)
            else:
                self.metrics.ok(time.monotonic() - started, streaming)
            streaming = not streaming

    # ---------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        self.live = self.out.stdout.isatty() and not self.out.json
        counters_before = self._counters()
        try:
            self.setup()
            self._started.set()
            if not self._async_loaded.wait(60):
                raise RuntimeError("the async clients did not load the key")
            if self._async_error is not None:
                raise self._async_error
            self._check_loaded()
            self._t0 = time.monotonic()
            self._traffic.set()
            sync_slots = [s for s in self.slots if s.kind == "sync"]
            workers = [
                threading.Thread(
                    target=self._sync_worker,
                    args=(sync_slots[i % len(sync_slots)], i),
                    daemon=True,
                    name=f"drill-{i}",
                )
                for i in range(math.ceil(self.concurrency / 2))
            ]
            for worker in workers:
                worker.start()
            self.log(
                f"traffic started: {len(workers)} threads + {self.concurrency // 2} asyncio tasks over "
                f"{len(self.slots)} clients on version {self.versions[0][:8]} ({self.start_credential_id})"
            )
            monitor = threading.Thread(target=self._monitor, daemon=True, name="drill-monitor")
            monitor.start()
            with self._display():
                self._schedule()
                self.stop.set()
            for worker in workers:
                worker.join(60)
            self._async_done.wait(60)
            monitor.join(5)
            elapsed = self.elapsed()
        finally:
            self.stop.set()
            self._traffic.set()
            self._started.set()
            self._cleanup()
        return self._report(elapsed, counters_before, self._counters())

    def _cleanup(self) -> None:
        self._restore_propagation()
        if self.target.faults is not None:
            for service in ("keyvault", "gateway"):
                with contextlib.suppress(Exception):
                    self.target.faults.clear(service)
        for slot in self.slots:
            if slot.kind == "sync":
                with contextlib.suppress(Exception):
                    slot.client.close()
                with contextlib.suppress(Exception):
                    slot.provider.close()
        for credential in (self._sync_credential, self._rotation_credential):
            if credential is not None:
                with contextlib.suppress(Exception):
                    credential.close()

    def _wait_until(self, at: float) -> None:
        while not self.stop.is_set():
            remaining = at - self.elapsed()
            if remaining <= 0:
                return
            self.stop.wait(min(remaining, 0.1))

    def _schedule(self) -> None:
        d = self.duration
        # Rotations stay at least two forced-refresh intervals apart, however short the drill: a client
        # may force one refresh per interval, and two revocations inside one interval would be a drill of
        # the rate limit, not of the rotation.
        gap = 2 * float(self.policy.forced_refresh_interval)  # type: ignore[arg-type]
        self._wait_until(0.10 * d)
        self._rotate(push=False)
        self._wait_until(max(0.20 * d, self.elapsed() + gap))
        self._rotate(push=False)
        if self.chaos and self.target.faults is not None:
            # Only once nobody holds the revoked key: an outage then costs no request (stale-if-error).
            self._wait_converged(0, 0.45 * d + 5)
            self._wait_until(0.45 * d)
            self._inject("keyvault", "status", operation="GetSecret", status=503)
            outage = max(0.15 * d, 1.0)  # rotations that wait for the gateway may have used up 0.45-0.60 D
            self.chaos_log.append(f"{self.elapsed():.1f}s Key Vault GetSecret -> 503 for {outage:.1f}s")
            self.log("chaos: Key Vault outage begins (GetSecret answers 503)")
            self._wait_until(max(0.60 * d, self.elapsed() + outage))
            self.target.faults.clear("keyvault")
            self.log("chaos: Key Vault outage ends")
        self._wait_until(max(0.70 * d, self.elapsed() + gap))
        self._rotate(push=True, duplicate=self.chaos)
        if self.chaos and self.target.faults is not None:
            self._wait_until(0.85 * d)
            spikes = max(8, self.concurrency * 3)
            self._inject("gateway", "latency", operation="ChatCompletions", seconds=0.25, times=spikes)
            self._inject("keyvault", "latency", operation="GetSecret", seconds=0.5, times=2)
            self.chaos_log.append(
                f"{self.elapsed():.1f}s gateway +250 ms on {spikes} chats; Key Vault +500 ms on 2 reads"
            )
            self.log("chaos: latency spikes on the gateway and Key Vault")
        self._wait_until(d)
        last = len(self.rotations) - 1
        if self.rotations and self.rotations[last].convergence_s is None:
            self.log("waiting for every client to reach the last version")
            self._wait_converged(last, d + self.policy.ttl_s + 5)

    def _inject(self, service: str, kind: str, **fields: Any) -> None:
        assert self.target.faults is not None
        self.target.faults.inject(service, kind, **fields)

    def _wait_converged(self, index: int, deadline: float) -> None:
        while self.elapsed() < deadline:
            if index < 0 or self.rotations[index].convergence_s is not None:
                return
            time.sleep(0.02)

    def _rotation_kwargs(self) -> dict[str, Any]:
        return {
            "apim_subscription_id": self.target.apim_subscription_id,
            "arm_endpoint": self.target.arm_endpoint,
            "credential": self._rotation_credential,
            "gateway_urls": self.target.gateway_urls or None,
            # A local stack's delays are known; real gateways get the library's default (or the env's).
            "propagation_timeout": max(60.0, 20 * self.propagation)
            if self.target.faults is not None
            else None,
        }

    def _rotate(self, *, push: bool, duplicate: bool = False) -> None:
        from .rotation import rotate

        started = self.elapsed()
        index = len(self.rotations) + 1
        with self._lock:  # who holds the key this rotation is about to regenerate (version index - 2)
            held = sum(1 for rank in self._ranks() if 0 <= rank <= index - 2)
        deliveries: list[str] = []
        if duplicate:
            result, deliveries = self._deliver_twice()
        else:
            result = rotate(
                vault_url=self.target.vault_url,
                secret_name=self.target.secret_name,
                **self._rotation_kwargs(),
            )
        assert result.new_version is not None
        at = self.elapsed()
        check = self._check_vault()
        with self._lock:
            self.versions.append(result.new_version)
            record = RotationRecord(
                index=index,
                at_s=round(at, 3),
                old_version=result.old_version,
                new_version=result.new_version,
                credential_id=result.credential_id,
                regenerated=result.regenerated,
                fingerprint=result.fingerprint,
                push=push,
                started_s=round(started, 3),
                propagation_s=result.propagation_seconds,
                vault_latest_live=check.get("ok") if check else None,
                vault_check=check,
                deliveries=deliveries,
                overlapped=duplicate,
            )
            record.clients_on_revoked_key = held
            if held == 0 and index > 1:
                record.revocation_recovery_s = 0.0
            self.rotations.append(record)
        revoked = (
            f"; {record.clients_on_revoked_key} clients held the {result.regenerated} key it revoked"
            if record.index > 1
            else f"; the {self.start_credential_id} key the clients use stays valid"
        )
        self.log(
            f"rotation {record.index}: regenerated {result.regenerated}, gateway accepted it after "
            f"{result.propagation_seconds or 0:.1f}s, then stored version {result.new_version[:8]} "
            f"(fp {result.fingerprint}){revoked}"
        )
        for line in deliveries:
            self.log(f"rotation {record.index}: {line}")
        live = "live" if record.vault_latest_live else "NOT LIVE"
        self.log(
            f"rotation {record.index}: vault latest version {(check or {}).get('version', '?')[:8]} is {live}"
        )
        if push:
            self._push(result.new_version)

    def _deliver_twice(self) -> tuple[Any, list[str]]:
        """Two overlapping deliveries of the SecretNearExpiry event for the current version: the second
        starts while the first waits for the gateways to accept its new key."""
        from .rotation import rotate_from_event

        version = self.versions[-1]
        event = {
            "id": f"drill-near-expiry-{version}",
            "subject": self.target.secret_name,
            "eventType": "Microsoft.KeyVault.SecretNearExpiry",
            "data": {
                "Id": f"{self.target.vault_url}/secrets/{self.target.secret_name}/{version}",
                "VaultName": (self.target.vault_url.split("//", 1)[-1].split(".", 1)[0]),
                "ObjectType": "Secret",
                "ObjectName": self.target.secret_name,
                "Version": version,
            },
        }
        outcomes: list[Any] = [None, None]
        second = threading.Thread(target=lambda: deliver(1, None), name="drill-redelivery", daemon=True)
        started = threading.Event()

        def first_hook(step: str) -> None:
            if step == "probe" and not started.is_set():
                started.set()
                second.start()

        def deliver(i: int, hook: Callable[[str], None] | None) -> None:
            try:
                outcomes[i] = rotate_from_event(event, on_step=hook, **self._rotation_kwargs())
            except Exception as exc:
                outcomes[i] = exc

        deliver(0, first_hook)
        if started.is_set():
            second.join(120)
        else:  # the first run never waited for the gateway: deliver again now, to be sure of a duplicate
            second.start()
            second.join(120)
        lines = []
        for i, outcome in enumerate(outcomes):
            name = "delivery" if i == 0 else "duplicate delivery"
            if isinstance(outcome, BaseException) or outcome is None:
                lines.append(f"{name}: FAILED {type(outcome).__name__}: {outcome}")
            elif outcome.skipped:
                lines.append(
                    f"{name}: skipped ({outcome.reason}); vault verified at {outcome.verified_version}"
                )
            else:
                lines.append(f"{name}: rotated to {outcome.new_version} ({outcome.credential_id})")
        rotated = [
            o for o in outcomes if not isinstance(o, BaseException) and o is not None and not o.skipped
        ]
        failed = [o for o in outcomes if isinstance(o, BaseException) or o is None]
        if failed or len(rotated) != 1:
            raise ApimVaultError(
                "overlapping deliveries did not end in exactly one rotation: " + "; ".join(lines)
            )
        return rotated[0], lines

    def _check_vault(self) -> dict[str, Any] | None:
        from .rotation import check_latest

        try:
            check = check_latest(
                vault_url=self.target.vault_url,
                secret_name=self.target.secret_name,
                apim_subscription_id=self.target.apim_subscription_id,
                arm_endpoint=self.target.arm_endpoint,
                credential=self._rotation_credential,
                gateway_urls=self.target.gateway_urls or None,
            )
        except ApimVaultError as exc:
            self.log(f"vault check failed: {type(exc).__name__}: {exc}")
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return check.as_dict()

    def _push(self, version: str) -> None:
        """Event Grid delivery of SecretNewVersionCreated, handled by the core's helpers."""
        from ._events import arefresh_from_event, refresh_from_event

        event = {
            "id": f"drill-{version}",
            "subject": self.target.secret_name,
            "eventType": "Microsoft.KeyVault.SecretNewVersionCreated",
            "data": {
                "Id": f"{self.target.vault_url}/secrets/{self.target.secret_name}/{version}",
                "VaultName": (self.target.vault_url.split("//", 1)[-1].split(".", 1)[0]),
                "ObjectType": "Secret",
                "ObjectName": self.target.secret_name,
                "Version": version,
            },
        }
        sync = [s.provider for s in self.slots if s.kind == "sync"]
        refreshed = len(refresh_from_event(event, sync))
        asyncs = [s.provider for s in self.slots if s.kind == "async"]
        if asyncs and self._loop is not None:
            future = asyncio.run_coroutine_threadsafe(arefresh_from_event(event, asyncs), self._loop)
            refreshed += len(future.result(30))
        self.log(f"Event Grid push (SecretNewVersionCreated) refreshed {refreshed} clients")

    def _monitor(self) -> None:
        while not self.stop.is_set():
            with self._lock:
                pending = [r for r in self.rotations if r.convergence_s is None]
                recovering = [r for r in self.rotations if r.revocation_recovery_s is None and r.index > 1]
                slots = list(self.slots)
                ranks = self._ranks()
            low = min(ranks) if ranks else -1
            for record in recovering:
                if low > record.index - 2:
                    record.revocation_recovery_s = round(max(0.0, self.elapsed() - record.started_s), 3)
                    self.log(
                        f"no client holds the key revoked by rotation {record.index} any more "
                        f"({record.revocation_recovery_s:.2f}s after it began)"
                    )
            if pending:
                for record in pending:
                    if low >= record.index:
                        record.convergence_s = round(max(0.0, self.elapsed() - record.at_s), 3)
                        record.converged_via = self._via(record, slots)
                        self.log(
                            f"all {len(slots)} clients on version >= rotation {record.index} after "
                            f"{record.convergence_s:.2f}s ({_counts(record.converged_via)})"
                        )
            time.sleep(0.01)

    def _via(self, record: RotationRecord, slots: list[ClientSlot]) -> dict[str, int]:
        counts: Counter[str] = Counter()
        with self._lock:
            for slot in slots:
                reason = next(
                    (r for v, r in slot.via if self.rank(v) >= record.index),
                    "unknown",
                )
                counts[reason] += 1
        return dict(counts)

    # ---------------------------------------------------------------------------- display

    @contextlib.contextmanager
    def _display(self) -> Iterator[None]:
        if not self.live:
            yield
            return
        from rich.live import Live

        with Live(self._table(), refresh_per_second=4, console=None, transient=False) as live:
            ticker = threading.Thread(target=self._tick, args=(live,), daemon=True)
            ticker.start()
            try:
                yield
            finally:
                self._ticking = False
                ticker.join(2)
                live.update(self._table())

    def _tick(self, live: Any) -> None:
        self._ticking = True
        while self._ticking:
            live.update(self._table())
            time.sleep(0.25)

    def _table(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        head = Text(
            f"apimvault drill  t={self.elapsed():5.1f}s/{self.duration:.0f}s  "
            f"requests {self.metrics.requests}  "
            f"{self.metrics.rate():6.0f} req/s  failed {self.metrics.failed}  "
            f"401 recovered {sum(s.provider.stats().resends_401 for s in self.slots)}  "
            f"rotations {len(self.rotations)}",
            style="bold red" if self.metrics.failed else "bold",
        )
        table = Table(box=None, pad_edge=False)
        for column in ("client", "kind", "version", "CredentialId", "state", "vault reads", "401 re-sends"):
            table.add_column(column)
        for slot in list(self.slots):
            stats = slot.provider.stats()
            table.add_row(
                slot.name,
                slot.kind,
                (stats.version or "-")[:8],
                stats.credential_id or "-",
                stats.state,
                str(stats.vault_reads),
                str(stats.resends_401),
            )
        lines = Text("\n".join(self.timeline[-6:]), style="dim")
        return Group(head, table, lines)

    # ---------------------------------------------------------------------------- report

    def _counters(self) -> dict[str, Any] | None:
        if self.target.faults is None:
            return None
        try:
            kv_ops, _ = self.target.faults.counters("keyvault")
            _, gw_labels = self.target.faults.counters("gateway")
        except Exception:
            return None
        return {"GetSecret": kv_ops.get("GetSecret", 0), "labels": gw_labels}

    def _report(
        self, elapsed: float, before: dict[str, Any] | None, after: dict[str, Any] | None
    ) -> dict[str, Any]:
        stats = [(s, s.provider.stats()) for s in self.slots]
        recovered = sum(st.resends_401 for _, st in stats)
        vault_reads = sum(st.vault_reads for _, st in stats)
        convergence = [r.convergence_s for r in self.rotations]
        converged = all(c is not None for c in convergence)
        failed = self.metrics.failed
        vault_live = all(r.vault_latest_live for r in self.rotations)
        ok = (
            failed == 0
            and converged
            and vault_live
            and len(self.rotations) >= 2
            and self.metrics.requests > 0
        )
        gateway = None
        server_reads = None
        propagation_refused = None
        if before is not None and after is not None:

            def delta(name: str) -> int:
                return int(after["labels"].get(name, 0)) - int(before["labels"].get(name, 0))

            labels = {k.split(":", 1)[1]: delta(k) for k in after["labels"] if k.startswith("key:")}
            # Refusals of a key a gateway unit had not synced yet: the rotation's own probes (clients only
            # ever get a key from the vault once every unit accepts it). Not a client's 401.
            propagation_refused = delta("propagation-refused")
            if labels.get("invalid"):
                labels["invalid"] -= propagation_refused
            gateway = {k: v for k, v in labels.items() if v}
            server_reads = after["GetSecret"] - before["GetSecret"]
        if ok:
            verdict = (
                f"PASS: {self.metrics.requests} requests, 0 failed across {len(self.rotations)} rotations "
                f"({recovered} refused requests re-sent after a refresh); every client converged"
            )
        else:
            why = []
            if failed:
                why.append(f"{failed} of {self.metrics.requests} requests failed")
            if not converged:
                why.append("not every client reached the last version")
            if len(self.rotations) < 2:
                why.append("fewer than 2 rotations")
            if not vault_live:
                why.append("the vault's latest version was not live after every rotation")
            verdict = "FAIL: " + "; ".join(why or ["no traffic"])
        return {
            "ok": ok,
            "verdict": verdict,
            "target": self.target.label,
            "requests": self.metrics.requests,
            "failed": failed,
            "recovered_401": recovered,
            "vault_reads": vault_reads,
            "rotations": len(self.rotations),
            "convergence_s": convergence,
            "latency_ms": self.metrics.percentiles(),
            "duration_s": self.duration,
            "elapsed_s": round(elapsed, 2),
            "requests_per_s": round(self.metrics.requests / elapsed, 1) if elapsed else 0.0,
            "streaming_requests": self.metrics.streaming,
            "concurrency": {
                "threads": math.ceil(self.concurrency / 2),
                "asyncio_tasks": self.concurrency // 2,
            },
            "clients": len(self.slots),
            "policy": {
                "ttl_s": self.policy.ttl_s,
                "jitter": self.policy.jitter,
                "refresh_margin_s": self.policy.margin_s,
                "max_staleness_s": self.policy.staleness_s,
                "forced_refresh_interval_s": float(self.policy.forced_refresh_interval),  # type: ignore[arg-type]
            },
            "rotation_log": [dataclasses.asdict(r) for r in self.rotations],
            "propagation": {
                "units_s": self.propagation_settings,
                "random": self.chaos and bool(self.propagation_settings),
                "measured_s": [r.propagation_s for r in self.rotations],
                "refused_probes": propagation_refused,
            },
            "vault_latest_live": [r.vault_latest_live for r in self.rotations],
            "overlapped_deliveries": sum(1 for r in self.rotations if r.overlapped),
            "chaos": self.chaos_log if self.chaos else None,
            "errors": dict(self.metrics.errors.most_common(10)),
            "clients_detail": [
                {
                    "client": slot.name,
                    "kind": slot.kind,
                    "version": st.version,
                    "fingerprint": st.fingerprint,
                    "credential_id": st.credential_id,
                    "vault_reads": st.vault_reads,
                    "refreshes": st.refreshes,
                    "rotations": st.rotations,
                    "failures": st.failures,
                    "forced_refreshes": st.forced_refreshes,
                    "resends_401": st.resends_401,
                }
                for slot, st in stats
            ],
            "gateway_key_use": gateway,
            "vault_get_secret_server": server_reads,
            "timeline": list(self.timeline),
        }


# ----------------------------------------------------------------------------------------- the command


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items())


def _print_report(out: Output, report: dict[str, Any]) -> None:
    lat = report["latency_ms"]
    out.line("")
    out.line(f"target            {report['target']}")
    out.line(
        f"policy            ttl {report['policy']['ttl_s']:.0f}s (jitter {report['policy']['jitter']:.0%}), "
        f"refresh margin {report['policy']['refresh_margin_s']:.1f}s, max staleness "
        f"{report['policy']['max_staleness_s']:.0f}s"
    )
    out.line(
        f"traffic           {report['concurrency']['threads']} threads + "
        f"{report['concurrency']['asyncio_tasks']} "
        f"asyncio tasks over {report['clients']} clients, {report['elapsed_s']:.1f}s"
    )
    out.line(
        f"requests          {report['requests']} ({report['streaming_requests']} streaming), "
        f"{report['requests_per_s']:.0f}/s"
    )
    out.line(f"failed            {report['failed']}")
    out.line(f"recovered_401     {report['recovered_401']} (re-sent once after a coalesced refresh)")
    server = report["vault_get_secret_server"]
    out.line(
        f"vault_reads       {report['vault_reads']}"
        + (
            f" (Key Vault saw {server} GetSecret, SDK retries and the rotations' reads included)"
            if server is not None
            else ""
        )
    )
    for r in report["rotation_log"]:
        conv = f"{r['convergence_s']:.2f}s" if r["convergence_s"] is not None else "NOT CONVERGED"
        via = _counts(r["converged_via"])
        out.line(
            f"rotation {r['index']}        t={r['at_s']:.1f}s regenerated {r['regenerated']}, version "
            f"{r['new_version'][:8]} (fp {r['fingerprint']}); converged in {conv} ({via})"
        )
        live = "live" if r["vault_latest_live"] else "NOT LIVE"
        out.line(
            f"                  gateway propagation {r['propagation_s'] or 0:.1f}s; vault latest "
            f"version {live}" + ("; overlapped a duplicate delivery" if r["overlapped"] else "")
        )
    if report["gateway_key_use"] is not None:
        out.line(f"gateway key use   {report['gateway_key_use']}")
    prop = report["propagation"]
    if prop["units_s"]:
        out.line(
            f"propagation       per unit {prop['units_s']} s"
            f"{' (random per regeneration)' if prop['random'] else ''}; "
            f"{prop['refused_probes']} probes refused while units synced"
        )
    if report["chaos"]:
        for item in report["chaos"]:
            out.line(f"chaos             {item}")
    out.line(f"latency           p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms")
    for message, count in report["errors"].items():
        out.line(f"error x{count:<6}   {message}")
    out.line(report["verdict"])


def _external_target(args: argparse.Namespace) -> Target:
    from .cli import _env, _is_loopback_url, rotator_client_id

    vault_url = _env("AZURE_KEYVAULT_URL")
    secret_name = _env("APIMVAULT_SECRET_NAME")
    gateway = _env("AZURE_OPENAI_ENDPOINT")
    deployment = args.deployment or _env("APIMVAULT_DEPLOYMENT")
    missing = [
        n
        for n, v in (
            ("APIMVAULT_SECRET_NAME", secret_name),
            ("AZURE_OPENAI_ENDPOINT", gateway),
            ("APIMVAULT_DEPLOYMENT (or --deployment)", deployment),
            ("OPENAI_API_VERSION", _env("OPENAI_API_VERSION")),
        )
        if not v
    ]
    if missing:
        raise ConfigurationError(
            f"AZURE_KEYVAULT_URL is set, so the drill targets it; also set {', '.join(missing)}"
        )
    assert vault_url and secret_name and gateway and deployment
    arm = _env("APIMVAULT_ARM_ENDPOINT")
    loopback = all(_is_loopback_url(u) for u in (vault_url, gateway, arm))
    faults = None
    admin_url = _env("APIMVAULT_ADMIN_URL")
    if admin_url and loopback and _env("SSL_CERT_FILE"):
        from .local.admin import AdminClient

        faults = _Faults(admin=AdminClient(admin_url, os.environ["SSL_CERT_FILE"]))
    urls = tuple(u.rstrip("/") for u in (_env("APIMVAULT_GATEWAY_URLS") or "").replace(",", " ").split() if u)
    return Target(
        gateway_urls=urls,
        vault_url=vault_url,
        secret_name=secret_name,
        gateway_url=gateway,
        deployment=deployment,
        apim_subscription_id=_env("APIMVAULT_APIM_SUBSCRIPTION_ID"),
        arm_endpoint=arm,
        rotator_client_id=rotator_client_id(args.client_id),
        label=f"{vault_url} (secret {secret_name}) via {gateway}",
        loopback=loopback,
        faults=faults,
    )


def run(args: argparse.Namespace, out: Output) -> int:
    from .cli import EXIT_CONFIG, EXIT_FAILED, _fail, embedded_stack

    if args.duration <= 0 or args.concurrency < 2 or args.clients < 2:
        return _fail(out, ConfigurationError("--duration must be > 0, --concurrency and --clients >= 2"))
    try:
        if os.environ.get("AZURE_KEYVAULT_URL", "").strip():
            target = _external_target(args)
            if not target.loopback and not args.yes:
                out.error(
                    f"the drill regenerates the APIM keys of {target.label}; it does so against a "
                    "non-loopback target only with --yes"
                )
                out.document({"ok": False, "exit_code": EXIT_FAILED, "declined": True})
                return EXIT_FAILED
            if args.chaos and target.faults is None:
                return _fail(
                    out,
                    ConfigurationError(
                        "--chaos needs a local stack's admin API (APIMVAULT_ADMIN_URL from `apimvault local`)"
                    ),
                )
            try:
                return _run_target(target, args, out)
            finally:
                if target.faults is not None:
                    target.faults.close()
        with embedded_stack(need_async=True) as azure:
            env = azure.environ()
            target = Target(
                vault_url=azure.vault_url,
                secret_name=env["APIMVAULT_SECRET_NAME"],
                gateway_url=azure.gateway_url,
                deployment=args.deployment or env["APIMVAULT_DEPLOYMENT"],
                apim_subscription_id=azure.apim_subscription_id,
                arm_endpoint=azure.arm_url,
                rotator_client_id=azure.officer_identity.client_id,
                label="embedded local Azure (127.0.0.1, TLS)",
                loopback=True,
                faults=_Faults(azure=azure),
                gateway_urls=tuple(azure.gateway_unit_urls.values()),
            )
            return _run_target(target, args, out)
    except ConfigurationError as exc:
        _fail(out, exc)
        return EXIT_CONFIG
    except Exception as exc:
        return _fail(out, exc)


def _run_target(target: Target, args: argparse.Namespace, out: Output) -> int:
    from .cli import EXIT_FAILED, EXIT_OK

    drill = Drill(target, args, out)
    if not out.json:
        out.line(
            f"apimvault drill: {drill.duration:.0f}s of traffic against {target.label}"
            + (", with chaos" if drill.chaos else "")
        )
    report = drill.run()
    if out.json:
        out.document(report)
    else:
        _print_report(out, report)
    sys.stdout.flush()
    return EXIT_OK if report["ok"] else EXIT_FAILED
