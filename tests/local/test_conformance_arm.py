"""Conformance: the local ARM ``Microsoft.ApiManagement`` subscription operations against the API
Management 2024-05-01 spec (``data/specs/apim-subscriptions-2024-05-01.subset.json``, see SOURCES.md).

Kept from the spec: each served operation's answers (status codes, the ``ETag`` header), the contracts they
answer with (``SubscriptionCollection``, ``SubscriptionContract`` + ``SubscriptionContractProperties``,
``SubscriptionKeysContract`` from ``definitions.json``, ``ProxyResource`` / ``Resource`` from common-types v2)
and the error schema ``ErrorResponse`` of common-types v5. Every success body validates against its contract
and every error body against ``ErrorResponse`` (JSON Schema 2020-12, ``$ref`` resolved through a
``referencing`` registry, ``date-time`` formats checked). On top of the spec, the contracts are validated
*closed* (``unevaluatedProperties: false``): the stack sends no field the spec does not define.
The real ``azure-mgmt-apimanagement`` client (generated from the same spec) also reads every answer.
Also here: issue 22.1 (an unserved api-version gets ARM's 400 ``NoRegisteredProviderFound``) and 22.2
(``x-ms-request-id`` / ``x-ms-correlation-request-id`` on every answer).
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from typing import Any

import httpx2
import jsonschema  # type: ignore[import-untyped]
import pytest
from azure.identity import DefaultAzureCredential
from azure.mgmt.apimanagement import ApiManagementClient
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from apimvault.local import LocalAzure
from apimvault.local.stack import APIM_SERVICE, APIM_SUBSCRIPTION, ARM_SUBSCRIPTION, RESOURCE_GROUP

from .conformance import SPECS

SPEC: dict[str, Any] = json.loads((SPECS / "apim-subscriptions-2024-05-01.subset.json").read_text("utf-8"))
BASE = (
    "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.ApiManagement"
    "/service/{serviceName}/subscriptions"
)
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


URI = "urn:apimvault:spec:apim-subscriptions-2024-05-01"
# The contracts and the error body: checked closed (no field outside the spec's properties).
CLOSED = (
    "SubscriptionCollection",
    "SubscriptionContract",
    "SubscriptionContractProperties",
    "SubscriptionKeysContract",
    "ErrorResponse",
    "ErrorDetail",
)


def _registry(closed: bool) -> Registry[Any]:
    spec = copy.deepcopy(SPEC)
    if closed:
        for name in CLOSED:
            spec["definitions"][name]["unevaluatedProperties"] = False
    registry: Registry[Any] = Registry().with_resource(URI, DRAFT202012.create_resource(spec))
    return registry


REGISTRIES = (_registry(closed=False), _registry(closed=True))


def validate(definition: str, body: Any) -> None:
    """``body`` against ``#/definitions/<definition>``: as the spec has it, then closed."""
    for registry in REGISTRIES:
        jsonschema.Draft202012Validator(
            {"$ref": f"{URI}#/definitions/{definition}"},
            registry=registry,
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
        ).validate(body)


def check(method: str, template: str, response: httpx2.Response) -> None:
    """The answer's status is one the spec gives the operation; its body and headers match it."""
    answers = SPEC["paths"][template][method]["responses"]
    expected = answers.get(str(response.status_code))
    if expected is None:
        assert response.status_code >= 400, f"{method} {template}: {response.status_code} not in the spec"
        expected = answers["default"]
    for name in expected.get("headers", {}):
        assert response.headers.get(name), f"{method} {template}: no {name} header"
    if "schema" in expected:
        validate(expected["schema"]["$ref"].rsplit("/", 1)[1], response.json())
    else:
        assert response.content == b"", f"{method} {template}: the spec gives {response.status_code} no body"
    assert UUID_RE.match(response.headers["x-ms-request-id"])
    assert response.headers["x-ms-correlation-request-id"]


def url(azure: LocalAzure, suffix: str = "", api_version: str | None = "2024-05-01") -> str:
    path = (
        f"/subscriptions/{ARM_SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.ApiManagement"
        f"/service/{APIM_SERVICE}/subscriptions{suffix}"
    )
    return azure.arm_url + path + (f"?api-version={api_version}" if api_version else "")


@pytest.fixture
def arm(azure: LocalAzure) -> Any:
    token = azure.tokens.issue(azure.default_identity, "https://management.azure.com")[0]
    with httpx2.Client(timeout=10, headers={"Authorization": f"Bearer {token}"}) as c:
        yield c


