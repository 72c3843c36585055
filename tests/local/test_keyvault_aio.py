"""The local Key Vault emulator driven by the asynchronous ``azure.keyvault.secrets.aio.SecretClient``.

Credentials are ``azure.identity.aio.DefaultAzureCredential()`` against the stack's managed-identity endpoint;
every response is validated against the spec by the same hook as the synchronous tests.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.core.pipeline import PipelineResponse
from azure.identity.aio import DefaultAzureCredential
from azure.keyvault.secrets.aio import SecretClient

from apimvault.local import SECRET_NAME, Identity, LocalAzure
from tests._support.keyvault import (
    NOT_FOUND,
    VERSION_RE,
    AsyncStaticToken,
    SpecValidator,
    challenge_resource,
    forged_token,
    header_of,
    text_of,
    unique,
)


@pytest.fixture(scope="module")
def spec() -> SpecValidator:
    return SpecValidator()


@pytest.fixture
async def officer_credential(azure: LocalAzure) -> AsyncIterator[DefaultAzureCredential]:
    with azure.env(AZURE_CLIENT_ID=azure.officer_identity.client_id):
        credential = DefaultAzureCredential()
    async with credential:
        yield credential


@pytest.fixture
async def client(
    azure: LocalAzure, officer_credential: DefaultAzureCredential, spec: SpecValidator
) -> AsyncIterator[SecretClient]:
    async with SecretClient(
        azure.vault_url, officer_credential, raw_response_hook=spec.hook
    ) as secret_client:
        yield secret_client


async def test_set_get_update(client: SecretClient, azure: LocalAzure) -> None:
    name = unique("aio")
    first = await client.set_secret(name, "v1", content_type="text/plain", tags={"a": "1"})
    second = await client.set_secret(name, "v2")
    assert VERSION_RE.match(first.properties.version or "")
    assert first.id == f"{azure.vault_url}/secrets/{name}/{first.properties.version}"
    assert second.properties.previous_version is None  # certificate-backed secrets only (issue 22.5)
    assert (await client.get_secret(name)).value == "v2"
    assert (await client.get_secret(name, first.properties.version)).value == "v1"
    updated = await client.update_secret_properties(name, first.properties.version, tags={"b": "2"})
    assert updated.tags == {"b": "2"} and updated.content_type == "text/plain"
    await client.update_secret_properties(name, enabled=False)
    with pytest.raises(HttpResponseError) as info:
        await client.get_secret(name)
    assert info.value.status_code == 403 and "SecretDisabled" in text_of(info.value)


async def test_list_versions_pages_one_at_a_time(client: SecretClient, azure: LocalAzure) -> None:
    name = unique("aio")
    created = [(await client.set_secret(name, f"v{i}")).properties.version for i in range(31)]
    azure.keyvault.counters.reset()
    listed = [p.version async for p in client.list_properties_of_secret_versions(name, max_page_size=1)]
    assert listed == created
    assert azure.keyvault.counters["GetSecretVersions"] >= 30


async def test_list_secrets_and_deleted_secrets(client: SecretClient) -> None:
    names = [unique("aio") for _ in range(3)]
    for name in names:
        await client.set_secret(name, "x")
    listed = {p.name async for p in client.list_properties_of_secrets(max_page_size=2)}
    assert set(names) <= listed
    for name in names:
        await client.delete_secret(name)
    deleted = {d.name async for d in client.list_deleted_secrets(max_page_size=1)}
    assert set(names) <= deleted
    with pytest.raises(HttpResponseError) as info:
        _ = [p async for p in client.list_properties_of_secrets(max_page_size=30)]
    assert info.value.status_code == 400


async def test_soft_delete_recover_purge(client: SecretClient) -> None:
    name = unique("aio")
    kept = await client.set_secret(name, "keep")
    deleted = await client.delete_secret(name)
    assert deleted.recovery_id and deleted.recovery_id.endswith(f"/deletedsecrets/{name}")
    assert deleted.deleted_date is not None and deleted.scheduled_purge_date is not None
    assert (deleted.scheduled_purge_date - deleted.deleted_date).total_seconds() == 90 * 86400
    assert (await client.get_deleted_secret(name)).name == name
    with pytest.raises(ResourceExistsError):
        await client.set_secret(name, "again")
    recovered = await client.recover_deleted_secret(name)
    assert recovered.version == kept.properties.version
    assert (await client.get_secret(name)).value == "keep"
    await client.delete_secret(name)
    await client.purge_deleted_secret(name)
    with pytest.raises(ResourceNotFoundError):
        await client.get_deleted_secret(name)


async def test_backup_restore(client: SecretClient) -> None:
    name = unique("aio")
    await client.set_secret(name, "one")
    await client.set_secret(name, "two")
    blob = await client.backup_secret(name)
    with pytest.raises(ResourceExistsError):
        await client.restore_secret_backup(blob)
    await client.delete_secret(name)
    await client.purge_deleted_secret(name)
    restored = await client.restore_secret_backup(blob)
    assert restored.name == name
    assert (await client.get_secret(name)).value == "two"
    assert len([p async for p in client.list_properties_of_secret_versions(name)]) == 2
    with pytest.raises(HttpResponseError) as info:
        await client.restore_secret_backup(b"not a backup")
    assert info.value.status_code == 400


async def test_not_found(client: SecretClient) -> None:
    name = unique("aio")
    with pytest.raises(ResourceNotFoundError) as info:
        await client.get_secret(name)
    assert info.value.error is not None and info.value.error.message == NOT_FOUND.format(name=name)
    with pytest.raises(ResourceNotFoundError):
        await client.delete_secret(name)
    with pytest.raises(ResourceNotFoundError):
        await client.recover_deleted_secret(name)


async def test_secret_scoped_user_with_default_identity(azure: LocalAzure, spec: SpecValidator) -> None:
    async with (
        DefaultAzureCredential() as credential,
        SecretClient(azure.vault_url, credential, raw_response_hook=spec.hook) as user,
    ):
        assert (await user.get_secret(SECRET_NAME)).value == azure.keyvault.latest(SECRET_NAME).value
        with pytest.raises(HttpResponseError) as info:
            await user.set_secret(SECRET_NAME, "overwrite")
        assert info.value.status_code == 403 and "ForbiddenByRbac" in text_of(info.value)
        with pytest.raises(HttpResponseError) as info:
            _ = [p async for p in user.list_properties_of_secrets()]
        assert info.value.status_code == 403


async def test_forged_expired_and_unknown_tokens(azure: LocalAzure, spec: SpecValidator) -> None:
    forged = AsyncStaticToken(forged_token(azure, azure.officer_identity))
    expired_token, expires_on = azure.tokens.issue(
        azure.officer_identity, challenge_resource(azure), lifetime_s=-10
    )
    for credential in (forged, AsyncStaticToken(expired_token, expires_on)):
        async with SecretClient(azure.vault_url, credential, raw_response_hook=spec.hook) as client:
            with pytest.raises(ClientAuthenticationError):
                await client.get_secret(SECRET_NAME)
    stranger, _ = azure.tokens.issue(Identity.new("aio-stranger"), challenge_resource(azure))
    async with SecretClient(
        azure.vault_url, AsyncStaticToken(stranger), raw_response_hook=spec.hook
    ) as client:
        with pytest.raises(HttpResponseError) as info:
            await client.get_secret(SECRET_NAME)
        assert info.value.status_code == 403


async def test_injected_faults(azure: LocalAzure, officer_credential: DefaultAzureCredential) -> None:
    async with SecretClient(azure.vault_url, officer_credential, retry_total=0) as client:
        await client.get_secret(SECRET_NAME)
        azure.keyvault.faults.inject("status", status=503, operation="GetSecret", times=1)
        with pytest.raises(HttpResponseError) as info:
            await client.get_secret(SECRET_NAME)
        assert info.value.status_code == 503
        azure.keyvault.faults.inject("throttle", operation="GetSecret", times=1, retry_after=3)
        with pytest.raises(HttpResponseError) as info:
            await client.get_secret(SECRET_NAME)
        assert info.value.status_code == 429 and header_of(info.value, "Retry-After") == "3"
        azure.keyvault.faults.inject("latency", operation="GetSecret", times=1, seconds=0.2)
        started = time.monotonic()
        assert (await client.get_secret(SECRET_NAME)).value
        assert time.monotonic() - started >= 0.2


async def test_client_request_id_round_trip(client: SecretClient, spec: SpecValidator) -> None:
    request_id = str(uuid.uuid4())
    echoed: list[str | None] = []

    def hook(response: PipelineResponse[Any, Any]) -> None:
        spec.hook(response)
        echoed.append(response.http_response.headers.get("x-ms-client-request-id"))

    secret = await client.get_secret(
        SECRET_NAME, headers={"x-ms-client-request-id": request_id}, raw_response_hook=hook
    )
    assert secret.value and echoed[-1] == request_id
