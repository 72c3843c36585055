"""Environment and configuration of the commands.

Only the standard library and :mod:`apimvault._settings` (the core's settings, itself standard library
only) at import time.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from .._settings import DEFAULT_HEADER, ENV_HEADER, ENV_VAULT_URL, TRUST_FILE_VARIABLES
from ..exceptions import ConfigurationError

# Variables `apimvault local` writes that point at the stack's endpoints (checked by require_live_stack).
_LOCAL_ENDPOINT_VARIABLES = (
    "AZURE_KEYVAULT_URL",
    "AZURE_OPENAI_ENDPOINT",
    "APIMVAULT_ARM_ENDPOINT",
    "IDENTITY_ENDPOINT",
    "APIMVAULT_ADMIN_URL",
)
#: Every variable `apimvault local` writes to its environment file (LocalAzure.environ(); a test keeps the two
#: equal), so a shell can leave the stack's environment with one `unset`.
LOCAL_ENV_VARIABLES = (
    "AZURE_KEYVAULT_URL",
    "APIMVAULT_SECRET_NAME",
    "AZURE_OPENAI_ENDPOINT",
    "OPENAI_API_VERSION",
    "APIMVAULT_DEPLOYMENT",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "AZURE_TOKEN_CREDENTIALS",
    "AZURE_TENANT_ID",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "APIMVAULT_ARM_ENDPOINT",
    "APIMVAULT_APIM_SUBSCRIPTION_ID",
    "APIMVAULT_OFFICER_CLIENT_ID",
    "APIMVAULT_ADMIN_URL",
    "APIMVAULT_ADMIN_TOKEN",
    "APIMVAULT_GATEWAY_URLS",
    "APIMVAULT_OPENAI_BASE_URL",
    "APIMVAULT_ROTATOR_CLIENT_ID",  # only with --rotate-as rotator
)


def unset_local_env_command() -> str:
    """The one shell command that leaves `apimvault local`'s environment (every variable its file sets)."""
    return "unset " + " ".join(LOCAL_ENV_VARIABLES)


def env_var(name: str) -> str | None:
    """The variable's value, stripped; ``None`` when unset or blank."""
    value = os.environ.get(name, "").strip()
    return value or None


def vault_url_variable() -> str:
    """The name of the variable holding the vault URL (the core's ``AZURE_KEYVAULT_URL``)."""
    return ENV_VAULT_URL


def header_name() -> str:
    """The header APIM reads the key from (``APIMVAULT_HEADER_NAME``, default Ocp-Apim-Subscription-Key)."""
    return env_var(ENV_HEADER) or DEFAULT_HEADER


def missing_variables(values: Iterable[tuple[str, str | None]]) -> list[str]:
    """The names (as given, e.g. ``"APIMVAULT_DEPLOYMENT (or --deployment)"``) whose value is empty."""
    return [name for name, value in values if not value]


def require(values: Iterable[tuple[str, str | None]], *, context: str = "") -> None:
    """Raise one :class:`ConfigurationError` naming *every* missing variable, not only the first."""
    missing = missing_variables(values)
    if missing:
        raise ConfigurationError(f"{context}set {', '.join(missing)}")


def is_loopback_url(url: str | None) -> bool:
    if not url:
        return True
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def rotator_client_id(explicit: str | None) -> str | None:
    return explicit or env_var("APIMVAULT_ROTATOR_CLIENT_ID") or env_var("APIMVAULT_OFFICER_CLIENT_ID")


def _refuses_connections(url: str) -> bool:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    try:
        with socket.create_connection((host, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:  # anything else (a timeout, an unreachable network) is not "nothing listens here"
        return False


def stopped_local_stack() -> str | None:
    """Why the shell's variables point at an ``apimvault local`` that is not running any more, or None.

    Two signs: a trust variable (``SSL_CERT_FILE``/``REQUESTS_CA_BUNDLE``) names a file that does not
    exist (the stack deletes its CA when it stops), or a loopback endpoint refuses connections.
    """
    for name in TRUST_FILE_VARIABLES:
        path = env_var(name)
        if path and not os.path.exists(path):
            return f"{name}={path} does not exist"
    for name in _LOCAL_ENDPOINT_VARIABLES:
        url = env_var(name)
        if url and urlsplit(url).hostname and is_loopback_url(url) and _refuses_connections(url):
            return f"{name}={url} refuses connections"
    return None


def require_live_stack() -> None:
    """Raise :class:`ConfigurationError` when the environment points at a stopped local stack."""
    why = stopped_local_stack()
    if why is not None:
        raise ConfigurationError(
            f"the local stack is not running ({why}): start `apimvault local` again and re-source its "
            f"environment file, or leave its environment: {unset_local_env_command()}"
        )