def test_every_operation_answers_as_the_spec_says(azure: LocalAzure, arm: httpx2.Client) -> None:
    name = f"conf-{uuid.uuid4().hex[:8]}"
    own = azure.apim_state.create_subscription(
        ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE, name, display_name=name
    )
    sid = f"/{own.sid}"
    listing = arm.get(url(azure))
    check("get", BASE, listing)
    assert {s["name"] for s in listing.json()["value"]} >= {APIM_SUBSCRIPTION, own.sid}
    check("head", BASE + "/{sid}", arm.head(url(azure, sid)))
    got = arm.get(url(azure, sid))
    check("get", BASE + "/{sid}", got)
    assert got.json()["properties"]["state"] == "active" and "primaryKey" not in got.text
    secrets = arm.post(url(azure, sid + "/listSecrets"))
    check("post", BASE + "/{sid}/listSecrets", secrets)
    check("post", BASE + "/{sid}/regeneratePrimaryKey", arm.post(url(azure, sid + "/regeneratePrimaryKey")))
    check(
        "post", BASE + "/{sid}/regenerateSecondaryKey", arm.post(url(azure, sid + "/regenerateSecondaryKey"))
    )
    renewed = arm.post(url(azure, sid + "/listSecrets"))
    check("post", BASE + "/{sid}/listSecrets", renewed)
    assert renewed.json()["primaryKey"] != secrets.json()["primaryKey"]
    # The contracts, as the generated client (from the same spec) reads them.
    client = ApiManagementClient(DefaultAzureCredential(), ARM_SUBSCRIPTION, base_url=azure.arm_url)
    contract = client.subscription.get(RESOURCE_GROUP, APIM_SERVICE, APIM_SUBSCRIPTION)
    assert contract.name == APIM_SUBSCRIPTION and contract.scope and contract.state == "active"
    assert contract.created_date is not None and contract.start_date is None
    assert any(s.name == APIM_SUBSCRIPTION for s in client.subscription.list(RESOURCE_GROUP, APIM_SERVICE))
    keys = client.subscription.list_secrets(RESOURCE_GROUP, APIM_SERVICE, own.sid)
    assert keys.primary_key == renewed.json()["primaryKey"] and keys.secondary_key


@pytest.mark.parametrize(
    ("definition", "body", "wrong"),
    [
        ("SubscriptionContract", {"name": "s", "properties": {"state": "active"}}, "'scope' is a required"),
        ("SubscriptionContract", {"properties": {"scope": "/apis", "state": "on"}}, "'on' is not one of"),
        (
            "SubscriptionContract",
            {"properties": {"scope": "/apis", "state": "active", "startDate": None}},
            "None is not of type 'string'",
        ),
        (
            "SubscriptionContract",
            {"properties": {"scope": "/apis", "state": "active", "createdDate": "yesterday"}},
            "'yesterday' is not a 'date-time'",
        ),
        ("SubscriptionContract", {"name": 7}, "7 is not of type 'string'"),
        ("SubscriptionCollection", {"value": [], "nextLink": None}, "None is not of type 'string'"),
        ("SubscriptionCollection", {"value": [{"properties": {}}]}, "'scope' is a required"),
        ("SubscriptionKeysContract", {"primaryKey": ""}, "should be non-empty"),
        ("SubscriptionKeysContract", {"primaryKey": "k", "tertiaryKey": "k"}, "Unevaluated properties"),
        ("SubscriptionContract", {"etag": "x"}, "Unevaluated properties"),
        ("ErrorResponse", {"error": {"code": 404}}, "404 is not of type 'string'"),
    ],
)
def test_the_schemas_refuse_what_the_spec_refuses(definition: str, body: Any, wrong: str) -> None:
    """The kept contracts are the real ones, not stubs: each refuses a body the spec (or, for fields it
    does not define, the closed check) refuses."""
    with pytest.raises(jsonschema.ValidationError) as info:
        validate(definition, body)
    assert wrong in info.value.message


@pytest.mark.parametrize(
    ("method", "suffix", "template", "status", "code"),
    [
        ("get", "/nope", "/{sid}", 404, "ResourceNotFound"),
        ("head", "/nope", "/{sid}", 404, None),
        ("post", "/nope/listSecrets", "/{sid}/listSecrets", 404, "ResourceNotFound"),
        ("post", "/nope/regeneratePrimaryKey", "/{sid}/regeneratePrimaryKey", 404, "ResourceNotFound"),
        ("post", "/nope/regenerateSecondaryKey", "/{sid}/regenerateSecondaryKey", 404, "ResourceNotFound"),
        ("post", "", "", 405, "MethodNotAllowed"),
        ("get", f"/{APIM_SUBSCRIPTION}/listSecrets", "/{sid}/listSecrets", 405, "MethodNotAllowed"),
        (
            "post",
            f"/{APIM_SUBSCRIPTION}/regenerateTertiaryKey",
            "/{sid}/regenerateTertiaryKey",
            404,
            "NotFound",
        ),
    ],
)
def test_errors_match_the_spec(
    azure: LocalAzure,
    arm: httpx2.Client,
    method: str,
    suffix: str,
    template: str,
    status: int,
    code: str | None,
) -> None:
    response = arm.request(method.upper(), url(azure, suffix))
    assert response.status_code == status
    if method == "head":  # no body on HEAD; the status is the spec's default answer
        assert response.content == b""
        return
    assert response.json()["error"]["code"] == code
    operation = SPEC["paths"].get(BASE + template, {}).get(method)
    if operation is None:  # a path or method the spec does not have: the body is still ARM's error
        validate("ErrorResponse", response.json())
    else:
        check(method, BASE + template, response)


