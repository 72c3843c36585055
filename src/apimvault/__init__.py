"""apimvault: Azure OpenAI through API Management with the subscription key kept in Key Vault.

The key is fetched with ``DefaultAzureCredential``, cached with a jittered TTL, refreshed ahead of
expiry in the background, served stale (bounded) through Key Vault outages, and put on every request
of a plain ``openai.AzureOpenAI`` / ``AsyncAzureOpenAI`` client, so a rotation needs no restart::

    from apimvault import SubscriptionKeyProvider, create_azure_openai

    provider = SubscriptionKeyProvider.from_env()       # AZURE_KEYVAULT_URL, APIMVAULT_SECRET_NAME
    client = create_azure_openai(provider)              # AZURE_OPENAI_ENDPOINT, OPENAI_API_VERSION
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    __version__: str
    from ._async import AsyncSubscriptionKeyProvider
    from ._auth import PLACEHOLDER_API_KEY, SubscriptionKeyAuth, is_apim_key_rejection
    from ._client import LiveHeaders, create_async_azure_openai, create_azure_openai
    from ._entra import (
        AsyncBearerTokenSource,
        BearerTokenSource,
        create_async_token_azure_openai,
        create_token_azure_openai,
    )
    from ._events import SecretEvent, arefresh_from_event, parse_secret_events, refresh_from_event
    from ._key import SubscriptionKey, fingerprint
    from ._model import KeyEvent, ProviderStats
    from ._policy import CachePolicy
    from ._redact import KeyRedactionFilter, install_log_redaction
    from ._refusal import RefusalStats, refusal_stats
    from ._settings import DEFAULT_HEADER
    from ._sync import SubscriptionKeyProvider
    from .exceptions import QuotaExceededError

from .exceptions import (
    AccessDeniedError,
    ApimVaultError,
    ConfigurationError,
    CredentialError,
    InsecureTransportError,
    InvalidSecretValueError,
    KeyInHeadersError,
    KeyUnavailableError,
    RotationError,
    SecretDisabledError,
    SecretExpiredError,
    SecretNotFoundError,
    SecretNotYetValidError,
    VaultUnavailableError,
)

# A library does not configure logging, but without a handler of its own Python's last-resort handler would
# print apimvault's WARNING lines on stderr of an application that configured none.
logging.getLogger("apimvault").addHandler(logging.NullHandler())

# Public names are imported on first use, so ``import apimvault.local`` or ``apimvault.exceptions`` does
# not pull in openai / azure-core, and ``import apimvault`` stays cheap.
_LAZY = {
    "AsyncSubscriptionKeyProvider": "._async",
    "PLACEHOLDER_API_KEY": "._auth",
    "SubscriptionKeyAuth": "._auth",
    "is_apim_key_rejection": "._auth",
    "DEFAULT_HEADER": "._settings",
    "KeyEvent": "._model",
    "ProviderStats": "._model",
    "LiveHeaders": "._client",
    "create_async_azure_openai": "._client",
    "create_azure_openai": "._client",
    "SecretEvent": "._events",
    "arefresh_from_event": "._events",
    "parse_secret_events": "._events",
    "refresh_from_event": "._events",
    "SubscriptionKey": "._key",
    "fingerprint": "._key",
    "CachePolicy": "._policy",
    "KeyRedactionFilter": "._redact",
    "install_log_redaction": "._redact",
    "SubscriptionKeyProvider": "._sync",
    "QuotaExceededError": ".exceptions",
    "RefusalStats": "._refusal",
    "refusal_stats": "._refusal",
    "BearerTokenSource": "._entra",
    "AsyncBearerTokenSource": "._entra",
    "create_token_azure_openai": "._entra",
    "create_async_token_azure_openai": "._entra",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("apimvault")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":  # importlib.metadata costs most of `import apimvault`: only on demand
        globals()[name] = value = _version()
        return value
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'apimvault' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "DEFAULT_HEADER",
    "PLACEHOLDER_API_KEY",
    "AccessDeniedError",
    "ApimVaultError",
    "AsyncBearerTokenSource",
    "AsyncSubscriptionKeyProvider",
    "BearerTokenSource",
    "CachePolicy",
    "ConfigurationError",
    "CredentialError",
    "InsecureTransportError",
    "InvalidSecretValueError",
    "KeyEvent",
    "KeyInHeadersError",
    "KeyRedactionFilter",
    "KeyUnavailableError",
    "LiveHeaders",
    "ProviderStats",
    "QuotaExceededError",
    "RefusalStats",
    "RotationError",
    "SecretDisabledError",
    "SecretEvent",
    "SecretExpiredError",
    "SecretNotFoundError",
    "SecretNotYetValidError",
    "SubscriptionKey",
    "SubscriptionKeyAuth",
    "SubscriptionKeyProvider",
    "VaultUnavailableError",
    "__version__",
    "arefresh_from_event",
    "create_async_azure_openai",
    "create_async_token_azure_openai",
    "create_azure_openai",
    "create_token_azure_openai",
    "fingerprint",
    "install_log_redaction",
    "is_apim_key_rejection",
    "parse_secret_events",
    "refresh_from_event",
    "refusal_stats",
]
