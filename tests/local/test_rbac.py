"""RBAC of the local stack from infra/roles/rotator.json, through the real SDK clients (issue 19.1).

The rotator identity holds exactly what infra/ assigns (the roles file's two custom roles, on one secret and
one APIM subscription); the local Key Vault refuses a missing data action with Key Vault's 403
``Forbidden``/``ForbiddenByRbac`` and the local ARM plane a missing action with ARM's 403
``AuthorizationFailed``. The Bicep and the stack read the same file.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.identity import DefaultAzureCredential
from azure.identity.aio import DefaultAzureCredential as AsyncDefaultAzureCredential
from azure.keyvault.secrets import SecretClient
from azure.keyvault.secrets.aio import SecretClient as AsyncSecretClient
from azure.mgmt.apimanagement import ApiManagementClient

from apimvault.local import Identity, LocalAzure
from apimvault.local.admin import AdminClient, AdminError
from apimvault.local.apim import Subscription
from apimvault.local.rbac import (
    APIM_ROTATOR_KEY,
    SECRET_ROTATOR_KEY,
    Rbac,
    RoleError,
    load_infra_roles,
    roles_file,
)
from apimvault.local.stack import APIM_SERVICE, ARM_SUBSCRIPTION, RESOURCE_GROUP

REPO = Path(__file__).resolve().parents[2]
ROLES_FILE = REPO / "infra" / "roles" / "rotator.json"
KV = "Microsoft.KeyVault/vaults/secrets/"
APIM = "Microsoft.ApiManagement/service/subscriptions/"


class App:
    """A secret and the APIM subscription whose key it holds, with an identity holding infra's roles."""

    def __init__(self, azure: LocalAzure, identity: Identity) -> None:
        tag = uuid.uuid4().hex[:8]
        self.name = f"rbac-{tag}"
        self.sub: Subscription = azure.apim_state.create_subscription(
            ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE, f"rbac-{tag}", display_name=f"rbac {tag}"
        )
        azure.keyvault.put_secret(self.name, self.sub.primary_key, tags={"CredentialId": "primary"})
        self.assignments = azure.grant_rotator_roles(
            identity, secret=self.name, apim_subscription=self.sub.sid
        )


@pytest.fixture
def rotator(azure: LocalAzure) -> Iterator[Identity]:
    """A fresh identity (so grants never leak between tests) that holds no role yet."""
    identity = azure.add_identity(f"rotator-{uuid.uuid4().hex[:6]}")
    yield identity
    azure.revoke_role(identity)


def credential_for(azure: LocalAzure, identity: Identity) -> DefaultAzureCredential:
    with azure.env():
        return DefaultAzureCredential(managed_identity_client_id=identity.client_id)


def kv_error(exc: HttpResponseError) -> dict[str, Any]:
    assert exc.response is not None
    return json.loads(exc.response.text())["error"]  # type: ignore[no-any-return]


def assert_forbidden_by_rbac(exc: HttpResponseError, action: str) -> None:
    assert exc.status_code == 403
    error = kv_error(exc)
    assert error["code"] == "Forbidden" and error["innererror"] == {"code": "ForbiddenByRbac"}
    lines = error["message"].split("\r\n")
    assert lines[0] == "Caller is not authorized to perform action on resource."
    assert f"Action: '{action}'" in lines


# ------------------------------------------------------------------------------------- one source


