"""Our own policy tests over the parsed Bicep (what checkov does not check, or checks vacuously).

Every check runs over the real templates (must find nothing) and over a deliberately bad snippet (must
flag it), so none of them can pass by not looking.
"""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("pycep", reason="pycep-parser is in the dev extra")

from infra.checks.bicep_policy import (
    APIM_SUBSCRIPTION,
    EVENT_SUBSCRIPTION,
    INFRA,
    SECRET,
    SECRETS_OFFICER,
    SECRETS_USER,
    SYSTEM_TOPIC,
    V2_TIERS,
    Template,
    check_action_groups,
    check_alerts,
    check_apim,
    check_apim_logging,
    check_custom_role_ordering,
    check_function_apps,
    check_function_egress,
    check_key_vaults,
    check_outputs_and_parameters,
    check_role_assignments,
    check_rotation_secret,
    check_secret_seeding,
    check_token_limits,
    custom_property_branches,
    custom_role_kind,
    dotted,
    parse_text,
    role_grants,
)

from tests._support.bicep import BAD_SECRET


def _one(templates: list[Template], name: str) -> Template:
    return next(t for t in templates if t.name == name)


# ----------------------------------------------------------------------------------- the real templates


def test_every_bicep_file_parses(templates: list[Template]) -> None:
    names = {t.name for t in templates}
    assert {
        "main.bicep",
        "modules/keyvault.bicep",
        "modules/secret.bicep",
        "modules/apim.bicep",
        "modules/rotation.bicep",
    } <= names


def test_key_vault_rbac_soft_delete_purge_protection_network_and_diagnostics(
    templates: list[Template],
) -> None:
    assert check_key_vaults(templates) == []
    assert sum(1 for t in templates for _ in t.of_type("Microsoft.KeyVault/vaults")) == 1


def test_key_vault_network_default_deny_and_private_by_default(templates: list[Template]) -> None:
    """Covers CKV_AZURE_189, which raises inside checkov on the expression (checkov-known-errors.txt)."""
    kv = _one(templates, "modules/keyvault.bicep")
    assert kv.parameters["networkMode"]["default"] == "private"
    assert kv.variables["publicAccess"]["value"]["operator"]["operands"] == {
        "condition": "devAllowList",
        "true_value": "Enabled",
        "false_value": "Disabled",
    }
    assert kv.variables["devAllowList"]["value"]["operator"] == {
        "type": "equals",
        "operands": {"operand_1": "networkMode", "operand_2": "ipAllowList"},
    }
    main = _one(templates, "main.bicep")
    assert main.parameters["keyVaultNetworkMode"]["default"] == "private"
    params = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert params["keyVaultNetworkMode"]["value"] == "private"


def test_role_assignments_are_scoped_to_the_secret_or_the_apim_subscription(
    templates: list[Template],
) -> None:
    assert check_role_assignments(templates) == []


def test_the_expected_least_privilege_grants_exist(templates: list[Template]) -> None:
    grants = role_grants(templates)
    assert (SECRETS_USER, '"appPrincipalId"', SECRET) in grants
    # The rotator: a custom data role with only get/set/readMetadata on the secret (Secrets Officer could
    # also delete, purge, back up and restore), and the four-action custom role on the APIM subscription.
    assert ("custom:secret-rotator", '"rotatorPrincipalId"', SECRET) in grants
    assert ("custom:apim-key-rotator", '"rotatorPrincipalId"', APIM_SUBSCRIPTION) in grants
    assert not [g for g in grants if g[0] == SECRETS_OFFICER]
    # The app identity gets nothing else; the rotator nothing beyond the secret and the APIM subscription.
    assert {g for g in grants if g[1] == '"appPrincipalId"'} == {(SECRETS_USER, '"appPrincipalId"', SECRET)}
    assert {g[2] for g in grants if g[1] == '"rotatorPrincipalId"'} == {SECRET, APIM_SUBSCRIPTION}


def test_custom_roles_are_assignable_on_one_resource_and_assigned_only_on_the_second_deployment(
    templates: list[Template],
) -> None:
    """Issue 15 points 6-8: exact permissions, a single resource as assignable scope, and no assignment of a
    role definition created in the same deployment (phase 2 assigns what phase 1 defined)."""
    assert check_custom_role_ordering(templates) == []
    kinds = {}
    for t in templates:
        for _, res in t.of_type("Microsoft.Authorization/roleDefinitions"):
            kinds[custom_role_kind(res)] = (t.name, res["config"]["properties"]["assignableScopes"])
    assert set(kinds) == {"apim-key-rotator", "secret-rotator"}
    assert kinds["secret-rotator"][1] == [
        {"operator": {"type": "property_accessor", "operands": {"operand_1": "vault", "operand_2": "id"}}}
    ]
    assert kinds["apim-key-rotator"][1] == [
        {"operator": {"type": "property_accessor", "operands": {"operand_1": "apim", "operand_2": "id"}}}
    ]
    # Both role assignments hang on the phase-2 switch.
    main = _one(templates, "main.bicep")
    assert main.modules["apim"]["config"]["params"]["assignRotatorRole"] == "enableRotationEventSubscription"
    assert (
        main.modules["secret"]["config"]["params"]["assignRotatorRole"] == "enableRotationEventSubscription"
    )
    for name, symbol in (
        ("modules/apim.bicep", "rotatorOnSubscription"),
        ("modules/secret.bicep", "rotatorSecretRotator"),
    ):
        t = _one(templates, name)
        assert t.resources[symbol]["config"]["condition"] == "assignRotatorRole"
        assert t.parameters["assignRotatorRole"]["default"] is False


