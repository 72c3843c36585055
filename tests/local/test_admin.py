"""The admin API and its client: bearer token, counters, faults (request and stream kinds), recent key use,
bad input."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from apimvault.local import API_VERSION, DEPLOYMENT, LocalAzure
from apimvault.local.admin import AdminClient, AdminError
from apimvault.local.stack import APIM_SUBSCRIPTION

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "admin"}]


@pytest.fixture
def admin(azure: LocalAzure) -> Iterator[AdminClient]:
    with AdminClient(azure.admin.url, azure.ca_path, token=azure.admin_token) as client:
        yield client


def owner(azure: LocalAzure) -> httpx2.Client:
    """A raw client sending the stack's admin token, as its owner would."""
    return httpx2.Client(
        base_url=azure.admin.url, timeout=10, headers={"Authorization": f"Bearer {azure.admin_token}"}
    )


def primary(azure: LocalAzure) -> str:
    sub = azure.apim_state.get(APIM_SUBSCRIPTION)
    assert sub is not None
    return sub.primary_key


_OPENED: list[openai.AzureOpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Every client a test makes here is closed when it ends, not left to the garbage collector."""
    yield
    while _OPENED:
        _OPENED.pop().close()


def chat_client(azure: LocalAzure) -> openai.AzureOpenAI:
    made = openai.AzureOpenAI(
        azure_endpoint=azure.gateway_url,
        api_key="unused",
        api_version=API_VERSION,
        default_headers={"Ocp-Apim-Subscription-Key": primary(azure)},
        max_retries=0,
        timeout=10,
    )
    _OPENED.append(made)
    return made


def test_services(azure: LocalAzure, admin: AdminClient) -> None:
    services = {s["name"]: s for s in admin.services()}
    assert set(services) == {"keyvault", "identity", "gateway", "arm", "openai", "oidc"}  # oidc: issue 14
    assert services["gateway"]["url"] == azure.gateway_url


def test_counters_and_reset(azure: LocalAzure, admin: AdminClient) -> None:
    chat_client(azure).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    counters = admin.counters("gateway")
    assert counters["operations"] == {"ChatCompletions": 1}
    assert counters["labels"]["key:primary"] == 1
    assert admin.counters("openai")["operations"] == {"ChatCompletions": 1}
    admin.reset_counters("gateway")
    assert admin.counters("gateway") == {"operations": {}, "labels": {}}


def test_faults_round_trip_and_observed(azure: LocalAzure, admin: AdminClient) -> None:
    created = admin.add_fault("gateway", "throttle", operation="ChatCompletions", times=1, retry_after=9)
    assert created == {
        "kind": "throttle",
        "operation": "ChatCompletions",
        "times": 1,
        "seconds": 0.0,
        "status": 503,
        "retry_after": 9,
    }
    assert admin.faults("gateway") == [created]
    with pytest.raises(openai.RateLimitError) as info:
        chat_client(azure).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    assert info.value.response.headers["retry-after"] == "9"
    assert admin.faults("gateway") == []
    admin.add_fault("openai", "status", status=502)
    with pytest.raises(openai.InternalServerError):
        chat_client(azure).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    admin.clear_faults("openai")
    assert admin.faults("openai") == []
    assert chat_client(azure).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices


def test_stream_faults_via_admin(azure: LocalAzure, admin: AdminClient) -> None:
    fault = admin.add_fault("openai", "drop_stream", after_chunks=1, times=1)
    assert fault["kind"] == "drop_stream" and fault["after_chunks"] == 1
    assert [f["kind"] for f in admin.faults("openai")] == ["drop_stream"]
    with pytest.raises((httpx2.HTTPError, openai.APIConnectionError)):
        list(chat_client(azure).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True))
    admin.add_fault("openai", "slow_stream", seconds=0.01)
    admin.clear_faults("openai")
    assert azure.openai.faults.stream_active == []
    with pytest.raises(AdminError, match="openai service only") as info:
        admin.add_fault("gateway", "slow_stream")
    assert info.value.status == 400


def test_recent_shows_fingerprints_never_keys(azure: LocalAzure, admin: AdminClient) -> None:
    chat_client(azure).chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    recent = admin.recent()
    assert recent[-1]["sid"] == APIM_SUBSCRIPTION and recent[-1]["slot"] == "primary"
    assert len(recent[-1]["fingerprint"]) == 8
    sub = azure.apim_state.get(APIM_SUBSCRIPTION)
    assert sub is not None
    with owner(azure) as c:
        for path in ("/services", "/gateway/recent", "/gateway/counters", "/arm/counters", "/openai/faults"):
            text = c.get(path).text
            assert sub.primary_key not in text and sub.secondary_key not in text


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/gateway/faults", b"{broken", 400),
        ("POST", "/gateway/faults", b"[1]", 400),
        ("POST", "/gateway/faults", b'{"kind": "explode"}', 400),
        ("POST", "/gateway/faults", b'{"kind": "latency", "seconds": -1}', 400),
        ("POST", "/gateway/faults", b'{"kind": "latency", "seconds": "soon"}', 400),
        ("POST", "/gateway/faults", b'{"kind": "status", "status": 999}', 400),
        ("POST", "/gateway/faults", b'{"kind": "status", "times": 0}', 400),
        ("POST", "/gateway/faults", b'{"kind": "status", "colour": "red"}', 400),
        ("POST", "/gateway/faults", b'{"kind": "status", "operation": 5}', 400),
        ("POST", "/gateway/faults", b"x" * (70 * 1024), 400),
        ("POST", "/nosuch/faults", b'{"kind": "status"}', 404),
        ("GET", "/gateway/whatever", None, 404),
        ("GET", "/", None, 404),
        ("PUT", "/gateway/faults", b"{}", 405),
        ("GET", "/arm/recent", None, 404),
    ],
)
def test_bad_input(azure: LocalAzure, method: str, path: str, body: bytes | None, status: int) -> None:
    with owner(azure) as c:
        response = c.request(method, path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == status
        assert set(response.json()["error"]) == {"code", "message"}
        wrong_type = c.post(
            "/gateway/faults", content=b'{"kind": "status"}', headers={"Content-Type": "text/plain"}
        )
        assert wrong_type.status_code == 400
        assert c.get("/services").status_code == 200
    assert azure.gateway.faults.active == []


# ------------------------------------------------------------------------------------- bearer token

ROUTES = [
    ("GET", "/services", None),
    ("GET", "/gateway/counters", None),
    ("POST", "/gateway/counters/reset", None),
    ("GET", "/keyvault/faults", None),
    ("POST", "/keyvault/faults", b'{"kind": "status", "status": 503}'),
    ("DELETE", "/gateway/faults", None),
    ("GET", "/gateway/recent", None),
]


@pytest.mark.parametrize("authorization", [None, "Bearer", "Bearer wrong-token", "Basic x", "token"])
def test_every_route_needs_the_admin_token(azure: LocalAzure, authorization: str | None) -> None:
    """Another local user (no token, or a guess) can neither inject faults nor read or reset counters."""
    azure.gateway.faults.inject("status", status=500, times=1)  # the owner's fault must survive
    azure.gateway.counters.label("owner")
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    with httpx2.Client(base_url=azure.admin.url, timeout=10) as c:
        for method, path, body in ROUTES:
            response = c.request(method, path, content=body, headers=headers)
            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["error"]["code"] == "Unauthorized"
            assert azure.admin_token not in response.text
    assert azure.keyvault.faults.active == []  # nothing injected
    assert len(azure.gateway.faults.active) == 1  # nothing cleared
    assert azure.gateway.counters.labels()["owner"] == 1  # nothing reset


def test_admin_client_without_the_token_is_refused(azure: LocalAzure) -> None:
    with AdminClient(azure.admin.url, azure.ca_path, token="not-the-token") as client:
        with pytest.raises(AdminError, match="admin bearer token") as info:
            client.add_fault("keyvault", "status", status=503)
        assert info.value.status == 401
    assert azure.keyvault.faults.active == []
    assert azure.admin_token not in repr(client) and azure.admin_token not in repr(azure.admin)


def test_the_token_reaches_only_the_owner(azure: LocalAzure, tmp_path: Path) -> None:
    """Each stack has its own token; the owner gets it from the stack, its environment and its env file."""
    assert len(azure.admin_token) >= 32
    assert azure.environ()["APIMVAULT_ADMIN_TOKEN"] == azure.admin_token
    assert os.environ["APIMVAULT_ADMIN_TOKEN"] == azure.admin_token  # the session's azure.env()
    with AdminClient(azure.admin.url, azure.ca_path) as client:  # token from APIMVAULT_ADMIN_TOKEN
        assert {s["name"] for s in client.services()} >= {"keyvault", "gateway"}
    env_file = tmp_path / "local.env"
    env_file.write_text("stale\n")
    env_file.chmod(0o644)  # an older, world-readable file is tightened when rewritten
    azure.write_env_file(env_file)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert f"APIMVAULT_ADMIN_TOKEN={azure.admin_token}" in env_file.read_text().splitlines()
    with LocalAzure(ca=azure.ca, seed=False) as other:
        assert other.admin_token != azure.admin_token
