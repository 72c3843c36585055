"""Factories returning plain ``openai.AzureOpenAI`` / ``AsyncAzureOpenAI`` clients wired to a provider."""

from __future__ import annotations

import ssl
from collections.abc import Iterator, Mapping
from typing import Any

import httpx2
import openai

from . import _entra
from ._async import AsyncSubscriptionKeyProvider
from ._auth import PLACEHOLDER_API_KEY, SubscriptionKeyAuth
from ._base import check_header_name
from ._redact import install_log_redaction
from ._sync import SubscriptionKeyProvider
from ._trust import check_trust_files
from ._validation import check_client_kwargs, validate_endpoint
from .exceptions import ConfigurationError, InsecureTransportError

__all__ = ["LiveHeaders", "create_async_azure_openai", "create_azure_openai"]


class LiveHeaders(Mapping[str, str]):
    """``default_headers`` for the factories' clients: the caller's headers, **never the key**.

    The key lives only in the provider; :class:`~apimvault.SubscriptionKeyAuth` on the client's
    transport sets it at send time. So nothing openai copies — ``client.default_headers``,
    ``with_options(default_headers=...)`` (which freezes a dict), ``copy(http_client=...)`` — holds the
    key, and a copy whose new transport lacks the auth sends no key at all (APIM answers 401): it fails
    closed instead of sending the key without the https, origin and redirect checks. Any header named
    like the key's header is dropped from ``base``. ``provider`` is accepted for compatibility and not
    read.
    """

    def __init__(
        self,
        provider: SubscriptionKeyProvider | AsyncSubscriptionKeyProvider,
        header_name: str,
        base: Mapping[str, str] | None = None,
    ) -> None:
        self._header = check_header_name(header_name)
        self._base = {k: v for k, v in (base or {}).items() if k.lower() != header_name.lower()}

    def __getitem__(self, name: str) -> str:
        return self._base[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)

    def __bool__(self) -> bool:  # openai replaces a falsy mapping with a new dict: stay truthy
        return True

    def __repr__(self) -> str:
        return f"LiveHeaders({self._base!r}, key header {self._header!r} set at send time)"


def _tls_problem(client: httpx2.Client | httpx2.AsyncClient) -> str | None:
    """What is wrong with the TLS verification of ``client``'s transports, or ``None``.

    httpx2 keeps the ``ssl.SSLContext`` built from ``verify=`` on each ``HTTPTransport``'s connection
    pool (also for proxy mounts). Certificate *and* host name checks must both be on. A custom transport
    (not an ``httpx2.HTTPTransport``) is the caller's own code and is taken as given.
    """
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


