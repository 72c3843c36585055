"""The drill's live display and its report (a dict for ``--json``, lines for a terminal)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .metrics import ClientSlot, counts_text

if TYPE_CHECKING:  # pragma: no cover
    from ..output import Output
    from .context import DrillContext
    from .rotations import Rotations
    from .schedule import Schedule
    from .traffic import Traffic


class DrillReport:
    """The live table while the drill runs, and the report at the end. Owns the stack's counters from
    before the drill and the display's ticker; reads the other parts."""

    def __init__(
        self,
        ctx: DrillContext,
        traffic: Traffic,
        rotations: Rotations,
        schedule: Schedule,
        *,
        token_scope: str | None,
    ) -> None:
        self.ctx = ctx
        self.traffic = traffic
        self.rotations = rotations
        self.schedule = schedule
        self.token_scope = token_scope
        self._before: dict[str, Any] | None = None
        self._ticking = False

    # ---------------------------------------------------------------------------- display

    @contextlib.contextmanager
    def display(self) -> Iterator[None]:
        """The live table (a terminal, not ``--json``) while the block runs."""
        if not self.ctx.live:
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

        ctx, metrics, slots = self.ctx, self.ctx.metrics, list(self.traffic.slots)
        head = Text(
            f"apimvault drill  t={ctx.elapsed():5.1f}s/{self.traffic.plan.duration:.0f}s  "
            f"requests {metrics.requests}  "
            f"{metrics.rate():6.0f} req/s  failed {metrics.failed}  "
            f"401 recovered {sum(s.provider.stats().resends_401 for s in slots)}  "
            f"rotations {len(self.rotations.records)}",
            style="bold red" if metrics.failed else "bold",
        )
        table = Table(box=None, pad_edge=False)
        for column in ("client", "kind", "version", "CredentialId", "state", "vault reads", "401 re-sends"):
            table.add_column(column)
        for slot in slots:
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
        lines = Text("\n".join(ctx.timeline[-6:]), style="dim")
        return Group(head, table, lines)

    # ---------------------------------------------------------------------------- report

    def _counters(self) -> dict[str, Any] | None:
        faults = self.ctx.target.faults
        if faults is None:
            return None
        try:
            kv_ops, _ = faults.counters("keyvault")
            _, gw_labels = faults.counters("gateway")
        except Exception:
            return None
        return {"GetSecret": kv_ops.get("GetSecret", 0), "labels": gw_labels}

    def begin(self) -> None:
        """Read the stack's counters before the drill (the report shows what the drill added)."""
        self._before = self._counters()

    def build(self, elapsed: float) -> dict[str, Any]:
        """The report (``--json``'s document; :func:`print_report` prints it)."""
        stats = [(slot, slot.provider.stats()) for slot in self.traffic.slots]
        gateway, server_reads, propagation_refused = _stack_counts(self._before, self._counters())
        ok, verdict = self._verdict(stats)
        return {
            "ok": ok,
            "verdict": verdict,
            **self._traffic_fields(stats, elapsed),
            **self._rotation_fields(propagation_refused),
            "errors": dict(self.ctx.metrics.errors.most_common(10)),
            "clients_detail": [_client_detail(slot, st) for slot, st in stats],
            "gateway_key_use": gateway,
            "vault_get_secret_server": server_reads,
            "timeline": list(self.ctx.timeline),
        }

    def _verdict(self, stats: list[tuple[ClientSlot, Any]]) -> tuple[bool, str]:
        """Whether the drill passed, and the verdict line that says why (not)."""
        metrics, records, aborted = self.ctx.metrics, self.rotations.records, self.schedule.aborted
        converged = all(r.convergence_s is not None for r in records)
        vault_live = all(r.vault_latest_live for r in records)
        revoked = not self.schedule.revoke or any(r.revocation is not None for r in records)
        failed = metrics.failed
        if (
            failed == 0
            and converged
            and vault_live
            and len(records) >= 2
            and metrics.requests > 0
            and revoked
        ):
            recovered = sum(st.resends_401 for _, st in stats)
            return True, (
                f"PASS: {metrics.requests} requests, 0 failed across {len(records)} rotations "
                f"({recovered} refused requests re-sent after a refresh); every client converged"
            )
        why = []
        if failed:
            why.append(f"{failed} of {metrics.requests} requests failed")
        if not converged:
            why.append("not every client reached the last version")
        if aborted:
            why.append(f"rotations stopped because the traffic was failing ({aborted})")
        if len(records) < 2:
            why.append("fewer than 2 rotations")
        if not vault_live:
            why.append("the vault's latest version was not live after every rotation")
        if not revoked:
            why.append("the revocation did not run")
        return False, "FAIL: " + "; ".join(why or ["no traffic"])

    def _traffic_fields(self, stats: list[tuple[ClientSlot, Any]], elapsed: float) -> dict[str, Any]:
        """The report's fields from the target to the policy: refreshes, refusals, requests, latency."""
        from ..._refusal import refusal_stats

        metrics, plan, policy = self.ctx.metrics, self.traffic.plan, self.traffic.policy
        refusals = [refusal_stats(s.provider) for s, _ in stats]
        return {
            "target": self.ctx.target.label,
            "token_scope": self.token_scope,
            "key_refreshes": sum(st.refreshes for _, st in stats),
            "token_refreshes": sum(r.token_refreshes for r in refusals),
            "refusals": {  # gateway refusals by kind
                kind: sum(getattr(r, kind) for r in refusals)
                for kind in ("key", "token", "quota", "rate", "backend", "other")
            },
            "requests": metrics.requests,
            "failed": metrics.failed,
            "recovered_401": sum(st.resends_401 for _, st in stats),
            "vault_reads": sum(st.vault_reads for _, st in stats),
            "rotations": len(self.rotations.records),
            "rotations_stopped": self.schedule.aborted,
            "convergence_s": [r.convergence_s for r in self.rotations.records],
            "latency_ms": metrics.percentiles(),
            "duration_s": plan.duration,
            "elapsed_s": round(elapsed, 2),
            "requests_per_s": round(metrics.requests / elapsed, 1) if elapsed else 0.0,
            "streaming_requests": metrics.streaming,
            "concurrency": {"threads": plan.threads, "asyncio_tasks": plan.asyncio_tasks},
            "clients": len(self.traffic.slots),
            "policy": {
                "ttl_s": policy.ttl,
                "jitter": policy.jitter,
                "refresh_margin_s": policy.margin,
                "max_staleness_s": policy.max_staleness,
                "forced_refresh_interval_s": policy.forced_refresh_interval,
            },
        }

    def _rotation_fields(self, propagation_refused: int | None) -> dict[str, Any]:
        """The report's fields from the rotation log to the chaos: who rotated how, and with what."""
        rotations, records = self.rotations, self.rotations.records
        revocations = [r.revocation for r in records if r.revocation is not None]
        config, settings = rotations.config, rotations.propagation.settings
        chaos = self.traffic.plan.chaos
        return {
            "rotation_log": [dataclasses.asdict(r) for r in records],
            "rotator": rotations.rotator,
            "delivery": rotations.delivery.describe() if rotations.delivery is not None else None,
            "gateway_urls": list(self.ctx.target.client_urls),
            "probe_rule": {"successes": config.probe_successes, "interval_s": config.probe_interval}
            if config is not None
            else None,
            "revocation": revocations[0] if revocations else None,
            "propagation": {
                "units_s": settings,
                "random": chaos and bool(settings),
                "measured_s": [r.propagation_s for r in records],
                "refused_probes": propagation_refused,
            },
            "vault_latest_live": [r.vault_latest_live for r in records],
            "overlapped_deliveries": sum(1 for r in records if r.overlapped),
            "chaos": self.schedule.chaos_log if chaos else None,
        }


