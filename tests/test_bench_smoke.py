"""Smoke tests of bench/: every benchmark starts, returns a sane shape in a tiny configuration, and its
counting is right (no timings, rates or scheduling-dependent counts asserted).

Uses the session's local stack (``local_azure``; its CA is already trusted by conftest) for the behaviour
figures, a child-process stack for the throughput figures, and a small fleet for the simulation.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from apimvault import CachePolicy
from apimvault.local import LocalAzure, temporary_environ

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import figures, realclock
from bench._stack import RemoteStack, reuse_ca
from bench.contenders import (
    APIMVAULT,
    AWS,
    CONTENDERS,
    PER_REQUEST,
    STATIC,
    TTL_COND,
    TTL_LOCK,
    Contender,
    KeyVaultForSecretCache,
    ReadLog,
    key_source,
    secret_client,
)
from bench.fleet import FleetConfig, simulate
from bench.throughput import _pairs, async_contender_throughput, contender_throughput


@pytest.fixture
def lab(local_azure: LocalAzure) -> figures.Lab:
    for service in local_azure.services.values():
        service.faults.clear()
    return figures.Lab(local_azure)


def _expected_cold_reads(c: Contender, threads: int) -> tuple[int, int]:
    """(min, max) vault reads for ``threads`` simultaneous first callers."""
    if c is PER_REQUEST:
        return threads, threads  # one read per call
    if c is TTL_LOCK:
        return 1, threads  # no single-flight: between one and one per caller, depending on timing
    return 1, 1  # static (its start-up read), ttl-cond, aws (lock held through the read), apimvault


@pytest.mark.parametrize("contender", CONTENDERS, ids=lambda c: c.key)
def test_behaviour_figures_start(lab: figures.Lab, contender: Contender) -> None:
    c = contender
    low, high = _expected_cold_reads(c, 4)
    assert low <= figures.cold_start(lab, c, threads=4, latency=0.0) <= high
    assert figures.rotation(lab, c, threads=1, before=0.05, after=0.05).total >= 1
    assert figures.hit_cost(lab, c, batches=3, batch=20) > 0
    assert figures.client_overhead(lab, c, batches=3, batch=5) > 0


@pytest.mark.parametrize("contender", [STATIC, PER_REQUEST, APIMVAULT], ids=lambda c: c.key)
def test_async_figures_start(lab: figures.Lab, contender: Contender) -> None:
    c = contender
    expected = 4 if c is PER_REQUEST else 1
    assert figures.cold_start_async(lab, c, tasks=4, latency=0.0) == expected
    assert figures.rotation_async(lab, c, tasks=1, before=0.05, after=0.05).total >= 1
    assert figures.hit_cost_async(lab, c, batches=3, batch=20) > 0
    assert figures.client_overhead_async(lab, c, batches=3, batch=5) > 0


def test_aws_adapter_serves_secret_cache_from_key_vault(lab: figures.Lab) -> None:
    """The adapter answers SecretCache's two boto calls with one vault read per refresh, and reads a
    version it did not just read; the ReadLog counts only its own secret's reads, failures included."""
    target = lab.target()
    vault = lab.azure.keyvault
    reads = ReadLog(target.secret_name)
    source = key_source(AWS, target, reads=reads)
    try:
        assert reads.snapshot() == []  # the warm-up read of another secret is not counted
        first = source.get()
        assert [status for _, status in reads.snapshot()] == [200]  # describe + value = one read
        assert source.get() == first
        assert len(reads.snapshot()) == 1  # cached
    finally:
        source.close()

    reads = ReadLog(target.secret_name)
    client, credential = secret_client(target, reads)  # one SDK retry, warmed on another secret
    try:
        version = client.get_secret(target.secret_name).properties.version
        assert version is not None
        adapter = KeyVaultForSecretCache(client)
        reply = adapter.get_secret_value(SecretId=target.secret_name, VersionId=version)
        assert reply["SecretString"] == first and reply["VersionId"] == version
        assert len(reads.snapshot()) == 2  # not just read by describe_secret: read by version
        vault.faults.inject("status", operation="GetSecret", status=503, times=2)  # the try and its retry
        with pytest.raises(Exception):  # noqa: B017 - whatever the SDK raises, SecretCache catches it
            adapter.describe_secret(SecretId=target.secret_name)
        assert [status for _, status in reads.snapshot()][2:] == [503, 503]
    finally:
        vault.faults.clear()
        client.close()
        credential.close()


