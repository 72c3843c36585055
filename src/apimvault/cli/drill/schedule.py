"""The drill's schedule (rotations at fixed fractions of the run, chaos in between) and the convergence
monitor."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from .metrics import ClientSlot, RotationRecord, counts_text

if TYPE_CHECKING:  # pragma: no cover
    from .config import DrillPlan
    from .context import DrillContext
    from .rotations import Rotations
    from .traffic import Traffic


class Schedule:
    """Rotations at fixed fractions of the run (see :mod:`.run`), chaos in between. Owns the chaos log and
    why it stopped rotating early, if it did."""

    def __init__(self, ctx: DrillContext, plan: DrillPlan, rotations: Rotations, *, revoke: bool) -> None:
        self.ctx = ctx
        self.plan = plan
        self.rotations = rotations
        self.revoke = revoke
        self.chaos_log: list[str] = []
        self.aborted: str | None = None  # why the schedule stopped rotating early

    def _wait_until(self, at: float) -> None:
        ctx = self.ctx
        while not ctx.stop.is_set():
            remaining = at - ctx.elapsed()
            if remaining <= 0:
                return
            ctx.stop.wait(min(remaining, 0.1))

    def run(self) -> None:
        """Rotation 1 at 0.10 D, 2 at 0.20 D, (chaos: a Key Vault outage at 0.45 D), 3 at 0.70 D (pushed, or
        a revocation), (chaos: latency spikes at 0.85 D), then until every client holds the last version."""
        d, ctx = self.plan.duration, self.ctx
        self._wait_until(0.10 * d)
        if self._traffic_broken():
            return
        self.rotations.rotate(push=False)
        self._wait_until(max(0.20 * d, ctx.elapsed() + self.plan.rotation_gap))
        if self._traffic_broken():
            return
        self.rotations.rotate(push=False)
        if self.plan.chaos and ctx.target.faults is not None:
            self._outage()
        self._wait_until(max(0.70 * d, ctx.elapsed() + self.plan.rotation_gap))
        if self._traffic_broken():
            return
        if self.revoke:
            self.rotations.revoke()
        else:
            self.rotations.rotate(push=True, duplicate=self.plan.chaos)
        if self.plan.chaos and ctx.target.faults is not None:
            self._spikes()
        self._wait_until(d)
        records = self.rotations.records
        last = len(records) - 1
        if records and records[last].convergence_s is None:
            ctx.log("waiting for every client to reach the last version")
            # counted from now: rotations that wait for K accepted probes per URL may outlast D
            self._wait_converged(last, max(d, ctx.elapsed()) + self.plan.ttl + 5)

    def _outage(self) -> None:
        """Chaos: Key Vault's GetSecret answers 503 from 0.45 D for 0.15 D."""
        d, ctx = self.plan.duration, self.ctx
        # Only once nobody holds the revoked key: an outage then costs no request (stale-if-error).
        self._wait_converged(0, max(0.45 * d, ctx.elapsed()) + 5)
        self._wait_until(0.45 * d)
        self._inject("keyvault", "status", operation="GetSecret", status=503)
        outage = max(0.15 * d, 1.0)  # rotations that wait for the gateway may have used up 0.45-0.60 D
        self.chaos_log.append(f"{ctx.elapsed():.1f}s Key Vault GetSecret -> 503 for {outage:.1f}s")
        ctx.log("chaos: Key Vault outage begins (GetSecret answers 503)")
        self._wait_until(max(0.60 * d, ctx.elapsed() + outage))
        assert ctx.target.faults is not None
        ctx.target.faults.clear("keyvault")
        ctx.log("chaos: Key Vault outage ends")

    def _spikes(self) -> None:
        """Chaos: latency spikes on the gateway and Key Vault at 0.85 D."""
        ctx = self.ctx
        self._wait_until(0.85 * self.plan.duration)
        spikes = max(8, self.plan.concurrency * 3)
        self._inject("gateway", "latency", operation="ChatCompletions", seconds=0.25, times=spikes)
        self._inject("keyvault", "latency", operation="GetSecret", seconds=0.5, times=2)
        self.chaos_log.append(
            f"{ctx.elapsed():.1f}s gateway +250 ms on {spikes} chats; Key Vault +500 ms on 2 reads"
        )
        ctx.log("chaos: latency spikes on the gateway and Key Vault")

    def _traffic_broken(self) -> bool:
        """Stop rotating when most requests fail: the traffic is broken, and rotating proves nothing."""
        why = self.ctx.metrics.broken()
        if why is None:
            return False
        self.aborted = why
        self.ctx.log(f"traffic is failing ({why}): no more rotations")
        return True

    def _inject(self, service: str, kind: str, **fields: Any) -> None:
        assert self.ctx.target.faults is not None
        self.ctx.target.faults.inject(service, kind, **fields)

    def _wait_converged(self, index: int, deadline: float) -> None:
        while self.ctx.elapsed() < deadline:
            if index < 0 or self.rotations.records[index].convergence_s is not None:
                return
            time.sleep(0.02)

    def clear_faults(self) -> None:
        """Clear what the chaos injected (a local stack's faults)."""
        faults = self.ctx.target.faults
        if faults is not None:
            for service in ("keyvault", "gateway"):
                with contextlib.suppress(Exception):
                    faults.clear(service)


class Monitor:
    """Watches the clients' versions: when every client reached a rotation's version (convergence) and
    when none holds the key a rotation revoked (revocation recovery); fills both into the records."""

    def __init__(self, ctx: DrillContext, traffic: Traffic, rotations: Rotations) -> None:
        self.ctx = ctx
        self.traffic = traffic
        self.rotations = rotations
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, daemon=True, name="drill-monitor")
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(5)

    def _watch(self) -> None:
        while not self.ctx.stop.is_set():
            self.check()
            time.sleep(0.01)

    def check(self) -> None:
        """One look at the clients: record each convergence and revocation recovery now complete."""
        ctx = self.ctx
        with ctx.lock:
            records = self.rotations.records
            pending = [r for r in records if r.convergence_s is None]
            recovering = [r for r in records if r.revocation_recovery_s is None and r.index > 1]
            slots = list(self.traffic.slots)
            ranks = self.traffic.ranks()
        low = min(ranks) if ranks else -1
        for record in recovering:
            if low > (record.index - 2 if record.revoked_rank is None else record.revoked_rank):
                record.revocation_recovery_s = round(max(0.0, ctx.elapsed() - record.started_s), 3)
                ctx.log(
                    f"no client holds the key revoked by rotation {record.index} any more "
                    f"({record.revocation_recovery_s:.2f}s after it began)"
                )
        for record in pending:
            if low >= record.index:
                record.convergence_s = round(max(0.0, ctx.elapsed() - record.at_s), 3)
                record.converged_via = self._via(record, slots)
                ctx.log(
                    f"all {len(slots)} clients on version >= rotation {record.index} after "
                    f"{record.convergence_s:.2f}s ({counts_text(record.converged_via)})"
                )

    def _via(self, record: RotationRecord, slots: list[ClientSlot]) -> dict[str, int]:
        counts: Counter[str] = Counter()
        with self.ctx.lock:
            for slot in slots:
                reason = next((r for v, r in slot.via if self.ctx.rank(v) >= record.index), "unknown")
                counts[reason] += 1
        return dict(counts)
