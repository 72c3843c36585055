"""``apimvault rotate`` and ``apimvault chat`` against the local stack, in-process through ``main(argv)``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AccessToken

from apimvault.local import LocalAzure
from tests._support.cli import assert_no_key, gateway_status, new_rotating_app, run_cli
from tests._support.events import near_expiry_event


def _event(azure: LocalAzure, name: str, version: str) -> str:
    return json.dumps(
        [near_expiry_event(vault_url=azure.vault_url, secret=name, version=version, event_id="1")]
    )


def test_rotate_twice_json_and_human(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    started_with, _ = app.keys()
    v1 = azure.keyvault.latest(app.name).version

    first = run_cli(["rotate", "--json"], app.env())  # loopback target: no confirmation needed
    assert first.code == 0, first.err
    doc = first.json()
    result = doc["result"]
    assert doc["ok"] is True and result["skipped"] is False
    assert result["old_version"] == v1 and result["credential_id"] == "secondary"
    assert doc["plan"]["regenerate"] == "secondary" and doc["plan"]["current_version"] == v1
    latest = azure.keyvault.latest(app.name)
    assert latest.version == result["new_version"]
    assert latest.tags is not None and latest.tags["CredentialId"] == "secondary"
    assert gateway_status(azure, started_with) == 200  # the key in use survives the first rotation

    second = run_cli(["rotate"], app.env())
    assert second.code == 0, second.err
    assert "rotation plan:" in second.out and "regenerate   the primary key" in second.out
    assert f"-> {azure.keyvault.latest(app.name).version} (primary" in second.out
    app.keys()
    assert gateway_status(azure, started_with) == 401  # revoked by the second rotation only
    assert_no_key(first.out + first.err + second.out + second.err, app.seen_keys)


def test_rotate_with_events_is_idempotent(azure: LocalAzure, tmp_path: Path) -> None:
    app = new_rotating_app(azure)
    v1 = azure.keyvault.latest(app.name).version
    event_file = tmp_path / "event.json"
    event_file.write_text(_event(azure, app.name, v1))

    rotated = run_cli(["rotate", "--json", "--event", str(event_file)], app.env())
    assert rotated.code == 0, rotated.err
    assert rotated.json()["result"]["skipped"] is False
    keys_after = app.keys()

    again = run_cli(["rotate", "--json", "--event", "-"], app.env(), stdin=_event(azure, app.name, v1))
    assert again.code == 0, again.err
    result = again.json()["result"]
    assert result["skipped"] is True and "already rotated" in result["reason"]
    assert app.keys() == keys_after
    human = run_cli(["rotate", "--event", str(event_file)], app.env())
    assert human.code == 0 and "skipped: version" in human.out
    assert_no_key(rotated.out + rotated.err + again.out + again.err + human.out, app.seen_keys)


def test_rotate_refuses_a_remote_target_without_yes(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    keys = app.keys()
    remote = {**app.env(), "AZURE_KEYVAULT_URL": "https://kv-prod.vault.azure.net"}
    run = run_cli(["rotate", "--json", "--event", "-"], remote, stdin=_event(azure, app.name, "0" * 32))
    assert run.code == 1
    assert "without --yes" in run.err and run.json()["declined"] is True
    assert app.keys() == keys


def test_rotate_errors_map_to_exit_codes(azure: LocalAzure) -> None:
    wrong_tag = new_rotating_app(azure, tags={"CredentialId": "secondary"})
    run = run_cli(["rotate", "--json"], wrong_tag.env())
    assert run.code == 10 and "RotationError" in run.json()["error"]

    reader = new_rotating_app(azure)
    default_identity = {"APIMVAULT_OFFICER_CLIENT_ID": None, "APIMVAULT_ROTATOR_CLIENT_ID": None}
    run = run_cli(["rotate"], {**reader.env(), **default_identity})  # Secrets User on the secret only
    assert run.code == 5 and "Key Vault Secrets Officer" in run.err

    run = run_cli(["rotate"], {**reader.env(), "APIMVAULT_SECRET_NAME": None})
    assert run.code == 2
    assert_no_key(run.out + run.err, wrong_tag.seen_keys | reader.seen_keys)


def test_chat_streams_and_reports_the_version(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    human = run_cli(["chat", "Say hello"], app.env())
    assert human.code == 0, human.err
    assert human.out.strip()  # the streamed reply
    version = azure.keyvault.latest(app.name).version
    assert f"key version {version}" in human.err

    doc = run_cli(["chat", "--json", "Say hello"], app.env())
    assert doc.code == 0
    body = doc.json()
    assert body["content"] and body["content"].strip() == human.out.strip()
    assert body["key_version"] == version and body["finish_reason"] == "stop"
    assert_no_key(human.out + human.err + doc.out + doc.err, app.seen_keys)


def test_chat_with_a_revoked_key(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    azure.apim_state.regenerate(app.sid, "primary")
    app.keys()
    run = run_cli(["chat", "--json", "hi"], app.env())
    assert run.code == 8 and "AuthenticationError" in run.json()["error"]
    assert_no_key(run.out + run.err, app.seen_keys)


class _BrokenCredential:
    """A TokenCredential (the public protocol) whose token source fails with an error no mapper knows."""

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        raise LookupError("token cache corrupted")


def test_an_unmapped_error_is_not_its_own_cause(azure: LocalAzure) -> None:
    """An error the rotation's mappers do not know surfaces as itself, never as its own ``__cause__``."""
    from apimvault.rotation import plan_rotation

    app = new_rotating_app(azure)
    with pytest.raises(LookupError) as caught:
        plan_rotation(
            vault_url=azure.vault_url,
            secret_name=app.name,
            apim_subscription_id=app.resource_id,
            arm_endpoint=azure.arm_url,
            credential=_BrokenCredential(),
        )
    assert caught.value.__cause__ is not caught.value


def test_rotate_runs_as_the_rotator_holding_only_infras_roles(azure: LocalAzure) -> None:
    """The app's env rotates as the stack's rotator identity (not the officer): without infra's per-secret
    grant on this app it is refused and nothing changes; with exactly that grant it rotates."""
    app = new_rotating_app(azure, rotator=False)
    keys = app.keys()
    v1 = azure.keyvault.latest(app.name).version
    assert app.env()["APIMVAULT_ROTATOR_CLIENT_ID"] == azure.rotator_identity.client_id
    refused = run_cli(["rotate", "--json"], app.env())
    assert refused.code == 5, refused.err + refused.out
    assert app.keys() == keys and azure.keyvault.latest(app.name).version == v1

    granted = azure.grant_rotator_roles(azure.rotator_identity, secret=app.name, apim_subscription=app.sid)
    assert sorted(a.role for a in granted) == sorted(r.name for r in azure.infra_roles.values())
    rotated = run_cli(["rotate", "--json"], app.env())
    assert rotated.code == 0, rotated.err
    assert azure.keyvault.latest(app.name).version == rotated.json()["result"]["new_version"] != v1
    assert_no_key(refused.out + refused.err + rotated.out + rotated.err, app.seen_keys | set(app.keys()))


def test_rotate_help_names_infras_roles() -> None:
    """The help says what the rotation needs as deployed: infra's custom roles, not Secrets Officer alone."""
    text = " ".join(run_cli(["rotate", "--help"]).out.split())
    assert "apimvault secret rotator on the secret" in text
    assert "apimvault APIM subscription key rotator on the subscription" in text
