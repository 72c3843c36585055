"""Runs every benchmark, prints the tables and writes ``BENCHMARKS.md``. Entry point: ``python -m bench``.

Import only after :func:`bench._stack.prepare_ca` (this module imports openai and azure).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apimvault import CachePolicy
from apimvault.local import LocalAzure, LocalCA

from . import figures, realclock
from ._stack import RemoteStack
from .contenders import APIMVAULT, CONTENDERS, STATIC, Contender
from .fleet import HOUR, FleetConfig, FleetResult, simulate
from .report import REPO, machine, text_table
from .throughput import StackThroughput, Throughput, async_contender_throughput, contender_throughput
from .throughput import stack_throughput as measure_stack


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each benchmark is (``--quick`` shrinks everything; the smoke test shrinks it further)."""

    cold_threads: int = 256
    cold_tasks: int = 1000
    expiries: int = 10
    callers: int = 8
    rotation_after: float = 1.0
    hit_batches: int = 50
    overhead_batches: int = 15
    import_runs: int = 5
    stack_seconds: float = 3.0
    rounds: int = 7
    round_seconds: float = 1.0
    fleet_processes: int = 10_000
    fleet_day: float = 24 * HOUR
    sweep_ttls: tuple[float, ...] = (60.0, 120.0, 300.0, 900.0)
    sweep_day: float = HOUR / 2


FULL = Sizes()
QUICK = Sizes(
    cold_threads=256,
    cold_tasks=1000,
    expiries=3,
    callers=4,
    rotation_after=0.5,
    hit_batches=10,
    overhead_batches=5,
    import_runs=2,
    stack_seconds=1.0,
    rounds=3,
    round_seconds=0.5,
    fleet_processes=1000,
    sweep_ttls=(60.0, 300.0),
    sweep_day=HOUR / 2,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- fleet


def fleet_configs(sizes: Sizes) -> list[tuple[str, FleetConfig]]:
    # A smaller fleet keeps the same pressure on the vault: the limit scales with the fleet.
    limit = max(1, round(4000 * sizes.fleet_processes / 10_000))
    base = FleetConfig(processes=sizes.fleet_processes, day=sizes.fleet_day, limit=limit)
    runs = []
    runs.append(("jitter 0, push off", dataclasses.replace(base, policy=CachePolicy(jitter=0.0))))
    runs.append(("jitter 0.2, push off", base))
    runs.append(("jitter 0.2, push on", dataclasses.replace(base, push=True)))
    # push whose refreshes are spread over 30 s (what an invalidate() with a random delay would give)
    runs.append(("jitter 0.2, push spread 30 s", dataclasses.replace(base, push=True, push_delay=30.0)))
    # apimvault rotate --revoke-current: new version pushed (spread 30 s), the leaked key revoked 60 s later
    runs.append(
        (
            "revoke-current: push spread 30 s, revoke after 60 s",
            dataclasses.replace(base, push=True, push_delay=30.0, revoke_wait=60.0),
        )
    )
    for ttl in sizes.sweep_ttls:
        runs.append(
            (
                f"sweep ttl {ttl:g}",
                dataclasses.replace(
                    base,
                    day=sizes.sweep_day,
                    rotation_at=sizes.sweep_day + 1,
                    storm_at=sizes.sweep_day + 2,
                    policy=CachePolicy(ttl=ttl),
                ),
            )
        )
    return runs


def run_fleet(sizes: Sizes, workers: int = 2) -> list[tuple[str, FleetResult]]:
    configs = fleet_configs(sizes)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        results = list(pool.map(simulate, [c for _, c in configs]))
    return [(name, r) for (name, _), r in zip(configs, results, strict=True)]


# ------------------------------------------------------------------------------------- behaviour


@dataclasses.dataclass
class Row:
    label: str
    cold: str = "—"
    rotation: str = "—"
    hit_us: str = "—"
    overhead_us: str = "—"
    ratio: str = "—"
    cpu_us: str = "—"
    imports: str = "—"
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)