# The real-clock figures at a tiny scale; what is asserted holds however slow the machine is.
TINY = realclock.Scale(
    ttl=0.5,
    margin=0.1,
    staleness=60.0,  # far longer than the outage: apimvault must serve through it
    latency=0.05,
    outage_at=0.1,
    outage=0.6,
    recovery_max=5.0,
    settle=0.3,
)


@pytest.mark.slow
def test_real_clock_figures_start(lab: figures.Lab) -> None:
    sync = [STATIC, PER_REQUEST, AWS, APIMVAULT]
    exp = realclock.expiry(lab, sync, [APIMVAULT], expiries=1, callers=2, scale=TINY)
    assert [e.label for e in exp] == [c.label for c in sync] + [APIMVAULT.label + " (async)"]
    by = {e.label: e for e in exp}
    assert all(e.calls > 0 for e in exp)
    assert by[STATIC.label].reads == 0  # read once at start-up, before the run
    assert by[PER_REQUEST.label].reads > 0
    assert by[PER_REQUEST.label].blocked <= by[PER_REQUEST.label].calls

    out = realclock.outage(lab, sync, [APIMVAULT], callers=2, scale=TINY)
    ob = {o.label: o for o in out}
    assert ob[STATIC.label].failed == 0 and ob[STATIC.label].reread is None  # never reads again
    assert ob[AWS.label].failed == 0  # serves its last value through any outage
    assert ob[APIMVAULT.label].failed == 0  # inside max_staleness
    assert ob[APIMVAULT.label + " (async)"].failed == 0
    assert ob[PER_REQUEST.label].failed > 0  # every call during the outage reads and fails
    assert ob[PER_REQUEST.label].first_failure is not None
    assert ob[PER_REQUEST.label].reread is not None  # and it read successfully once the vault was back
    assert not lab.azure.keyvault.faults.active  # the figures leave no fault behind


def test_interleaved_pairs_order_and_ratios() -> None:
    """The pairing itself, with a fake run: who runs when, and which numbers make each ratio."""
    order: list[str] = []
    rate = {"static": 100.0, "a": 50.0, "b": 200.0}
    cpu = {"static": 2.0, "a": 4.0, "b": 1.0}  # CPU seconds per 100 requests' run

    def run(key: str) -> tuple[int, float, float]:
        order.append(key)
        return int(rate[key]), 1.0, cpu[key]

    tp = _pairs(["static", "a", "b"], run, rounds=2, baseline="static")
    # round 0: baseline first, pairs in list order; round 1: contender first, pairs rotated
    assert order == ["static", "a", "static", "b", "b", "static", "a", "static"]
    assert tp.ratios == {"static": [1.0] * 4, "a": [0.5, 0.5], "b": [2.0, 2.0]}
    assert tp.cpu_ratios["a"] == [4.0, 4.0] and tp.cpu_ratios["b"] == [0.25, 0.25]
    assert tp.median_ratio("b") == 2.0 and tp.ratio_iqr("b") == (2.0, 2.0)
    assert tp.median_cpu("static") == pytest.approx(2.0 / 100 * 1e6)


def test_import_time_counts_only_apimvault() -> None:
    times = figures.import_time_ms(runs=1)
    assert "apimvault" in times.own_modules and "apimvault._sync" not in times.own_modules  # lazy
    assert all(m == "apimvault" or m.startswith("apimvault.") for m in times.own_modules)
    assert times.own > 0 and times.deps > 0


@pytest.mark.slow  # a child-process stack: several seconds on a loaded machine
def test_throughput_starts() -> None:
    ca = reuse_ca(Path(os.environ["SSL_CERT_FILE"]).parent)
    with RemoteStack(ca) as stack, temporary_environ(dict(stack.environ)):
        tp = contender_throughput(stack.environ, [STATIC, TTL_COND, APIMVAULT], rounds=1, seconds=0.1)
        assert set(tp.ratios) == {"static", "ttl-cond", "apimvault"}
        assert tp.ratios["static"] == [1.0, 1.0]  # once per pair
        assert len(tp.ratios["apimvault"]) == 1 and tp.ratios["apimvault"][0] > 0
        assert len(tp.rates["static"]) == 2 and len(tp.cpu_us["apimvault"]) == 1
        atp = async_contender_throughput(stack.environ, rounds=1, seconds=0.1, contenders=(STATIC, APIMVAULT))
        assert set(atp.ratios) == {"static", "apimvault"}
        assert len(atp.cpu_ratios["apimvault"]) == 1


