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
                         (``refresh_from_event`` with a SecretNewVersionCreated event). With ``--revoke``
                         it is an emergency revocation instead (``revoke_current``): rotate to the other
                         key, push it to the clients, then regenerate the key they held and report when
                         every gateway refused it
    0.85 D  chaos only   latency spikes on the gateway and on Key Vault
    D       traffic stops once every client holds the last version (at most TTL + 5 s more)

Every rotation (but the revocation, an operator's command) is delivered as in Azure (:mod:`.delivery`):
a ``SecretNearExpiry`` event through the local Event Grid to the Storage queue (Azurite's when found,
else in memory), whose queue trigger runs the rotation function's handler
(:func:`apimvault.rotation.function.handle_queue_message`) as the rotator identity (``--client-id`` /
``APIMVAULT_ROTATOR_CLIENT_ID``; the embedded stack's holds exactly ``infra/roles/rotator.json``'s roles).
The report names the identity, its roles and the delivery path.

Gateway propagation (APIM syncs a regenerated key to each gateway unit asynchronously; Microsoft Q&A
question 5922487 reports up to 10 minutes): on a local stack the drill makes each gateway unit accept a
regenerated key only after a delay (``--propagation S``, default 2 s: unit k of n waits ``S * k / n``;
with ``--chaos`` each unit draws a random delay in ``[S / 4, 1.5 S]`` for every regeneration). The
embedded stack's units answer behind one URL (balanced, as a region's units share a hostname): the
rotation accepts a new key only after K consecutive accepted probes per URL, each on a fresh connection
(``APIMVAULT_PROBE_SUCCESSES``); with a stack serving units at their own URLs the clients are spread over
them. Every rotation is make-before-break (it stores the new key only once
every unit accepts it) and reports the measured propagation; after each one the drill checks,
independently, that the vault's latest version holds a live key of its tagged slot that every unit
accepts. With ``--chaos`` rotation 3 is two overlapping deliveries of the same ``SecretNearExpiry`` event
(the second starts while the first waits for the gateways), as Event Grid's at-least-once delivery makes
happen; one rotates, the other finds that out and verifies the vault.

The provider TTL is ``max(4 s, 0.6 D)`` (with propagation, long enough that the earliest refresh-ahead
comes 4 s after the gateway units revoke the key of rotation 2), with a quarter of it as refresh margin,
so refresh-ahead happens during the run but not before rotation 2. Convergence after a rotation is the
time from its Key Vault write until every client's current version is that version (or a later one);
revocation recovery is the time from the start of a rotation until no client holds the key it
regenerated.

The parts (composed by :class:`Drill`, each owning its state, all sharing a :class:`.context.DrillContext`):
:class:`.traffic.Traffic` (clients and workers), :class:`.rotations.Rotations` (rotator, delivery,
records), :class:`.schedule.Schedule` and :class:`.schedule.Monitor`, :class:`.report.DrillReport`; what
they run with is :class:`.config.DrillPlan`, derived from the :class:`.config.DrillConfig`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from ...exceptions import ConfigurationError
from ..config import env_var, vault_url_variable
from ..embedded import embedded_stack
from ..output import EXIT_FAILED, EXIT_OK, Output, fail, request_failure
from .config import DrillConfig, DrillDeclined, PreflightFailed
from .context import DrillContext
from .report import DrillReport, print_report
from .rotations import Rotations
from .schedule import Monitor, Schedule
from .target import StackFaults, Target, external_target
from .traffic import Traffic

__all__ = ["Drill", "PreflightFailed", "drill_target", "run", "run_drill"]


