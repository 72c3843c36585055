"""Factories returning plain ``openai.AzureOpenAI`` / ``AsyncAzureOpenAI`` clients wired to a provider."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai

from . import _entra  # issue 14
from ._async import AsyncSubscriptionKeyProvider
from ._auth import PLACEHOLDER_API_KEY, SubscriptionKeyAuth
from ._base import check_header_name
from ._redact import install_log_redaction
from ._sync import SubscriptionKeyProvider
from .exceptions import ConfigurationError, InsecureTransportError

__all__ = ["LiveHeaders", "create_async_azure_openai", "create_azure_openai"]

_CONFLICTING = ("api_key", "azure_ad_token", "azure_ad_token_provider", "base_url")


class LiveHeaders(Mapping[str, str]):
    """``default_headers`` whose key header always reads the provider's *cached* key (no I/O).

    openai keeps the mapping it is given by reference and spreads it into every request, so
    ``client.default_headers[header]`` shows the current key after every refresh without rebuilding
    the client. The auth flow still sets the header at send time, so copies made with
    ``with_options(default_headers=...)`` (which freeze a dict) also send the current key.
    """

    def __init__(
        self,
        provider: SubscriptionKeyProvider | AsyncSubscriptionKeyProvider,
        header_name: str,
        base: Mapping[str, str] | None = None,
    ) -> None:
        self._provider = provider
        self._header = header_name
        self._base = {k: v for k, v in (base or {}).items() if k.lower() != header_name.lower()}

    def _value(self) -> str | None:
        # openai reads default_headers several times per request: a plain attribute read, no lock, no I/O.
        return self._provider.header_value()

    def __getitem__(self, name: str) -> str:
        if name == self._header:
            value = self._value()
            if value is None:
                raise KeyError(name)
            return value
        return self._base[name]

    def __iter__(self) -> Iterator[str]:
        yield from self._base
        if self._value() is not None:
            yield self._header

    def __len__(self) -> int:
        return len(self._base) + (1 if self._value() is not None else 0)

    def __bool__(self) -> bool:  # openai replaces a falsy mapping with a new dict: stay truthy
        return True

    def __repr__(self) -> str:
        shown = {**self._base, **({self._header: "<redacted>"} if self._value() is not None else {})}
        return f"LiveHeaders({shown!r})"


def _check_kwargs(kwargs: Mapping[str, Any]) -> None:
    given = [k for k in _CONFLICTING if k in kwargs]
    if given:
        raise ConfigurationError(
            f"{', '.join(given)} cannot be combined with an apimvault provider: it supplies the key "
            "and the endpoint comes from azure_endpoint / AZURE_OPENAI_ENDPOINT"
        )


def _endpoint(azure_endpoint: str | None, allow_insecure_http: bool) -> str:
    endpoint = azure_endpoint or os.environ.get("AZURE_OPENAI_ENDPOINT")
    if not endpoint:
        raise ConfigurationError(
            "azure_endpoint is required (or set AZURE_OPENAI_ENDPOINT to the APIM gateway URL)"
        )
    try:
        parts = urlsplit(endpoint)
        _ = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"azure_endpoint {endpoint!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigurationError(f"azure_endpoint {endpoint!r} must be an https URL")
    if parts.scheme == "http" and not allow_insecure_http:
        raise InsecureTransportError(
            f"azure_endpoint {endpoint!r} is not https; the key would travel in clear"
        )
    return endpoint


def _client_kwargs(
    provider: SubscriptionKeyProvider | AsyncSubscriptionKeyProvider,
    client: httpx2.Client | httpx2.AsyncClient | None,
    *,
    azure_endpoint: str | None,
    api_version: str | None,
    header_name: str | None,
    default_headers: Mapping[str, str] | None,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """What both factories hand to openai: endpoint checked, auth and redirect hook installed."""
    _check_kwargs(kwargs)
    header = check_header_name(header_name or provider.header_name)
    endpoint = _endpoint(azure_endpoint, provider.allow_insecure_http)
    if client is None:  # made only once the arguments are known good, so nothing is left unclosed
        is_async = isinstance(provider, AsyncSubscriptionKeyProvider)
        client = openai.DefaultAsyncHttpxClient() if is_async else openai.DefaultHttpxClient()
    if client.auth is not None:
        raise ConfigurationError("http_client already has an auth; apimvault installs its own")
    auth = SubscriptionKeyAuth(provider, header_name=header)
    client.auth = auth
    hooks = client.event_hooks
    hook = auth.aon_request if isinstance(client, httpx2.AsyncClient) else auth.on_request
    hooks["request"] = [*hooks.get("request", []), hook]
    client.event_hooks = hooks
    install_log_redaction(provider)
    return {
        "azure_endpoint": endpoint,
        "api_version": api_version,
        # APIM reading ``api-key``: openai's own provider path; otherwise a placeholder the auth removes.
        "api_key": provider.get if header.lower() == "api-key" else PLACEHOLDER_API_KEY,
        "default_headers": LiveHeaders(provider, header, default_headers),
        "http_client": client,
        **kwargs,
    }


def create_azure_openai(
    provider: SubscriptionKeyProvider,
    *,
    azure_endpoint: str | None = None,
    api_version: str | None = None,
    header_name: str | None = None,
    http_client: httpx2.Client | None = None,
    default_headers: Mapping[str, str] | None = None,
    token_scope: str | None = None,  # issue 14: key plus Entra token (apimvault._entra)
    token_credential: Any = None,  # issue 14
    **kwargs: Any,
) -> openai.AzureOpenAI:
    """A plain ``openai.AzureOpenAI`` whose every request carries the provider's current key.

    ``azure_endpoint`` (the APIM gateway) and ``api_version`` default to openai's own
    ``AZURE_OPENAI_ENDPOINT`` / ``OPENAI_API_VERSION``. Other keyword arguments go to ``AzureOpenAI``.
    With ``header_name="api-key"`` (APIM configured to read ``api-key``) the key goes through openai's
    own ``api_key`` provider path; otherwise a placeholder satisfies openai's credential check and is
    removed before sending. Pass ``http_client`` to tune the transport; apimvault installs its auth on it.

    ``token_scope`` (e.g. ``api://<app-id>/.default``, the gateway API's app registration) adds an Entra
    bearer token to every request, for gateways that run ``validate-azure-ad-token`` next to the key:
    openai's ``azure_ad_token_provider`` built with azure-identity's ``get_bearer_token_provider`` on the
    provider's credential (or ``token_credential``); no ``api_key`` is set then. A token 401 gets one
    token refresh and one re-send and never touches the key (:mod:`apimvault._entra`).
    """
    if not isinstance(provider, SubscriptionKeyProvider):
        raise ConfigurationError(
            "create_azure_openai needs a SubscriptionKeyProvider (use create_async_azure_openai "
            "for AsyncSubscriptionKeyProvider)"
        )
    built = _client_kwargs(
        provider,
        http_client,
        azure_endpoint=azure_endpoint,
        api_version=api_version,
        header_name=header_name,
        default_headers=default_headers,
        kwargs=kwargs,
    )
    if token_scope is not None:  # issue 14: key plus token
        _entra.add_token(built, provider, token_scope, token_credential, is_async=False)
    return openai.AzureOpenAI(**built)


def create_async_azure_openai(
    provider: AsyncSubscriptionKeyProvider,
    *,
    azure_endpoint: str | None = None,
    api_version: str | None = None,
    header_name: str | None = None,
    http_client: httpx2.AsyncClient | None = None,
    default_headers: Mapping[str, str] | None = None,
    token_scope: str | None = None,  # issue 14: key plus Entra token (apimvault._entra)
    token_credential: Any = None,  # issue 14
    **kwargs: Any,
) -> openai.AsyncAzureOpenAI:
    """The asyncio twin of :func:`create_azure_openai`, returning a plain ``openai.AsyncAzureOpenAI``."""
    if not isinstance(provider, AsyncSubscriptionKeyProvider):
        raise ConfigurationError("create_async_azure_openai needs an AsyncSubscriptionKeyProvider")
    built = _client_kwargs(
        provider,
        http_client,
        azure_endpoint=azure_endpoint,
        api_version=api_version,
        header_name=header_name,
        default_headers=default_headers,
        kwargs=kwargs,
    )
    if token_scope is not None:  # issue 14: key plus token
        _entra.add_token(built, provider, token_scope, token_credential, is_async=True)
    return openai.AsyncAzureOpenAI(**built)
