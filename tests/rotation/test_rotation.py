"""apimvault.rotation against the local stack: real SecretClient and ApiManagementClient, no mocks."""

from __future__ import annotations

import datetime as dt
import json
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from azure.identity import DefaultAzureCredential

import apimvault.rotation as rotation_module
from apimvault import AccessDeniedError, ConfigurationError
from apimvault.local import DEPLOYMENT, LocalAzure, LocalCA, temporary_environ
from apimvault.local.stack import API_VERSION
from apimvault.rotation import (
    GatewayProbe,
    RotationError,
    check_latest,
    plan_rotation,
    rotate,
    rotate_from_event,
)
from tests._support.cli import assert_no_key, gateway_status, new_rotating_app, run_cli
from tests._support.events import near_expiry_event
from tests._support.rotation import ManualClock, RotatorAccess, rotator_access


def gateway_status_at(azure: LocalAzure, url: str, key: str) -> int:
    """Status of a chat through the gateway unit at ``url`` (TLS verified against the stack CA)."""
    with httpx2.Client(verify=ssl.create_default_context(cafile=str(azure.ca_path)), timeout=10) as client:
        response = client.post(
            f"{url}/openai/deployments/{DEPLOYMENT}/chat/completions",
            params={"api-version": API_VERSION},
            headers={"Ocp-Apim-Subscription-Key": key},
            json={"messages": [{"role": "user", "content": "ping"}]},
        )
    return response.status_code


@pytest.fixture(autouse=True)
def quick_probes() -> Iterator[None]:
    """The probe rule's default count (10 consecutive 2xx) back to back: these tests run on the real
    clock, and the spacing is covered on a manual clock."""
    with temporary_environ({"APIMVAULT_PROBE_INTERVAL": "0"}):
        yield


@pytest.fixture
def rotator(azure: LocalAzure) -> Iterator[RotatorAccess]:
    """Infra's rotator identity (not Secrets Officer); each test grants it its own app (for_app)."""
    with rotator_access(azure) as access:
        yield access


def _event(azure: LocalAzure, name: str, version: str, kind: str = "SecretNearExpiry") -> dict[str, Any]:
    return near_expiry_event(
        vault_url=azure.vault_url,
        secret=name,
        version=version,
        event_type=f"Microsoft.KeyVault.{kind}",
        event_id="6f1d2d7e-0000-4000-8000-000000000001",
    )


def test_rotate_flips_tag_keeps_tags_and_sets_expiry(azure: LocalAzure, rotator: RotatorAccess) -> None:
    app = new_rotating_app(azure, tags={"Owner": "team-a"})
    credential = rotator.for_app(app)
    primary, old_secondary = app.keys()
    before = azure.keyvault.latest(app.name)
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)

    result = rotate(
        vault_url=azure.vault_url,
        secret_name=app.name,
        apim_subscription_id=None,  # from the ProviderAddress tag
        credential=credential,
        now=now,
    )

    latest = azure.keyvault.latest(app.name)
    new_primary, new_secondary = app.keys()
    assert not result.skipped and result.reason == "rotated"
    assert result.old_version == before.version and result.new_version == latest.version
    assert result.credential_id == "secondary" and result.regenerated == "secondary"
    assert latest.value == new_secondary != old_secondary
    assert new_primary == primary  # the key in use is untouched
    assert latest.tags == {**(before.tags or {}), "CredentialId": "secondary"}
    assert latest.content_type == "text/plain"
    assert latest.expires == int((now + dt.timedelta(days=60)).timestamp())
    assert result.expires_on == "2030-03-02T00:00:00Z"
    assert gateway_status(azure, primary) == 200
    assert gateway_status(azure, new_secondary) == 200
    assert gateway_status(azure, old_secondary) == 401
    assert_no_key(repr(result) + json.dumps(result.as_dict()), app.seen_keys)


