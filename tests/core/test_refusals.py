"""Issue 14, part 2: every gateway refusal is classified from what the (local) APIM sends and acted on.

key 401 -> key refresh + one re-send; token 401 -> never touches the key; quota 403 -> QuotaExceededError,
no re-send; 429 -> nothing (openai's own retries); backend 401/403 -> left alone. Sync and async, plain
and streamed, real openai clients over TLS to the local stack.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from apimvault import (
    AsyncSubscriptionKeyProvider,
    QuotaExceededError,
    SubscriptionKeyProvider,
    create_async_azure_openai,
    create_azure_openai,
    refusal_stats,
)
from apimvault._refusal import classify, renewal_seconds
from apimvault.local import DEPLOYMENT, Fault, LocalAzure
from tests._support.core import AppSecret, FakeClock, new_app_secret, rotate_to_secondary, user_messages
from tests._support.policies import FAST_REFRESH

MESSAGES = user_messages("hello")
API = "/openai"


@pytest.fixture
def gateway(azure: LocalAzure) -> Iterator[LocalAzure]:
    """The stack with the gateway's policies removed again after the test."""
    azure.gateway.policies.clear()
    yield azure
    azure.gateway.policies.clear()


def _call_sync(client: openai.AzureOpenAI, stream: bool) -> str:
    if stream:
        chunks = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reply = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    return reply.choices[0].message.content or ""


async def _call_async(client: openai.AsyncAzureOpenAI, stream: bool) -> str:
    if stream:
        chunks = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    reply = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    return reply.choices[0].message.content or ""


class Rig:
    """One app secret, a provider and a client, sync or async; ``call`` runs one chat request."""

    def __init__(self, azure: LocalAzure, mode: str, stream: bool) -> None:
        self.azure = azure
        self.is_async = mode == "async"
        self.stream = stream
        self.app: AppSecret = new_app_secret(azure)
        self.clock = FakeClock()
        self.provider: Any
        self.client: Any
        if self.is_async:
            self.provider = AsyncSubscriptionKeyProvider(
                azure.vault_url, self.app.name, clock=self.clock, policy=FAST_REFRESH
            )
            self.client = create_async_azure_openai(self.provider, max_retries=0)
        else:
            self.provider = SubscriptionKeyProvider(
                azure.vault_url, self.app.name, clock=self.clock, policy=FAST_REFRESH
            )
            self.client = create_azure_openai(self.provider, max_retries=0)

    async def call(self) -> str:
        if self.is_async:
            return await _call_async(self.client, self.stream)
        return _call_sync(self.client, self.stream)

    async def close(self) -> None:
        if self.is_async:
            await self.client.close()
            await self.provider.close()
        else:
            self.client.close()
            self.provider.close()

    def gateway_requests(self) -> int:
        return len([u for u in self.azure.gateway.recent() if u.sid == self.app.sid])


MODES = [
    pytest.param("sync", False, id="sync-plain"),
    pytest.param("sync", True, id="sync-stream"),
    pytest.param("async", False, id="async-plain"),
    pytest.param("async", True, id="async-stream"),
]


@pytest.mark.parametrize(("mode", "stream"), MODES)
async def test_key_401_refreshes_the_key_and_resends_once(
    gateway: LocalAzure, mode: str, stream: bool
) -> None:
    rig = Rig(gateway, mode, stream)
    try:
        assert await rig.call()
        rotate_to_secondary(gateway, rig.app)  # the cached key is now refused by the gateway
        assert await rig.call()
        stats, refusals = rig.provider.stats(), refusal_stats(rig.provider)
        assert (refusals.key, refusals.key_resends) == (1, 1)
        assert (refusals.token, refusals.quota, refusals.rate, refusals.backend) == (0, 0, 0, 0)
        assert stats.resends_401 == 1 and stats.rotations == 1
        # The refused request (recorded without a subscription) was re-sent once, with the new key.
        assert [u.slot for u in gateway.gateway.recent() if u.sid == rig.app.sid] == ["primary", "secondary"]
    finally:
        await rig.close()


