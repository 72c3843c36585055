"""The rotation function end to end against the local Azure stack: a real-shaped SecretNearExpiry event in,
a new secret version holding the other APIM key out.

Activates once ``apimvault.rotation`` exists. The function runs as the stack's rotator identity
(``AZURE_CLIENT_ID``), which holds exactly the roles ``infra/`` assigns the deployed function's identity
(``infra/roles/rotator.json`` on the seeded secret and its APIM subscription), not Secrets Officer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from types import ModuleType

import pytest

pytest.importorskip("apimvault.rotation")

from apimvault.exceptions import ApimVaultError
from apimvault.local import SECRET_NAME, LocalAzure
from tests._support.events import near_expiry_event


@pytest.fixture
def stack() -> Iterator[LocalAzure]:
    """A fresh stack per test (rotation changes its state), with the function's identity: infra's rotator."""
    with LocalAzure() as azure, azure.env(AZURE_CLIENT_ID=azure.rotator_identity.client_id):
        yield azure


def _sid(azure: LocalAzure) -> str:
    return azure.environ()["APIMVAULT_APIM_SUBSCRIPTION_ID"].rsplit("/", 1)[-1]


def _event_for(azure: LocalAzure, version: str) -> dict[str, object]:
    latest = azure.keyvault.latest(SECRET_NAME)
    return near_expiry_event(
        vault_url=azure.vault_url,
        secret=SECRET_NAME,
        version=version,
        nbf=latest.not_before,
        exp=latest.expires,
    )


def test_near_expiry_event_rotates_to_the_regenerated_alternate_key(
    stack: LocalAzure, handler: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    before = stack.keyvault.latest(SECRET_NAME)
    sub = stack.apim_state.get(_sid(stack))
    assert sub is not None
    primary_before, secondary_before = sub.primary_key, sub.secondary_key
    assert before.tags is not None and before.tags["CredentialId"] == "primary"
    assert before.value == primary_before

    with caplog.at_level(logging.DEBUG):
        result = handler.handle_event(_event_for(stack, before.version))

    after = stack.keyvault.latest(SECRET_NAME)
    assert not result.skipped
    assert result.new_version == after.version != before.version
    assert after.tags is not None
    assert result.credential_id == after.tags["CredentialId"] == "secondary"
    assert after.tags["ProviderAddress"] == before.tags["ProviderAddress"]
    assert after.tags["ValidityPeriodDays"] == before.tags["ValidityPeriodDays"] == "60"
    assert after.expires is not None and abs(after.expires - (time.time() + 60 * 86400)) < 3600

    # The alternate (secondary) key was regenerated and is what the vault now holds; the key clients
    # were using (primary) was not touched, so nothing breaks while their caches catch up.
    assert sub.secondary_key != secondary_before
    assert after.value == sub.secondary_key
    assert sub.primary_key == primary_before
    assert stack.apim_state.lookup(secondary_before) is None

    # Logged: versions and outcome. Never a key.
    assert before.version in caplog.text and after.version in caplog.text
    for key in (primary_before, secondary_before, sub.secondary_key):
        assert key not in caplog.text


def test_a_redelivered_event_for_an_old_version_is_skipped(stack: LocalAzure, handler: ModuleType) -> None:
    before = stack.keyvault.latest(SECRET_NAME)
    event = _event_for(stack, before.version)
    first = handler.handle_event(event)
    sub = stack.apim_state.get(_sid(stack))
    assert sub is not None
    keys_after_first = (sub.primary_key, sub.secondary_key)

    second = handler.handle_event(event)  # Event Grid delivers at least once

    assert second.skipped and second.new_version is None
    assert stack.keyvault.latest(SECRET_NAME).version == first.new_version
    assert (sub.primary_key, sub.secondary_key) == keys_after_first


def test_two_rotations_alternate_the_keys(stack: LocalAzure, handler: ModuleType) -> None:
    v1 = stack.keyvault.latest(SECRET_NAME)
    r1 = handler.handle_event(_event_for(stack, v1.version))
    r2 = handler.handle_event(_event_for(stack, r1.new_version))
    assert (r1.credential_id, r2.credential_id) == ("secondary", "primary")
    sub = stack.apim_state.get(_sid(stack))
    assert sub is not None
    assert stack.keyvault.latest(SECRET_NAME).value == sub.primary_key != v1.value


def test_the_app_identity_cannot_rotate(stack: LocalAzure, handler: ModuleType) -> None:
    """Least privilege holds locally: the reader identity (Key Vault Secrets User) cannot write a version."""
    before = stack.keyvault.latest(SECRET_NAME)
    with stack.env(AZURE_CLIENT_ID=None), pytest.raises(ApimVaultError):
        handler.handle_event(_event_for(stack, before.version))
    assert stack.keyvault.latest(SECRET_NAME).version == before.version
