"""The local gateway routes like APIM: the API's URL suffix and operations, 404 before any key check, and
gateway units balanced behind one URL (issues 19.2, 19.3, 25.2), through the real openai client."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from apimvault.local import DEPLOYMENT, LocalAzure, LocalCA
from apimvault.local.admin import AdminClient, AdminError
from apimvault.local.apim import Subscription, normalize_operations, normalize_suffix
from apimvault.local.openai_backend import reply_for
from apimvault.local.stack import APIM_SERVICE, ARM_SUBSCRIPTION, RESOURCE_GROUP

MESSAGES: Any = [{"role": "user", "content": "ping"}]
NOT_FOUND = {"statusCode": 404, "message": "Resource not found"}
PUBLISHED_API_VERSION = "2024-02-01"  # the published openai-python-behind-APIM snippet's api_version


@pytest.fixture(scope="module")
def stack(local_azure: LocalAzure, session_ca: LocalCA) -> Iterator[LocalAzure]:
    with LocalAzure(ca=session_ca, seed=False, gateway_units=3) as azure:
        yield azure


@pytest.fixture
def gw(stack: LocalAzure) -> Iterator[LocalAzure]:
    yield stack
    stack.gateway.configure_api(suffix="openai", operations=[("POST", "/*"), ("GET", "/*")])


def fresh(azure: LocalAzure) -> Subscription:
    sid = f"route-{uuid.uuid4().hex[:8]}"
    return azure.apim_state.create_subscription(
        ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE, sid, display_name=sid
    )


def http(azure: LocalAzure) -> httpx2.Client:
    import ssl

    return httpx2.Client(verify=ssl.create_default_context(cafile=str(azure.ca_path)), timeout=10)


def chat_via(base_url: str, key: str, *, stream: bool = False) -> str:
    """The published pattern: AzureOpenAI with a deployment-scoped base_url, a placeholder api_key and the
    subscription key as a default header."""
    client = openai.AzureOpenAI(
        base_url=base_url,
        api_key="placeholder",
        api_version=PUBLISHED_API_VERSION,
        default_headers={"Ocp-Apim-Subscription-Key": key},
        max_retries=0,
        timeout=10,
    )
    try:
        if stream:
            chunks = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
            return "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
        reply = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        return reply.choices[0].message.content or ""
    finally:
        client.close()


# ------------------------------------------------------------------------------ 404 before the key


@pytest.mark.parametrize("key_kind", ["missing", "invalid", "valid"])
def test_unrouted_requests_get_apims_404_before_any_key_check(gw: LocalAzure, key_kind: str) -> None:
    sub = fresh(gw)
    headers = {
        "missing": {},
        "invalid": {"Ocp-Apim-Subscription-Key": "0" * 32},
        "valid": {"Ocp-Apim-Subscription-Key": sub.primary_key},
    }[key_kind]
    seen_before = len(gw.gateway.recent())
    with http(gw) as c:
        for method, path in (
            ("GET", "/"),
            ("GET", "/status-0123456789abcdef"),
            ("POST", "/deployments/x/chat/completions"),  # no API suffix
            ("PUT", f"/openai/deployments/{DEPLOYMENT}/chat/completions"),  # no PUT operation
            ("DELETE", "/openai/v1/models"),
            ("GET", "/openaiX/v1/models"),  # not under the suffix
        ):
            response = c.request(method, gw.gateway_url + path, headers=headers)
            assert (response.status_code, response.json()) == (404, NOT_FOUND), (method, path)
            assert "www-authenticate" not in response.headers
    assert len(gw.gateway.recent()) == seen_before  # no key was looked at


def test_narrowed_operations_make_the_probe_path_unrouted(gw: LocalAzure) -> None:
    """With only the chat operation defined, the models list (a probe path) is APIM's 404 for a good key."""
    sub = fresh(gw)
    gw.gateway.configure_api(operations=[("POST", "/deployments/{deployment-id}/chat/completions")])
    with http(gw) as c:
        models = c.get(
            f"{gw.gateway_url}/openai/v1/models", headers={"Ocp-Apim-Subscription-Key": sub.primary_key}
        )
        assert (models.status_code, models.json()) == (404, NOT_FOUND)
    assert chat_via(f"{gw.gateway_url}/openai/deployments/{DEPLOYMENT}", sub.primary_key) == reply_for("ping")
    with pytest.raises(openai.AuthenticationError):  # a routed path checks the key
        chat_via(f"{gw.gateway_url}/openai/deployments/{DEPLOYMENT}", "0" * 32)


# ------------------------------------------------------------------------------------- API suffix


def test_the_published_pattern_works_with_the_default_suffix(gw: LocalAzure) -> None:
    sub = fresh(gw)
    base = f"{gw.gateway_url}/openai/deployments/{DEPLOYMENT}"
    assert chat_via(base, sub.primary_key) == reply_for("ping")
    assert chat_via(base, sub.primary_key, stream=True) == reply_for("ping")
    with pytest.raises(openai.NotFoundError):  # the suffix-less shape is not routed
        chat_via(f"{gw.gateway_url}/deployments/{DEPLOYMENT}", sub.primary_key)


def test_an_empty_suffix_serves_the_api_at_the_root(gw: LocalAzure) -> None:
    sub = fresh(gw)
    gw.gateway.configure_api(suffix="")
    assert gw.gateway.api_path == "" and gw.gateway.api_config()["suffix"] == ""
    base = f"{gw.gateway_url}/deployments/{DEPLOYMENT}"
    assert chat_via(base, sub.primary_key) == reply_for("ping")
    assert chat_via(base, sub.primary_key, stream=True) == reply_for("ping")
    with pytest.raises(openai.AuthenticationError):  # routed: the key is checked
        chat_via(base, "0" * 32)
    # The backend saw its own path: /openai/deployments/<dep>/... (APIM swaps the suffix for its URL's path).
    assert gw.openai.counters["ChatCompletions"] >= 2


