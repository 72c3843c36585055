"""The local APIM gateway and ARM plane, through the openai and azure-mgmt-apimanagement clients."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError
from azure.identity import DefaultAzureCredential
from azure.mgmt.apimanagement import ApiManagementClient

from apimvault.local import API_VERSION, DEPLOYMENT, LocalAzure, ServerThread, TokenIssuer, fingerprint
from apimvault.local.apim import (
    INVALID_KEY_MESSAGE,
    MISSING_KEY_MESSAGE,
    ApimGateway,
    ApimState,
    Subscription,
)
from apimvault.local.openai_backend import OpenAIBackend, reply_for
from apimvault.local.stack import APIM_SERVICE, APIM_SUBSCRIPTION, ARM_SUBSCRIPTION, RESOURCE_GROUP

MESSAGES: Any = [{"role": "user", "content": "ping"}]


_OPENED: list[Any] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Every client a test makes here is closed when it ends, not left to the garbage collector."""
    yield
    while _OPENED:
        _OPENED.pop().close()


def client(url: str, key: str | None = None) -> openai.AzureOpenAI:
    headers = {"Ocp-Apim-Subscription-Key": key} if key is not None else {}
    made = openai.AzureOpenAI(
        azure_endpoint=url,
        api_key="unused",
        api_version=API_VERSION,
        default_headers=headers,
        max_retries=0,
        timeout=10,
    )
    _OPENED.append(made)
    return made


def seeded(azure: LocalAzure) -> Subscription:
    sub = azure.apim_state.get(APIM_SUBSCRIPTION)
    assert sub is not None
    return sub


def fresh(azure: LocalAzure) -> Subscription:
    """A subscription of its own, so that regenerating keys never disturbs the seeded one."""
    sid = f"test-{uuid.uuid4().hex[:8]}"
    return azure.apim_state.create_subscription(
        ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE, sid, display_name=f"test {sid}"
    )


def mgmt(azure: LocalAzure, **kwargs: Any) -> ApiManagementClient:
    credential = DefaultAzureCredential()
    made = ApiManagementClient(credential, ARM_SUBSCRIPTION, base_url=azure.arm_url, **kwargs)
    _OPENED.extend([credential, made])
    return made


# ---------------------------------------------------------------------------------------------- gateway


@pytest.mark.parametrize("slot", ["primary", "secondary"])
def test_both_keys_work_and_are_recorded(azure: LocalAzure, slot: str) -> None:
    sub = seeded(azure)
    key = sub.primary_key if slot == "primary" else sub.secondary_key
    reply = client(azure.gateway_url, key).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    assert reply.choices[0].message.content == reply_for("ping")
    labels = azure.gateway.counters.labels()
    assert labels[f"key:{slot}"] == 1
    assert labels[f"sub:{APIM_SUBSCRIPTION}:{slot}"] == 1
    last = azure.gateway.recent()[-1]
    assert (last.sid, last.slot, last.fingerprint) == (APIM_SUBSCRIPTION, slot, fingerprint(key))
    assert key not in repr(azure.gateway.recent())


def test_query_parameter_key(azure: LocalAzure) -> None:
    key = seeded(azure).primary_key
    c = openai.AzureOpenAI(
        azure_endpoint=azure.gateway_url,
        api_key="unused",
        api_version=API_VERSION,
        default_query={"subscription-key": key},
        max_retries=0,
        timeout=10,
    )
    assert c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices
    assert azure.gateway.counters.labels()["key:primary"] == 1


def test_gateway_strips_key_and_sets_backend_credential(azure: LocalAzure) -> None:
    key = seeded(azure).primary_key
    c = openai.AzureOpenAI(
        azure_endpoint=azure.gateway_url,
        api_key="unused",
        api_version=API_VERSION,
        default_headers={"Ocp-Apim-Subscription-Key": key},
        default_query={"subscription-key": key, "keep": "1"},
        max_retries=0,
        timeout=10,
    )
    c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    seen = azure.openai.seen()[-1]
    assert "ocp-apim-subscription-key" not in seen.header_names
    assert "subscription-key" not in seen.query and "keep=1" in seen.query and "api-version=" in seen.query
    assert "api-key" in seen.header_names  # the backend's own key, not the caller's "unused"
    assert seen.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"


def test_missing_key_is_apim_401(azure: LocalAzure) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client(azure.gateway_url).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    response = info.value.response
    assert response.json() == {"statusCode": 401, "message": MISSING_KEY_MESSAGE}
    assert response.headers["www-authenticate"] == (
        f'AzureApiManagementKey realm="{azure.gateway_url}/openai",'
        'name="Ocp-Apim-Subscription-Key",type="header"'
    )
    assert response.headers["content-type"].startswith("application/json")
    assert azure.gateway.counters.labels() == {"key:missing": 1}
    assert azure.openai.counters.total() == 0