def test_main_wires_each_identity_to_its_own_principal_parameter(templates: list[Template]) -> None:
    main = _one(templates, "main.bicep")
    wiring = {}
    for symbol, mod in main.modules.items():
        for key, value in ((mod.get("config") or {}).get("params") or {}).items():
            if key.endswith("PrincipalId"):
                wiring[(symbol, key)] = dotted(value)
    assert wiring[("secret", "appPrincipalId")] == "identities.outputs.appPrincipalId"
    assert wiring[("secret", "rotatorPrincipalId")] == "identities.outputs.rotatorPrincipalId"
    assert wiring[("apim", "rotatorPrincipalId")] == "identities.outputs.rotatorPrincipalId"
    assert all(v == f"identities.outputs.{k[1]}" for k, v in wiring.items()), wiring


def test_no_key_in_outputs_or_parameter_defaults(templates: list[Template]) -> None:
    assert check_outputs_and_parameters(templates) == []
    params = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    main = _one(templates, "main.bicep")
    assert set(params) <= set(main.parameters), "main.parameters.json names a parameter main.bicep lacks"
    key_like = re.compile(r"password|secretvalue|primarykey|secondarykey|subscriptionkey|apikey", re.I)
    assert not [name for name in params if key_like.search(name)]
    values = json.dumps(params)
    assert not re.search(r"[0-9a-f]{32}", values), "main.parameters.json holds something key-shaped"


def test_main_outputs_are_the_apimvault_environment(templates: list[Template]) -> None:
    outputs = set(_one(templates, "main.bicep").outputs)
    assert {
        "AZURE_KEYVAULT_URL",
        "APIMVAULT_SECRET_NAME",
        "AZURE_CLIENT_ID",
        "AZURE_OPENAI_ENDPOINT",
        "OPENAI_API_VERSION",
        "APIMVAULT_APIM_SUBSCRIPTION_ID",
    } <= outputs


def test_apim_tls_min_api_version_subscription_header_and_tracing_off(templates: list[Template]) -> None:
    """CKV_AZURE_173 passes vacuously on Bicep (pycep keeps the quotes of quoted keys), so TLS is here."""
    assert check_apim(templates) == []
    assert sum(1 for t in templates for _ in t.of_type(APIM_SUBSCRIPTION)) == 1


def test_secret_rotation_tags_expiry_and_seed(templates: list[Template]) -> None:
    assert check_rotation_secret(templates) == []
    secret = _one(templates, "modules/secretSeed.bicep")
    assert secret.parameters["validityDays"]["default"] == 60
    main = _one(templates, "main.bicep")
    assert main.parameters["secretValidityDays"]["default"] == 60
    assert main.decorator("secretValidityDays", "min_value") > 30
    params = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert params["secretValidityDays"]["value"] > 30


QUEUE = "Microsoft.Storage/storageAccounts/queueServices/queues"
QUEUE_CONTRIBUTOR = "974c5e8b-45b9-4653-ba55-5f855dd0fb88"  # Storage Queue Data Contributor
QUEUE_SENDER = "c6a89b2d-59bc-44d0-9896-0f6e12d7b80a"  # Storage Queue Data Message Sender
QUEUE_ROLES = {QUEUE_CONTRIBUTOR, QUEUE_SENDER}
SYSTEM_TOPIC_PRINCIPAL = {
    "operator": {
        "type": "property_accessor",
        "operands": {
            "operand_1": "systemTopic",
            "operand_2": {
                "operator": {
                    "type": "property_accessor",
                    "operands": {"operand_1": "identity", "operand_2": "principalId"},
                }
            },
        },
    }
}


def test_near_expiry_event_subscription_filtered_with_retry_and_dead_letter(
    templates: list[Template],
) -> None:
    rotation = _one(templates, "modules/rotation.bicep")
    ((_, topic),) = rotation.of_type(SYSTEM_TOPIC)
    assert topic["config"]["properties"]["topicType"] == "Microsoft.KeyVault.vaults"
    ((_, sub),) = rotation.of_type(EVENT_SUBSCRIPTION)
    assert sub["config"]["condition"] == "enableEventSubscription"  # phase 2 of the rollout (README)
    p = sub["config"]["config"]["properties"]
    assert p["filter"]["includedEventTypes"] == ["Microsoft.KeyVault.SecretNearExpiry"]
    assert p["filter"]["subjectBeginsWith"] == p["filter"]["subjectEndsWith"] == "secretName"
    assert p["filter"]["isSubjectCaseSensitive"] is True
    assert p["retryPolicy"]["maxDeliveryAttempts"] >= 1
    dead_letter = p["deadLetterWithResourceIdentity"]["deadLetterDestination"]
    assert dead_letter["endpointType"] == "StorageBlob"


