"""Factories returning plain ``openai.AzureOpenAI`` / ``AsyncAzureOpenAI`` clients wired to a provider."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import httpx2
import openai

from . import _entra
from ._async import AsyncSubscriptionKeyProvider
from ._auth import PLACEHOLDER_API_KEY, SubscriptionKeyAuth, install
from ._fork import track_for_fork
from ._redact import install_log_redaction
from ._settings import check_header_name
from ._sync import SubscriptionKeyProvider
from ._trust import check_trust_files
from ._validation import check_client_kwargs, validate_endpoint
from .exceptions import ConfigurationError, KeyInHeadersError

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


# ---------------------------------------------------------------------------------------- wiring

#: Header names that carry an APIM subscription key whatever ``header_name`` the provider uses.
_KEY_HEADERS = frozenset({"ocp-apim-subscription-key", "api-key"})


def _check_default_headers(default_headers: Mapping[str, str] | None, header: str) -> None:
    for name in default_headers or {}:
        if isinstance(name, str) and name.lower() in _KEY_HEADERS | {header.lower()}:
            raise KeyInHeadersError(
                f"default_headers carries {name!r}: apimvault sets the subscription key itself, on every "
                f"request, from the provider (in {header!r}), so a rotation reaches the client; a key "
                "written into default_headers would be sent as it is and never rotate. Remove it from "
                "default_headers "
                "(and api_key=...): the provider is the only place the key comes from"
            )


def _endpoint_args(
    azure_endpoint: str | None, base_url: str | None, allow_insecure_http: bool
) -> tuple[str, dict[str, str]]:
    """The origin to pin and what openai gets: ``azure_endpoint`` or a (deployment-scoped) ``base_url``."""
    if base_url is not None and azure_endpoint is not None:
        raise ConfigurationError(
            "pass azure_endpoint or base_url, not both: keep base_url for a deployment-scoped URL "
            "(https://<apim>.azure-api.net/<api-suffix>/deployments/<deployment>; model then does not "
            "route), "
            "or keep azure_endpoint (https://<apim>.azure-api.net) and pass model=<deployment> per call"
        )
    if base_url is not None:
        if not isinstance(base_url, str) or not base_url.strip():
            raise ConfigurationError(
                f"base_url must be a URL such as https://<apim>.azure-api.net/openai, not {base_url!r}"
            )
        try:
            url = validate_endpoint(base_url.strip(), allow_insecure_http)
        except ConfigurationError as exc:  # same checks, the message names the argument given
            raise type(exc)(str(exc).replace("azure_endpoint", "base_url", 1)) from None
        return url, {"base_url": url}
    endpoint = validate_endpoint(azure_endpoint, allow_insecure_http)
    return endpoint, {"azure_endpoint": endpoint}


def _client_kwargs(
    provider: SubscriptionKeyProvider | AsyncSubscriptionKeyProvider,
    client: httpx2.Client | httpx2.AsyncClient | None,
    *,
    azure_endpoint: str | None,
    base_url: str | None,
    api_version: str | None,
    header_name: str | None,
    default_headers: Mapping[str, str] | None,
    token_scope: str | _entra.BearerTokenSource | _entra.AsyncBearerTokenSource | None,
    token_credential: Any,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """What both factories hand to openai: endpoint checked, auth and redirect hook installed, and with
    ``token_scope`` an Entra token source on the same auth (:mod:`apimvault._entra`)."""
    check_client_kwargs(kwargs)
    header = check_header_name(header_name or provider.header_name)
    _check_default_headers(default_headers, header)
    origin, endpoint_args = _endpoint_args(azure_endpoint, base_url, provider.allow_insecure_http)
    is_async = isinstance(provider, AsyncSubscriptionKeyProvider)
    tokens = (
        _entra.token_source_for(provider, token_scope, token_credential, is_async=is_async)
        if token_scope is not None
        else None
    )
    if client is None:  # made only once the arguments are known good, so nothing is left unclosed
        check_trust_files()  # a stopped local stack's CA: a typed error naming it, not FileNotFoundError
        client = openai.DefaultAsyncHttpxClient() if is_async else openai.DefaultHttpxClient()
    auth = SubscriptionKeyAuth(provider, header_name=header, origin=origin, token_source=tokens)
    install(client, auth, "the key" if tokens is None else "the key and the token")
    track_for_fork(client)
    install_log_redaction(provider)
    return {
        **endpoint_args,
        "api_version": api_version,
        # Only the auth on this transport ever sets the key and the token: openai holds a placeholder the
        # auth removes, so a copy given another transport carries neither.
        "api_key": PLACEHOLDER_API_KEY,
        "default_headers": LiveHeaders(provider, header, default_headers),
        "http_client": client,
        **kwargs,
    }


def create_azure_openai(
    provider: SubscriptionKeyProvider,
    *,
    azure_endpoint: str | None = None,
    base_url: str | None = None,
    api_version: str | None = None,
    header_name: str | None = None,
    http_client: httpx2.Client | None = None,
    default_headers: Mapping[str, str] | None = None,
    token_scope: str | _entra.BearerTokenSource | _entra.AsyncBearerTokenSource | None = None,
    token_credential: Any = None,
    **kwargs: Any,
) -> openai.AzureOpenAI:
    """A plain ``openai.AzureOpenAI`` whose every request carries the provider's current key.

    ``azure_endpoint`` (the APIM gateway) and ``api_version`` default to openai's own
    ``AZURE_OPENAI_ENDPOINT`` / ``OPENAI_API_VERSION``. Instead of ``azure_endpoint`` a ``base_url`` may be
    given as in openai, e.g. the deployment-scoped ``https://<apim>.azure-api.net/<api-suffix>/deployments/<dep>``
    (``model`` then does not route); the guard pins the origin of whichever is given, and both together are a
    :class:`ConfigurationError`. Other keyword arguments go to ``AzureOpenAI``. ``default_headers`` must not
    carry a key header (``Ocp-Apim-Subscription-Key``, ``api-key`` or ``header_name``):
    :class:`~apimvault.exceptions.KeyInHeadersError`, since the provider is where the key comes from.
    openai gets a placeholder ``api_key`` (it insists on a credential) and ``default_headers`` without
    the key: only the :class:`SubscriptionKeyAuth` apimvault installs on the transport sets the key
    (in ``header_name``; ``api-key`` when APIM is configured so) and removes the placeholder. Pass
    ``http_client`` to tune the transport; it must verify TLS (else :class:`InsecureTransportError`).
    Copies keep the guarded transport; a copy given another ``http_client`` (``with_options`` /
    ``copy``) carries no key at all: build a new client with this factory instead.

    ``token_scope`` (e.g. ``api://<app-id>/.default``, the gateway API's app registration) adds an Entra
    bearer token to every request, for gateways that run ``validate-azure-ad-token`` next to the key: a
    :class:`~apimvault.BearerTokenSource` (azure-identity's ``get_bearer_token_provider``) on the provider's
    credential (or ``token_credential``), set at send time by the same auth under the key's guards. A token
    401 gets one bounded token refresh and one re-send and never touches the key (:mod:`apimvault._entra`).

    The client is fork-safe: in a child process forked after it was built (or used), it gets fresh
    connection pools; the parent's connections are left alone.
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
            base_url=base_url,
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
    base_url: str | None = None,
    api_version: str | None = None,
    header_name: str | None = None,
    http_client: httpx2.AsyncClient | None = None,
    default_headers: Mapping[str, str] | None = None,
    token_scope: str | _entra.BearerTokenSource | _entra.AsyncBearerTokenSource | None = None,
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
            base_url=base_url,
            api_version=api_version,
            header_name=header_name,
            default_headers=default_headers,
            token_scope=token_scope,
            token_credential=token_credential,
            kwargs=kwargs,
        )
    )
