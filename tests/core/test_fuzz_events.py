"""Fuzzing Event Grid / CloudEvents payloads and secret ids: ``parse_secret_events`` returns events or raises
``ConfigurationError``; ``refresh_from_event`` / ``arefresh_from_event`` never raise anything else (a
refresh failure is recorded by the provider, not raised) and never hang.

Providers point at a loopback port with nothing listening, so a refresh the event asks for fails fast with
a connection refusal (no Key Vault needed, no token requested)."""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from apimvault import (
    AsyncSubscriptionKeyProvider,
    CachePolicy,
    ConfigurationError,
    SubscriptionKeyProvider,
    arefresh_from_event,
    parse_secret_events,
    refresh_from_event,
)
from apimvault._events import EXPIRED, NEAR_EXPIRY, NEW_VERSION


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


VAULT = f"https://127.0.0.1:{_closed_port()}"
NAME = "apim-key"
# Its own numbers: no backoff, so no fuzzed event's refresh waits on an earlier failure's backoff.
POLICY = CachePolicy(ttl=300, jitter=0, backoff_initial=0, backoff_max=0)


class _Token:
    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        raise AssertionError("the challenge request fails first; no token is ever needed")

    def close(self) -> None:
        return None


class _AsyncToken:
    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        raise AssertionError("no token needed")

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> _AsyncToken:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


FAST = settings(max_examples=150, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
event_types = st.one_of(
    st.sampled_from(
        [NEW_VERSION, NEAR_EXPIRY, EXPIRED, "Microsoft.EventGrid.SubscriptionValidationEvent", "x"]
    ),
    json_values,  # issue 21 item 15: a list eventType, an object CloudEvents type
)
versions = st.one_of(st.none(), st.text(alphabet="0123456789abcdef", min_size=32, max_size=32), json_values)
ids = st.one_of(
    st.none(),
    st.builds(lambda v: f"{VAULT}/secrets/{NAME}/{v}", st.text(max_size=34)),
    st.sampled_from(
        [f"{VAULT}/secrets/{NAME}", "https://[::1", "https://other.vault.azure.net/secrets/apim-key", "::"]
    ),
    st.text(max_size=40),
    json_values,
)
data = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "VaultName": st.one_of(st.sampled_from(["127", "kv", ""]), json_values),
            "ObjectName": st.one_of(st.sampled_from([NAME, NAME.upper(), "other", ""]), json_values),
            "Version": versions,
            "Id": ids,
        },
    ),
    json_values,
)
one_event = st.one_of(
    st.fixed_dictionaries(
        {"eventType": event_types}, optional={"data": data, "subject": st.one_of(st.just(NAME), json_values)}
    ),
    st.fixed_dictionaries({"type": event_types, "specversion": st.just("1.0")}, optional={"data": data}),
    json_values,
)
payloads = st.one_of(
    one_event,
    st.lists(one_event, max_size=4),
    st.lists(one_event, max_size=3).map(json.dumps),
    st.lists(one_event, max_size=3).map(lambda p: json.dumps(p).encode()),
    st.text(max_size=30),
    st.binary(max_size=30),
)
GOOD = [
    {
        "eventType": NEW_VERSION,
        "subject": NAME,
        "data": {
            "VaultName": "127",
            "ObjectName": NAME,
            "Version": "a" * 32,
            "Id": f"{VAULT}/secrets/{NAME}/{'a' * 32}",
        },
    }
]


@settings(max_examples=400, deadline=timedelta(milliseconds=300))
@given(payloads)
@example(GOOD)
@example(b"\xff\xfe")
@example("[1, 2]")
@example({"eventType": NEW_VERSION, "data": {"VaultName": "kv", "ObjectName": NAME, "Version": 5}})
@example({"eventType": [NEW_VERSION], "data": {"VaultName": "kv", "ObjectName": NAME}})
@example({"type": {"x": 1}, "specversion": "1.0"})
def test_parse_secret_events(payload: Any) -> None:
    try:
        events = parse_secret_events(payload)
    except ConfigurationError:
        return
    for event in events:
        assert event.event_type in (NEW_VERSION, NEAR_EXPIRY, EXPIRED)
        assert isinstance(event.secret_name, str) and event.secret_name
        assert isinstance(event.vault_name, str) and event.vault_name
        assert event.version is None or isinstance(event.version, str)


@FAST
@given(payloads)
@example(GOOD)
def test_refresh_from_event_sync(payload: Any) -> None:
    provider = SubscriptionKeyProvider(
        VAULT,
        NAME,
        credential=_Token(),
        policy=POLICY,
        client_kwargs={"retry_total": 0, "connection_timeout": 2},
    )
    try:
        try:
            done = refresh_from_event(payload, [provider])
        except ConfigurationError:
            return
        assert done in ([], [provider])
        assert provider.current() is None
        assert provider.stats().vault_reads == len(done)  # one read per provider the event concerned
    finally:
        provider.close()


@settings(max_examples=60, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
@example(GOOD)
def test_refresh_from_event_async(payload: Any) -> None:
    async def run() -> None:
        provider = AsyncSubscriptionKeyProvider(
            VAULT,
            NAME,
            credential=_AsyncToken(),
            policy=POLICY,
            client_kwargs={"retry_total": 0, "connection_timeout": 2},
        )
        try:
            try:
                done = await asyncio.wait_for(arefresh_from_event(payload, [provider]), 10)
            except ConfigurationError:
                return
            assert done in ([], [provider])
            assert provider.stats().vault_reads == len(done)
        finally:
            await provider.close()

    asyncio.run(run())


def test_good_event_concerns_the_provider() -> None:
    """The fuzzed properties are not vacuous: the well-formed event does select the provider."""
    provider = SubscriptionKeyProvider(
        VAULT, NAME, credential=_Token(), policy=POLICY, client_kwargs={"retry_total": 0}
    )
    try:
        assert refresh_from_event(GOOD, [provider]) == [provider]
        assert provider.stats().failures == 1
    finally:
        provider.close()


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    "payload",
    [
        {"eventType": [NEW_VERSION], "data": GOOD[0]["data"]},
        [{"type": {"name": NEW_VERSION}, "specversion": "1.0", "data": GOOD[0]["data"]}],
        {"eventType": ["a"], "type": NEW_VERSION},
        DEEP,
        DEEP.encode(),
        '{"eventType": ' + DEEP + "}",
    ],
    ids=[
        "list eventType",
        "object CloudEvents type",
        "list eventType, str type",
        "deep str",
        "deep bytes",
        "deep field",
    ],
)
def test_malformed_event_types_and_nesting_raise_configuration_error(payload: Any) -> None:
    """Issue 21 item 15: not TypeError (unhashable type) nor RecursionError, from the parser and from both
    refresh functions, and no Key Vault read."""
    with pytest.raises(ConfigurationError):
        parse_secret_events(payload)
    provider = SubscriptionKeyProvider(VAULT, NAME, credential=_Token(), policy=POLICY)
    try:
        with pytest.raises(ConfigurationError):
            refresh_from_event(payload, [provider])
        assert provider.stats().vault_reads == 0
    finally:
        provider.close()

    async def run() -> None:
        aprovider = AsyncSubscriptionKeyProvider(VAULT, NAME, credential=_AsyncToken(), policy=POLICY)
        try:
            with pytest.raises(ConfigurationError):
                await arefresh_from_event(payload, [aprovider])
            assert aprovider.stats().vault_reads == 0
        finally:
            await aprovider.close()

    asyncio.run(run())