def test_old_key_is_revoked_only_after_its_successor_is_in_the_vault(
    azure: LocalAzure, rotator: RotatorAccess
) -> None:
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    started_with, _ = app.keys()
    v1 = azure.keyvault.latest(app.name).version
    observed: dict[str, Any] = {}

    def rotate_in_thread() -> None:
        observed["result"] = rotate(
            vault_url=azure.vault_url,
            secret_name=app.name,
            apim_subscription_id=app.resource_id,
            credential=credential,
        )

    # Hold rotation 1's Key Vault write in flight and look at the gateway while it is.
    azure.keyvault.faults.inject("latency", operation="SetSecret", seconds=0.6, times=1)
    writer = threading.Thread(target=rotate_in_thread)
    writer.start()
    deadline = time.monotonic() + 20
    while azure.keyvault.counters["SetSecret"] < 1 and writer.is_alive() and time.monotonic() < deadline:
        threading.Event().wait(0.002)
    assert azure.keyvault.counters["SetSecret"] == 1
    observed["latest_during_write"] = azure.keyvault.latest(app.name).version
    observed["started_with_during_write"] = gateway_status(azure, started_with)
    writer.join(30)
    first = observed["result"]

    assert observed["latest_during_write"] == v1  # the write had not landed yet...
    assert observed["started_with_during_write"] == 200  # ...and the key in use still worked
    assert gateway_status(azure, started_with) == 200  # and still does once the new version is in
    v2 = azure.keyvault.latest(app.name)
    assert v2.version == first.new_version and (v2.tags or {})["CredentialId"] == "secondary"

    # Rotation 2 regenerates the primary: only now does the key the clients started with stop working,
    # while the vault has been serving its successor since rotation 1.
    second = rotate(
        vault_url=azure.vault_url,
        secret_name=app.name,
        apim_subscription_id=app.resource_id,
        credential=credential,
    )
    new_primary, secondary = app.keys()
    assert second.credential_id == "primary" and second.old_version == v2.version
    assert gateway_status(azure, started_with) == 401
    assert gateway_status(azure, secondary) == 200 and secondary == v2.value
    assert gateway_status(azure, new_primary) == 200
    assert azure.keyvault.latest(app.name).value == new_primary


def test_event_for_an_old_version_is_skipped(azure: LocalAzure, rotator: RotatorAccess) -> None:
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    v1 = azure.keyvault.latest(app.name).version

    first = rotate_from_event(_event(azure, app.name, v1), credential=credential)
    assert not first.skipped and first.old_version == v1
    keys_after_first = app.keys()

    again = rotate_from_event(json.dumps([_event(azure, app.name, v1)]), credential=credential)  # redelivery
    assert again.skipped and "already rotated" in again.reason
    assert again.old_version == v1 and again.new_version is None and again.credential_id == "secondary"
    assert app.keys() == keys_after_first  # nothing regenerated
    assert azure.keyvault.latest(app.name).version == first.new_version


def test_event_types_and_vaults_that_must_not_rotate(azure: LocalAzure, rotator: RotatorAccess) -> None:
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    v1 = azure.keyvault.latest(app.name).version
    with pytest.raises(ConfigurationError, match="would loop"):
        rotate_from_event(_event(azure, app.name, v1, "SecretNewVersionCreated"), credential=credential)
    other_vault = _event(azure, app.name, v1)
    other_vault["data"] = {
        **other_vault["data"],
        "Id": f"https://other.vault.azure.net/secrets/{app.name}/{v1}",
    }
    other_vault["data"]["VaultName"] = "other"
    with pytest.raises(RotationError, match="not the configured"):
        rotate_from_event(other_vault, credential=credential)
    assert azure.keyvault.latest(app.name).version == v1


def test_refuses_when_the_tag_names_the_wrong_key(azure: LocalAzure, rotator: RotatorAccess) -> None:
    app = new_rotating_app(azure, tags={"CredentialId": "secondary"})  # but the value is the primary key
    credential = rotator.for_app(app)
    keys = app.keys()
    with pytest.raises(RotationError, match="would revoke the key in use") as info:
        rotate(
            vault_url=azure.vault_url, secret_name=app.name, apim_subscription_id=None, credential=credential
        )
    assert app.keys() == keys  # nothing regenerated
    # The vault was verified and repaired: a new version holds the same live key with the right tag.
    latest = azure.keyvault.latest(app.name)
    assert latest.value == keys[0] and (latest.tags or {})["CredentialId"] == "primary"
    assert "was repaired" in str(info.value) and latest.version in str(info.value)
    assert_no_key(str(info.value), app.seen_keys)


def test_refuses_a_subscription_the_secret_does_not_name(azure: LocalAzure, rotator: RotatorAccess) -> None:
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    other = new_rotating_app(azure)
    keys = app.keys()
    with pytest.raises(RotationError, match="ProviderAddress"):
        rotate(
            vault_url=azure.vault_url,
            secret_name=app.name,
            apim_subscription_id=other.resource_id,
            credential=credential,
        )
    assert app.keys() == keys


