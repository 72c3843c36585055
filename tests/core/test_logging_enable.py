"""``logging_enable=True`` on the provider's SecretClient never logs the key (issue 10, item 1).

azure-core's network trace logs every response body (a GetSecret body is the key) and request headers
(Key Vault's bearer token). The provider's own SecretClient traces without bodies or credential headers;
a SecretClient passed in that would log bodies, or skip TLS / challenge verification, is refused.
This is the one place the suite sets ``logging_enable=True``: to prove it does not leak.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from azure.core.pipeline.policies import NetworkTraceLoggingPolicy
from azure.identity import DefaultAzureCredential
from azure.identity.aio import DefaultAzureCredential as AsyncDefaultAzureCredential
from azure.keyvault.secrets import SecretClient
from azure.keyvault.secrets.aio import SecretClient as AsyncSecretClient

from apimvault import (
    AsyncSubscriptionKeyProvider,
    ConfigurationError,
    InsecureTransportError,
    SubscriptionKeyProvider,
    fingerprint,
)
from apimvault.local import LocalAzure
from tests._support.core import FakeClock, new_app_secret, rotate_to_secondary
from tests._support.policies import STEADY

TRACE_LOGGER = "azure.core.pipeline.policies._universal"


def _leaks(text: str, keys: list[str]) -> list[str]:
    """Fingerprints of the keys that appear (or any 8-character piece of them) in ``text``."""
    return sorted({fingerprint(k) for k in keys for i in range(len(k) - 7) if k[i : i + 8] in text})


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    return caplog.text + "".join(repr(r.args) for r in caplog.records)


@pytest.mark.parametrize("per_call", [False, True], ids=["client-wide", "per-call"])
@pytest.mark.parametrize("api", ["sync", "async"])
def test_logging_enable_never_logs_the_key(
    azure: LocalAzure, caplog: pytest.LogCaptureFixture, api: str, per_call: bool
) -> None:
    """First read and a new version, with the network trace on: the trace is there, the key is not."""
    caplog.set_level(logging.DEBUG)  # the root handler sees every logger, children of `azure` included
    app = new_app_secret(azure)
    # per-call: the switch is off client-wide and code calls the provider's (public) secret_client with
    # `get_secret(..., logging_enable=True)`.
    kwargs: dict[str, Any] = {"logging_enable": not per_call}
    if api == "sync":
        with SubscriptionKeyProvider(
            azure.vault_url, app.name, clock=FakeClock(), policy=STEADY, client_kwargs=kwargs
        ) as provider:
            if per_call:
                provider.secret_client.get_secret(app.name, logging_enable=True)
            old = provider.get_key().reveal()
            rotate_to_secondary(azure, app)
            new = provider.refresh().reveal()
    else:

        async def go() -> tuple[str, str]:
            async with AsyncSubscriptionKeyProvider(
                azure.vault_url, app.name, clock=FakeClock(), policy=STEADY, client_kwargs=kwargs
            ) as provider:
                if per_call:
                    await provider.secret_client.get_secret(app.name, logging_enable=True)
                first = (await provider.get_key()).reveal()
                rotate_to_secondary(azure, app)
                return first, (await provider.refresh()).reveal()

        old, new = asyncio.run(go())
    assert old != new
    assert _leaks(_logged(caplog), [old, new]) == []
    traces = [r.getMessage() for r in caplog.records if r.name == TRACE_LOGGER]
    assert any("Response status: 200" in t and "not logged by apimvault" in t for t in traces)
    assert any("'Authorization': 'REDACTED'" in t for t in traces)  # the Key Vault token neither


@pytest.mark.parametrize("api", ["sync", "async"])
def test_secret_client_passed_in_is_checked(azure: LocalAzure, api: str) -> None:
    app = new_app_secret(azure)
    sync = api == "sync"
    cls: Any = SubscriptionKeyProvider if sync else AsyncSubscriptionKeyProvider
    client_cls: Any = SecretClient if sync else AsyncSecretClient
    credential: Any = DefaultAzureCredential() if sync else AsyncDefaultAzureCredential()
    refused: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"logging_enable": True}, ConfigurationError, "logging_enable=True"),
        ({"verify_challenge_resource": False}, InsecureTransportError, "verify_challenge_resource=False"),
        ({"connection_verify": False}, InsecureTransportError, "connection_verify=False"),
    ]
    for options, error, message in refused:
        client = client_cls(azure.vault_url, credential, **options)
        with pytest.raises(error, match=message):
            cls(azure.vault_url, app.name, secret_client=client)
    good = client_cls(azure.vault_url, credential)

    async def read(provider: Any) -> str:
        key = await provider.get_key()
        await good.close()
        await credential.close()
        return str(key.reveal())

    provider = cls(azure.vault_url, app.name, secret_client=good)
    value = provider.get_key().reveal() if sync else asyncio.run(read(provider))
    assert value == app.subscription.primary_key
    if sync:
        good.close()
        credential.close()


@pytest.mark.parametrize("api", ["sync", "async"])
def test_client_kwargs_that_would_undo_the_guard_are_refused(azure: LocalAzure, api: str) -> None:
    cls: Any = SubscriptionKeyProvider if api == "sync" else AsyncSubscriptionKeyProvider
    for options, error, message in (
        ({"logging_policy": object()}, ConfigurationError, "logging_policy"),
        ({"policies": []}, ConfigurationError, "policies"),
        ({"connection_verify": False}, InsecureTransportError, "connection_verify=False"),
        ({"verify_challenge_resource": False}, InsecureTransportError, "verify_challenge_resource=False"),
    ):
        with pytest.raises(error, match=message):
            cls(azure.vault_url, "any", client_kwargs=options)


class _OwnTrace(NetworkTraceLoggingPolicy):
    """A subclass of azure-core's network trace, as an application might add for its own debugging."""


@pytest.mark.parametrize("policy", [NetworkTraceLoggingPolicy, _OwnTrace], ids=["azure-core", "subclass"])
@pytest.mark.parametrize("where", ["per_call_policies", "per_retry_policies"])
@pytest.mark.parametrize("api", ["sync", "async"])
def test_network_trace_policy_added_through_client_kwargs_is_refused(
    azure: LocalAzure, caplog: pytest.LogCaptureFixture, api: str, where: str, policy: Any
) -> None:
    """Issue 21 item 8: logging_enable=True plus azure-core's own NetworkTraceLoggingPolicy in
    per_call_policies / per_retry_policies logged the GetSecret body. It is refused (typed) before any read,
    whatever its own flag says, and nothing reaches the trace logger."""
    caplog.set_level(logging.DEBUG)
    app = new_app_secret(azure)
    cls: Any = SubscriptionKeyProvider if api == "sync" else AsyncSubscriptionKeyProvider
    for enabled in (False, True):
        options = {"logging_enable": True, where: [policy(logging_enable=enabled)]}
        with pytest.raises(ConfigurationError, match="NetworkTraceLoggingPolicy"):
            cls(azure.vault_url, app.name, client_kwargs=options)
    assert azure.keyvault.counters["GetSecret"] == 0
    assert _leaks(_logged(caplog), [app.subscription.primary_key]) == []
