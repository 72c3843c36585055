"""Two-credential rotation of an APIM subscription key kept in Key Vault (Learn: tutorial-rotation-dual).

The secret's versions alternate between the subscription's two keys; its ``CredentialId`` tag says which
one the latest version holds. A rotation

1. reads the latest version (value, ``CredentialId``, ``ProviderAddress``, ``ValidityPeriodDays``).
   Without ``ValidityPeriodDays`` it refuses: the new version would get no expiry, so no
   ``SecretNearExpiry`` would ever fire again and rotation would silently stop. Without ``CredentialId``
   it asks ``listSecrets`` which key the stored value is and writes the tag on that version;
2. checks with ``listSecrets`` that the stored value really is the key the tag names (so the key in use
   is never the one regenerated);
3. regenerates the *other* key (``regeneratePrimaryKey`` / ``regenerateSecondaryKey``) and reads it back;
4. **make-before-break**: APIM gateways pick a regenerated key up asynchronously, each unit (region,
   self-hosted gateway) on its own, refusing it until then. So the rotation probes every configured
   gateway URL with the new key until each accepts it, polling with back-off for at most
   ``propagation_timeout`` seconds. The probe is ``GET <gateway>/openai/v1/models`` with the key in the
   subscription-key header: the gateway authenticates it like any call of the API, and listing models
   costs no tokens. Any answer other than APIM's key 401 means "accepted"; the key itself is never logged;
5. only then writes it as a new secret version with ``CredentialId`` flipped, the other tags and the
   content type kept, and ``expires = now + ValidityPeriodDays``;
6. verifies that the vault's latest version holds a live key of the slot its tag names, and repairs it
   when not: it writes the live value of that slot as a new version, again only once the gateway
   accepts it.

The key the clients use stays valid throughout: it is revoked only by the *next* rotation, by which time
the vault has served its successor for a whole rotation period. If the gateways do not accept the new key
in time, :class:`RotationError` says so and that the vault was not changed: the current key still works.

Overlap. Event Grid delivers at least once and re-delivers an event it got no answer for within 30 s, so
runs for the same secret can overlap; a run may also meet a rotation started by hand. Step 6 runs after
every rotation, after every skip (an event whose version is no longer the latest) and whenever a run sees
that another one changed the vault or the keys under it, so any number of overlapping runs end with the
vault's latest version holding a key the gateway accepts, tagged with its slot. Serialising the runs (the
rotation function in ``infra/rotation_function`` holds a blob lease per secret) keeps clients from ever
seeing the short-lived state that step 6 repairs.

Needs the ``rotation`` extra (``azure-mgmt-apimanagement``). The identity needs ``Key Vault Secrets
Officer`` on the secret (read + write) and, on the APIM subscription, the four-action custom role that
``infra/modules/apim.bicep`` defines (``apimvault APIM subscription key rotator``:
``Microsoft.ApiManagement/service/subscriptions/read``, ``.../listSecrets/action``,
``.../regeneratePrimaryKey/action``, ``.../regenerateSecondaryKey/action``).
Nothing here logs, returns or raises with a key: only versions and fingerprints.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

from . import _telemetry
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
    "GatewayProbe",
    "LatestCheck",
    "RotationError",
    "RotationPlan",
    "RotationResult",
    "check_latest",
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
TAG_PENDING = "RotationPending"
"""Set on the current version while its successor waits for the gateways: ``<slot>:<fingerprint>``."""
ENV_GATEWAY_URLS = "APIMVAULT_GATEWAY_URLS"
ENV_PROPAGATION_TIMEOUT = "APIMVAULT_PROPAGATION_TIMEOUT"
DEFAULT_PROPAGATION_TIMEOUT = 600.0
"""Seconds to wait for the gateways to accept a regenerated key (a Microsoft Q&A answer reports up to 10
minutes; Microsoft Q&A question 5922487 reports up to 10)."""
PROBE_PATH = "/openai/v1/models"
ROTATOR_ROLE = "apimvault APIM subscription key rotator"
_ROTATOR_ACTIONS = (
    "Microsoft.ApiManagement/service/subscriptions/read, .../listSecrets/action, "
    ".../regeneratePrimaryKey/action and .../regenerateSecondaryKey/action"
)
_MAX_SETTLE_ROUNDS = 24
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
                f"wait         until {url} accepts it (probe: GET {url}{PROBE_PATH}, no tokens; at most "
                f"{self.propagation_timeout:g} s)"
            )
        lines += [
            f"store        it as a new version tagged CredentialId={self.regenerate}, {expiry}",
            f"keep         the {self.credential_id} key valid (clients using it keep working; the next "
            "rotation regenerates it)",
        ]
        return lines

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


def _raise_from(mapped: BaseException, exc: BaseException) -> NoReturn:
    """Raise ``mapped`` caused by ``exc``; an error no mapper knows is re-raised as is (not its own cause)."""
    if mapped is exc:
        raise exc
    raise mapped from exc


def _kv_error(exc: BaseException, *, where: str, writing: bool) -> BaseException:
    """Typed apimvault error for a Key Vault failure during rotation (the rotation needs read + write)."""
    from azure.core.exceptions import HttpResponseError

    from ._vault_errors import map_error

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
            f"{what}: the identity may not manage {ref.resource_id} (403). Assign it the custom role "
            f"'{ROTATOR_ROLE}' that infra/modules/apim.bicep defines ({_ROTATOR_ACTIONS}) on scope "
            f"'{ref.resource_id}'"
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
        _raise_from(_kv_error(exc, where=where, writing=False), exc)
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
) -> tuple[ApimSubscriptionRef, str | None, int]:
    """The APIM subscription, the tagged slot (``None`` without a ``CredentialId`` tag) and the validity."""
    raw_slot = current.tags.get(TAG_CREDENTIAL_ID)
    slot = _slot(raw_slot, where) if raw_slot is not None and raw_slot.strip() else None
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
    days = _validity_days(current.tags, where)
    if days is None:
        raise RotationError(
            f"{where} version {current.version} has no {TAG_VALIDITY_DAYS} tag: a rotation would write a "
            "version without an expiry, after which no SecretNearExpiry event fires and rotation silently "
            f"stops. Nothing was changed. Tag the current version, e.g. {TAG_VALIDITY_DAYS}=60 (az keyvault "
            "secret set-attributes --id <version id> --tags ... replaces all tags: repeat the others), "
            "and rotate again"
        )
    return ref, slot, days


def _list_keys(session: _Session, ref: ApimSubscriptionRef, what: str) -> dict[str, str]:
    try:
        keys = session.arm(ref.arm_subscription).subscription.list_secrets(
            ref.resource_group, ref.service, ref.sid
        )
    except Exception as exc:
        _raise_from(_arm_error(exc, what=what, ref=ref), exc)
    return {"primary": keys.primary_key or "", "secondary": keys.secondary_key or ""}


def _holder(value: str, keys: Mapping[str, str]) -> str | None:
    """The slot whose current key ``value`` is, or None."""
    return next((slot for slot in _SLOTS if value and keys[slot] == value), None)


def _check_in_use(
    current: _Current, slot: str, keys: Mapping[str, str], ref: ApimSubscriptionRef, where: str
) -> str | None:
    """None if the stored value is the key the tag names (so we never regenerate the key in use), else
    why not."""
    if keys[slot] == current.value:
        return None
    other = "secondary" if slot == "primary" else "primary"
    if keys[other] == current.value:
        return (
            f"{where} version {current.version} is tagged CredentialId={slot} but holds the {other} key of "
            f"{ref.resource_id}; regenerating the {other} key would revoke the key in use"
        )
    return (
        f"{where} version {current.version} (fingerprint {fingerprint(current.value)}) holds neither key of "
        f"{ref.resource_id}: the key was regenerated elsewhere"
    )


# --------------------------------------------------------------------------------- gateway probing


def _gateway_urls(given: Sequence[str] | str | None) -> tuple[str, ...]:
    """The gateway URLs to probe: ``given``, else ``APIMVAULT_GATEWAY_URLS`` (space or comma separated),
    else ``AZURE_OPENAI_ENDPOINT``. Each must be https."""
    if isinstance(given, str):
        given = [given]
    raw: list[str] = list(given or [])
    if not raw:
        env = os.environ.get(ENV_GATEWAY_URLS, "") or os.environ.get("AZURE_OPENAI_ENDPOINT", "")
        raw = [u for u in re.split(r"[\s,]+", env) if u]
    if not raw:
        raise ConfigurationError(
            "a rotation waits until the APIM gateway accepts the new key before storing it: set "
            f"{ENV_GATEWAY_URLS} (every gateway unit's URL, e.g. 'https://<apim>.azure-api.net "
            "https://<apim>-westeurope-01.regional.azure-api.net') or AZURE_OPENAI_ENDPOINT, or pass "
            "gateway_urls"
        )
    urls: list[str] = []
    for url in raw:
        url = url.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
            raise ConfigurationError(f"gateway URL {url!r} must be an https URL without query")
        if url not in urls:
            urls.append(url)
    return tuple(urls)


def _propagation_timeout(value: float | None) -> float:
    if value is None:
        raw = os.environ.get(ENV_PROPAGATION_TIMEOUT, "").strip()
        if not raw:
            return DEFAULT_PROPAGATION_TIMEOUT
        try:
            value = float(raw)
        except ValueError:
            raise ConfigurationError(
                f"{ENV_PROPAGATION_TIMEOUT}={raw!r} is not a number of seconds"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
        raise ConfigurationError(f"propagation timeout {value!r} must be a number of seconds in (0, 86400]")
    return float(value)


class GatewayProbe:
    """Asks each gateway URL whether it accepts a key: ``GET <url>/openai/v1/models`` with the key in
    ``header_name``. The gateway authenticates the call like any call of the API; listing models costs no
    tokens. APIM's key 401 (``WWW-Authenticate: AzureApiManagementKey`` or its "subscription key" body)
    means "not (yet) accepted"; any other answer means accepted. Connection errors and 5xx are "unknown"
    and retried. TLS is verified as by any httpx2 client; the key is sent to nothing but these URLs.
    """

    def __init__(self, urls: Sequence[str], *, header_name: str | None = None, timeout: float = 10.0) -> None:
        import httpx2

        from ._base import DEFAULT_HEADER, ENV_HEADER, check_header_name

        self.urls = tuple(urls)
        self.header_name = check_header_name(
            header_name or os.environ.get(ENV_HEADER, "").strip() or DEFAULT_HEADER
        )
        self._client = httpx2.Client(timeout=timeout, follow_redirects=False)

    def describe(self) -> list[str]:
        return [f"GET {url}{PROBE_PATH} with {self.header_name}: <new key>" for url in self.urls]

    def accepts(self, url: str, key: str) -> bool | None:
        """True (accepted), False (APIM refused the key) or None (no answer we can judge)."""
        import httpx2

        from ._auth import is_apim_key_rejection

        try:
            response = self._client.get(f"{url}{PROBE_PATH}", headers={self.header_name: key})
        except httpx2.HTTPError as exc:
            log.info("gateway probe of %s: no answer (%s)", url, type(exc).__name__)
            return None
        if response.status_code == 401:
            return not is_apim_key_rejection(response.status_code, response.headers, response.content)
        if response.status_code >= 500:
            log.info("gateway probe of %s: %s", url, response.status_code)
            return None
        return True

    def close(self) -> None:
        self._client.close()


class _Concurrent(Exception):
    """Another rotation changed the vault or the keys under this one: settle instead of going on."""


@dataclasses.dataclass
class _Run:
    """One rotation's context: clients, probe, time sources and the step hook."""

    session: _Session
    probe: GatewayProbe
    secret_name: str
    where: str
    apim_subscription_id: str | None
    timeout: float
    clock: Callable[[], float]
    sleep: Callable[[float], None]
    on_step: Callable[[str], None] | None
    now: dt.datetime

    def step(self, name: str) -> None:
        if self.on_step is not None:
            self.on_step(name)

    def wait_accepted(self, value: str, slot: str, ref: ApimSubscriptionRef, started: float) -> float:
        """Poll every gateway until each accepts ``value``; the seconds since ``started`` when the last
        one did. Raises :class:`_Concurrent` if the key is regenerated meanwhile and
        :class:`RotationError` on timeout."""
        deadline = started + self.timeout
        waiting = list(self.probe.urls)
        delay, done_at = 0.5, started
        unknown: dict[str, str] = {}
        while True:
            self.step("probe")
            for url in list(waiting):
                verdict = self.probe.accepts(url, value)
                if verdict:
                    waiting.remove(url)
                    done_at = self.clock()
                    unknown.pop(url, None)
                elif verdict is None:
                    unknown[url] = "no answer"
            if not waiting:
                return max(0.0, done_at - started)
            now = self.clock()
            if now >= deadline:
                still = ", ".join(f"{u} ({unknown.get(u, 'refused')})" for u in waiting)
                raise RotationError(
                    f"the gateway did not accept the new {slot} key of {ref.resource_id} within "
                    f"{self.timeout:g} s: {still}. The vault was NOT changed ({self.where} still holds its "
                    "latest version) and the key in use still works. The gateway may still be syncing: "
                    "rotate again later (the next attempt waits for this same key, named by the "
                    f"{TAG_PENDING} tag, instead of regenerating it; or raise --propagation-timeout), or "
                    "check the gateway URLs",
                    permanent=False,
                )
            self.sleep(min(delay, max(0.0, deadline - now)))
            delay = min(delay * 1.5, 15.0)
            # Before probing again: was the key regenerated once more meanwhile (another rotation)?
            if _list_keys(self.session, ref, "listSecrets while waiting for the gateway")[slot] != value:
                raise _Concurrent(f"the {slot} key was regenerated again while waiting for the gateway")

    def settle(self) -> tuple[_Current, list[str]]:
        """Step 6: make the latest version hold a live key of the slot its tag names; the versions written
        to get there."""
        repaired: list[str] = []
        for _ in range(_MAX_SETTLE_ROUNDS):
            self.step("verify")
            latest = _read_current(self.session, self.secret_name, self.where)
            ref, slot, days = _resolve_target(latest, self.apim_subscription_id, self.where)
            keys = _list_keys(self.session, ref, "listSecrets to verify the vault")
            holder = _holder(latest.value, keys)
            if slot is not None and holder == slot:
                return latest, repaired
            target = holder or slot
            if target is None:
                raise RotationError(
                    f"{self.where} version {latest.version} has no {TAG_CREDENTIAL_ID} tag and holds "
                    f"neither key of {ref.resource_id}; store the current key by hand (az keyvault secret "
                    f"set ... --tags {TAG_CREDENTIAL_ID}=primary|secondary ...) and rotate again"
                )
            value = keys[target]
            log.warning(
                "%s version %s (CredentialId=%s, fingerprint %s) is not the live %s key; repairing",
                self.where,
                latest.version,
                slot,
                fingerprint(latest.value),
                target,
            )
            try:
                self.wait_accepted(value, target, ref, self.clock())
            except _Concurrent:
                continue
            self.step("repair")
            if _read_current(self.session, self.secret_name, self.where).version != latest.version:
                continue  # someone wrote meanwhile: verify that version instead
            tags = dict(latest.tags)
            tags.pop(TAG_PENDING, None)
            tags[TAG_CREDENTIAL_ID] = _styled(target, latest.tags.get(TAG_CREDENTIAL_ID))
            tags.setdefault(TAG_PROVIDER_ADDRESS, ref.resource_id)
            version = self.write(value, latest, tags, days)
            log.warning(
                "repaired %s: version %s holds the live %s key (fingerprint %s)",
                self.where,
                version,
                target,
                fingerprint(value),
            )
            repaired.append(version)
        raise RotationError(
            f"{self.where} did not settle on a live key after {_MAX_SETTLE_ROUNDS} rounds (rotations still "
            "running?); run `apimvault rotate` again once they are done",
            permanent=False,
        )

    def write(self, value: str, like: _Current, tags: dict[str, str], days: int) -> str:
        expires = self.now + dt.timedelta(days=days)
        try:
            written = self.session.secrets.set_secret(
                self.secret_name,
                value,
                content_type=like.content_type,
                tags=tags,
                expires_on=expires,
                enabled=True,
            )
        except Exception as exc:
            _raise_from(_kv_error(exc, where=self.where, writing=True), exc)
        return str(written.properties.version)


