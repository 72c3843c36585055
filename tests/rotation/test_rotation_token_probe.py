"""The rotation's gateway probe against a key-plus-token gateway (the local APIM's validate-azure-ad-token):
with ``token_scope`` the probes carry an Entra token from the rotation's credential; without it the gateway's
token 401 is a typed :class:`GatewayProbeError` naming ``APIMVAULT_TOKEN_SCOPE``. Real clients, local
stack."""

from __future__ import annotations

import types
from collections.abc import Iterator

import pytest

from apimvault import ConfigurationError
from apimvault.local import LocalAzure, temporary_environ
from apimvault.rotation import (
    ENV_TOKEN_SCOPE,
    GatewayProbe,
    GatewayProbeError,
    RotationConfig,
    check_latest,
    plan_rotation,
    rotate,
)
from tests._support.canary import LeakCapture
from tests._support.cli import assert_no_key, gateway_status, new_rotating_app, run_cli
from tests._support.rotation import RotatorAccess, rotator_access

AUDIENCE = "api://apimvault-gateway"
SCOPE = AUDIENCE + "/.default"
VALIDATE = {"validate_azure_ad_token": {"audiences": [AUDIENCE]}}


@pytest.fixture
def gateway(azure: LocalAzure) -> Iterator[LocalAzure]:
    """The session stack's gateway in key-plus-token mode (it validates an Entra token after the key)."""
    azure.gateway.policies.set(azure.gateway.api_path, VALIDATE)
    try:
        with temporary_environ({"APIMVAULT_PROBE_INTERVAL": "0", ENV_TOKEN_SCOPE: None}):
            yield azure
    finally:
        azure.gateway.policies.clear()


@pytest.fixture
def rotator(azure: LocalAzure) -> Iterator[RotatorAccess]:
    """Infra's rotator identity (not Secrets Officer); each test grants it its own app (for_app)."""
    with rotator_access(azure) as access:
        yield access


def _token_refusals(azure: LocalAzure) -> int:
    return azure.gateway.counters.labels().get("policy:token", 0)


def _frames(exc: BaseException) -> Iterator[types.FrameType]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        tb = item.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next
        todo += [item.__cause__, item.__context__]


def _reported(value: object) -> str:
    """A local as an error reporter records it, with the headers of an HTTP request or response."""
    text = repr(value)
    for holder in (value, getattr(value, "request", None)):
        headers = getattr(holder, "headers", None)
        if headers is not None:
            text += " " + repr(dict(headers))
    return text


def test_config_reads_the_token_scope_and_names_the_variable_when_bad() -> None:
    assert RotationConfig.from_env({}, require_gateways=False).token_scope is None
    config = RotationConfig.from_env({ENV_TOKEN_SCOPE: f" {SCOPE} "}, require_gateways=False)
    assert config.token_scope == SCOPE
    assert (
        RotationConfig.from_env(
            {ENV_TOKEN_SCOPE: "api://x/.default"}, require_gateways=False, token_scope=SCOPE
        ).token_scope
        == SCOPE
    )  # the caller's argument (the CLI's flag) wins
    with pytest.raises(ConfigurationError, match=ENV_TOKEN_SCOPE):
        RotationConfig.from_env({ENV_TOKEN_SCOPE: "two scopes"}, require_gateways=False)
    with pytest.raises(ConfigurationError, match="token_scope"):
        RotationConfig(token_scope="a b")
    with pytest.raises(ConfigurationError, match=ENV_TOKEN_SCOPE):
        GatewayProbe(["https://127.0.0.1:1"], token_scope=SCOPE)  # a token needs a credential


def test_key_plus_token_rotation_probes_with_a_token(gateway: LocalAzure, rotator: RotatorAccess) -> None:
    app = new_rotating_app(gateway)
    credential = rotator.for_app(app)
    old_primary, old_secondary = app.keys()
    gateway.gateway.counters.reset()
    with LeakCapture(["apimvault", "httpx2", "httpcore2", "azure", "msal"]) as capture:
        result = rotate(
            vault_url=gateway.vault_url, secret_name=app.name, credential=credential, token_scope=SCOPE
        )
    assert not result.skipped and result.regenerated == "secondary"
    new_secondary = app.keys()[1]
    assert new_secondary != old_secondary
    assert gateway.keyvault.latest(app.name).value == new_secondary
    # Every probe got past the token policy: none was refused for its token, and at least the plan-time
    # probe and the probe rule's consecutive 2xx per URL reached the model list.
    assert _token_refusals(gateway) == 0
    config = RotationConfig.from_env()
    assert gateway.gateway.counters["Models"] >= len(config.gateway_urls) * (1 + config.probe_successes)
    # A key-only request is refused for its token: the probes' 2xx were the token's doing.
    assert gateway_status(gateway, new_secondary) == 401 and _token_refusals(gateway) == 1
    assert "eyJ" not in capture.text()  # no JWT in any DEBUG record
    assert_no_key(capture.text() + repr(result), {old_primary, old_secondary, new_secondary})


