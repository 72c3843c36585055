"""Environment and configuration of the commands."""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

# ------------------------------------------------------------------------------------ small helpers


def env_var(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def header_name() -> str:
    """The header APIM reads the key from (``APIMVAULT_HEADER_NAME``, default Ocp-Apim-Subscription-Key)."""
    return env_var("APIMVAULT_HEADER_NAME") or "Ocp-Apim-Subscription-Key"


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
