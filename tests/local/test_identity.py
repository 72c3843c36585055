"""The local managed-identity endpoint and stand-in ``az``, driven by the real azure-identity credentials."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import httpx2
import jwt
import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import DefaultAzureCredential
from azure.identity.aio import DefaultAzureCredential as AsyncDefaultAzureCredential
from azure.keyvault.secrets import SecretClient

from apimvault.local import SECRET_NAME, LocalAzure
from apimvault.local.stack import APIM_SUBSCRIPTION

VAULT_SCOPE = "https://vault.azure.net/.default"


def claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def raw_get(
    azure: LocalAzure, params: dict[str, str], headers: dict[str, str] | None = None
) -> httpx2.Response:
    if headers is None:
        headers = {"X-IDENTITY-HEADER": azure.identity.header_secret}
    with httpx2.Client(timeout=10) as client:
        return client.get(azure.identity.endpoint, params=params, headers=headers)


# ------------------------------------------------------------------------------- DefaultAzureCredential


def test_default_credential_gets_default_identity_token_over_https(azure: LocalAzure) -> None:
    assert azure.identity.endpoint.startswith("https://127.0.0.1:")
    assert os.environ["AZURE_TOKEN_CREDENTIALS"] == "managedidentitycredential"
    token = DefaultAzureCredential().get_token(VAULT_SCOPE)
    got = claims(token.token)
    assert got["oid"] == azure.default_identity.object_id
    assert got["aud"] == "https://vault.azure.net"
    # The token came from the App Service endpoint (no IMDS probe: the session refuses non-loopback
    # connects, and this counter shows the loopback endpoint answered).
    assert azure.identity.counters["GetToken"] == 1


def test_default_credential_selects_user_assigned_identity(azure: LocalAzure) -> None:
    officer = azure.officer_identity
    token = DefaultAzureCredential(managed_identity_client_id=officer.client_id).get_token(VAULT_SCOPE)
    assert claims(token.token)["oid"] == officer.object_id
    assert claims(token.token)["appid"] == officer.client_id


async def test_async_default_credential(azure: LocalAzure) -> None:
    async with AsyncDefaultAzureCredential() as cred:
        token = await cred.get_token("https://management.azure.com/.default")
    assert claims(token.token)["oid"] == azure.default_identity.object_id
    async with AsyncDefaultAzureCredential(
        managed_identity_client_id=azure.officer_identity.client_id
    ) as cred:
        token = await cred.get_token(VAULT_SCOPE)
    assert claims(token.token)["oid"] == azure.officer_identity.object_id
    assert azure.identity.counters["GetToken"] == 2


def test_wrong_identity_header_env_fails_credential(
    azure: LocalAzure, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDENTITY_HEADER", "not-the-secret")
    with pytest.raises(ClientAuthenticationError):
        DefaultAzureCredential().get_token(VAULT_SCOPE)
    assert azure.identity.counters["GetToken"] >= 1


def test_unknown_client_id_fails_credential(azure: LocalAzure) -> None:
    with pytest.raises(ClientAuthenticationError, match="No managed identity"):
        DefaultAzureCredential(managed_identity_client_id="11111111-2222-3333-4444-555555555555").get_token(
            VAULT_SCOPE
        )


def test_issued_tokens_verify_with_stack_issuer(azure: LocalAzure) -> None:
    token = DefaultAzureCredential().get_token(VAULT_SCOPE)
    assert azure.tokens.verify(token.token)["oid"] == azure.default_identity.object_id


# ------------------------------------------------------------------------------------------- wire level


def test_response_shape(azure: LocalAzure) -> None:
    response = raw_get(azure, {"api-version": "2019-08-01", "resource": "https://vault.azure.net"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "expires_on", "resource", "token_type", "client_id"}
    assert isinstance(body["expires_on"], str) and body["expires_on"].isdigit()
    assert body["token_type"] == "Bearer"
    assert body["client_id"] == azure.default_identity.client_id


@pytest.mark.parametrize("headers", [{}, {"X-IDENTITY-HEADER": "wrong"}, {"X-IDENTITY-HEADER": ""}])
def test_missing_or_wrong_header_is_401(azure: LocalAzure, headers: dict[str, str]) -> None:
    response = raw_get(azure, {"api-version": "2019-08-01", "resource": "https://vault.azure.net"}, headers)
    assert response.status_code == 401
    assert response.json()["statusCode"] == 401
    assert "X-IDENTITY-HEADER" in response.json()["message"]


def test_missing_resource_is_400(azure: LocalAzure) -> None:
    response = raw_get(azure, {"api-version": "2019-08-01"})
    assert response.status_code == 400
    assert response.json() == {"statusCode": 400, "message": "The resource query parameter is required."}


def test_selectors(azure: LocalAzure) -> None:
    officer = azure.officer_identity
    base = {"api-version": "2019-08-01", "resource": "https://vault.azure.net"}
    by_object = raw_get(azure, {**base, "object_id": officer.object_id}).json()
    assert by_object["client_id"] == officer.client_id
    res_id = "/subscriptions/x/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/"
    res_id += "officer"
    assert raw_get(azure, {**base, "mi_res_id": res_id}).json()["client_id"] == officer.client_id
    unknown = raw_get(azure, {**base, "client_id": "nope"})
    assert unknown.status_code == 400
    assert "client_id 'nope'" in unknown.json()["message"]
    both = raw_get(azure, {**base, "client_id": officer.client_id, "object_id": officer.object_id})
    assert both.status_code == 400


def test_bad_routes_and_methods(azure: LocalAzure) -> None:
    with httpx2.Client(timeout=10) as client:
        headers = {"X-IDENTITY-HEADER": azure.identity.header_secret}
        assert (
            client.get(azure.identity.url + "/metadata/identity/oauth2/token", headers=headers).status_code
            == 404
        )
        post = client.post(azure.identity.endpoint, headers=headers, content=b"{not json")
        assert post.status_code == 405
        assert post.json()["statusCode"] == 405
    assert azure.identity.counters["unknown"] == 1
    assert raw_get(azure, {"api-version": "2019-08-01", "resource": "r"}).status_code == 200


# -------------------------------------------------------------------------------------------- az stub


def test_az_stub_feeds_azure_cli_credential(azure: LocalAzure, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{azure.az_stub_dir()}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "dev")
    credential = DefaultAzureCredential()
    token = credential.get_token(VAULT_SCOPE)
    assert claims(token.token)["oid"] == azure.default_identity.object_id
    secret = SecretClient(azure.vault_url, credential).get_secret(SECRET_NAME)
    # Rotation tests elsewhere may have moved the secret to the other slot: any live key of the
    # seeded subscription is right.
    assert secret.value is not None
    found = azure.apim_state.lookup(secret.value)
    assert found is not None and found[0].sid == APIM_SUBSCRIPTION


def test_az_stub_output_and_unsupported_commands(azure: LocalAzure) -> None:
    az = str(azure.az_stub_dir() / "az")
    done = subprocess.run(
        [
            az,
            "account",
            "get-access-token",
            "--output",
            "json",
            "--resource",
            "https://management.azure.com",
            "--tenant",
            "t-1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    body = json.loads(done.stdout)
    assert set(body) == {"accessToken", "expiresOn", "expires_on", "subscription", "tenant", "tokenType"}
    assert body["tenant"] == "t-1"
    assert claims(body["accessToken"])["aud"] == "https://management.azure.com"
    scoped = subprocess.run(
        [az, "account", "get-access-token", "--output", "json", "--scope", VAULT_SCOPE],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert claims(json.loads(scoped.stdout)["accessToken"])["aud"] == "https://vault.azure.net"
    other = subprocess.run([az, "account", "show"], capture_output=True, text=True, timeout=30)
    assert other.returncode == 1
    assert "only supports 'az account get-access-token'" in other.stderr