def test_events_reach_the_function_through_a_queue_on_its_own_storage_account(
    templates: list[Template],
) -> None:
    """Issue 19 item 4: Event Grid -> Storage queue (system identity, Message Sender on that queue only) ->
    queue trigger (host identity, Queue Data Contributor on the queue and its poison queue only), read
    through a queue private endpoint; a message in the poison queue pages."""
    rotation = _one(templates, "modules/rotation.bicep")
    ((_, sub),) = rotation.of_type(EVENT_SUBSCRIPTION)
    config = sub["config"]["config"]
    p = config["properties"]
    assert "destination" not in p  # no push to the function: its 30 s answer window is too short
    delivery = p["deliveryWithResourceIdentity"]
    assert delivery["identity"] == {"type": "SystemAssigned"}  # the only kind a storage firewall admits
    destination = delivery["destination"]
    assert destination["endpointType"] == "StorageQueue"
    queue_name = rotation.resolve(destination["properties"]["queueName"])
    handler_py = (INFRA.parent / "src" / "apimvault" / "rotation" / "function.py").read_text()  # the handler
    assert queue_name == "apimvault-rotation-events"
    assert f'ROTATION_QUEUE = "{queue_name}"' in handler_py
    assert json.dumps(destination["properties"]["resourceId"]) == json.dumps(
        {"operator": {"type": "property_accessor", "operands": {"operand_1": "storage", "operand_2": "id"}}}
    )
    assert "topicQueueSender" in config["dependsOn"]
    queues = {rotation.resolve(res["config"]["name"]) for _, res in rotation.of_type(QUEUE)}
    assert queues == {queue_name, "${rotationQueueName}-poison"}
    # Grants on queues: exactly the topic's sender role and the host's contributor role, scoped to queues.
    grants = {g for g in role_grants(templates) if g[0] in QUEUE_ROLES or g[2] == QUEUE}
    assert grants == {
        (QUEUE_CONTRIBUTOR, '"functionHostPrincipalId"', QUEUE),
        (QUEUE_SENDER, json.dumps(SYSTEM_TOPIC_PRINCIPAL), QUEUE),
    }
    scopes = {
        symbol: res["config"]["scope"]
        for symbol, res in rotation.of_type("Microsoft.Authorization/roleAssignments")
        if "Queue" in symbol
    }
    assert scopes == {
        "hostRotationQueueContributor": "rotationQueue",
        "hostPoisonQueueContributor": "poisonQueue",
        "topicQueueSender": "rotationQueue",
    }
    # The trigger's connection: the host's identity-based AzureWebJobsStorage (no key, no connection string).
    settings = {
        s["name"]: s["value"]
        for s in rotation.resources["functionApp"]["config"]["properties"]["siteConfig"]["appSettings"]
    }
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    assert not [n for n in settings if n.startswith("AzureWebJobsStorage") and "onnection" in n]
    function_app_py = (INFRA / "rotation_function" / "function_app.py").read_text()
    assert 'QUEUE_CONNECTION = "AzureWebJobsStorage"' in function_app_py
    assert rotation.modules["queuePrivateEndpoint"]["config"]["params"]["groupId"] == "queue"
    assert "queuePrivateEndpoint" in rotation.resources["functionApp"]["config"]["dependsOn"]
    main = _one(templates, "main.bicep")
    assert main.modules["rotation"]["config"]["params"]["queueDnsZoneId"] == {
        "operator": {
            "type": "property_accessor",
            "operands": {
                "operand_1": "network",
                "operand_2": {
                    "operator": {
                        "type": "property_accessor",
                        "operands": {"operand_1": "outputs", "operand_2": "queueDnsZoneId"},
                    }
                },
            },
        }
    }
    # The poison alert: a log query on the account's queue writes, paging the action group, until closed.
    alerts = _one(templates, "modules/alerts.bicep")
    poisoned = alerts.resources["rotationPoisoned"]["config"]["properties"]
    query = json.dumps(alerts.resolve(poisoned["criteria"]["allOf"][0]["query"]))
    assert "StorageQueueLogs" in query and "PutMessage" in query and '"arg_2": "poisonQueueName"' in query
    assert poisoned["autoMitigate"] is False
    # the group created in alerts.bicep (plus the optional existing one)
    assert poisoned["actions"]["actionGroups"] == "queryAlertActionGroups"
    assert "poisonQueueName" in json.dumps(main.modules["alerts"]["config"]["params"]["poisonQueueName"])
    diagnostics = [
        res
        for _, res in rotation.of_type("Microsoft.Insights/diagnosticSettings")
        if res["config"].get("scope") == "queueService"
    ]
    assert [log["category"] for log in diagnostics[0]["config"]["properties"]["logs"]] == [
        "StorageWrite",
        "StorageDelete",
    ]


def test_backend_local_auth_disabled_and_apim_uses_managed_identity(templates: list[Template]) -> None:
    openai = _one(templates, "modules/openai.bicep")
    ((_, account),) = openai.of_type("Microsoft.CognitiveServices/accounts")
    assert account["config"]["properties"]["disableLocalAuth"] is True
    assert account["config"]["properties"]["publicNetworkAccess"] == "Disabled"
    policy = (INFRA / "modules" / "policies" / "openai-api.xml").read_text()
    assert '<authentication-managed-identity resource="https://cognitiveservices.azure.com"' in policy
    assert '<set-header name="Ocp-Apim-Subscription-Key" exists-action="delete" />' in policy


def test_function_identity_is_the_rotator_and_function_name_matches(templates: list[Template]) -> None:
    rotation = _one(templates, "modules/rotation.bicep")
    settings = {
        s["name"]: s["value"]
        for s in rotation.resources["functionApp"]["config"]["properties"]["siteConfig"]["appSettings"]
    }
    assert settings["AZURE_CLIENT_ID"] == "rotatorClientId"
    assert settings["AzureWebJobsStorage__clientId"] == "functionHostClientId"
    app_py = (INFRA / "rotation_function" / "function_app.py").read_text()
    assert f'FUNCTION_NAME = "{rotation.parameters["functionName"]["default"]}"' in app_py


def test_rotation_function_probes_every_apim_gateway(templates: list[Template]) -> None:
    """Make-before-break needs the gateway list in the function: APIMVAULT_GATEWAY_URLS, comma separated,
    from a required, non-empty parameter that main.bicep fills with the APIM gateway URL."""
    rotation = _one(templates, "modules/rotation.bicep")
    settings = {
        s["name"]: s["value"]
        for s in rotation.resources["functionApp"]["config"]["properties"]["siteConfig"]["appSettings"]
    }
    joined = settings["APIMVAULT_GATEWAY_URLS"]["function"]
    assert joined["type"] == "join"
    assert joined["parameters"] == {"input_array": "apimGatewayUrls", "delimiter": ","}
    assert rotation.parameters["apimGatewayUrls"]["type"] == "array"
    assert rotation.parameters["apimGatewayUrls"]["default"] is None  # required: no silent fallback
    assert rotation.decorator("apimGatewayUrls", "min_length") == 1
    main = _one(templates, "main.bicep")
    passed = json.dumps(main.modules["rotation"]["config"]["params"]["apimGatewayUrls"])
    assert '"apim"' in passed and '"gatewayUrl"' in passed


# ------------------------------------------------------------------------- each check can fail (negative)

BAD_VAULT = """
resource kv 'Microsoft.KeyVault/vaults@2024-11-01' = {
  name: 'kv'
  properties: {
    enableRbacAuthorization: false
    softDeleteRetentionInDays: 7
    enablePurgeProtection: false
    enabledForDeployment: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
    }
  }
}
"""