def test_the_environment_variable_reaches_plan_and_check(gateway: LocalAzure, rotator: RotatorAccess) -> None:
    app = new_rotating_app(gateway)
    credential = rotator.for_app(app)
    gateway.gateway.counters.reset()
    with temporary_environ({ENV_TOKEN_SCOPE: SCOPE}):
        plan = plan_rotation(vault_url=gateway.vault_url, secret_name=app.name, credential=credential)
        check = check_latest(vault_url=gateway.vault_url, secret_name=app.name, credential=credential)
    assert check.live and all(v is True for v in check.accepted.values())
    assert _token_refusals(gateway) == 0 and plan.credential_id == "primary"
    assert plan.token_scope == SCOPE and plan.as_dict()["token_scope"] == SCOPE
    assert f"bearer token for {SCOPE}" in "\n".join(plan.describe())
    probe = GatewayProbe(plan.gateway_urls, token_scope=SCOPE, credential=credential)
    try:
        assert probe.token_scope == SCOPE
        assert probe.describe()[0].endswith(f"<new key> and Authorization: Bearer <token for {SCOPE}>")
        assert "eyJ" not in repr(probe.__dict__)  # the token source shows its scope, not a token
    finally:
        probe.close()


def test_without_a_token_scope_the_token_refusal_names_the_variable(
    gateway: LocalAzure, rotator: RotatorAccess
) -> None:
    app = new_rotating_app(gateway)
    credential = rotator.for_app(app)
    keys = app.keys()
    version = gateway.keyvault.latest(app.name).version
    with pytest.raises(GatewayProbeError) as refused:
        rotate(vault_url=gateway.vault_url, secret_name=app.name, credential=credential)
    message = str(refused.value)
    assert refused.value.status == 401
    assert "also requires an Entra token" in message
    assert ENV_TOKEN_SCOPE in message and "--token-scope" in message
    # Refused at plan time, before anything changed.
    assert app.keys() == keys and gateway.keyvault.latest(app.name).version == version
    # The CLI says the same, with exit code 1 and no key in its output.
    run = run_cli(["rotate", "--yes"], app.env())
    assert run.code != 0 and ENV_TOKEN_SCOPE in run.err and app.keys() == keys
    assert_no_key(run.out + run.err, set(keys))


def test_cli_rotate_takes_the_token_scope(gateway: LocalAzure) -> None:
    app = new_rotating_app(gateway)
    _, old_secondary = app.keys()
    gateway.gateway.counters.reset()
    run = run_cli(["rotate", "--yes", "--json", "--token-scope", SCOPE], app.env())
    assert run.code == 0, run.err
    assert run.json()["result"]["regenerated"] == "secondary" and app.keys()[1] != old_secondary
    assert _token_refusals(gateway) == 0
    assert "eyJ" not in run.out + run.err
    assert_no_key(run.out + run.err, app.seen_keys | set(app.keys()))


def test_a_refused_token_is_typed_and_stays_out_of_traceback_locals(
    gateway: LocalAzure, rotator: RotatorAccess
) -> None:
    app = new_rotating_app(gateway)
    credential = rotator.for_app(app)
    keys = app.keys()
    with pytest.raises(GatewayProbeError) as refused:  # a token for another audience
        plan_rotation(
            vault_url=gateway.vault_url,
            secret_name=app.name,
            credential=credential,
            token_scope="api://some-other-api/.default",
        )
    assert refused.value.status == 401 and "refused the probe's Entra token" in str(refused.value)
    assert _token_refusals(gateway) >= 1
    frames = [f for f in _frames(refused.value) if "test_" not in f.f_code.co_name]
    assert "accepts" in {f.f_code.co_name for f in frames}  # the probe's own frame is in the traceback
    for frame in frames:
        for name, value in frame.f_locals.items():
            text = f"{name}={_reported(value)}"
            assert "eyJ" not in text and not any(k in text for k in keys), (frame.f_code.co_name, name)
