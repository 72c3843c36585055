"""The six contenders, each built the way a user would build it, as a key source and as a chat client.

1. ``static``        read the key once at start-up, put it in ``default_headers``;
2. ``per-request``   openai's own ``api_key=callable``, the callable reading Key Vault on every request;
3. ``ttl-lock``      ``cachetools.cached(TTLCache(...), lock=threading.Lock())`` around ``get_secret``;
4. ``ttl-cond``      the same with ``condition=threading.Condition()``;
5. ``aws``           aws-secretsmanager-caching's ``SecretCache`` (the one peer that also serves the last
                     value through an outage), fed by :class:`KeyVaultForSecretCache`, a small adapter that
                     answers its two boto calls from a Key Vault ``SecretClient`` (AWS is never contacted);
6. ``apimvault``     ``SubscriptionKeyProvider`` + ``create_azure_openai`` (and the async twins).

Faithfulness note for 2-5: with ``AzureOpenAI`` a callable ``api_key`` fills the ``api-key`` header, but the
APIM gateway reads ``Ocp-Apim-Subscription-Key``. Those contenders keep openai's own mechanism (openai calls
the callable once per request) and add an httpx2 request hook that moves the ``api-key`` value into
``Ocp-Apim-Subscription-Key`` — what APIM configured to read ``api-key`` would do server-side. The hook
costs the same for all four.

Every Key Vault client (contenders and apimvault) uses the same ``SecretClient`` settings (apimvault's
``DEFAULT_CLIENT_KWARGS``: one quick SDK retry) so transport and retry behaviour are equal. A
:class:`ReadLog` passed to a key source sees every HTTP response to that contender's secret reads through
azure-core's public ``raw_response_hook``, so figures that run every contender at once against one vault
still count each contender's reads.

Importing this module imports openai and azure: call :func:`bench._stack.prepare_ca` first.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import cachetools
import httpx2
import openai
from aws_secretsmanager_caching import SecretCache, SecretCacheConfig
from azure.identity import DefaultAzureCredential
from azure.identity.aio import DefaultAzureCredential as AsyncDefaultAzureCredential
from azure.keyvault.secrets import SecretClient
from azure.keyvault.secrets.aio import SecretClient as AsyncSecretClient
from openai.types.chat import ChatCompletionMessageParam

from apimvault import (
    AsyncSubscriptionKeyProvider,
    CachePolicy,
    SubscriptionKeyProvider,
    create_async_azure_openai,
    create_azure_openai,
)
from apimvault._settings import DEFAULT_CLIENT_KWARGS

APIM_HEADER = "Ocp-Apim-Subscription-Key"
TTL = 300.0  # the cachetools and aws contenders' TTL (apimvault's default TTL)

Clock = Callable[[], float]


@dataclasses.dataclass(frozen=True)
class Contender:
    key: str
    label: str
    has_async: bool
    has_sync: bool = True


STATIC = Contender("static", "1 static key at start-up", has_async=True)
PER_REQUEST = Contender("per-request", "2 openai api_key=callable, KV per request", has_async=True)
TTL_LOCK = Contender("ttl-lock", "3 cachetools TTLCache + lock", has_async=False)
TTL_COND = Contender("ttl-cond", "4 cachetools TTLCache + condition", has_async=False)
AWS = Contender("aws", "5 aws-secretsmanager-caching (KV adapter)", has_async=False)
APIMVAULT = Contender("apimvault", "6 apimvault", has_async=True)
CONTENDERS = (STATIC, PER_REQUEST, TTL_LOCK, TTL_COND, AWS, APIMVAULT)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a contender gets its key: a vault, a secret, a gateway."""

    vault_url: str
    secret_name: str
    gateway_url: str
    api_version: str
    deployment: str
    warm_secret: str | None = None  # read once beforehand so token + challenge are cached


# ------------------------------------------------------------------------------------ read counting


class ReadLog:
    """``(time.monotonic(), status)`` of every HTTP response to reads of one secret by one ``SecretClient``.

    Installed as azure-core's ``raw_response_hook`` (a public client keyword): it runs after the retry
    policy, so an SDK retry is a second entry. Other secrets (the warm-up read) are not logged. It never
    looks at a body.
    """

    def __init__(self, secret_name: str) -> None:
        self.secret_name = secret_name
        self.events: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    def __call__(self, response: Any) -> None:
        request = response.http_request
        parts = urlsplit(request.url).path.strip("/").split("/")
        if request.method == "GET" and parts[:2] == ["secrets", self.secret_name]:
            with self._lock:
                self.events.append((time.monotonic(), response.http_response.status_code))

    def snapshot(self) -> list[tuple[float, int]]:
        with self._lock:
            return list(self.events)

    def between(self, start: float, end: float = float("inf")) -> list[tuple[float, int]]:
        return [(t, status) for t, status in self.snapshot() if start <= t < end]


