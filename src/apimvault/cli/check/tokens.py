"""``apimvault check``'s token checks: which credential, audience, expiry and roles of the Entra token a
key-plus-token client would send (``APIMVAULT_TOKEN_SCOPE``), and whether a gateway's 401 refused the token
rather than the key. The token itself is never shown."""

from __future__ import annotations

import time
from typing import Any

from ..._jwt import unverified_claims
from ..config import env_var
from ..output import EXIT_CREDENTIAL
from .run import CheckRun, Step

__all__ = ["ENV_TOKEN_SCOPE", "describe_token_refusal", "token_step"]

ENV_TOKEN_SCOPE = "APIMVAULT_TOKEN_SCOPE"  # noqa: S105 - a variable name


def token_step(check: CheckRun) -> int | None:
    """With ``APIMVAULT_TOKEN_SCOPE``: the Entra token a key-plus-token client would send (claims only)."""
    check.token_scope = env_var(ENV_TOKEN_SCOPE)
    if not check.token_scope:
        return None
    used = str(check.report.get("credential", {}).get("used", "unknown"))
    ok = _record_token(check, check.token_scope, used)
    return None if ok else EXIT_CREDENTIAL


def _record_token(check: CheckRun, scope: str, used: str) -> bool:
    """Get a token for ``scope`` with the run's credential and record the ``token`` step; False if none
    came."""
    from azure.core.exceptions import ClientAuthenticationError

    from ..._entra import check_scope
    from ..._redact import watch_value
    from ...exceptions import ConfigurationError

    record, report = check.record, check.report
    try:
        scope = check_scope(scope)
        token = check.credential.get_token(scope).token
        watch_value(token)  # never printed, whatever echoes it
    except ConfigurationError as exc:
        record(Step("token", False, f"{ENV_TOKEN_SCOPE}: {exc}"))
        return False
    except ClientAuthenticationError as exc:
        lines = [line.strip() for line in str(exc.message).splitlines() if line.strip()][:5]
        record(Step("token", False, f"{used} got no token for {scope}: " + " | ".join(lines)))
        return False
    claims = unverified_claims(token)
    expected = scope.removesuffix("/.default")
    audience = str(claims.get("aud", "?"))
    exp = claims.get("exp")
    minutes = (float(exp) - time.time()) / 60 if isinstance(exp, int | float) else None
    roles = (
        [str(r) for r in claims.get("roles", []) if isinstance(r, str)]
        if isinstance(claims.get("roles"), list)
        else []
    )
    info = {
        "scope": scope,
        "credential": used,
        "audience": audience,
        "expires_in_min": round(minutes, 1) if minutes is not None else None,
        "roles": roles,
        "appid": claims.get("appid") or claims.get("azp"),
    }
    report["token"] = info
    warn = "" if audience in (expected, expected + "/") else f"; WARNING: audience is not {expected}"
    when = f"expires in {minutes:.0f} min" if minutes is not None else "no expiry claim"
    record(
        Step(
            "token",
            True,
            f"{used} -> token for {audience}, {when}, roles {', '.join(roles) or 'none'}{warn}",
            info,
        )
    )
    return True


def describe_token_refusal(exc: Any) -> str | None:
    """The ``apim`` step's message when the gateway refused the token (not the key), else ``None``."""
    from ..._refusal import classify

    response = getattr(exc, "response", None)
    if response is None or classify(response.status_code, response.headers, response.content) != "token":
        return None
    body = getattr(exc, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    return (
        f"APIM accepted the key but refused the Entra token (validate-azure-ad-token): {message or exc}. "
        f"Check {ENV_TOKEN_SCOPE} (the API's app registration), the token's audience and required roles"
    )
