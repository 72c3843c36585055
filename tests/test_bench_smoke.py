"""Smoke test: every benchmark starts and returns a sane shape in a tiny configuration (no timings asserted).

Uses the session's local stack (``local_azure``; its CA is already trusted by conftest) for the behaviour
figures, a child-process stack for the throughput figures, and a small fleet for the simulation.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

from apimvault import CachePolicy
from apimvault.local import LocalAzure, temporary_environ

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import figures
from bench._stack import RemoteStack, reuse_ca
from bench.contenders import APIMVAULT, CONTENDERS, PER_REQUEST, STATIC, TTL_COND, Contender
from bench.fleet import FleetConfig, simulate
from bench.throughput import async_contender_throughput, contender_throughput


@pytest.fixture
def lab(local_azure: LocalAzure) -> figures.Lab:
    for service in local_azure.services.values():
        service.faults.clear()
    return figures.Lab(local_azure)


@pytest.mark.parametrize("contender", CONTENDERS, ids=lambda c: c.key)
def test_behaviour_figures_start(lab: figures.Lab, contender: Contender) -> None:
    c = contender
    assert figures.cold_start(lab, c, threads=4, latency=0.0) >= 1
    blocked = figures.blocked(lab, c, expiries=1, callers=2, steps_per_ttl=1, latency=0.0)
    assert blocked.calls == 2
    assert figures.outage(lab, c, callers=1, step=20.0).total == 3
    assert figures.rotation(lab, c, threads=1, before=0.05, after=0.05).total >= 1
    assert figures.hit_cost(lab, c, batches=3, batch=20) > 0
    assert figures.client_overhead(lab, c, batches=3, batch=5) > 0


@pytest.mark.parametrize("contender", [STATIC, PER_REQUEST, APIMVAULT], ids=lambda c: c.key)
def test_async_figures_start(lab: figures.Lab, contender: Contender) -> None:
    c = contender
    assert figures.cold_start_async(lab, c, tasks=4, latency=0.0) >= 1
    blk = figures.blocked_async(lab, c, expiries=1, callers=2, steps_per_ttl=1, latency=0.0)
    assert blk.calls == 2
    assert figures.outage_async(lab, c, callers=1, step=20.0).total == 3
    assert figures.rotation_async(lab, c, tasks=1, before=0.05, after=0.05).total >= 1
    assert figures.hit_cost_async(lab, c, batches=3, batch=20) > 0
    assert figures.client_overhead_async(lab, c, batches=3, batch=5) > 0


def test_apimvault_behaviour_in_tiny_figures(lab: figures.Lab) -> None:
    assert figures.cold_start(lab, APIMVAULT, threads=8, latency=0.01) == 1
    assert figures.outage(lab, APIMVAULT, callers=2, step=10.0).bad == 0


def test_import_time_runs() -> None:
    own, deps = figures.import_time_ms(runs=1)
    assert own >= 0 and deps > 0


def test_throughput_starts() -> None:
    ca = reuse_ca(Path(os.environ["SSL_CERT_FILE"]).parent)
    with RemoteStack(ca) as stack, temporary_environ(dict(stack.environ)):
        tp = contender_throughput(stack.environ, [STATIC, TTL_COND, APIMVAULT], rounds=1, seconds=0.1)
        assert set(tp.ratios) == {"static", "ttl-cond", "apimvault"}
        assert tp.ratios["static"] == [1.0]
        atp = async_contender_throughput(stack.environ, rounds=1, seconds=0.1, contenders=(STATIC, APIMVAULT))
        assert set(atp.ratios) == {"static", "apimvault"}


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
