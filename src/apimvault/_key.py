"""The redacting key value type and the rules for what may become a header."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from types import MappingProxyType

from .exceptions import InvalidSecretValueError

__all__ = ["SubscriptionKey", "fingerprint", "validate_key_value"]

# Whitespace that tools commonly leave around a value (``echo key > file``, copy/paste): stripped.
_SURROUNDING_WS = " \t\r\n"
# What a header value may hold after stripping: visible ASCII and inner spaces. Anything else —
# CR, LF, NUL, other control characters, DEL, non-ASCII — is refused rather than "cleaned".
_HEADER_SAFE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
MAX_KEY_LENGTH = 4096  # APIM keys are 32 hex chars; named values cap secrets at 4096 characters.


def fingerprint(value: str) -> str:
    """Short, non-reversible fingerprint of a key, safe to log: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:8]


def validate_key_value(raw: str | None, *, secret: str) -> str:
    """Return the header-ready key, or raise :class:`InvalidSecretValueError`.

    Surrounding spaces, tabs, CR and LF are stripped (they are artefacts of how values get into
    Key Vault, never part of an APIM key). After that the value must be 1..4096 visible ASCII
    characters (inner spaces allowed); anything else is refused, never repaired, and the error
    message says what is wrong without quoting the value.
    """
    if raw is None:
        raise InvalidSecretValueError(f"secret {secret} has no value", secret=secret)
    value = raw.strip(_SURROUNDING_WS)
    if not value:
        raise InvalidSecretValueError(f"secret {secret} is empty (or only whitespace)", secret=secret)
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidSecretValueError(
            f"secret {secret} is {len(value)} characters long; a key is at most {MAX_KEY_LENGTH}",
            secret=secret,
        )
    if not _HEADER_SAFE.fullmatch(value):
        bad = next((c for c in value if not (0x20 <= ord(c) <= 0x7E)), None)
        what = f"character U+{ord(bad):04X}" if bad is not None else "characters"
        raise InvalidSecretValueError(
            f"secret {secret} contains {what}, which cannot be sent in an HTTP header; "
            "store the bare key (visible ASCII only)",
            secret=secret,
        )
    return value


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class SubscriptionKey:
    """One version of the subscription key as fetched from Key Vault.

    The value is read only through :meth:`reveal`; ``repr()`` and ``str()`` show the version and a
    fingerprint. Timestamps are Unix seconds (``None`` when Key Vault has none).

    Attributes:
        version: Key Vault version id (32 hex digits).
        fingerprint: first 8 hex digits of the value's SHA-256.
        secret_id: the version's full Key Vault id (``https://vault/secrets/name/version``).
        expires_on / not_before / created_on / updated_on: the version's attributes.
        tags: the version's tags (e.g. ``CredentialId``), read-only.
    """

    _value: str
    version: str
    secret_id: str
    fingerprint: str
    expires_on: float | None = None
    not_before: float | None = None
    created_on: float | None = None
    updated_on: float | None = None
    tags: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def create(
        cls,
        value: str,
        *,
        version: str,
        secret_id: str,
        expires_on: float | None = None,
        not_before: float | None = None,
        created_on: float | None = None,
        updated_on: float | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> SubscriptionKey:
        return cls(
            value,
            version,
            secret_id,
            fingerprint(value),
            expires_on,
            not_before,
            created_on,
            updated_on,
            MappingProxyType(dict(tags or {})),
        )

    def reveal(self) -> str:
        """The key itself. Put it in a header; never log it."""
        return self._value

    @property
    def credential_id(self) -> str | None:
        """The ``CredentialId`` tag (``primary``/``secondary``) that the dual-key rotation maintains."""
        return self.tags.get("CredentialId")

    def __repr__(self) -> str:
        return f"SubscriptionKey(version={self.version!r}, fingerprint={self.fingerprint!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SubscriptionKey):
            return NotImplemented
        return self.version == other.version and self._value == other._value

    def __hash__(self) -> int:
        return hash((self.version, self.fingerprint))

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("SubscriptionKey cannot be pickled: it holds a credential")
