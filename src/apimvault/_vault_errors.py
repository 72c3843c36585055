"""Key Vault's answers as apimvault's typed errors: the mapping from Azure SDK exceptions, pure functions."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from ._retry import retry_after_seconds
from ._settings import FLIGHT_WAIT_LIMIT
from ._trust import trust_error, trust_problem
from .exceptions import (
    AccessDeniedError,
    ConfigurationError,
    CredentialError,
    KeyUnavailableError,
    SecretDisabledError,
    SecretExpiredError,
    SecretNotFoundError,
    VaultUnavailableError,
)

__all__ = ["flight_timeout", "fresh_copy", "map_error", "retry_after_of"]

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


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
    headers = getattr(response, "headers", None)
    return retry_after_seconds(headers) if headers is not None else None


def map_error(exc: BaseException, *, where: str) -> KeyUnavailableError | ConfigurationError | None:
    """Translate an Azure SDK exception into apimvault's tree; ``None`` for exceptions we don't know."""
    if isinstance(exc, KeyUnavailableError | ConfigurationError):
        return exc
    # No TLS without the CA file (e.g. requests' "Could not find a suitable TLS CA certificate bundle",
    # also inside azure-identity's ClientAuthenticationError): say which variable names it.
    unanswered = isinstance(exc, ClientAuthenticationError) and exc.status_code is None
    if (isinstance(exc, OSError | ServiceRequestError) or unanswered) and (problem := trust_problem()):
        return trust_error(problem)
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
        if status == 403 and code == "SecretExpired":  # a vault that enforces exp (real ones serve it)
            return SecretExpiredError(f"{where} is expired (403 SecretExpired)", secret=where)
        if status == 403:
            caller = re.search(r"Caller:\s*([^\r\n]+)", message)
            who = f" ({caller.group(1).strip()})" if caller else ""
            named = re.search(r"/secrets/([^/]+)", where)
            name = named.group(1) if named else where
            oid = re.search(r"oid=([0-9a-fA-F-]+)", message)
            assignee = oid.group(1) if oid else "<object id>"
            return AccessDeniedError(
                f"the identity{who} may not read {where} (403 {code or 'Forbidden'}). Two causes give "
                f"this 403: (1) the identity lacks the 'Key Vault Secrets User' role on the secret: grant "
                f"it on scope '<vault resource id>/secrets/{name}'; (2) the secret name is misspelt: with "
                "the role scoped to one secret, Key Vault answers 403, not 404, for any other name, so "
                f"check APIMVAULT_SECRET_NAME={name}. To tell them apart, list the scopes the identity "
                f"may read: az role assignment list --assignee {assignee} --all --query '[].scope' "
                "(a scope ending in /secrets/<another name> means the name is wrong; none, the role is "
                "missing); `apimvault check` shows the identity and the scope",
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


def fresh_copy(error: BaseException) -> BaseException:
    """A copy of ``error`` to raise in one more thread or task, so they never share a traceback."""
    clone = copy.copy(error)
    clone.__traceback__ = None
    clone.__cause__ = error.__cause__
    return clone


def flight_timeout(where: str) -> VaultUnavailableError:
    return VaultUnavailableError(
        f"a Key Vault read for {where} did not finish within {FLIGHT_WAIT_LIMIT:.0f} s; it goes on in the "
        "background",
        secret=where,
    )
