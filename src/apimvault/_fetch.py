"""Turning Key Vault answers into keys or typed errors. Pure functions shared by the sync and async shells."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.keyvault.secrets import KeyVaultSecret

from ._key import SubscriptionKey, validate_key_value
from .exceptions import (
    AccessDeniedError,
    ConfigurationError,
    CredentialError,
    InsecureTransportError,
    KeyUnavailableError,
    SecretDisabledError,
    SecretExpiredError,
    SecretNotFoundError,
    SecretNotYetValidError,
    VaultUnavailableError,
)

_NAME = re.compile(r"[0-9a-zA-Z-]{1,127}")
_VERSION = re.compile(r"[0-9a-fA-F]{32}")
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def validate_vault_url(vault_url: str, *, allow_insecure_http: bool = False) -> str:
    """Normalise and check a vault URL (``https://name.vault.azure.net``); raise ConfigurationError."""
    if not isinstance(vault_url, str) or not vault_url.strip():
        raise ConfigurationError("vault_url is required (e.g. https://my-vault.vault.azure.net)")
    url = vault_url.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError as exc:
        raise ConfigurationError(f"vault_url {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigurationError(
            f"vault_url {url!r} must be an https URL such as https://my-vault.vault.azure.net"
        )
    if parts.scheme == "http" and not allow_insecure_http:
        raise InsecureTransportError(f"vault_url {url!r} is not https; Key Vault only speaks TLS")
    if parts.path not in ("", "/") or "?" in url or "#" in url or parts.username or parts.password:
        raise ConfigurationError(f"vault_url {url!r} must be the vault's base URL, without path or query")
    return url


def validate_secret_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"secret name {name!r} is not a valid Key Vault name (1-127 characters: letters, digits, '-')"
        )
    return name


def validate_version(version: str | None) -> str | None:
    if version is None or version == "":
        return None
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise ConfigurationError(f"secret version {version!r} is not a Key Vault version (32 hex digits)")
    return version.lower()


def _ts(value: Any) -> float | None:
    return None if value is None else float(value.timestamp())


def to_key(secret: KeyVaultSecret, *, where: str, now: float) -> SubscriptionKey:
    """Check a fetched secret's attributes and value; return the key or raise a typed error."""
    props = secret.properties
    version = props.version or ""
    if props.enabled is False:
        raise SecretDisabledError(
            f"{where} version {version} is disabled; enable it or set a new version", secret=where
        )
    not_before = _ts(props.not_before)
    expires_on = _ts(props.expires_on)
    if not_before is not None and now < not_before:
        raise SecretNotYetValidError(
            f"{where} version {version} is not valid before {props.not_before:%Y-%m-%dT%H:%M:%SZ}",
            secret=where,
        )
    if expires_on is not None and now >= expires_on:
        raise SecretExpiredError(
            f"{where} version {version} expired at {props.expires_on:%Y-%m-%dT%H:%M:%SZ}; "
            "rotate the key (apimvault rotate) or extend the expiry",
            secret=where,
        )
    value = validate_key_value(secret.value, secret=f"{where} version {version}")
    return SubscriptionKey.create(
        value,
        version=version,
        secret_id=props.id or where,
        expires_on=expires_on,
        not_before=not_before,
        created_on=_ts(props.created_on),
        updated_on=_ts(props.updated_on),
        tags=props.tags,
    )


def _error_body(exc: HttpResponseError) -> dict[str, Any]:
    response = getattr(exc, "response", None)
    if response is None:
        return {}
    try:
        body = json.loads(response.text())
    except Exception:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _retry_after(exc: HttpResponseError) -> float | None:
    response = getattr(exc, "response", None)
    if response is None:
        return None
    raw = response.headers.get("Retry-After") or response.headers.get("retry-after")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def map_error(exc: BaseException, *, where: str) -> KeyUnavailableError | ConfigurationError | None:
    """Translate an Azure SDK exception into apimvault's tree; ``None`` for exceptions we don't know."""
    if isinstance(exc, KeyUnavailableError | ConfigurationError):
        return exc
    if isinstance(exc, ResourceNotFoundError):
        return SecretNotFoundError(
            f"{where} was not found (404). Check APIMVAULT_SECRET_NAME and AZURE_KEYVAULT_URL, "
            "or recover the secret if it was deleted",
            secret=where,
        )
    if isinstance(exc, ClientAuthenticationError) and exc.status_code != 401:
        # No token: azure-identity's errors (CredentialUnavailableError included) name the credential(s)
        # tried and why. Checked before the status branch: an identity endpoint's 5xx is not the vault's.
        lines = str(exc.message if hasattr(exc, "message") else exc).strip().splitlines()[:6]
        return CredentialError(
            f"no token for Key Vault ({type(exc).__name__}): " + " ".join(line.strip() for line in lines),
            secret=where,
        )
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        status = exc.status_code
        error = _error_body(exc)
        inner = error.get("innererror") if isinstance(error.get("innererror"), dict) else {}
        code = str((inner or {}).get("code") or error.get("code") or "")
        message = str(error.get("message") or "")
        if status == 403 and code == "SecretDisabled":
            return SecretDisabledError(f"{where} is disabled (403 SecretDisabled)", secret=where)
        if status == 403:
            caller = re.search(r"Caller:\s*([^\r\n]+)", message)
            who = f" ({caller.group(1).strip()})" if caller else ""
            return AccessDeniedError(
                f"the identity{who} may not read {where} (403 {code or 'Forbidden'}). Grant it the "
                f"'Key Vault Secrets User' role on the secret: scope "
                f"'<vault resource id>/secrets/{where.rsplit('/', 1)[-1]}'",
                secret=where,
            )
        if status == 401:
            return CredentialError(
                f"Key Vault rejected the token for {where} (401): the token is for another tenant or "
                "resource, or expired",
                secret=where,
            )
        if status in _TRANSIENT_STATUS:
            return VaultUnavailableError(
                f"Key Vault answered {status} for {where}{' (' + code + ')' if code else ''}",
                secret=where,
                retry_after=_retry_after(exc),
            )
        return KeyUnavailableError(f"Key Vault answered {status} {code} for {where}", secret=where)
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return VaultUnavailableError(
            f"Key Vault unreachable for {where}: {type(exc).__name__}: {exc}", secret=where
        )
    if isinstance(exc, HttpResponseError) and exc.status_code is None:
        # A response that broke off mid-body (IncompleteReadError, DecodeError): the vault or the network
        # failed in transit, which is transient.
        return VaultUnavailableError(
            f"Key Vault response for {where} was cut off: {type(exc).__name__}", secret=where
        )
    if isinstance(exc, ValueError) and "challenge" in str(exc).lower():
        return ConfigurationError(f"Key Vault challenge for {where} failed verification: {exc}")
    if isinstance(exc, TimeoutError | ConnectionError):
        return VaultUnavailableError(f"Key Vault unreachable for {where}: {type(exc).__name__}", secret=where)
    return None


def retry_after_of(error: BaseException) -> float | None:
    return error.retry_after if isinstance(error, VaultUnavailableError) else None