BAD_ROLE_ASSIGNMENTS = """
param appPrincipalId string
param rotatorPrincipalId string
var user = '4633458b-17de-408a-b874-0445c86b69e6'
var officer = 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
resource kv 'Microsoft.KeyVault/vaults@2024-11-01' existing = {
  name: 'kv'
}
resource apimSub 'Microsoft.ApiManagement/service/subscriptions@2024-05-01' existing = {
  name: 'apim/sub'
}
resource vaultWide 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid('a')
  scope: kv
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', user)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}
resource groupWide 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid('b')
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', officer)
    principalId: rotatorPrincipalId
    principalType: 'ServicePrincipal'
  }
}
resource secret 'Microsoft.KeyVault/vaults/secrets@2024-11-01' existing = {
  parent: kv
  name: 's'
}
resource officerOnSecret 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid('d')
  scope: secret
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', officer)
    principalId: rotatorPrincipalId
    principalType: 'ServicePrincipal'
  }
}
resource groupScopedRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid('e')
  properties: {
    roleName: 'right actions, resource-group scope'
    permissions: [
      {
        actions: [
          'Microsoft.ApiManagement/service/subscriptions/read'
          'Microsoft.ApiManagement/service/subscriptions/listSecrets/action'
          'Microsoft.ApiManagement/service/subscriptions/regeneratePrimaryKey/action'
          'Microsoft.ApiManagement/service/subscriptions/regenerateSecondaryKey/action'
        ]
      }
    ]
    assignableScopes: [
      resourceGroup().id
    ]
  }
}
resource sameDeployment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid('f')
  scope: secret
  properties: {
    roleDefinitionId: groupScopedRole.id
    principalId: rotatorPrincipalId
    principalType: 'ServicePrincipal'
  }
}
resource broadRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid('c')
  properties: {
    roleName: 'too broad'
    permissions: [
      {
        actions: [
          'Microsoft.ApiManagement/service/*'
        ]
      }
    ]
    assignableScopes: [
      resourceGroup().id
    ]
  }
}
"""

BAD_OUTPUTS = """
@secure()
param adminPassword string = 'hunter2'
resource apimSub 'Microsoft.ApiManagement/service/subscriptions@2024-05-01' existing = {
  name: 'apim/sub'
}
resource secret 'Microsoft.KeyVault/vaults/secrets@2024-11-01' existing = {
  name: 'kv/s'
}
output key string = apimSub.listSecrets().primaryKey
output second string = apimSub.listSecrets().secondaryKey
output value string = secret.properties.value
output echo string = adminPassword
output apiKey string = 'x'
"""

BAD_APIM = """
resource apim 'Microsoft.ApiManagement/service@2024-05-01' = {
  name: 'apim'
  properties: {
    customProperties: {
      'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Tls10': 'True'
    }
  }
}
resource api 'Microsoft.ApiManagement/service/apis@2024-05-01' = {
  parent: apim
  name: 'api'
  properties: {
    subscriptionRequired: false
    subscriptionKeyParameterNames: {
      header: 'api-key'
    }
  }
}
resource sub 'Microsoft.ApiManagement/service/subscriptions@2024-05-01' = {
  parent: apim
  name: 'master'
  properties: {
    scope: '/apis'
    allowTracing: true
  }
}
resource quiet 'Microsoft.ApiManagement/service/subscriptions@2024-05-01' = {
  parent: apim
  name: 'other'
  properties: {
    scope: '/products/p'
  }
}
"""


@pytest.mark.parametrize(
    ("check", "snippet", "expected"),
    [
        pytest.param(
            check_key_vaults,
            BAD_VAULT,
            [
                "enableRbacAuthorization is not true",
                "enableSoftDelete is not set true explicitly",
                "softDeleteRetentionInDays is not 90",
                "enablePurgeProtection is not true",
                "enabledForDeployment is not false",
                "enabledForTemplateDeployment is not false",
                "networkAcls.defaultAction is not Deny",
                "publicNetworkAccess is not Disabled",
                "no diagnostic settings",
                "no private endpoint",
            ],
            id="key-vault",
        ),
        pytest.param(
            check_role_assignments,
            BAD_ROLE_ASSIGNMENTS,
            [
                "vaultWide: scoped to the whole vault",
                "vaultWide: Key Vault Secrets User scoped to Microsoft.KeyVault/vaults",
                "vaultWide: appPrincipalId gets a role on Microsoft.KeyVault/vaults",
                "groupWide: no scope (assigned at the resource group)",
                "broadRole: permissions are not exactly one of the custom roles",
                "officerOnSecret: Key Vault Secrets Officer can delete and purge",
                "groupScopedRole: assignableScopes",
                "sameDeployment: custom role apim-key-rotator assigned on Microsoft.KeyVault/vaults/secrets",
                "sameDeployment: assigns a custom role defined in the same deployment",
            ],
            id="role-assignments",
        ),
        pytest.param(
            check_outputs_and_parameters,
            BAD_OUTPUTS,
            [
                "output key: value references a key",
                "output second: value references a key",
                "output value: value reads a .value property",
                "output echo: value references a @secure() parameter",
                "output apiKey: name suggests a secret",
                "@secure() parameter adminPassword has a default",
            ],
            id="outputs",
        ),
        pytest.param(
            check_apim,
            BAD_APIM,
            [
                "Tls10'] not explicitly disabled",
                "Tls11'] not explicitly disabled",
                "Ssl30'] not explicitly disabled",
                "no apiVersionConstraint.minApiVersion",
                "apim: no diagnostic settings",
                "subscriptionRequired is not true",
                "subscription key header is 'api-key'",
                "sub: allowTracing is not explicitly false",
                "sub: not scoped to a product",
                "built-in all-access 'master'",
                "quiet: allowTracing is not explicitly false",
            ],
            id="apim",
        ),
        pytest.param(
            check_rotation_secret,
            BAD_SECRET,
            [
                "tag CredentialId is not 'primary'",
                "tag ProviderAddress is not an APIM subscription's id",
                "tag ValidityPeriodDays is None, must be > 30",
                "no contentType",
                "no attributes.exp",
                "value is not seeded from listSecrets().primaryKey",
            ],
            id="secret",
        ),
    ],
)
def test_each_check_flags_a_bad_snippet(check, snippet: str, expected: list[str]) -> None:  # type: ignore[no-untyped-def]
    if check is check_role_assignments:
        check = _role_checks
    problems = check([parse_text(snippet)])
    text = "\n".join(problems)
    missing = [e for e in expected if e not in text]
    assert not missing, f"not flagged: {missing}\nproblems:\n{text}"