def test_needs_a_subscription_and_a_writer(azure: LocalAzure, rotator: RotatorAccess) -> None:
    app = new_rotating_app(azure, tags={"ProviderAddress": ""})
    credential = rotator.for_app(app)
    with pytest.raises(ConfigurationError, match="APIMVAULT_APIM_SUBSCRIPTION_ID"):
        plan_rotation(vault_url=azure.vault_url, secret_name=app.name, credential=credential)

    reader = new_rotating_app(azure)
    user = DefaultAzureCredential()  # the default identity: Key Vault Secrets User on the secret only
    try:
        with pytest.raises(AccessDeniedError, match="Key Vault Secrets Officer"):
            rotate(
                vault_url=azure.vault_url, secret_name=reader.name, apim_subscription_id=None, credential=user
            )
    finally:
        user.close()
    assert (azure.keyvault.latest(reader.name).tags or {})["CredentialId"] == "primary"


def test_plan_describes_without_changing(azure: LocalAzure, rotator: RotatorAccess) -> None:
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    keys = app.keys()
    plan = plan_rotation(vault_url=azure.vault_url, secret_name=app.name, credential=credential)
    assert plan.credential_id == "primary" and plan.regenerate == "secondary"
    assert plan.validity_days == 60 and plan.apim_subscription == app.resource_id
    assert app.keys() == keys
    assert_no_key("\n".join(plan.describe()) + json.dumps(plan.as_dict()), app.seen_keys)


# ------------------------------------------------------------------------- make-before-break (issue 11)


@pytest.fixture(scope="module")
def slow_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="module")
def slow_gateway(
    slow_clock: ManualClock, local_azure: LocalAzure, session_ca: LocalCA
) -> Iterator[LocalAzure]:
    """A stack whose gateway units take 20 s and 45 s (on a manual clock) to accept a regenerated key."""
    with LocalAzure(
        ca=session_ca,
        propagation_clock=slow_clock,
        propagation_delay={"region1": 20, "region2": 45},
    ) as stack:  # both units behind one URL (balanced, in turn): only this module's requests reach them
        yield stack  # each test enters stack.env() itself, so other tests keep the session stack's


def test_vault_gets_the_new_key_only_once_every_gateway_unit_accepts_it(
    slow_gateway: LocalAzure, slow_clock: ManualClock
) -> None:
    azure = slow_gateway
    app = new_rotating_app(azure)
    v1 = azure.keyvault.latest(app.name)
    primary, _ = app.keys()
    seen: list[tuple[float, str, int, int]] = []

    def on_step(step: str) -> None:
        if step == "probe":
            _, secondary = app.keys()
            seen.append(
                (
                    slow_clock(),
                    azure.keyvault.latest(app.name).version,
                    gateway_status(azure, secondary),  # one unit in turn (both behind the URL)
                    gateway_status(azure, v1.value),  # what clients that refresh now get
                )
            )

    with azure.env():
        access = RotatorAccess(azure)  # infra's rotator roles on this app only, revoked after
        credential = access.for_app(app)
        try:
            result = rotate(
                vault_url=azure.vault_url,
                secret_name=app.name,
                apim_subscription_id=None,
                credential=credential,
                clock=slow_clock,
                sleep=slow_clock.advance,
                on_step=on_step,
            )
        finally:
            access.close()

    _, secondary = app.keys()
    latest = azure.keyvault.latest(app.name)
    assert not result.skipped and latest.value == secondary and latest.version == result.new_version
    # Every probe ran while the vault still served version 1, whose key worked throughout.
    assert len(seen) >= 3
    assert {version for _, version, _, _ in seen} == {v1.version}
    assert all(current == 200 for _, _, _, current in seen)
    assert seen[0][2] == 401  # at first even region1 refused the new key...
    assert seen[-1][2] == 200  # ...and accepted it before the end
    # Propagation measured on the injected clock: region2's 45 s plus at most one back-off step.
    assert result.propagation_seconds is not None and 45 <= result.propagation_seconds <= 60
    assert result.as_dict()["propagation_seconds"] == result.propagation_seconds
    assert result.verified_version == latest.version and result.repaired_versions == ()
    for url in azure.gateway_unit_urls.values():  # both units accept the stored key now
        assert gateway_status_at(azure, url, latest.value) == 200
    assert gateway_status(azure, primary) == 200
    assert azure.gateway.counters.labels().get("propagation-refused:region2", 0) >= 1
    assert_no_key(repr(result) + json.dumps(result.as_dict()), app.seen_keys)