def _timed(what: str, fn: Callable[..., Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    shown = result
    if isinstance(result, list):  # the real-clock figures: one line per contender
        shown = "".join(f"\n    {lane}" for lane in result)
    log(f"  {what}: {shown} ({time.perf_counter() - start:.1f}s)")
    return result


def behaviour(azure: LocalAzure, sizes: Sizes) -> tuple[list[Row], list[Row], float]:
    """The one-contender-at-a-time figures: cold start, rotation, hit cost, client overhead."""
    lab = figures.Lab(azure)
    sync_rows, async_rows = [], []
    for c in CONTENDERS:
        log(f"behaviour: {c.label}")
        row = Row(c.label)
        cold = _timed("cold start", lambda c=c: figures.cold_start(lab, c, sizes.cold_threads))
        rot = _timed("rotation", lambda c=c: figures.rotation(lab, c, after=sizes.rotation_after))
        hit = _timed("hit µs", lambda c=c: figures.hit_cost(lab, c, batches=sizes.hit_batches))
        ovh = _timed(
            "client µs (mock transport)",
            lambda c=c: figures.client_overhead(lab, c, batches=sizes.overhead_batches),
        )
        row.cold, row.rotation = f"{cold} ({sizes.cold_threads} threads)", str(rot)
        row.hit_us, row.overhead_us = _us(hit), _us(ovh)
        row.raw = {"cold": cold, "rotation": rot, "hit": hit, "overhead": ovh}
        sync_rows.append(row)
        if c.has_async:
            log(f"behaviour (asyncio): {c.label}")
            arow = Row(c.label + " (async)")
            cold = _timed("cold start", lambda c=c: figures.cold_start_async(lab, c, sizes.cold_tasks))
            rot = _timed("rotation", lambda c=c: figures.rotation_async(lab, c, after=sizes.rotation_after))
            hit = _timed("hit µs", lambda c=c: figures.hit_cost_async(lab, c, batches=sizes.hit_batches))
            ovh = _timed(
                "client µs (mock transport)",
                lambda c=c: figures.client_overhead_async(lab, c, batches=sizes.overhead_batches),
            )
            arow.cold, arow.rotation = f"{cold} ({sizes.cold_tasks} tasks)", str(rot)
            arow.hit_us, arow.overhead_us = _us(hit), _us(ovh)
            arow.raw = {"cold": cold, "rotation": rot, "hit": hit, "overhead": ovh}
            async_rows.append(arow)
    get_key = _timed("apimvault get_key() µs", lambda: figures.get_key_cost(lab, batches=sizes.hit_batches))
    return sync_rows, async_rows, get_key


def real_clock(
    azure: LocalAzure, sizes: Sizes
) -> tuple[list[realclock.ExpiryLane], list[realclock.OutageLane]]:
    """The all-contenders-at-once figures on the real clock (:mod:`bench.realclock`)."""
    lab = figures.Lab(azure)
    sync = list(CONTENDERS)
    asynchronous = [c for c in CONTENDERS if c.has_async]
    log(f"expiry, real clock ({sizes.expiries} expiries, every contender at once) ...")
    exp = _timed(
        "expiry",
        lambda: realclock.expiry(lab, sync, asynchronous, expiries=sizes.expiries, callers=sizes.callers),
    )
    log("vault outage longer than max_staleness, real clock ...")
    out = _timed("outage", lambda: realclock.outage(lab, sync, asynchronous, callers=sizes.callers))
    return exp, out


def _us(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:,.0f}"


# ------------------------------------------------------------------------------------------ main


@dataclasses.dataclass
class Results:
    sizes: Sizes
    quick: bool
    machine: dict[str, str]
    fleet: list[tuple[str, FleetResult]]
    sync_rows: list[Row]
    async_rows: list[Row]
    expiry: list[realclock.ExpiryLane]
    outage: list[realclock.OutageLane]
    get_key_us: float
    imports: tuple[float, float]
    stack: StackThroughput
    sync_tp: Throughput
    async_tp: Throughput
    elapsed: float = 0.0


def run(ca: LocalCA, *, quick: bool = False, sizes: Sizes | None = None, fleet_workers: int = 2) -> Results:
    sizes = sizes or (QUICK if quick else FULL)
    logging.getLogger("apimvault").setLevel(logging.ERROR)  # refresh failures are expected in the outage
    logging.getLogger("azure").setLevel(logging.ERROR)
    started = time.perf_counter()
    info = machine()

    log(f"fleet simulation ({sizes.fleet_processes} processes) ...")
    fleet = run_fleet(sizes, fleet_workers)
    log(f"fleet done ({time.perf_counter() - started:.0f}s)")

    with LocalAzure(ca=ca) as azure, azure.env():
        sync_rows, async_rows, get_key = behaviour(azure, sizes)
        expiry, outage = real_clock(azure, sizes)
    imports = _timed("import ms (own, deps)", lambda: figures.import_time_ms(sizes.import_runs))

    with RemoteStack(ca) as stack:
        saved = dict(os.environ)
        os.environ.update(stack.environ)
        try:
            log("stack throughput ...")
            st = _timed("stack", lambda: measure_stack(stack.environ, sizes.stack_seconds))
            log("contender throughput (sync, interleaved pairs) ...")
            sync_tp = contender_throughput(
                stack.environ, list(CONTENDERS), rounds=sizes.rounds, seconds=sizes.round_seconds
            )
            log("contender throughput (async, interleaved pairs) ...")
            async_tp = async_contender_throughput(
                stack.environ, rounds=sizes.rounds, seconds=sizes.round_seconds
            )
        finally:
            os.environ.clear()
            os.environ.update(saved)

    for row, c in zip(sync_rows, CONTENDERS, strict=True):
        _fill_tp(row, c, sync_tp)
    for row, c in zip(async_rows, [c for c in CONTENDERS if c.has_async], strict=True):
        _fill_tp(row, c, async_tp)
    sync_rows[-1].imports = async_rows[-1].imports = f"{imports[0]:.1f}"
    for row in sync_rows[:-1] + async_rows[:-1]:
        row.imports = "0 (deps only)"
    results = Results(
        sizes,
        quick,
        info,
        fleet,
        sync_rows,
        async_rows,
        expiry,
        outage,
        get_key,
        imports,
        st,
        sync_tp,
        async_tp,
    )
    results.elapsed = time.perf_counter() - started
    return results


def _fill_tp(row: Row, c: Contender, tp: Throughput) -> None:
    if c.key not in tp.rates:
        return
    if c.key == STATIC.key:
        row.ratio = f"1 ({tp.median_rate(c.key):.0f}/s)"
    else:
        q1, q3 = tp.ratio_iqr(c.key)
        row.ratio = f"{tp.median_ratio(c.key):.3f}x [{q1:.3f}..{q3:.3f}] ({tp.median_rate(c.key):.0f}/s)"
    q1, q3 = tp.cpu_iqr(c.key)
    row.cpu_us = f"{tp.median_cpu(c.key):,.0f} [{q1:,.0f}..{q3:,.0f}]"
    row.raw["ratio"] = tp.median_ratio(c.key)


# --------------------------------------------------------------------------------------- output

HEADER = [
    "contender",
    "cold-start vault reads",
    "failed / requests, rotation + revocation",
    "cache hit µs (median)",
    "client µs/request (mock transport)",
    "chat throughput vs 1, median [IQR] of pairs (c=32)",
    "client CPU µs/request, median [IQR] (c=32)",
    "import ms beyond deps",
]


def header(r: Results) -> list[str]:
    return list(HEADER)


def contender_rows(r: Results) -> list[list[str]]:
    rows = []
    for row in [*r.sync_rows, *r.async_rows]:
        rows.append(
            [
                row.label,
                row.cold,
                row.rotation,
                row.hit_us,
                row.overhead_us,
                row.ratio,
                row.cpu_us,
                row.imports,
            ]
        )
    return rows


S = realclock.SCALE

REAL_HEADER = [
    "contender",
    "blocked > 100 ms / calls, ≥ {expiries} expiries",
    "slowest call ms",
    "vault reads (per TTL)",
    "failed / calls, {outage:g} s outage",
    "first failure, s into outage",
    "failing for, s",
    "last failure after vault back, s",
    "first good read after vault back, s",
]


def real_header(r: Results) -> list[str]:
    return [h.format(expiries=r.sizes.expiries, outage=S.outage) for h in REAL_HEADER]


def _opt(value: float | None, fmt: str = "{:.2f}", none: str = "never") -> str:
    return none if value is None else fmt.format(value)


def real_rows(r: Results) -> list[list[str]]:
    rows = []
    for e, o in zip(r.expiry, r.outage, strict=True):
        rows.append(
            [
                e.label,
                f"{e.blocked} / {e.calls}",
                f"{e.worst_ms:.2f}" if e.worst_ms < 10 else f"{e.worst_ms:,.0f}",
                f"{e.reads} ({e.reads_per_ttl:.2f})",
                f"{o.failed} / {o.calls}",
                _opt(o.first_failure),
                f"{o.failing:.2f}" if o.failed else "0",
                f"{o.recovery:.2f}" if o.failed else "—",
                _opt(o.reread, none="no read"),
            ]
        )
    return rows


def _lane(lanes: list[Any], label: str) -> Any:
    return next(lane for lane in lanes if lane.label == label)


def apimvault_lanes(r: Results) -> tuple[Any, Any, Any, Any]:
    """apimvault's (expiry sync, expiry async, outage sync, outage async) rows."""
    sync, asyn = APIMVAULT.label, APIMVAULT.label + " (async)"
    return _lane(r.expiry, sync), _lane(r.expiry, asyn), _lane(r.outage, sync), _lane(r.outage, asyn)


def read_bound(lane: realclock.ExpiryLane) -> int:
    """The most reads refresh-ahead may make in the run: one per (TTL - margin), plus one in flight."""
    return math.floor(lane.seconds / (S.ttl - min(S.margin, S.ttl / 2))) + 1


def targets(r: Results) -> list[tuple[str, bool, str]]:
    sync = r.sync_rows[-1].raw
    asyn = r.async_rows[-1].raw
    exp_s, exp_a, out_s, out_a = apimvault_lanes(r)
    ratio_sync = r.sync_tp.median_ratio(APIMVAULT.key)
    ratio_async = r.async_tp.median_ratio(APIMVAULT.key)
    cold_ok = sync["cold"] == 1 and asyn["cold"] == 1
    blocked_ok = exp_s.blocked == 0 and exp_a.blocked == 0
    bound_ok = all(lane.reads <= read_bound(lane) for lane in (exp_s, exp_a))
    # a failing call may start a moment before the clock read that found the key past its hard limit
    held_ok = all(o.first_failure is None or o.first_failure >= o.hard_limit - 0.05 for o in (out_s, out_a))
    recovery_ok = out_s.recovery <= 2.0 and out_a.recovery <= 2.0
    rot_ok = sync["rotation"].bad == 0 and asyn["rotation"].bad == 0
    iqr_s, iqr_a = r.sync_tp.ratio_iqr(APIMVAULT.key), r.async_tp.ratio_iqr(APIMVAULT.key)
    return [
        ("1 vault read at cold start", cold_ok, f"sync {sync['cold']}, async {asyn['cold']}"),
        (
            f"0 callers blocked at expiry (real clock, ≥ {r.sizes.expiries} expiries, Key Vault "
            f"+{S.latency * 1000:.0f} ms)",
            blocked_ok,
            f"sync {exp_s.blocked} / {exp_s.calls} (slowest {exp_s.worst_ms:.1f} ms), "
            f"async {exp_a.blocked} / {exp_a.calls} (slowest {exp_a.worst_ms:.1f} ms)",
        ),
        (
            "refresh-ahead reads at most once per TTL - margin",
            bound_ok,
            f"sync {exp_s.reads}, async {exp_a.reads} reads in {exp_s.seconds:.1f} s "
            f"(bound {read_bound(exp_s)}; {exp_s.reads_per_ttl:.2f} and {exp_a.reads_per_ttl:.2f} per TTL)",
        ),
        (
            "outage: the key is served until its hard limit (TTL + max_staleness after the load)",
            held_ok,
            f"first failure at sync {_opt(out_s.first_failure)} s (limit {out_s.hard_limit:.2f} s), "
            f"async {_opt(out_a.first_failure)} s (limit {out_a.hard_limit:.2f} s) into the outage",
        ),
        (
            "outage: callers recover ≤ 2 s after Key Vault is back",
            recovery_ok,
            f"last failure sync {out_s.recovery:.2f} s, async {out_a.recovery:.2f} s after",
        ),
        ("0 failed in rotation", rot_ok, f"sync {sync['rotation']}, async {asyn['rotation']}"),
        (
            "throughput ≥ 0.97x static (c=32, median of interleaved pairs)",
            ratio_sync >= 0.97 and ratio_async >= 0.97,
            f"sync {ratio_sync:.3f}x [IQR {iqr_s[0]:.3f}..{iqr_s[1]:.3f}], "
            f"async {ratio_async:.3f}x [IQR {iqr_a[0]:.3f}..{iqr_a[1]:.3f}]",
        ),
        (
            "cache hit ≤ 2 µs (median)",
            sync["hit"] <= 2 and r.get_key_us <= 2,
            f"get() {sync['hit']:.3f} µs, get_key() {r.get_key_us:.3f} µs, async get() {asyn['hit']:.3f} µs",
        ),
        (
            "stack ≥ 500 secret GETs/s",
            r.stack.kv_threads >= 500,
            f"{r.stack.kv_threads:.0f}/s (one process, 32 threads)",
        ),
        (
            "stack ≥ 500 chat completions/s (c=32)",
            r.stack.chat_threads >= 500,
            f"{r.stack.chat_threads:.0f}/s (one process, 32 threads)",
        ),
    ]


def cpu_line(r: Results) -> str:
    """Client CPU per request, static vs apimvault, with its spread (sync and async)."""
    parts = []
    for name, tp in (("sync", r.sync_tp), ("async", r.async_tp)):
        s1, s3 = tp.cpu_iqr(STATIC.key)
        a1, a3 = tp.cpu_iqr(APIMVAULT.key)
        q1, q3 = tp.cpu_ratio_iqr(APIMVAULT.key)
        parts.append(
            f"{name}: static {tp.median_cpu(STATIC.key):,.0f} µs [{s1:,.0f}..{s3:,.0f}], apimvault "
            f"{tp.median_cpu(APIMVAULT.key):,.0f} µs [{a1:,.0f}..{a3:,.0f}], paired ratio "
            f"{tp.median_cpu_ratio(APIMVAULT.key):.3f} [{q1:.3f}..{q3:.3f}] over "
            f"{len(tp.cpu_ratios[APIMVAULT.key])} pairs"
        )
    return "; ".join(parts)


def stack_rows(r: Results) -> list[list[str]]:
    s = r.stack
    return [
        ["SecretClient.get_secret", f"{s.kv_threads:.0f}/s", f"{s.kv_procs:.0f}/s"],
        ["AzureOpenAI chat.completions.create", f"{s.chat_threads:.0f}/s", f"{s.chat_procs:.0f}/s"],
    ]


def _s(value: float) -> str:
    return "never" if math.isnan(value) else f"{value:.0f} s"


def fleet_rows(r: Results) -> list[list[str]]:
    rows = []
    for name, f in r.fleet:
        if name.startswith("sweep"):
            continue
        rows.append(
            [
                name,
                str(f.peak.get("start", 0)),
                str(f.peak.get("steady", 0)),
                str(f.peak.get("rotation", 0)),
                str(f.peak.get("storm", 0)),
                f"{f.throttled:,}",
                _s(f.rotation_converged_s),
                _s(f.storm_converged_s),
                f"{sum(f.failed.values()):,}",
            ]
        )
    return rows


def sweep_rows(r: Results) -> list[list[str]]:
    rows = []
    for name, f in r.fleet:
        if not name.startswith("sweep"):
            continue
        steady = f.peak.get("steady", 0)
        rate = f.reads / f.config.day * 10
        rows.append(
            [
                f"{f.config.policy.ttl:g} s",
                f"{rate:,.0f}",
                str(steady),
                f"{f.config.limit / max(rate, 1e-9):.1f}x",
            ]
        )
    return rows


FLEET_HEADER = [
    "configuration (ttl 300 s)",
    "peak/10 s start",
    "peak/10 s steady",
    "peak/10 s planned rotation",
    "peak/10 s 401 storm",
    "429s",
    "planned rotation converged",
    "401 storm converged",
    "failed requests",
]
SWEEP_HEADER = ["ttl (jitter 0.2)", "mean reads / 10 s", "peak / 10 s", "headroom to the vault limit"]
STACK_HEADER = ["operation (local stack, c=32)", "1 process x 32 threads", "4 processes x 8 threads"]


def print_tables(r: Results) -> None:
    print()
    print("Contenders (one run, same machine, same local stack)")
    print(text_table(header(r), contender_rows(r)))
    print()
    print(f"Client CPU per request (c=32, median [IQR]): {cpu_line(r)}")
    print()
    print("Refresh at expiry and a vault outage (real clock, every contender at once)")
    print(text_table(real_header(r), real_rows(r)))
    print()
    print("Targets")
    for name, ok, detail in targets(r):
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    print()
    print(text_table(STACK_HEADER, stack_rows(r)))
    print()
    print(f"Fleet simulation: {r.sizes.fleet_processes:,} processes, KeyCache, one day")
    print(text_table(FLEET_HEADER, fleet_rows(r)))
    print()
    print(text_table(SWEEP_HEADER, sweep_rows(r)))
    print()
    print(f"finished in {r.elapsed:.0f}s")


def write_markdown(r: Results, path: Path | None = None) -> Path:
    path = path or REPO / "BENCHMARKS.md"
    from .notes import render

    path.write_text(render(r), encoding="utf-8")
    return path


__all__ = ["FULL", "QUICK", "Results", "Sizes", "print_tables", "run", "write_markdown"]