def _styled(slot: str, like: str | None) -> str:
    """``slot`` written in the style of the existing tag value (``primary``, ``Primary``, ``PRIMARY``)."""
    like = (like or "").strip()
    if like.isupper():
        return slot.upper()
    if like[:1].isupper():
        return slot.capitalize()
    return slot


# ------------------------------------------------------------------------------------------------ API


def plan_rotation(
    *,
    vault_url: str,
    secret_name: str,
    apim_subscription_id: str | None = None,
    arm_endpoint: str | None = None,
    credential: TokenCredential | None = None,
    gateway_urls: Sequence[str] | str | None = None,
    propagation_timeout: float | None = None,
) -> RotationPlan:
    """Read the secret and describe what :func:`rotate` would do, changing nothing.

    Raises what :func:`rotate` would raise before changing anything (missing ``ValidityPeriodDays``, no
    gateway URL, ...). Without a ``CredentialId`` tag it asks ``listSecrets`` which key the value is.
    """
    from ._validation import validate_secret_name, validate_vault_url

    vault_url = validate_vault_url(vault_url)
    secret_name = validate_secret_name(secret_name)
    endpoint = _arm_endpoint(arm_endpoint)
    urls = _gateway_urls(gateway_urls)
    timeout = _propagation_timeout(propagation_timeout)
    where = f"{vault_url}/secrets/{secret_name}"
    session = _Session(vault_url, endpoint, credential, "")
    try:
        current = _read_current(session, secret_name, where)
        ref, slot, days = _resolve_target(current, apim_subscription_id, where)
        inferred = slot is None
        if slot is None:
            slot = _holder(current.value, _list_keys(session, ref, "listSecrets to infer CredentialId"))
            if slot is None:
                raise RotationError(
                    f"{where} version {current.version} has no {TAG_CREDENTIAL_ID} tag and holds neither "
                    f"key of {ref.resource_id}; store the current key with the tag and rotate again"
                )
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
        gateway_urls=urls,
        propagation_timeout=timeout,
        credential_id_inferred=inferred,
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
    gateway_urls: Sequence[str] | str | None = None,
    propagation_timeout: float | None = None,
    header_name: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_step: Callable[[str], None] | None = None,
) -> RotationResult:
    """Rotate the APIM subscription key held in ``secret_name`` (the dual-credential pattern, see the module).

    Args:
        vault_url / secret_name: the secret whose versions alternate between the two keys.
        apim_subscription_id: the APIM subscription's ARM resource id (the CLI and the rotation function
            pass ``APIMVAULT_APIM_SUBSCRIPTION_ID``); ``None`` uses the secret's ``ProviderAddress`` tag.
            When both are present they must name the same subscription.
        arm_endpoint: Azure Resource Manager (``APIMVAULT_ARM_ENDPOINT``, default
            ``https://management.azure.com``).
        credential: any ``TokenCredential``; ``None`` means ``DefaultAzureCredential()``. It needs Key
            Vault Secrets Officer on the secret and the custom role ``infra/`` defines on the subscription.
        now: the instant the new expiry is computed from (default: the current UTC time).
        expected_version: rotate only if the latest version is this one (Event Grid idempotency);
            otherwise verify the latest version (and repair it if needed) and return a skipped result.
        gateway_urls: every gateway unit's URL to probe before storing the new key (default
            ``APIMVAULT_GATEWAY_URLS``, else ``AZURE_OPENAI_ENDPOINT``).
        propagation_timeout: seconds to wait for the gateways to accept the new key (default
            ``APIMVAULT_PROPAGATION_TIMEOUT`` or 600).
        header_name: the header the gateway reads the key from (default ``APIMVAULT_HEADER_NAME`` or
            ``Ocp-Apim-Subscription-Key``).
        clock / sleep: the monotonic time source and the wait between probes (tests inject both).
        on_step: called with the name of each step before it runs (``read``, ``check``, ``regenerate``,
            ``probe``, ``write``, ``verify``, ``repair``); tests use it to force interleavings.

    Raises the typed errors of :mod:`apimvault.exceptions` (``AccessDeniedError`` names the role),
    :class:`ConfigurationError` for bad input and :class:`RotationError` when rotating would be unsafe,
    ARM refused, or the gateways did not accept the new key in time (then the vault was not changed).
    """
    from ._validation import validate_secret_name, validate_vault_url, validate_version

    vault_url = validate_vault_url(vault_url)
    secret_name = validate_secret_name(secret_name)
    expected = validate_version(expected_version)
    endpoint = _arm_endpoint(arm_endpoint)
    urls = _gateway_urls(gateway_urls)
    timeout = _propagation_timeout(propagation_timeout)
    where = f"{vault_url}/secrets/{secret_name}"
    session = _Session(vault_url, endpoint, credential, "")
    probe = GatewayProbe(urls, header_name=header_name)
    run = _Run(
        session,
        probe,
        secret_name,
        where,
        apim_subscription_id,
        timeout,
        clock,
        sleep,
        on_step,
        _now(now),
    )
    try:
        result = _rotate(run, expected)
    except BaseException:
        _telemetry.rotation_counted("failed", where)
        raise
    finally:
        probe.close()
        session.close()
    _telemetry.rotation_counted("skipped" if result.skipped else "rotated", where)
    return result


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