@pytest.mark.parametrize(("mode", "stream"), MODES)
async def test_token_401_never_touches_the_key(gateway: LocalAzure, mode: str, stream: bool) -> None:
    rig = Rig(gateway, mode, stream)
    try:
        assert await rig.call()
        reads = rig.provider.stats().vault_reads
        gateway.gateway.policies.set(
            API, {"validate_azure_ad_token": {"audiences": ["api://apimvault-test"]}}
        )
        with pytest.raises(openai.AuthenticationError) as caught:
            await rig.call()
        assert caught.value.body == {"statusCode": 401, "message": "JWT not present."}
        refusals, stats = refusal_stats(rig.provider), rig.provider.stats()
        assert (refusals.token, refusals.key, refusals.token_refreshes, refusals.token_resends) == (
            1,
            0,
            0,
            0,
        )
        # A key client has no token to refresh: the key is not refreshed or re-sent either.
        assert stats.vault_reads == reads and stats.forced_refreshes == 0 and stats.resends_401 == 0
        assert rig.gateway_requests() == 2
        assert gateway.gateway.counters.labels().get("policy:token", 0) >= 1
    finally:
        await rig.close()


@pytest.mark.parametrize(("mode", "stream"), MODES)
async def test_quota_403_raises_typed_error_without_resend(
    gateway: LocalAzure, mode: str, stream: bool
) -> None:
    rig = Rig(gateway, mode, stream)
    try:
        gateway.gateway.policies.set(API, {"quota_by_key": {"calls": 1, "renewal_period": 3600}})
        assert await rig.call()
        reads = rig.provider.stats().vault_reads
        with pytest.raises(QuotaExceededError) as caught:
            await rig.call()
        error = caught.value
        assert isinstance(error, openai.PermissionDeniedError) and error.status_code == 403
        assert error.policy == "quota-by-key"
        assert error.renewal_s is not None and 0 < error.renewal_s <= 3600
        assert "quota" in str(error) and "renews in" in str(error)
        assert error.gateway_message.startswith("Out of call volume quota. Quota will be replenished in ")
        key = rig.provider.current()
        assert key is not None and key.reveal() not in str(error) and key.reveal() not in repr(error)
        refusals = refusal_stats(rig.provider)
        assert (refusals.quota, refusals.key, refusals.key_resends) == (1, 0, 0)
        assert rig.provider.stats().vault_reads == reads  # no key refresh
        assert rig.gateway_requests() == 2  # no re-send
        assert gateway.gateway.counters.labels()["policy:quota"] >= 1
    finally:
        await rig.close()


async def test_token_quota_403_names_the_token_limit_policy(gateway: LocalAzure) -> None:
    rig = Rig(gateway, "sync", False)
    try:
        gateway.gateway.policies.set(
            API, {"azure_openai_token_limit": {"token_quota": 1, "token_quota_period": "Daily"}}
        )
        assert await rig.call()
        with pytest.raises(QuotaExceededError) as caught:
            await rig.call()
        assert caught.value.policy == "azure-openai-token-limit"
        assert caught.value.renewal_s is not None and 0 < caught.value.renewal_s <= 86400
        assert refusal_stats(rig.provider).quota == 1
        assert gateway.gateway.counters.labels()["policy:token-quota"] >= 1
    finally:
        await rig.close()


@pytest.mark.parametrize(("mode", "stream"), MODES)
@pytest.mark.parametrize(
    "policy",
    [
        {"rate_limit_by_key": {"calls": 1, "renewal_period": 60}},
        {"azure_openai_token_limit": {"tokens_per_minute": 1}},
    ],
    ids=["rate-limit-by-key", "token-limit-rate"],
)
async def test_429_is_left_to_openai(
    gateway: LocalAzure, mode: str, stream: bool, policy: dict[str, Any]
) -> None:
    rig = Rig(gateway, mode, stream)
    try:
        gateway.gateway.policies.set(API, policy)
        assert await rig.call()
        reads = rig.provider.stats().vault_reads
        with pytest.raises(openai.RateLimitError) as caught:
            await rig.call()
        assert caught.value.response.headers["Retry-After"].isdigit()
        refusals = refusal_stats(rig.provider)
        assert (refusals.rate, refusals.key, refusals.quota, refusals.key_resends) == (1, 0, 0, 0)
        assert rig.provider.stats().vault_reads == reads
        assert rig.gateway_requests() == 2
    finally:
        await rig.close()


