"""apimvault.rotation against the local stack: real SecretClient and ApiManagementClient, no mocks."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator

import pytest
from azure.identity import DefaultAzureCredential

from apimvault import AccessDeniedError, ConfigurationError
from apimvault.local import LocalAzure
from apimvault.rotation import RotationError, plan_rotation, rotate, rotate_from_event

from .cli_support import assert_no_key, gateway_status, new_rotating_app


@pytest.fixture
def officer(azure: LocalAzure) -> Iterator[DefaultAzureCredential]:
    credential = DefaultAzureCredential(managed_identity_client_id=azure.officer_identity.client_id)
    yield credential
    credential.close()


def _event(azure: LocalAzure, name: str, version: str, kind: str = "SecretNearExpiry") -> dict[str, object]:
    return {
        "id": "6f1d2d7e-0000-4000-8000-000000000001",
        "topic": "/subscriptions/x/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv-apimvault-local",
        "subject": name,
        "eventType": f"Microsoft.KeyVault.{kind}",
        "eventTime": "2026-01-01T00:00:00Z",
        "data": {
            "Id": f"{azure.vault_url}/secrets/{name}/{version}",
            "VaultName": "kv-apimvault-local",
            "ObjectType": "Secret",
            "ObjectName": name,
            "Version": version,
            "NBF": None,
            "EXP": None,
        },
        "dataVersion": "1",
        "metadataVersion": "1",
    }


def test_rotate_flips_tag_keeps_tags_and_sets_expiry(
    azure: LocalAzure, officer: DefaultAzureCredential
) -> None:
    app = new_rotating_app(azure, tags={"Owner": "team-a"})
    primary, old_secondary = app.keys()
    before = azure.keyvault.latest(app.name)
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)

    result = rotate(
        vault_url=azure.vault_url,
        secret_name=app.name,
        apim_subscription_id=None,  # from the ProviderAddress tag
        credential=officer,
        now=now,
    )

    latest = azure.keyvault.latest(app.name)
    new_primary, new_secondary = app.keys()
    assert not result.skipped and result.reason == "rotated"
    assert result.old_version == before.version and result.new_version == latest.version
    assert result.credential_id == "secondary" and result.regenerated == "secondary"
    assert latest.value == new_secondary != old_secondary
    assert new_primary == primary  # the key in use is untouched
    assert latest.tags == {**before.tags, "CredentialId": "secondary"}
    assert latest.content_type == "text/plain"
    assert latest.expires == int((now + dt.timedelta(days=60)).timestamp())
    assert result.expires_on == "2030-03-02T00:00:00Z"
    assert gateway_status(azure, primary) == 200
    assert gateway_status(azure, new_secondary) == 200
    assert gateway_status(azure, old_secondary) == 401
    assert_no_key(repr(result) + json.dumps(result.as_dict()), app.seen_keys)


def test_old_key_is_revoked_only_after_its_successor_is_in_the_vault(
    azure: LocalAzure, officer: DefaultAzureCredential
) -> None:
    app = new_rotating_app(azure)
    started_with, _ = app.keys()
    v1 = azure.keyvault.latest(app.name).version
    observed: dict[str, object] = {}

    def rotate_in_thread() -> None:
        observed["result"] = rotate(
            vault_url=azure.vault_url,
            secret_name=app.name,
            apim_subscription_id=app.resource_id,
            credential=officer,
        )

    # Hold rotation 1's Key Vault write in flight and look at the gateway while it is.
    azure.keyvault.faults.inject("latency", operation="SetSecret", seconds=0.6, times=1)
    writer = threading.Thread(target=rotate_in_thread)
    writer.start()
    deadline = time.monotonic() + 20
    while azure.keyvault.counters["SetSecret"] < 1 and writer.is_alive() and time.monotonic() < deadline:
        threading.Event().wait(0.002)
    assert azure.keyvault.counters["SetSecret"] == 1
    observed["latest_during_write"] = azure.keyvault.latest(app.name).version
    observed["started_with_during_write"] = gateway_status(azure, started_with)
    writer.join(30)
    first = observed["result"]

    assert observed["latest_during_write"] == v1  # the write had not landed yet...
    assert observed["started_with_during_write"] == 200  # ...and the key in use still worked
    assert gateway_status(azure, started_with) == 200  # and still does once the new version is in
    v2 = azure.keyvault.latest(app.name)
    assert v2.version == first.new_version and v2.tags["CredentialId"] == "secondary"  # type: ignore[attr-defined]

    # Rotation 2 regenerates the primary: only now does the key the clients started with stop working,
    # while the vault has been serving its successor since rotation 1.
    second = rotate(
        vault_url=azure.vault_url,
        secret_name=app.name,
        apim_subscription_id=app.resource_id,
        credential=officer,
    )
    new_primary, secondary = app.keys()
    assert second.credential_id == "primary" and second.old_version == v2.version
    assert gateway_status(azure, started_with) == 401
    assert gateway_status(azure, secondary) == 200 and secondary == v2.value
    assert gateway_status(azure, new_primary) == 200
    assert azure.keyvault.latest(app.name).value == new_primary


def test_event_for_an_old_version_is_skipped(azure: LocalAzure, officer: DefaultAzureCredential) -> None:
    app = new_rotating_app(azure)
    v1 = azure.keyvault.latest(app.name).version

    first = rotate_from_event(_event(azure, app.name, v1), credential=officer)
    assert not first.skipped and first.old_version == v1
    keys_after_first = app.keys()

    again = rotate_from_event(json.dumps([_event(azure, app.name, v1)]), credential=officer)  # redelivery
    assert again.skipped and "already rotated" in again.reason
    assert again.old_version == v1 and again.new_version is None and again.credential_id == "secondary"
    assert app.keys() == keys_after_first  # nothing regenerated
    assert azure.keyvault.latest(app.name).version == first.new_version


def test_event_types_and_vaults_that_must_not_rotate(
    azure: LocalAzure, officer: DefaultAzureCredential
) -> None:
    app = new_rotating_app(azure)
    v1 = azure.keyvault.latest(app.name).version
    with pytest.raises(ConfigurationError, match="would loop"):
        rotate_from_event(_event(azure, app.name, v1, "SecretNewVersionCreated"), credential=officer)
    other_vault = _event(azure, app.name, v1)
    other_vault["data"] = {
        **other_vault["data"],
        "Id": f"https://other.vault.azure.net/secrets/{app.name}/{v1}",
    }  # type: ignore[dict-item]
    other_vault["data"]["VaultName"] = "other"  # type: ignore[index]
    with pytest.raises(RotationError, match="not the configured"):
        rotate_from_event(other_vault, credential=officer)
    assert azure.keyvault.latest(app.name).version == v1


def test_refuses_when_the_tag_names_the_wrong_key(azure: LocalAzure, officer: DefaultAzureCredential) -> None:
    app = new_rotating_app(azure, tags={"CredentialId": "secondary"})  # but the value is the primary key
    keys = app.keys()
    with pytest.raises(RotationError, match="would revoke the key in use") as info:
        rotate(vault_url=azure.vault_url, secret_name=app.name, apim_subscription_id=None, credential=officer)
    assert app.keys() == keys
    assert_no_key(str(info.value), app.seen_keys)


def test_refuses_a_subscription_the_secret_does_not_name(
    azure: LocalAzure, officer: DefaultAzureCredential
) -> None:
    app = new_rotating_app(azure)
    other = new_rotating_app(azure)
    keys = app.keys()
    with pytest.raises(RotationError, match="ProviderAddress"):
        rotate(
            vault_url=azure.vault_url,
            secret_name=app.name,
            apim_subscription_id=other.resource_id,
            credential=officer,
        )
    assert app.keys() == keys


def test_needs_a_subscription_and_a_writer(azure: LocalAzure, officer: DefaultAzureCredential) -> None:
    app = new_rotating_app(azure, tags={"ProviderAddress": ""})
    with pytest.raises(ConfigurationError, match="APIMVAULT_APIM_SUBSCRIPTION_ID"):
        plan_rotation(vault_url=azure.vault_url, secret_name=app.name, credential=officer)

    reader = new_rotating_app(azure)
    user = DefaultAzureCredential()  # the default identity: Key Vault Secrets User on the secret only
    try:
        with pytest.raises(AccessDeniedError, match="Key Vault Secrets Officer"):
            rotate(
                vault_url=azure.vault_url, secret_name=reader.name, apim_subscription_id=None, credential=user
            )
    finally:
        user.close()
    assert azure.keyvault.latest(reader.name).tags["CredentialId"] == "primary"


def test_plan_describes_without_changing(azure: LocalAzure, officer: DefaultAzureCredential) -> None:
    app = new_rotating_app(azure)
    keys = app.keys()
    plan = plan_rotation(vault_url=azure.vault_url, secret_name=app.name, credential=officer)
    assert plan.credential_id == "primary" and plan.regenerate == "secondary"
    assert plan.validity_days == 60 and plan.apim_subscription == app.resource_id
    assert app.keys() == keys
    assert_no_key("\n".join(plan.describe()) + json.dumps(plan.as_dict()), app.seen_keys)