def _stack_counts(
    before: dict[str, Any] | None, after: dict[str, Any] | None
) -> tuple[dict[str, int] | None, int | None, int | None]:
    """What a local stack counted during the drill: the gateway's key use by label, Key Vault's GetSecret
    calls, and the probes refused while gateway units synced (``None`` each without a local stack)."""
    if before is None or after is None:
        return None, None, None

    def delta(name: str) -> int:
        return int(after["labels"].get(name, 0)) - int(before["labels"].get(name, 0))

    labels = {k.split(":", 1)[1]: delta(k) for k in after["labels"] if k.startswith("key:")}
    # Refusals of a key a gateway unit had not synced yet: the rotation's own probes (clients only ever get
    # a key from the vault once every unit accepts it). Not a client's 401.
    propagation_refused = delta("propagation-refused")
    if labels.get("invalid"):
        labels["invalid"] -= propagation_refused
    gateway = {k: v for k, v in labels.items() if v}
    return gateway, after["GetSecret"] - before["GetSecret"], propagation_refused


def _client_detail(slot: ClientSlot, st: Any) -> dict[str, Any]:
    return {
        "client": slot.name,
        "kind": slot.kind,
        "gateway_url": slot.gateway_url,
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


def print_report(out: Output, report: dict[str, Any]) -> None:
    """The report as text: the set-up the drill ran (identity, roles, delivery, gateway, traffic), then what
    happened (requests, rotations, revocation, latency) and the verdict."""
    out.line("")
    _print_setup(out, report)
    _print_outcome(out, report)


def _print_setup(out: Output, report: dict[str, Any]) -> None:
    out.line(f"target            {report['target']}")
    rotator = report["rotator"] or {}
    out.line(f"rotator           {rotator.get('identity', '?')}")
    roles = rotator.get("roles")
    held = (
        ", ".join(f"{r['role']} on {r['scope']}" for r in roles) if roles else "not known (not a local stack)"
    )
    out.line(f"roles             {held}")
    only = rotator.get("only_roles_file_roles")
    out.line(
        f"roles file        {rotator.get('roles_file')}: {', '.join(rotator.get('roles_file_roles', []))}"
        + (
            ""
            if only is None
            else ("; the rotator holds only these" if only else "; the rotator holds OTHERS")
        )
    )
    delivery = report["delivery"]
    if delivery is not None:
        out.line(f"delivery          {delivery['path']}")
        out.line(
            f"                  queue {delivery['queue']} ({delivery['why']}); lease: {delivery['lease']}"
        )
    urls = report["gateway_urls"]
    probe = report["probe_rule"]
    out.line(
        f"gateway           {len(urls)} URL{'s' if len(urls) != 1 else ''} ({', '.join(urls)})"
        + (
            f"; a new key counts as live after {probe['successes']} consecutive accepted probes per URL, "
            f"{probe['interval_s']:g}s apart"
            if probe
            else ""
        )
    )
    out.line(
        f"policy            ttl {report['policy']['ttl_s']:.0f}s (jitter {report['policy']['jitter']:.0%}), "
        f"refresh margin {report['policy']['refresh_margin_s']:.1f}s, max staleness "
        f"{report['policy']['max_staleness_s']:.0f}s"
    )
    out.line(
        f"traffic           {report['concurrency']['threads']} threads + "
        f"{report['concurrency']['asyncio_tasks']} "
        f"asyncio tasks over {report['clients']} clients, {report['duration_s']:g}s "
        f"(ran {report['elapsed_s']:.1f}s, until every client held the last version)"
    )


def _print_outcome(out: Output, report: dict[str, Any]) -> None:
    lat = report["latency_ms"]
    out.line(
        f"requests          {report['requests']} ({report['streaming_requests']} streaming), "
        f"{report['requests_per_s']:.0f}/s"
    )
    out.line(f"failed            {report['failed']}")
    out.line(f"recovered_401     {report['recovered_401']} (re-sent once after a coalesced refresh)")
    out.line(
        f"refreshes         key {report['key_refreshes']}, token {report['token_refreshes']}"
        + (f" (key plus token for {report['token_scope']})" if report["token_scope"] else " (key only)")
    )
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
        via = counts_text(r["converged_via"])
        out.line(
            f"rotation {r['index']}        began t={r['started_s']:.1f}s, stored t={r['at_s']:.1f}s: "
            f"regenerated {r['regenerated']}, version {r['new_version'][:8]} (fp {r['fingerprint']}); "
            f"converged in {conv} ({via})"
        )
        live = "live" if r["vault_latest_live"] else "NOT LIVE"
        out.line(
            f"                  gateway propagation {r['propagation_s'] or 0:.1f}s; vault latest "
            f"version {live}" + ("; overlapped a duplicate delivery" if r["overlapped"] else "")
        )
    revocation = report["revocation"]
    if revocation is not None:
        out.line(
            f"revocation        leaked {revocation['revoked_slot']} key "
            f"(fp {revocation['revoked_fingerprint']}) "
            f"died {revocation['dead_after_s']:.1f}s after its regeneration (drill t="
            f"{revocation['dead_at_drill_s']:.1f}s, {revocation['dead_at']}), after a "
            f"{revocation['fleet_wait_s']:.1f}s fleet wait"
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
