"""The drill's live display and its report (a dict for ``--json``, lines for a terminal)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .metrics import counts_text
from .state import DrillState

if TYPE_CHECKING:  # pragma: no cover
    from ..output import Output


class DrillReport(DrillState):
    """The live table while the drill runs, and the report at the end."""

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
        revocations = [r.revocation for r in self.rotations if r.revocation is not None]
        revoked = not self.revoke or bool(revocations)
        ok = (
            failed == 0
            and converged
            and vault_live
            and len(self.rotations) >= 2
            and self.metrics.requests > 0
            and revoked
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
            if self.aborted:
                why.append(f"rotations stopped because the traffic was failing ({self.aborted})")
            if len(self.rotations) < 2:
                why.append("fewer than 2 rotations")
            if not vault_live:
                why.append("the vault's latest version was not live after every rotation")
            if not revoked:
                why.append("the revocation did not run")
            verdict = "FAIL: " + "; ".join(why or ["no traffic"])
        from ..._refusal import refusal_stats

        refusals = [refusal_stats(s.provider) for s, _ in stats]
        return {
            "ok": ok,
            "verdict": verdict,
            "target": self.target.label,
            "token_scope": self.token_scope,
            "key_refreshes": sum(st.refreshes for _, st in stats),
            "token_refreshes": sum(r.token_refreshes for r in refusals),
            "refusals": {  # gateway refusals by kind
                kind: sum(getattr(r, kind) for r in refusals)
                for kind in ("key", "token", "quota", "rate", "backend", "other")
            },
            "requests": self.metrics.requests,
            "failed": failed,
            "recovered_401": recovered,
            "vault_reads": vault_reads,
            "rotations": len(self.rotations),
            "rotations_stopped": self.aborted,
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
                "ttl_s": self.policy.ttl,
                "jitter": self.policy.jitter,
                "refresh_margin_s": self.policy.margin,
                "max_staleness_s": self.policy.max_staleness,
                "forced_refresh_interval_s": self.policy.forced_refresh_interval,
            },
            "rotation_log": [dataclasses.asdict(r) for r in self.rotations],
            "rotator": self.rotator,
            "delivery": self.delivery.describe() if self.delivery is not None else None,
            "gateway_urls": list(self.target.client_urls),
            "probe_rule": {
                "successes": self._rotation_config.probe_successes,
                "interval_s": self._rotation_config.probe_interval,
            }
            if self._rotation_config is not None
            else None,
            "revocation": revocations[0] if revocations else None,
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
                for slot, st in stats
            ],
            "gateway_key_use": gateway,
            "vault_get_secret_server": server_reads,
            "timeline": list(self.timeline),
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
