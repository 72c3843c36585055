"""The rotation schedule of a drill, the Event Grid push, and the convergence monitor."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ...exceptions import ApimVaultError
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
            outage = max(0.15 * d, 1.0)  # rotations that wait for the gateway may have used up 0.45-0.60 D
            self.chaos_log.append(f"{self.elapsed():.1f}s Key Vault GetSecret -> 503 for {outage:.1f}s")
            self.log("chaos: Key Vault outage begins (GetSecret answers 503)")
            self._wait_until(max(0.60 * d, self.elapsed() + outage))
            self.target.faults.clear("keyvault")
            self.log("chaos: Key Vault outage ends")
        self._wait_until(max(0.70 * d, self.elapsed() + gap))
        if self._traffic_broken():
            return
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

    def _rotation_kwargs(self) -> dict[str, Any]:
        return {
            "apim_subscription_id": self.target.apim_subscription_id,
            "arm_endpoint": self.target.arm_endpoint,
            "credential": self._rotation_credential,
            "gateway_urls": self.target.gateway_urls or None,
            "token_scope": self.token_scope,  # key plus token: the probes send a token too
            # A local stack's delays are known; real gateways get the library's default (or the env's).
            "propagation_timeout": max(60.0, 20 * self.propagation)
            if self.target.faults is not None
            else None,
        }

    def _rotate(self, *, push: bool, duplicate: bool = False) -> None:
        from ...rotation import rotate

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
        revoked = (
            f"; {held} clients held the {result.regenerated} key it revoked"
            if index > 1
            else f"; the {self.start_credential_id} key the clients use stays valid"
        )
        live = "live" if check.get("ok") else "NOT LIVE"
        lines = [
            f"rotation {index} (began t={started:.1f}s): regenerated {result.regenerated}, gateway accepted "
            f"it after {result.propagation_seconds or 0:.1f}s, then stored version {result.new_version[:8]} "
            f"at t={at:.1f}s (fp {result.fingerprint}){revoked}",
            *(f"rotation {index}: {line}" for line in deliveries),
            f"rotation {index}: vault latest version {str(check.get('version', '?'))[:8]} is {live}",
        ]
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
                vault_latest_live=bool(check.get("ok")),
                vault_check=check,
                deliveries=deliveries,
                overlapped=duplicate,
            )
            record.clients_on_revoked_key = held
            if held == 0 and index > 1:
                record.revocation_recovery_s = 0.0
            self.rotations.append(record)
            # Logged with the change: the monitor's "no client holds the key revoked by rotation N" (it
            # reads self.rotations under the same lock) can only come after these lines.
            self._log_locked(*lines)
        if push:
            self._push(result.new_version)

    def _deliver_twice(self) -> tuple[Any, list[str]]:
        """Two overlapping deliveries of the SecretNearExpiry event for the current version: the second
        starts while the first waits for the gateways to accept its new key. Exactly one must rotate."""
        from ...rotation import rotate_from_event

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
        started = threading.Event()

        def deliver(i: int, hook: Callable[[str], None] | None) -> None:
            try:
                outcomes[i] = rotate_from_event(event, on_step=hook, **self._rotation_kwargs())
            except Exception as exc:
                outcomes[i] = exc

        second = threading.Thread(target=deliver, args=(1, None), name="drill-redelivery", daemon=True)

        def first_hook(step: str) -> None:
            if step == "probe" and not started.is_set():
                started.set()
                second.start()

        deliver(0, first_hook)
        if not started.is_set():  # the first run never waited for the gateway: deliver again now
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

    def _check_vault(self) -> dict[str, Any]:
        """An independent check, after a rotation, that the vault's latest version is live everywhere."""
        from ...rotation import check_latest

        try:
            check = check_latest(
                vault_url=self.target.vault_url,
                secret_name=self.target.secret_name,
                apim_subscription_id=self.target.apim_subscription_id,
                arm_endpoint=self.target.arm_endpoint,
                credential=self._rotation_credential,
                gateway_urls=self.target.gateway_urls or None,
                token_scope=self.token_scope,
            )
        except ApimVaultError as exc:
            self.log(f"vault check failed: {type(exc).__name__}: {exc}")
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return check.as_dict()

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