# ---------------------------------------------------------------------------------- aws adapter


class KeyVaultForSecretCache:
    """The two calls aws-secretsmanager-caching's ``SecretCache`` makes of its boto client, answered from
    a Key Vault ``SecretClient``: ``describe_secret`` (which version is current) and ``get_secret_value``
    (the value of one version, fetched once per version and then cached by ``SecretCache``).

    Key Vault has no metadata-only read of the latest version, so ``describe_secret`` reads the latest
    version and keeps its value for the ``get_secret_value`` call that follows for a new version: one
    refresh is one vault read, as it is for every other contender.
    """

    def __init__(self, client: SecretClient) -> None:
        self._client = client
        self._just_read: dict[str, tuple[str, str]] = {}  # secret -> (version, value) of the last describe
        self._lock = threading.Lock()

    def describe_secret(self, *, SecretId: str) -> dict[str, Any]:
        secret = self._client.get_secret(SecretId)
        version, value = secret.properties.version, secret.value
        assert version is not None and value is not None
        with self._lock:
            self._just_read[SecretId] = (version, value)
        return {"Name": SecretId, "VersionIdsToStages": {version: ["AWSCURRENT"]}}

    def get_secret_value(self, *, SecretId: str, VersionId: str) -> dict[str, Any]:
        with self._lock:
            version, value = self._just_read.pop(SecretId, (None, None))
        if version != VersionId or value is None:
            value = self._client.get_secret(SecretId, VersionId).value
        return {"Name": SecretId, "VersionId": VersionId, "SecretString": value}


# ------------------------------------------------------------------------------------- key sources


@dataclasses.dataclass
class KeySource:
    """A sync key getter plus what to close; ``provider`` is set for apimvault."""

    get: Callable[[], str]
    closers: list[Callable[[], Any]]
    provider: SubscriptionKeyProvider | None = None

    def close(self) -> None:
        for close in self.closers:
            close()


@dataclasses.dataclass
class AsyncKeySource:
    get: Callable[[], Awaitable[str]]
    closers: list[Callable[[], Awaitable[Any]]]
    provider: AsyncSubscriptionKeyProvider | None = None

    async def close(self) -> None:
        for close in self.closers:
            await close()


def _client_kwargs(reads: ReadLog | None) -> dict[str, Any]:
    return {**DEFAULT_CLIENT_KWARGS, **({"raw_response_hook": reads} if reads is not None else {})}


def secret_client(
    target: Target, reads: ReadLog | None = None
) -> tuple[SecretClient, DefaultAzureCredential]:
    credential = DefaultAzureCredential()
    client = SecretClient(target.vault_url, credential, **_client_kwargs(reads))
    if target.warm_secret:
        client.get_secret(target.warm_secret)
    return client, credential


async def async_secret_client(
    target: Target, reads: ReadLog | None = None
) -> tuple[AsyncSecretClient, AsyncDefaultAzureCredential]:
    credential = AsyncDefaultAzureCredential()
    client = AsyncSecretClient(target.vault_url, credential, **_client_kwargs(reads))
    if target.warm_secret:
        await client.get_secret(target.warm_secret)
    return client, credential


def key_source(
    contender: Contender,
    target: Target,
    *,
    clock: Clock = time.time,
    policy: CachePolicy | None = None,
    rng: random.Random | None = None,
    mark: Callable[[], object] | None = None,
    ttl: float = TTL,
    reads: ReadLog | None = None,
) -> KeySource:
    """Build ``contender``'s key getter; the static contender reads Key Vault here, at "start-up".

    ``mark`` is called once the Key Vault client is warm (token and challenge cached), before the
    contender's first read: the figures start counting vault reads there. ``ttl`` is the cachetools and
    aws contenders' TTL (``policy`` is apimvault's); ``reads`` logs this contender's vault reads.
    """
    client, credential = secret_client(target, reads)
    if mark is not None:
        mark()
    closers: list[Callable[[], Any]] = [client.close, credential.close]
    name = target.secret_name

    def read() -> str:
        value = client.get_secret(name).value
        assert value is not None
        return value

    if contender is STATIC:
        value = read()
        return KeySource(lambda: value, closers)
    if contender is PER_REQUEST:
        return KeySource(read, closers)
    if contender is TTL_LOCK:
        cached = cachetools.cached(
            cachetools.TTLCache(maxsize=1, ttl=ttl, timer=clock), lock=threading.Lock()
        )
        return KeySource(cached(read), closers)
    if contender is TTL_COND:
        cached = cachetools.cached(
            cachetools.TTLCache(maxsize=1, ttl=ttl, timer=clock), condition=threading.Condition()
        )
        return KeySource(cached(read), closers)
    if contender is AWS:
        # SecretCache draws each refresh interval with randint(ttl / 2, ttl): whole seconds only.
        config = SecretCacheConfig(secret_refresh_interval=max(1, round(ttl)))
        cache = SecretCache(config=config, client=KeyVaultForSecretCache(client))

        def aws_get() -> str:
            value = cache.get_secret_string(name)
            assert isinstance(value, str)
            return value

        return KeySource(aws_get, closers)
    if contender is APIMVAULT:
        provider = SubscriptionKeyProvider(
            target.vault_url, name, secret_client=client, clock=clock, policy=policy, rng=rng
        )
        return KeySource(provider.get, [provider.close, *closers], provider)
    raise ValueError(contender)