def test_the_bicep_and_the_local_stack_read_the_same_roles_file(azure: LocalAzure) -> None:
    doc = json.loads(ROLES_FILE.read_text())
    assert roles_file() == ROLES_FILE  # a source checkout reads infra/ itself
    # The stack enforces the file's roles...
    for key in (SECRET_ROTATOR_KEY, APIM_ROTATOR_KEY):
        role = azure.infra_roles[key]
        assert role.name == doc[key]["roleName"]
        assert list(role.data_actions) == doc[key]["dataActions"]
        assert list(role.actions) == doc[key]["actions"]
    assert KV + "update/action" in doc[SECRET_ROTATOR_KEY]["dataActions"]  # rotation writes tags
    # ...and the Bicep role definitions load them from that file, holding no action list of their own.
    for module, key, field in (
        ("secret.bicep", SECRET_ROTATOR_KEY, "dataActions"),
        ("apim.bicep", APIM_ROTATOR_KEY, "actions"),
    ):
        text = (REPO / "infra" / "modules" / module).read_text()
        assert f"loadJsonContent('../roles/rotator.json', '$.{key}.{field}')" in text, module
        assert not any(action in text for action in doc[key][field]), f"{module} repeats an action"
    pycep = pytest.importorskip("pycep", reason="pycep-parser is in the dev extra")
    assert pycep is not None
    from infra.checks.bicep import ROLE_DEFINITION, load_templates

    compiled = {}
    for template in load_templates():
        for _, res in template.of_type(ROLE_DEFINITION):
            permissions = res["config"]["properties"]["permissions"][0]
            compiled[template.name] = (permissions["actions"], permissions["dataActions"])
    assert compiled["modules/secret.bicep"] == ([], doc[SECRET_ROTATOR_KEY]["dataActions"])
    assert compiled["modules/apim.bicep"] == (doc[APIM_ROTATOR_KEY]["actions"], [])


def test_a_changed_roles_file_changes_what_the_stack_allows(tmp_path: Path) -> None:
    doc = json.loads(ROLES_FILE.read_text())
    narrowed = copy.deepcopy(doc)
    narrowed[SECRET_ROTATOR_KEY]["dataActions"].remove(KV + "update/action")
    path = tmp_path / "rotator.json"
    path.write_text(json.dumps(narrowed))
    scope = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/v/secrets/x"
    for roles, allowed in ((load_infra_roles(), True), (load_infra_roles(path), False)):
        rbac = Rbac(roles.values())
        rbac.assign("oid-1", roles[SECRET_ROTATOR_KEY].name, scope)
        assert rbac.allowed("oid-1", KV + "update/action", scope, data=True) is allowed
        assert rbac.allowed("oid-1", KV + "getSecret/action", scope, data=True) is True
        assert rbac.allowed("oid-1", KV + "getSecret/action", scope, data=False) is False  # data plane only
        assert rbac.allowed("oid-1", KV + "delete", scope, data=True) is False
    path.write_text(json.dumps({"x": {"roleName": "x", "actions": "all"}}))
    with pytest.raises(RoleError, match="list of non-empty strings"):
        load_infra_roles(path)


def test_role_matching_follows_azure_wildcards_and_scopes() -> None:
    rbac = Rbac(())
    vault = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/v"
    rbac.assign("a", "Key Vault Secrets Officer", vault)
    assert rbac.allowed("a", KV + "purge/action", vault + "/secrets/any", data=True)  # secrets/* below it
    assert not rbac.allowed("a", KV + "purge/action", vault + "x/secrets/any", data=True)  # a sibling vault
    assert not rbac.allowed("b", KV + "getSecret/action", vault, data=True)  # another principal
    rbac.assign("c", "key vault secrets user", vault + "/secrets/one")  # role names are case-insensitive
    assert rbac.allowed("c", KV.lower() + "GETSECRET/action", vault + "/SECRETS/ONE", data=True)
    assert not rbac.allowed("c", KV + "getSecret/action", vault + "/secrets/two", data=True)
    assert rbac.revoke("c") == 1 and not rbac.allowed("c", KV + "getSecret/action", vault, data=True)
    with pytest.raises(RoleError, match="unknown role"):
        rbac.assign("a", "Owner", vault)
    with pytest.raises(RoleError, match="ARM resource id"):
        rbac.assign("a", "Key Vault Secrets User", "vault")


# ---------------------------------------------------------------------------------- identities


def test_the_identity_endpoint_mints_distinct_tokens_per_identity(azure: LocalAzure) -> None:
    claims = {}
    for identity in (azure.rotator_identity, azure.default_identity, azure.officer_identity):
        with azure.env():
            credential = DefaultAzureCredential(
                managed_identity_client_id=None if identity is azure.default_identity else identity.client_id
            )
        try:
            token = credential.get_token("https://vault.azure.net/.default").token
        finally:
            credential.close()
        claims[identity.name] = azure.tokens.verify(token)
    assert {c["oid"] for c in claims.values()} == {
        azure.rotator_identity.object_id,
        azure.default_identity.object_id,
        azure.officer_identity.object_id,
    }
    assert claims["rotator"]["appid"] == azure.rotator_identity.client_id


