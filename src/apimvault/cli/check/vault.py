"""``apimvault check``'s vault probe: Key Vault reachable, the identity allowed to read the secret (a 403
names the role and the scope to grant), and the secret usable: what it is, never its value."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import time
from typing import Any

from ..._settings import EXPIRY_WARNING_WINDOW
from ...exceptions import (
    AccessDeniedError,
    CredentialError,
    KeyUnavailableError,
    SecretNotFoundError,
    VaultUnavailableError,
)
from ..config import header_name
from ..identity import describe_identity
from ..output import (
    EXIT_ACCESS_DENIED,
    EXIT_CREDENTIAL,
    EXIT_SECRET_MISSING,
    EXIT_SECRET_UNUSABLE,
    EXIT_VAULT_UNREACHABLE,
    exit_code_for,
)
from .run import CheckRun, Step

__all__ = ["secret_step"]


def secret_step(check: CheckRun) -> int | None:
    """Key Vault reachable, the identity allowed to read the secret, the secret usable (three steps)."""
    from ... import CachePolicy, SubscriptionKeyProvider

    vault_url, secret_name, identity = check.vault_url, check.secret_name, check.identity
    provider = check.provider = SubscriptionKeyProvider(
        vault_url, secret_name, credential=check.credential, policy=CachePolicy(), header_name=header_name()
    )
    check.resources.callback(provider.close)
    record = check.record
    try:
        key = check.key = provider.get_key()
    except VaultUnavailableError as exc:
        record(Step("vault", False, f"Key Vault unreachable: {exc}"))
        return EXIT_VAULT_UNREACHABLE
    except CredentialError as exc:
        record(Step("vault", True, f"{vault_url} answered"))
        record(Step("access", False, f"Key Vault refused the token: {exc}"))
        return EXIT_CREDENTIAL
    except AccessDeniedError as exc:
        record(Step("vault", True, f"{vault_url} answered"))
        scope_id = _forbidden_scope(exc) or f"<vault resource id>/secrets/{secret_name}"
        principal = identity.get("oid", "<object id>")
        record(
            Step(
                "access",
                False,
                f"403: identity {describe_identity(identity)} may not read secret {secret_name}. "
                f"Grant it the role 'Key Vault Secrets User' on scope '{scope_id}': "
                "az role assignment create --role 'Key Vault Secrets User' "
                f"--assignee-object-id {principal} --assignee-principal-type ServicePrincipal "
                f"--scope '{scope_id}'. Or the secret name is wrong: a role scoped to one secret "
                "makes Key Vault answer 403 for any other name, so check "
                f"APIMVAULT_SECRET_NAME={secret_name}",
                {"role": "Key Vault Secrets User", "scope": scope_id, "principal": principal},
            )
        )
        return EXIT_ACCESS_DENIED
    except SecretNotFoundError as exc:
        record(Step("vault", True, f"{vault_url} answered"))
        record(Step("access", True, "no 403"))
        record(Step("secret", False, str(exc)))
        return EXIT_SECRET_MISSING
    except KeyUnavailableError as exc:
        code = exit_code_for(exc)
        record(Step("vault", True, f"{vault_url} answered"))
        if code == EXIT_SECRET_UNUSABLE:
            record(Step("access", True, "the identity may read the secret"))
            record(Step("secret", False, str(exc)))
        else:
            record(Step("secret", False, f"{type(exc).__name__}: {exc}"))
        return code
    _secret_found(check, key)
    return None


def _secret_found(check: CheckRun, key: Any) -> None:
    """Record the vault, access and secret steps of a key read: what the secret is, never its value."""
    record = check.record
    now = time.time()
    record(Step("vault", True, f"{check.vault_url} answered"))
    record(Step("access", True, "the identity may read the secret (Key Vault Secrets User or more)"))
    secret_info = {
        "version": key.version,
        "fingerprint": key.fingerprint,
        "credential_id": key.credential_id,
        "enabled": True,
        "created_on": _iso(key.created_on),
        "age_s": round(now - key.created_on, 1) if key.created_on else None,
        "expires_on": _iso(key.expires_on),
        "tags": {k: v for k, v in key.tags.items()},
    }
    check.report["secret"] = secret_info
    expiry = "no expiry"
    if key.expires_on is not None:
        days = (key.expires_on - now) / 86400
        expiry = f"expires in {days:.1f} days" + (" (rotation due: under 30 days)" if days < 30 else "")
    warn = "" if key.credential_id else "; WARNING: no CredentialId tag, `apimvault rotate` needs it"
    record(
        Step(
            "secret",
            True,
            f"enabled, version {key.version}, CredentialId={key.credential_id}, fingerprint "
            f"{key.fingerprint}, age {_age(now - key.created_on) if key.created_on else '?'}, "
            f"{expiry}{warn}",
            secret_info,
        )
    )
    left = None if key.expires_on is None else key.expires_on - now
    if left is not None and left <= EXPIRY_WARNING_WINDOW:
        # The providers stop serving the key at expires_on (an outage): a rotation is stuck or missing.
        check.warn(
            "secret",
            "expires_soon",
            f"the key expires in {left / 86400:.1f} days ({_iso(key.expires_on)}), under "
            f"{EXPIRY_WARNING_WINDOW / 86400:.0f} days: clients stop using it then. Rotate now "
            "(`apimvault rotate`) and find out why the rotation did not run",
            expires_in_s=round(left, 1),
            expires_on=_iso(key.expires_on),
        )


def _forbidden_scope(exc: BaseException) -> str | None:
    """The ``Resource: '...'`` line of Key Vault's 403 body (the scope to grant the role on)."""
    cause: BaseException | None = exc
    while cause is not None:
        response = getattr(cause, "response", None)
        if response is not None:
            with contextlib.suppress(Exception):
                text = response.text()
                match = re.search(r"Resource:\s*'([^']+)'", text) or re.search(
                    r'Resource:\s*\\?"([^"\\]+)', text
                )
                if match:
                    return match.group(1)
        cause = cause.__cause__
    return None


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
