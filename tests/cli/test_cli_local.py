"""``apimvault local``: in-process ``--check``, and real subprocesses (``--check``; the foreground stack
driven by ``check`` and a ``drill --chaos`` from other processes through its env file, then SIGTERM)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from apimvault.local import temporary_environ
from tests._support.cli import APIMVAULT, assert_no_key, clean_env, read_line, run_cli


def test_local_check_in_process() -> None:
    run = run_cli(["local", "--check", "--json"])
    assert run.code == 0, run.out + run.err
    services = run.json()["services"]
    assert [s["service"] for s in services] == ["identity", "keyvault", "arm", "gateway", "admin"]
    assert all(s["ok"] for s in services), services
    assert "matches the vault" in services[2]["detail"]


@pytest.mark.slow
def test_local_check_subprocess() -> None:
    proc = subprocess.run(
        [APIMVAULT, "local", "--check"], env=clean_env(), capture_output=True, text=True, timeout=90
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line[:4] in ("ok  ", "FAIL")]
    assert len(lines) == 5 and all(line.startswith("ok  ") for line in lines), proc.stdout
    assert "all services answer" in proc.stdout


def _all_keys(env: dict[str, str]) -> set[str]:
    """Every key the stack's secret ever held, plus the subscription's current two (officer identity)."""
    from azure.identity import DefaultAzureCredential
    from azure.keyvault.secrets import SecretClient
    from azure.mgmt.apimanagement import ApiManagementClient

    from apimvault.rotation import parse_apim_subscription_id

    values: set[str] = set()
    with temporary_environ({**env, "AZURE_CLIENT_ID": None}):
        credential = DefaultAzureCredential(managed_identity_client_id=env["APIMVAULT_OFFICER_CLIENT_ID"])
        ca = env["SSL_CERT_FILE"]
        with SecretClient(env["AZURE_KEYVAULT_URL"], credential, connection_verify=ca) as client:
            name = env["APIMVAULT_SECRET_NAME"]
            for props in client.list_properties_of_secret_versions(name):
                values.add(client.get_secret(name, props.version).value or "")
        ref = parse_apim_subscription_id(env["APIMVAULT_APIM_SUBSCRIPTION_ID"])
        arm = ApiManagementClient(
            credential, ref.arm_subscription, base_url=env["APIMVAULT_ARM_ENDPOINT"], connection_verify=ca
        )
        keys = arm.subscription.list_secrets(ref.resource_group, ref.service, ref.sid)
        values.update({keys.primary_key or "", keys.secondary_key or ""})
        arm.close()
        credential.close()
    values.discard("")
    return values


@pytest.mark.slow
def test_local_foreground_serves_other_processes_and_stops_on_sigterm(tmp_path: Path) -> None:
    env_file = tmp_path / "local.env"
    proc = subprocess.Popen(
        [APIMVAULT, "local", "--json", "--env-file", str(env_file)],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = json.loads(read_line(proc, 60))
        assert ready["event"] == "ready" and set(ready["services"]) >= {"keyvault", "gateway", "arm", "admin"}
        file_env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if line)
        assert file_env["AZURE_TOKEN_CREDENTIALS"] == "managedidentitycredential"
        assert (env_file.stat().st_mode & 0o777) == 0o600
        child_env = clean_env(**file_env)

        check = subprocess.run(
            [APIMVAULT, "check", "--json"], env=child_env, capture_output=True, text=True, timeout=60
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert json.loads(check.stdout)["ok"] is True

        drill = subprocess.run(
            [APIMVAULT, "drill", "--json", "--chaos", "--duration", "3", "--concurrency", "8"],
            env=child_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert drill.returncode == 0, drill.stdout + drill.stderr
        report: dict[str, Any] = json.loads(drill.stdout)
        assert report["failed"] == 0 and report["rotations"] >= 2 and report["chaos"]
        assert report["vault_get_secret_server"] is not None  # counters read over the admin API

        keys = _all_keys(file_env)
        assert len(keys) >= 4
        assert_no_key(check.stdout + check.stderr + drill.stdout + drill.stderr, keys)

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"event": "stopped"}
    assert not env_file.exists()


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_drill_subprocess_embedded_json() -> None:
    proc = subprocess.run(
        [APIMVAULT, "drill", "--json", "--duration", "5"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    for field in ("requests", "failed", "recovered_401", "vault_reads", "rotations", "convergence_s", "ok"):
        assert field in report
    assert set(report["latency_ms"]) == {"p50", "p99", "max"}
    assert report["ok"] is True and report["failed"] == 0 and report["rotations"] >= 2
    assert report["target"].startswith("embedded local Azure")
    # Keys and versions are both 32 hex digits: every such string in the output must be a version.
    versions = {r["new_version"] for r in report["rotation_log"]} | {
        r["old_version"] for r in report["rotation_log"]
    }
    hex32 = set(re.findall(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])", proc.stdout + proc.stderr))
    assert hex32 <= versions, hex32 - versions