@pytest.mark.parametrize(("mode", "stream"), MODES)
@pytest.mark.parametrize("status", [401, 403])
async def test_backend_401_403_are_left_alone(
    gateway: LocalAzure, mode: str, stream: bool, status: int
) -> None:
    rig = Rig(gateway, mode, stream)
    try:
        assert await rig.call()
        reads = rig.provider.stats().vault_reads
        gateway.openai.faults.add(Fault("status", status=status, times=1))
        expected = openai.AuthenticationError if status == 401 else openai.PermissionDeniedError
        with pytest.raises(expected) as caught:
            await rig.call()
        assert not isinstance(caught.value, QuotaExceededError)
        refusals = refusal_stats(rig.provider)
        assert (refusals.backend, refusals.key, refusals.token, refusals.quota) == (1, 0, 0, 0)
        assert rig.provider.stats().vault_reads == reads and rig.provider.stats().resends_401 == 0
        assert rig.gateway_requests() == 2
    finally:
        await rig.close()


def test_policies_through_the_admin_api(gateway: LocalAzure) -> None:
    from apimvault.local.admin import AdminClient, AdminError

    with AdminClient(gateway.admin.url, gateway.ca_path) as admin:
        shown = admin.set_policies({"quota_by_key": {"calls": 2, "renewal_period": 60}})
        assert shown == {"quota_by_key": {"calls": 2, "renewal_period": 60}}
        assert admin.policies() == shown
        with pytest.raises(AdminError) as bad:
            admin.set_policies({"quota_by_key": {"calls": 0}})
        assert bad.value.status == 400
        with pytest.raises(AdminError):
            admin.set_policies({"no_such_policy": {}})
        assert admin.policies() == shown  # a refused change loses nothing
        admin.clear_policies()
        assert admin.policies() == {}


# ------------------------------------------------------------------------ classification (no network)


def _h(**headers: str) -> httpx2.Headers:
    return httpx2.Headers({k.replace("_", "-"): v for k, v in headers.items()})


@pytest.mark.parametrize(
    ("status", "headers", "body", "kind"),
    [
        (401, _h(www_authenticate='AzureApiManagementKey realm="x",name="k",type="header"'), b"{}", "key"),
        (401, _h(), b'{"statusCode":401,"message":"Access denied due to invalid subscription key."}', "key"),
        (401, _h(), b'{"statusCode":401,"message":"JWT not present."}', "token"),
        (401, _h(www_authenticate='Bearer error="invalid_token"'), b"", "token"),
        (
            401,
            _h(),
            b'{"error":{"code":"401","message":"Access denied due to invalid subscription key"}}',
            "backend",
        ),
        (403, _h(retry_after="5"), b'{"statusCode":403,"message":"Out of call volume quota."}', "quota"),
        (403, _h(), b'{"statusCode":403,"message":"Forbidden"}', "other"),
        (403, _h(), b'{"error":{"code":"403","message":"Public access is disabled."}}', "backend"),
        (429, _h(retry_after="3"), b'{"statusCode":429,"message":"Rate limit is exceeded."}', "rate"),
        (200, _h(), b"{}", None),
        (500, _h(), b'{"statusCode":500,"message":"quota"}', None),
    ],
)
def test_classify(status: int, headers: httpx2.Headers, body: bytes, kind: str | None) -> None:
    assert classify(status, headers, body) == kind


def test_renewal_seconds_from_header_or_timespan() -> None:
    assert renewal_seconds(_h(retry_after="42"), "") == 42
    assert (
        renewal_seconds(_h(), "Quota will be replenished in 5.03:23:11.")
        == 5 * 86400 + 3 * 3600 + 23 * 60 + 11
    )
    assert renewal_seconds(_h(), "Quota will be replenished in 00:01:30.") == 90
    assert renewal_seconds(_h(retry_after="soon"), "no span") is None
