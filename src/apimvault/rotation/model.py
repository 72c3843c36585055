"""The rotation's data model: tag names, the APIM subscription reference, the results, and the tag
helpers. Pure: no I/O, no environment."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from .._key import fingerprint
from .._settings import EVENT_EXPIRED, EVENT_NEAR_EXPIRY
from ..exceptions import RotationError
from .config import DEFAULT_PROPAGATION_TIMEOUT

TAG_CREDENTIAL_ID = "CredentialId"
TAG_PROVIDER_ADDRESS = "ProviderAddress"
TAG_VALIDITY_DAYS = "ValidityPeriodDays"
TAG_PENDING = "RotationPending"
"""Set on the current version while its successor waits for the gateways: ``<slot>:<fingerprint>``."""
PROBE_PATH = "/openai/v1/models"
ROTATOR_ROLE = "apimvault APIM subscription key rotator"
ROTATOR_ACTIONS = (
    "Microsoft.ApiManagement/service/subscriptions/read, .../listSecrets/action, "
    ".../regeneratePrimaryKey/action and .../regenerateSecondaryKey/action"
)
NEAR_EXPIRY = EVENT_NEAR_EXPIRY
EXPIRED = EVENT_EXPIRED
# Rotating on SecretNewVersionCreated would rotate again on the version the rotation itself wrote.
ROTATING_EVENTS = frozenset({NEAR_EXPIRY, EXPIRED})
SLOTS = ("primary", "secondary")
NEAR_EXPIRY_DAYS = 30
"""Key Vault publishes ``SecretNearExpiry`` 30 days before a version's expiry."""
MIN_VALIDITY_DAYS = NEAR_EXPIRY_DAYS + 1
"""A version valid for 30 days or less is born near expiry: its ``SecretNearExpiry`` fires at once and the
rotation loops. The shortest validity that leaves a day between rotations."""
VAULT_ROTATOR_ROLE = "apimvault secret rotator"
VAULT_ROTATOR_ACTIONS = (
    "Microsoft.KeyVault/vaults/secrets/getSecret/action, .../setSecret/action and .../update/action"
)


class SharedSubscriptionError(RotationError):
    """Another secret's ``ProviderAddress`` tag names the same APIM subscription: rotating one would
    revoke the key the other holds. One secret per APIM subscription."""


@dataclasses.dataclass(frozen=True)
class RotationResult:
    """What a rotation did. Never holds a key: versions and the new key's fingerprint only.

    ``credential_id`` is the slot the latest version holds afterwards (the new one; for a skipped
    rotation, the current one). ``regenerated`` names the APIM key that was regenerated.
    ``propagation_seconds`` is how long the gateways took to accept the regenerated key (measured from
    the regeneration to the last unit's first acceptance; ``None`` when nothing was regenerated).
    ``verified_version`` is the latest version after the final check (it holds a live key of the slot
    its tag names); ``repaired_versions`` lists versions this run wrote to repair the vault.
    """

    skipped: bool
    reason: str
    old_version: str | None
    new_version: str | None
    credential_id: str
    fingerprint: str | None
    secret: str = ""
    regenerated: str | None = None
    expires_on: str | None = None
    propagation_seconds: float | None = None
    verified_version: str | None = None
    repaired_versions: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["repaired_versions"] = list(self.repaired_versions)
        return data