class Drill:
    """One drill: traffic, rotations on a schedule, a convergence monitor, a report (see the module)."""

    def __init__(
        self, target: Target, config: DrillConfig, out: Output, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.plan = config.plan(local=target.faults is not None)
        self.ctx = DrillContext(target, out, clock=clock)
        self.traffic = Traffic(self.ctx, self.plan, config.token_scope)
        self.rotations = Rotations(
            self.ctx, self.plan, self.traffic, token_scope=config.token_scope, delivery_choice=config.delivery
        )
        self.schedule = Schedule(self.ctx, self.plan, self.rotations, revoke=config.revoke)
        self.monitor = Monitor(self.ctx, self.traffic, self.rotations)
        self.report = DrillReport(
            self.ctx, self.traffic, self.rotations, self.schedule, token_scope=config.token_scope
        )

    def run(self) -> dict[str, Any]:
        """Run the drill; the report (``--json``'s document). Raises :class:`PreflightFailed` before the
        first rotation if a request of the preflight fails."""
        ctx, traffic = self.ctx, self.traffic
        ctx.live = ctx.out.stdout.isatty() and not ctx.out.json
        self.report.begin()
        try:
            self.rotations.open()
            traffic.open()
            traffic.load_async(ctx.versions[0])
            traffic.preflight()
            ctx.start_clock()
            traffic.start()
            ctx.log(
                f"traffic started: {len(traffic.threads)} threads + {self.plan.asyncio_tasks} asyncio tasks "
                f"over {len(traffic.slots)} clients on version {ctx.versions[0][:8]} "
                f"({self.rotations.start_credential_id})"
            )
            self.monitor.start()
            with self.report.display():
                self.schedule.run()
                ctx.stop.set()
            traffic.join()
            self.monitor.join()
            elapsed = ctx.elapsed()
        finally:
            ctx.stop.set()
            traffic.release()
            self.rotations.close()  # the delivery's queue (and Azurite), the propagation, the rotator
            self.schedule.clear_faults()
            traffic.close()
        return self.report.build(elapsed)


@contextlib.contextmanager
def drill_target(config: DrillConfig) -> Iterator[Target]:
    """What the drill runs against: ``AZURE_KEYVAULT_URL``'s endpoints when it is set (a stack from
    ``apimvault local``, or real Azure), else the embedded local Azure, started for the block."""
    if env_var(vault_url_variable()):
        target = external_target(config)
        try:
            yield target
        finally:
            if target.faults is not None:
                target.faults.close()
        return
    # Rotation as infra's rotator identity (only infra/roles/rotator.json's roles), against the gateway
    # units behind one URL (the stack's balanced default): the rotation's probe rule (K consecutive
    # accepted probes per URL, each on a fresh connection) sees a lagging unit there.
    with embedded_stack(need_async=True, rotate_as="rotator") as azure:
        env = azure.environ()
        if config.token_scope:  # the gateway then checks the token too
            audience = config.token_scope.strip().removesuffix("/.default")
            azure.gateway.policies.set(
                azure.gateway.api_path, {"validate_azure_ad_token": {"audiences": [audience]}}
            )
        yield Target(
            vault_url=azure.vault_url,
            secret_name=env["APIMVAULT_SECRET_NAME"],
            gateway_url=azure.gateway_url,
            deployment=config.deployment or env["APIMVAULT_DEPLOYMENT"],
            apim_subscription_id=azure.apim_subscription_id,
            arm_endpoint=azure.arm_url,
            rotator_client_id=azure.rotation_identity.client_id,
            label="embedded local Azure (127.0.0.1, TLS)",
            loopback=True,
            faults=StackFaults(azure=azure),
            gateway_urls=azure.gateway_urls,
        )


def check_target(target: Target, config: DrillConfig) -> None:
    """Refuse what the drill must not do to ``target``: regenerate a non-loopback target's keys without
    ``yes`` (:class:`DrillDeclined`), inject chaos without a local stack's admin API."""
    if not target.loopback and not config.yes:
        raise DrillDeclined(
            f"the drill regenerates the APIM keys of {target.label}; it does so against a non-loopback "
            "target only with --yes"
        )
    if config.chaos and target.faults is None:
        raise ConfigurationError(
            "--chaos needs a local stack's admin API (APIMVAULT_ADMIN_URL from `apimvault local`)"
        )


def run_drill(config: DrillConfig, out: Output | None = None) -> dict[str, Any]:
    """Run a drill from Python; its report (the ``--json`` document: ``report["ok"]``, ``["verdict"]``).

    ``out``: where the timeline goes as it is logged (default: nowhere; the report keeps it). Raises
    :class:`DrillDeclined`, :class:`PreflightFailed`, or the library's typed errors.
    """
    with drill_target(config) as target:
        check_target(target, config)
        return Drill(target, config, out if out is not None else Output(as_json=True)).run()


def run(args: argparse.Namespace, out: Output) -> int:
    """``apimvault drill``: the exit code."""
    try:
        config = DrillConfig.from_args(args)
        with drill_target(config) as target:
            try:
                check_target(target, config)
            except DrillDeclined as declined:
                out.error(str(declined))
                out.document({"ok": False, "exit_code": EXIT_FAILED, "declined": True})
                return EXIT_FAILED
            return _run_target(target, config, out)
    except Exception as exc:
        return fail(out, exc)


def _run_target(target: Target, config: DrillConfig, out: Output) -> int:
    drill = Drill(target, config, out)
    if not out.json:
        out.line(
            f"apimvault drill: {config.duration:g}s of traffic against {target.label}"
            + (", with chaos" if config.chaos else "")
        )
    try:
        report = drill.run()
    except PreflightFailed as failed:
        cause = request_failure(failed.cause, target.deployment)
        message = (
            f"the {failed.kind} preflight request failed: {cause}; the drill stopped before rotating anything"
        )
        return fail(out, failed.cause, {"preflight": failed.kind, "rotations": 0}, message=message)
    if out.json:
        out.document(report)
    else:
        print_report(out, report)
    sys.stdout.flush()
    return EXIT_OK if report["ok"] else EXIT_FAILED
