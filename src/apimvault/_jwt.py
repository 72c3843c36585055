"""The claims of a JWT, read *without* verifying it: only to show or compare who a token belongs to."""

from __future__ import annotations

import base64
import json
from typing import Any

__all__ = ["unverified_claims"]


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, *not verified* (for display and diagnostics only); ``{}`` if it is not one."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}
