"""The local APIM's per-API policies and the token issuer's OpenID configuration (issue 14).

Raw HTTPS to the gateway with a real subscription key; tokens come from the stack's managed-identity
endpoint through azure-identity's ManagedIdentityCredential.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import jwt
import pytest
from azure.identity import ManagedIdentityCredential
from cryptography.hazmat.primitives.asymmetric import rsa

from apimvault.local import DEPLOYMENT, LocalAzure, LocalCA
from apimvault.local.policies import ApiPolicies, timespan
from tests._support.core import FakeClock, new_app_secret

AUDIENCE = "api://apimvault-gateway"
SCOPE = AUDIENCE + "/.default"
API = "/openai"


@pytest.fixture
def gateway(azure: LocalAzure) -> Iterator[LocalAzure]:
    azure.gateway.policies.clear()
    yield azure
    azure.gateway.policies.clear()


def _http(azure: LocalAzure) -> httpx2.Client:
    return httpx2.Client(verify=ssl.create_default_context(cafile=str(azure.ca_path)), timeout=10)


def _chat(http: httpx2.Client, azure: LocalAzure, key: str, token: str | None = None) -> httpx2.Response:
    headers = {"Ocp-Apim-Subscription-Key": key}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return http.post(
        f"{azure.gateway_url}/openai/deployments/{DEPLOYMENT}/chat/completions?api-version=2024-10-21",
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
    )


def _token(azure: LocalAzure, scope: str = SCOPE) -> str:
    credential = ManagedIdentityCredential()
    try:
        token: str = credential.get_token(scope).token
        return token
    finally:
        credential.close()


def _forged(token: str) -> str:
    """The same claims and ``kid``, signed by another RSA key."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = jwt.decode(token, options={"verify_signature": False})
    return jwt.encode(
        claims, other, algorithm="RS256", headers={"kid": jwt.get_unverified_header(token)["kid"]}
    )


def test_openid_configuration_and_jwks_verify_the_issued_tokens(gateway: LocalAzure) -> None:
    token = _token(gateway)
    with _http(gateway) as http:
        config = http.get(f"{gateway.oidc.url}/common/.well-known/openid-configuration").json()
        assert config["issuer"] == gateway.tokens.issuer
        keys = http.get(config["jwks_uri"]).json()
        assert http.get(f"{gateway.oidc.url}/nope/discovery/keys").status_code == 404
    (key,) = keys["keys"]
    assert {"kty", "use", "kid", "n", "e"} <= set(key) and "d" not in key  # public parts only
    assert jwt.get_unverified_header(token)["kid"] == key["kid"]
    claims = jwt.decode(
        token,
        jwt.PyJWK(key, algorithm="RS256").key,
        algorithms=["RS256"],
        audience=AUDIENCE,
        issuer=config["issuer"],
    )
    assert claims["aud"] == AUDIENCE and claims["appid"] == gateway.default_identity.client_id


@pytest.mark.parametrize(
    ("policy", "token_kind", "status", "message"),
    [
        ({}, "good", 200, None),
        ({}, "none", 401, "JWT not present."),
        ({}, "wrong-audience", 401, "IDX10214: Audience validation failed. Access denied."),
        ({}, "forged", 401, "IDX10503: Signature validation failed. Access denied."),
        ({"required_roles": ["Gateway.Call"]}, "good", 401,
         "JWT is missing the following claims: roles. Access denied."),
        ({"failed_validation_error_message": "Unauthorized. Access token is missing or invalid."},
         "none", 401, "Unauthorized. Access token is missing or invalid."),
        ({"failed_validation_httpcode": 403}, "none", 403, "JWT not present."),
    ],
)  # fmt: skip
def test_validate_azure_ad_token(
    gateway: LocalAzure, policy: dict[str, Any], token_kind: str, status: int, message: str | None
) -> None:
    app = new_app_secret(gateway)
    gateway.gateway.policies.set(API, {"validate_azure_ad_token": {"audiences": [AUDIENCE], **policy}})
    tokens: dict[str, Callable[[], str | None]] = {
        "good": lambda: _token(gateway),
        "none": lambda: None,
        "wrong-audience": lambda: _token(gateway, "https://cognitiveservices.azure.com/.default"),
        "forged": lambda: _forged(_token(gateway)),
    }
    token = tokens[token_kind]()
    before = gateway.gateway.counters.labels().get("policy:token", 0)
    with _http(gateway) as http:
        response = _chat(http, gateway, app.subscription.primary_key, token)
    assert response.status_code == status
    if message is None:
        assert response.json()["object"] == "chat.completion"
        assert gateway.gateway.counters.labels().get("policy:token", 0) == before
    else:
        assert response.json() == {"statusCode": status, "message": message}
        assert "www-authenticate" not in response.headers
        assert gateway.gateway.counters.labels()["policy:token"] == before + 1


def test_required_role_granted_passes(gateway: LocalAzure) -> None:
    app = new_app_secret(gateway)
    gateway.tokens.grant_app_role(gateway.default_identity, AUDIENCE + "-roles", "Gateway.Call")
    gateway.gateway.policies.set(
        API,
        {"validate_azure_ad_token": {"audiences": [AUDIENCE + "-roles"], "required_roles": ["Gateway.Call"]}},
    )
    with _http(gateway) as http:
        ok = _chat(http, gateway, app.subscription.primary_key, _token(gateway, AUDIENCE + "-roles/.default"))
    assert ok.status_code == 200


