"""Identity helpers: the (unverified) claims of a token, the scope to ask for, azure-identity's log."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from .._jwt import unverified_claims

jwt_claims = unverified_claims
"""The payload of a JWT, *not verified* (only to show which identity it belongs to)."""


_IDENTITY_CLAIMS = (
    "appid",
    "azp",
    "oid",
    "tid",
    "upn",
    "unique_name",
    "preferred_username",
    "xms_mi_name",
    "idtyp",
)


def identity_of(claims: dict[str, Any]) -> dict[str, str]:
    return {k: str(claims[k]) for k in _IDENTITY_CLAIMS if claims.get(k)}


def describe_identity(identity: dict[str, str]) -> str:
    parts = []
    name = identity.get("upn") or identity.get("preferred_username") or identity.get("xms_mi_name")
    if name:
        parts.append(name)
    for claim in ("appid", "azp", "oid", "tid"):
        if claim in identity:
            parts.append(f"{claim}={identity[claim]}")
    return " ".join(parts) or "(no identity claims in the token)"


def vault_scope(vault_url: str) -> str:
    host = (urlsplit(vault_url).hostname or "").lower()
    for suffix in ("vault.azure.cn", "vault.usgovcloudapi.net", "vault.microsoftazure.de", "vault.azure.net"):
        if host.endswith("." + suffix):
            return f"https://{suffix}/.default"
    return "https://vault.azure.net/.default"


class _CredentialLog(logging.Handler):
    """Collects azure-identity's INFO/WARNING records (which credential of the chain produced a token)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def capture_identity_log() -> Iterator[_CredentialLog]:
    logger = logging.getLogger("azure.identity")
    handler = _CredentialLog()
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
