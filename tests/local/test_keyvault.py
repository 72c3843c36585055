"""The local Key Vault secrets emulator, driven by the real ``azure.keyvault.secrets.SecretClient``.

Every response a client sees here is validated against the Key Vault spec
(``data/keyvault-secrets-2026-04-01.json``) by a ``raw_response_hook``, and the raw-HTTP tests validate their
bodies the same way. Clients authenticate with ``DefaultAzureCredential()`` through the stack's
managed-identity endpoint; a few auth tests need a token that no real credential would produce (forged,
expired, unknown identity), and hand it over with :class:`~tests._support.keyvault.StaticToken`.
The asynchronous client is exercised in ``test_keyvault_aio.py``.
"""

from __future__ import annotations

import itertools
import json
import ssl
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.identity import DefaultAzureCredential
from azure.keyvault.secrets import SecretClient

from apimvault.local import ROLE_OFFICER, ROLE_USER, SECRET_NAME, TENANT_ID, Identity, LocalAzure, TokenIssuer
from apimvault.local.keyvault import KeyVaultService
from tests._support.keyvault import (
    JSON_UTF8,
    NOT_FOUND,
    VERSION_RE,
    Raw,
    SpecValidator,
    StaticToken,
    challenge_resource,
    error_of,
    forged_token,
    header_of,
    text_of,
    unique,
)


@pytest.fixture(scope="session")
def spec() -> SpecValidator:
    return SpecValidator()


# -------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def officer_credential(azure: LocalAzure) -> Iterator[DefaultAzureCredential]:
    """``DefaultAzureCredential()`` as the vault-scope Secrets Officer (selected by AZURE_CLIENT_ID)."""
    with azure.env(AZURE_CLIENT_ID=azure.officer_identity.client_id):
        credential = DefaultAzureCredential()
    yield credential
    credential.close()


@pytest.fixture
def client(
    azure: LocalAzure, officer_credential: DefaultAzureCredential, spec: SpecValidator
) -> Iterator[SecretClient]:
    with SecretClient(azure.vault_url, officer_credential, raw_response_hook=spec.hook) as secret_client:
        yield secret_client


@pytest.fixture
def user_client(azure: LocalAzure, spec: SpecValidator) -> Iterator[SecretClient]:
    """The default identity: Key Vault Secrets User on the seeded secret only."""
    credential = DefaultAzureCredential()
    with SecretClient(azure.vault_url, credential, raw_response_hook=spec.hook) as secret_client:
        yield secret_client
    credential.close()


@pytest.fixture
def raw(azure: LocalAzure, spec: SpecValidator) -> Iterator[Raw]:
    r = Raw(azure, spec)
    yield r
    r.session.close()


# ------------------------------------------------------------------------------------ set / get / update


def test_set_and_get_latest_and_by_version(
    client: SecretClient, azure: LocalAzure, spec: SpecValidator
) -> None:
    name = unique()
    before = int(time.time())
    first = client.set_secret(name, "v1", content_type="text/plain", tags={"CredentialId": "primary"})
    second = client.set_secret(name, "v2")
    after = int(time.time())

    assert VERSION_RE.match(first.properties.version or "") and VERSION_RE.match(
        second.properties.version or ""
    )
    assert first.id == f"{azure.vault_url}/secrets/{name}/{first.properties.version}"
    assert first.properties.content_type == "text/plain"
    assert first.properties.tags == {"CredentialId": "primary"}
    assert first.properties.recovery_level == "Recoverable+Purgeable"
    assert first.properties.recoverable_days == 90
    assert first.properties.enabled is True
    created = first.properties.created_on
    assert created is not None and before <= int(created.timestamp()) <= after
    # Issue 22.5: previousVersion is for certificate-backed secrets only (spec), never on plain ones.
    assert first.properties.previous_version is None and second.properties.previous_version is None

    latest = client.get_secret(name)  # GET /secrets/{name}/ (empty version)
    assert (latest.value, latest.properties.version) == ("v2", second.properties.version)
    older = client.get_secret(name, first.properties.version)
    assert (older.value, older.properties.content_type) == ("v1", "text/plain")
    assert spec.validated > 0
    assert azure.keyvault.latest(name).version == second.properties.version


def test_previous_version_never_on_plain_secrets_or_list_items(raw: Raw, client: SecretClient) -> None:
    """Issue 22.5: the spec gives previousVersion to certificate-backed secrets only; items never have it."""
    name = unique()
    client.set_secret(name, "v1")
    bodies = [raw.request("PUT", f"/secrets/{name}", json={"value": "v2"}).json()]
    bodies.append(raw.request("GET", f"/secrets/{name}/").json())
    bodies.append(raw.request("PATCH", f"/secrets/{name}/", json={"contentType": "x"}).json())
    bodies.extend(raw.request("GET", f"/secrets/{name}/versions").json()["value"])
    bodies.extend(raw.request("GET", "/secrets", params={"maxresults": "25"}).json()["value"])
    assert len(bodies) >= 5 and all("previousVersion" not in body for body in bodies)


