"""Microsoft's two-credential rotation for an APIM subscription key kept in Key Vault (protocols.md F).

The secret's versions alternate between the subscription's two keys; its ``CredentialId`` tag says which
one the latest version holds. A rotation

1. reads the latest version (value, ``CredentialId``, ``ProviderAddress``, ``ValidityPeriodDays``),
2. checks with ``listSecrets`` that the stored value really is the key the tag names (so the key in use
   is never the one regenerated),
3. regenerates the *other* key (``regeneratePrimaryKey`` / ``regenerateSecondaryKey``) and reads it back,
4. writes it as a new secret version with ``CredentialId`` flipped, the other tags and the content type
   kept, and ``expires = now + ValidityPeriodDays``.

The key the clients use stays valid throughout: it is revoked only by the *next* rotation, by which time
the vault has served its successor for a whole rotation period. Idempotent with Event Grid: given the
version a ``SecretNearExpiry`` event names, a rotation whose secret has moved on is skipped.

Needs the ``rotation`` extra (``azure-mgmt-apimanagement``). The identity needs ``Key Vault Secrets
Officer`` on the secret (read + write) and ``API Management Service Contributor`` (or a role with
``Microsoft.ApiManagement/service/subscriptions/regenerate*`` and ``listSecrets``) on the subscription.
Nothing here logs, returns or raises with a key: only versions and fingerprints.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import _telemetry  # issue 14
from ._key import fingerprint
from .exceptions import (
    AccessDeniedError,
    ConfigurationError,
    CredentialError,
    RotationError,
    SecretNotFoundError,
)

if TYPE_CHECKING:  # pragma: no cover
    from azure.core.credentials import TokenCredential

__all__ = [
    "DEFAULT_ARM_ENDPOINT",
    "ApimSubscriptionRef",
    "RotationError",
    "RotationPlan",
    "RotationResult",
    "parse_apim_subscription_id",
    "plan_rotation",
    "rotate",
    "rotate_from_event",
]

log = logging.getLogger("apimvault.rotation")

DEFAULT_ARM_ENDPOINT = "https://management.azure.com"
ENV_ARM_ENDPOINT = "APIMVAULT_ARM_ENDPOINT"
ENV_APIM_SUBSCRIPTION_ID = "APIMVAULT_APIM_SUBSCRIPTION_ID"
TAG_CREDENTIAL_ID = "CredentialId"
TAG_PROVIDER_ADDRESS = "ProviderAddress"
TAG_VALIDITY_DAYS = "ValidityPeriodDays"
NEAR_EXPIRY = "Microsoft.KeyVault.SecretNearExpiry"
EXPIRED = "Microsoft.KeyVault.SecretExpired"
# Rotating on SecretNewVersionCreated would rotate again on the version the rotation itself wrote.
ROTATING_EVENTS = frozenset({NEAR_EXPIRY, EXPIRED})

# Sovereign clouds: the ARM token audience follows the endpoint. Anything else (public cloud, local
# stacks, proxies) uses the public audience, as azure-mgmt does by default.
_ARM_SCOPES = {
    "management.chinacloudapi.cn": "https://management.chinacloudapi.cn/.default",
    "management.usgovcloudapi.net": "https://management.usgovcloudapi.net/.default",
}

_APIM_SUB_ID = re.compile(
    r"^/subscriptions/(?P<arm>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.ApiManagement/"
    r"service/(?P<svc>[^/]+)/subscriptions/(?P<sid>[^/]+)/?$",
    re.IGNORECASE,
)
_SLOTS = ("primary", "secondary")


@dataclasses.dataclass(frozen=True)
class ApimSubscriptionRef:
    """The parts of an APIM subscription's ARM resource id."""

    arm_subscription: str
    resource_group: str
    service: str
    sid: str

    @property
    def resource_id(self) -> str:
        return (
            f"/subscriptions/{self.arm_subscription}/resourceGroups/{self.resource_group}/providers/"
            f"Microsoft.ApiManagement/service/{self.service}/subscriptions/{self.sid}"
        )

    def same_as(self, other: ApimSubscriptionRef) -> bool:
        return self.resource_id.lower() == other.resource_id.lower()


