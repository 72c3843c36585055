"""One ``httpx2.Auth`` that puts the current key on every request and re-sends once after APIM's 401."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Generator
from typing import TYPE_CHECKING

import httpx2

from . import _refusal
from ._base import check_header_name
from ._key import SubscriptionKey
from .exceptions import ConfigurationError, InsecureTransportError

if TYPE_CHECKING:
    from ._async import AsyncSubscriptionKeyProvider
    from ._sync import SubscriptionKeyProvider

__all__ = ["PLACEHOLDER_API_KEY", "SubscriptionKeyAuth", "is_apim_key_rejection"]

#: What the client factories hand ``AzureOpenAI(api_key=...)`` to satisfy its credential check. The auth
#: flow removes an ``api-key`` header carrying it, so it is never sent. It is not a secret.
PLACEHOLDER_API_KEY = "apimvault-placeholder-not-a-key"

_ORIGIN = "apimvault.key_origin"
_APIM_CHALLENGE = "azureapimanagementkey"


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: httpx2.URL) -> tuple[str, str, int | None]:
    scheme = url.scheme
    port = url.port
    return scheme, url.host, port if port is not None else _DEFAULT_PORTS.get(scheme)


def _show(origin: tuple[str, str, int | None]) -> str:
    scheme, host, port = origin
    return f"{scheme}://{host}:{port}"


def is_apim_key_rejection(status: int, headers: httpx2.Headers, body: bytes) -> bool:
    """Whether a 401 is APIM refusing the subscription key (not a backend's own 401).

    APIM's 401 carries ``WWW-Authenticate: AzureApiManagementKey ...`` and the body
    ``{"statusCode": 401, "message": "Access denied due to invalid subscription key..."}``.
    """
    if status != 401:
        return False
    if headers.get("www-authenticate", "").strip().lower().startswith(_APIM_CHALLENGE):
        return True
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    message = doc.get("message") if isinstance(doc, dict) else None
    return isinstance(message, str) and "subscription key" in message.lower() and "statusCode" in doc


class SubscriptionKeyAuth(httpx2.Auth):
    """Injects the provider's current key into ``header_name`` on every request (sync or async client).

    * Refuses to attach the key to a non-https URL unless ``allow_insecure_http`` (loopback tests).
    * Given ``origin`` (the factories pass ``azure_endpoint``), refuses to attach the key to any other
      origin, e.g. a copy made with ``with_options(base_url=...)`` pointing elsewhere.
    * Removes an ``api-key`` header carrying :data:`PLACEHOLDER_API_KEY`.
    * On APIM's 401 asks the provider for a newer key (coalesced, rate limited) and, if it gets one,
      re-sends the request once with it (``requires_request_body`` keeps the body re-sendable). A second
      401 is returned to the caller (``openai.AuthenticationError``).
    * :meth:`on_request` (an httpx2 request hook the factories install) drops the key header when a
      redirect leaves the origin the key was attached for.
    """

    requires_request_body = True

    def __init__(
        self,
        provider: SubscriptionKeyProvider | AsyncSubscriptionKeyProvider,
        *,
        header_name: str | None = None,
        allow_insecure_http: bool | None = None,
        origin: str | None = None,
    ) -> None:
        self.provider = provider
        self.origin = _origin(httpx2.URL(origin)) if origin is not None else None
        self.header_name = check_header_name(header_name or provider.header_name)
        self.allow_insecure_http = (
            provider.allow_insecure_http if allow_insecure_http is None else allow_insecure_http
        )

    def _apply(self, request: httpx2.Request, key: SubscriptionKey) -> None:
        origin = _origin(request.url)  # once per request: this runs on every call
        if origin[0] != "https" and not self.allow_insecure_http:
            raise InsecureTransportError(
                f"refusing to send the subscription key to {origin[0]}://{origin[1]}: "
                "not https (pass allow_insecure_http=True only for loopback tests)"
            )
        if self.origin is not None and origin != self.origin:
            raise InsecureTransportError(
                f"refusing to send the subscription key to {_show(origin)}: this client "
                f"was made for {_show(self.origin)} (make a new client with the factory for another endpoint)"
            )
        headers = request.headers
        if headers.get("api-key") == PLACEHOLDER_API_KEY:
            del headers["api-key"]
        headers[self.header_name] = key.reveal()
        request.extensions = {**request.extensions, _ORIGIN: origin}

    def on_request(self, request: httpx2.Request) -> None:
        """Request hook: strip the key from a request whose origin differs from where it was attached."""
        origin = request.extensions.get(_ORIGIN)
        if origin is not None and origin != _origin(request.url):
            request.headers.pop(self.header_name, None)
            if (
                self.header_name.lower() != "api-key"
                and request.headers.get("api-key") == PLACEHOLDER_API_KEY
            ):
                request.headers.pop("api-key", None)

    async def aon_request(self, request: httpx2.Request) -> None:
        self.on_request(request)

    def sync_auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        from ._sync import SubscriptionKeyProvider

        provider = self.provider
        if not isinstance(provider, SubscriptionKeyProvider):
            raise ConfigurationError(
                "a sync httpx2.Client needs a SubscriptionKeyProvider, not the async one"
            )
        key = provider.get_key()
        self._apply(request, key)
        response = yield request
        if response.status_code != 401:
            _refusal.after_response(provider, response)  # count 403/429; quota 403 raises
            return
        body = response.read()
        if not is_apim_key_rejection(response.status_code, response.headers, body):
            resend = _refusal.after_other_401(self, provider, request, response, body)
            if resend is not None:  # token 401 -> one token refresh + one re-send
                yield resend
            return
        _refusal.note_key_401(provider)
        newer = provider.refresh_after_rejection(key)
        if newer is None:
            return
        provider._record_resend()
        _refusal.note_resend(provider, "key")
        self._apply(request, newer)
        yield request

    async def async_auth_flow(
        self, request: httpx2.Request
    ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        from ._async import AsyncSubscriptionKeyProvider

        provider = self.provider
        if not isinstance(provider, AsyncSubscriptionKeyProvider):
            raise ConfigurationError("an httpx2.AsyncClient needs an AsyncSubscriptionKeyProvider")
        key = await provider.get_key()
        self._apply(request, key)
        response = yield request
        if response.status_code != 401:
            await _refusal.aafter_response(provider, response)  # count 403/429; quota 403 raises
            return
        body = await response.aread()
        if not is_apim_key_rejection(response.status_code, response.headers, body):
            resend = await _refusal.aafter_other_401(self, provider, request, response, body)
            if resend is not None:  # token 401 -> one token refresh + one re-send
                yield resend
            return
        _refusal.note_key_401(provider)
        newer = await provider.refresh_after_rejection(key)
        if newer is None:
            return
        provider._record_resend()
        _refusal.note_resend(provider, "key")
        self._apply(request, newer)
        yield request

    def __repr__(self) -> str:
        return f"SubscriptionKeyAuth(header_name={self.header_name!r}, provider={self.provider!r})"
