"""Gateway propagation in the local APIM: per-unit delays on an injected clock, no sleeps.

Keys are regenerated through the real azure-mgmt-apimanagement client and checked through the real openai
client against the gateway's one URL: the units share it and take requests in turn (round-robin), so
``len(units)`` consecutive requests reach each unit once; which unit answered comes from the gateway's
record of the request (``gateway.recent()``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from azure.identity import DefaultAzureCredential
from azure.mgmt.apimanagement import ApiManagementClient

from apimvault.local import API_VERSION, DEPLOYMENT, LocalAzure, LocalCA
from apimvault.local.admin import AdminClient, AdminError
from apimvault.local.apim import ApimState, Subscription
from apimvault.local.openai_backend import reply_for
from apimvault.local.stack import APIM_SERVICE, ARM_SUBSCRIPTION, RESOURCE_GROUP
from tests._support.rotation import ManualClock

MESSAGES: Any = [{"role": "user", "content": "ping"}]


@pytest.fixture(scope="module")
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="module")
def stack(clock: ManualClock, local_azure: LocalAzure, session_ca: LocalCA) -> Iterator[LocalAzure]:
    # Tests enter a.env() only where they need it, so other tests keep the session stack's environment.
    with LocalAzure(
        ca=session_ca, propagation_clock=clock, propagation_delay={"region1": 10, "region2": 30}
    ) as a:
        yield a


@pytest.fixture
def azure_p(stack: LocalAzure) -> Iterator[LocalAzure]:
    stack.apim_state.set_propagation({"region1": 10, "region2": 30})
    stack.gateway.counters.reset()
    yield stack
    stack.apim_state.settle()


def fresh(azure: LocalAzure) -> Subscription:
    sid = f"prop-{uuid.uuid4().hex[:8]}"
    return azure.apim_state.create_subscription(
        ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE, sid, display_name=f"test {sid}"
    )


def status(url: str, key: str) -> int:
    """Status of a one-token chat through the gateway unit at ``url``, with the real openai client."""
    client = openai.AzureOpenAI(
        azure_endpoint=url,
        api_key="unused",
        api_version=API_VERSION,
        default_headers={"Ocp-Apim-Subscription-Key": key},
        max_retries=0,
        timeout=10,
    )
    try:
        reply = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    except openai.APIStatusError as exc:
        return exc.status_code
    finally:
        client.close()
    assert reply.choices[0].message.content == reply_for("ping")
    return 200


def statuses(azure: LocalAzure, key: str) -> dict[str, int]:
    """Per gateway unit, the status of a chat with ``key`` through the gateway's one URL: one request per
    unit (round-robin), each attributed to the unit the gateway says answered it."""
    seen: dict[str, int] = {}
    for _ in azure.apim_state.units:
        code = status(azure.gateway_url, key)
        seen[azure.gateway.recent()[-1].unit] = code
    assert set(seen) == set(azure.apim_state.units)  # every unit answered one of them
    return seen


def regenerate_via_arm(azure: LocalAzure, sid: str, which: str) -> None:
    with azure.env():
        credential = DefaultAzureCredential()
        with ApiManagementClient(credential, ARM_SUBSCRIPTION, base_url=azure.arm_url) as mgmt:
            regenerate = (
                mgmt.subscription.regenerate_secondary_key
                if which == "secondary"
                else mgmt.subscription.regenerate_primary_key
            )
            regenerate(RESOURCE_GROUP, APIM_SERVICE, sid)
            keys = mgmt.subscription.list_secrets(RESOURCE_GROUP, APIM_SERVICE, sid)
        credential.close()
    sub = azure.apim_state.get(sid)
    assert sub is not None and keys.secondary_key == sub.secondary_key  # ARM shows the new key at once


def test_each_unit_accepts_the_new_key_only_after_its_own_delay(
    azure_p: LocalAzure, clock: ManualClock
) -> None:
    sub = fresh(azure_p)
    # The units share the gateway's one URL (a region's units share a hostname): not addressable one by one.
    assert azure_p.gateway_urls == (azure_p.gateway_url,)
    assert azure_p.gateway_unit_urls == {"region1": azure_p.gateway_url, "region2": azure_p.gateway_url}
    old = sub.secondary_key
    regenerate_via_arm(azure_p, sub.sid, "secondary")
    new = sub.secondary_key
    assert new != old

    # Before any unit has synced: the new value is refused everywhere, the replaced one still works.
    assert statuses(azure_p, new) == {"region1": 401, "region2": 401}
    assert statuses(azure_p, old) == {"region1": 200, "region2": 200}
    assert set(statuses(azure_p, sub.primary_key).values()) == {200}  # the other key is untouched

    clock.advance(10)  # region1's delay has passed, region2's has not: one URL, two answers
    assert statuses(azure_p, new) == {"region1": 200, "region2": 401}
    assert statuses(azure_p, old) == {"region1": 401, "region2": 200}

    clock.advance(20)  # region2 too
    assert statuses(azure_p, new) == {"region1": 200, "region2": 200}
    assert statuses(azure_p, old) == {"region1": 401, "region2": 401}

    labels = azure_p.gateway.counters.labels()
    assert labels["propagation-refused:region1"] == 1  # the new key before t+10
    assert labels["propagation-refused:region2"] == 2  # before t+10 and before t+30
    assert labels["propagation-refused"] == 3
    assert labels["propagation-stale:region1"] == 1 and labels["propagation-stale:region2"] == 2
    assert labels["key:invalid"] == 6  # 3 propagation refusals + the old key 3 times after a sync


def test_changes_apply_in_order_and_an_old_value_never_returns(
    azure_p: LocalAzure, clock: ManualClock
) -> None:
    azure_p.apim_state.set_propagation(10)
    sub = fresh(azure_p)
    k0 = sub.primary_key
    azure_p.apim_state.regenerate(sub.sid, "primary")
    k1 = sub.primary_key
    clock.advance(5)
    azure_p.apim_state.regenerate(sub.sid, "primary")
    k2 = sub.primary_key

    def on_region2() -> tuple[int, int, int]:
        first, second, third = (statuses(azure_p, k)["region2"] for k in (k0, k1, k2))
        return first, second, third

    assert on_region2() == (200, 401, 401)
    clock.advance(5)  # the first change applied: k1 is served, although ARM already shows k2
    assert on_region2() == (401, 200, 401)
    clock.advance(5)
    assert on_region2() == (401, 401, 200)


def test_random_delay_stays_within_its_range(stack: LocalAzure, clock: ManualClock) -> None:
    stack.apim_state.set_propagation((4.0, 12.0))
    try:
        for _ in range(3):
            sub = fresh(stack)
            old = sub.secondary_key
            stack.apim_state.regenerate(sub.sid, "secondary")
            new = sub.secondary_key
            clock.advance(3.9)
            assert set(statuses(stack, new).values()) == {401}
            assert set(statuses(stack, old).values()) == {200}
            clock.advance(8.2)
            assert set(statuses(stack, new).values()) == {200}
    finally:
        stack.apim_state.settle()


def test_admin_api_sets_and_shows_the_delays(azure_p: LocalAzure, clock: ManualClock) -> None:
    with AdminClient(azure_p.admin.url, azure_p.ca_path, token=azure_p.admin_token) as admin:
        shown = admin.propagation()
        assert shown["region1"]["min"] == shown["region1"]["max"] == 10
        assert shown["region2"]["max"] == 30
        admin.set_propagation((2, 6), unit="region2")
        admin.set_propagation(0, unit="region1")
        shown = admin.propagation()
        assert (shown["region1"]["min"], shown["region1"]["max"]) == (0, 0)
        assert (shown["region2"]["min"], shown["region2"]["max"]) == (2, 6)

        sub = fresh(azure_p)
        azure_p.apim_state.regenerate(sub.sid, "primary")
        assert admin.propagation()["region2"]["pending"] == 1
        assert statuses(azure_p, sub.primary_key) == {"region1": 200, "region2": 401}  # no delay on 1
        clock.advance(6)
        assert admin.propagation()["region2"]["pending"] == 0
        assert statuses(azure_p, sub.primary_key) == {"region1": 200, "region2": 200}

        for body, message in [
            ((-1, 2), ">= 0"),
            ((5, 1), "low <= high"),
        ]:
            with pytest.raises(AdminError, match=message) as info:
                admin.set_propagation(body)
            assert info.value.status == 400
        with pytest.raises(AdminError, match="unknown gateway unit"):
            admin.set_propagation(1, unit="region9")
        assert admin.propagation()["region2"]["max"] == 6  # a refused change changed nothing


def test_default_is_no_delay_and_units_are_not_addressable(session_ca: LocalCA) -> None:
    with LocalAzure(ca=session_ca, seed=False) as azure:  # the defaults: balanced units, no delay
        sub = fresh(azure)
        old = sub.primary_key
        azure.apim_state.regenerate(sub.sid, "primary")
        assert statuses(azure, sub.primary_key) == {"region1": 200, "region2": 200}
        assert statuses(azure, old) == {"region1": 401, "region2": 401}
        assert "propagation-refused" not in azure.gateway.counters.labels()
        # A unit name in the path is just an unrouted path (APIM's 404), whatever the key.
        assert status(f"{azure.gateway_url}/region2", sub.primary_key) == 404
        assert status(f"{azure.gateway_url}/region9", sub.primary_key) == 404


def test_per_unit_routing_serves_each_unit_under_its_prefix(clock: ManualClock, session_ca: LocalCA) -> None:
    with LocalAzure(
        ca=session_ca,
        seed=False,
        gateway_routing="per-unit",
        propagation_clock=clock,
        propagation_delay={"region2": 30},
    ) as stack:
        urls = stack.gateway_unit_urls
        assert urls == {"region1": stack.gateway_url, "region2": stack.gateway_url + "/region2"}
        assert stack.gateway_urls == tuple(urls.values())
        sub = fresh(stack)
        stack.apim_state.regenerate(sub.sid, "primary")
        assert (status(urls["region1"], sub.primary_key), status(urls["region2"], sub.primary_key)) == (
            200,
            401,
        )
        clock.advance(30)
        assert status(urls["region2"], sub.primary_key) == 200
        assert [u.unit for u in stack.gateway.recent()] == ["region1", "region2", "region2"]


def test_bad_unit_and_delay_configuration() -> None:
    with pytest.raises(ValueError, match="units"):
        ApimState(units=("Region A",))
    with pytest.raises(ValueError, match="units"):
        ApimState(units=("a", "a"))
    with pytest.raises(ValueError, match=">= 0"):
        ApimState(propagation_delay=-1)
    with pytest.raises(ValueError, match="unknown gateway unit"):
        ApimState(propagation_delay={"elsewhere": 1})
    with pytest.raises(ValueError, match="pair"):
        ApimState(propagation_delay=True)


def test_chosen_keys_propagate_like_a_regeneration(azure_p: LocalAzure, clock: ManualClock) -> None:
    sub = fresh(azure_p)
    old_primary = sub.primary_key
    chosen = ("a" * 31 + "1", "b" * 31 + "2")
    azure_p.apim_state.set_key(sub.sid, "primary", chosen[0])
    azure_p.apim_state.set_key(sub.sid, "secondary", chosen[1])
    assert (sub.primary_key, sub.secondary_key) == chosen  # ARM's view at once
    on_region1 = [statuses(azure_p, k)["region1"] for k in (chosen[0], old_primary)]
    assert on_region1 == [401, 200]
    clock.advance(10)
    on_region1 = [statuses(azure_p, k)["region1"] for k in (*chosen, old_primary)]
    assert on_region1 == [200, 200, 401]
    other = fresh(azure_p)
    before = (other.primary_key, other.secondary_key)
    with pytest.raises(ValueError, match="already in use"):
        azure_p.apim_state.set_key(other.sid, "primary", chosen[0])
    with pytest.raises(ValueError, match="1 to 256"):
        azure_p.apim_state.set_key(other.sid, "secondary", "")
    with pytest.raises(ValueError, match="primary' or 'secondary"):
        azure_p.apim_state.set_key(other.sid, "tertiary", "c" * 32)  # type: ignore[arg-type]
    assert (other.primary_key, other.secondary_key) == before  # a refused change changed nothing
