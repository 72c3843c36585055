"""The rotation schedule of a drill, the Event Grid push, and the convergence monitor."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
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
            self._wait_converged(0, max(0.45 * d, self.elapsed()) + 5)
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
        if self.revoke:
            self._revoke()
        else:
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
            # counted from now: rotations that wait for K accepted probes per URL may outlast D
            self._wait_converged(last, max(d, self.elapsed()) + self.policy.ttl + 5)

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

    def _near_expiry(self, version: str) -> dict[str, Any]:
        """The ``SecretNearExpiry`` event Key Vault publishes for ``version`` (Event Grid schema)."""
        return {
            "id": f"drill-near-expiry-{version}",
            "subject": self.target.secret_name,
            "eventType": "Microsoft.KeyVault.SecretNearExpiry",
            "eventTime": "2026-01-01T00:00:00+00:00",
            "dataVersion": "1",
            "metadataVersion": "1",
            "topic": "/subscriptions/drill/resourceGroups/drill/providers/Microsoft.KeyVault/vaults/drill",
            "data": {
                "Id": f"{self.target.vault_url}/secrets/{self.target.secret_name}/{version}",
                "VaultName": (self.target.vault_url.split("//", 1)[-1].split(".", 1)[0]),
                "ObjectType": "Secret",
                "ObjectName": self.target.secret_name,
                "Version": version,
            },
        }

    def _rotate(self, *, push: bool, duplicate: bool = False) -> None:
        started = self.elapsed()
        index = len(self.rotations) + 1
        with self._lock:  # who holds the key this rotation is about to regenerate (version index - 2)
            held = sum(1 for rank in self._ranks() if 0 <= rank <= index - 2)
        result, deliveries = self._deliver(duplicate=duplicate)
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

    def _deliver(self, *, duplicate: bool) -> tuple[Any, list[str]]:
        """Deliver the ``SecretNearExpiry`` event of the current version the deployed way (see
        :mod:`.delivery`): Event Grid -> queue -> queue trigger -> the rotation function's handler, as the
        rotator identity. With ``duplicate`` Event Grid delivers it once more while the first run waits for
        the gateways, and a second instance runs the handler for it; exactly one run must rotate."""
        delivery = self.delivery
        assert delivery is not None
        event = self._near_expiry(self.versions[-1])
        before = len(delivery.outcomes)
        second: list[threading.Thread] = []

        def first_hook(step: str) -> None:
            if step == "probe" and not second:
                second.append(delivery.redeliver_concurrently(event["id"], self.target.secret_name))

        delivery.deliver(event, on_step=first_hook if duplicate else None)
        if duplicate and not second:  # the first run never waited for the gateway: deliver again now
            second.append(delivery.redeliver_concurrently(event["id"], self.target.secret_name))
        for thread in second:
            thread.join(180)
        outcomes = delivery.outcomes[before:]
        lines = []
        for i, outcome in enumerate(outcomes):
            name = f"queue message (dequeue {outcome.dequeue_count}){' duplicate' if i else ''}"
            if outcome.error is not None:
                lines.append(f"{name}: FAILED {type(outcome.error).__name__}: {outcome.error}")
            elif outcome.result.skipped:
                lines.append(
                    f"{name}: skipped ({outcome.result.reason}); vault verified at "
                    f"{outcome.result.verified_version}"
                )
            else:
                lines.append(
                    f"{name}: rotated to {outcome.result.new_version} ({outcome.result.credential_id})"
                )
        failed = [o.error for o in outcomes if o.error is not None]
        if failed and not duplicate:
            raise failed[0]  # the handler's typed error (e.g. AccessDeniedError), as the function raises it
        rotated = [o.result for o in outcomes if o.error is None and not o.result.skipped]
        expected = 2 if duplicate else 1
        if failed or len(rotated) != 1 or len(outcomes) != expected:
            raise ApimVaultError(
                f"{len(outcomes)} handler runs for {expected} deliveries did not end in exactly one "
                "rotation: " + "; ".join(lines or ["no queue message was received"])
            )
        return rotated[0], lines

    def _revoke(self) -> None:
        """The emergency revocation (``apimvault rotate --revoke-current``) of the key the clients hold, mid-
        traffic: :func:`apimvault.rotation.revoke_current` as the rotator identity rotates to the other key
        make-before-break; in its fleet window the drill pushes the new version to every client (Event
        Grid's ``SecretNewVersionCreated``); then the leaked key is regenerated and the report says when
        every gateway refused it. Run directly (an operator's command, not an Event Grid delivery)."""
        from ...rotation import revoke_current

        started = self.elapsed()
        index = len(self.rotations) + 1
        held: list[int] = []

        def hook(step: str) -> None:
            if step == "spread" and len(self.versions) < index + 1:
                version = self._latest_version()
                with self._lock:
                    self.versions.append(version)
                self.log(f"revocation: version {version[:8]} stored; pushing it to the fleet")
                self._push(version)
            elif step == "revoke" and not held:
                with self._lock:  # clients still on the leaked version (or older) when it is regenerated
                    held.append(sum(1 for rank in self._ranks() if 0 <= rank <= index - 1))

        self.log(f"revocation: the {self.rotations[-1].regenerated} key the clients hold leaked; revoking it")
        revocation = revoke_current(
            vault_url=self.target.vault_url,
            secret_name=self.target.secret_name,
            credential=self._rotation_credential,
            config=self._rotation_config,
            on_step=hook,
        )
        result = revocation.rotation
        assert result.new_version is not None
        at = self.elapsed()
        check = self._check_vault()
        live = "live" if check.get("ok") else "NOT LIVE"
        lines = [
            f"rotation {index} (revocation, began t={started:.1f}s): regenerated {result.regenerated}, "
            f"gateway accepted it after {result.propagation_seconds or 0:.1f}s, stored version "
            f"{result.new_version[:8]}; waited {revocation.waited_seconds:.1f}s for the fleet, then "
            f"regenerated the leaked {revocation.revoked_slot} key (fp {revocation.revoked_fingerprint}): "
            f"every gateway refused it {revocation.dead_after_seconds:.1f}s later, at t={at:.1f}s "
            f"({held[0] if held else 0} clients still held it)",
            f"rotation {index}: vault latest version {str(check.get('version', '?'))[:8]} is {live}",
        ]
        with self._lock:
            if len(self.versions) < index + 1:
                self.versions.append(result.new_version)
            record = RotationRecord(
                index=index,
                at_s=round(at, 3),
                old_version=result.old_version,
                new_version=result.new_version,
                credential_id=result.credential_id,
                regenerated=result.regenerated,
                fingerprint=result.fingerprint,
                push=True,
                started_s=round(started, 3),
                propagation_s=result.propagation_seconds,
                vault_latest_live=bool(check.get("ok")),
                vault_check=check,
                revoked_rank=index - 1,
                revocation={
                    "revoked_slot": revocation.revoked_slot,
                    "revoked_fingerprint": revocation.revoked_fingerprint,
                    "fleet_wait_s": revocation.waited_seconds,
                    "dead_after_s": revocation.dead_after_seconds,
                    "dead_at": revocation.dead_at,
                    "dead_at_drill_s": round(at, 3),
                },
            )
            record.clients_on_revoked_key = held[0] if held else 0
            if not record.clients_on_revoked_key:
                record.revocation_recovery_s = 0.0
            self.rotations.append(record)
            self._log_locked(*lines)

    def _latest_version(self) -> str:
        """The vault's latest version (read as the rotator, which may get the secret)."""
        from azure.keyvault.secrets import SecretClient

        with SecretClient(self.target.vault_url, self._rotation_credential) as client:
            version = client.get_secret(self.target.secret_name).properties.version
        assert version is not None
        return version

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
                if low > (record.index - 2 if record.revoked_rank is None else record.revoked_rank):
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
