"""Real-shaped Key Vault Event Grid events (Event Grid schema, as in Learn's Key Vault event source page)."""

from __future__ import annotations

import uuid
from typing import Any

NEAR_EXPIRY = "Microsoft.KeyVault.SecretNearExpiry"


def near_expiry_event(
    *,
    vault_url: str,
    secret: str,
    version: str,
    nbf: int | None = None,
    exp: int | None = None,
    vault_name: str = "kv-apimvault-local",
    topic: str = (
        "/subscriptions/00000000-0000-4000-8000-00000000a11e/resourceGroups/rg-apimvault-local/"
        "providers/Microsoft.KeyVault/vaults/kv-apimvault-local"
    ),
    event_type: str = NEAR_EXPIRY,
    event_id: str | None = None,
) -> dict[str, Any]:
    return {
        "id": event_id or str(uuid.uuid4()),
        "topic": topic,
        "subject": secret,
        "eventType": event_type,
        "eventTime": "2026-11-26T10:00:00.0000000Z",
        "data": {
            "Id": f"{vault_url.rstrip('/')}/secrets/{secret}/{version}",
            "VaultName": vault_name,
            "ObjectType": "Secret",
            "ObjectName": secret,
            "Version": version,
            "NBF": nbf,
            "EXP": exp,
        },
        "dataVersion": "1",
        "metadataVersion": "1",
    }
