"""The ``httpx2.Auth`` that puts the current key (and/or Entra token) on every request, guarded.

The flow is written once, as a generator (:meth:`GuardedAuth._flow`) that yields what it needs — the
request body read, a key, a token, a response body, a refresh — and the requests to send; the sync and the
async driver (``sync_auth_flow`` / ``async_auth_flow``) do only the I/O it asks for. What the flow needs from
a key provider and from a token source is spelled out as :class:`KeySource` / :class:`AsyncKeySource` and
:class:`TokenSource` / :class:`AsyncTokenSource`.

Guards (key and token alike): https only (unless ``allow_insecure_http`` for loopback key tests), pinned to
one origin, both credentials set at send time only (never in openai's request options), both removed from
any request a redirect sends to another origin — by the factories' request hook and, for this class used
directly in ``httpx2.Client(auth=..., follow_redirects=True)``, by a ``trace`` hook on httpx2's own
transports that drops them before the redirected request's headers are written.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

import httpx2

from . import _refusal
from ._key import SubscriptionKey
from ._settings import check_header_name
from .exceptions import ConfigurationError, InsecureTransportError

__all__ = [
    "PLACEHOLDER_API_KEY",
    "AsyncKeySource",
    "AsyncTokenSource",
    "GuardedAuth",
    "KeySource",
    "SubscriptionKeyAuth",
    "TokenSource",
    "is_apim_key_rejection",
]

#: What the client factories hand ``AzureOpenAI(api_key=...)`` to satisfy its credential check. The auth
#: flow removes an ``api-key`` header carrying it, so it is never sent. It is not a secret.
PLACEHOLDER_API_KEY = "apimvault-placeholder-not-a-key"

_ORIGIN = "apimvault.key_origin"
_TRACE = "apimvault.trace"
_CALLER_TRACE = "apimvault.caller_trace"
_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin: TypeAlias = tuple[str, str, int | None]


# ------------------------------------------------------------------------------------- contracts


@runtime_checkable
class KeySource(Protocol):
    """What the auth needs from a sync key provider (:class:`~apimvault.SubscriptionKeyProvider`)."""

    header_name: str
    allow_insecure_http: bool

    def get_key(self) -> SubscriptionKey: ...

    def refresh_after_rejection(self, sent: SubscriptionKey) -> SubscriptionKey | None: ...

    def record_resend(self) -> None: ...


class AsyncKeySource(Protocol):
    """What the auth needs from an asyncio key provider (:class:`~apimvault.AsyncSubscriptionKeyProvider`)."""

    header_name: str
    allow_insecure_http: bool

    def get_key(self) -> Awaitable[SubscriptionKey]: ...

    def refresh_after_rejection(self, sent: SubscriptionKey) -> Awaitable[SubscriptionKey | None]: ...

    def record_resend(self) -> None: ...


class TokenSource(Protocol):
    """What the auth needs from a sync bearer-token source (:class:`~apimvault.BearerTokenSource`)."""

    def token(self) -> str: ...

    def refresh_after_rejection(self, sent: str) -> str | None: ...


class AsyncTokenSource(Protocol):
    """The asyncio twin of :class:`TokenSource` (:class:`~apimvault.AsyncBearerTokenSource`)."""

    def token(self) -> Awaitable[str]: ...

    def refresh_after_rejection(self, sent: str) -> Awaitable[str | None]: ...


AnyKeySource: TypeAlias = KeySource | AsyncKeySource
AnyTokenSource: TypeAlias = TokenSource | AsyncTokenSource


# ------------------------------------------------------------------------------------ helpers


def _origin(url: httpx2.URL) -> Origin:
    scheme = url.scheme
    port = url.port
    return scheme, url.host, port if port is not None else _DEFAULT_PORTS.get(scheme)


def _core_origin(url: Any) -> Origin:
    """The origin of an httpcore2 URL (bytes scheme and host, as the ``trace`` extension shows it)."""
    scheme = bytes(url.scheme).decode("ascii", "replace").lower()
    host = bytes(url.host).decode("ascii", "replace").lower()
    port = url.port
    return scheme, host, port if port is not None else _DEFAULT_PORTS.get(scheme)


def _show(origin: Origin) -> str:
    scheme, host, port = origin
    return f"{scheme}://{host}:{port}"


def is_apim_key_rejection(status: int, headers: httpx2.Headers, body: bytes) -> bool:
    """Whether a 401 is APIM refusing the subscription key (not a backend's own 401).

    APIM's 401 carries ``WWW-Authenticate: AzureApiManagementKey ...`` and the body
    ``{"statusCode": 401, "message": "Access denied due to invalid subscription key..."}``.
    """
    return _refusal.classify(status, headers, body) == "key"


class _Bearer:
    """A token held by the flow: its repr never shows it (traceback locals, debuggers)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Bearer) and other._value == self._value

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "<bearer token>"


