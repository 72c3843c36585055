"""Typed provider factories: a provider on the local stack's vault, on a fake clock, with a preset policy.

The keyword options are declared (:class:`SyncOptions`, :class:`AsyncOptions`, checked against the
providers' own signatures by mypy), so a test passing a misspelt or mistyped option fails type-checking
instead of needing a ``type: ignore``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any, Unpack

from azure.core.credentials import TokenCredential
from azure.core.credentials_async import AsyncTokenCredential
from azure.keyvault.secrets import SecretClient
from azure.keyvault.secrets.aio import SecretClient as AsyncSecretClient

from apimvault import AsyncSubscriptionKeyProvider, CachePolicy, SubscriptionKeyProvider
from apimvault.local import LocalAzure
from tests._support.core import Callbacks, FakeClock
from tests._support.policies import SHORT_BACKOFF


class Options(Callbacks, total=False):
    """The keyword options both providers take, but the credential and the secret client."""

    version: str | None
    monotonic: Callable[[], float] | None
    rng: random.Random | None
    header_name: str
    client_kwargs: Mapping[str, Any] | None
    credential_kwargs: Mapping[str, Any] | None
    allow_insecure_http: bool
    sleep: Callable[[float], Any] | None


class SyncOptions(Options, total=False):
    credential: TokenCredential | None
    secret_client: SecretClient | None


class AsyncOptions(Options, total=False):
    credential: AsyncTokenCredential | None
    secret_client: AsyncSecretClient | None


def sync_provider(
    azure: LocalAzure,
    name: str,
    clock: FakeClock | None = None,
    *,
    policy: CachePolicy = SHORT_BACKOFF,
    **options: Unpack[SyncOptions],
) -> SubscriptionKeyProvider:
    """A :class:`~apimvault.SubscriptionKeyProvider` for secret ``name`` of the stack's vault."""
    return SubscriptionKeyProvider(
        azure.vault_url, name, clock=clock or FakeClock(), policy=policy, **options
    )


def async_provider(
    azure: LocalAzure,
    name: str,
    clock: FakeClock | None = None,
    *,
    policy: CachePolicy = SHORT_BACKOFF,
    **options: Unpack[AsyncOptions],
) -> AsyncSubscriptionKeyProvider:
    """The :class:`~apimvault.AsyncSubscriptionKeyProvider` twin of :func:`sync_provider`."""
    return AsyncSubscriptionKeyProvider(
        azure.vault_url, name, clock=clock or FakeClock(), policy=policy, **options
    )
