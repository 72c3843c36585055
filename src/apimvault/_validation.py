"""Validation: configuration (vault URL, secret name, version) and a fetched secret's attributes and value.

Pure functions shared by the sync and async shells and the CLI (Key Vault error mapping: ``_vault_errors``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from azure.keyvault.secrets import KeyVaultSecret, SecretProperties

from ._key import SubscriptionKey, validate_key_value
from .exceptions import (
    ConfigurationError,
    InsecureTransportError,
    SecretDisabledError,
    SecretExpiredError,
    SecretNotYetValidError,
)

__all__ = [
    "check_validity",
    "newest_valid_version",
    "to_key",
    "validate_secret_name",
    "validate_vault_url",
    "validate_version",
]

_NAME = re.compile(r"[0-9a-zA-Z-]{1,127}")
_VERSION = re.compile(r"[0-9a-fA-F]{32}")


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


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def to_key(secret: KeyVaultSecret, *, where: str) -> SubscriptionKey:
    """Check a fetched secret's ``enabled`` flag and value; return the key (dates: :func:`check_validity`)."""
    props = secret.properties
    version = props.version or ""
    if props.enabled is False:
        raise SecretDisabledError(
            f"{where} version {version} is disabled; enable it or set a new version", secret=where
        )
    value = validate_key_value(secret.value, secret=f"{where} version {version}")
    return SubscriptionKey.create(
        value,
        version=version,
        secret_id=props.id or where,
        expires_on=_ts(props.expires_on),
        not_before=_ts(props.not_before),
        created_on=_ts(props.created_on),
        updated_on=_ts(props.updated_on),
        tags=props.tags,
    )


def check_validity(key: SubscriptionKey, *, where: str, wall: float) -> SubscriptionKey:
    """Raise :class:`SecretNotYetValidError` / :class:`SecretExpiredError` unless ``key`` is valid at Unix
    time ``wall``; return it otherwise."""
    if key.not_before is not None and wall < key.not_before:
        raise SecretNotYetValidError(
            f"{where} version {key.version} is not valid before {_utc(key.not_before)}", secret=where
        )
    if key.expires_on is not None and wall >= key.expires_on:
        raise SecretExpiredError(
            f"{where} version {key.version} expired at {_utc(key.expires_on)}; "
            "rotate the key (apimvault rotate) or extend the expiry",
            secret=where,
        )
    return key


#: openai client arguments a provider supplies itself (the key) or that would move the endpoint.
_CLIENT_CONFLICTS = ("api_key", "azure_ad_token", "azure_ad_token_provider", "base_url")


def newest_valid_version(versions: Iterable[SecretProperties], wall: float) -> SecretProperties | None:
    """The newest (by ``created_on``) of ``versions`` that is enabled and valid at ``wall`` (Unix time)."""
    valid = [
        v
        for v in versions
        if v.enabled is not False
        and v.version
        and (v.not_before is None or v.not_before.timestamp() <= wall)
        and (v.expires_on is None or v.expires_on.timestamp() > wall)
    ]
    if not valid:
        return None
    return max(valid, key=lambda v: v.created_on.timestamp() if v.created_on else 0.0)


def check_client_kwargs(kwargs: Mapping[str, Any]) -> None:
    given = [k for k in _CLIENT_CONFLICTS if k in kwargs]
    if given:
        raise ConfigurationError(
            f"{', '.join(given)} cannot be combined with an apimvault provider: it supplies the key "
            "and the endpoint comes from azure_endpoint / AZURE_OPENAI_ENDPOINT"
        )


def validate_endpoint(azure_endpoint: str | None, allow_insecure_http: bool) -> str:
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
