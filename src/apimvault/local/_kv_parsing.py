"""Request parsing: routes to the spec's operations, base64url, and request bodies and query parameters."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from typing import Any

from ._kv_wire import (
    DEFAULT_PAGE,
    MSG_MAXRESULTS,
    MSG_PROPERTY_INVALID,
    MSG_SKIPTOKEN,
    MSG_VALUE_REQUIRED,
    bad_parameter,
)


@dataclasses.dataclass(frozen=True)
class KvRoute:
    operation: str
    name: str | None = None
    version: str = ""


_UNKNOWN = KvRoute("unknown")


def route_of(method: str, path: str) -> KvRoute:
    """Map ``method path`` to an operation of the spec (``unknown`` when it is none of them)."""
    segs = path.lstrip("/").split("/")
    if len(segs) > 1 and segs[-1] == "":
        segs.pop()
    n = len(segs)
    head = segs[0].lower()
    if head == "secrets":
        if n == 1:
            return KvRoute("GetSecrets") if method == "GET" else _UNKNOWN
        name = segs[1]
        if n == 2:
            if name.lower() == "restore" and method == "POST":
                return KvRoute("RestoreSecret")
            op = {"PUT": "SetSecret", "GET": "GetSecret", "PATCH": "UpdateSecret", "DELETE": "DeleteSecret"}
            return KvRoute(op[method], name) if method in op else _UNKNOWN
        if n == 3:
            tail = segs[2]
            if tail == "versions" and method == "GET":
                return KvRoute("GetSecretVersions", name)
            if tail == "backup" and method == "POST":
                return KvRoute("BackupSecret", name)
            if method == "GET":
                return KvRoute("GetSecret", name, tail)
            if method == "PATCH":
                return KvRoute("UpdateSecret", name, tail)
        return _UNKNOWN
    if head == "deletedsecrets":  # both /deletedsecrets and /deletedSecrets (lowkey-vault accepts both)
        if n == 1:
            return KvRoute("GetDeletedSecrets") if method == "GET" else _UNKNOWN
        if n == 2:
            if method == "GET":
                return KvRoute("GetDeletedSecret", segs[1])
            if method == "DELETE":
                return KvRoute("PurgeDeletedSecret", segs[1])
        if n == 3 and segs[2] == "recover" and method == "POST":
            return KvRoute("RecoverDeletedSecret", segs[1])
    return _UNKNOWN


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    text = text.strip().replace("+", "-").replace("/", "_")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ------------------------------------------------------------------------------------ request parsing


def _optional_str(payload: dict[str, Any], key: str) -> str | None:
    value = payload.get(key)
    if value is not None and not isinstance(value, str):
        raise bad_parameter(MSG_PROPERTY_INVALID.format(name=key))
    return value


def _tags(payload: dict[str, Any]) -> dict[str, str] | None:
    tags = payload.get("tags")
    if tags is None:
        return None
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise bad_parameter(MSG_PROPERTY_INVALID.format(name="tags"))
    return dict(tags)


def _attributes(payload: dict[str, Any]) -> dict[str, Any]:
    """The writable attributes present in the body (read-only ones are ignored, as the service does)."""
    attrs = payload.get("attributes")
    if attrs is None:
        return {}
    if not isinstance(attrs, dict):
        raise bad_parameter(MSG_PROPERTY_INVALID.format(name="attributes"))
    out: dict[str, Any] = {}
    enabled = attrs.get("enabled")
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise bad_parameter(MSG_PROPERTY_INVALID.format(name="attributes.enabled"))
        out["enabled"] = enabled
    for wire, field in (("nbf", "not_before"), ("exp", "expires")):
        stamp = attrs.get(wire)
        if stamp is not None:
            if isinstance(stamp, bool) or not isinstance(stamp, int) or not 0 <= stamp < 2**40:
                raise bad_parameter(MSG_PROPERTY_INVALID.format(name=f"attributes.{wire}"))
            out[field] = stamp
    return out


def parse_set(payload: dict[str, Any]) -> dict[str, Any]:
    if "value" not in payload or payload["value"] is None:
        raise bad_parameter(MSG_VALUE_REQUIRED)
    if not isinstance(payload["value"], str):
        raise bad_parameter(MSG_PROPERTY_INVALID.format(name="value"))
    attrs = _attributes(payload)
    return {
        "value": payload["value"],
        "content_type": _optional_str(payload, "contentType"),
        "tags": _tags(payload),
        "enabled": attrs.get("enabled", True),
        "not_before": attrs.get("not_before"),
        "expires": attrs.get("expires"),
    }


def parse_update(payload: dict[str, Any]) -> dict[str, Any]:
    changes = _attributes(payload)
    if payload.get("contentType") is not None:
        changes["content_type"] = _optional_str(payload, "contentType")
    if payload.get("tags") is not None:
        changes["tags"] = _tags(payload)
    return changes


def max_results(query: dict[str, list[str]]) -> int:
    raw = query.get("maxresults")
    if raw is None:
        return DEFAULT_PAGE
    text = raw[0].strip()
    if not text.isdigit() or not 1 <= int(text) <= 25:
        raise bad_parameter(MSG_MAXRESULTS)
    return int(text)


def skip_token(query: dict[str, list[str]]) -> str | None:
    raw = query.get("$skiptoken")
    if raw is None or raw[0] == "":
        return None
    try:
        marker = json.loads(b64url_decode(raw[0]))["NextMarker"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise bad_parameter(MSG_SKIPTOKEN) from None
    if not isinstance(marker, str):
        raise bad_parameter(MSG_SKIPTOKEN)
    return marker