def test_get_without_trailing_slash_and_names_are_case_insensitive(raw: Raw, client: SecretClient) -> None:
    name = unique("Case")
    created = client.set_secret(name, "value")
    body = raw.request("GET", f"/secrets/{name}").json()  # no trailing slash
    assert body["value"] == "value" and body["id"] == created.id
    body = raw.request("GET", f"/secrets/{name.lower()}/").json()
    assert body["value"] == "value"
    assert body["id"].endswith(f"/secrets/{name}/{created.properties.version}")  # keeps its first casing


def test_exp_and_nbf_are_advisory_for_secrets(client: SecretClient) -> None:
    """Real Key Vault serves a secret outside its validity window; the caller must honour exp/nbf."""
    import datetime as dt

    name = unique()
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    future = dt.datetime(2099, 1, 1, tzinfo=dt.UTC)
    client.set_secret(name, "expired", expires_on=past, not_before=future)
    secret = client.get_secret(name)
    assert secret.value == "expired"
    assert secret.properties.expires_on == past and secret.properties.not_before == future


def test_update_properties_latest_and_by_version(client: SecretClient) -> None:
    name = unique()
    first = client.set_secret(name, "v1", tags={"a": "1"})
    client.set_secret(name, "v2")
    updated = client.update_secret_properties(name, content_type="application/json", tags={"b": "2"})
    assert updated.content_type == "application/json" and updated.tags == {"b": "2"}
    assert client.get_secret(name).properties.tags == {"b": "2"}
    old = client.update_secret_properties(name, first.properties.version, enabled=False)
    assert old.enabled is False and old.version == first.properties.version
    assert old.tags == {"a": "1"}  # untouched fields survive a PATCH
    assert client.get_secret(name).value == "v2"  # the latest version is still enabled


def test_disabled_secret_is_forbidden_until_enabled(client: SecretClient) -> None:
    name = unique()
    client.set_secret(name, "hidden", enabled=False)
    with pytest.raises(HttpResponseError) as info:
        client.get_secret(name)
    assert info.value.status_code == 403
    assert info.value.error is not None and info.value.error.code == "Forbidden"
    assert "Operation get is not allowed on a disabled secret." in str(info.value)
    assert '"code":"SecretDisabled"' in text_of(info.value).replace(" ", "")
    client.update_secret_properties(name, enabled=True)
    assert client.get_secret(name).value == "hidden"


def test_disabled_error_body_is_exact(client: SecretClient, raw: Raw) -> None:
    name = unique()
    client.set_secret(name, "x", enabled=False)
    response = raw.request("GET", f"/secrets/{name}/")
    assert response.status_code == 403
    assert response.json() == {
        "error": {
            "code": "Forbidden",
            "message": "Operation get is not allowed on a disabled secret.",
            "innererror": {"code": "SecretDisabled"},
        }
    }


# -------------------------------------------------------------------------------------------- listing


def test_list_versions_pages_one_at_a_time(client: SecretClient, azure: LocalAzure) -> None:
    name = unique()
    created = [client.set_secret(name, f"v{i}").properties.version for i in range(31)]
    azure.keyvault.counters.reset()
    listed = list(client.list_properties_of_secret_versions(name, max_page_size=1))
    assert [p.version for p in listed] == created
    assert all(p.name == name for p in listed)
    assert azure.keyvault.counters["GetSecretVersions"] >= 30


def test_next_link_is_absolute_on_the_clients_host_and_port(raw: Raw, client: SecretClient) -> None:
    name = unique()
    for i in range(3):
        client.set_secret(name, f"v{i}")
    page = raw.request("GET", f"/secrets/{name}/versions", params={"maxresults": "2"}).json()
    assert len(page["value"]) == 2 and all("value" not in item for item in page["value"])
    link = urlsplit(page["nextLink"])
    assert f"{link.scheme}://{link.netloc}" == raw.azure.vault_url
    query = parse_qs(link.query)
    assert query["maxresults"] == ["2"] and query["api-version"] == ["2026-04-01"] and query["$skiptoken"]
    rest = raw.session.get(
        page["nextLink"], headers={"Authorization": f"Bearer {raw.officer_token}"}, timeout=10
    )
    raw.spec.check("GET", rest.url, rest.status_code, rest.headers, rest.content)
    last = rest.json()
    assert len(last["value"]) == 1 and last["nextLink"] is None


def test_list_secrets_pages_and_carries_no_values(client: SecretClient, azure: LocalAzure) -> None:
    names = {unique("list") for _ in range(3)}
    for name in names:
        client.set_secret(name, "x", tags={"t": name})
    azure.keyvault.counters.reset()
    listed = {p.name: p for p in client.list_properties_of_secrets(max_page_size=1)}
    assert names <= set(listed)
    assert SECRET_NAME in listed
    assert all(listed[n].tags == {"t": n} and listed[n].version is None for n in names)
    assert azure.keyvault.counters["GetSecrets"] >= len(listed)


