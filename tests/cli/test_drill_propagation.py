"""``apimvault drill --chaos`` with gateway propagation and a duplicate, overlapping rotation event (issue
11): no failed request, every rotation make-before-break with measured propagation, the vault's latest
version live after each."""

from __future__ import annotations

import pytest

from apimvault.local import LocalAzure
from tests._support.cli import assert_no_key, new_rotating_app, run_cli


@pytest.mark.slow
def test_chaos_drill_with_propagation_and_duplicate_delivery(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    before = azure.apim_state.propagation()
    run = run_cli(["drill", "--chaos", "--json", "--duration", "5", "--concurrency", "8"], app.env())
    assert run.code == 0, run.err + run.out[-3000:]
    report = run.json()

    assert report["ok"] is True and report["failed"] == 0, report["verdict"]
    assert report["rotations"] >= 3 and report["overlapped_deliveries"] >= 1
    prop = report["propagation"]
    assert prop["random"] is True and set(prop["units_s"]) == set(azure.gateway_unit_urls)
    assert all(s is not None and s > 0 for s in prop["measured_s"])
    assert prop["refused_probes"] > 0  # the units really made the rotation wait
    assert report["vault_latest_live"] == [True] * report["rotations"]
    for record in report["rotation_log"]:
        assert record["vault_check"]["live"] is True
        assert set(record["vault_check"]["accepted"]) == set(azure.gateway_unit_urls.values())
    overlapped = [r for r in report["rotation_log"] if r["overlapped"]]
    outcomes = " | ".join(overlapped[0]["deliveries"])
    assert outcomes.count("rotated to") == 1 and outcomes.count("skipped") == 1, outcomes
    # Clients were spread over both gateway units, each unit serving sync and async clients, and every 401
    # they met was re-sent once.
    served = {(c["gateway_url"], c["kind"]) for c in report["clients_detail"]}
    assert served == {(url, kind) for url in azure.gateway_unit_urls.values() for kind in ("sync", "async")}
    assert report["gateway_key_use"]["invalid"] <= report["recovered_401"] + 1
    assert azure.keyvault.latest(app.name).version == report["rotation_log"][-1]["new_version"]
    assert azure.apim_state.propagation() == before  # the drill restored the stack's settings
    app.keys()
    assert_no_key(run.out + run.err, app.seen_keys | {v.value for v in azure.keyvault.versions(app.name)})


@pytest.mark.slow
def test_drill_without_propagation_leaves_the_units_in_step(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    before = azure.apim_state.propagation()
    argv = ["drill", "--json", "--propagation", "0", "--duration", "5", "--concurrency", "4"]
    run = run_cli(argv, app.env())
    assert run.code == 0, run.err + run.out[-3000:]
    report = run.json()
    assert report["ok"] is True and report["failed"] == 0, report["verdict"]
    prop = report["propagation"]
    assert prop["random"] is False and set(prop["units_s"].values()) == {0}
    assert prop["refused_probes"] == 0  # every unit accepted each new key at the first probe
    assert report["overlapped_deliveries"] == 0
    assert report["vault_latest_live"] == [True] * report["rotations"]
    assert azure.apim_state.propagation() == before
    assert_no_key(run.out + run.err, app.seen_keys | {v.value for v in azure.keyvault.versions(app.name)})


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "soon"])
def test_drill_propagation_flag_refuses_bad_values(value: str) -> None:
    run = run_cli(["drill", "--propagation", value])
    assert run.code == 2 and "--propagation" in run.err
