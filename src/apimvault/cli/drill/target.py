"""What the drill runs against: the endpoints, and the local stack's fault switches and counters."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from ..config import env_var, is_loopback_url, require, rotator_client_id, vault_url_variable

if TYPE_CHECKING:  # pragma: no cover
    from .config import DrillConfig


class StackFaults:
    """Fault injection and counters of a local stack: in-process, or over its admin API."""

    def __init__(self, azure: Any = None, admin: Any = None) -> None:
        self.azure = azure
        self.admin = admin

    def inject(self, service: str, kind: str, **fields: Any) -> None:
        if self.azure is not None:
            self.azure.services[service].faults.inject(kind, **fields)
        else:
            self.admin.add_fault(service, kind, **fields)

    def clear(self, service: str) -> None:
        if self.azure is not None:
            self.azure.services[service].faults.clear()
        else:
            self.admin.clear_faults(service)

    def propagation(self) -> dict[str, dict[str, float]]:
        """Each gateway unit's propagation delay (``{"min": s, "max": s}``)."""
        if self.azure is not None:
            return dict(self.azure.apim_state.propagation())
        return dict(self.admin.propagation())

    def set_propagation(self, delay: float | tuple[float, float], unit: str | None = None) -> None:
        """Set one unit's (or every unit's) propagation delay: seconds, or a ``(min, max)`` random range."""
        if self.azure is not None:
            self.azure.apim_state.set_propagation(delay, unit)
        else:
            self.admin.set_propagation(delay, unit=unit)

    def counters(self, service: str) -> tuple[dict[str, int], dict[str, int]]:
        if self.azure is not None:
            svc = self.azure.services[service]
            return svc.counters.snapshot(), svc.counters.labels()
        data = self.admin.counters(service)
        return dict(data.get("operations", {})), dict(data.get("labels", {}))

    def identity_roles(self, client_id: str) -> tuple[str | None, list[dict[str, str]]]:
        """The local identity with ``client_id`` (its name, ``None`` if the stack has none) and the roles
        assigned to it (``{"role", "scope"}``)."""
        wanted = client_id.lower()
        if self.azure is not None:
            found = next((i for i in self.azure.identity.identities if i.client_id.lower() == wanted), None)
            if found is None:
                return None, []
            held = self.azure.rbac.assignments(found)
            return str(found.name), [{"role": a.role, "scope": a.scope} for a in held]
        ident = next((i for i in self.admin.identities() if i["client_id"].lower() == wanted), None)
        if ident is None:
            return None, []
        assigned = [a for a in self.admin.assignments() if a["principalId"] == ident["object_id"]]
        return str(ident["name"]), [{"role": a["roleName"], "scope": a["scope"]} for a in assigned]

    def close(self) -> None:
        if self.admin is not None:
            self.admin.close()


@dataclasses.dataclass
class Target:
    vault_url: str
    secret_name: str
    gateway_url: str
    deployment: str
    apim_subscription_id: str | None
    arm_endpoint: str | None
    rotator_client_id: str | None
    label: str
    loopback: bool
    faults: StackFaults | None
    gateway_urls: tuple[str, ...] = ()
    """Every gateway unit's URL (probed by the rotation; the clients are spread over them)."""

    @property
    def client_urls(self) -> tuple[str, ...]:
        return self.gateway_urls or (self.gateway_url,)


def external_target(config: DrillConfig) -> Target:
    """The endpoints ``AZURE_KEYVAULT_URL`` and the library's variables name (with a local stack's admin API
    when ``APIMVAULT_ADMIN_URL`` is set and every endpoint is loopback)."""

    vault_var = vault_url_variable()
    vault_url = env_var(vault_var)
    secret_name = env_var("APIMVAULT_SECRET_NAME")
    gateway = env_var("AZURE_OPENAI_ENDPOINT")
    deployment = config.deployment or env_var("APIMVAULT_DEPLOYMENT")
    require(
        (
            ("APIMVAULT_SECRET_NAME", secret_name),
            ("AZURE_OPENAI_ENDPOINT", gateway),
            ("APIMVAULT_DEPLOYMENT (or --deployment)", deployment),
            ("OPENAI_API_VERSION", env_var("OPENAI_API_VERSION")),
        ),
        context=f"{vault_var} is set, so the drill targets it; also ",
    )
    assert vault_url and secret_name and gateway and deployment
    arm = env_var("APIMVAULT_ARM_ENDPOINT")
    loopback = all(is_loopback_url(u) for u in (vault_url, gateway, arm))
    faults = None
    admin_url = env_var("APIMVAULT_ADMIN_URL")
    if admin_url and loopback and env_var("SSL_CERT_FILE"):
        from ...local.admin import AdminClient

        faults = StackFaults(admin=AdminClient(admin_url, os.environ["SSL_CERT_FILE"]))
    urls = tuple(u.rstrip("/") for u in (env_var("APIMVAULT_GATEWAY_URLS") or "").replace(",", " ").split())
    return Target(
        gateway_urls=urls,
        vault_url=vault_url,
        secret_name=secret_name,
        gateway_url=gateway,
        deployment=deployment,
        apim_subscription_id=env_var("APIMVAULT_APIM_SUBSCRIPTION_ID"),
        arm_endpoint=arm,
        rotator_client_id=rotator_client_id(config.client_id),
        label=f"{vault_url} (secret {secret_name}) via {gateway}",
        loopback=loopback,
        faults=faults,
    )