def _role_checks(templates: list[Template]) -> list[str]:
    return check_role_assignments(templates) + check_custom_role_ordering(templates)


def test_validity_days_at_or_below_thirty_is_flagged() -> None:
    snippet = BAD_SECRET.replace("param validityDays int = 30", "@minValue(1)\nparam validityDays int = 30")
    problems = check_rotation_secret([parse_text(snippet)])
    assert any("ValidityPeriodDays is 1, must be > 30" in p for p in problems), problems
    literal = BAD_SECRET.replace("string(validityDays)", "'14'")
    assert any("ValidityPeriodDays is 14" in p for p in check_rotation_secret([parse_text(literal)]))


# ------------------------------------------- issue 15 points 3, 4, 9, 10 and issue 11's redeploy point


def test_triple_des_setting_only_for_tiers_that_support_cipher_changes(templates: list[Template]) -> None:
    """Point 3: v2 tiers do not support changes to the default cipher configuration."""
    apim = _one(templates, "modules/apim.bicep")
    branches = custom_property_branches(
        apim, apim.resources["apim"]["config"]["properties"]["customProperties"]
    )
    with_cipher = [guard for guard, props in branches if any(".Ciphers." in k for k in props)]
    assert with_cipher == ["supportsCipherSettings"]
    allowed = set(apim.decorator("skuName", "allowed"))
    assert allowed <= V2_TIERS  # every allowed tier takes the branch without cipher settings
    main = _one(templates, "main.bicep")
    assert set(main.decorator("apimSkuName", "allowed")) <= V2_TIERS


def test_function_app_has_no_cors_an_accepted_instance_cap_one_invocation_each_and_waits_for_storage(
    templates: list[Template],
) -> None:
    """Issue 15 point 4; issue 20 item 1: the instance cap is one every region accepts (40..1000)."""
    assert check_function_apps(templates) == []
    rotation = _one(templates, "modules/rotation.bicep")
    assert rotation.parameters["maximumInstanceCount"]["default"] == 40
    assert rotation.decorator("maximumInstanceCount", "min_value") == 40
    assert rotation.decorator("maximumInstanceCount", "max_value") == 1000
    assert "storagePrivateEndpoint" in rotation.resources["functionApp"]["config"]["dependsOn"]


def test_redeploys_leave_the_secret_versions_and_expiry_alone(templates: list[Template]) -> None:
    """Issue 11 point 6: only a first deployment (seedSecret=true) writes a secret version; every other
    deployment (phase 2 included) deploys no resource that writes the secret."""
    assert check_secret_seeding(templates) == []
    main = _one(templates, "main.bicep")
    assert main.parameters["seedSecret"] == {
        **main.parameters["seedSecret"],
        "type": "bool",
        "default": False,
    }
    assert main.modules["secretSeed"]["config"]["condition"] == "seedSecret"
    assert "secretSeed" in main.modules["secret"]["config"]["dependsOn"]
    writers = [t.name for t in templates if any(True for _ in t.of_type(SECRET))]
    assert writers == ["modules/secretSeed.bicep"]
    secret = _one(templates, "modules/secret.bicep")
    assert secret.resources["apimKeySecret"]["existing"] is True
    params = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert "seedSecret" not in params, "the parameter file is used for every deployment: no seedSecret there"


def test_alerts_page_when_rotation_stops(templates: list[Template]) -> None:
    """Point 9: dead letters, delivery failures, function errors, near expiry without a new version."""
    assert check_alerts(templates) == []
    assert check_action_groups(templates) == []
    alerts = _one(templates, "modules/alerts.bicep")
    assert alerts.parameters["additionalActionGroupId"]["default"] == ""
    main = _one(templates, "main.bicep")
    params = main.modules["alerts"]["config"]["params"]
    assert params["additionalActionGroupId"] == "alertActionGroupId"
    assert params["emailAddresses"] == "alertEmailAddresses"
    # Receivers are required all the way up: main.bicep's parameter has no default and @minLength(1), and the
    # parameter file does not fill it in for the deployer.
    assert main.parameters["alertEmailAddresses"]["default"] is None
    assert main.decorator("alertEmailAddresses", "min_length") == 1
    assert "alertEmailAddresses" not in json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    # The function-errors alert is scoped to the function app's own cloud_RoleName.
    assert dotted(params["functionAppName"]) == "rotation.outputs.functionAppName"
    assert main.decorator("rotationOverdueHours", "min_value") >= 25  # past Event Grid's 24 h of retries


def test_overdue_rule_without_skip_query_validation_is_refused(templates: list[Template]) -> None:
    alerts = _one(templates, "modules/alerts.bicep")
    text = (INFRA / "modules" / "alerts.bicep").read_text()
    assert text.count("skipQueryValidation: true") == 3
    bad = parse_text(text.replace("skipQueryValidation: true", "skipQueryValidation: false"), alerts.name)
    problems = "\n".join(check_alerts([bad]))
    assert "rotationOverdue: skipQueryValidation is not true" in problems, problems
    assert "expiringAlerts: expiry alerts need autoMitigate false" in problems, problems


