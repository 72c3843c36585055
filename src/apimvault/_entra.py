"""Entra ID bearer tokens next to (or instead of) the subscription key.

Microsoft's APIM + Azure OpenAI guidance offers ``validate-azure-ad-token`` at the gateway "as part of a
defense-in-depth strategy ... not a replacement for API key authentication", and its AI-Gateway samples send
the key and a bearer token together (Azure-Samples/AI-Gateway). The token's audience is the gateway API's
own app registration (``api://<app-id>/.default``), not the Cognitive Services scope.

* :class:`BearerTokenSource` / :class:`AsyncBearerTokenSource` are what openai's ``azure_ad_token_provider``
  calls per request: azure-identity's ``get_bearer_token_provider`` on a credential (its caching and
  refresh-before-expiry). After the gateway refuses a token (a *token 401*, see :mod:`apimvault._refusal`)
  :meth:`~BearerTokenSource.refresh_after_rejection` gets a new one: it asks the credential with a claims
  challenge, which makes azure-identity (MSAL) bypass its token cache, and starts a new
  ``get_bearer_token_provider`` so later requests use the new token too. Concurrent refusals of the same
  token share one refresh.
* :func:`add_token` turns a key client's arguments into key-plus-token ones (``create_azure_openai(...,
  token_scope=...)``); :func:`create_token_azure_openai` / :func:`create_async_token_azure_openai` build a
  token-only client for gateways that need no subscription key.

openai treats an explicit ``api_key`` and ``azure_ad_token_provider`` as exclusive, so key-plus-token
clients set no ``api_key``: the key travels in the subscription-key header set by the auth flow.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from collections.abc import AsyncGenerator, Generator
from typing import Any

import httpx2
import openai
from azure.core.credentials import TokenCredential
from azure.core.credentials_async import AsyncTokenCredential

from . import _refusal
from .exceptions import ConfigurationError

__all__ = [
    "AsyncBearerTokenSource",
    "BearerTokenSource",
    "create_async_token_azure_openai",
    "create_token_azure_openai",
]


def _check_scope(scope: object) -> str:
    if not isinstance(scope, str) or not scope.strip() or any(c.isspace() for c in scope.strip()):
        raise ConfigurationError(
            f"token_scope must be one scope such as 'api://<app-id>/.default', not {scope!r}"
        )
    return scope.strip()


def _check_credential(credential: object, *, is_async: bool) -> None:
    get_token = getattr(credential, "get_token", None)
    if not callable(get_token):
        raise ConfigurationError(f"{type(credential).__name__} is not a token credential (no get_token)")
    if inspect.iscoroutinefunction(get_token) != is_async:
        wanted = "an AsyncTokenCredential (azure.identity.aio)" if is_async else "a sync TokenCredential"
        raise ConfigurationError(f"this client needs {wanted}, not {type(credential).__name__}")


def _force_claims() -> str:
    # A claims challenge (the shape CAE uses) makes MSAL skip its cached token for this request only.
    return json.dumps({"access_token": {"nbf": {"essential": True, "value": str(int(time.time()))}}})


class BearerTokenSource:
    """A bearer token for ``scope`` from ``credential``: call it for the token; never log the result."""

    def __init__(self, credential: TokenCredential, scope: str) -> None:
        from azure.identity import get_bearer_token_provider

        _check_credential(credential, is_async=False)
        self._make = get_bearer_token_provider
        self.credential = credential
        self.scope = _check_scope(scope)
        self._provider = get_bearer_token_provider(credential, self.scope)
        self._lock = threading.Lock()
        self.refreshes = 0

    def __call__(self) -> str:
        return self._provider()

    def refresh_after_rejection(self, sent: str) -> str | None:
        """The gateway refused ``sent``: a different token to re-send with, or ``None`` if none can be had."""
        with self._lock:
            current = self._provider()
            if current != sent:  # another request refreshed meanwhile
                return current
            try:
                self.credential.get_token(self.scope, claims=_force_claims())
            except Exception:  # the credential cannot refresh on demand: the 401 goes to the caller
                return None
            self._provider = self._make(self.credential, self.scope)
            fresh = self._provider()
            if fresh == sent:
                return None
            self.refreshes += 1
            return fresh

    def __repr__(self) -> str:
        return f"BearerTokenSource(scope={self.scope!r}, credential={type(self.credential).__name__})"


class AsyncBearerTokenSource:
    """The asyncio twin of :class:`BearerTokenSource` (an ``AsyncTokenCredential``)."""

    def __init__(self, credential: AsyncTokenCredential, scope: str) -> None:
        from azure.identity.aio import get_bearer_token_provider

        _check_credential(credential, is_async=True)
        self._make = get_bearer_token_provider
        self.credential = credential
        self.scope = _check_scope(scope)
        self._provider = get_bearer_token_provider(credential, self.scope)
        self._lock = asyncio.Lock()
        self.refreshes = 0

    async def __call__(self) -> str:
        return await self._provider()

    async def refresh_after_rejection(self, sent: str) -> str | None:
        """Async twin of :meth:`BearerTokenSource.refresh_after_rejection`."""
        async with self._lock:
            current = await self._provider()
            if current != sent:
                return current
            try:
                await self.credential.get_token(self.scope, claims=_force_claims())
            except Exception:
                return None
            self._provider = self._make(self.credential, self.scope)
            fresh = await self._provider()
            if fresh == sent:
                return None
            self.refreshes += 1
            return fresh

    def __repr__(self) -> str:
        return f"AsyncBearerTokenSource(scope={self.scope!r}, credential={type(self.credential).__name__})"


def add_token(
    kwargs: dict[str, Any], provider: Any, token_scope: str, credential: Any, *, is_async: bool
) -> dict[str, Any]:
    """Turn a key client's ``AzureOpenAI`` arguments into key-plus-token ones (no ``api_key``)."""
    credential = credential if credential is not None else getattr(provider, "credential", None)
    if credential is None:
        raise ConfigurationError(
            "token_scope needs a credential: pass token_credential=..., or build the provider with a "
            "credential (not only a secret_client)"
        )
    source: BearerTokenSource | AsyncBearerTokenSource = (
        AsyncBearerTokenSource(credential, token_scope)
        if is_async
        else BearerTokenSource(credential, token_scope)
    )
    kwargs.pop("api_key", None)
    kwargs["azure_ad_token_provider"] = source
    kwargs["http_client"].auth.token_source = source  # the auth flow's token-401 action uses it
    return kwargs


