"""The drill's rotations: delivered as in Azure, the emergency revocation, the Event Grid push, and the
gateway propagation the drill sets on a local stack."""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any

from ...exceptions import ApimVaultError, ConfigurationError
from .metrics import RotationRecord

if TYPE_CHECKING:  # pragma: no cover
    from .config import DrillPlan
    from .context import DrillContext
    from .delivery import Delivery, Outcome
    from .traffic import Traffic


class GatewayPropagation:
    """The per-unit propagation delays the drill sets on a local stack, and the stack's own, restored."""

    def __init__(self, ctx: DrillContext, plan: DrillPlan) -> None:
        self.ctx = ctx
        self.plan = plan
        self.settings: dict[str, Any] | None = None  # per unit, as the drill set it
        self._before: dict[str, dict[str, float]] | None = None

    def configure(self) -> None:
        faults = self.ctx.target.faults
        if faults is None:
            return
        try:
            self._before = faults.propagation()
        except Exception as exc:  # a stack without the propagation model
            raise ConfigurationError(f"the local stack cannot set gateway propagation: {exc}") from None
        settings: dict[str, Any] = {}
        for unit, delay in self.plan.unit_delays(list(self._before)).items():
            faults.set_propagation(delay, unit)
            settings[unit] = list(delay) if isinstance(delay, tuple) else delay
        self.settings = settings
        self.ctx.log(
            f"gateway propagation per unit: {settings} s"
            + (" (random per regeneration)" if self.plan.chaos else "")
        )

    def restore(self) -> None:
        faults, before = self.ctx.target.faults, self._before
        if faults is None or before is None:
            return
        for unit, spec in before.items():
            with contextlib.suppress(Exception):
                low, high = float(spec["min"]), float(spec["max"])
                faults.set_propagation(low if low == high else (low, high), unit)


def _outcome_line(i: int, outcome: Outcome) -> str:
    """What one handler run for a queue message did."""
    name = f"queue message (dequeue {outcome.dequeue_count}){' duplicate' if i else ''}"
    if outcome.error is not None:
        return f"{name}: FAILED {type(outcome.error).__name__}: {outcome.error}"
    if outcome.result.skipped:
        return (
            f"{name}: skipped ({outcome.result.reason}); vault verified at {outcome.result.verified_version}"
        )
    return f"{name}: rotated to {outcome.result.new_version} ({outcome.result.credential_id})"


