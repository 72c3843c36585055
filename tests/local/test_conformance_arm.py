"""Conformance: the local ARM ``Microsoft.ApiManagement`` subscription operations against the API
Management 2024-05-01 spec (``data/specs/apim-subscriptions-2024-05-01.subset.json``).

Kept from the spec: each operation's answers (status codes, the ``ETag`` header, the error schema
``ErrorResponse`` of ``common-types/resource-management/v5/types.json``). The subscription contracts live in
the 305,441-character ``definitions.json``, which is not kept (SOURCES.md): their shape is checked by the
real ``azure-mgmt-apimanagement`` client, generated from that spec, deserializing every answer.
Also here: issue 22.1 (an unserved api-version gets ARM's 400 ``NoRegisteredProviderFound``) and 22.2
(``x-ms-request-id`` / ``x-ms-correlation-request-id`` on every answer).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import httpx2
import pytest
from azure.identity import DefaultAzureCredential
from azure.mgmt.apimanagement import ApiManagementClient

from apimvault.local import LocalAzure
from apimvault.local.stack import APIM_SERVICE, APIM_SUBSCRIPTION, ARM_SUBSCRIPTION, RESOURCE_GROUP

from .conformance import SPECS

SPEC: dict[str, Any] = json.loads((SPECS / "apim-subscriptions-2024-05-01.subset.json").read_text("utf-8"))
BASE = (
    "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.ApiManagement"
    "/service/{serviceName}/subscriptions"
)
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _schema(ref: str) -> dict[str, Any]:
    return {"definitions": SPEC["definitions"], "$ref": ref}


def check(method: str, template: str, response: httpx2.Response) -> None:
    """The answer's status is one the spec gives the operation; its body and headers match it."""
    import jsonschema  # type: ignore[import-untyped]

    answers = SPEC["paths"][template][method]["responses"]
    expected = answers.get(str(response.status_code))
    if expected is None:
        assert response.status_code >= 400, f"{method} {template}: {response.status_code} not in the spec"
        expected = answers["default"]
    for name in expected.get("headers", {}):
        assert response.headers.get(name), f"{method} {template}: no {name} header"
    if "schema" in expected and "$ref" in expected["schema"]:
        jsonschema.Draft7Validator(_schema(expected["schema"]["$ref"])).validate(response.json())
    elif response.status_code == 204:
        assert response.content == b""
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
    check("get", BASE, arm.get(url(azure)))
    check("head", BASE + "/{sid}", arm.head(url(azure, sid)))
    check("get", BASE + "/{sid}", arm.get(url(azure, sid)))
    check("post", BASE + "/{sid}/listSecrets", arm.post(url(azure, sid + "/listSecrets")))
    check("post", BASE + "/{sid}/regeneratePrimaryKey", arm.post(url(azure, sid + "/regeneratePrimaryKey")))
    check(
        "post", BASE + "/{sid}/regenerateSecondaryKey", arm.post(url(azure, sid + "/regenerateSecondaryKey"))
    )
    # The contracts, as the generated client (from the same spec) reads them.
    client = ApiManagementClient(DefaultAzureCredential(), ARM_SUBSCRIPTION, base_url=azure.arm_url)
    got = client.subscription.get(RESOURCE_GROUP, APIM_SERVICE, APIM_SUBSCRIPTION)
    assert got.name == APIM_SUBSCRIPTION and got.scope and got.state == "active"
    assert any(s.name == APIM_SUBSCRIPTION for s in client.subscription.list(RESOURCE_GROUP, APIM_SERVICE))
    keys = client.subscription.list_secrets(RESOURCE_GROUP, APIM_SERVICE, own.sid)
    assert keys.primary_key and keys.secondary_key


@pytest.mark.parametrize(
    ("suffix", "method", "template", "status", "code"),
    [
        ("/nope", "get", BASE + "/{sid}", 404, "ResourceNotFound"),
        ("/nope/listSecrets", "post", BASE + "/{sid}/listSecrets", 404, "ResourceNotFound"),
    ],
)
def test_errors_match_the_spec(
    azure: LocalAzure, arm: httpx2.Client, suffix: str, method: str, template: str, status: int, code: str
) -> None:
    response = arm.request(method.upper(), url(azure, suffix))
    assert response.status_code == status and response.json()["error"]["code"] == code
    check(method, template, response)


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
