"""The drill's config and the numbers it derives (``apimvault.cli.drill.DrillConfig``/``DrillPlan``), its
shared context, and the public face's refusals: plain values, no stack."""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
from typing import Any

import pytest

from apimvault.cli.drill import DrillConfig, DrillDeclined, DrillPlan, run_drill
from apimvault.cli.drill.config import MIN_DURATION
from apimvault.cli.drill.context import DrillContext
from apimvault.cli.drill.metrics import ClientSlot, RotationRecord
from apimvault.cli.drill.report import DrillReport, _stack_counts
from apimvault.cli.drill.rotations import Rotations
from apimvault.cli.drill.schedule import Monitor, Schedule
from apimvault.cli.drill.target import Target
from apimvault.cli.drill.traffic import Traffic
from apimvault.cli.output import Output
from apimvault.cli.parser import build_parser
from apimvault.exceptions import ConfigurationError


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["drill", *argv])


def test_from_args_takes_every_drill_flag() -> None:
    args = _parse(
        "--duration", "7.5", "--concurrency", "6", "--clients", "3", "--chaos", "--propagation", "1.5",
        "--token-scope", "api://drill/.default", "--delivery", "memory", "--revoke",
        "--deployment", "gpt", "--client-id", "cid", "--yes",
    )  # fmt: skip
    assert DrillConfig.from_args(args) == DrillConfig(
        duration=7.5,
        concurrency=6,
        clients=3,
        chaos=True,
        propagation=1.5,
        token_scope="api://drill/.default",
        delivery="memory",
        revoke=True,
        deployment="gpt",
        client_id="cid",
        yes=True,
    )
    assert DrillConfig.from_args(_parse()) == DrillConfig()  # the parser's defaults are the config's


def test_the_config_is_frozen() -> None:
    config = DrillConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.duration = 5.0  # type: ignore[misc]


# (flag, text the parser refuses, field, value DrillConfig refuses): the same rule in both places.
REFUSED: list[tuple[str, str, str, Any]] = [
    ("--duration", "0", "duration", 0),
    ("--duration", "1.9", "duration", 1.9),
    ("--duration", "nan", "duration", math.nan),
    ("--duration", "inf", "duration", math.inf),
    ("--concurrency", "1", "concurrency", 1),
    ("--concurrency", "2.5", "concurrency", 2.5),
    ("--clients", "1", "clients", 1),
    ("--propagation", "-1", "propagation", -1.0),
    ("--propagation", "nan", "propagation", math.nan),
    ("--delivery", "queue", "delivery", "queue"),
]


@pytest.mark.parametrize(("flag", "text", "field", "value"), REFUSED, ids=lambda v: str(v))
def test_config_refuses_what_the_parser_refuses(flag: str, text: str, field: str, value: Any) -> None:
    with pytest.raises(SystemExit), contextlib_silence():
        _parse(flag, text)
    with pytest.raises(ConfigurationError, match=field) as refused:
        DrillConfig(**{field: value})
    assert isinstance(refused.value, ValueError)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("duration", "5"),
        ("duration", True),
        ("concurrency", True),
        ("clients", "4"),
        ("chaos", "yes"),
        ("revoke", 1),
        ("token_scope", 5),
        ("deployment", b"gpt"),
    ],
)
def test_config_refuses_values_of_the_wrong_type(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=field):
        DrillConfig(**{field: value})


def test_config_keeps_the_edges_the_parser_accepts() -> None:
    config = DrillConfig(duration=MIN_DURATION, concurrency=2, clients=2, propagation=0)
    assert config.duration == 2.0 and isinstance(config.duration, float)
    assert config.propagation == 0.0


def contextlib_silence() -> Any:
    """argparse prints its refusal on stderr: keep the test output clean."""
    import contextlib

    return contextlib.redirect_stderr(io.StringIO())


# ---------------------------------------------------------------------------- the plan