def test_auth_failures_match_the_spec(azure: LocalAzure, arm: httpx2.Client) -> None:
    """401 (no token, a bad token, a token for another audience) and 403 (no role) are ErrorResponse too."""
    stranger = azure.add_identity(f"conf-{uuid.uuid4().hex[:6]}")
    try:
        no_role = azure.tokens.issue(stranger, "https://management.azure.com")[0]
        vault = azure.tokens.issue(azure.default_identity, "https://vault.azure.net")[0]
        target = url(azure, f"/{APIM_SUBSCRIPTION}/listSecrets")
        answers = {
            "AuthenticationFailed": httpx2.post(target, timeout=10),
            "InvalidAuthenticationToken": arm.post(target, headers={"Authorization": "Bearer nope"}),
            "InvalidAuthenticationTokenAudience": arm.post(
                target, headers={"Authorization": f"Bearer {vault}"}
            ),
            "AuthorizationFailed": arm.post(target, headers={"Authorization": f"Bearer {no_role}"}),
        }
    finally:
        azure.revoke_role(stranger)
    for code, response in answers.items():
        assert response.json()["error"]["code"] == code
        assert response.status_code == (403 if code == "AuthorizationFailed" else 401)
        assert "primaryKey" not in response.text
        check("post", BASE + "/{sid}/listSecrets", response)


@pytest.mark.parametrize("version", ["1999-01-01", "2024-05-02", "2030-01-01-preview"])
def test_unserved_api_version_is_no_registered_provider(
    azure: LocalAzure, arm: httpx2.Client, version: str
) -> None:
    """Issue 22.1: ARM's 400 for Microsoft.ApiManagement/service (Azure/bicep#15227)."""
    response = arm.post(url(azure, f"/{APIM_SUBSCRIPTION}/listSecrets", api_version=version))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "NoRegisteredProviderFound"
    assert error["message"].startswith(
        f"No registered resource provider found for location 'local' and API version '{version}' for type "
        "'service'. The supported api-versions are '2014-02-14, "
    )
    assert "primaryKey" not in response.text
    check("post", BASE + "/{sid}/listSecrets", response)
    missing = arm.post(url(azure, f"/{APIM_SUBSCRIPTION}/listSecrets", api_version=None))
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "MissingApiVersionParameter"


def test_versions_clients_send_are_served(azure: LocalAzure, arm: httpx2.Client) -> None:
    # 2024-05-01 is azure-mgmt-apimanagement 5.0.0's default (test_every_operation_... runs that client).
    for version in ("2022-08-01", "2023-05-01-preview", "2024-05-01", "2024-06-01-preview"):
        assert arm.get(url(azure, f"/{APIM_SUBSCRIPTION}", api_version=version)).status_code == 200


def test_request_ids_on_every_answer(azure: LocalAzure, arm: httpx2.Client) -> None:
    """Issue 22.2: x-ms-request-id (new per answer) and x-ms-correlation-request-id (the caller's
    x-ms-client-request-id when given), on success, error and auth failure alike."""
    mine = str(uuid.uuid4())
    answers = [
        arm.get(url(azure, f"/{APIM_SUBSCRIPTION}"), headers={"x-ms-client-request-id": mine}),
        arm.get(url(azure, "/nope")),
        arm.get(url(azure, f"/{APIM_SUBSCRIPTION}", api_version="1999-01-01")),
        arm.get(url(azure, f"/{APIM_SUBSCRIPTION}"), headers={"Authorization": "Bearer nope"}),
    ]
    assert [a.status_code for a in answers] == [200, 404, 400, 401]
    ids = [a.headers["x-ms-request-id"] for a in answers]
    assert len(set(ids)) == 4 and all(UUID_RE.match(i) for i in ids)
    assert answers[0].headers["x-ms-correlation-request-id"] == mine
    assert all(a.headers["x-ms-correlation-request-id"] for a in answers)