def _alerts_text_with(old: str, new: str) -> list[str]:
    text = (INFRA / "modules" / "alerts.bicep").read_text()
    assert text.count(old) == 1, old
    return check_alerts([parse_text(text.replace(old, new), "modules/alerts.bicep")])


def test_expiry_alerts_at_7_days_and_1_day_escalate(templates: list[Template]) -> None:
    """Issue 19.7: besides the overdue alert, alerts 7 days and 1 day before the expiry, one rule per entry
    of a thresholds array (one query template), severities escalating overdue -> 7 days -> 1 day."""
    alerts = _one(templates, "modules/alerts.bicep")
    rules = alerts.resources["expiringAlerts"]
    assert rules["config"]["loop_type"]["detail"]["array_name"] == "expiryAlertThresholds"
    thresholds = alerts.variables["expiryAlertThresholds"]["value"]
    assert [(t["days"], t["severity"]) for t in thresholds] == [(7, 1), (1, 0)]
    assert alerts.resources["rotationOverdue"]["config"]["properties"]["severity"] == 2
    assert check_alerts(templates) == []
    # each planted mistake is caught
    one_day = "  {\n    days: 1\n    severity: 0\n  }\n"
    missing = "\n".join(_alerts_text_with(one_day, ""))
    assert "no scheduled query alert 1 day(s) before the key's expiry" in missing, missing
    flat = "\n".join(_alerts_text_with("    days: 1\n    severity: 0\n", "    days: 1\n    severity: 1\n"))
    assert "expiry alert severities do not escalate (overdue, 7 days, 1 day): [2, 1, 1]" in flat, flat
    unfiltered = "\n".join(_alerts_text_with("  | where daysToExpiry <= days\n", ""))
    assert "no scheduled query alert 7 day(s) before the key's expiry" in unfiltered, unfiltered


def test_token_limit_and_metrics_have_safe_defaults(templates: list[Template]) -> None:
    """Point 10: the limit is a bounded parameter with a default; metrics need the API diagnostic."""
    assert check_token_limits(templates) == []
    main = _one(templates, "main.bicep")
    assert main.parameters["tokensPerMinute"]["default"] == 10000
    assert main.modules["apim"]["config"]["params"]["tokensPerMinute"] == "tokensPerMinute"


BAD_FUNCTION = """
@maxValue(100)
param instances int = 40
resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: 'st'
}
resource app 'Microsoft.Web/sites@2024-04-01' = {
  name: 'func'
  properties: {
    siteConfig: {
      cors: {
        allowedOrigins: []
      }
      appSettings: []
    }
    functionAppConfig: {
      scaleAndConcurrency: {
        maximumInstanceCount: instances
      }
    }
  }
}
"""

BAD_SEEDING = """
param seedSecret bool = true
module seed 'modules/seed.bicep' = if (seedSecret) {
  name: 'seed'
}
module always 'modules/seed.bicep' = {
  name: 'always'
}
"""

BAD_ALERTS = """
resource topic 'Microsoft.EventGrid/systemTopics@2025-02-15' existing = {
  name: 't'
}
resource a 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'a'
  properties: {
    criteria: {
      allOf: [
        {
          metricNamespace: 'Microsoft.EventGrid/systemTopics'
          metricName: 'DeadLetteredCount'
          operator: 'GreaterThan'
          threshold: 5
        }
      ]
    }
    actions: []
  }
}
"""


def test_function_seeding_alert_and_token_checks_flag_bad_snippets() -> None:
    function = "\n".join(check_function_apps([parse_text(BAD_FUNCTION)]))
    for expected in (
        "siteConfig.cors is not supported",
        "maximumInstanceCount can be None..100, outside the range every region accepts (40..1000)",
        "perInstanceConcurrency is None, not 1",
        "PYTHON_THREADPOOL_THREAD_COUNT is not '1'",
        "does not depend on the storage account's blob private endpoint",
    ):
        assert expected in function, function
    seed = parse_text("resource s 'Microsoft.KeyVault/vaults/secrets@2024-11-01' = {\n  name: 'kv/s'\n}\n")
    seed.name = "modules/seed.bicep"
    seeding = "\n".join(check_secret_seeding([parse_text(BAD_SEEDING, "main.bicep"), seed]))
    assert "main.bicep:seed: deploys modules/seed.bicep" in seeding, seeding
    assert "main.bicep:always: deploys modules/seed.bicep" in seeding, seeding
    root = parse_text(
        "resource s 'Microsoft.KeyVault/vaults/secrets@2024-11-01' = {\n  name: 'kv/s'\n}\n", "main.bicep"
    )
    assert check_secret_seeding([root]) == ["main.bicep:s: writes the secret on every deployment"]
    alerts = "\n".join(check_alerts([parse_text(BAD_ALERTS)]))
    for expected in (
        "a: must fire on the first occurrence",
        "a: does not notify the action group created with receivers",
        "Event Grid delivery failures",
        "rotation function errors",
        "no scheduled query alert for a secret near expiry",
        "no scheduled query alert on the gateway's 401 rate",
    ):
        assert expected in alerts, alerts
    tokens = "\n".join(check_token_limits([parse_text(BAD_FUNCTION)]))
    assert "no named value apimvault-tokens-per-minute" in tokens
    assert "no API diagnostic with metrics: true" in tokens


def test_cipher_settings_unconditionally_on_a_v2_tier_are_flagged() -> None:
    snippet = """
resource apim 'Microsoft.ApiManagement/service@2024-05-01' = {
  name: 'apim'
  properties: {
    customProperties: {
      'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Tls10': 'False'
      'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Tls11': 'False'
      'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Ssl30': 'False'
      'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Backend.Protocols.Tls10': 'False'
      'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Backend.Protocols.Tls11': 'False'
      'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Backend.Protocols.Ssl30': 'False'
      'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Ciphers.TripleDes168': 'False'
    }
  }
}
"""
    problems = check_apim([parse_text(snippet)])
    assert any("TripleDes168" in p and "v2 tiers" in p for p in problems), problems