def test_invalid_key_is_apim_401(azure: LocalAzure) -> None:
    with pytest.raises(openai.AuthenticationError, match="invalid subscription key") as info:
        client(azure.gateway_url, "0" * 32).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    assert info.value.response.json() == {"statusCode": 401, "message": INVALID_KEY_MESSAGE}
    assert info.value.response.headers["www-authenticate"].startswith("AzureApiManagementKey realm=")
    assert azure.gateway.recent()[-1].slot == "invalid"
    assert azure.gateway.recent()[-1].fingerprint == fingerprint("0" * 32)


async def test_async_client_through_gateway(azure: LocalAzure) -> None:
    key = seeded(azure).secondary_key
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=azure.gateway_url,
        api_key="unused",
        api_version=API_VERSION,
        max_retries=0,
        timeout=10,
        default_headers={"Ocp-Apim-Subscription-Key": key},
    ) as c:
        reply = await c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        assert reply.choices[0].message.content == reply_for("ping")
        with pytest.raises(openai.AuthenticationError):
            await c.chat.completions.create(
                model=DEPLOYMENT,
                messages=MESSAGES,
                extra_headers={"Ocp-Apim-Subscription-Key": "bad"},
            )


def test_unmatched_path_is_apim_404(azure: LocalAzure) -> None:
    with httpx2.Client(timeout=10) as c:
        response = c.get(azure.gateway_url + "/other/api", headers={"Ocp-Apim-Subscription-Key": "x"})
    assert response.status_code == 404
    assert response.json() == {"statusCode": 404, "message": "Resource not found"}


def test_backend_errors_pass_through(azure: LocalAzure) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(azure.gateway_url, seeded(azure).primary_key).chat.completions.create(
            model="no-such-deployment", messages=MESSAGES
        )
    assert info.value.code == "DeploymentNotFound"
    assert "www-authenticate" not in info.value.response.headers


def test_suspended_state_and_regenerated_key_rejected(azure: LocalAzure) -> None:
    sub = fresh(azure)
    old = sub.primary_key
    c = client(azure.gateway_url, old)
    c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    azure.apim_state.regenerate(sub.sid, "primary")
    with pytest.raises(openai.AuthenticationError, match="invalid subscription key"):
        c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    assert sub.primary_key != old
    assert (
        client(azure.gateway_url, sub.primary_key)
        .chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        .choices
    )
    assert azure.apim_state.lookup(sub.secondary_key) == (sub, "secondary")
    with pytest.raises(ValueError, match="already exists"):
        azure.apim_state.create_subscription(
            ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE, sub.sid, display_name="dup"
        )


@pytest.fixture
def limited(local_azure: LocalAzure) -> Iterator[tuple[ApimGateway, Subscription]]:
    """A second gateway with a 3-calls-per-minute rate-limit policy, on the session's CA."""
    state = ApimState()
    sub = state.create_subscription(
        ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE, "limited", display_name="l"
    )
    backend = OpenAIBackend()
    gateway = ApimGateway(state, backend, rate_limit_per_minute=3)
    thread = ServerThread([gateway, backend], local_azure.ca)
    thread.start()
    try:
        yield gateway, sub
    finally:
        thread.stop()


def test_rate_limit_policy(limited: tuple[ApimGateway, Subscription]) -> None:
    gateway, sub = limited
    c = client(gateway.url, sub.primary_key)
    for _ in range(3):
        c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    body = info.value.response.json()
    retry_after = int(info.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert body == {
        "statusCode": 429,
        "message": f"Rate limit is exceeded. Try again in {retry_after} seconds.",
    }
    # The limit is per subscription: the secondary key shares it, another subscription would not.
    with pytest.raises(openai.RateLimitError):
        client(gateway.url, sub.secondary_key).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)


def test_custom_key_names(local_azure: LocalAzure) -> None:
    state = ApimState()
    sub = state.create_subscription(
        ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE, "custom", display_name="c"
    )
    backend = OpenAIBackend()
    gateway = ApimGateway(state, backend, header_name="api-key", query_name="key")
    thread = ServerThread([gateway, backend], local_azure.ca)
    thread.start()
    try:
        # APIM configured with header "api-key" (the AI-Gateway samples' choice) takes the SDK's own header.
        c = openai.AzureOpenAI(
            azure_endpoint=gateway.url,
            api_key=sub.primary_key,
            api_version=API_VERSION,
            max_retries=0,
            timeout=10,
        )
        _OPENED.append(c)
        assert c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices
        assert "api-key" in backend.seen()[-1].header_names  # replaced by the backend credential
        with pytest.raises(openai.AuthenticationError) as info:
            c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, extra_headers={"api-key": "x"})
        assert 'name="api-key"' in info.value.response.headers["www-authenticate"]
    finally:
        thread.stop()


