"""The vault's records and a pure store of them: secret versions, secrets, soft deletion; no HTTP."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from typing import Any

from ._kv_wire import (
    MAX_TAGS,
    MAX_VALUE_BYTES,
    MSG_BAD_NAME,
    MSG_DELETED_BUT_RECOVERABLE,
    MSG_DELETED_NOT_FOUND,
    MSG_DISABLED,
    MSG_EXISTS,
    MSG_NOT_FOUND,
    MSG_PROPERTY_INVALID,
    MSG_SECRET_EXPIRED,
    MSG_TOO_LARGE,
    MSG_TOO_MANY_TAGS,
    NAME_RE,
    RECOVERABLE_DAYS,
    RECOVERY_LEVEL,
    KeyVaultError,
    bad_parameter,
)
from ._tokens import Clock

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
        # No "previousVersion": the spec reserves it for certificate-backed secrets ("The version of the
        # previous certificate, if applicable"), and this vault holds none; list items never carry it.
        # ``previous_version`` stays as the store's own history.
        return body


@dataclasses.dataclass
class StoredSecret:
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


# ------------------------------------------------------------------------------------------------ store


class SecretStore:
    """The vault's secrets, live and soft-deleted: state and Key Vault's rules, no HTTP, an injected clock.

    Thread-safe. A request Key Vault would refuse raises :class:`KeyVaultError` with the service's status,
    code and message; the service turns that into the wire answer.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._secrets: dict[str, StoredSecret] = {}  # lower-cased name -> live secret
        self._deleted: dict[str, StoredSecret] = {}  # lower-cased name -> soft-deleted secret
        self.refuse_expired = False
        """Real Key Vault serves an expired version (200; see :mod:`apimvault.local.keyvault`). ``True``
        makes GET refuse one instead (403 ``Forbidden``, inner error ``SecretExpired``, shaped like the
        real ``SecretDisabled`` answer; the text is an inference), so clients can be tested against a vault
        that enforces ``exp`` too."""

    def set(
        self,
        name: str,
        value: str,
        content_type: str | None,
        tags: dict[str, str] | None,
        enabled: bool,
        not_before: int | None,
        expires: int | None,
    ) -> SecretVersion:
        """Add a new version of ``name`` (creating the secret)."""
        if not NAME_RE.match(name):
            raise bad_parameter(MSG_BAD_NAME.format(name=name))
        if not isinstance(value, str):
            raise bad_parameter(MSG_PROPERTY_INVALID.format(name="value"))
        if len(value.encode("utf-8")) > MAX_VALUE_BYTES:
            raise bad_parameter(MSG_TOO_LARGE, "SecretTooLarge")
        if tags is not None and len(tags) > MAX_TAGS:
            raise bad_parameter(MSG_TOO_MANY_TAGS)
        key = name.lower()
        with self._lock:
            if key in self._deleted:
                raise KeyVaultError(
                    409,
                    "Conflict",
                    MSG_DELETED_BUT_RECOVERABLE.format(name=name),
                    "ObjectIsDeletedButRecoverable",
                )
            secret = self._secrets.get(key)
            if secret is None:
                secret = self._secrets[key] = StoredSecret(name)
            now = int(self.clock())
            version = SecretVersion(
                name=secret.name,
                version=uuid.uuid4().hex,
                value=value,
                content_type=content_type,
                tags=None if tags is None else dict(tags),
                enabled=enabled,
                not_before=not_before,
                expires=expires,
                created=now,
                updated=now,
                previous_version=secret.latest.version if secret.versions else None,
            )
            secret.add(version)
            return version

    def get(self, name: str, version: str) -> SecretVersion:
        """A version (``""``: the latest) of a live secret, refused when disabled."""
        with self._lock:
            secret = self._secrets.get(name.lower())
            found = None if secret is None else secret.find(version)
        if found is None:
            shown = f"{name}/{version}" if version else name
            raise KeyVaultError(404, "SecretNotFound", MSG_NOT_FOUND.format(name=shown))
        if not found.enabled:
            raise KeyVaultError(403, "Forbidden", MSG_DISABLED, "SecretDisabled")
        if self.refuse_expired and found.expires is not None and found.expires <= int(self.clock()):
            raise KeyVaultError(403, "Forbidden", MSG_SECRET_EXPIRED, "SecretExpired")
        return found

    def update(self, name: str, version: str, changes: dict[str, Any]) -> SecretVersion:
        """Replace a version's attributes, content type or tags (never its value)."""
        with self._lock:
            secret = self._secrets.get(name.lower())
            found = None if secret is None else secret.find(version)
            if secret is None or found is None:
                shown = f"{name}/{version}" if version else name
                raise KeyVaultError(404, "SecretNotFound", MSG_NOT_FOUND.format(name=shown))
            if "tags" in changes and changes["tags"] is not None and len(changes["tags"]) > MAX_TAGS:
                raise bad_parameter(MSG_TOO_MANY_TAGS)
            updated = dataclasses.replace(found, **changes, updated=int(self.clock()))
            secret.replace(updated)
            return updated

    def live(self, name: str) -> StoredSecret | None:
        with self._lock:
            return self._secrets.get(name.lower())

    def all_live(self) -> list[StoredSecret]:
        """Every live secret, by lower-cased name."""
        with self._lock:
            return [self._secrets[k] for k in sorted(self._secrets)]

    def all_deleted(self) -> list[StoredSecret]:
        """Every soft-deleted secret, by lower-cased name."""
        with self._lock:
            return [self._deleted[k] for k in sorted(self._deleted)]

    def delete(self, name: str) -> StoredSecret:
        """Soft-delete: the secret moves to the deleted ones for ``RECOVERABLE_DAYS``."""
        with self._lock:
            secret = self._secrets.pop(name.lower(), None)
            if secret is None:
                raise KeyVaultError(404, "SecretNotFound", MSG_NOT_FOUND.format(name=name))
            now = int(self.clock())
            secret.deleted_date = now
            secret.scheduled_purge_date = now + RECOVERABLE_DAYS * 86400
            self._deleted[name.lower()] = secret
            return secret

    def deleted(self, name: str) -> StoredSecret:
        with self._lock:
            secret = self._deleted.get(name.lower())
        if secret is None:
            raise KeyVaultError(404, "SecretNotFound", MSG_DELETED_NOT_FOUND.format(name=name))
        return secret

    def purge(self, name: str) -> None:
        with self._lock:
            if self._deleted.pop(name.lower(), None) is None:
                raise KeyVaultError(404, "SecretNotFound", MSG_DELETED_NOT_FOUND.format(name=name))

    def recover(self, name: str) -> StoredSecret:
        with self._lock:
            secret = self._deleted.pop(name.lower(), None)
            if secret is None:
                raise KeyVaultError(404, "SecretNotFound", MSG_DELETED_NOT_FOUND.format(name=name))
            secret.deleted_date = secret.scheduled_purge_date = None
            self._secrets[name.lower()] = secret
            return secret

    def export(self, name: str) -> dict[str, Any]:
        """A live secret's whole state (every version), for a backup."""
        with self._lock:
            secret = self._secrets.get(name.lower())
            if secret is None:
                raise KeyVaultError(404, "SecretNotFound", MSG_NOT_FOUND.format(name=name))
            return {"name": secret.name, "versions": [dataclasses.asdict(v) for v in secret.versions]}

    def restore(self, secret: StoredSecret) -> StoredSecret:
        """Put a backed-up secret back; refused while one of that name lives or is soft-deleted."""
        key = secret.name.lower()
        with self._lock:
            if key in self._deleted:
                raise KeyVaultError(
                    409,
                    "Conflict",
                    MSG_DELETED_BUT_RECOVERABLE.format(name=secret.name),
                    "ObjectIsDeletedButRecoverable",
                )
            if key in self._secrets:
                raise KeyVaultError(409, "Conflict", MSG_EXISTS.format(name=secret.name))
            self._secrets[key] = secret
        return secret