def _client_kwargs(
    provider: SubscriptionKeyProvider | AsyncSubscriptionKeyProvider,
    client: httpx2.Client | httpx2.AsyncClient | None,
    *,
    azure_endpoint: str | None,
    api_version: str | None,
    header_name: str | None,
    default_headers: Mapping[str, str] | None,
    token_scope: str | None,
    token_credential: Any,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """What both factories hand to openai: endpoint checked, auth and redirect hook installed, and with
    ``token_scope`` an Entra token provider next to the key (:mod:`apimvault._entra`)."""
    check_client_kwargs(kwargs)
    header = check_header_name(header_name or provider.header_name)
    endpoint = validate_endpoint(azure_endpoint, provider.allow_insecure_http)
    if client is None:  # made only once the arguments are known good, so nothing is left unclosed
        check_trust_files()  # a stopped local stack's CA: a typed error naming it, not FileNotFoundError
        is_async = isinstance(provider, AsyncSubscriptionKeyProvider)
        client = openai.DefaultAsyncHttpxClient() if is_async else openai.DefaultHttpxClient()
    if client.auth is not None:
        raise ConfigurationError("http_client already has an auth; apimvault installs its own")
    problem = _tls_problem(client)
    if problem is not None:
        raise InsecureTransportError(
            f"http_client is refused: {problem}; the key would go to any server that answers. "
            "Keep TLS verification on (trust a private CA with verify=ssl.create_default_context(cafile=...))"
        )
    auth = SubscriptionKeyAuth(provider, header_name=header, origin=endpoint)
    client.auth = auth
    hooks = client.event_hooks
    hook = auth.aon_request if isinstance(client, httpx2.AsyncClient) else auth.on_request
    hooks["request"] = [*hooks.get("request", []), hook]
    client.event_hooks = hooks
    install_log_redaction(provider)
    built = {
        "azure_endpoint": endpoint,
        "api_version": api_version,
        # Only the auth on this transport ever sets the key (also for ``api-key``): openai holds a
        # placeholder the auth replaces, so a copy given another transport carries no key.
        "api_key": PLACEHOLDER_API_KEY,
        "default_headers": LiveHeaders(provider, header, default_headers),
        "http_client": client,
        **kwargs,
    }
    if token_scope is not None:  # key plus token
        is_async = isinstance(provider, AsyncSubscriptionKeyProvider)
        _entra.add_token(built, provider, token_scope, token_credential, is_async=is_async)
    return built


def create_azure_openai(
    provider: SubscriptionKeyProvider,
    *,
    azure_endpoint: str | None = None,
    api_version: str | None = None,
    header_name: str | None = None,
    http_client: httpx2.Client | None = None,
    default_headers: Mapping[str, str] | None = None,
    token_scope: str | None = None,  # key plus Entra token (apimvault._entra)
    token_credential: Any = None,
    **kwargs: Any,
) -> openai.AzureOpenAI:
    """A plain ``openai.AzureOpenAI`` whose every request carries the provider's current key.

    ``azure_endpoint`` (the APIM gateway) and ``api_version`` default to openai's own
    ``AZURE_OPENAI_ENDPOINT`` / ``OPENAI_API_VERSION``. Other keyword arguments go to ``AzureOpenAI``.
    openai gets a placeholder ``api_key`` (it insists on a credential) and ``default_headers`` without
    the key: only the :class:`SubscriptionKeyAuth` apimvault installs on the transport sets the key
    (in ``header_name``; ``api-key`` when APIM is configured so) and removes the placeholder. Pass
    ``http_client`` to tune the transport; it must verify TLS (else :class:`InsecureTransportError`).
    Copies keep the guarded transport; a copy given another ``http_client`` (``with_options`` /
    ``copy``) carries no key at all: build a new client with this factory instead.

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
    return openai.AzureOpenAI(
        **_client_kwargs(
            provider,
            http_client,
            azure_endpoint=azure_endpoint,
            api_version=api_version,
            header_name=header_name,
            default_headers=default_headers,
            token_scope=token_scope,
            token_credential=token_credential,
            kwargs=kwargs,
        )
    )


def create_async_azure_openai(
    provider: AsyncSubscriptionKeyProvider,
    *,
    azure_endpoint: str | None = None,
    api_version: str | None = None,
    header_name: str | None = None,
    http_client: httpx2.AsyncClient | None = None,
    default_headers: Mapping[str, str] | None = None,
    token_scope: str | None = None,  # key plus Entra token (apimvault._entra)
    token_credential: Any = None,
    **kwargs: Any,
) -> openai.AsyncAzureOpenAI:
    """The asyncio twin of :func:`create_azure_openai`, returning a plain ``openai.AsyncAzureOpenAI``."""
    if not isinstance(provider, AsyncSubscriptionKeyProvider):
        raise ConfigurationError("create_async_azure_openai needs an AsyncSubscriptionKeyProvider")
    return openai.AsyncAzureOpenAI(
        **_client_kwargs(
            provider,
            http_client,
            azure_endpoint=azure_endpoint,
            api_version=api_version,
            header_name=header_name,
            default_headers=default_headers,
            token_scope=token_scope,
            token_credential=token_credential,
            kwargs=kwargs,
        )
    )
