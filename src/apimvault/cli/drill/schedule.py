"""The rotation schedule of a drill, the Event Grid push, and the convergence monitor."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from .metrics import ClientSlot, RotationRecord, counts_text
from .state import DrillState


class RotationSchedule(DrillState):
    """Rotations at fixed fractions of the run, chaos in between, and the convergence monitor."""

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
        gap = 2 * self.policy.forced_refresh_interval
        self._wait_until(0.10 * d)
        if self._traffic_broken():
            return
        self._rotate(push=False)
        self._wait_until(max(0.20 * d, self.elapsed() + gap))
        if self._traffic_broken():
            return
        self._rotate(push=False)
        if self.chaos and self.target.faults is not None:
            # Only once nobody holds the revoked key: an outage then costs no request (stale-if-error).
            self._wait_converged(0, 0.45 * d + 5)
            self._wait_until(0.45 * d)
            self._inject("keyvault", "status", operation="GetSecret", status=503)
            self.chaos_log.append(f"{self.elapsed():.1f}s Key Vault GetSecret -> 503 for {0.15 * d:.1f}s")
            self.log("chaos: Key Vault outage begins (GetSecret answers 503)")
            self._wait_until(0.60 * d)
            self.target.faults.clear("keyvault")
            self.log("chaos: Key Vault outage ends")
        self._wait_until(max(0.70 * d, self.elapsed() + gap))
        if self._traffic_broken():
            return
        self._rotate(push=True)
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
            self._wait_converged(last, d + self.policy.ttl + 5)

    def _traffic_broken(self) -> bool:
        """Stop rotating when most requests fail: the traffic is broken, and rotating proves nothing."""
        why = self.metrics.broken()
        if why is None:
            return False
        self.aborted = why
        self.log(f"traffic is failing ({why}): no more rotations")
        return True

    def _inject(self, service: str, kind: str, **fields: Any) -> None:
        assert self.target.faults is not None
        self.target.faults.inject(service, kind, **fields)

    def _wait_converged(self, index: int, deadline: float) -> None:
        while self.elapsed() < deadline:
            if index < 0 or self.rotations[index].convergence_s is not None:
                return
            time.sleep(0.02)

    def _rotate(self, *, push: bool) -> None:
        from ...rotation import rotate

        started = self.elapsed()
        index = len(self.rotations) + 1
        with self._lock:  # who holds the key this rotation is about to regenerate (version index - 2)
            held = sum(1 for rank in self._ranks() if 0 <= rank <= index - 2)
        result = rotate(
            vault_url=self.target.vault_url,
            secret_name=self.target.secret_name,
            apim_subscription_id=self.target.apim_subscription_id,
            arm_endpoint=self.target.arm_endpoint,
            credential=self._rotation_credential,
        )
        assert result.new_version is not None
        at = self.elapsed()
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
            f"rotation {record.index}: regenerated {result.regenerated}, "
            f"stored version {result.new_version[:8]} "
            f"(fp {result.fingerprint}){revoked}"
        )
        if push:
            self._push(result.new_version)

    def _push(self, version: str) -> None:
        """Event Grid delivery of SecretNewVersionCreated, handled by the core's helpers."""
        from ..._events import arefresh_from_event, refresh_from_event

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
                            f"{record.convergence_s:.2f}s ({counts_text(record.converged_via)})"
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