@pytest.mark.parametrize("maxresults", ["0", "26", "-1", "abc", ""])
def test_maxresults_out_of_range_is_bad_parameter(raw: Raw, maxresults: str) -> None:
    response = raw.request("GET", "/secrets", params={"maxresults": maxresults})
    assert response.status_code == 400
    assert error_of(response)["code"] == "BadParameter"


def test_sdk_page_size_over_25_is_an_http_error(client: SecretClient) -> None:
    with pytest.raises(HttpResponseError) as info:
        list(client.list_properties_of_secrets(max_page_size=26))
    assert info.value.status_code == 400


def test_garbage_skiptoken_is_bad_parameter(raw: Raw) -> None:
    response = raw.request("GET", "/secrets", params={"$skiptoken": "not-a-token!"})
    assert response.status_code == 400 and error_of(response)["code"] == "BadParameter"


# ---------------------------------------------------------------------------- soft delete / recover / purge


def test_soft_delete_recover_purge(client: SecretClient, raw: Raw) -> None:
    name = unique()
    kept = client.set_secret(name, "keep me")
    before = int(time.time())
    deleted = client.begin_delete_secret(name).result()
    assert deleted.recovery_id == f"{raw.azure.vault_url}/deletedsecrets/{name}"
    assert deleted.deleted_date is not None and deleted.scheduled_purge_date is not None
    deleted_at = int(deleted.deleted_date.timestamp())
    assert before <= deleted_at <= int(time.time())
    assert int(deleted.scheduled_purge_date.timestamp()) == deleted_at + 90 * 86400
    assert deleted.properties.version == kept.properties.version

    with pytest.raises(ResourceNotFoundError):
        client.get_secret(name)
    assert client.get_deleted_secret(name).name == name
    assert name in {d.name for d in client.list_deleted_secrets()}
    for collection in ("deletedsecrets", "deletedSecrets"):
        assert raw.request("GET", f"/{collection}/{name}").json()["recoveryId"] == deleted.recovery_id
    listed = raw.request("GET", "/deletedSecrets").json()["value"]
    assert any(item["recoveryId"] == deleted.recovery_id for item in listed)

    with pytest.raises(ResourceExistsError) as info:
        client.set_secret(name, "reuse")
    assert info.value.status_code == 409
    assert '"ObjectIsDeletedButRecoverable"' in text_of(info.value)

    recovered = client.begin_recover_deleted_secret(name).result()
    assert recovered.version == kept.properties.version
    assert client.get_secret(name).value == "keep me"

    client.begin_delete_secret(name).wait()
    client.purge_deleted_secret(name)
    with pytest.raises(ResourceNotFoundError):
        client.get_deleted_secret(name)
    assert client.set_secret(name, "fresh").properties.previous_version is None


def test_purge_answers_204_without_body(client: SecretClient, raw: Raw) -> None:
    name = unique()
    client.set_secret(name, "x")
    raw.request("DELETE", f"/secrets/{name}")
    response = raw.request("DELETE", f"/deletedsecrets/{name}")
    assert response.status_code == 204 and response.content == b""


def test_delete_error_bodies_are_exact(raw: Raw) -> None:
    name = unique()
    response = raw.request("DELETE", f"/secrets/{name}")
    assert response.status_code == 404
    assert error_of(response) == {"code": "SecretNotFound", "message": NOT_FOUND.format(name=name)}
    response = raw.request("GET", f"/deletedsecrets/{name}")
    assert response.status_code == 404
    assert error_of(response) == {"code": "SecretNotFound", "message": f"Deleted Secret not found: {name}"}


def test_set_while_deleted_body_is_exact(raw: Raw, client: SecretClient) -> None:
    name = unique()
    client.set_secret(name, "x")
    client.begin_delete_secret(name).result()
    response = raw.request("PUT", f"/secrets/{name}", json={"value": "y"})
    assert response.status_code == 409
    assert error_of(response) == {
        "code": "Conflict",
        "message": f"Secret {name} is currently in a deleted but recoverable state, and its name cannot be "
        "reused; in this state, the secret can only be recovered or purged.",
        "innererror": {"code": "ObjectIsDeletedButRecoverable"},
    }


# ----------------------------------------------------------------------------------------- backup / restore


def test_backup_and_restore_keep_every_version(client: SecretClient) -> None:
    name = unique()
    values = [f"value-{uuid.uuid4().hex}-{i}" for i in range(3)]
    versions = [
        client.set_secret(name, v, tags={"i": str(i)}).properties.version for i, v in enumerate(values)
    ]
    blob = client.backup_secret(name)  # the sealed bytes (the SDK decodes the base64url wire value)
    # Opaque: neither the name nor any value in clear (long random strings, so no chance match in the bytes).
    assert name.encode() not in blob and not any(v.encode() in blob for v in values)

    with pytest.raises(ResourceExistsError):
        client.restore_secret_backup(blob)  # the secret still exists

    client.begin_delete_secret(name).wait()
    with pytest.raises(ResourceExistsError) as info:
        client.restore_secret_backup(blob)  # soft-deleted: the name is taken until purged
    assert "ObjectIsDeletedButRecoverable" in text_of(info.value)

    client.purge_deleted_secret(name)
    restored = client.restore_secret_backup(blob)
    assert restored.name == name and restored.version == versions[-1]
    assert [p.version for p in client.list_properties_of_secret_versions(name)] == versions
    assert client.get_secret(name).value == values[2]
    assert client.get_secret(name, versions[0]).properties.tags == {"i": "0"}