# ---------------------------------------------------------------------------------- Key Vault


def test_rotator_has_exactly_infras_data_actions_sync(azure: LocalAzure, rotator: Identity) -> None:
    app = App(azure, rotator)
    other = App(azure, azure.add_identity("bystander"))
    credential = credential_for(azure, rotator)
    try:
        with SecretClient(azure.vault_url, credential) as client:
            secret = client.get_secret(app.name)  # getSecret
            assert secret.value == app.sub.primary_key
            version = secret.properties.version
            client.update_secret_properties(app.name, version, tags={"RotationPending": "x"})  # update
            client.set_secret(app.name, app.sub.secondary_key, tags={"CredentialId": "secondary"})
            versions = list(client.list_properties_of_secret_versions(app.name))  # readMetadata
            assert len(versions) == 2
            with pytest.raises(HttpResponseError) as info:
                client.begin_delete_secret(app.name)
            assert_forbidden_by_rbac(info.value, KV + "delete")
            with pytest.raises(HttpResponseError) as info:
                client.backup_secret(app.name)
            assert_forbidden_by_rbac(info.value, KV + "backup/action")
            with pytest.raises(HttpResponseError) as info:  # another secret: the assignment is on one secret
                client.get_secret(other.name)
            assert_forbidden_by_rbac(info.value, KV + "getSecret/action")
            with pytest.raises(HttpResponseError) as info:  # listing needs vault scope
                list(client.list_properties_of_secrets())
            assert_forbidden_by_rbac(info.value, KV + "readMetadata/action")
    finally:
        credential.close()
        azure.revoke_role(azure.add_identity("bystander"))
    assert azure.keyvault.latest(app.name).value == app.sub.secondary_key


def test_a_missing_data_action_is_the_real_403_and_granting_it_works_sync(
    azure: LocalAzure, rotator: Identity
) -> None:
    app = App(azure, rotator)
    azure.revoke_role(rotator, azure.infra_roles[SECRET_ROTATOR_KEY].name)
    azure.assign_role(rotator, "Key Vault Secrets User", azure.secret_scope(app.name))  # read only
    credential = credential_for(azure, rotator)
    try:
        with SecretClient(azure.vault_url, credential) as client:
            version = client.get_secret(app.name).properties.version
            with pytest.raises(HttpResponseError) as info:
                client.update_secret_properties(app.name, version, tags={"RotationPending": "x"})
            assert_forbidden_by_rbac(info.value, KV + "update/action")
            message = kv_error(info.value)["message"]
            assert f"oid={rotator.object_id}" in message and f"appid={rotator.client_id}" in message
            assert f"/secrets/{app.name}'" in message
            with pytest.raises(HttpResponseError) as info:
                client.set_secret(app.name, "new-value")
            assert_forbidden_by_rbac(info.value, KV + "setSecret/action")
            assert len(azure.keyvault.versions(app.name)) == 1  # nothing was written
            azure.grant_rotator_roles(rotator, secret=app.name, apim_subscription=app.sub.sid)
            client.update_secret_properties(app.name, version, tags={"RotationPending": "x"})
    finally:
        credential.close()
    assert (azure.keyvault.latest(app.name).tags or {})["RotationPending"] == "x"