def check_latest(
    *,
    vault_url: str,
    secret_name: str,
    apim_subscription_id: str | None = None,
    arm_endpoint: str | None = None,
    credential: TokenCredential | None = None,
    gateway_urls: Sequence[str] | str | None = None,
    header_name: str | None = None,
) -> LatestCheck:
    """Check, changing nothing, that the latest version holds a live key of the slot its tag names and
    that every gateway accepts it (one probe each, see :class:`GatewayProbe`)."""
    from ._validation import validate_secret_name, validate_vault_url

    vault_url = validate_vault_url(vault_url)
    secret_name = validate_secret_name(secret_name)
    endpoint = _arm_endpoint(arm_endpoint)
    urls = _gateway_urls(gateway_urls)
    where = f"{vault_url}/secrets/{secret_name}"
    session = _Session(vault_url, endpoint, credential, "")
    probe = GatewayProbe(urls, header_name=header_name)
    try:
        latest = _read_current(session, secret_name, where)
        ref, slot, _ = _resolve_target(latest, apim_subscription_id, where)
        keys = _list_keys(session, ref, "listSecrets to check the vault")
        live = slot is not None and keys[slot] == latest.value
        accepted = {url: probe.accepts(url, latest.value) for url in urls}
    finally:
        probe.close()
        session.close()
    return LatestCheck(where, latest.version, slot or "", fingerprint(latest.value), live, accepted)