# -------------------------------------------------------------------------------------------------- ARM


def test_mgmt_client_get_list_and_list_secrets(azure: LocalAzure) -> None:
    sub = seeded(azure)
    apim = mgmt(azure)
    contract = apim.subscription.get(RESOURCE_GROUP, APIM_SERVICE, APIM_SUBSCRIPTION)
    assert contract.id == azure.apim_subscription_id
    assert contract.name == APIM_SUBSCRIPTION
    assert contract.type == "Microsoft.ApiManagement/service/subscriptions"
    assert contract.state == "active"
    assert contract.display_name == "apimvault app"
    assert contract.allow_tracing is False
    assert contract.created_date is not None
    assert contract.scope.endswith(f"/service/{APIM_SERVICE}/apis")
    assert contract.primary_key is None and contract.secondary_key is None  # never in GET
    keys = apim.subscription.list_secrets(RESOURCE_GROUP, APIM_SERVICE, APIM_SUBSCRIPTION)
    assert (keys.primary_key, keys.secondary_key) == (sub.primary_key, sub.secondary_key)
    names = [s.name for s in apim.subscription.list(RESOURCE_GROUP, APIM_SERVICE)]
    assert APIM_SUBSCRIPTION in names
    assert apim.subscription.get_entity_tag(RESOURCE_GROUP, APIM_SERVICE, APIM_SUBSCRIPTION) is True
    assert azure.arm.counters["GetSubscription"] == 1
    assert azure.arm.counters["ListSecrets"] == 1


@pytest.mark.parametrize("which", ["primary", "secondary"])
def test_mgmt_client_regenerates_and_old_key_is_rejected_at_once(azure: LocalAzure, which: str) -> None:
    sub = fresh(azure)
    apim = mgmt(azure)
    old = sub.primary_key if which == "primary" else sub.secondary_key
    other = sub.secondary_key if which == "primary" else sub.primary_key
    c = client(azure.gateway_url, old)
    c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    etag_before = sub.etag
    regenerate = (
        apim.subscription.regenerate_primary_key
        if which == "primary"
        else apim.subscription.regenerate_secondary_key
    )
    assert regenerate(RESOURCE_GROUP, APIM_SERVICE, sub.sid) is None
    with pytest.raises(openai.AuthenticationError, match="invalid subscription key"):
        c.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    keys = apim.subscription.list_secrets(RESOURCE_GROUP, APIM_SERVICE, sub.sid)
    new = keys.primary_key if which == "primary" else keys.secondary_key
    assert new is not None and new != old and len(new) == 32
    assert (keys.secondary_key if which == "primary" else keys.primary_key) == other
    assert sub.etag != etag_before
    client(azure.gateway_url, new).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    client(azure.gateway_url, other).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)


def test_mgmt_client_unknown_subscription_and_service(azure: LocalAzure) -> None:
    apim = mgmt(azure)
    with pytest.raises(ResourceNotFoundError) as info:
        apim.subscription.get(RESOURCE_GROUP, APIM_SERVICE, "nope")
    assert info.value.error is not None and info.value.error.code == "ResourceNotFound"
    # The default identity's role is scoped to the seeded service: ARM authorizes before it looks up, so
    # another service is "not authorized ... or the scope is invalid" (403), as on Azure.
    with pytest.raises(HttpResponseError) as denied:
        apim.subscription.list_secrets(RESOURCE_GROUP, "other-service", APIM_SUBSCRIPTION)
    assert denied.value.status_code == 403 and "or the scope is invalid" in str(denied.value)
    # With a role on the whole resource group the unknown service is a plain 404.
    wide = azure.add_identity("rg-contributor")
    rg_scope = f"/subscriptions/{ARM_SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"
    azure.assign_role(wide, "API Management Service Contributor", rg_scope)
    credential = DefaultAzureCredential(managed_identity_client_id=wide.client_id)
    try:
        with (
            ApiManagementClient(credential, ARM_SUBSCRIPTION, base_url=azure.arm_url) as client,
            pytest.raises(ResourceNotFoundError, match="was not found"),
        ):
            client.subscription.list_secrets(RESOURCE_GROUP, "other-service", APIM_SUBSCRIPTION)
    finally:
        credential.close()
        azure.revoke_role(wide)