async def test_a_missing_data_action_is_the_real_403_aio(azure: LocalAzure, rotator: Identity) -> None:
    app = App(azure, rotator)
    azure.revoke_role(rotator, azure.infra_roles[SECRET_ROTATOR_KEY].name)
    azure.assign_role(rotator, "Key Vault Secrets User", azure.secret_scope(app.name))
    with azure.env():
        credential = AsyncDefaultAzureCredential(managed_identity_client_id=rotator.client_id)
    async with credential, AsyncSecretClient(azure.vault_url, credential) as client:
        version = (await client.get_secret(app.name)).properties.version
        with pytest.raises(HttpResponseError) as info:
            await client.update_secret_properties(app.name, version, tags={"RotationPending": "x"})
        assert_forbidden_by_rbac(info.value, KV + "update/action")
        with pytest.raises(HttpResponseError) as info:
            await client.set_secret(app.name, "new-value")
        assert_forbidden_by_rbac(info.value, KV + "setSecret/action")
        azure.grant_rotator_roles(rotator, secret=app.name, apim_subscription=app.sub.sid)
        updated = await client.update_secret_properties(app.name, version, tags={"RotationPending": "y"})
        assert (updated.tags or {})["RotationPending"] == "y"
        await client.set_secret(app.name, app.sub.secondary_key)
    assert azure.keyvault.latest(app.name).value == app.sub.secondary_key


# ------------------------------------------------------------------------------------------ ARM


def test_arm_enforces_the_rotator_actions(azure: LocalAzure, rotator: Identity) -> None:
    app = App(azure, rotator)
    azure.revoke_role(rotator, azure.infra_roles[APIM_ROTATOR_KEY].name)  # Key Vault role only, for now
    credential = credential_for(azure, rotator)
    sub_scope = azure.apim_subscription_scope(app.sub.sid)
    try:
        with ApiManagementClient(credential, ARM_SUBSCRIPTION, base_url=azure.arm_url) as mgmt:
            with pytest.raises(HttpResponseError) as info:
                mgmt.subscription.list_secrets(RESOURCE_GROUP, APIM_SERVICE, app.sub.sid)
            assert info.value.status_code == 403
            assert info.value.error is not None and info.value.error.code == "AuthorizationFailed"
            assert info.value.error.message == (
                f"The client '{rotator.client_id}' with object id '{rotator.object_id}' does not have "
                f"authorization to perform action '{APIM}listSecrets/action' over scope '{sub_scope}' or "
                "the scope is invalid. If access was recently granted, please refresh your credentials."
            )
            before = app.sub.primary_key
            with pytest.raises(HttpResponseError, match="regeneratePrimaryKey/action"):
                mgmt.subscription.regenerate_primary_key(RESOURCE_GROUP, APIM_SERVICE, app.sub.sid)
            assert app.sub.primary_key == before  # refused before anything changed

            azure.grant_rotator_roles(rotator, secret=app.name, apim_subscription=app.sub.sid)
            keys = mgmt.subscription.list_secrets(RESOURCE_GROUP, APIM_SERVICE, app.sub.sid)
            assert keys.primary_key == app.sub.primary_key
            assert mgmt.subscription.get(RESOURCE_GROUP, APIM_SERVICE, app.sub.sid).name == app.sub.sid
            mgmt.subscription.regenerate_secondary_key(RESOURCE_GROUP, APIM_SERVICE, app.sub.sid)
            assert app.sub.secondary_key != keys.secondary_key
            # The assignment is on one APIM subscription: not the service's list, not another subscription.
            with pytest.raises(HttpResponseError, match="does not have authorization"):
                list(mgmt.subscription.list(RESOURCE_GROUP, APIM_SERVICE))
            with pytest.raises(HttpResponseError) as info:
                mgmt.subscription.list_secrets(RESOURCE_GROUP, APIM_SERVICE, "apimvault-app")
            assert info.value.status_code == 403 and "apimvault-app" in str(info.value)
    finally:
        credential.close()


def test_rotation_runs_as_the_identity_with_exactly_infras_roles(azure: LocalAzure) -> None:
    """The seeded rotator identity rotates the seeded-shape secret with only infra's roles."""
    from apimvault.rotation import rotate

    identity = azure.add_identity(f"rotator-{uuid.uuid4().hex[:6]}")
    app = App(azure, identity)
    tags = {"CredentialId": "primary", "ValidityPeriodDays": "60", "ProviderAddress": app.sub.id}
    azure.keyvault.put_secret(app.name, app.sub.primary_key, tags=tags)
    held = {(a.role, a.scope) for a in azure.rbac.assignments(identity)}
    assert held == {
        (azure.infra_roles[SECRET_ROTATOR_KEY].name, azure.secret_scope(app.name)),
        (azure.infra_roles[APIM_ROTATOR_KEY].name, azure.apim_subscription_scope(app.sub.sid)),
    }
    credential = credential_for(azure, identity)
    try:
        with azure.env():
            result = rotate(
                vault_url=azure.vault_url,
                secret_name=app.name,
                apim_subscription_id=None,
                credential=credential,
            )
    finally:
        credential.close()
        azure.revoke_role(identity)
    latest = azure.keyvault.latest(app.name)
    assert not result.skipped and latest.value == app.sub.secondary_key
    assert (latest.tags or {})["CredentialId"] == "secondary"


