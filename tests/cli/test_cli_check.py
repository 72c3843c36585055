"""``apimvault check`` against the local stack: the healthy path and each broken link, in-process."""

from __future__ import annotations

import time
from typing import Any

import pytest

from apimvault.local import LocalAzure
from tests._support.cli import RotatingApp, assert_no_key, new_rotating_app, run_cli


def _check(app: RotatingApp, **env: str | None) -> tuple[int, dict[str, Any], str]:
    run = run_cli(["check", "--json"], {**app.env(), **env})
    assert_no_key(run.out + run.err, app.seen_keys)
    human = run_cli(["check"], {**app.env(), **env})
    assert human.code == run.code
    assert_no_key(human.out + human.err, app.seen_keys)
    return run.code, run.json(), human.out


def _failed_step(doc: dict[str, Any]) -> dict[str, Any]:
    steps = doc["steps"]
    assert isinstance(steps, list)
    assert [s["ok"] for s in steps[:-1]] == [True] * (len(steps) - 1)
    assert steps[-1]["ok"] is False
    last: dict[str, Any] = steps[-1]
    return last


def test_healthy(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    code, doc, human = _check(app)
    assert code == 0 and doc["ok"] is True and doc["exit_code"] == 0
    assert [s["name"] for s in doc["steps"]] == ["config", "credential", "vault", "access", "secret", "apim"]
    credential = doc["credential"]
    assert credential["used"] == "ManagedIdentityCredential"
    assert credential["identity"]["oid"] == azure.default_identity.object_id
    assert credential["identity"]["appid"] == azure.default_identity.client_id
    secret = doc["secret"]
    latest = azure.keyvault.latest(app.name)
    assert secret["version"] == latest.version and secret["credential_id"] == "primary"
    assert len(secret["fingerprint"]) == 8 and secret["age_s"] is not None
    assert doc["warnings"] == [] and "WARN" not in human
    assert "OK: the whole path works" in human
    assert "ManagedIdentityCredential" in human and azure.default_identity.object_id in human


def test_the_credential_used_is_named_without_azure_identitys_log(azure: LocalAzure) -> None:
    """Without azure-identity's INFO record, ``check`` asks the chain's members in order (public API only)."""
    from azure.identity import DefaultAzureCredential

    from apimvault.cli.check import credential_used
    from apimvault.cli.identity import vault_scope

    with azure.env(AZURE_CLIENT_ID=None) as env:
        credential = DefaultAzureCredential()
        try:
            scope = vault_scope(env["AZURE_KEYVAULT_URL"])
            assert credential_used(credential, scope, []) == "ManagedIdentityCredential"
            logged = ["DefaultAzureCredential acquired a token from EnvironmentCredential"]
            assert credential_used(credential, scope, logged) == "EnvironmentCredential"
            assert credential_used(object(), scope, []) == "unknown"
        finally:
            credential.close()


@pytest.mark.parametrize("days", [3, 8], ids=["3-days-warns", "8-days-quiet"])
def test_key_expiring_within_7_days_warns(azure: LocalAzure, days: int) -> None:
    """Issue 19.7: the vault serves a key that expires within 7 days: a WARN line and ``warnings`` in
    ``--json``, while the path still works (exit 0, as the other warnings)."""
    app = new_rotating_app(azure, expires=int(time.time()) + days * 86400)
    code, doc, human = _check(app)
    assert code == 0 and doc["ok"] is True
    assert doc["secret"]["expires_on"] is not None
    if days > 7:
        assert doc["warnings"] == []
        assert "WARN" not in human
        return
    [warning] = doc["warnings"]
    assert warning["step"] == "secret" and warning["code"] == "expires_soon"
    assert warning["expires_on"] == doc["secret"]["expires_on"]
    assert 2 * 86400 < warning["expires_in_s"] <= 3 * 86400
    lines = [line for line in human.splitlines() if line.startswith("WARN")]
    assert len(lines) == 1 and "expires in 3.0 days" in lines[0] and "apimvault rotate" in lines[0], lines
    assert "OK: the whole path works" in human


def test_no_role_names_the_role_and_scope(azure: LocalAzure) -> None:
    app = new_rotating_app(azure, grant=False)
    code, doc, human = _check(app)
    assert code == 5
    step = _failed_step(doc)
    assert step["name"] == "access"
    assert step["data"]["role"] == "Key Vault Secrets User"
    assert step["data"]["scope"].endswith(f"/secrets/{app.name}")
    assert step["data"]["principal"] == azure.default_identity.object_id
    assert "Key Vault Secrets User" in human and f"/secrets/{app.name}" in human


def test_missing_secret(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    azure.keyvault.grant(azure.default_identity, "Key Vault Secrets User", secret="no-such-secret")
    code, doc, _ = _check(app, APIMVAULT_SECRET_NAME="no-such-secret")
    assert code == 6
    assert _failed_step(doc)["name"] == "secret"


@pytest.mark.parametrize("broken", ["disabled", "expired"])
def test_disabled_or_expired_secret(azure: LocalAzure, broken: str) -> None:
    if broken == "disabled":
        app = new_rotating_app(azure, enabled=False)
    else:
        app = new_rotating_app(azure, expires=int(time.time()) - 60)
    code, doc, human = _check(app)
    assert code == 7
    step = _failed_step(doc)
    assert step["name"] == "secret" and broken in str(step["detail"]).lower()
    assert "FAILED at secret" in human


def test_revoked_key(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    azure.apim_state.regenerate(app.sid, "primary")  # the stored key no longer works
    app.keys()
    code, doc, human = _check(app)
    assert code == 8 and "FAILED at apim" in human
    step = _failed_step(doc)
    assert step["name"] == "apim" and "revoked key" in str(step["detail"])
    assert "invalid subscription key" in str(step["detail"])


def test_vault_down(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    azure.keyvault.faults.inject("status", operation="GetSecret", status=503)
    code, doc, _ = _check(app)
    assert code == 4
    step = _failed_step(doc)
    assert step["name"] == "vault" and "503" in str(step["detail"])


def test_no_credential(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    code, doc, human = _check(app, IDENTITY_HEADER="wrong-header")
    assert code == 3 and "FAILED at credential" in human
    step = _failed_step(doc)
    assert step["name"] == "credential" and "DefaultAzureCredential" in str(step["detail"])


def test_configuration(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    code, doc, _ = _check(app, AZURE_KEYVAULT_URL=None)
    assert code == 2
    assert "AZURE_KEYVAULT_URL" in str(_failed_step(doc)["detail"])


def test_help_lists_the_exit_codes() -> None:
    run = run_cli(["--help"])
    assert run.code == 0
    for code in ("  0  success", "  3  no token", "  5  access denied", "  8  APIM rejected the key"):
        assert code in run.out
