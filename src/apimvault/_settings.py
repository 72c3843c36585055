"""One home for apimvault's settings and constants: environment variable names, defaults, header checks.

The core (``_base``, ``_auth``, ``_client``), ``rotation``, the CLI and bench import these instead of
defining their own copies. No I/O, and nothing heavier than ``exceptions`` is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from types import MappingProxyType
from typing import Any

from .exceptions import ConfigurationError

__all__ = [
    "DEFAULT_CLIENT_KWARGS",
    "DEFAULT_CREDENTIAL_KWARGS",
    "DEFAULT_HEADER",
    "ENV_HEADER",
    "ENV_SECRET_NAME",
    "ENV_SECRET_VERSION",
    "ENV_VAULT_URL",
    "EVENT_EXPIRED",
    "EVENT_NEAR_EXPIRY",
    "EVENT_NEW_VERSION",
    "EXPIRY_WARNING_EVERY",
    "EXPIRY_WARNING_WINDOW",
    "FLIGHT_WAIT_LIMIT",
    "TRUST_FILE_VARIABLES",
    "TRUST_VARIABLES",
    "check_header_name",
    "check_spread",
    "provider_settings_from_env",
]

# ---------------------------------------------------------------------------------- environment names

ENV_VAULT_URL = "AZURE_KEYVAULT_URL"
ENV_SECRET_NAME = "APIMVAULT_SECRET_NAME"  # noqa: S105 - a variable name
ENV_SECRET_VERSION = "APIMVAULT_SECRET_VERSION"  # noqa: S105 - a variable name
ENV_HEADER = "APIMVAULT_HEADER_NAME"


def provider_settings_from_env(kwargs: MutableMapping[str, Any]) -> tuple[str, str]:
    """``(vault_url, secret_name)`` from ``AZURE_KEYVAULT_URL`` and ``APIMVAULT_SECRET_NAME``; sets
    ``version`` / ``header_name`` in ``kwargs`` from ``APIMVAULT_SECRET_VERSION`` / ``APIMVAULT_HEADER_NAME``
    unless given. :class:`ConfigurationError` names the required variables that are not set."""
    vault_url = os.environ.get(ENV_VAULT_URL, "").strip()
    secret_name = os.environ.get(ENV_SECRET_NAME, "").strip()
    missing = [n for n, v in ((ENV_VAULT_URL, vault_url), (ENV_SECRET_NAME, secret_name)) if not v]
    if missing:
        raise ConfigurationError(f"environment variable(s) not set: {', '.join(missing)}")
    if "version" not in kwargs and os.environ.get(ENV_SECRET_VERSION, "").strip():
        kwargs["version"] = os.environ[ENV_SECRET_VERSION].strip()
    if "header_name" not in kwargs and os.environ.get(ENV_HEADER, "").strip():
        kwargs["header_name"] = os.environ[ENV_HEADER].strip()
    return vault_url, secret_name


#: The variables that make Python's ``ssl``, httpx2, requests and aiohttp trust a CA *file*
#: (what ``apimvault local`` sets).
TRUST_FILE_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
#: Every variable that points Python's ``ssl`` (``SSL_CERT_FILE``, ``SSL_CERT_DIR``), httpx2, aiohttp and
#: requests (``REQUESTS_CA_BUNDLE``) at the CAs to trust.
TRUST_VARIABLES = (*TRUST_FILE_VARIABLES, "SSL_CERT_DIR")

# ------------------------------------------------------------------------------------------- header

DEFAULT_HEADER = "Ocp-Apim-Subscription-Key"
_HEADER_NAME = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def check_header_name(name: str) -> str:
    """``name`` if it is a valid HTTP header name (an RFC 9110 token), else :class:`ConfigurationError`."""
    if not isinstance(name, str) or not name or any(c not in _HEADER_NAME for c in name):
        raise ConfigurationError(f"header name {name!r} is not a valid HTTP header name")
    return name


# ------------------------------------------------------------------------------------ Azure clients

# SecretClient settings: apimvault retries on its own schedule (back-off, stale-if-error), so the SDK
# retries little and never holds a caller for long. The shells add a retry policy that never sleeps on
# a Retry-After inside a read (the provider's back-off honours it instead, see ``_retry``).
DEFAULT_CLIENT_KWARGS: Mapping[str, Any] = MappingProxyType(
    {
        "retry_total": 1,
        "retry_backoff_factor": 0.2,
        "retry_backoff_max": 2,
        "connection_timeout": 5,
        "read_timeout": 10,
    }
)
# The DefaultAzureCredential a provider creates itself (credential=None) gets the same bounds for the
# identity endpoint (managed identity, workload identity, ...) instead of azure-core's 300 s read timeout
# and up to 10 retries (minutes behind a hanging identity endpoint).
DEFAULT_CREDENTIAL_KWARGS: Mapping[str, Any] = DEFAULT_CLIENT_KWARGS
# How long a caller waits for a read in flight before it gets VaultUnavailableError (the read goes on).
# With the defaults above a read takes at most ~2 x (5 + 10) s for the token and as much for the secret.
FLIGHT_WAIT_LIMIT = 70.0
# From this long before the current key's expires_on, a provider logs a WARNING (at most once per
# EXPIRY_WARNING_EVERY) and exports the seconds left (OTel gauge apimvault.key.expires_in).
EXPIRY_WARNING_WINDOW = 7 * 86400.0
EXPIRY_WARNING_EVERY = 86400.0

# ------------------------------------------------------------------------------ Key Vault events

EVENT_NEW_VERSION = "Microsoft.KeyVault.SecretNewVersionCreated"
EVENT_NEAR_EXPIRY = "Microsoft.KeyVault.SecretNearExpiry"
EVENT_EXPIRED = "Microsoft.KeyVault.SecretExpired"


def check_spread(spread: object) -> float:
    """``spread`` (seconds over which a fleet's refreshes are spread) if it is a finite number >= 0."""
    if not isinstance(spread, int | float) or isinstance(spread, bool) or not 0 <= spread < float("inf"):
        raise ConfigurationError(f"spread must be a finite number of seconds >= 0, got {spread!r}")
    return spread