@dataclasses.dataclass(frozen=True)
class RotationPlan:
    """What :func:`rotate` would do now (read-only; shown before asking for confirmation)."""

    vault_url: str
    secret_name: str
    current_version: str
    current_fingerprint: str
    credential_id: str
    regenerate: str
    apim_subscription: str
    arm_endpoint: str
    validity_days: int | None
    current_expires_on: str | None
    gateway_urls: tuple[str, ...] = ()
    propagation_timeout: float = DEFAULT_PROPAGATION_TIMEOUT
    credential_id_inferred: bool = False
    probe_successes: int = 1
    probe_interval: float = 0.0
    shared_checked: bool = False
    token_scope: str | None = None

    def describe(self) -> list[str]:
        expiry = f"expiring in {self.validity_days} days (ValidityPeriodDays)"
        tag_note = (
            " (no tag: inferred from listSecrets; the rotation writes it)"
            if self.credential_id_inferred
            else ""
        )
        lines = [
            f"secret       {self.vault_url}/secrets/{self.secret_name}",
            f"current      version {self.current_version} (CredentialId={self.credential_id}{tag_note}, "
            f"fingerprint {self.current_fingerprint}, expires {self.current_expires_on or 'never'})",
            f"regenerate   the {self.regenerate} key of {self.apim_subscription}",
            f"             via {self.arm_endpoint}",
        ]
        for url in self.gateway_urls:
            lines.append(
                f"wait         until {url} accepts it (probe: GET {url}{PROBE_PATH}, no tokens"
                + (f", key plus a bearer token for {self.token_scope}; " if self.token_scope else "; ")
                + f"{self.probe_successes} consecutive 2xx {self.probe_interval:g} s apart; at most "
                f"{self.propagation_timeout:g} s)"
            )
        lines += [
            f"store        it as a new version tagged CredentialId={self.regenerate}, {expiry}",
            "shared       "
            + (
                "no other secret of the vault names this APIM subscription"
                if self.shared_checked
                else "not checked (the identity may not list the vault's secrets): keep one secret per "
                "APIM subscription"
            ),
            f"keep         the {self.credential_id} key valid (clients using it keep working; the next "
            "rotation regenerates it)",
        ]
        return lines

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LatestCheck:
    """Whether the vault's latest version is live: ``live`` when ``listSecrets`` shows its value as the key
    of the slot its ``CredentialId`` names, ``accepted`` per gateway URL (``None``: no answer)."""

    secret: str
    version: str
    credential_id: str
    fingerprint: str
    live: bool
    accepted: dict[str, bool | None]

    @property
    def ok(self) -> bool:
        return self.live and all(self.accepted.values())

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}


@dataclasses.dataclass
class Current:
    """A version as the rotation read it."""

    value: str
    version: str
    tags: dict[str, str]
    content_type: str | None
    expires_on: dt.datetime | None

    def __repr__(self) -> str:  # never the key
        return f"Current(version={self.version!r}, fingerprint={fingerprint(self.value)!r})"


# ------------------------------------------------------------------------------------ tag helpers


def other_slot(slot: str) -> str:
    return "secondary" if slot == "primary" else "primary"


def parse_slot(tag: str | None, where: str) -> str:
    value = (tag or "").strip().lower()
    if value not in SLOTS:
        raise RotationError(
            f"{where} has CredentialId={tag!r}; it must be 'primary' or 'secondary' (which APIM key the "
            "latest version holds). Set the tag on the current version and retry."
        )
    return value


def flip_tag(tag: str) -> str:
    """The other slot, written in the tag's own style (``primary`` -> ``secondary``, ``Primary`` ->
    ``Secondary``)."""
    other = "secondary" if tag.strip().lower() == "primary" else "primary"
    if tag.strip()[:1].isupper():
        other = other.capitalize()
    if tag.strip().isupper():
        other = other.upper()
    return other


def styled(slot: str, like: str | None) -> str:
    """``slot`` written in the style of the existing tag value (``primary``, ``Primary``, ``PRIMARY``)."""
    like = (like or "").strip()
    if like.isupper():
        return slot.upper()
    if like[:1].isupper():
        return slot.capitalize()
    return slot


def validity_days(tags: Mapping[str, str], where: str) -> int | None:
    raw = tags.get(TAG_VALIDITY_DAYS)
    if raw is None or not str(raw).strip():
        return None
    try:
        days = int(str(raw).strip())
    except ValueError:
        raise RotationError(f"{where} has {TAG_VALIDITY_DAYS}={raw!r}; it must be a number of days") from None
    if not MIN_VALIDITY_DAYS <= days <= 3650:
        raise RotationError(
            f"{where} has {TAG_VALIDITY_DAYS}={days}; it must be between {MIN_VALIDITY_DAYS} and 3650: "
            f"Key Vault sends SecretNearExpiry {NEAR_EXPIRY_DAYS} days before expiry, so a version valid "
            f"for {NEAR_EXPIRY_DAYS} days or less would be born near expiry and rotate again at once. "
            "Nothing was changed"
        )
    return days


def holder(value: str, keys: Mapping[str, str]) -> str | None:
    """The slot whose current key ``value`` is, or None."""
    return next((slot for slot in SLOTS if value and keys[slot] == value), None)


def utc_now(now: dt.datetime | float | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if isinstance(now, int | float):
        return dt.datetime.fromtimestamp(float(now), dt.UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)


def iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None