def test_seeded_rotator_and_rotate_as(azure: LocalAzure) -> None:
    held = {(a.role, a.scope) for a in azure.rbac.assignments(azure.rotator_identity)}
    assert held == {
        (azure.infra_roles[SECRET_ROTATOR_KEY].name, azure.secret_scope()),
        (azure.infra_roles[APIM_ROTATOR_KEY].name, azure.apim_subscription_scope()),
    }
    app = {(a.role, a.scope) for a in azure.rbac.assignments(azure.app_identity)}
    assert ("Key Vault Secrets User", azure.secret_scope()) in app  # as infra's app identity
    assert "APIMVAULT_ROTATOR_CLIENT_ID" not in azure.environ()  # the default rotates as the officer
    assert azure.rotation_identity == azure.officer_identity
    stack = LocalAzure(ca=azure.ca, seed=False, rotate_as="rotator")  # not started: environ only
    try:
        assert stack.environ()["APIMVAULT_ROTATOR_CLIENT_ID"] == stack.rotator_identity.client_id
        assert stack.rotation_identity == stack.rotator_identity
    finally:
        stack.stop()
    with pytest.raises(ValueError, match="rotate_as"):
        LocalAzure(ca=azure.ca, rotate_as="owner")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- admin API


def test_admin_api_manages_identities_and_roles(azure: LocalAzure) -> None:
    name = f"drill-rotator-{uuid.uuid4().hex[:6]}"
    with AdminClient(azure.admin.url, azure.ca_path, token=azure.admin_token) as admin:
        roles = {r["roleName"]: r for r in admin.roles()}
        secret_role = azure.infra_roles[SECRET_ROTATOR_KEY].name
        assert roles[secret_role]["type"] == "CustomRole"
        assert roles["Key Vault Secrets Officer"]["dataActions"] == [KV + "*"]
        made = admin.add_identity(name)
        assert made == admin.add_identity(name)  # idempotent per name
        assert made["client_id"] in {i["client_id"] for i in admin.identities()}
        granted = admin.grant_rotator_roles(made["client_id"])  # the seeded secret and subscription
        assert {g["roleName"] for g in granted} == {secret_role, azure.infra_roles[APIM_ROTATOR_KEY].name}
        admin.assign_role(name, "Key Vault Secrets User", secret="another-secret")
        mine = [a for a in admin.assignments() if a["principalId"] == made["object_id"]]
        assert len(mine) == 3 and {a["principalName"] for a in mine} == {name}
        assert azure.rbac.allowed(made["object_id"], KV + "update/action", azure.secret_scope(), data=True)
        assert admin.revoke_role(made["object_id"], "Key Vault Secrets User") == 1
        assert admin.revoke_role(name) == 2
        assert not azure.rbac.assignments(made["object_id"])
        calls: list[tuple[Callable[[], object], str]] = [
            (lambda: admin.assign_role(name, "Owner", secret="x"), "unknown role"),
            (lambda: admin.assign_role("nobody", "Key Vault Secrets User", secret="x"), "no identity"),
            (lambda: admin.assign_role(name, "Key Vault Secrets User"), "scope"),
            (lambda: admin.assign_role(name, "Key Vault Secrets User", secret="x", scope="/y"), "one of"),
            (lambda: admin.assign_role(name, "Key Vault Secrets User", scope="vault"), "ARM resource id"),
            (lambda: admin.add_identity(""), "name"),
        ]
        for call, match in calls:
            with pytest.raises(AdminError, match=match) as info:
                call()
            assert info.value.status == 400
        assert not azure.rbac.assignments(made["object_id"])  # refused calls changed nothing