# ------------------------------------------------------------------------------------------ issue 20


@pytest.mark.parametrize(
    ("cap", "expected"),
    [
        pytest.param("maximumInstanceCount: 1", "can be 1..1, outside", id="literal-1"),
        pytest.param("maximumInstanceCount: 1001", "can be 1001..1001, outside", id="literal-1001"),
        pytest.param("maximumInstanceCount: instances", "can be 1..4, outside", id="old-param-range"),
        pytest.param("maximumInstanceCount: wide", "maximumInstanceCount defaults to 1", id="bad-default"),
    ],
)
def test_instance_cap_outside_the_accepted_range_is_refused(cap: str, expected: str) -> None:
    snippet = f"""
@minValue(1)
@maxValue(4)
param instances int = 1
@minValue(40)
@maxValue(1000)
param wide int = 1
resource app 'Microsoft.Web/sites@2024-04-01' = {{
  name: 'func'
  properties: {{
    functionAppConfig: {{
      scaleAndConcurrency: {{
        {cap}
      }}
    }}
  }}
}}
"""
    problems = "\n".join(check_function_apps([parse_text(snippet)]))
    assert expected in problems, problems
    good = snippet.replace(cap, "maximumInstanceCount: 40")
    assert "maximumInstanceCount" not in "\n".join(check_function_apps([parse_text(good)]))


ACTION_GROUPS = """
param optionalEmails array = []
param requiredEmails array
@minLength(1)
param emails array
param create bool = true
resource empty 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'empty'
  location: 'global'
  properties: {
    groupShortName: 'e'
    enabled: true
    emailReceivers: []
  }
}
resource defaulted 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'defaulted'
  location: 'global'
  properties: {
    groupShortName: 'd'
    enabled: true
    emailReceivers: [for (address, i) in optionalEmails: {
      name: 'email-${i}'
      emailAddress: address
    }]
  }
}
resource unbounded 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'unbounded'
  location: 'global'
  properties: {
    groupShortName: 'u'
    enabled: true
    emailReceivers: [for (address, i) in requiredEmails: {
      name: 'email-${i}'
      emailAddress: address
    }]
  }
}
resource conditional 'Microsoft.Insights/actionGroups@2023-01-01' = if (create) {
  name: 'conditional'
  location: 'global'
  properties: {
    groupShortName: 'c'
    enabled: true
    emailReceivers: [for (address, i) in emails: {
      name: 'email-${i}'
      emailAddress: address
    }]
  }
}
resource good 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'good'
  location: 'global'
  properties: {
    groupShortName: 'g'
    enabled: true
    emailReceivers: [for (address, i) in emails: {
      name: 'email-${i}'
      emailAddress: address
    }]
  }
}
"""


def test_action_group_without_receivers_is_refused() -> None:
    problems = check_action_groups([parse_text(ACTION_GROUPS)])
    text = "\n".join(problems)
    for expected in (
        "empty: no receiver guaranteed",
        "defaulted: no receiver guaranteed",
        "unbounded: no receiver guaranteed",
        "conditional: created only under a condition",
    ):
        assert expected in text, text
    assert not [p for p in problems if ":good:" in p or p.startswith("<snippet>:good")], problems


MASKING = """
resource apim 'Microsoft.ApiManagement/service@2024-05-01' existing = {
  name: 'apim'
}
resource api 'Microsoft.ApiManagement/service/apis@2024-05-01' existing = {
  parent: apim
  name: 'api'
}
resource unused 'Microsoft.ApiManagement/service/loggers@2024-05-01' = {
  parent: apim
  name: 'unused'
  properties: {
    loggerType: 'applicationInsights'
  }
}
resource logger 'Microsoft.ApiManagement/service/loggers@2024-05-01' = {
  parent: apim
  name: 'ai'
  properties: {
    loggerType: 'applicationInsights'
  }
}
resource plain 'Microsoft.ApiManagement/service/apis/diagnostics@2024-05-01' = {
  parent: api
  name: 'applicationinsights'
  properties: {
    loggerId: logger.id
    frontend: {
      request: {
        headers: []
      }
    }
  }
}
resource wrongMode 'Microsoft.ApiManagement/service/diagnostics@2024-05-01' = {
  parent: apim
  name: 'azuremonitor'
  properties: {
    loggerId: logger.id
    frontend: {
      request: {
        dataMasking: {
          queryParams: [
            {
              value: 'subscription-key'
              mode: 'Show'
            }
          ]
          headers: [
            {
              value: 'Ocp-Apim-Subscription-Key'
              mode: 'Mask'
            }
          ]
        }
      }
    }
  }
}
"""


def test_logger_without_masking_is_refused(templates: list[Template]) -> None:
    assert check_apim_logging(templates) == []
    problems = "\n".join(check_apim_logging([parse_text(MASKING)]))
    for expected in (
        "plain: frontend.request.dataMasking does not hide/mask query parameter subscription-key",
        "plain: frontend.request.dataMasking does not hide/mask header Ocp-Apim-Subscription-Key",
        "plain: backend.request.dataMasking does not hide/mask query parameter",
        "wrongMode: frontend.request.dataMasking does not hide/mask query parameter subscription-key",
        "wrongMode: backend.request.dataMasking does not hide/mask header",
        "unused: logger without a diagnostic that masks the key",
    ):
        assert expected in problems, problems
    assert "wrongMode: frontend.request.dataMasking does not hide/mask header" not in problems


def test_every_apim_diagnostic_hides_the_key_and_the_real_loggers_are_covered(
    templates: list[Template],
) -> None:
    apim = _one(templates, "modules/apim.bicep")
    masking = apim.variables["keyMasking"]["value"]
    assert {"value": "subscription-key", "mode": "Hide"} in masking["queryParams"]
    assert {"value": "Ocp-Apim-Subscription-Key", "mode": "Hide"} in masking["headers"]
    diagnostics = [s for s, _ in apim.of_type("Microsoft.ApiManagement/service/diagnostics")]
    diagnostics += [s for s, _ in apim.of_type("Microsoft.ApiManagement/service/apis/diagnostics")]
    assert sorted(diagnostics) == ["apimGatewayDiagnostics", "openAiApiDiagnostics"]