def test_gateway_timeout_leaves_the_vault_unchanged_and_says_so(
    slow_gateway: LocalAzure, slow_clock: ManualClock
) -> None:
    azure = slow_gateway
    azure.apim_state.set_propagation(3600, unit="region2")
    try:
        app = new_rotating_app(azure)
        v1 = azure.keyvault.latest(app.name)
        primary, _ = app.keys()
        access = RotatorAccess(azure)  # infra's rotator roles on this app only, revoked after
        credential = access.for_app(app)
        started = slow_clock()
        try:
            with azure.env(), pytest.raises(RotationError, match="vault was NOT changed") as info:
                rotate(
                    vault_url=azure.vault_url,
                    secret_name=app.name,
                    apim_subscription_id=None,
                    credential=credential,
                    propagation_timeout=120,
                    clock=slow_clock,
                    sleep=slow_clock.advance,
                )
        finally:
            access.close()
        assert "still works" in str(info.value) and azure.gateway_unit_urls["region2"] in str(info.value)
        assert info.value.permanent is False
        assert 120 <= slow_clock() - started <= 140  # it gave up at the deadline, not before
        assert azure.keyvault.latest(app.name).version == v1.version
        assert app.keys()[0] == primary
        for url in azure.gateway_unit_urls.values():
            assert gateway_status_at(azure, url, primary) == 200  # the key in use works everywhere
        assert_no_key(str(info.value), app.seen_keys)

        # The retry resumes: it waits for the key the first attempt regenerated instead of regenerating
        # again (which would restart the units' sync and never finish on a gateway slower than one try).
        _, pending = app.keys()
        assert (azure.keyvault.latest(app.name).tags or {})["RotationPending"].startswith("secondary:")
        azure.apim_state.set_propagation(
            0, unit="region2"
        )  # later regenerations; the queued one keeps 3600 s
        slow_clock.advance(3600)
        access = RotatorAccess(azure)  # infra's rotator roles on this app only, revoked after
        credential = access.for_app(app)
        try:
            with azure.env():
                again = rotate(
                    vault_url=azure.vault_url,
                    secret_name=app.name,
                    apim_subscription_id=None,
                    credential=credential,
                    propagation_timeout=120,
                    clock=slow_clock,
                    sleep=slow_clock.advance,
                )
        finally:
            access.close()
        assert not again.skipped and "resumed" in again.reason
        assert app.keys() == (primary, pending)  # nothing regenerated this time
        latest = azure.keyvault.latest(app.name)
        assert latest.value == pending and "RotationPending" not in (latest.tags or {})
    finally:
        azure.apim_state.set_propagation({"region1": 20, "region2": 45})
        azure.apim_state.settle()


def test_probe_needs_a_gateway_and_says_what_it_sends(azure: LocalAzure, rotator: RotatorAccess) -> None:
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    keys = app.keys()
    with temporary_environ({"APIMVAULT_GATEWAY_URLS": None, "AZURE_OPENAI_ENDPOINT": None}):
        with pytest.raises(ConfigurationError, match="APIMVAULT_GATEWAY_URLS"):
            rotate(
                vault_url=azure.vault_url,
                secret_name=app.name,
                apim_subscription_id=None,
                credential=credential,
            )
        with pytest.raises(ConfigurationError, match="https"):
            rotate(
                vault_url=azure.vault_url,
                secret_name=app.name,
                apim_subscription_id=None,
                credential=credential,
                gateway_urls="http://127.0.0.1:1",
            )
    assert app.keys() == keys
    plan = plan_rotation(vault_url=azure.vault_url, secret_name=app.name, credential=credential)
    assert plan.gateway_urls == azure.gateway_urls
    described = "\n".join(plan.describe())
    assert "GET " + azure.gateway_url + "/openai/v1/models" in described and "no tokens" in described
    probe = GatewayProbe(plan.gateway_urls)
    try:
        assert probe.describe()[0].endswith("Ocp-Apim-Subscription-Key: <new key>")
        assert probe.accepts(azure.gateway_url, keys[0]) is True
        assert probe.accepts(azure.gateway_url, "0" * 32) is False
    finally:
        probe.close()
    # The probe reached the backend's model list (no tokens), not a completion.
    assert azure.openai.counters["Models"] >= 1 and azure.openai.counters["ChatCompletions"] == 0


# ------------------------------------------------------------------------------------- tags (issue 11)


