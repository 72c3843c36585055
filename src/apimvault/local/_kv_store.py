"""The vault's records: secret versions (immutable) and secrets with their versions and deletion state."""

from __future__ import annotations

import dataclasses
from typing import Any

from ._kv_wire import RECOVERABLE_DAYS, RECOVERY_LEVEL

# ------------------------------------------------------------------------------------------------ state


@dataclasses.dataclass(frozen=True)
class SecretVersion:
    """One version of a secret. Immutable: updates replace the record."""

    name: str
    version: str
    value: str
    content_type: str | None
    tags: dict[str, str] | None
    enabled: bool
    not_before: int | None
    expires: int | None
    created: int
    updated: int
    previous_version: str | None = None

    def __repr__(self) -> str:  # never show the value
        return f"SecretVersion(name={self.name!r}, version={self.version!r}, enabled={self.enabled})"

    def attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {"enabled": self.enabled}
        if self.not_before is not None:
            attrs["nbf"] = self.not_before
        if self.expires is not None:
            attrs["exp"] = self.expires
        attrs["created"] = self.created
        attrs["updated"] = self.updated
        attrs["recoveryLevel"] = RECOVERY_LEVEL
        attrs["recoverableDays"] = RECOVERABLE_DAYS
        return attrs

    def item(self, base: str, *, with_version: bool) -> dict[str, Any]:
        """The metadata fields shared by every shape (no value)."""
        ident = (
            f"{base}/secrets/{self.name}/{self.version}" if with_version else f"{base}/secrets/{self.name}"
        )
        body: dict[str, Any] = {"id": ident, "attributes": self.attributes()}
        if self.tags is not None:
            body["tags"] = dict(self.tags)
        if self.content_type is not None:
            body["contentType"] = self.content_type
        return body

    def bundle(self, base: str, *, with_value: bool) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if with_value:
            body["value"] = self.value
        body.update(self.item(base, with_version=True))
        if self.previous_version is not None:
            body["previousVersion"] = self.previous_version
        return body


@dataclasses.dataclass
class _Secret:
    name: str  # the casing it was created with
    versions: list[SecretVersion] = dataclasses.field(default_factory=list)
    by_version: dict[str, int] = dataclasses.field(default_factory=dict)
    deleted_date: int | None = None
    scheduled_purge_date: int | None = None

    @property
    def latest(self) -> SecretVersion:
        return self.versions[-1]

    def add(self, version: SecretVersion) -> None:
        self.by_version[version.version] = len(self.versions)
        self.versions.append(version)

    def find(self, version: str) -> SecretVersion | None:
        if not version:
            return self.latest
        index = self.by_version.get(version)
        return None if index is None else self.versions[index]

    def replace(self, version: SecretVersion) -> None:
        self.versions[self.by_version[version.version]] = version

    def deleted_fields(self, base: str) -> dict[str, Any]:
        return {
            "recoveryId": f"{base}/deletedsecrets/{self.name}",
            "deletedDate": self.deleted_date,
            "scheduledPurgeDate": self.scheduled_purge_date,
        }