def arm_url(azure: LocalAzure, suffix: str = "", api_version: str | None = "2024-05-01") -> str:
    url = azure.arm_url + azure.apim_subscription_id + suffix
    return url + (f"?api-version={api_version}" if api_version else "")


def test_arm_auth_errors(azure: LocalAzure) -> None:
    with httpx2.Client(timeout=10) as c:
        missing = c.post(arm_url(azure, "/listSecrets"))
        assert missing.status_code == 401
        assert missing.json() == {
            "error": {
                "code": "AuthenticationFailed",
                "message": "Authentication failed. The 'Authorization' header is missing.",
            }
        }
        challenge = missing.headers["www-authenticate"]
        assert challenge.startswith('Bearer authorization_uri="https://login.windows.net/')
        assert 'error="invalid_token"' in challenge
        forged = TokenIssuer().issue(azure.default_identity, "https://management.azure.com")[0]
        bad = c.post(arm_url(azure, "/listSecrets"), headers={"Authorization": f"Bearer {forged}"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "InvalidAuthenticationToken"
        vault_token = azure.tokens.issue(azure.default_identity, "https://vault.azure.net")[0]
        wrong_aud = c.post(arm_url(azure, "/listSecrets"), headers={"Authorization": f"Bearer {vault_token}"})
        assert wrong_aud.status_code == 401
        assert wrong_aud.json()["error"]["code"] == "InvalidAuthenticationTokenAudience"
        expired = azure.tokens.issue(azure.default_identity, "https://management.azure.com", lifetime_s=-10)[
            0
        ]
        old = c.post(arm_url(azure, "/listSecrets"), headers={"Authorization": f"Bearer {expired}"})
        assert old.json()["error"]["code"] == "ExpiredAuthenticationToken"
        assert "primaryKey" not in old.text
    with pytest.raises(ClientAuthenticationError):
        ApiManagementClient(
            DefaultAzureCredential(),
            ARM_SUBSCRIPTION,
            base_url=azure.arm_url,
            credential_scopes=["https://vault.azure.net/.default"],
        ).subscription.list_secrets(RESOURCE_GROUP, APIM_SERVICE, APIM_SUBSCRIPTION)


def test_arm_bad_requests(azure: LocalAzure) -> None:
    token = azure.tokens.issue(azure.default_identity, "https://management.azure.com")[0]
    auth = {"Authorization": f"Bearer {token}"}
    with httpx2.Client(timeout=10, headers=auth) as c:
        no_version = c.post(arm_url(azure, "/listSecrets", api_version=None))
        assert no_version.status_code == 400
        assert no_version.json()["error"]["code"] == "MissingApiVersionParameter"
        assert c.post(arm_url(azure, "/frobnicate")).json()["error"]["code"] == "NotFound"
        assert c.get(arm_url(azure, "/listSecrets")).status_code == 405
        assert c.delete(arm_url(azure)).status_code == 405
        # A body on a bodiless action is ignored (on a subscription of its own: this regenerates a key).
        own = fresh(azure)
        junk = c.post(
            f"{azure.arm_url}{own.id}/regeneratePrimaryKey?api-version=2024-05-01", content=b"{broken"
        )
        assert junk.status_code == 204
        assert c.get(azure.arm_url + "/subscriptions?api-version=2020-01-01").status_code == 404
        # ARM paths are case-insensitive.
        lower = azure.arm_url + azure.apim_subscription_id.lower() + "?api-version=2024-05-01"
        assert c.get(lower).json()["name"] == APIM_SUBSCRIPTION
        assert c.get(arm_url(azure)).headers["etag"]
        ok = c.get(arm_url(azure))
        assert ok.status_code == 200
        assert ok.json()["properties"]["state"] == "active"
        assert "primaryKey" not in ok.text


def test_arm_fault_surfaces_in_mgmt_client(azure: LocalAzure) -> None:
    azure.arm.faults.fail_next(1, status=500, operation="ListSecrets")
    apim = mgmt(azure, retry_total=0)
    with pytest.raises(HttpResponseError) as info:
        apim.subscription.list_secrets(RESOURCE_GROUP, APIM_SERVICE, APIM_SUBSCRIPTION)
    assert info.value.status_code == 500
    assert apim.subscription.list_secrets(RESOURCE_GROUP, APIM_SERVICE, APIM_SUBSCRIPTION).primary_key


def test_subscription_contract_is_keyless() -> None:
    state = ApimState()
    sub = state.create_subscription("s", "rg", "svc", "sid", display_name="d")
    text = json.dumps(sub.contract())
    assert sub.primary_key not in text and sub.secondary_key not in text
    assert state.lookup("nope") is None
    with pytest.raises(KeyError):
        state.regenerate("missing", "primary")