EGRESS = """
resource nat 'Microsoft.Network/natGateways@2024-05-01' = {
  name: 'nat'
  location: 'westeurope'
}
resource vnet 'Microsoft.Network/virtualNetworks@2024-05-01' = {
  name: 'vnet'
  properties: {
    subnets: [
      {
        name: 'implicit'
        properties: {
          delegations: [
            {
              name: 'd'
              properties: {
                serviceName: 'Microsoft.App/environments'
              }
            }
          ]
        }
      }
      {
        name: 'natButDefaultOutbound'
        properties: {
          natGateway: {
            id: nat.id
          }
          delegations: [
            {
              name: 'd'
              properties: {
                serviceName: 'Microsoft.App/environments'
              }
            }
          ]
        }
      }
    ]
  }
}
"""


def test_function_subnet_egress_is_explicit(templates: list[Template]) -> None:
    assert check_function_egress(templates) == []
    network = _one(templates, "modules/network.bicep")
    assert sum(1 for _ in network.of_type("Microsoft.Network/natGateways")) == 1
    problems = "\n".join(check_function_egress([parse_text(EGRESS)]))
    assert "vnet/implicit: function subnet without a NAT gateway" in problems, problems
    assert "vnet/implicit: defaultOutboundAccess is not false" in problems, problems
    assert "natButDefaultOutbound: defaultOutboundAccess is not false" in problems, problems
    assert "natButDefaultOutbound: function subnet without a NAT gateway" not in problems, problems


def test_prompt_estimation_needs_an_imported_api_and_metrics_keep_dimensions(
    templates: list[Template],
) -> None:
    assert check_token_limits(templates) == []
    snippet = """
resource apim 'Microsoft.ApiManagement/service@2024-05-01' existing = {
  name: 'apim'
}
resource api 'Microsoft.ApiManagement/service/apis@2024-05-01' = {
  parent: apim
  name: 'api'
  properties: {
    path: 'openai'
  }
}
resource policy 'Microsoft.ApiManagement/service/apis/policies@2024-05-01' = {
  parent: api
  name: 'policy'
  properties: {
    format: 'rawxml'
    value: 'POLICY'
  }
}
resource appi 'Microsoft.Insights/components@2020-02-02' = {
  name: 'appi'
  location: 'westeurope'
  kind: 'web'
  properties: {
    Application_Type: 'web'
  }
}
"""
    snippet = snippet.replace(
        "POLICY",
        '<policies><inbound><azure-openai-token-limit tokens-per-minute="1" estimate-prompt-tokens="true" />'
        "<azure-openai-emit-token-metric /></inbound></policies>",
    )
    problems = "\n".join(check_token_limits([parse_text(snippet)]))
    assert 'policy: estimate-prompt-tokens="true" on an API without an imported specification' in problems
    assert "appi: CustomMetricsOptedInType is not 'WithDimensions'" in problems
    imported = snippet.replace("path: 'openai'", "path: 'openai'\n    format: 'openapi-link'\n    value: 'x'")
    assert "estimate-prompt-tokens" not in "\n".join(check_token_limits([parse_text(imported)]))


def test_vault_name_can_be_changed_after_a_purge_protected_teardown(templates: list[Template]) -> None:
    """Issue 20 item 6: keyVaultNameSeed changes the vault's name only; empty keeps the original name."""
    main = _one(templates, "main.bicep")
    assert main.parameters["keyVaultNameSeed"]["default"] == ""
    ops = main.variables["keyVaultSuffix"]["value"]["operator"]["operands"]
    assert ops["true_value"] == "suffix"  # empty seed: the name every earlier deployment used
    assert "keyVaultNameSeed" in json.dumps(ops["false_value"])
    assert "keyVaultSuffix" in json.dumps(main.variables["names"]["value"]["keyVault"])
    assert "keyVaultSuffix" not in json.dumps(
        {k: v for k, v in main.variables["names"]["value"].items() if k != "keyVault"}
    )


def test_an_alert_in_another_module_may_notify_the_created_group_through_a_parameter() -> None:
    """An alert declared beside its resource (e.g. in rotation.bicep) notifies the group alerts.bicep creates,
    passed in by main.bicep from the alerts module's output; any other parameter value is refused."""
    alerts = parse_text(
        """
@minLength(1)
param emails array
resource group 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'g'
  location: 'global'
  properties: {
    groupShortName: 'g'
    enabled: true
    emailReceivers: [for (address, i) in emails: {
      name: 'email-${i}'
      emailAddress: address
    }]
  }
}
output actionGroupId string = group.id
output other string = 'x'
""",
        "modules/alerts.bicep",
    )
    module = parse_text(
        """
param actionGroupId string
resource poison 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'poison'
  location: 'global'
  properties: {
    criteria: {
      allOf: [
        {
          metricNamespace: 'Microsoft.Storage/storageAccounts/queueServices'
          metricName: 'QueueMessageCount'
          operator: 'GreaterThan'
          threshold: 0
        }
      ]
    }
    actions: [
      {
        actionGroupId: actionGroupId
      }
    ]
  }
}
""",
        "modules/rotation.bicep",
    )

    def main(output: str) -> Template:
        return parse_text(
            f"""
module alerts 'modules/alerts.bicep' = {{
  name: 'alerts'
}}
module rotation 'modules/rotation.bicep' = {{
  name: 'rotation'
  params: {{
    actionGroupId: alerts.outputs.{output}
  }}
}}
""",
            "main.bicep",
        )

    good = "\n".join(check_alerts([main("actionGroupId"), alerts, module]))
    assert "poison: does not notify" not in good, good
    bad = "\n".join(check_alerts([main("other"), alerts, module]))
    assert "poison: does not notify the action group created with receivers" in bad, bad