# --------------------------------------------------------------------------- the flow's requests


class _Need(enum.Enum):
    BODY = "read the request body"
    KEY = "the current key"
    TOKEN = "the current token"  # noqa: S105 - a step name, not a secret


@dataclass(frozen=True)
class _Read:
    response: httpx2.Response


@dataclass(frozen=True)
class _RefreshKey:
    sent: SubscriptionKey


@dataclass(frozen=True)
class _RefreshToken:
    sent: _Bearer


_Step: TypeAlias = _Need | _Read | _RefreshKey | _RefreshToken | httpx2.Request
_Flow: TypeAlias = Generator[_Step, Any, None]


class GuardedAuth(httpx2.Auth):
    """The flow both credentials share; :class:`SubscriptionKeyAuth` (key, optionally with a token) and the
    token-only clients' auth are this class with a key provider, a token source, or both."""

    #: The body is read before the first send by the flow itself (``requires_request_body`` has no effect
    #: when ``sync_auth_flow`` / ``async_auth_flow`` are overridden); kept for readers of the attribute.
    requires_request_body = True

    def __init__(
        self,
        provider: AnyKeySource | None,
        token_source: AnyTokenSource | None,
        *,
        header_name: str | None,
        allow_insecure_http: bool,
        origin: str | None,
        owner: _refusal.RefusalOwner,
    ) -> None:
        self.provider = provider
        self.token_source: AnyTokenSource | None = token_source
        self.origin: Origin | None = _origin(httpx2.URL(origin)) if origin is not None else None
        self.header_name = check_header_name(header_name) if header_name is not None else None
        self.allow_insecure_http = allow_insecure_http
        self._owner = owner  # whose refusal_stats count this auth's refusals

    # ------------------------------------------------------------------------------- guards

    def _what(self) -> str:
        if self.provider is None:
            return "the Entra token"
        return "the subscription key" + (" and the Entra token" if self.token_source is not None else "")

    def _apply(self, request: httpx2.Request, key: SubscriptionKey | None, token: _Bearer | None) -> None:
        origin = _origin(request.url)  # once per request: this runs on every call
        if origin[0] != "https" and not self.allow_insecure_http:
            raise InsecureTransportError(
                f"refusing to send {self._what()} to {origin[0]}://{origin[1]}: not https"
                + (" (pass allow_insecure_http=True only for loopback tests)" if self.provider else "")
            )
        if self.origin is not None and origin != self.origin:
            raise InsecureTransportError(
                f"refusing to send {self._what()} to {_show(origin)}: this client was made for "
                f"{_show(self.origin)} (make a new client with the factory for another endpoint)"
            )
        headers = request.headers
        if headers.get("api-key") == PLACEHOLDER_API_KEY:
            del headers["api-key"]
        if key is not None and self.header_name is not None:
            headers[self.header_name] = key.reveal()
        if token is not None:
            headers["Authorization"] = f"Bearer {token.reveal()}"
        extensions = {**request.extensions, _ORIGIN: origin}
        request.extensions = extensions

    def _secret_headers(self) -> set[str]:
        names = {self.header_name.lower()} if self.header_name is not None else set()
        if self.token_source is not None:
            names.add("authorization")
        return names

    def on_request(self, request: httpx2.Request) -> None:
        """Request hook: strip the credentials from a request whose origin differs from where they were
        attached (a redirect the client follows)."""
        origin = request.extensions.get(_ORIGIN)
        if origin is not None and origin != _origin(request.url):
            for name in self._secret_headers():
                request.headers.pop(name, None)
            if request.headers.get("api-key") == PLACEHOLDER_API_KEY:
                request.headers.pop("api-key", None)

    async def aon_request(self, request: httpx2.Request) -> None:
        self.on_request(request)

    def _strip(self, info: dict[str, Any], origin: Origin) -> None:
        core = info.get("request")
        headers = getattr(core, "headers", None)
        if not isinstance(headers, list) or _core_origin(core.url) == origin:  # type: ignore[union-attr]
            return
        names = {n.encode("ascii") for n in self._secret_headers()}
        headers[:] = [(k, v) for k, v in headers if bytes(k).lower() not in names]

    def _install_trace(self, request: httpx2.Request, is_async: bool) -> None:
        """A ``trace`` hook on httpx2's own transports (kept by every redirect copy of the request): before a
        request's headers are written, credentials bound for another origin are dropped."""
        origin = _origin(request.url)
        extensions = request.extensions
        previous = extensions.get("trace")
        if previous is not None and previous is extensions.get(_TRACE):  # a re-send: ours, chain the caller's
            previous = extensions.get(_CALLER_TRACE)
        trace: Callable[[str, dict[str, Any]], Any]
        if is_async:

            async def atrace(event: str, info: dict[str, Any]) -> None:
                if event.endswith("send_request_headers.started"):
                    self._strip(info, origin)
                if previous is not None:
                    await previous(event, info)

            trace = atrace
        else:

            def strace(event: str, info: dict[str, Any]) -> None:
                if event.endswith("send_request_headers.started"):
                    self._strip(info, origin)
                if previous is not None:
                    previous(event, info)

            trace = strace
        request.extensions = {**extensions, "trace": trace, _TRACE: trace, _CALLER_TRACE: previous}

    # --------------------------------------------------------------------------------- flow

    def _flow(self, request: httpx2.Request) -> _Flow:
        """The whole exchange, I/O-free: yields what it needs and the requests to send."""
        yield _Need.BODY  # re-sendable before the first send: a generator body would be consumed by then
        key: SubscriptionKey | None = (yield _Need.KEY) if self.provider is not None else None
        token: _Bearer | None = (yield _Need.TOKEN) if self.token_source is not None else None
        self._apply(request, key, token)
        response: httpx2.Response = yield request
        if response.status_code not in _refusal.WATCHED:
            return
        body: bytes = yield _Read(response)
        kind = _refusal.on_refusal(self._owner, response, body)  # counts it; APIM's quota 403 raises
        if kind == "key" and key is not None:
            newer: SubscriptionKey | None = yield _RefreshKey(key)
            if newer is None:
                return
            assert self.provider is not None
            self.provider.record_resend()
            _refusal.note_resend(self._owner, "key")
            self._apply(request, newer, token)
            yield request
        elif kind == "token" and token is not None:
            fresh: _Bearer | None = yield _RefreshToken(token)
            if fresh is None:
                return
            _refusal.note_token_refresh(self._owner)
            _refusal.note_resend(self._owner, "token")
            self._apply(request, key, fresh)
            yield request

    def _misuse(self, is_async: bool) -> ConfigurationError:
        if is_async:
            return ConfigurationError(
                "an httpx2.AsyncClient needs an AsyncSubscriptionKeyProvider / AsyncBearerTokenSource"
            )
        return ConfigurationError(
            "a sync httpx2.Client needs a SubscriptionKeyProvider / BearerTokenSource, not the async one"
        )

    def sync_auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        if self._is_async() is True:
            raise self._misuse(False)
        self._install_trace(request, is_async=False)
        flow = self._flow(request)
        value: Any = None
        while True:
            try:
                step = flow.send(value)
            except StopIteration:
                return
            if isinstance(step, httpx2.Request):
                value = yield step
            elif step is _Need.BODY:
                value = request.read()
            elif step is _Need.KEY:
                value = self._sync_provider().get_key()
            elif step is _Need.TOKEN:
                value = _Bearer(self._sync_tokens().token())
            elif isinstance(step, _Read):
                value = step.response.read()
            elif isinstance(step, _RefreshKey):
                value = self._sync_provider().refresh_after_rejection(step.sent)
            else:
                fresh = self._sync_tokens().refresh_after_rejection(step.sent.reveal())
                value = _Bearer(fresh) if fresh is not None else None

    async def async_auth_flow(
        self, request: httpx2.Request
    ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        if self._is_async() is False:
            raise self._misuse(True)
        self._install_trace(request, is_async=True)
        flow = self._flow(request)
        value: Any = None
        while True:
            try:
                step = flow.send(value)
            except StopIteration:
                return
            if isinstance(step, httpx2.Request):
                value = yield step
            elif step is _Need.BODY:
                value = await request.aread()
            elif step is _Need.KEY:
                value = await self._async_provider().get_key()
            elif step is _Need.TOKEN:
                value = _Bearer(await self._async_tokens().token())
            elif isinstance(step, _Read):
                value = await step.response.aread()
            elif isinstance(step, _RefreshKey):
                value = await self._async_provider().refresh_after_rejection(step.sent)
            else:
                fresh = await self._async_tokens().refresh_after_rejection(step.sent.reveal())
                value = _Bearer(fresh) if fresh is not None else None

    # ----------------------------------------------------------------------- sync or async

    def _is_async(self) -> bool | None:
        """Whether the credentials are asyncio ones (``None``: no credential, cannot tell)."""
        if self.provider is not None:
            return inspect.iscoroutinefunction(self.provider.get_key)
        if self.token_source is not None:
            return inspect.iscoroutinefunction(self.token_source.token)
        return None

    def _sync_provider(self) -> KeySource:
        assert self.provider is not None
        return self.provider  # type: ignore[return-value]

    def _async_provider(self) -> AsyncKeySource:
        assert self.provider is not None
        return self.provider  # type: ignore[return-value]

    def _sync_tokens(self) -> TokenSource:
        assert self.token_source is not None
        return self.token_source  # type: ignore[return-value]

    def _async_tokens(self) -> AsyncTokenSource:
        assert self.token_source is not None
        return self.token_source  # type: ignore[return-value]


class SubscriptionKeyAuth(GuardedAuth):
    """Injects the provider's current key into ``header_name`` on every request (sync or async client).

    * Refuses to attach the key to a non-https URL unless ``allow_insecure_http`` (loopback tests).
    * Given ``origin`` (the factories pass the endpoint's), refuses to attach the key to any other
      origin, e.g. a copy made with ``with_options(base_url=...)`` pointing elsewhere.
    * Removes an ``api-key`` header carrying :data:`PLACEHOLDER_API_KEY`.
    * Reads the request body before the first send, so a re-send never meets a consumed stream.
    * On APIM's 401 asks the provider for a newer key (coalesced, rate limited) and, if it gets one,
      re-sends the request once with it. A second 401 is returned to the caller
      (``openai.AuthenticationError``).
    * Never sends the key across a cross-origin redirect: on httpx2's own transports a ``trace`` hook drops it
      before the redirected request's headers are written (also for this class used directly with
      ``httpx2.Client(auth=..., follow_redirects=True)``); :meth:`on_request` (an httpx2 request hook the
      factories install) does the same for any transport.
    * With ``token_source`` (key plus Entra token) also sets ``Authorization: Bearer ...`` at send time, under
      the same guards; a gateway token 401 gets one bounded token refresh and one re-send.
    """

    def __init__(
        self,
        provider: AnyKeySource,
        *,
        header_name: str | None = None,
        allow_insecure_http: bool | None = None,
        origin: str | None = None,
        token_source: AnyTokenSource | None = None,
    ) -> None:
        super().__init__(
            provider,
            token_source,
            header_name=header_name or provider.header_name,
            allow_insecure_http=(
                provider.allow_insecure_http if allow_insecure_http is None else allow_insecure_http
            ),
            origin=origin,
            owner=provider,
        )

    def __repr__(self) -> str:
        return f"SubscriptionKeyAuth(header_name={self.header_name!r}, provider={self.provider!r})"


class TokenAuth(GuardedAuth):
    """A token-only client's auth: the Entra token at send time, https only, pinned to ``origin``."""

    def __init__(self, token_source: AnyTokenSource, *, origin: str | None) -> None:
        super().__init__(
            None, token_source, header_name=None, allow_insecure_http=False, origin=origin, owner=token_source
        )

    def __repr__(self) -> str:
        return f"TokenAuth(token_source={self.token_source!r})"


# ------------------------------------------------------------------------------- client wiring


def tls_problem(client: httpx2.Client | httpx2.AsyncClient) -> str | None:
    """What is wrong with the TLS verification of ``client``'s transports, or ``None``.

    httpx2 keeps the ``ssl.SSLContext`` built from ``verify=`` on each ``HTTPTransport``'s connection
    pool (also for proxy mounts). Certificate *and* host name checks must both be on. A custom transport
    (not an ``httpx2.HTTPTransport``) is the caller's own code and is taken as given.
    """
    import ssl

    transports = [client._transport, *client._mounts.values()]
    for transport in transports:
        if not isinstance(transport, httpx2.HTTPTransport | httpx2.AsyncHTTPTransport):
            continue
        pool = transport._pool
        for attr, what in (("_ssl_context", "TLS"), ("_proxy_ssl_context", "proxy TLS")):
            ctx = getattr(pool, attr, None)
            if not isinstance(ctx, ssl.SSLContext):
                continue  # None: httpcore2's default context, which verifies
            if ctx.verify_mode != ssl.CERT_REQUIRED:
                return f"its {what} does not verify certificates (verify=False or CERT_NONE)"
            if not ctx.check_hostname:
                return f"its {what} does not check host names (check_hostname=False)"
    return None


def install(client: httpx2.Client | httpx2.AsyncClient, auth: GuardedAuth, what: str) -> None:
    """Put ``auth`` and its redirect hook on ``client`` after checking it: no auth of its own, TLS verified
    (else :class:`InsecureTransportError`; ``what`` names the credential in the message)."""
    if client.auth is not None:
        raise ConfigurationError("http_client already has an auth; apimvault installs its own")
    problem = tls_problem(client)
    if problem is not None:
        raise InsecureTransportError(
            f"http_client is refused: {problem}; {what} would go to any server that answers. "
            "Keep TLS verification on (trust a private CA with verify=ssl.create_default_context(cafile=...))"
        )
    client.auth = auth
    hooks = client.event_hooks
    hook = auth.aon_request if isinstance(client, httpx2.AsyncClient) else auth.on_request
    hooks["request"] = [*hooks.get("request", []), hook]
    client.event_hooks = hooks