@pytest.mark.parametrize("blob", [b"garbage", b"", b"\x00" * 64])
def test_restore_of_a_garbage_blob_is_bad_parameter(client: SecretClient, blob: bytes) -> None:
    with pytest.raises(HttpResponseError) as info:
        client.restore_secret_backup(blob)
    assert info.value.status_code == 400 and info.value.error is not None
    assert info.value.error.code == "BadParameter"


def test_restore_of_a_tampered_blob_is_bad_parameter(client: SecretClient) -> None:
    name = unique()
    client.set_secret(name, "x")
    blob = bytearray(client.backup_secret(name))
    blob[len(blob) // 2] ^= 0x01
    with pytest.raises(HttpResponseError) as info:
        client.restore_secret_backup(bytes(blob))
    assert info.value.status_code == 400


# -------------------------------------------------------------------------------------------- not found


def test_not_found_errors(client: SecretClient) -> None:
    name = unique()
    with pytest.raises(ResourceNotFoundError) as info:
        client.get_secret(name)
    assert info.value.error is not None and info.value.error.code == "SecretNotFound"
    assert info.value.error.message == NOT_FOUND.format(name=name)
    client.set_secret(name, "x")
    missing = uuid.uuid4().hex
    with pytest.raises(ResourceNotFoundError) as info:
        client.get_secret(name, missing)
    assert info.value.error is not None and info.value.error.message == NOT_FOUND.format(
        name=f"{name}/{missing}"
    )
    other = unique()
    for call in (
        lambda: client.begin_delete_secret(other),
        lambda: client.get_deleted_secret(other),
        lambda: client.purge_deleted_secret(other),
        lambda: client.begin_recover_deleted_secret(other),
        lambda: client.backup_secret(other),
        lambda: client.update_secret_properties(other, enabled=False),
    ):
        with pytest.raises(ResourceNotFoundError):
            call()
    assert list(client.list_properties_of_secret_versions(other)) == []


# --------------------------------------------------------------------------------------- authentication


def test_missing_token_gets_the_challenge(raw: Raw, azure: LocalAzure) -> None:
    for method, path in (
        ("GET", f"/secrets/{SECRET_NAME}/"),
        ("PUT", "/secrets/x"),
        ("GET", "/no/such/route"),
    ):
        response = raw.request(method, path, token=None, validate=path != "/no/such/route")
        assert response.status_code == 401
        assert response.json() == {
            "error": {"code": "Unauthorized", "message": "Request is missing a Bearer or PoP token."}
        }
        assert response.headers["content-type"] == JSON_UTF8
        assert response.headers["www-authenticate"] == (
            f'Bearer authorization="https://login.microsoftonline.com/{TENANT_ID}", '
            f'resource="https://0.0.1:{azure.keyvault.port}"'
        )
    response = raw.request("GET", "/secrets", token=None, headers={"Authorization": "Basic Zm9vOmJhcg=="})
    assert response.status_code == 401


def test_challenge_over_ssl_context_with_stack_ca(azure: LocalAzure) -> None:
    """The same 401 through a default SSL context that trusts only the stack CA (verification on)."""
    import httpx2

    context = ssl.create_default_context(cafile=str(azure.ca_path))
    with httpx2.Client(verify=context) as http:
        response = http.get(f"{azure.vault_url}/secrets?api-version=7.6")
    assert response.status_code == 401 and "www-authenticate" in response.headers


def _unauthorized(raw: Raw, token: str) -> dict[str, Any]:
    response = raw.request("GET", f"/secrets/{SECRET_NAME}/", token=token)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer authorization=")
    return error_of(response)


def test_forged_token_is_unauthorized(raw: Raw, azure: LocalAzure, spec: SpecValidator) -> None:
    token = forged_token(azure, azure.officer_identity)
    assert _unauthorized(raw, token)["message"].startswith("AKV10046:")
    with (
        SecretClient(azure.vault_url, StaticToken(token), raw_response_hook=spec.hook) as forged,
        pytest.raises(ClientAuthenticationError),
    ):
        forged.get_secret(SECRET_NAME)


def test_secret_store_without_http_follows_the_clock() -> None:
    """The store alone (no service, no HTTP): versions, soft delete, recovery, dates from the given clock."""
    from apimvault.local.keyvault import KeyVaultError, SecretStore

    now = [1_000.0]
    store = SecretStore(lambda: now[0])
    first = store.set("App-Key", "one", None, {"CredentialId": "primary"}, True, None, None)
    now[0] = 2_000.0
    second = store.set("app-key", "two", "text/plain", None, True, None, 5_000)
    assert (first.created, second.created) == (1_000, 2_000) and second.previous_version == first.version
    assert second.name == "App-Key" and store.get("APP-KEY", "").version == second.version
    deleted = store.delete("app-key")
    assert deleted.deleted_date == 2_000 and deleted.scheduled_purge_date == 2_000 + 90 * 86400
    with pytest.raises(KeyVaultError) as caught:
        store.set("app-key", "three", None, None, True, None, None)
    assert caught.value.status == 409
    assert store.recover("app-key").latest.version == second.version and store.all_deleted() == []


def test_foreign_issuer_is_unauthorized(raw: Raw, azure: LocalAzure) -> None:
    token = forged_token(
        azure, azure.officer_identity, iss="https://sts.windows.net/00000000-0000-0000-0000-000000000000/"
    )
    error = _unauthorized(raw, token)
    assert error["message"] == (
        f"AKV10032: Invalid issuer. Expected one of https://sts.windows.net/{TENANT_ID}/, found "
        "https://sts.windows.net/00000000-0000-0000-0000-000000000000/."
    )


def test_expired_token_is_unauthorized(raw: Raw, azure: LocalAzure, spec: SpecValidator) -> None:
    token, expires_on = azure.tokens.issue(azure.officer_identity, challenge_resource(azure), lifetime_s=-10)
    _unauthorized(raw, token)
    with (
        SecretClient(azure.vault_url, StaticToken(token, expires_on), raw_response_hook=spec.hook) as expired,
        pytest.raises(ClientAuthenticationError),
    ):
        expired.get_secret(SECRET_NAME)


def test_token_expiring_after_first_use_is_refused() -> None:
    """A token verified once (and cached by the vault) is still refused once it expires."""
    now = [time.time()]
    tokens = TokenIssuer(clock=lambda: now[0])
    vault = KeyVaultService(tokens, clock=lambda: now[0])
    try:
        identity = Identity.new("short-lived")
        vault.grant(identity, ROLE_OFFICER)
        token, _ = tokens.issue(identity, "https://vault.azure.net", lifetime_s=60)
        assert vault._authenticate(f"Bearer {token}")["oid"] == identity.object_id
        now[0] += 61
        with pytest.raises(Exception, match="expired"):
            vault._authenticate(f"Bearer {token}")
    finally:
        vault.socket.close()


def test_token_for_another_audience_is_unauthorized(raw: Raw, azure: LocalAzure) -> None:
    token, _ = azure.tokens.issue(azure.officer_identity, "https://management.azure.com/")
    assert _unauthorized(raw, token)["message"] == (
        "AKV10022: Invalid audience. Expected https://vault.azure.net, found: https://management.azure.com/."
    )
    vault_token, _ = azure.tokens.issue(azure.officer_identity, "https://vault.azure.net")
    assert raw.request("GET", f"/secrets/{SECRET_NAME}/", token=vault_token).status_code == 200


# ---------------------------------------------------------------------------------------------- RBAC


def test_unknown_identity_is_forbidden_by_rbac(azure: LocalAzure, raw: Raw, spec: SpecValidator) -> None:
    stranger = Identity.new("stranger")
    token, _ = azure.tokens.issue(stranger, challenge_resource(azure))
    with (
        SecretClient(azure.vault_url, StaticToken(token), raw_response_hook=spec.hook) as client,
        pytest.raises(HttpResponseError) as info,
    ):
        client.get_secret(SECRET_NAME)
    assert info.value.status_code == 403
    response = raw.request("GET", f"/secrets/{SECRET_NAME}/", token=token)
    error = error_of(response)
    assert error["code"] == "Forbidden" and error["innererror"] == {"code": "ForbiddenByRbac"}
    lines = error["message"].split("\r\n")
    assert lines[0] == "Caller is not authorized to perform action on resource."
    assert (
        lines[2] == f"Caller: appid={stranger.client_id};oid={stranger.object_id};iss={azure.tokens.issuer}"
    )
    assert lines[3] == "Action: 'Microsoft.KeyVault/vaults/secrets/getSecret/action'"
    assert lines[4].startswith("Resource: '/subscriptions/") and lines[4].endswith(f"/secrets/{SECRET_NAME}'")
    assert lines[5] == "Assignment: (not found)"
    assert "DecisionReason: 'DeniedWithNoValidRBAC' " in lines


def test_secret_scoped_user(
    user_client: SecretClient, client: SecretClient, raw: Raw, azure: LocalAzure
) -> None:
    """The default identity holds Secrets User on the seeded secret only."""
    assert user_client.get_secret(SECRET_NAME).value == azure.keyvault.latest(SECRET_NAME).value
    assert len(list(user_client.list_properties_of_secret_versions(SECRET_NAME))) >= 1
    other = unique()
    client.set_secret(other, "not yours")
    for call, action in (
        (lambda: user_client.get_secret(other), "getSecret/action"),
        (lambda: list(user_client.list_properties_of_secrets()), "readMetadata/action"),
        (lambda: user_client.set_secret(SECRET_NAME, "overwrite"), "setSecret/action"),
        (lambda: user_client.update_secret_properties(SECRET_NAME, enabled=False), "update/action"),
        (lambda: user_client.backup_secret(SECRET_NAME), "backup/action"),
        (lambda: user_client.begin_delete_secret(SECRET_NAME), "secrets/delete'"),
    ):
        with pytest.raises(HttpResponseError) as info:
            call()
        assert info.value.status_code == 403, action
        assert action in text_of(info.value).replace("\\r\\n", "\n"), action
    assert azure.keyvault.latest(SECRET_NAME).enabled


def test_grant_and_revoke(azure: LocalAzure, raw: Raw) -> None:
    reader = Identity.new("reader")
    token, _ = azure.tokens.issue(reader, challenge_resource(azure))
    assert raw.request("GET", "/secrets", token=token).status_code == 403
    azure.keyvault.grant(reader, ROLE_USER)
    assert raw.request("GET", "/secrets", token=token).status_code == 200
    assert raw.request("GET", f"/secrets/{SECRET_NAME}/", token=token).status_code == 200
    assert raw.request("PUT", "/secrets/nope", token=token, json={"value": "x"}).status_code == 403
    azure.keyvault.grant(reader, ROLE_OFFICER, secret="mine")
    assert raw.request("PUT", "/secrets/Mine", token=token, json={"value": "x"}).status_code == 200
    azure.keyvault.revoke(reader, ROLE_USER)
    assert raw.request("GET", "/secrets", token=token).status_code == 403
    assert raw.request("GET", "/secrets/mine/", token=token).status_code == 200
    azure.keyvault.revoke(reader)
    assert raw.request("GET", "/secrets/mine/", token=token).status_code == 403
    with pytest.raises(ValueError, match="unknown role"):
        azure.keyvault.grant(reader, "Owner")


# -------------------------------------------------------------------------------------------- bad input


def test_bad_requests_answer_in_key_vault_shape_and_the_vault_keeps_serving(raw: Raw) -> None:
    name = unique()
    json_type = {"Content-Type": "application/json"}
    cases: list[tuple[str, str, dict[str, Any], int]] = [
        ("PUT", f"/secrets/{name}", {"data": b"{not json", "headers": json_type}, 400),
        ("PUT", f"/secrets/{name}", {"data": b"[1, 2]", "headers": json_type}, 400),
        (
            "PUT",
            f"/secrets/{name}",
            {"data": b'{"value": "x"}', "headers": {"Content-Type": "text/plain"}},
            400,
        ),
        ("PUT", f"/secrets/{name}", {"data": b'{"value": "x"}'}, 400),
        ("PUT", f"/secrets/{name}", {"json": {"contentType": "x"}}, 400),
        ("PUT", f"/secrets/{name}", {"json": {"value": 42}}, 400),
        ("PUT", f"/secrets/{name}", {"json": {"value": "x", "tags": {"a": 1}}}, 400),
        ("PUT", f"/secrets/{name}", {"json": {"value": "x", "tags": {str(i): "v" for i in range(16)}}}, 400),
        ("PUT", f"/secrets/{name}", {"json": {"value": "x", "attributes": {"enabled": "yes"}}}, 400),
        ("PUT", f"/secrets/{name}", {"json": {"value": "x", "attributes": {"exp": "tomorrow"}}}, 400),
        ("PUT", f"/secrets/{name}", {"json": {"value": "x", "contentType": 7}}, 400),
        ("PUT", "/secrets/bad_name", {"json": {"value": "x"}}, 400),
        ("PUT", "/secrets/" + "a" * 128, {"json": {"value": "x"}}, 400),
        ("GET", "/secrets/bad.name/", {}, 400),
        ("PATCH", f"/secrets/{name}/", {"data": b"{", "headers": json_type}, 400),
        ("POST", "/secrets/restore", {"json": {}}, 400),
        ("POST", "/secrets/restore", {"json": {"value": 5}}, 400),
    ]
    for method, path, kwargs, status in cases:
        response = raw.request(method, path, **kwargs)
        assert response.status_code == status, (method, path, kwargs, response.text)
        assert error_of(response)["code"] == "BadParameter", response.text
    assert raw.request("GET", f"/secrets/{SECRET_NAME}/").status_code == 200


def test_missing_api_version_is_bad_parameter(raw: Raw) -> None:
    response = raw.request("GET", f"/secrets/{SECRET_NAME}/", api_version=None)
    assert response.status_code == 400 and error_of(response)["code"] == "BadParameter"
    for served in ("7.4", "7.6", "2025-07-01", "2026-04-01", "7.6-preview.2", "2025-06-01-preview"):
        assert raw.request("GET", f"/secrets/{SECRET_NAME}/", api_version=served).status_code == 200


@pytest.mark.parametrize("version", ["1999-01-01", "8.0", "7.7", "latest"])
def test_unknown_api_version_is_refused_as_key_vault_does(raw: Raw, version: str) -> None:
    """Issue 22.1: Key Vault's answer (Azure/azure-sdk-for-python#28595, azure-sdk-for-net#14789)."""
    response = raw.request("GET", f"/secrets/{SECRET_NAME}/", api_version=version)
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "BadParameter",
            "message": f"The specified version ({version}) is not recognized. "
            "Consider using the latest supported version (2026-04-01).",
        }
    }
    assert response.headers["x-ms-request-id"]


