"""``apimvault check``'s token step: which credential, audience, expiry and roles of the Entra
token a key-plus-token client would send (``APIMVAULT_TOKEN_SCOPE``). The token itself is never shown."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .._jwt import unverified_claims

__all__ = ["ENV_TOKEN_SCOPE", "describe_token_refusal", "token_step"]

ENV_TOKEN_SCOPE = "APIMVAULT_TOKEN_SCOPE"  # noqa: S105 - a variable name


_claims = unverified_claims


def token_step(
    credential: Any,
    scope: str,
    used: str,
    record: Callable[[Any], None],
    make_step: Callable[..., Any],
    report: dict[str, Any],
) -> bool:
    """Get a token for ``scope`` with ``credential`` and record the ``token`` step; False if none came."""
    from azure.core.exceptions import ClientAuthenticationError

    from .._entra import check_scope
    from .._redact import watch_value
    from ..exceptions import ConfigurationError

    try:
        scope = check_scope(scope)
        token = credential.get_token(scope).token
        watch_value(token)  # never printed, whatever echoes it
    except ConfigurationError as exc:
        record(make_step("token", False, f"{ENV_TOKEN_SCOPE}: {exc}"))
        return False
    except ClientAuthenticationError as exc:
        lines = [line.strip() for line in str(exc.message).splitlines() if line.strip()][:5]
        record(make_step("token", False, f"{used} got no token for {scope}: " + " | ".join(lines)))
        return False
    claims = _claims(token)
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
        make_step(
            "token",
            True,
            f"{used} -> token for {audience}, {when}, roles {', '.join(roles) or 'none'}{warn}",
            info,
        )
    )
    return True


def describe_token_refusal(exc: Any) -> str | None:
    """The ``apim`` step's message when the gateway refused the token (not the key), else ``None``."""
    from .._refusal import classify

    response = getattr(exc, "response", None)
    if response is None or classify(response.status_code, response.headers, response.content) != "token":
        return None
    body = getattr(exc, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    return (
        f"APIM accepted the key but refused the Entra token (validate-azure-ad-token): {message or exc}. "
        f"Check {ENV_TOKEN_SCOPE} (the API's app registration), the token's audience and required roles"
    )