def test_plan_caps_clients_at_the_workers_and_splits_both_by_kind() -> None:
    plan = DrillConfig(concurrency=3, clients=8).plan(local=True)
    assert (plan.clients, plan.sync_clients, plan.async_clients) == (3, 2, 1)
    assert (plan.threads, plan.asyncio_tasks) == (2, 1)
    plan = DrillConfig(concurrency=16, clients=4).plan(local=False)
    assert (plan.clients, plan.sync_clients, plan.async_clients, plan.threads, plan.asyncio_tasks) == (
        4,
        2,
        2,
        8,
        8,
    )


def test_plan_propagation_defaults_to_2s_on_a_local_stack_and_is_off_elsewhere() -> None:
    assert DrillConfig().plan(local=True).propagation == 2.0
    assert DrillConfig(propagation=3.5).plan(local=True).propagation == 3.5
    assert DrillConfig(propagation=3.5).plan(local=False).propagation == 0.0


def test_ttl_without_propagation_is_the_larger_of_4s_and_0_6_d() -> None:
    assert DrillConfig(duration=20).plan(local=False).ttl == pytest.approx(12.0)
    assert DrillConfig(duration=5).plan(local=False).ttl == 4.0
    assert DrillConfig(duration=5, propagation=0).plan(local=True).ttl == 4.0


def test_ttl_with_propagation_outlasts_the_revocation_of_rotation_2() -> None:
    # D 20, S 2: revoked by max(4, 2 + 3 + 2.5) + 2 = 9.5 s; earliest refresh-ahead at 0.55 TTL = 13.5 s.
    plan = DrillConfig(duration=20).plan(local=True)
    assert plan.ttl == pytest.approx(13.5 / 0.55)
    # chaos draws up to 1.5 S: D 5, longest 3 s: revoked by max(1, 0.5 + 4.5 + 2.5) + 3 = 10.5 s.
    chaos = DrillConfig(duration=5, chaos=True).plan(local=True)
    assert chaos.ttl == pytest.approx(14.5 / 0.55)


def test_policy_is_the_ttl_with_a_quarter_of_it_as_margin() -> None:
    plan = DrillConfig(duration=40).plan(local=False)
    policy = plan.policy
    assert policy.ttl == pytest.approx(24.0)
    assert policy.margin == pytest.approx(6.0)
    assert policy.jitter == 0.2 and policy.forced_refresh_interval == 1.0
    assert policy.max_staleness == 80.0
    assert DrillConfig(duration=5).plan(local=False).policy.max_staleness == 60.0
    assert plan.rotation_gap == 2.0


def test_rotation_waits_are_set_only_on_a_local_stack() -> None:
    local = DrillConfig(propagation=4).plan(local=True)
    assert (local.propagation_timeout, local.revoke_wait) == (80.0, 2.0)
    assert DrillConfig().plan(local=True).propagation_timeout == 60.0
    remote = DrillConfig().plan(local=False)
    assert (remote.propagation_timeout, remote.revoke_wait) == (None, None)


def test_unit_delays_step_up_per_unit_or_draw_at_random_with_chaos() -> None:
    units = ["unit-1", "unit-2", "unit-3"]
    assert DrillConfig(propagation=3).plan(local=True).unit_delays(units) == {
        "unit-1": 1.0,
        "unit-2": 2.0,
        "unit-3": 3.0,
    }
    chaos = DrillConfig(propagation=2, chaos=True).plan(local=True)
    assert chaos.unit_delays(units) == dict.fromkeys(units, (0.5, 3.0))
    off = DrillConfig(propagation=0, chaos=True).plan(local=True)
    assert off.unit_delays(units) == dict.fromkeys(units, 0.0)