async def test_an_empty_suffix_works_for_the_async_client(gw: LocalAzure) -> None:
    sub = fresh(gw)
    gw.gateway.configure_api(suffix="")
    client = openai.AsyncAzureOpenAI(
        base_url=f"{gw.gateway_url}/deployments/{DEPLOYMENT}",
        api_key="placeholder",
        api_version=PUBLISHED_API_VERSION,
        default_headers={"Ocp-Apim-Subscription-Key": sub.primary_key},
        max_retries=0,
        timeout=10,
    )
    async with client:
        reply = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    assert reply.choices[0].message.content == reply_for("ping")


def test_a_custom_suffix_and_the_admin_api(gw: LocalAzure) -> None:
    sub = fresh(gw)
    gw.gateway.policies.set(gw.gateway.api_id, {"rate_limit_by_key": {"calls": 1000, "renewal_period": 60}})
    try:
        with AdminClient(gw.admin.url, gw.ca_path, token=gw.admin_token) as admin:
            shown = admin.api()
            assert shown["suffix"] == "openai" and shown["routing"] == "balanced"
            assert shown["units"] == ["unit1", "unit2", "unit3"] and shown["urls"] == [gw.gateway_url]
            assert shown["operations"] == [["POST", "/*"], ["GET", "/*"]]
            changed = admin.set_api(suffix="/llm/v2/")
            assert changed["suffix"] == "llm/v2" and changed["path"] == "/llm/v2"
            moved = f"{gw.gateway_url}/llm/v2/deployments/{DEPLOYMENT}"
            assert chat_via(moved, sub.primary_key) == reply_for("ping")
            with pytest.raises(openai.NotFoundError):
                chat_via(f"{gw.gateway_url}/openai/deployments/{DEPLOYMENT}", sub.primary_key)
            # The API keeps its policies (its name) when its path changes.
            assert gw.gateway.policies.get(gw.gateway.api_id).rate_limit_by_key is not None
            for body, message in (
                ({"suffix": "a b"}, "invalid API URL suffix"),
                ({"operations": [["FETCH!", "/*"]]}, "invalid operation"),
                ({"operations": [["GET", "/a/*/b"]]}, "invalid operation"),
                ({"operations": []}, "at least one operation"),
            ):
                with pytest.raises(AdminError, match=message) as info:
                    admin.set_api(**body)
                assert info.value.status == 400
            assert admin.api()["suffix"] == "llm/v2"  # refused changes changed nothing
            assert admin.set_api(suffix="")["path"] == ""
    finally:
        gw.gateway.policies.set(gw.gateway.api_id, None)


def test_the_stack_takes_the_suffix_at_construction(session_ca: LocalCA) -> None:
    with LocalAzure(ca=session_ca, api_suffix="") as azure:
        sub = azure.apim_state.get("apimvault-app")
        assert sub is not None
        base = f"{azure.gateway_url}/deployments/{DEPLOYMENT}"
        assert chat_via(base, sub.primary_key, stream=True) == reply_for("ping")
        assert azure.gateway.challenge.startswith(f'AzureApiManagementKey realm="{azure.gateway_url}",')
    with pytest.raises(ValueError, match="suffix"):
        normalize_suffix("has space")
    assert normalize_suffix(" /openai/ ") == "openai" and normalize_suffix("") == ""
    with pytest.raises(ValueError, match="pair"):
        normalize_operations(["GET /*"])


# ---------------------------------------------------------------------------------------- units


def test_units_share_one_url_and_take_requests_in_turn(gw: LocalAzure) -> None:
    sub = fresh(gw)
    assert gw.gateway_urls == (gw.gateway_url,)
    assert set(gw.gateway_unit_urls.values()) == {gw.gateway_url}
    start = len(gw.gateway.recent())
    for _ in range(6):
        assert chat_via(f"{gw.gateway_url}/openai/deployments/{DEPLOYMENT}", sub.primary_key)
    units = [u.unit for u in gw.gateway.recent()[start:]]
    assert sorted(units) == ["unit1", "unit1", "unit2", "unit2", "unit3", "unit3"]
    assert units[:3] == units[3:] and len(set(units[:3])) == 3  # round-robin


def _units_served(session_ca: LocalCA, seed: int) -> list[str]:
    gateway_units = ("a", "b", "c", "d")
    with LocalAzure(
        ca=session_ca,
        seed=False,
        gateway_units=gateway_units,
        gateway_balance="random",
        propagation_seed=seed,
    ) as azure:
        sub = fresh(azure)
        for _ in range(12):
            chat_via(f"{azure.gateway_url}/openai/deployments/{DEPLOYMENT}", sub.primary_key)
        return [u.unit for u in azure.gateway.recent()]


def test_random_balancing_is_reproducible_with_a_seed(session_ca: LocalCA) -> None:
    first, again = _units_served(session_ca, 11), _units_served(session_ca, 11)
    assert first == again and len(first) == 12
    assert set(first) <= {"a", "b", "c", "d"} and len(set(first)) >= 2


def test_bad_gateway_configuration_is_refused(session_ca: LocalCA) -> None:
    for kwargs, message in (
        ({"gateway_units": 0}, "gateway_units"),
        ({"gateway_units": True}, "gateway_units"),
        ({"gateway_routing": "anycast"}, "routing"),
        ({"gateway_balance": "least-busy"}, "balance"),
        ({"api_suffix": "a?b"}, "suffix"),
    ):
        with pytest.raises(ValueError, match=message):
            LocalAzure(ca=session_ca, seed=False, **kwargs)