async def async_key_source(
    contender: Contender,
    target: Target,
    *,
    clock: Clock = time.time,
    policy: CachePolicy | None = None,
    rng: random.Random | None = None,
    mark: Callable[[], object] | None = None,
    reads: ReadLog | None = None,
) -> AsyncKeySource:
    client, credential = await async_secret_client(target, reads)
    if mark is not None:
        mark()
    closers: list[Callable[[], Awaitable[Any]]] = [client.close, credential.close]
    name = target.secret_name

    async def read() -> str:
        value = (await client.get_secret(name)).value
        assert value is not None
        return value

    if contender is STATIC:
        value = await read()

        async def constant() -> str:
            return value

        return AsyncKeySource(constant, closers)
    if contender is PER_REQUEST:
        return AsyncKeySource(read, closers)
    if contender is APIMVAULT:
        provider = AsyncSubscriptionKeyProvider(
            target.vault_url, name, secret_client=client, clock=clock, policy=policy, rng=rng
        )
        return AsyncKeySource(provider.get, [provider.close, *closers], provider)
    raise ValueError(f"{contender.key} has no asyncio form")


# ------------------------------------------------------------------------------------ chat clients


def _api_key_to_apim(request: httpx2.Request) -> None:
    value = request.headers.pop("api-key", None)
    if value is not None:
        request.headers[APIM_HEADER] = value


async def _aapi_key_to_apim(request: httpx2.Request) -> None:
    _api_key_to_apim(request)


def chat_client(
    contender: Contender, target: Target, source: KeySource, transport: httpx2.BaseTransport | None = None
) -> openai.AzureOpenAI:
    """The openai client a user of ``contender`` would build (``source`` built by :func:`key_source`).

    ``transport`` replaces the network (the client-overhead figure uses an ``httpx2.MockTransport``).
    """
    common: dict[str, Any] = {"azure_endpoint": target.gateway_url, "api_version": target.api_version}
    if contender is STATIC:
        value = source.get()
        if transport is not None:
            common["http_client"] = openai.DefaultHttpxClient(transport=transport)
        return openai.AzureOpenAI(api_key=value, default_headers={APIM_HEADER: value}, **common)
    if contender is APIMVAULT:
        assert source.provider is not None
        if transport is not None:
            common["http_client"] = openai.DefaultHttpxClient(transport=transport)
        return create_azure_openai(source.provider, **common)
    http_client = openai.DefaultHttpxClient(event_hooks={"request": [_api_key_to_apim]}, transport=transport)
    return openai.AzureOpenAI(api_key=source.get, http_client=http_client, **common)


async def async_chat_client(
    contender: Contender,
    target: Target,
    source: AsyncKeySource,
    transport: httpx2.AsyncBaseTransport | None = None,
) -> openai.AsyncAzureOpenAI:
    common: dict[str, Any] = {"azure_endpoint": target.gateway_url, "api_version": target.api_version}
    if contender is STATIC:
        value = await source.get()
        if transport is not None:
            common["http_client"] = openai.DefaultAsyncHttpxClient(transport=transport)
        return openai.AsyncAzureOpenAI(api_key=value, default_headers={APIM_HEADER: value}, **common)
    if contender is APIMVAULT:
        assert source.provider is not None
        if transport is not None:
            common["http_client"] = openai.DefaultAsyncHttpxClient(transport=transport)
        return create_async_azure_openai(source.provider, **common)
    http_client = openai.DefaultAsyncHttpxClient(
        event_hooks={"request": [_aapi_key_to_apim]}, transport=transport
    )
    return openai.AsyncAzureOpenAI(api_key=source.get, http_client=http_client, **common)


MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def chat_once(client: openai.AzureOpenAI, target: Target) -> None:
    client.chat.completions.create(model=target.deployment, messages=MESSAGES)


async def achat_once(client: openai.AsyncAzureOpenAI, target: Target) -> None:
    await client.chat.completions.create(model=target.deployment, messages=MESSAGES)