def test_plan_is_a_frozen_value() -> None:
    plan = DrillConfig().plan(local=True)
    assert isinstance(plan, DrillPlan) and plan == DrillConfig().plan(local=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.duration = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------------------- the context


def _target(**overrides: Any) -> Target:
    fields: dict[str, Any] = {
        "vault_url": "https://127.0.0.1:1",
        "secret_name": "s",
        "gateway_url": "https://127.0.0.1:2",
        "deployment": "d",
        "apim_subscription_id": None,
        "arm_endpoint": None,
        "rotator_client_id": None,
        "label": "nowhere",
        "loopback": True,
        "faults": None,
    }
    return Target(**{**fields, **overrides})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_context_stamps_lines_with_the_injected_clock_and_prints_unless_live_or_json() -> None:
    clock, stdout = Clock(), io.StringIO()
    ctx = DrillContext(_target(), Output(False, stdout=stdout), clock=clock)
    ctx.log("before traffic")
    ctx.start_clock()
    clock.now = 112.25
    ctx.log("rotation 1")
    ctx.live = True
    ctx.log("shown in the live table only")
    assert ctx.timeline == [
        "t=  0.0s  before traffic",
        "t= 12.2s  rotation 1",
        "t= 12.2s  shown in the live table only",
    ]
    assert stdout.getvalue().splitlines() == ctx.timeline[:2]
    quiet = io.StringIO()
    as_json = DrillContext(_target(), Output(True, stdout=quiet), clock=clock)
    as_json.log("kept, not printed")
    assert as_json.timeline == ["t=  0.0s  kept, not printed"] and quiet.getvalue() == ""


def test_context_ranks_versions_in_drill_order() -> None:
    ctx = DrillContext(_target(), Output(True))
    ctx.versions.extend(["v0", "v1", "v2"])
    assert [ctx.rank(v) for v in ("v0", "v2", "other", None)] == [0, 2, -1, -1]


def test_stack_counts_subtract_the_probes_refused_while_units_synced() -> None:
    before = {"GetSecret": 3, "labels": {"key:primary": 10, "key:invalid": 1, "propagation-refused": 1}}
    after = {
        "GetSecret": 9,
        "labels": {"key:primary": 30, "key:secondary": 5, "key:invalid": 6, "propagation-refused": 3},
    }
    assert _stack_counts(before, after) == ({"primary": 20, "secondary": 5, "invalid": 3}, 6, 2)
    assert _stack_counts(None, after) == (None, None, None)


# ---------------------------------------------------------------------------- the parts, unopened


@dataclasses.dataclass
class Holding:
    """What the monitor reads of a client's provider: the version it holds (a stand-in for the drill's
    bookkeeping, not an SDK client)."""

    version: str

    def current(self) -> Holding:
        return self


@dataclasses.dataclass
class Parts:
    clock: Clock
    ctx: DrillContext
    traffic: Traffic
    rotations: Rotations
    schedule: Schedule
    monitor: Monitor
    report: DrillReport


def _parts(*, revoke: bool = False) -> Parts:
    """The drill's parts composed as :class:`~apimvault.cli.drill.run.Drill` composes them; nothing opened."""
    clock = Clock()
    ctx = DrillContext(_target(), Output(True), clock=clock)
    plan = DrillConfig(revoke=revoke).plan(local=False)
    traffic = Traffic(ctx, plan, None)
    rotations = Rotations(ctx, plan, traffic, token_scope=None, delivery_choice="memory")
    schedule = Schedule(ctx, plan, rotations, revoke=revoke)
    report = DrillReport(ctx, traffic, rotations, schedule, token_scope=None)
    return Parts(clock, ctx, traffic, rotations, schedule, Monitor(ctx, traffic, rotations), report)


def _record(index: int, started: float, at: float) -> RotationRecord:
    return RotationRecord(
        index=index,
        at_s=at,
        old_version=f"v{index - 1}",
        new_version=f"v{index}",
        credential_id="primary",
        regenerated="secondary",
        fingerprint="fp",
        push=False,
        started_s=started,
    )


def test_monitor_records_recovery_then_convergence_when_the_last_client_moves() -> None:
    parts = _parts()
    ctx = parts.ctx
    ctx.versions.extend(["v0", "v1", "v2"])
    ctx.start_clock()
    first = ClientSlot("sync-1", "sync", Holding("v1"), via=[("v1", "refresh-ahead")])
    second = ClientSlot("async-1", "async", Holding("v0"))
    parts.traffic.slots.extend([first, second])
    parts.rotations.records.extend([_record(1, 0.5, 1.0), _record(2, 2.0, 3.0)])
    parts.monitor.check()  # a client still on v0: rotation 2's key is held, rotation 1 not reached
    assert [(r.convergence_s, r.revocation_recovery_s) for r in parts.rotations.records] == [
        (None, None),
        (None, None),
    ]
    second.provider = Holding("v2")
    second.via.append(("v2", "401 -> refresh"))
    parts.clock.now += 5.0
    parts.monitor.check()
    one, two = parts.rotations.records
    assert (one.convergence_s, one.converged_via) == (4.0, {"refresh-ahead": 1, "401 -> refresh": 1})
    assert (two.revocation_recovery_s, two.convergence_s) == (3.0, None)  # sync-1 is still on v1
    assert ctx.timeline == [
        "t=  5.0s  no client holds the key revoked by rotation 2 any more (3.00s after it began)",
        "t=  5.0s  all 2 clients on version >= rotation 1 after 4.00s (refresh-ahead: 1, 401 -> refresh: 1)",
    ]


def test_verdict_passes_only_with_no_failure_every_client_converged_and_two_live_rotations() -> None:
    parts = _parts()
    records = parts.rotations.records
    records.extend([_record(1, 0.5, 1.0), _record(2, 2.0, 3.0)])
    for record in records:
        record.convergence_s, record.vault_latest_live = 1.0, True
    parts.ctx.metrics.ok(0.1, streaming=False)
    assert parts.report._verdict([]) == (
        True,
        "PASS: 1 requests, 0 failed across 2 rotations (0 refused requests re-sent after a refresh); "
        "every client converged",
    )
    parts.ctx.metrics.fail(0.1, False, TimeoutError("slow"))
    records[1].convergence_s = None
    parts.schedule.aborted = "1 of the latest 2 requests failed"
    assert parts.report._verdict([]) == (
        False,
        "FAIL: 1 of 2 requests failed; not every client reached the last version; rotations stopped "
        "because the traffic was failing (1 of the latest 2 requests failed)",
    )


def test_verdict_of_a_revoke_drill_needs_the_revocation() -> None:
    parts = _parts(revoke=True)
    parts.rotations.records.extend([_record(1, 0.5, 1.0), _record(2, 2.0, 3.0)])
    for record in parts.rotations.records:
        record.convergence_s, record.vault_latest_live = 1.0, True
    parts.ctx.metrics.ok(0.1, streaming=True)
    assert parts.report._verdict([]) == (False, "FAIL: the revocation did not run")


# ---------------------------------------------------------------------------- the public face


def _remote(monkeypatch: pytest.MonkeyPatch, vault: str, gateway: str) -> None:
    for name, value in {
        "AZURE_KEYVAULT_URL": vault,
        "APIMVAULT_SECRET_NAME": "apim-key",
        "AZURE_OPENAI_ENDPOINT": gateway,
        "APIMVAULT_DEPLOYMENT": "gpt",
        "OPENAI_API_VERSION": "2024-10-21",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("APIMVAULT_ADMIN_URL", raising=False)
    monkeypatch.delenv("APIMVAULT_ARM_ENDPOINT", raising=False)


def test_run_drill_declines_a_non_loopback_target_without_yes(monkeypatch: pytest.MonkeyPatch) -> None:
    _remote(monkeypatch, "https://kv-prod.vault.azure.net", "https://apim-prod.azure-api.net")
    with pytest.raises(DrillDeclined, match="non-loopback"):
        run_drill(DrillConfig())


def test_run_drill_refuses_chaos_without_a_local_stacks_admin_api(monkeypatch: pytest.MonkeyPatch) -> None:
    _remote(monkeypatch, "https://127.0.0.1:9/", "https://127.0.0.1:9/")
    with pytest.raises(ConfigurationError, match="admin API"):
        run_drill(DrillConfig(chaos=True))