# ------------------------------------------------------------------------------------ token only


class _TokenAuth(httpx2.Auth):
    """A token-only client's auth: the token openai set; after a token 401, one refresh and one re-send."""

    requires_request_body = True

    def __init__(self, source: BearerTokenSource | AsyncBearerTokenSource) -> None:
        self.token_source = source

    def sync_auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        response = yield request
        if response.status_code != 401:
            _refusal.after_response(self.token_source, response)
            return
        resend = _refusal.after_other_401(self, self.token_source, request, response, response.read())
        if resend is not None:
            yield resend

    async def async_auth_flow(
        self, request: httpx2.Request
    ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        response = yield request
        if response.status_code != 401:
            await _refusal.aafter_response(self.token_source, response)
            return
        body = await response.aread()
        resend = await _refusal.aafter_other_401(self, self.token_source, request, response, body)
        if resend is not None:
            yield resend


def _token_kwargs(
    source: BearerTokenSource | AsyncBearerTokenSource,
    client: httpx2.Client | httpx2.AsyncClient | None,
    azure_endpoint: str | None,
    api_version: str | None,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    from ._validation import check_client_kwargs, validate_endpoint

    check_client_kwargs(kwargs)
    endpoint = validate_endpoint(azure_endpoint, False)
    if client is None:
        client = (
            openai.DefaultAsyncHttpxClient()
            if isinstance(source, AsyncBearerTokenSource)
            else openai.DefaultHttpxClient()
        )
    if client.auth is not None:
        raise ConfigurationError("http_client already has an auth; apimvault installs its own")
    client.auth = _TokenAuth(source)
    return {
        "azure_endpoint": endpoint,
        "api_version": api_version,
        "azure_ad_token_provider": source,
        "http_client": client,
        **kwargs,
    }


def create_token_azure_openai(
    token_scope: str | BearerTokenSource,
    *,
    credential: TokenCredential | None = None,
    azure_endpoint: str | None = None,
    api_version: str | None = None,
    http_client: httpx2.Client | None = None,
    **kwargs: Any,
) -> openai.AzureOpenAI:
    """A plain ``openai.AzureOpenAI`` for a gateway that needs no subscription key: an Entra token only.

    ``token_scope`` is the API's scope (``api://<app-id>/.default``) or a ready :class:`BearerTokenSource`
    (keep it to read :func:`apimvault.refusal_stats` of it). ``credential`` defaults to
    ``DefaultAzureCredential()``; pass your own to control its lifetime. After the gateway's token 401 the
    client gets one new token and re-sends once; APIM's quota 403 raises
    :class:`~apimvault.exceptions.QuotaExceededError` as in key mode.
    """
    if isinstance(token_scope, BearerTokenSource):
        source = token_scope
    else:
        if credential is None:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
        source = BearerTokenSource(credential, token_scope)
    return openai.AzureOpenAI(**_token_kwargs(source, http_client, azure_endpoint, api_version, kwargs))


def create_async_token_azure_openai(
    token_scope: str | AsyncBearerTokenSource,
    *,
    credential: AsyncTokenCredential | None = None,
    azure_endpoint: str | None = None,
    api_version: str | None = None,
    http_client: httpx2.AsyncClient | None = None,
    **kwargs: Any,
) -> openai.AsyncAzureOpenAI:
    """The asyncio twin of :func:`create_token_azure_openai` (an ``AsyncTokenCredential``)."""
    if isinstance(token_scope, AsyncBearerTokenSource):
        source = token_scope
    else:
        if credential is None:
            from azure.identity.aio import DefaultAzureCredential

            credential = DefaultAzureCredential()
        source = AsyncBearerTokenSource(credential, token_scope)
    return openai.AsyncAzureOpenAI(**_token_kwargs(source, http_client, azure_endpoint, api_version, kwargs))


# Fork safety (issue 21 item 11): a child forked while a thread refreshes a token must not inherit the lock
# that thread holds; each process gets its own (the mechanism is apimvault._base.per_process).
from ._base import per_process  # noqa: E402

per_process(BearerTokenSource, "_lock", threading.Lock)
per_process(AsyncBearerTokenSource, "_lock", asyncio.Lock)
