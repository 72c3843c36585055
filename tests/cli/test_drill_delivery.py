"""``apimvault drill`` the deployed way (issue 19): every rotation is a ``SecretNearExpiry`` event through the
local Event Grid to a Storage queue (Azurite's, or in memory), whose queue trigger runs the rotation
function's handler from the package (``apimvault.rotation.function``), as a rotator identity holding only
``infra/roles/rotator.json``'s roles, against gateway units behind ONE URL with per-unit delays.

Determinism: the drill's propagation is at most ``P`` seconds per unit and the rotation stores a key only
after ``K`` consecutive accepted probes ``I`` apart, the first after the regeneration; with
``(K - 1) * I > P`` every unit has synced by then whichever unit each probe reached (balanced routing), so
no client can meet a stored key that a unit refuses. The tests pick ``P``, ``K`` and ``I`` so; they assert
counts and states only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apimvault._key import fingerprint
from apimvault.cli.drill.delivery import find_azurite, host_settings
from apimvault.local import LocalAzure, LocalCA
from apimvault.local.eventgrid import QueueSettings
from apimvault.local.rbac import SECRET_ROTATOR_KEY, RoleDefinition, load_infra_roles
from tests._support.cli import RotatingApp, assert_no_key, new_rotating_app, run_cli
from tests._support.paths import REPO as ROOT

UPDATE = "Microsoft.KeyVault/vaults/secrets/update/action"
# (K - 1) * I = 1.25 s > P = 1 s (see the module doc); the chaos test uses the library's defaults.
FAST_PROBES = {"APIMVAULT_PROBE_SUCCESSES": "6", "APIMVAULT_PROBE_INTERVAL": "0.25"}
FAST = ["--duration", "5", "--concurrency", "6", "--propagation", "1"]


@pytest.fixture(scope="module")
def balanced(session_ca: LocalCA) -> Iterator[LocalAzure]:
    """A stack of its own whose two gateway units answer behind one URL (the stack's default), each
    request to one of them in turn; the session stack's environment stays applied around it."""
    with LocalAzure(ca=session_ca, rotate_as="rotator") as stack:
        yield stack


def _rotator_env(stack: LocalAzure, app: RotatingApp, *, drop: str | None = None) -> dict[str, str | None]:
    """The app's env on ``stack`` with a fresh rotator identity holding exactly infra's roles on the app's
    secret and APIM subscription (``drop``: that data action removed from the Key Vault role). Its apps are
    made with ``rotator=False``: the stack's own rotator identity keeps exactly its seeded roles."""
    identity = stack.add_identity(f"rotator-{app.name}")
    granted = stack.grant_rotator_roles(identity, secret=app.name, apim_subscription=app.sid)
    assert len(granted) == 2
    if drop is not None:
        infra = load_infra_roles()[SECRET_ROTATOR_KEY]
        narrowed = RoleDefinition(
            f"{infra.name} without {drop.rsplit('/', 2)[-2]}",
            data_actions=tuple(a for a in infra.data_actions if a != drop),
            custom=True,
        )
        stack.rbac.define(narrowed)
        assert stack.revoke_role(identity, infra.name) == 1
        stack.assign_role(identity, narrowed.name, stack.secret_scope(app.name))
    return {
        **stack.environ(),
        **app.env(),
        "APIMVAULT_ROTATOR_CLIENT_ID": identity.client_id,
        **FAST_PROBES,
    }


def _azurite_or_skip() -> None:
    if find_azurite(ROOT) is not None:
        return
    message = "Azurite is not installed (npm ci) or Node.js is not on PATH"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the Azurite drill: {message}")
    pytest.skip(message)


def _keys_and_versions(stack: LocalAzure, app: RotatingApp) -> set[str]:
    app.keys()
    return app.seen_keys | {v.value for v in stack.keyvault.versions(app.name)}


def _check_deployed_path(report: dict[str, Any], stack: LocalAzure, identity: str, kind: str) -> None:
    assert report["ok"] is True, report["verdict"]
    assert report["failed"] == 0 and report["errors"] == {}
    assert report["rotations"] == 3 and report["vault_latest_live"] == [True, True, True]
    assert {r["regenerated"] for r in report["rotation_log"]} == {"primary", "secondary"}
    # one gateway URL for both units
    assert report["gateway_urls"] == [stack.gateway_url] and len(stack.gateway_unit_urls) == 2
    assert set(stack.gateway_unit_urls.values()) == {stack.gateway_url}
    # as the rotator, holding exactly infra's two roles
    rotator = report["rotator"]
    assert rotator["client_id"] == identity and rotator["only_roles_file_roles"] is True
    infra = load_infra_roles()
    assert sorted(r["role"] for r in rotator["roles"]) == sorted(r.name for r in infra.values())
    assert rotator["roles_file_roles"] == sorted(r.name for r in infra.values())
    # through the queue and the function's handler
    delivery = report["delivery"]
    assert delivery["kind"] == kind and delivery["queue"] == f"{kind}:apimvault-rotation-events"
    assert "apimvault.rotation.function.handle_queue_message" in delivery["path"]
    assert delivery["event_grid"]["DeliverySuccessCount"] >= 2  # rotations 1 and 2 (3 unless --revoke)
    assert all(i["outcome"] == "succeeded" for i in delivery["invocations"])
    for record in report["rotation_log"]:
        if record["revocation"] is None:
            assert any("queue message (dequeue 1): rotated to" in line for line in record["deliveries"])


@pytest.mark.parametrize("kind", ["memory", "azurite"])
def test_the_drill_rotates_through_the_queue_and_the_function_handler_as_the_rotator(
    balanced: LocalAzure, kind: str
) -> None:
    if kind == "azurite":
        _azurite_or_skip()
    app = new_rotating_app(balanced, rotator=False)
    env = _rotator_env(balanced, app)
    run = run_cli(["drill", "--json", "--delivery", kind, *FAST], env)
    assert run.code == 0, run.err + run.out[-3000:]
    report = run.json()
    _check_deployed_path(report, balanced, str(env["APIMVAULT_ROTATOR_CLIENT_ID"]), kind)
    assert len(report["delivery"]["invocations"]) == 3
    lease = "none (no storage)" if kind == "memory" else "blob lease on Azurite"
    assert report["delivery"]["lease"] == lease
    assert balanced.keyvault.latest(app.name).version == report["rotation_log"][-1]["new_version"]
    assert_no_key(run.out + run.err, _keys_and_versions(balanced, app))


def test_the_text_report_names_identity_roles_and_delivery(balanced: LocalAzure) -> None:
    app = new_rotating_app(balanced, rotator=False)
    env = _rotator_env(balanced, app)
    run = run_cli(["drill", "--delivery", "memory", *FAST], env)
    assert run.code == 0, run.err + run.out[-3000:]
    name = f"rotator-{app.name}"
    assert f"rotator           {name} (client id {env['APIMVAULT_ROTATOR_CLIENT_ID']})" in run.out
    (roles,) = [line for line in run.out.splitlines() if line.startswith("roles             ")]
    assert f"apimvault secret rotator on {balanced.secret_scope(app.name)}" in roles
    assert f"apimvault APIM subscription key rotator on {balanced.apim_subscription_scope(app.sid)}" in roles
    assert "the rotator holds only these" in run.out
    assert "delivery          Event Grid (local) -> Storage queue -> queue trigger" in run.out
    assert "queue memory:apimvault-rotation-events (chosen with --delivery memory)" in run.out
    assert "consecutive accepted probes per URL" in run.out and "PASS:" in run.out
    assert_no_key(run.out + run.err, _keys_and_versions(balanced, app))


def test_revocation_mid_traffic_kills_the_leaked_key_without_a_failed_request(balanced: LocalAzure) -> None:
    app = new_rotating_app(balanced, rotator=False)
    env = _rotator_env(balanced, app)
    run = run_cli(["drill", "--json", "--revoke", "--delivery", "memory", *FAST], env)
    assert run.code == 0, run.err + run.out[-3000:]
    report = run.json()
    _check_deployed_path(report, balanced, str(env["APIMVAULT_ROTATOR_CLIENT_ID"]), "memory")
    revocation = report["revocation"]
    last = report["rotation_log"][-1]
    assert last["revocation"] == revocation and revocation["dead_at"] is not None
    assert revocation["dead_after_s"] >= 0 and revocation["dead_at_drill_s"] > last["started_s"]
    # the leaked key was the one rotation 2 stored (the clients held it); neither APIM key is it any more
    leaked = balanced.keyvault.versions(app.name)
    by_version = {v.version: v.value for v in leaked}
    leaked_value = by_version[report["rotation_log"][1]["new_version"]]
    assert fingerprint(leaked_value) == revocation["revoked_fingerprint"]
    primary, secondary = app.keys()
    assert leaked_value not in (primary, secondary)
    # the revocation rotated to the other key first: the vault serves a live key, every client has it
    assert revocation["revoked_slot"] != last["regenerated"] and last["vault_latest_live"] is True
    assert all(c["version"] == last["new_version"] for c in report["clients_detail"])
    assert len(report["delivery"]["invocations"]) == 2  # rotations 1 and 2 via the queue; the revocation not
    assert_no_key(run.out + run.err, _keys_and_versions(balanced, app))


def test_a_rotator_without_update_is_refused_before_anything_is_regenerated(
    balanced: LocalAzure, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="apimvault.rotation_function")
    app = new_rotating_app(balanced, rotator=False)
    keys = app.keys()
    versions = len(balanced.keyvault.versions(app.name))
    env = _rotator_env(balanced, app, drop=UPDATE)
    run = run_cli(["drill", "--json", "--delivery", "memory", *FAST], env)
    assert run.code != 0
    doc = run.json()
    assert doc["ok"] is False and doc["error"].startswith("AccessDeniedError: ")
    assert "may not tag" in doc["error"] and "/update/action" in doc["error"]
    # refused inside the function's handler, which the queue trigger ran for the drill's first event
    handled = [r.getMessage() for r in caplog.records if r.name == "apimvault.rotation_function"]
    assert any(m.startswith("rotation failed: event=drill-near-expiry-") for m in handled), handled
    assert any("error=AccessDeniedError" in m for m in handled)
    assert app.keys() == keys  # nothing regenerated
    assert len(balanced.keyvault.versions(app.name)) == versions  # nothing stored
    assert_no_key(run.out + run.err, _keys_and_versions(balanced, app))


def test_the_drill_reads_host_json_queue_settings() -> None:
    """The wheel does not carry host.json: the drill's copy of its queue settings must match it."""
    deployed = QueueSettings.from_host_json(ROOT / "infra" / "rotation_function" / "host.json")
    assert host_settings() == deployed


def test_the_handler_is_importable_from_the_package_and_infra_re_exports_it() -> None:
    import importlib
    import sys

    from apimvault.rotation import function

    sys.path.insert(0, str(ROOT / "infra" / "rotation_function"))
    try:
        handler = importlib.import_module("rotation_handler")
    finally:
        sys.path.remove(str(ROOT / "infra" / "rotation_function"))
    for name in handler.__all__:
        assert getattr(handler, name) is getattr(function, name), name


@pytest.mark.slow
def test_the_chaos_drill_through_azurite_as_the_rotator(balanced: LocalAzure) -> None:
    _azurite_or_skip()
    app = new_rotating_app(balanced, rotator=False)
    env = {**_rotator_env(balanced, app), "APIMVAULT_PROBE_SUCCESSES": None, "APIMVAULT_PROBE_INTERVAL": None}
    # default probe rule (10 x 0.5 s: 4.5 s > 1.5 x 2 s, the longest drawn delay)
    run = run_cli(["drill", "--chaos", "--json", "--delivery", "azurite", "--duration", "5"], env)
    assert run.code == 0, run.err + run.out[-3000:]
    report = run.json()
    _check_deployed_path(report, balanced, str(env["APIMVAULT_ROTATOR_CLIENT_ID"]), "azurite")
    assert report["propagation"]["random"] is True and report["overlapped_deliveries"] == 1
    overlapped = [r for r in report["rotation_log"] if r["overlapped"]]
    outcomes = " | ".join(overlapped[0]["deliveries"])
    assert outcomes.count("rotated to") == 1 and outcomes.count("skipped") == 1, outcomes
    assert len(report["delivery"]["invocations"]) == 4  # rotations 1, 2, and 3 delivered twice
    assert report["probe_rule"] == {"successes": 10, "interval_s": 0.5}
    assert_no_key(run.out + run.err, _keys_and_versions(balanced, app))


def test_without_azurite_auto_takes_the_memory_queue_and_azurite_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from apimvault.cli.drill.delivery import open_delivery
    from apimvault.exceptions import ConfigurationError

    monkeypatch.chdir(tmp_path)  # no node_modules here
    monkeypatch.setenv("PATH", str(tmp_path))  # and neither node nor azurite on PATH
    assert find_azurite() is None
    with open_delivery("auto") as delivery:
        assert delivery.kind == "memory" and delivery.why == "Azurite not found"
        assert delivery.describe()["lease"] == "none (no storage)"
    with pytest.raises(ConfigurationError, match="no Azurite found"), open_delivery("azurite"):
        pass


def test_the_in_process_stack_names_the_rotator_and_its_roles(balanced: LocalAzure) -> None:
    """The embedded drill's view of who rotates (the admin-API view is what the drills above report)."""
    from apimvault.cli.drill.target import StackFaults

    faults = StackFaults(azure=balanced)
    name, roles = faults.identity_roles(balanced.rotator_identity.client_id.upper())
    assert name == balanced.rotator_identity.name
    assert sorted(r["role"] for r in roles) == sorted(r.name for r in load_infra_roles().values())
    assert faults.identity_roles("00000000-0000-0000-0000-000000000000") == (None, [])


@pytest.mark.slow
def test_the_quickstart_drill_embedded_needs_no_environment(tmp_path: Path) -> None:
    """``apimvault drill`` with no variables set (the Quickstart): its own embedded stack, balanced units,
    its rotator, the in-memory queue (no node_modules in the working directory), in a fresh process (the
    embedded stack's CA must be trusted before aiohttp is imported)."""
    import json
    import subprocess
    import sys

    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PYTHONPATH"] = str(ROOT / "src")
    code = "import sys; from apimvault.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["drill", "--json", "--duration", "5", "--concurrency", "4"]
    command = [sys.executable, "-c", code, *argv]  # this interpreter, fixed arguments
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["failed"] == 0
    assert report["rotator"]["name"] == "rotator" and report["rotator"]["only_roles_file_roles"] is True
    assert report["delivery"]["kind"] == "memory" and report["delivery"]["why"] == "Azurite not found"
    assert len(report["gateway_urls"]) == 1 and report["vault_latest_live"] == [True] * report["rotations"]