def test_value_size_limit(raw: Raw, client: SecretClient) -> None:
    name = unique()
    assert raw.request("PUT", f"/secrets/{name}", json={"value": "é" * 12_800}).status_code == 200  # 25,600 B
    response = raw.request("PUT", f"/secrets/{name}", json={"value": "x" * 25_601})
    assert response.status_code == 400
    assert error_of(response) == {
        "code": "BadParameter",
        "message": "Secret is beyond the maximum permitted length of 25600 characters.",
        "innererror": {"code": "SecretTooLarge"},
    }
    with pytest.raises(HttpResponseError) as info:
        client.set_secret(name, "x" * 25_601)
    assert info.value.status_code == 400


def test_oversize_body_is_refused_without_reading_it_all(raw: Raw) -> None:
    big = b'{"value":"' + b"x" * (300 * 1024) + b'"}'
    response = raw.request(
        "PUT", f"/secrets/{unique()}", data=big, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413 and error_of(response)["code"] == "RequestEntityTooLarge"

    def chunks() -> Iterator[bytes]:
        yield b'{"value":"'
        for _ in range(40):
            yield b"x" * 8192
        yield b'"}'

    response = raw.request(
        "PUT", f"/secrets/{unique()}", data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert raw.request("GET", f"/secrets/{SECRET_NAME}/").status_code == 200


def test_unknown_routes_are_404_in_key_vault_shape(raw: Raw) -> None:
    for method, path in (("GET", "/keys"), ("POST", "/secrets/x"), ("GET", "/secrets/x/y/z"), ("PUT", "/")):
        response = raw.request(method, path, validate=False)
        assert response.status_code == 404
        assert response.headers["content-type"] == JSON_UTF8
        assert error_of(response)["code"] == "NotFound"
        raw.spec.validate(response.json(), "KeyVaultError")
    assert raw.request("GET", f"/secrets/{SECRET_NAME}/").status_code == 200


def test_sdk_bad_name_is_http_error(client: SecretClient) -> None:
    with pytest.raises(HttpResponseError) as info:
        client.set_secret("bad_name", "x")
    assert info.value.status_code == 400


# ------------------------------------------------------------------------------------ headers and faults


def test_response_headers_like_key_vault(raw: Raw) -> None:
    response = raw.request("GET", f"/secrets/{SECRET_NAME}/", headers={"x-ms-client-request-id": "abc-123"})
    assert response.headers["x-ms-client-request-id"] == "abc-123"
    assert uuid.UUID(response.headers["x-ms-request-id"])
    assert response.headers["x-ms-keyvault-service-version"]
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["content-type"] == JSON_UTF8
    unauthorized = raw.request("GET", "/secrets", token=None, headers={"x-ms-client-request-id": "q"})
    assert unauthorized.headers["x-ms-client-request-id"] == "q"


def test_injected_status_fault_reaches_the_client(
    azure: LocalAzure, officer_credential: DefaultAzureCredential, spec: SpecValidator
) -> None:
    with SecretClient(
        azure.vault_url, officer_credential, retry_total=0, raw_response_hook=spec.hook
    ) as client:
        client.get_secret(SECRET_NAME)  # warm: challenge done, token cached
        azure.keyvault.faults.inject("status", status=503, operation="GetSecret", times=1)
        with pytest.raises(HttpResponseError) as info:
            client.get_secret(SECRET_NAME)
        assert info.value.status_code == 503
        assert info.value.error is not None and info.value.error.code == "ServiceUnavailable"
        assert client.get_secret(SECRET_NAME).value  # recovered after one failure


def test_injected_fault_is_retried_by_azure_core(
    azure: LocalAzure, officer_credential: DefaultAzureCredential, spec: SpecValidator
) -> None:
    with SecretClient(
        azure.vault_url, officer_credential, retry_backoff_factor=0, raw_response_hook=spec.hook
    ) as client:
        client.get_secret(SECRET_NAME)
        azure.keyvault.counters.reset()
        azure.keyvault.faults.fail_next(2, status=503, operation="GetSecret")
        assert client.get_secret(SECRET_NAME).value
        assert azure.keyvault.counters["GetSecret"] == 3


def test_injected_throttle_carries_retry_after(
    azure: LocalAzure, officer_credential: DefaultAzureCredential, spec: SpecValidator
) -> None:
    with SecretClient(
        azure.vault_url, officer_credential, retry_total=0, raw_response_hook=spec.hook
    ) as client:
        client.get_secret(SECRET_NAME)
        azure.keyvault.faults.inject("throttle", operation="GetSecret", times=1, retry_after=7)
        with pytest.raises(HttpResponseError) as info:
            client.get_secret(SECRET_NAME)
        assert info.value.status_code == 429
        assert header_of(info.value, "Retry-After") == "7"
        assert info.value.error is not None and info.value.error.code == "Throttled"


def test_injected_latency_is_observed(azure: LocalAzure, client: SecretClient) -> None:
    client.get_secret(SECRET_NAME)
    azure.keyvault.faults.inject("latency", operation="GetSecret", times=1, seconds=0.3)
    started = time.monotonic()
    client.get_secret(SECRET_NAME)
    assert time.monotonic() - started >= 0.3


# --------------------------------------------------------------------------------- in-process API & misc


def test_in_process_api(azure: LocalAzure) -> None:
    vault = azure.keyvault
    name = unique()
    first = vault.put_secret(name, "one", content_type="text/plain", tags={"k": "v"}, expires=2_000_000_000)
    second = vault.put_secret(name, "two", enabled=False, not_before=1_000)
    assert VERSION_RE.match(first.version) and second.previous_version == first.version
    assert vault.latest(name.upper()) == second and [v.version for v in vault.versions(name)] == [
        first.version,
        second.version,
    ]
    assert "two" not in repr(second)
    with pytest.raises(KeyError):
        vault.latest(unique())
    with pytest.raises(ValueError):
        vault.put_secret("bad name", "x")
    with pytest.raises(ValueError):
        vault.put_secret(name, "x" * 25_601)


def test_timestamps_come_from_the_injected_clock() -> None:
    now = [1_700_000_000.5]
    vault = KeyVaultService(TokenIssuer(), clock=lambda: now[0])
    try:
        first = vault.put_secret("clocked", "a")
        now[0] += 10
        second = vault.put_secret("clocked", "b")
        assert (first.created, first.updated) == (1_700_000_000, 1_700_000_000)
        assert second.created == 1_700_000_010
        bundle = second.bundle("https://127.0.0.1:1", with_value=False)
        assert bundle["attributes"]["created"] == 1_700_000_010 and "value" not in bundle
    finally:
        vault.socket.close()


@pytest.mark.parametrize(
    ("method", "path", "operation"),
    [
        ("PUT", "/secrets/a", "SetSecret"),
        ("GET", "/secrets/a/", "GetSecret"),
        ("GET", "/secrets/a", "GetSecret"),
        ("GET", "/secrets/a/" + "0" * 32, "GetSecret"),
        ("GET", "/secrets/a/versions", "GetSecretVersions"),
        ("GET", "/secrets", "GetSecrets"),
        ("PATCH", "/secrets/a/", "UpdateSecret"),
        ("PATCH", "/secrets/a/" + "0" * 32, "UpdateSecret"),
        ("DELETE", "/secrets/a", "DeleteSecret"),
        ("GET", "/deletedsecrets", "GetDeletedSecrets"),
        ("GET", "/deletedSecrets/a", "GetDeletedSecret"),
        ("DELETE", "/deletedsecrets/a", "PurgeDeletedSecret"),
        ("POST", "/deletedsecrets/a/recover", "RecoverDeletedSecret"),
        ("POST", "/secrets/a/backup", "BackupSecret"),
        ("POST", "/secrets/restore", "RestoreSecret"),
        ("GET", "/keys", "unknown"),
        ("POST", "/secrets/a", "unknown"),
        ("HEAD", "/secrets", "unknown"),
        ("GET", "/", "unknown"),
    ],
)
def test_classify(azure: LocalAzure, method: str, path: str, operation: str) -> None:
    assert azure.keyvault.classify(method, path) == operation


def test_error_response_shape(azure: LocalAzure, spec: SpecValidator) -> None:
    response = azure.keyvault.error_response(503, "Injected fault.")
    assert response.status_code == 503 and response.media_type == JSON_UTF8
    body = json.loads(bytes(response.body))
    assert body == {"error": {"code": "ServiceUnavailable", "message": "Injected fault."}}
    spec.validate(body, "KeyVaultError")


def test_concurrent_writers_keep_a_consistent_history(azure: LocalAzure, client: SecretClient) -> None:
    name = unique()

    def write(i: int) -> str:
        if i % 2:
            return azure.keyvault.put_secret(name, f"in-process-{i}").version
        return client.set_secret(name, f"http-{i}").properties.version or ""

    with ThreadPoolExecutor(max_workers=8) as pool:
        written = set(pool.map(write, range(40)))
    history = azure.keyvault.versions(name)
    assert {v.version for v in history} == written and len(history) == 40
    assert history[0].previous_version is None
    assert all(b.previous_version == a.version for a, b in itertools.pairwise(history))


def test_many_gets_on_one_connection(azure: LocalAzure, officer_credential: DefaultAzureCredential) -> None:
    """300 GETs through one SecretClient: each reaches the service once and answers the same version.
    (Throughput is measured in bench/, "stack throughput", not asserted here.)"""
    with SecretClient(azure.vault_url, officer_credential) as client:
        versions = {client.get_secret(SECRET_NAME).properties.version for _ in range(300)}
    assert versions == {azure.keyvault.latest(SECRET_NAME).version}
    # Each GET once, plus the unauthenticated challenge request when this process has not cached the vault's
    # challenge yet (the SDK caches it per vault for the whole process, so it depends on test order).
    assert azure.keyvault.counters["GetSecret"] in (300, 301)