def test_expired_token_is_refused_by_the_stack_clock(session_ca: LocalCA) -> None:

    clock = FakeClock()
    with LocalAzure(
        ca=session_ca, clock=clock, policies={"validate_azure_ad_token": {"audiences": [AUDIENCE]}}
    ) as stack:
        with stack.env():
            token = _token(stack)
        key = stack.apim_state.get("apimvault-app").primary_key  # type: ignore[union-attr]
        with _http(stack) as http:
            assert _chat(http, stack, key, token).status_code == 200
            clock.advance(stack.tokens.lifetime_s + 1)
            expired = _chat(http, stack, key, token)
    assert expired.status_code == 401
    assert (
        expired.json()["message"]
        == "IDX10223: Lifetime validation failed. The token is expired. Access denied."
    )


def test_quota_renews_after_the_period(gateway: LocalAzure) -> None:
    app = new_app_secret(gateway)
    clock = FakeClock()
    gateway.gateway.policies.clock = clock
    try:
        gateway.gateway.policies.set(
            API, ApiPolicies.from_dict({"quota_by_key": {"calls": 1, "renewal_period": 300}})
        )
        with _http(gateway) as http:
            assert _chat(http, gateway, app.subscription.primary_key).status_code == 200
            clock.advance(100)
            refused = _chat(http, gateway, app.subscription.primary_key)
            assert refused.status_code == 403
            assert refused.headers["Retry-After"] == "200"
            assert refused.json() == {
                "statusCode": 403,
                "message": "Out of call volume quota. Quota will be replenished in 00:03:20.",
            }
            clock.advance(200)
            assert _chat(http, gateway, app.subscription.primary_key).status_code == 200
    finally:
        gateway.gateway.policies.clock = gateway.clock


def test_policies_reject_bad_configuration() -> None:
    bad: dict[str, Any]
    for bad in (
        {"quota_by_key": {"calls": -1}},
        {"rate_limit_by_key": {"calls": 1, "renewal_period": 0}},
        {"azure_openai_token_limit": {}},
        {"azure_openai_token_limit": {"token_quota": 5, "token_quota_period": "Fortnightly"}},
        {"azure_openai_token_limit": {"tokens_per_minute": 5, "estimate_prompt_tokens": "false"}},
        {"validate_azure_ad_token": {"audiences": []}},
        {"validate_azure_ad_token": {"audiences": "api://x"}},
        {"quota_by_key": {"calls": 1, "unknown": 2}},
        {"quota": {"calls": 1}},
    ):
        with pytest.raises(ValueError):
            ApiPolicies.from_dict(bad)


def test_timespan_is_dotnet_format() -> None:
    assert timespan(0) == "00:00:00"
    assert timespan(59.2) == "00:01:00"
    assert timespan(5 * 86400 + 3 * 3600 + 23 * 60 + 11) == "5.03:23:11"


def _post(http: httpx2.Client, azure: LocalAzure, key: str, body: bytes) -> httpx2.Response:
    return http.post(
        f"{azure.gateway_url}/openai/deployments/{DEPLOYMENT}/chat/completions?api-version=2024-10-21",
        content=body,
        headers={"Ocp-Apim-Subscription-Key": key, "Content-Type": "application/json"},
    )


def _statuses(azure: LocalAzure, limit: dict[str, Any], body: bytes, calls: int) -> list[int]:
    """The statuses of ``calls`` identical requests under a fresh token limit (one minute's window)."""
    app = new_app_secret(azure)
    azure.gateway.policies.set(API, {"azure_openai_token_limit": limit})
    with _http(azure) as http:
        return [_post(http, azure, app.subscription.primary_key, body).status_code for _ in range(calls)]


# A prompt whose estimate (len // 4 = 1,000 tokens) dwarfs what the local model reports for it.
LONG_PROMPT = json.dumps({"messages": [{"role": "user", "content": "x" * 3950}]}).encode()


def test_token_limit_without_estimate_charges_the_reported_usage(gateway: LocalAzure) -> None:
    """``estimate-prompt-tokens="false"`` (infra's setting): a request is admitted while the window has
    tokens left and charged the response's ``usage.total_tokens``; the one that crosses the limit passes."""
    app = new_app_secret(gateway)
    with _http(gateway) as http:
        first = _post(http, gateway, app.subscription.primary_key, LONG_PROMPT)
    reported = first.json()["usage"]["total_tokens"]
    assert 0 < reported < len(LONG_PROMPT) // 4  # else this test cannot tell the two modes apart
    limit = {"tokens_per_minute": reported + 1, "estimate_prompt_tokens": False}
    # used 0 -> admitted, charged `reported`; used < limit -> admitted (crosses it); then refused.
    assert _statuses(gateway, limit, LONG_PROMPT, 3) == [200, 200, 429]
    # The same limit estimating the prompt charges ~1,000 tokens on admission: the second is refused.
    assert _statuses(gateway, {**limit, "estimate_prompt_tokens": True}, LONG_PROMPT, 2) == [200, 429]
    assert gateway.gateway.counters.labels()["policy:token-rate"] >= 2


def test_token_limit_without_estimate_still_estimates_a_stream(gateway: LocalAzure) -> None:
    """Learn: with ``stream: true`` prompt and completion tokens are estimated whatever the attribute says,
    so a stream is charged its prompt estimate on admission and its streamed text when it ends."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    prompt = len(body) // 4
    # Prompt alone would leave one token for the second stream; the completion's estimate uses it up.
    limit = {"tokens_per_minute": prompt + 1, "estimate_prompt_tokens": False}
    assert _statuses(gateway, limit, body, 2) == [200, 429]
    # A non-streamed request under the same limit is charged only its (reported) usage.
    plain = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    limit = {"tokens_per_minute": 10_000, "estimate_prompt_tokens": False}
    assert _statuses(gateway, limit, plain, 2) == [200, 200]
