"""The errors a README reader meets name the real cause (issue 23: 7 and 8), through the library."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from apimvault import (
    AccessDeniedError,
    ConfigurationError,
    SubscriptionKeyProvider,
    create_azure_openai,
)
from apimvault.local import LocalAzure
from tests._support.core import new_app_secret


def test_a_misspelt_name_and_a_missing_role_are_both_named_role_first(azure: LocalAzure) -> None:
    """Key Vault answers 403 for a name the identity's secret-scoped role does not cover: the error says
    both causes (the missing role first), and how to tell them apart."""
    app = new_app_secret(azure)  # the default identity may read app.name, and nothing else
    misspelt = app.name + "x"
    provider = SubscriptionKeyProvider(azure.vault_url, misspelt)
    with provider, pytest.raises(AccessDeniedError) as info:
        provider.get_key()
    message = str(info.value)
    role = message.index("'Key Vault Secrets User'")
    name = message.index(f"APIMVAULT_SECRET_NAME={misspelt}")
    assert role < name, message
    assert "misspelt" in message and "403, not 404" in message
    assert f"az role assignment list --assignee {azure.default_identity.object_id} --all" in message
    assert f"/secrets/{misspelt}'" in message  # the scope to grant, for the role cause


@pytest.fixture
def stopped_stack_env(tmp_path: Path) -> Iterator[Path]:
    """The shell of a user who sourced `apimvault local`'s env file after the stack stopped: every variable
    still set, the CA file gone."""
    gone = tmp_path / "apimvault-local-stopped" / "ca.pem"
    saved = {k: os.environ.get(k) for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")}
    os.environ["SSL_CERT_FILE"] = os.environ["REQUESTS_CA_BUNDLE"] = str(gone)
    try:
        yield gone
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_create_azure_openai_names_the_missing_ca_of_a_stopped_stack(
    azure: LocalAzure, stopped_stack_env: Path
) -> None:
    with SubscriptionKeyProvider.from_env() as provider, pytest.raises(ConfigurationError) as info:
        create_azure_openai(provider)
    message = str(info.value)
    assert f"SSL_CERT_FILE={stopped_stack_env} does not exist" in message
    assert "apimvault local" in message
    assert "unset SSL_CERT_FILE REQUESTS_CA_BUNDLE" in message
    assert not isinstance(info.value, FileNotFoundError)


def test_a_key_vault_read_names_the_missing_ca_of_a_stopped_stack(
    azure: LocalAzure, stopped_stack_env: Path
) -> None:
    with SubscriptionKeyProvider.from_env() as provider, pytest.raises(ConfigurationError) as info:
        provider.get_key()
    assert f"={stopped_stack_env} does not exist" in str(info.value)
    assert "re-source" in str(info.value)