def parse_apim_subscription_id(resource_id: str) -> ApimSubscriptionRef:
    """Split ``/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.ApiManagement/service/{svc}/
    subscriptions/{sid}``; raise :class:`ConfigurationError` for anything else."""
    match = _APIM_SUB_ID.match(resource_id.strip()) if isinstance(resource_id, str) else None
    if match is None:
        raise ConfigurationError(
            f"{resource_id!r} is not an APIM subscription resource id "
            "(/subscriptions/<id>/resourceGroups/<rg>/providers/Microsoft.ApiManagement/service/<name>/"
            "subscriptions/<sid>)"
        )
    return ApimSubscriptionRef(match["arm"], match["rg"], match["svc"], match["sid"])


@dataclasses.dataclass(frozen=True)
class RotationResult:
    """What a rotation did. Never holds a key: versions and the new key's fingerprint only.

    ``credential_id`` is the slot the latest version holds afterwards (the new one; for a skipped
    rotation, the current one). ``regenerated`` names the APIM key that was regenerated.
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

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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

    def describe(self) -> list[str]:
        expiry = (
            f"expiring in {self.validity_days} days (ValidityPeriodDays)"
            if self.validity_days is not None
            else "without an expiry (no ValidityPeriodDays tag)"
        )
        return [
            f"secret       {self.vault_url}/secrets/{self.secret_name}",
            f"current      version {self.current_version} (CredentialId={self.credential_id}, "
            f"fingerprint {self.current_fingerprint}, expires {self.current_expires_on or 'never'})",
            f"regenerate   the {self.regenerate} key of {self.apim_subscription}",
            f"             via {self.arm_endpoint}",
            f"store        it as a new version tagged CredentialId={self.regenerate}, {expiry}",
            f"keep         the {self.credential_id} key valid (clients using it keep working; the next "
            "rotation regenerates it)",
        ]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------- helpers


def _slot(tag: str | None, where: str) -> str:
    value = (tag or "").strip().lower()
    if value not in _SLOTS:
        raise RotationError(
            f"{where} has CredentialId={tag!r}; it must be 'primary' or 'secondary' (which APIM key the "
            "latest version holds). Set the tag on the current version and retry."
        )
    return value


def _flip_tag(tag: str) -> str:
    """The other slot, written in the tag's own style (``primary`` -> ``secondary``, ``Primary`` ->
    ``Secondary``)."""
    other = "secondary" if tag.strip().lower() == "primary" else "primary"
    if tag.strip()[:1].isupper():
        other = other.capitalize()
    if tag.strip().isupper():
        other = other.upper()
    return other


def _validity_days(tags: Mapping[str, str], where: str) -> int | None:
    raw = tags.get(TAG_VALIDITY_DAYS)
    if raw is None or not str(raw).strip():
        return None
    try:
        days = int(str(raw).strip())
    except ValueError:
        raise RotationError(f"{where} has {TAG_VALIDITY_DAYS}={raw!r}; it must be a number of days") from None
    if not 1 <= days <= 3650:
        raise RotationError(f"{where} has {TAG_VALIDITY_DAYS}={days}; it must be between 1 and 3650")
    return days


def _now(now: dt.datetime | float | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if isinstance(now, int | float):
        return dt.datetime.fromtimestamp(float(now), dt.UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


def _arm_endpoint(arm_endpoint: str | None) -> str:
    endpoint = (arm_endpoint or os.environ.get(ENV_ARM_ENDPOINT) or DEFAULT_ARM_ENDPOINT).strip().rstrip("/")
    parts = urlsplit(endpoint)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigurationError(f"ARM endpoint {endpoint!r} must be an https URL")
    return endpoint


def _kv_error(exc: BaseException, *, where: str, writing: bool) -> BaseException:
    """Typed apimvault error for a Key Vault failure during rotation (the rotation needs read + write)."""
    from azure.core.exceptions import HttpResponseError

    from ._fetch import map_error

    if writing and isinstance(exc, HttpResponseError) and exc.status_code == 403:
        return AccessDeniedError(
            f"the identity may not write {where} (403). A rotation needs the 'Key Vault Secrets Officer' "
            f"role on the secret (scope '<vault resource id>/secrets/{where.rsplit('/', 1)[-1]}') "
            "or the vault",
            secret=where,
        )
    mapped = map_error(exc, where=where)
    if isinstance(mapped, AccessDeniedError):
        return AccessDeniedError(
            str(mapped).replace("'Key Vault Secrets User'", "'Key Vault Secrets Officer'")
            + " (a rotation also writes the secret, so it needs Secrets Officer)",
            secret=where,
        )
    return mapped if mapped is not None else exc


def _arm_error(exc: BaseException, *, what: str, ref: ApimSubscriptionRef) -> BaseException:
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )

    if isinstance(exc, ResourceNotFoundError):
        return RotationError(
            f"{what}: APIM subscription {ref.resource_id} was not found (404); check "
            f"{ENV_APIM_SUBSCRIPTION_ID} or the secret's {TAG_PROVIDER_ADDRESS} tag"
        )
    if isinstance(exc, HttpResponseError) and exc.status_code == 403:
        return RotationError(
            f"{what}: the identity may not manage {ref.resource_id} (403). Grant it 'API Management "
            f"Service Contributor' (or a role with subscriptions/regenerate*/action and listSecrets) on "
            f"scope '/subscriptions/{ref.arm_subscription}/resourceGroups/{ref.resource_group}/providers/"
            f"Microsoft.ApiManagement/service/{ref.service}'"
        )
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return RotationError(f"{what}: ARM unreachable ({type(exc).__name__}: {exc})", permanent=False)
    if isinstance(exc, ClientAuthenticationError) and not isinstance(exc, HttpResponseError):
        return CredentialError(f"{what}: no token for Azure Resource Manager: {exc.message}")
    if isinstance(exc, HttpResponseError):
        code = getattr(getattr(exc, "error", None), "code", None) or ""
        return RotationError(
            f"{what}: ARM answered {exc.status_code} {code}".rstrip(),
            permanent=(exc.status_code or 0) < 500 and exc.status_code not in (408, 429),
        )
    return exc


class _Session:
    """The SDK clients of one rotation (and the credential, if we created it)."""

    def __init__(
        self, vault_url: str, arm_endpoint: str, credential: TokenCredential | None, arm_subscription: str
    ) -> None:
        from azure.keyvault.secrets import SecretClient

        from ._base import DEFAULT_CLIENT_KWARGS

        self._owned: list[Any] = []
        if credential is None:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
            self._owned.append(credential)
        self.credential = credential
        self.arm_endpoint = arm_endpoint
        self.secrets = SecretClient(vault_url, credential, **DEFAULT_CLIENT_KWARGS)
        self._owned.insert(0, self.secrets)
        self._arm: Any = None
        self._arm_subscription = arm_subscription

    def arm(self, arm_subscription: str) -> Any:
        if self._arm is None or arm_subscription != self._arm_subscription:
            try:
                from azure.mgmt.apimanagement import ApiManagementClient
            except ImportError:  # pragma: no cover - depends on the installed extras
                raise ConfigurationError(
                    "rotation needs azure-mgmt-apimanagement: pip install 'apimvault[rotation]'"
                ) from None
            host = (urlsplit(self.arm_endpoint).hostname or "").lower()
            kwargs: dict[str, Any] = {"retry_total": 2, "connection_timeout": 10, "read_timeout": 30}
            if host in _ARM_SCOPES:
                kwargs["credential_scopes"] = [_ARM_SCOPES[host]]
            self._arm = ApiManagementClient(
                self.credential, arm_subscription, base_url=self.arm_endpoint, **kwargs
            )
            self._owned.append(self._arm)
            self._arm_subscription = arm_subscription
        return self._arm

    def close(self) -> None:
        for resource in self._owned:
            try:
                resource.close()
            except Exception:  # pragma: no cover - closing is best effort
                log.debug("closing %r failed", resource, exc_info=True)


@dataclasses.dataclass
class _Current:
    value: str
    version: str
    tags: dict[str, str]
    content_type: str | None
    expires_on: dt.datetime | None


def _read_current(session: _Session, secret_name: str, where: str) -> _Current:
    try:
        secret = session.secrets.get_secret(secret_name)
    except Exception as exc:
        raise _kv_error(exc, where=where, writing=False) from exc
    props = secret.properties
    if secret.value is None or props.version is None:
        raise SecretNotFoundError(f"{where} has no current value", secret=where)
    return _Current(
        value=secret.value.strip(" \t\r\n"),
        version=props.version,
        tags=dict(props.tags or {}),
        content_type=props.content_type,
        expires_on=props.expires_on,
    )


def _resolve_target(
    current: _Current, apim_subscription_id: str | None, where: str
) -> tuple[ApimSubscriptionRef, str, int | None]:
    slot = _slot(current.tags.get(TAG_CREDENTIAL_ID), where)
    tagged = current.tags.get(TAG_PROVIDER_ADDRESS)
    given = apim_subscription_id or None
    if not given and not tagged:
        raise ConfigurationError(
            f"which APIM subscription does {where} belong to? Set {ENV_APIM_SUBSCRIPTION_ID} (the CLI) or "
            f"pass apim_subscription_id, or tag the secret {TAG_PROVIDER_ADDRESS}=<subscription resource id>"
        )
    ref = parse_apim_subscription_id(given or tagged or "")
    if given and tagged:
        try:
            tag_ref = parse_apim_subscription_id(tagged)
        except ConfigurationError:
            tag_ref = None
        if tag_ref is None or not tag_ref.same_as(ref):
            raise RotationError(
                f"{where} is tagged {TAG_PROVIDER_ADDRESS}={tagged!r} but the rotation is configured for "
                f"{ref.resource_id}; refusing to regenerate a key of a subscription the secret does not hold"
            )
    return ref, slot, _validity_days(current.tags, where)


def _list_keys(session: _Session, ref: ApimSubscriptionRef, what: str) -> dict[str, str]:
    try:
        keys = session.arm(ref.arm_subscription).subscription.list_secrets(
            ref.resource_group, ref.service, ref.sid
        )
    except Exception as exc:
        raise _arm_error(exc, what=what, ref=ref) from exc
    return {"primary": keys.primary_key or "", "secondary": keys.secondary_key or ""}


def _check_in_use(
    current: _Current, slot: str, keys: Mapping[str, str], ref: ApimSubscriptionRef, where: str
) -> None:
    """Refuse unless the stored value is the key the tag names (so we never regenerate the key in use)."""
    if keys[slot] == current.value:
        return
    other = "secondary" if slot == "primary" else "primary"
    if keys[other] == current.value:
        raise RotationError(
            f"{where} version {current.version} is tagged CredentialId={slot} but holds the {other} key of "
            f"{ref.resource_id}; regenerating the {other} key would revoke the key in use. Fix the tag "
            f"(CredentialId={other}) and retry"
        )
    raise RotationError(
        f"{where} version {current.version} (fingerprint {fingerprint(current.value)}) holds neither key of "
        f"{ref.resource_id}: the key was already regenerated elsewhere, or the secret belongs to another "
        "subscription. Store the current key by hand (az keyvault secret set ... --tags CredentialId=...) "
        "and rotate again"
    )


# ------------------------------------------------------------------------------------------------ API


def plan_rotation(
    *,
    vault_url: str,
    secret_name: str,
    apim_subscription_id: str | None = None,
    arm_endpoint: str | None = None,
    credential: TokenCredential | None = None,
) -> RotationPlan:
    """Read the secret and describe what :func:`rotate` would do, changing nothing."""
    from ._fetch import validate_secret_name, validate_vault_url

    vault_url = validate_vault_url(vault_url)
    secret_name = validate_secret_name(secret_name)
    endpoint = _arm_endpoint(arm_endpoint)
    where = f"{vault_url}/secrets/{secret_name}"
    session = _Session(vault_url, endpoint, credential, "")
    try:
        current = _read_current(session, secret_name, where)
        ref, slot, days = _resolve_target(current, apim_subscription_id, where)
    finally:
        session.close()
    return RotationPlan(
        vault_url=vault_url,
        secret_name=secret_name,
        current_version=current.version,
        current_fingerprint=fingerprint(current.value),
        credential_id=slot,
        regenerate="secondary" if slot == "primary" else "primary",
        apim_subscription=ref.resource_id,
        arm_endpoint=endpoint,
        validity_days=days,
        current_expires_on=_iso(current.expires_on),
    )


def rotate(
    *,
    vault_url: str,
    secret_name: str,
    apim_subscription_id: str | None,
    arm_endpoint: str | None = None,
    credential: TokenCredential | None = None,
    now: dt.datetime | float | None = None,
    expected_version: str | None = None,
) -> RotationResult:
    """Rotate the APIM subscription key held in ``secret_name`` (protocols.md F).

    Args:
        vault_url / secret_name: the secret whose versions alternate between the two keys.
        apim_subscription_id: the APIM subscription's ARM resource id (the CLI and the rotation function
            pass ``APIMVAULT_APIM_SUBSCRIPTION_ID``); ``None`` uses the secret's ``ProviderAddress`` tag.
            When both are present they must name the same subscription.
        arm_endpoint: Azure Resource Manager (``APIMVAULT_ARM_ENDPOINT``, default
            ``https://management.azure.com``).
        credential: any ``TokenCredential``; ``None`` means ``DefaultAzureCredential()``. It needs Key
            Vault Secrets Officer on the secret and APIM subscription key management rights.
        now: the instant the new expiry is computed from (default: the current UTC time).
        expected_version: rotate only if the latest version is this one (Event Grid idempotency);
            otherwise return a skipped result.

    Raises the typed errors of :mod:`apimvault.exceptions` (``AccessDeniedError`` names the role),
    :class:`ConfigurationError` for bad input and :class:`RotationError` when rotating would be unsafe or
    ARM refused.
    """
    from ._fetch import validate_secret_name, validate_vault_url, validate_version

    vault_url = validate_vault_url(vault_url)
    secret_name = validate_secret_name(secret_name)
    expected = validate_version(expected_version)
    endpoint = _arm_endpoint(arm_endpoint)
    where = f"{vault_url}/secrets/{secret_name}"
    start = _now(now)
    session = _Session(vault_url, endpoint, credential, "")
    try:
        current = _read_current(session, secret_name, where)
        if expected is not None and current.version.lower() != expected:
            log.info(
                "rotation of %s skipped: version %s is no longer the latest (%s)",
                where,
                expected,
                current.version,
            )
            _telemetry.rotation_counted("skipped", where)  # issue 14
            return RotationResult(
                skipped=True,
                reason=f"version {expected} is no longer the latest ({current.version}): already rotated",
                old_version=expected,
                new_version=None,
                credential_id=(current.tags.get(TAG_CREDENTIAL_ID) or "").strip().lower(),
                fingerprint=fingerprint(current.value),
                secret=where,
            )
        ref, slot, days = _resolve_target(current, apim_subscription_id, where)
        other = "secondary" if slot == "primary" else "primary"

        before = _list_keys(session, ref, "listSecrets before regenerating")
        _check_in_use(current, slot, before, ref, where)

        arm = session.arm(ref.arm_subscription)
        regenerate = (
            arm.subscription.regenerate_secondary_key
            if other == "secondary"
            else arm.subscription.regenerate_primary_key
        )
        try:
            regenerate(ref.resource_group, ref.service, ref.sid)
        except Exception as exc:
            raise _arm_error(exc, what=f"regenerate the {other} key", ref=ref) from exc
        log.info("rotation of %s: regenerated the %s key of %s", where, other, ref.resource_id)

        after = _list_keys(session, ref, f"listSecrets after regenerating the {other} key")
        new_value = after[other]
        if not new_value or new_value == before[other]:
            raise RotationError(
                f"ARM did not return a new {other} key for {ref.resource_id} after regenerating it",
                permanent=False,
            )
        if after[slot] != before[slot]:
            raise RotationError(
                f"the {slot} key of {ref.resource_id} changed during the rotation (another rotation "
                f"running?); {where} still holds version {current.version}. Check the subscription's keys "
                "before retrying",
                permanent=False,
            )

        # A concurrent rotation that wrote meanwhile would make our version the latest with a key that its
        # own regeneration may already have revoked: re-read just before writing.
        latest = _read_current(session, secret_name, where)
        if latest.version != current.version:
            raise RotationError(
                f"{where} moved from version {current.version} to {latest.version} during the rotation "
                "(another rotation running?); not writing",
                permanent=False,
            )

        tags = dict(current.tags)
        tags[TAG_CREDENTIAL_ID] = _flip_tag(current.tags.get(TAG_CREDENTIAL_ID) or slot)
        if TAG_PROVIDER_ADDRESS not in tags:
            tags[TAG_PROVIDER_ADDRESS] = ref.resource_id
        expires = start + dt.timedelta(days=days) if days is not None else None
        try:
            written = session.secrets.set_secret(
                secret_name,
                new_value,
                content_type=current.content_type,
                tags=tags,
                expires_on=expires,
                enabled=True,
            )
        except Exception as exc:
            raise _kv_error(exc, where=where, writing=True) from exc
        new_version = written.properties.version
        log.info(
            "rotated %s: version %s -> %s (CredentialId=%s, fingerprint %s)",
            where,
            current.version,
            new_version,
            tags[TAG_CREDENTIAL_ID],
            fingerprint(new_value),
        )
        _telemetry.rotation_counted("rotated", where)  # issue 14
        return RotationResult(
            skipped=False,
            reason="rotated",
            old_version=current.version,
            new_version=new_version,
            credential_id=other,
            fingerprint=fingerprint(new_value),
            secret=where,
            regenerated=other,
            expires_on=_iso(expires),
        )
    except BaseException:  # issue 14
        _telemetry.rotation_counted("failed", where)  # issue 14
        raise  # issue 14
    finally:
        session.close()


def _event_vault_url(event: Any, configured: str | None) -> str:
    """The vault an event is about; must agree with ``AZURE_KEYVAULT_URL`` when that is set."""
    from ._fetch import validate_vault_url

    from_id = None
    if event.secret_id:
        parts = urlsplit(event.secret_id)
        if parts.scheme == "https" and parts.hostname:
            from_id = f"https://{parts.netloc}"
    if configured:
        url = validate_vault_url(configured)
        host = (urlsplit(url).hostname or "").lower()
        same = (from_id is not None and urlsplit(from_id).netloc.lower() == urlsplit(url).netloc.lower()) or (
            host.split(".", 1)[0] == event.vault_name.lower()
        )
        if not same:
            raise RotationError(
                f"event is about vault {event.vault_name!r} ({event.secret_id or 'no id'}), not the "
                f"configured {url}; refusing"
            )
        return url
    if from_id is not None:
        return validate_vault_url(from_id)
    return validate_vault_url(f"https://{event.vault_name}.vault.azure.net")


def rotate_from_event(
    event: Mapping[str, Any] | list[Any] | str | bytes,
    *,
    credential: TokenCredential | None = None,
    arm_endpoint: str | None = None,
    apim_subscription_id: str | None = None,
) -> RotationResult:
    """Rotate on a Key Vault ``SecretNearExpiry`` (or ``SecretExpired``) event, idempotently.

    ``event`` is an Event Grid or CloudEvents payload (dict, list, JSON text). The rotation happens only
    if the event's version is still the latest; otherwise the result is ``skipped`` ("already rotated").
    The vault is ``AZURE_KEYVAULT_URL`` when set (the event must be about that vault), else the one the
    event's ``Id`` names. ``SecretNewVersionCreated`` is refused: rotating on it would rotate again on the
    version the rotation writes.
    """
    from ._events import parse_secret_events

    events = parse_secret_events(event)
    if not events:
        raise ConfigurationError("the payload holds no Key Vault secret event")
    wanted = [e for e in events if e.event_type in ROTATING_EVENTS]
    if not wanted:
        kinds = ", ".join(sorted({e.event_type for e in events}))
        raise ConfigurationError(
            f"{kinds} does not trigger a rotation (only SecretNearExpiry / SecretExpired do; rotating on "
            "SecretNewVersionCreated would loop)"
        )
    configured = os.environ.get("AZURE_KEYVAULT_URL", "").strip() or None
    results: list[RotationResult] = []
    for item in wanted:
        if not item.version:
            raise ConfigurationError(f"{item.event_type} event for {item.secret_name} has no Version")
        results.append(
            rotate(
                vault_url=_event_vault_url(item, configured),
                secret_name=item.secret_name,
                apim_subscription_id=apim_subscription_id,
                arm_endpoint=arm_endpoint,
                credential=credential,
                expected_version=item.version,
            )
        )
    done = [r for r in results if not r.skipped]
    return done[0] if done else results[-1]