class Rotations:
    """The rotator's side of the drill: its identity and settings, the delivery path, and a record of each
    rotation (read by the monitor, which fills in convergence, and by the report)."""

    def __init__(
        self,
        ctx: DrillContext,
        plan: DrillPlan,
        traffic: Traffic,
        *,
        token_scope: str | None,
        delivery_choice: str,
    ) -> None:
        self.ctx = ctx
        self.plan = plan
        self.traffic = traffic
        self.token_scope = token_scope
        self.delivery_choice = delivery_choice
        self.records: list[RotationRecord] = []
        self.propagation = GatewayPropagation(ctx, plan)
        self.start_credential_id = ""
        self.rotator: dict[str, Any] | None = None  # who rotates, with which roles
        self.delivery: Delivery | None = None  # Event Grid -> queue -> the rotation function's handler
        self.config: Any = None  # apimvault.rotation.RotationConfig the rotations run with
        self._credential: Any = None
        self._exit = contextlib.ExitStack()  # the delivery's queue (and Azurite), closed by close()

    # ---------------------------------------------------------------------------- setup

    def _target_args(self) -> dict[str, Any]:
        """What the rotation's functions take to reach the target, as the rotator."""
        target = self.ctx.target
        return {
            "vault_url": target.vault_url,
            "secret_name": target.secret_name,
            "apim_subscription_id": target.apim_subscription_id,
            "arm_endpoint": target.arm_endpoint,
            "credential": self._credential,
            "gateway_urls": target.gateway_urls or None,
            "token_scope": self.token_scope,
        }

    def open(self) -> None:
        """Check the rotation can run (fail fast), set the gateway propagation, the rotations' settings and
        the delivery path; the drill's first version is the vault's current one."""
        from ...rotation import plan_rotation
        from ...rotation.azure import bounded_credential  # bounded like `apimvault rotate`'s

        with contextlib.suppress(ImportError):  # a heavy import: not during the first rotation
            import azure.mgmt.apimanagement  # noqa: F401

        client_id = self.ctx.target.rotator_client_id
        self._credential = (
            bounded_credential(managed_identity_client_id=client_id) if client_id else bounded_credential()
        )
        plan = plan_rotation(**self._target_args())  # tags, subscription, rotator access, gateway URLs
        self.propagation.configure()
        self._configure_rotation()
        self.ctx.versions.append(plan.current_version)
        self.start_credential_id = plan.credential_id

    def _configure_rotation(self) -> None:
        """The rotations' settings, the rotator's identity and roles, and the delivery path."""
        from ...rotation import RotationConfig
        from .delivery import open_delivery

        target = self.ctx.target
        self.config = RotationConfig.from_env(
            gateway_urls=target.gateway_urls or None,
            arm_endpoint=target.arm_endpoint,
            apim_subscription_id=target.apim_subscription_id,
            vault_url=target.vault_url,
            propagation_timeout=self.plan.propagation_timeout,
            revoke_wait=self.plan.revoke_wait,
            token_scope=self.token_scope,  # key plus token: the probes send a token too
        )
        self.rotator = rotator_info(self.ctx)
        roles = self.rotator["roles"]
        self.ctx.log(
            f"rotator: {self.rotator['identity']}"
            + (f" holding {', '.join(r['role'] for r in roles)}" if roles is not None else "")
            + f" (roles file {self.rotator['roles_file']})"
        )
        self.delivery = self._exit.enter_context(open_delivery(self.delivery_choice))
        self.delivery.credential = self._credential
        self.delivery.config = self.config
        self.ctx.log(
            f"delivery: Event Grid -> {self.delivery.kind} queue -> queue trigger -> rotation function "
            f"handler ({self.delivery.why}; lease: {self.delivery.describe()['lease']})"
        )

    def close(self) -> None:
        """Close the delivery's queue clients (and Azurite, if the drill started it), restore the stack's
        propagation and close the rotator's credential."""
        with contextlib.suppress(Exception):
            self._exit.close()
        self.propagation.restore()
        if self._credential is not None:
            with contextlib.suppress(Exception):
                self._credential.close()

    # ---------------------------------------------------------------------------- events

    def _secret_event(self, event_type: str, event_id: str, version: str, **extra: Any) -> dict[str, Any]:
        """A Key Vault event about ``version`` of the drill's secret (Event Grid schema)."""
        target = self.ctx.target
        return {
            "id": event_id,
            "subject": target.secret_name,
            "eventType": f"Microsoft.KeyVault.{event_type}",
            **extra,
            "data": {
                "Id": f"{target.vault_url}/secrets/{target.secret_name}/{version}",
                "VaultName": (target.vault_url.split("//", 1)[-1].split(".", 1)[0]),
                "ObjectType": "Secret",
                "ObjectName": target.secret_name,
                "Version": version,
            },
        }

    def _near_expiry(self, version: str) -> dict[str, Any]:
        """The ``SecretNearExpiry`` event Key Vault publishes for ``version``."""
        return self._secret_event(
            "SecretNearExpiry",
            f"drill-near-expiry-{version}",
            version,
            eventTime="2026-01-01T00:00:00+00:00",
            dataVersion="1",
            metadataVersion="1",
            topic="/subscriptions/drill/resourceGroups/drill/providers/Microsoft.KeyVault/vaults/drill",
        )

    def push(self, version: str) -> None:
        """Event Grid delivery of SecretNewVersionCreated, handled by the core's helpers."""
        event = self._secret_event("SecretNewVersionCreated", f"drill-{version}", version)
        refreshed = self.traffic.push(event)
        self.ctx.log(f"Event Grid push (SecretNewVersionCreated) refreshed {refreshed} clients")

    # ---------------------------------------------------------------------------- rotations

    def _held(self, newest_revoked: int) -> int:
        """Clients on version ``newest_revoked`` or older (hold ``ctx.lock``)."""
        return sum(1 for rank in self.traffic.ranks() if 0 <= rank <= newest_revoked)

    def _add(self, record: RotationRecord, held: int, lines: list[str]) -> None:
        """Record a rotation and log its lines (hold ``ctx.lock``): the monitor's "no client holds the key
        revoked by rotation N" (it reads the records under the same lock) can only come after them."""
        record.clients_on_revoked_key = held
        if held == 0 and record.index > 1:
            record.revocation_recovery_s = 0.0
        self.records.append(record)
        self.ctx.log_locked(*lines)

    def _record(
        self, index: int, started: float, at: float, result: Any, check: dict[str, Any], **extra: Any
    ) -> RotationRecord:
        return RotationRecord(
            index=index,
            at_s=round(at, 3),
            old_version=result.old_version,
            new_version=result.new_version,
            credential_id=result.credential_id,
            regenerated=result.regenerated,
            fingerprint=result.fingerprint,
            started_s=round(started, 3),
            propagation_s=result.propagation_seconds,
            vault_latest_live=bool(check.get("ok")),
            vault_check=check,
            **extra,
        )

    @staticmethod
    def _vault_line(index: int, check: dict[str, Any]) -> str:
        live = "live" if check.get("ok") else "NOT LIVE"
        return f"rotation {index}: vault latest version {str(check.get('version', '?'))[:8]} is {live}"

    def rotate(self, *, push: bool, duplicate: bool = False) -> None:
        """One rotation delivered the deployed way; ``push``: then hand its version to every client."""
        ctx = self.ctx
        started = ctx.elapsed()
        index = len(self.records) + 1
        with ctx.lock:  # who holds the key this rotation is about to regenerate (version index - 2)
            held = self._held(index - 2)
        result, deliveries = self._deliver(duplicate=duplicate)
        assert result.new_version is not None
        at = ctx.elapsed()
        check = self._check_vault()
        revoked = (
            f"; {held} clients held the {result.regenerated} key it revoked"
            if index > 1
            else f"; the {self.start_credential_id} key the clients use stays valid"
        )
        lines = [
            f"rotation {index} (began t={started:.1f}s): regenerated {result.regenerated}, gateway accepted "
            f"it after {result.propagation_seconds or 0:.1f}s, then stored version {result.new_version[:8]} "
            f"at t={at:.1f}s (fp {result.fingerprint}){revoked}",
            *(f"rotation {index}: {line}" for line in deliveries),
            self._vault_line(index, check),
        ]
        record = self._record(
            index, started, at, result, check, push=push, deliveries=deliveries, overlapped=duplicate
        )
        with ctx.lock:
            ctx.versions.append(result.new_version)
            self._add(record, held, lines)
        if push:
            self.push(result.new_version)

    def _deliver(self, *, duplicate: bool) -> tuple[Any, list[str]]:
        """Deliver the ``SecretNearExpiry`` event of the current version the deployed way (see
        :mod:`.delivery`): Event Grid -> queue -> queue trigger -> the rotation function's handler, as the
        rotator identity. With ``duplicate`` Event Grid delivers it once more while the first run waits for
        the gateways, and a second instance runs the handler for it; exactly one run must rotate."""
        delivery = self.delivery
        assert delivery is not None
        secret_name = self.ctx.target.secret_name
        event = self._near_expiry(self.ctx.versions[-1])
        before = len(delivery.outcomes)
        second: list[threading.Thread] = []

        def first_hook(step: str) -> None:
            if step == "probe" and not second:
                second.append(delivery.redeliver_concurrently(event["id"], secret_name))

        delivery.deliver(event, on_step=first_hook if duplicate else None)
        if duplicate and not second:  # the first run never waited for the gateway: deliver again now
            second.append(delivery.redeliver_concurrently(event["id"], secret_name))
        for thread in second:
            thread.join(180)
        outcomes = delivery.outcomes[before:]
        lines = [_outcome_line(i, outcome) for i, outcome in enumerate(outcomes)]
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

    def revoke(self) -> None:
        """The emergency revocation (``apimvault rotate --revoke-current``) of the key the clients hold, mid-
        traffic: :func:`apimvault.rotation.revoke_current` as the rotator identity rotates to the other key
        make-before-break; in its fleet window the drill pushes the new version to every client (Event
        Grid's ``SecretNewVersionCreated``); then the leaked key is regenerated and the report says when
        every gateway refused it. Run directly (an operator's command, not an Event Grid delivery)."""
        from ...rotation import revoke_current

        ctx = self.ctx
        started = ctx.elapsed()
        index = len(self.records) + 1
        held: list[int] = []

        def hook(step: str) -> None:
            if step == "spread" and len(ctx.versions) < index + 1:
                version = self._latest_version()
                with ctx.lock:
                    ctx.versions.append(version)
                ctx.log(f"revocation: version {version[:8]} stored; pushing it to the fleet")
                self.push(version)
            elif step == "revoke" and not held:
                with ctx.lock:  # clients still on the leaked version (or older) when it is regenerated
                    held.append(self._held(index - 1))

        ctx.log(f"revocation: the {self.records[-1].regenerated} key the clients hold leaked; revoking it")
        target = ctx.target
        revocation = revoke_current(
            vault_url=target.vault_url,
            secret_name=target.secret_name,
            credential=self._credential,
            config=self.config,
            on_step=hook,
        )
        result = revocation.rotation
        assert result.new_version is not None
        at = ctx.elapsed()
        check = self._check_vault()
        lines = [
            f"rotation {index} (revocation, began t={started:.1f}s): regenerated {result.regenerated}, "
            f"gateway accepted it after {result.propagation_seconds or 0:.1f}s, stored version "
            f"{result.new_version[:8]}; waited {revocation.waited_seconds:.1f}s for the fleet, then "
            f"regenerated the leaked {revocation.revoked_slot} key (fp {revocation.revoked_fingerprint}): "
            f"every gateway refused it {revocation.dead_after_seconds:.1f}s later, at t={at:.1f}s "
            f"({held[0] if held else 0} clients still held it)",
            self._vault_line(index, check),
        ]
        outcome = {
            "revoked_slot": revocation.revoked_slot,
            "revoked_fingerprint": revocation.revoked_fingerprint,
            "fleet_wait_s": revocation.waited_seconds,
            "dead_after_s": revocation.dead_after_seconds,
            "dead_at": revocation.dead_at,
            "dead_at_drill_s": round(at, 3),
        }
        record = self._record(
            index, started, at, result, check, push=True, revoked_rank=index - 1, revocation=outcome
        )
        with ctx.lock:
            if len(ctx.versions) < index + 1:
                ctx.versions.append(result.new_version)
            self._add(record, held[0] if held else 0, lines)

    def _latest_version(self) -> str:
        """The vault's latest version (read as the rotator, which may get the secret)."""
        from azure.keyvault.secrets import SecretClient

        target = self.ctx.target
        with SecretClient(target.vault_url, self._credential) as client:
            version = client.get_secret(target.secret_name).properties.version
        assert version is not None
        return version

    def _check_vault(self) -> dict[str, Any]:
        """An independent check, after a rotation, that the vault's latest version is live everywhere."""
        from ...rotation import check_latest

        try:
            check = check_latest(**self._target_args())
        except ApimVaultError as exc:
            self.ctx.log(f"vault check failed: {type(exc).__name__}: {exc}")
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return check.as_dict()


def rotator_info(ctx: DrillContext) -> dict[str, Any]:
    """Who the rotations run as, the roles it holds (local stacks) and infra's roles file."""
    from ...local.rbac import load_infra_roles, roles_file

    path = roles_file()
    infra = sorted(role.name for role in load_infra_roles(path).values())
    client_id = ctx.target.rotator_client_id
    info: dict[str, Any] = {
        "client_id": client_id,
        "name": None,
        "identity": f"managed identity {client_id}" if client_id else "DefaultAzureCredential's identity",
        "roles": None,  # unknown outside a local stack
        "roles_file": str(path),
        "roles_file_roles": infra,
        "only_roles_file_roles": None,
    }
    faults = ctx.target.faults
    if client_id and faults is not None:
        name, roles = faults.identity_roles(client_id)
        info["name"] = name
        info["identity"] = f"{name} (client id {client_id})" if name else info["identity"]
        info["roles"] = roles
        info["only_roles_file_roles"] = bool(roles) and {r["role"] for r in roles} <= set(infra)
    return info
