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
* :func:`token_source_for` makes the token source of a key-plus-token client (``create_azure_openai(...,
  token_scope=...)``); :func:`create_token_azure_openai` / :func:`create_async_token_azure_openai` build a
  token-only client for gateways that need no subscription key.

Both kinds of client hand openai only a placeholder ``api_key``: the token is set at send time by the auth
on the client's transport (:class:`apimvault._auth.GuardedAuth`), as the key is, so it is never in openai's
request options (nor in a failed request's traceback locals), and it gets the key's guards: https only,
pinned to the endpoint's origin, dropped on cross-origin redirects, TLS verification required, and a copy
given another ``http_client`` carries no token at all (it fails closed).

Forced token refreshes are bounded like forced key reads: concurrent refusals of one token share one
refresh, and at most one forced refresh happens per ``min_refresh_interval`` (default 5 s); a refusal of
the token just refreshed inside that interval goes to the caller without a new token request.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx2
import openai
from azure.core.credentials import TokenCredential
from azure.core.credentials_async import AsyncTokenCredential

from ._auth import PLACEHOLDER_API_KEY, TokenAuth, install
from ._fork import track_for_fork
from ._redact import install_log_redaction
from .exceptions import ConfigurationError

__all__ = [
    "AsyncBearerTokenSource",
    "BearerTokenSource",
    "create_async_token_azure_openai",
    "create_token_azure_openai",
]


def check_scope(scope: object) -> str:
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


def _check_interval(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < math.inf:
        raise ConfigurationError(
            f"min_refresh_interval must be a finite number of seconds >= 0, not {value!r}"
        )
    return float(value)


# Every live token source, so a forked child can replace the locks it inherited (a refresh running in another
# thread at fork time holds one, and that thread does not exist in the child).
_SOURCES: weakref.WeakSet[_Bound] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for source in list(_SOURCES):
        with contextlib.suppress(AttributeError):  # forked while it was being built: it has no lock yet
            source._after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Bound:
    """What both token sources share: the refresh bound and the tokens the log filter must mask."""

    def __init__(self, scope: str, min_refresh_interval: float, clock: Callable[[], float]) -> None:
        _SOURCES.add(self)
        self.scope = check_scope(scope)
        self.min_refresh_interval = _check_interval(min_refresh_interval)
        self._clock = clock
        self._last_forced: float | None = None
        self._recent: deque[str] = deque(maxlen=2)
        self.refreshes = 0
        install_log_redaction(self)

    def _seen(self, token: str) -> str:
        if not self._recent or self._recent[-1] != token:
            self._recent.append(token)
        return token

    def _may_force(self) -> bool:
        """Under the lock: whether a forced refresh may happen now (one per ``min_refresh_interval``)."""
        now = self._clock()
        if self._last_forced is not None and now - self._last_forced < self.min_refresh_interval:
            return False
        self._last_forced = now
        return True

    def _redaction_values(self) -> tuple[str, ...]:
        """The tokens this source handed out last (for the log and CLI redaction)."""
        return tuple(self._recent)

    def _after_fork(self) -> None:
        """In a forked child: fresh locks (the parent's may be held by a thread the child does not have)."""
        raise NotImplementedError


class BearerTokenSource(_Bound):
    """A bearer token for ``scope`` from ``credential``: :meth:`token` (or call it) for the token; never log
    the result. ``clock`` (monotonic seconds) bounds forced refreshes to one per ``min_refresh_interval``."""

    def __init__(
        self,
        credential: TokenCredential,
        scope: str,
        *,
        min_refresh_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from azure.identity import get_bearer_token_provider

        _check_credential(credential, is_async=False)
        super().__init__(scope, min_refresh_interval, clock)
        self._make = get_bearer_token_provider
        self.credential = credential
        self._provider = get_bearer_token_provider(credential, self.scope)
        self._lock = threading.Lock()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def token(self) -> str:
        """The current token (azure-identity's cache and refresh-before-expiry)."""
        return self._seen(self._provider())

    def __call__(self) -> str:  # openai's azure_ad_token_provider shape
        return self.token()

    def refresh_after_rejection(self, sent: str) -> str | None:
        """The gateway refused ``sent``: a different token to re-send with, or ``None`` if none can be had
        (the credential cannot refresh on demand, or a forced refresh already happened this interval)."""
        with self._lock:
            current = self.token()
            if current != sent:  # another request refreshed meanwhile
                return current
            if not self._may_force():
                return None
            try:
                self.credential.get_token(self.scope, claims=_force_claims())
            except Exception:  # the credential cannot refresh on demand: the 401 goes to the caller
                return None
            self._provider = self._make(self.credential, self.scope)
            fresh = self.token()
            if fresh == sent:
                return None
            self.refreshes += 1
            return fresh

    def __repr__(self) -> str:
        return f"BearerTokenSource(scope={self.scope!r}, credential={type(self.credential).__name__})"


class AsyncBearerTokenSource(_Bound):
    """The asyncio twin of :class:`BearerTokenSource` (an ``AsyncTokenCredential``). Like the async key
    provider it belongs to the event loop it first runs on; another loop gets :class:`ConfigurationError`."""

    def __init__(
        self,
        credential: AsyncTokenCredential,
        scope: str,
        *,
        min_refresh_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from azure.identity.aio import get_bearer_token_provider

        _check_credential(credential, is_async=True)
        super().__init__(scope, min_refresh_interval, clock)
        self._make = get_bearer_token_provider
        self.credential = credential
        self._provider = get_bearer_token_provider(credential, self.scope)
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise ConfigurationError(
                f"{type(self).__name__} for {self.scope} belongs to the event loop it first ran on (its aio "
                "credential's connections do); this is another loop. Create one token source (and one "
                "client) per event loop"
            )

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock, and no event loop yet (the child runs its own)."""
        self._lock = asyncio.Lock()
        self._loop = None

    async def token(self) -> str:
        """The current token (azure-identity's cache and refresh-before-expiry)."""
        self._bind_loop()
        return self._seen(await self._provider())

    async def __call__(self) -> str:
        return await self.token()

    async def refresh_after_rejection(self, sent: str) -> str | None:
        """Async twin of :meth:`BearerTokenSource.refresh_after_rejection`."""
        self._bind_loop()
        async with self._lock:
            current = await self.token()
            if current != sent:
                return current
            if not self._may_force():
                return None
            try:
                await self.credential.get_token(self.scope, claims=_force_claims())
            except Exception:
                return None
            self._provider = self._make(self.credential, self.scope)
            fresh = await self.token()
            if fresh == sent:
                return None
            self.refreshes += 1
            return fresh

    def __repr__(self) -> str:
        return f"AsyncBearerTokenSource(scope={self.scope!r}, credential={type(self.credential).__name__})"


def token_source_for(
    provider: Any,
    token_scope: str | BearerTokenSource | AsyncBearerTokenSource,
    credential: Any,
    *,
    is_async: bool,
) -> BearerTokenSource | AsyncBearerTokenSource:
    """The token source of a key-plus-token client (``create_azure_openai(..., token_scope=...)``): a scope,
    or a ready source (keep it to tune ``min_refresh_interval`` or read its ``refreshes``)."""
    wanted = AsyncBearerTokenSource if is_async else BearerTokenSource
    if isinstance(token_scope, BearerTokenSource | AsyncBearerTokenSource):
        if not isinstance(token_scope, wanted):
            raise ConfigurationError(
                f"this client needs a {wanted.__name__}, not {type(token_scope).__name__}"
            )
        return token_scope
    credential = credential if credential is not None else getattr(provider, "credential", None)
    if credential is None:
        raise ConfigurationError(
            "token_scope needs a credential: pass token_credential=..., or build the provider with a "
            "credential (not only a secret_client)"
        )
    if is_async:
        return AsyncBearerTokenSource(credential, token_scope)
    return BearerTokenSource(credential, token_scope)


# ------------------------------------------------------------------------------------ token only


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
    install(client, TokenAuth(source, origin=endpoint), "the Entra token")
    track_for_fork(client)
    return {
        "azure_endpoint": endpoint,
        "api_version": api_version,
        # openai holds only a placeholder: the auth on this transport sets the token at send time, so a
        # copy given another transport carries no token at all.
        "api_key": PLACEHOLDER_API_KEY,
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
    client gets one new token and re-sends once (at most one forced refresh per the source's
    ``min_refresh_interval``); APIM's quota 403 raises :class:`~apimvault.exceptions.QuotaExceededError` as
    in key mode. The token gets the key's guards: https only, the endpoint's origin only, dropped on
    cross-origin redirects, ``http_client`` must verify TLS, and copies given another ``http_client`` carry
    no token.
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
# that thread holds; each process gets its own (the mechanism is apimvault._per_process.per_process).
from ._per_process import per_process  # noqa: E402

per_process(BearerTokenSource, "_lock", threading.Lock)
per_process(AsyncBearerTokenSource, "_lock", asyncio.Lock)
