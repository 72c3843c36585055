"""The rotation's Azure I/O: the Key Vault and ARM clients of one run, and their errors mapped to
apimvault's typed errors (naming the role a 403 needs). Never logs or raises with a key."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

from .._key import fingerprint
from ..exceptions import (
    AccessDeniedError,
    ConfigurationError,
    CredentialError,
    RotationError,
    SecretNotFoundError,
)
from .config import ENV_APIM_SUBSCRIPTION_ID
from .model import (
    ROTATOR_ACTIONS,
    ROTATOR_ROLE,
    TAG_CREDENTIAL_ID,
    TAG_PROVIDER_ADDRESS,
    TAG_VALIDITY_DAYS,
    VAULT_ROTATOR_ACTIONS,
    VAULT_ROTATOR_ROLE,
    Current,
    SharedSubscriptionError,
    other_slot,
    parse_slot,
    validity_days,
)
from .ref import ApimSubscriptionRef, parse_apim_subscription_id

if TYPE_CHECKING:  # pragma: no cover
    from azure.core.credentials import TokenCredential

log = logging.getLogger("apimvault.rotation")

# Sovereign clouds: the ARM token audience follows the endpoint. Anything else (public cloud, local
# stacks, proxies) uses the public audience, as azure-mgmt does by default.
_ARM_SCOPES = {
    "management.chinacloudapi.cn": "https://management.chinacloudapi.cn/.default",
    "management.usgovcloudapi.net": "https://management.usgovcloudapi.net/.default",
}


def raise_from(mapped: BaseException, exc: BaseException) -> NoReturn:
    """Raise ``mapped`` caused by ``exc``; an error no mapper knows is re-raised as is (not its own cause)."""
    if mapped is exc:
        raise exc
    raise mapped from exc


def kv_error(exc: BaseException, *, where: str, writing: bool | str) -> BaseException:
    """Typed apimvault error for a Key Vault failure during rotation (the rotation needs read + write)."""
    from azure.core.exceptions import HttpResponseError

    from .._vault_errors import map_error

    if writing and isinstance(exc, HttpResponseError) and exc.status_code == 403:
        return AccessDeniedError(
            f"the identity may not {writing if isinstance(writing, str) else 'write'} {where} (403). A "
            f"rotation needs the data actions {VAULT_ROTATOR_ACTIONS} on the secret: the custom role "
            f"'{VAULT_ROTATOR_ROLE}' infra/modules/secret.bicep defines (or 'Key Vault Secrets Officer') "
            f"on scope '<vault resource id>/secrets/{where.rsplit('/', 1)[-1]}'",
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


def arm_error(exc: BaseException, *, what: str, ref: ApimSubscriptionRef) -> BaseException:
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
            f"'{ROTATOR_ROLE}' that infra/modules/apim.bicep defines ({ROTATOR_ACTIONS}) on scope "
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


def bounded_credential(**kwargs: Any) -> Any:
    """``DefaultAzureCredential`` bounded as the providers bound theirs: connection and read timeouts and few
    retries on the identity endpoint (instead of azure-core's 300 s read timeout and up to 10 retries), and a
    deadline for each whole token request (:func:`apimvault._vaultclient.token_deadline`, 30 s with the
    defaults), so an endpoint that trickles its answer cannot hold a rotation. Closing it closes the
    ``DefaultAzureCredential`` inside."""
    from azure.identity import DefaultAzureCredential

    from .._settings import DEFAULT_CREDENTIAL_KWARGS
    from .._vaultclient import DeadlineCredential, token_deadline

    class OwnedDeadlineCredential(DeadlineCredential):
        def close(self) -> None:
            inner.close()

    bounds = {**DEFAULT_CREDENTIAL_KWARGS, **kwargs}
    inner = DefaultAzureCredential(**bounds)
    return OwnedDeadlineCredential(inner, token_deadline(bounds))


class Session:
    """The SDK clients of one rotation (and the credential, if we created it)."""

    def __init__(self, vault_url: str, arm_endpoint: str, credential: TokenCredential | None) -> None:
        from azure.keyvault.secrets import SecretClient

        from .._settings import DEFAULT_CLIENT_KWARGS

        self._owned: list[Any] = []
        if credential is None:
            credential = bounded_credential()
            self._owned.append(credential)
        self.credential = credential
        self.arm_endpoint = arm_endpoint
        self.secrets = SecretClient(vault_url, credential, **DEFAULT_CLIENT_KWARGS)
        self._owned.insert(0, self.secrets)
        self._arm: Any = None
        self._arm_subscription = ""

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

    # ------------------------------------------------------------------------------------ Key Vault

    def read_current(self, secret_name: str, where: str) -> Current:
        try:
            secret = self.secrets.get_secret(secret_name)
        except Exception as exc:
            raise_from(kv_error(exc, where=where, writing=False), exc)
        props = secret.properties
        if secret.value is None or props.version is None:
            raise SecretNotFoundError(f"{where} has no current value", secret=where)
        return Current(
            value=secret.value.strip(" \t\r\n"),
            version=props.version,
            tags=dict(props.tags or {}),
            content_type=props.content_type,
            expires_on=props.expires_on,
        )

    def update_tags(
        self, secret_name: str, version: str, tags: dict[str, str], where: str, what: str
    ) -> None:
        """Write ``tags`` on a version (``Microsoft.KeyVault/vaults/secrets/update/action``)."""
        try:
            self.secrets.update_secret_properties(secret_name, version, tags=tags)
        except Exception as exc:
            raise_from(kv_error(exc, where=where, writing=what), exc)

    def secrets_naming(self, ref: ApimSubscriptionRef, secret_name: str) -> list[str] | None:
        """Names of the vault's other secrets whose ``ProviderAddress`` tag names ``ref``; ``None`` when
        the identity may not list the vault's secrets (``readMetadata`` at vault scope)."""
        from azure.core.exceptions import HttpResponseError

        found: list[str] = []
        try:
            for props in self.secrets.list_properties_of_secrets():
                tagged = (props.tags or {}).get(TAG_PROVIDER_ADDRESS) or ""
                if props.name == secret_name or not tagged.strip():
                    continue
                try:
                    same = parse_apim_subscription_id(tagged).same_as(ref)
                except ConfigurationError:
                    continue
                if same and props.name:
                    found.append(props.name)
        except HttpResponseError as exc:
            if exc.status_code == 403:
                log.info(
                    "may not list the secrets of the vault: a second secret on %s is not checked", ref.sid
                )
                return None
            raise_from(kv_error(exc, where=self.secrets.vault_url, writing=False), exc)
        return found

    # ------------------------------------------------------------------------------------------ ARM

    def list_keys(self, ref: ApimSubscriptionRef, what: str) -> dict[str, str]:
        try:
            keys = self.arm(ref.arm_subscription).subscription.list_secrets(
                ref.resource_group, ref.service, ref.sid
            )
        except Exception as exc:
            raise_from(arm_error(exc, what=what, ref=ref), exc)
        return {"primary": keys.primary_key or "", "secondary": keys.secondary_key or ""}

    def regenerate(self, ref: ApimSubscriptionRef, slot: str) -> None:
        arm = self.arm(ref.arm_subscription)
        regenerate = (
            arm.subscription.regenerate_secondary_key
            if slot == "secondary"
            else arm.subscription.regenerate_primary_key
        )
        try:
            regenerate(ref.resource_group, ref.service, ref.sid)
        except Exception as exc:
            raise_from(arm_error(exc, what=f"regenerate the {slot} key", ref=ref), exc)


def resolve_target(
    current: Current, apim_subscription_id: str | None, where: str
) -> tuple[ApimSubscriptionRef, str | None, int]:
    """The APIM subscription, the tagged slot (``None`` without a ``CredentialId`` tag) and the validity."""
    raw_slot = current.tags.get(TAG_CREDENTIAL_ID)
    slot = parse_slot(raw_slot, where) if raw_slot is not None and raw_slot.strip() else None
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
    days = validity_days(current.tags, where)
    if days is None:
        raise RotationError(
            f"{where} version {current.version} has no {TAG_VALIDITY_DAYS} tag: a rotation would write a "
            "version without an expiry, after which no SecretNearExpiry event fires and rotation silently "
            f"stops. Nothing was changed. Tag the current version, e.g. {TAG_VALIDITY_DAYS}=60 (az keyvault "
            "secret set-attributes --id <version id> --tags ... replaces all tags: repeat the others), "
            "and rotate again"
        )
    return ref, slot, days


def refuse_shared(found: list[str] | None, ref: ApimSubscriptionRef, where: str) -> None:
    """Raise :class:`SharedSubscriptionError` when another secret names the same APIM subscription."""
    if found:
        raise SharedSubscriptionError(
            f"{', '.join(sorted(found))} in the same vault also hold{'s' if len(found) == 1 else ''} keys of "
            f"{ref.resource_id} ({TAG_PROVIDER_ADDRESS} tag): rotating {where} would revoke the key "
            "they hold, which would then be refused until their own rotation. Keep one secret per APIM "
            "subscription (give each application its own subscription). Nothing was changed"
        )


def check_in_use(
    current: Current, slot: str, keys: Mapping[str, str], ref: ApimSubscriptionRef, where: str
) -> str | None:
    """None if the stored value is the key the tag names (so we never regenerate the key in use), else
    why not."""
    if keys[slot] == current.value:
        return None
    other = other_slot(slot)
    if keys[other] == current.value:
        return (
            f"{where} version {current.version} is tagged CredentialId={slot} but holds the {other} key of "
            f"{ref.resource_id}; regenerating the {other} key would revoke the key in use"
        )
    return (
        f"{where} version {current.version} (fingerprint {fingerprint(current.value)}) holds neither key of "
        f"{ref.resource_id}: the key was regenerated elsewhere"
    )