def test_fleet_simulation_starts() -> None:
    config = FleetConfig(
        processes=50, day=3 * 3600, rotation_at=3600, revoke_after=600, storm_at=7200, limit=20, push=True
    )
    result = simulate(config)
    assert result.reads > 50
    assert result.peak["day"] >= 1
    assert result.rotation_converged_s == result.rotation_converged_s  # converged (not NaN)
    quiet = simulate(dataclasses.replace(config, policy=CachePolicy(jitter=0.0), push=False))
    assert quiet.reads > 0


def _fake_results(
    *, apimvault_blocked: int, apimvault_recovery: float, apimvault_first_failure: float
) -> Any:
    """A Results built from made-up figures (no benchmark run), to check the report and its targets."""
    from bench import run
    from bench.fleet import FleetResult
    from bench.report import machine
    from bench.throughput import StackThroughput

    sizes = run.QUICK
    fleet = [
        (name, FleetResult(config, {"start": 9, "steady": 5}, 0, 100, {}, 1.0, 2.0, 3.0, 10))
        for name, config in run.fleet_configs(sizes)
    ]
    sync_rows: list[run.Row] = []
    async_rows: list[run.Row] = []
    expiry, outage = [], []
    for c, is_async in [(c, False) for c in CONTENDERS] + [(c, True) for c in CONTENDERS if c.has_async]:
        label = c.label + (" (async)" if is_async else "")
        row = run.Row(label, raw={"cold": 1, "rotation": figures.Ratio(0, 10), "hit": 0.1, "overhead": 500.0})
        (async_rows if is_async else sync_rows).append(row)
        mine = c is APIMVAULT
        expiry.append(realclock.ExpiryLane(label, apimvault_blocked if mine else 7, 100, 2.0, 5, 11.0, 2.0))
        outage.append(
            realclock.OutageLane(
                label, 3, 50, apimvault_first_failure if mine else 1.0, 3.5, 4.0, apimvault_recovery, 0.1, 5.0
            )
        )

    def tp(keys: list[str]) -> Any:
        return _pairs(keys, lambda key: (100, 1.0, 0.1), rounds=3, baseline="static")

    return run.Results(
        sizes,
        True,
        machine(),
        fleet,
        sync_rows,
        async_rows,
        expiry,
        outage,
        0.1,
        (5.0, 500.0),
        StackThroughput(600.0, 1000.0, 600.0, 1000.0, 4, 8),
        tp([c.key for c in CONTENDERS]),
        tp([c.key for c in CONTENDERS if c.has_async]),
    )


@pytest.mark.parametrize(
    ("blocked", "recovery", "first_failure", "failing"),
    [
        (0, 0.5, 3.6, set()),
        (2, 3.0, 3.6, {"blocked", "recover"}),
        (0, 0.5, 2.0, {"hard limit"}),  # failed before TTL + max_staleness had passed
    ],
)
def test_report_renders_and_targets_follow_the_figures(
    blocked: int, recovery: float, first_failure: float, failing: set[str]
) -> None:
    from bench import notes, run

    r = _fake_results(
        apimvault_blocked=blocked, apimvault_recovery=recovery, apimvault_first_failure=first_failure
    )
    for row, c in zip(r.sync_rows, CONTENDERS, strict=True):
        run._fill_tp(row, c, r.sync_tp)
    text = notes.render(r)
    for heading in ("## Contenders", "## Refresh at expiry and a vault outage", "## Targets", "## Fleet"):
        assert heading in text
    assert AWS.label in text and "KeyVaultForSecretCache" in text
    failed = {name for name, ok, _ in run.targets(r) if not ok}
    assert {w for w in ("blocked", "recover", "hard limit") if any(w in name for name in failed)} == failing
    assert ("❌" in text) == bool(failing)