def _settled(run: _Run, reason: str, old_version: str | None) -> RotationResult:
    """A result for a run that did not rotate, after verifying (and, if needed, repairing) the vault."""
    latest, repaired = run.settle()
    slot = (latest.tags.get(TAG_CREDENTIAL_ID) or "").strip().lower()
    if repaired:
        reason = f"{reason}; repaired the vault: version {', '.join(repaired)} holds the live {slot} key"
    log.info("rotation of %s skipped: %s", run.where, reason)
    return RotationResult(
        skipped=True,
        reason=reason,
        old_version=old_version,
        new_version=None,
        credential_id=slot,
        fingerprint=fingerprint(latest.value),
        secret=run.where,
        verified_version=latest.version,
        repaired_versions=tuple(repaired),
    )


def _rotate(run: _Run, expected: str | None) -> RotationResult:
    session, where, secret_name = run.session, run.where, run.secret_name
    run.step("read")
    current = _read_current(session, secret_name, where)
    if expected is not None and current.version.lower() != expected:
        return _settled(
            run, f"version {expected} is no longer the latest ({current.version}): already rotated", expected
        )
    ref, tagged_slot, days = _resolve_target(current, run.apim_subscription_id, where)

    run.step("check")
    before = _list_keys(session, ref, "listSecrets before regenerating")
    slot = tagged_slot
    if slot is None:
        slot = _holder(current.value, before)
        if slot is None:
            raise RotationError(
                f"{where} version {current.version} has no {TAG_CREDENTIAL_ID} tag and holds neither key of "
                f"{ref.resource_id}; store the current key with the tag (az keyvault secret set ... --tags "
                f"{TAG_CREDENTIAL_ID}=primary|secondary ...) and rotate again"
            )
        current.tags[TAG_CREDENTIAL_ID] = slot
        try:
            session.secrets.update_secret_properties(secret_name, current.version, tags=current.tags)
        except Exception as exc:
            _raise_from(_kv_error(exc, where=where, writing=True), exc)
        log.info("%s version %s had no %s tag: set it to %s", where, current.version, TAG_CREDENTIAL_ID, slot)
    problem = _check_in_use(current, slot, before, ref, where)
    if problem is not None:
        if _read_current(session, secret_name, where).version != current.version:
            return _settled(run, "another rotation wrote a new version meanwhile", current.version)
        result = _settled(run, problem, current.version)
        raise RotationError(
            f"{problem}. Nothing was regenerated. "
            + (
                f"The vault was repaired: version {result.verified_version} holds the live "
                f"{result.credential_id} key; rotate again"
                if result.repaired_versions
                else "Fix the tag and rotate again"
            )
        )
    other = "secondary" if slot == "primary" else "primary"

    # A run that started after another one wrote must not regenerate: re-read just before.
    run.step("regenerate")
    if _read_current(session, secret_name, where).version != current.version:
        return _settled(run, "another rotation wrote a new version meanwhile", current.version)
    started = run.clock()
    # An earlier attempt that timed out waiting for the gateways left the key it regenerated named in
    # RotationPending: wait for that key again instead of regenerating it (which would restart the
    # gateways' sync, so a gateway slower than one attempt would never get there).
    pending_slot, _, pending_fp = (current.tags.get(TAG_PENDING) or "").partition(":")
    resumed = pending_slot == other and bool(before[other]) and fingerprint(before[other]) == pending_fp
    if resumed:
        new_value = before[other]
        log.info(
            "rotation of %s: resuming with the %s key an earlier attempt regenerated (fingerprint %s)",
            where,
            other,
            pending_fp,
        )
    else:
        arm = session.arm(ref.arm_subscription)
        regenerate = (
            arm.subscription.regenerate_secondary_key
            if other == "secondary"
            else arm.subscription.regenerate_primary_key
        )
        try:
            regenerate(ref.resource_group, ref.service, ref.sid)
        except Exception as exc:
            _raise_from(_arm_error(exc, what=f"regenerate the {other} key", ref=ref), exc)
        log.info("rotation of %s: regenerated the %s key of %s", where, other, ref.resource_id)

        after = _list_keys(session, ref, f"listSecrets after regenerating the {other} key")
        new_value = after[other]
        if not new_value or new_value == before[other]:
            raise RotationError(
                f"ARM did not return a new {other} key for {ref.resource_id} after regenerating it",
                permanent=False,
            )
        if after[slot] != before[slot]:
            return _settled(
                run, f"the {slot} key changed during the rotation (another rotation)", current.version
            )
        # Name the regenerated key (its fingerprint) on the current version, so that a retry after a
        # timeout resumes the wait instead of regenerating again. The value is not changed.
        pending_tags = {**current.tags, TAG_PENDING: f"{other}:{fingerprint(new_value)}"}
        try:
            session.secrets.update_secret_properties(secret_name, current.version, tags=pending_tags)
        except Exception as exc:  # best effort (e.g. the 15-tag limit): a retry then regenerates again
            log.warning(
                "%s: could not tag the pending key on version %s (%s)",
                where,
                current.version,
                type(exc).__name__,
            )

    # Make before break: the vault gets the new key only once every gateway unit accepts it.
    try:
        propagation = run.wait_accepted(new_value, other, ref, started)
    except _Concurrent as exc:
        return _settled(run, f"{exc} (another rotation)", current.version)
    log.info("rotation of %s: the gateway accepted the new %s key after %.1f s", where, other, propagation)

    # A concurrent rotation that wrote meanwhile would make our version the latest with a key that its
    # own regeneration may already have revoked: re-read just before writing.
    run.step("write")
    latest = _read_current(session, secret_name, where)
    if latest.version != current.version:
        return _settled(run, f"another rotation wrote version {latest.version} meanwhile", current.version)

    tags = dict(current.tags)
    tags.pop(TAG_PENDING, None)
    tags[TAG_CREDENTIAL_ID] = _flip_tag(current.tags.get(TAG_CREDENTIAL_ID) or slot)
    tags.setdefault(TAG_PROVIDER_ADDRESS, ref.resource_id)
    new_version = run.write(new_value, current, tags, days)
    log.info(
        "rotated %s: version %s -> %s (CredentialId=%s, fingerprint %s, gateway propagation %.1f s)",
        where,
        current.version,
        new_version,
        tags[TAG_CREDENTIAL_ID],
        fingerprint(new_value),
        propagation,
    )
    verified, repaired = run.settle()
    return RotationResult(
        skipped=False,
        reason=(
            "rotated" + (" (resumed the wait for the key an earlier attempt regenerated)" if resumed else "")
        )
        + (f"; repaired the vault afterwards ({', '.join(repaired)})" if repaired else ""),
        old_version=current.version,
        new_version=new_version,
        credential_id=(verified.tags.get(TAG_CREDENTIAL_ID) or other).strip().lower(),
        fingerprint=fingerprint(new_value),
        secret=where,
        regenerated=other,
        expires_on=_iso(run.now + dt.timedelta(days=days)),
        propagation_seconds=round(propagation, 3),
        verified_version=verified.version,
        repaired_versions=tuple(repaired),
    )


def _event_vault_url(event: Any, configured: str | None) -> str:
    """The vault an event is about; must agree with ``AZURE_KEYVAULT_URL`` when that is set."""
    from ._validation import validate_vault_url

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
    gateway_urls: Sequence[str] | str | None = None,
    propagation_timeout: float | None = None,
    header_name: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_step: Callable[[str], None] | None = None,
) -> RotationResult:
    """Rotate on a Key Vault ``SecretNearExpiry`` (or ``SecretExpired``) event, idempotently.

    ``event`` is an Event Grid or CloudEvents payload (dict, list, JSON text). The rotation happens only
    if the event's version is still the latest; otherwise the result is ``skipped`` ("already rotated")
    after the latest version was verified live (and repaired if it was not). The other arguments are
    :func:`rotate`'s.
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
                gateway_urls=gateway_urls,
                propagation_timeout=propagation_timeout,
                header_name=header_name,
                clock=clock,
                sleep=sleep,
                on_step=on_step,
            )
        )
    done = [r for r in results if not r.skipped]
    return done[0] if done else results[-1]
