"""Issue 22.6: the providers' expiry rule holds whichever answer the vault gives an expired version.

Real Key Vault serves an expired version with 200 (Azure/AzureKeyVault#19, Altinn/altinn-studio#5029; see
``apimvault.local.keyvault``), and the local vault does the same by default; apimvault refuses it itself
(``SecretExpiredError``). A vault that refused it instead (the local vault's ``store.refuse_expired``:
403 ``Forbidden`` / ``SecretExpired``) gets the same typed error, sync and async.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from apimvault import AsyncSubscriptionKeyProvider, SecretExpiredError, SubscriptionKeyProvider
from apimvault.local import LocalAzure
from tests._support.core import FakeClock, new_app_secret
from tests._support.policies import FAST_REFRESH


@pytest.fixture(params=["serves", "refuses"])
def vault_answer(request: pytest.FixtureRequest, azure: LocalAzure) -> Iterator[str]:
    azure.keyvault.store.refuse_expired = request.param == "refuses"
    try:
        yield str(request.param)
    finally:
        azure.keyvault.store.refuse_expired = False


def test_expired_secret_is_refused_sync(azure: LocalAzure, vault_answer: str) -> None:
    app = new_app_secret(azure, expires=int(time.time()) - 60)
    before = azure.keyvault.counters["GetSecret"]
    with (
        SubscriptionKeyProvider(azure.vault_url, app.name, clock=FakeClock(), policy=FAST_REFRESH) as p,
        pytest.raises(SecretExpiredError, match="expired"),
    ):
        p.get_key()
    assert azure.keyvault.counters["GetSecret"] > before  # the vault was asked, and answered its way


async def test_expired_secret_is_refused_async(azure: LocalAzure, vault_answer: str) -> None:
    app = new_app_secret(azure, expires=int(time.time()) - 60)
    async with AsyncSubscriptionKeyProvider(
        azure.vault_url, app.name, clock=FakeClock(), policy=FAST_REFRESH
    ) as p:
        with pytest.raises(SecretExpiredError, match="expired"):
            await p.get_key()


def test_unexpired_secret_is_served_either_way(azure: LocalAzure, vault_answer: str) -> None:
    app = new_app_secret(azure, expires=int(time.time()) + 3600)
    with SubscriptionKeyProvider(azure.vault_url, app.name, clock=FakeClock(), policy=FAST_REFRESH) as p:
        assert p.get() == app.subscription.primary_key


def test_the_local_vault_answers_as_configured(azure: LocalAzure, vault_answer: str) -> None:
    """The two answers themselves: 200 with the exp attribute, or 403 SecretExpired."""
    import requests

    app = new_app_secret(azure, expires=int(time.time()) - 60)
    token = azure.tokens.issue(azure.officer_identity, "https://vault.azure.net")[0]
    response = requests.get(
        f"{azure.vault_url}/secrets/{app.name}/",
        params={"api-version": "2026-04-01"},
        headers={"Authorization": f"Bearer {token}"},
        verify=str(azure.ca_path),
        timeout=10,
    )
    if vault_answer == "serves":
        assert response.status_code == 200 and response.json()["attributes"]["exp"] < time.time()
    else:
        assert response.status_code == 403
        assert response.json()["error"]["innererror"] == {"code": "SecretExpired"}