def test_missing_validity_tag_is_refused_before_anything_changes(
    azure: LocalAzure, rotator: RotatorAccess
) -> None:
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    keys = app.keys()
    tags = dict(azure.keyvault.latest(app.name).tags or {})
    del tags["ValidityPeriodDays"]
    azure.keyvault.put_secret(app.name, keys[0], content_type="text/plain", tags=tags)
    before = azure.keyvault.latest(app.name).version
    with pytest.raises(RotationError, match="no ValidityPeriodDays tag") as info:
        rotate(
            vault_url=azure.vault_url, secret_name=app.name, apim_subscription_id=None, credential=credential
        )
    assert "ValidityPeriodDays=60" in str(info.value) and "Nothing was changed" in str(info.value)
    with pytest.raises(RotationError, match="ValidityPeriodDays"):
        plan_rotation(vault_url=azure.vault_url, secret_name=app.name, credential=credential)
    assert app.keys() == keys and azure.keyvault.latest(app.name).version == before
    assert len(azure.keyvault.versions(app.name)) == 2  # no version was written


def test_missing_credential_id_is_inferred_and_written(azure: LocalAzure, rotator: RotatorAccess) -> None:
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    primary, secondary = app.keys()
    tags = dict(azure.keyvault.latest(app.name).tags or {})
    del tags["CredentialId"]
    azure.keyvault.put_secret(
        app.name, secondary, content_type="text/plain", tags=tags
    )  # holds the secondary
    untagged = azure.keyvault.latest(app.name).version

    plan = plan_rotation(vault_url=azure.vault_url, secret_name=app.name, credential=credential)
    assert plan.credential_id == "secondary" and plan.regenerate == "primary" and plan.credential_id_inferred
    assert "inferred from listSecrets" in "\n".join(plan.describe())

    result = rotate(
        vault_url=azure.vault_url, secret_name=app.name, apim_subscription_id=None, credential=credential
    )
    new_primary, still_secondary = app.keys()
    assert still_secondary == secondary and new_primary != primary  # the key in use was not regenerated
    assert result.regenerated == "primary" and result.credential_id == "primary"
    versions = {v.version: v for v in azure.keyvault.versions(app.name)}
    assert (versions[untagged].tags or {})["CredentialId"] == "secondary"  # the tag was written
    latest = azure.keyvault.latest(app.name)
    assert latest.value == new_primary and (latest.tags or {})["CredentialId"] == "primary"


def test_arm_403_names_the_custom_role(azure: LocalAzure, rotator: RotatorAccess) -> None:
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    azure.arm.faults.inject("status", operation="ListSecrets", status=403, times=1)
    with pytest.raises(RotationError) as info:
        rotate(
            vault_url=azure.vault_url, secret_name=app.name, apim_subscription_id=None, credential=credential
        )
    message = str(info.value)
    assert "apimvault APIM subscription key rotator" in message and "regenerateSecondaryKey/action" in message
    assert "API Management Service Contributor" not in message
    assert rotation_module.__doc__ is not None
    assert "apimvault APIM subscription key rotator" in rotation_module.__doc__
    assert "API Management Service Contributor" not in rotation_module.__doc__


def test_check_latest_reports_a_revoked_latest_version(azure: LocalAzure, rotator: RotatorAccess) -> None:
    app = new_rotating_app(azure)
    credential = rotator.for_app(app)
    good = check_latest(vault_url=azure.vault_url, secret_name=app.name, credential=credential)
    assert good.ok and good.live and good.credential_id == "primary"
    assert set(good.accepted) == set(azure.gateway_urls)
    azure.apim_state.regenerate(app.sid, "primary")  # the stored key is revoked elsewhere
    bad = check_latest(vault_url=azure.vault_url, secret_name=app.name, credential=credential)
    assert not bad.ok and not bad.live and set(bad.accepted.values()) == {False}
    assert bad.version == good.version  # a check changes nothing
    assert_no_key(repr(bad) + json.dumps(bad.as_dict()), app.seen_keys | set(app.keys()))


def test_cli_rotate_reports_propagation_and_takes_a_timeout(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    run = run_cli(["rotate", "--json", "--propagation-timeout", "30"], app.env())
    assert run.code == 0, run.err
    doc = run.json()
    result, plan = doc["result"], doc["plan"]
    assert result["propagation_seconds"] is not None and result["propagation_seconds"] >= 0
    assert result["verified_version"] == azure.keyvault.latest(app.name).version == result["new_version"]
    assert result["repaired_versions"] == [] and plan["propagation_timeout"] == 30
    assert plan["gateway_urls"] == list(azure.gateway_urls)
    human = run_cli(["rotate"], app.env())
    assert human.code == 0 and "the gateway accepted the new key" in human.out
    assert "/openai/v1/models" in human.out  # the plan says what the probe sends
    bad = run_cli(["rotate", "--propagation-timeout", "0"], app.env())
    assert bad.code == 2 and "propagation timeout" in bad.err
    assert_no_key(run.out + run.err + human.out + human.err + bad.err, app.seen_keys | set(app.keys()))
