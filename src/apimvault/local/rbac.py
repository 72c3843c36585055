"""Azure RBAC of the local stack: role definitions (built-in and infra's custom roles) and role assignments.

Both planes authorize through one :class:`Rbac`:

* the local Key Vault checks a role's **data actions** (``Microsoft.KeyVault/vaults/secrets/getSecret/action``
  ...) and answers 403 ``Forbidden`` / innererror ``ForbiddenByRbac`` as the real vault does;
* the local ARM plane checks a role's **actions** (``Microsoft.ApiManagement/service/subscriptions/
  listSecrets/action`` ...) and answers 403 ``AuthorizationFailed`` with ARM's message, naming the action,
  the client and the scope.

Matching follows Azure RBAC (Learn, "Understand Azure role definitions"): an action matches a permission
case-insensitively, ``*`` matching any run of characters; ``notActions`` / ``notDataActions`` subtract; an
assignment at scope ``S`` applies to ``S`` and everything under it (``S/...``).

The rotator's custom roles come from ``infra/roles/rotator.json``, the file ``infra/modules/secret.bicep``
and ``infra/modules/apim.bicep`` load with ``loadJsonContent``: what the deployment grants and what the
local stack enforces are one list (:func:`load_infra_roles`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._tokens import Identity

ROLES_FILE_NAME = "rotator.json"
# Where the file lives in a source checkout (editable install) and where a wheel carries a copy of it.
_REPO_ROLES_FILE = Path(__file__).resolve().parents[3] / "infra" / "roles" / ROLES_FILE_NAME

KV_SECRETS = "Microsoft.KeyVault/vaults/secrets/"
APIM_SUBSCRIPTIONS = "Microsoft.ApiManagement/service/subscriptions/"

# Built-in roles as Azure defines them (Learn, "Azure built-in roles": Security and Integration sections).
SECRETS_USER = "Key Vault Secrets User"
SECRETS_OFFICER = "Key Vault Secrets Officer"
KEY_VAULT_ADMINISTRATOR = "Key Vault Administrator"
APIM_SERVICE_CONTRIBUTOR = "API Management Service Contributor"

# Keys of the custom roles in infra/roles/rotator.json.
SECRET_ROTATOR_KEY = "keyVaultSecretRotator"  # noqa: S105 - a JSON key, not a secret
APIM_ROTATOR_KEY = "apimSubscriptionKeyRotator"


class RoleError(ValueError):
    """An unknown role, a malformed role definition or a bad scope."""


@dataclasses.dataclass(frozen=True)
class RoleDefinition:
    """One role: its name and the control-plane ``actions`` and data-plane ``data_actions`` it grants."""

    name: str
    actions: tuple[str, ...] = ()
    not_actions: tuple[str, ...] = ()
    data_actions: tuple[str, ...] = ()
    not_data_actions: tuple[str, ...] = ()
    role_definition_id: str | None = None
    custom: bool = False

    def allows(self, action: str, *, data: bool) -> bool:
        """Whether this role grants ``action`` (a data action when ``data``, else a control-plane action)."""
        granted, denied = (
            (self.data_actions, self.not_data_actions) if data else (self.actions, self.not_actions)
        )
        return any(_matches(p, action) for p in granted) and not any(_matches(p, action) for p in denied)

    def as_dict(self) -> dict[str, Any]:
        return {
            "roleName": self.name,
            "roleDefinitionId": self.role_definition_id,
            "type": "CustomRole" if self.custom else "BuiltInRole",
            "actions": list(self.actions),
            "notActions": list(self.not_actions),
            "dataActions": list(self.data_actions),
            "notDataActions": list(self.not_data_actions),
        }


@functools.lru_cache(maxsize=256)
def _pattern(permission: str) -> re.Pattern[str]:
    return re.compile("^" + ".*".join(re.escape(p) for p in permission.split("*")) + "$", re.IGNORECASE)


def _matches(permission: str, action: str) -> bool:
    return _pattern(permission).match(action) is not None


BUILT_IN_ROLES: tuple[RoleDefinition, ...] = (
    RoleDefinition(
        SECRETS_USER,
        data_actions=(KV_SECRETS + "getSecret/action", KV_SECRETS + "readMetadata/action"),
        role_definition_id="4633458b-17de-408a-b874-0445c86b69e6",
    ),
    RoleDefinition(
        SECRETS_OFFICER,
        actions=("Microsoft.Authorization/*/read", "Microsoft.KeyVault/vaults/*/read"),
        data_actions=(KV_SECRETS + "*",),
        role_definition_id="b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
    ),
    RoleDefinition(
        KEY_VAULT_ADMINISTRATOR,
        actions=("Microsoft.Authorization/*/read", "Microsoft.KeyVault/vaults/*/read"),
        data_actions=("Microsoft.KeyVault/vaults/*",),
        role_definition_id="00482a5a-887f-4fb3-b363-3b7fe8e74483",
    ),
    RoleDefinition(
        APIM_SERVICE_CONTRIBUTOR,
        actions=("Microsoft.ApiManagement/service/*", "Microsoft.Authorization/*/read"),
        role_definition_id="312a565d-c81f-4fd8-895a-4e21e48d571c",
    ),
)


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RoleError(f"{what} must be a list of non-empty strings")
    return tuple(value)


def roles_file() -> Path:
    """The roles file: the copy a wheel carries (``apimvault/local/roles/rotator.json``), else the source
    checkout's ``infra/roles/rotator.json``."""
    packaged = importlib.resources.files("apimvault.local").joinpath("roles", ROLES_FILE_NAME)
    if packaged.is_file():
        return Path(str(packaged))
    return _REPO_ROLES_FILE


def load_infra_roles(path: str | Path | None = None) -> dict[str, RoleDefinition]:
    """The custom roles of the roles file, by their key in it (``keyVaultSecretRotator``,
    ``apimSubscriptionKeyRotator``). Entries that name a built-in role (``roleDefinitionId``) are skipped."""
    source = Path(path) if path is not None else roles_file()
    try:
        doc = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RoleError(f"cannot read the roles file {source}: {exc}") from None
    if not isinstance(doc, dict):
        raise RoleError(f"{source}: the roles file must hold a JSON object")
    roles: dict[str, RoleDefinition] = {}
    for key, entry in doc.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("roleName"), str):
            raise RoleError(f"{source}: {key!r} must be an object with a roleName")
        if entry.get("roleDefinitionId"):
            continue  # a built-in role the file names for reference
        roles[key] = RoleDefinition(
            entry["roleName"],
            actions=_strings(entry.get("actions"), f"{key}.actions"),
            not_actions=_strings(entry.get("notActions"), f"{key}.notActions"),
            data_actions=_strings(entry.get("dataActions"), f"{key}.dataActions"),
            not_data_actions=_strings(entry.get("notDataActions"), f"{key}.notDataActions"),
            custom=True,
        )
    return roles


@dataclasses.dataclass(frozen=True)
class Assignment:
    """One role assignment: a principal (object id), a role name and a scope (an ARM resource id)."""

    principal: str
    role: str
    scope: str

    def covers(self, resource: str) -> bool:
        scope, resource = self.scope.rstrip("/").lower(), resource.rstrip("/").lower()
        return resource == scope or resource.startswith(scope + "/")

    def as_dict(self) -> dict[str, str]:
        return {"principalId": self.principal, "roleName": self.role, "scope": self.scope}


class Rbac:
    """Role definitions and assignments shared by the local Key Vault and ARM plane (thread-safe).

    ``custom_roles`` adds roles to the built-in ones (by default: infra's, from :func:`load_infra_roles`).
    """

    def __init__(self, custom_roles: Iterable[RoleDefinition] | None = None) -> None:
        self._lock = threading.Lock()
        self._roles: dict[str, RoleDefinition] = {r.name.lower(): r for r in BUILT_IN_ROLES}
        self.infra_roles: dict[str, RoleDefinition] = {}
        if custom_roles is None:
            self.infra_roles = load_infra_roles()
            custom_roles = self.infra_roles.values()
        for role in custom_roles:
            self.define(role)
        self._assignments: set[Assignment] = set()

    # ------------------------------------------------------------------------------------- roles

    def define(self, role: RoleDefinition) -> RoleDefinition:
        """Add (or replace) a role definition."""
        with self._lock:
            self._roles[role.name.lower()] = role
        return role

    def role(self, name: str) -> RoleDefinition:
        with self._lock:
            found = self._roles.get(name.lower())
            known = sorted(r.name for r in self._roles.values())
        if found is None:
            raise RoleError(f"unknown role {name!r}; known: {', '.join(known)}")
        return found

    @property
    def roles(self) -> list[RoleDefinition]:
        with self._lock:
            return list(self._roles.values())

    # ------------------------------------------------------------------------------- assignments

    def assign(self, identity: Identity | str, role: str, scope: str) -> Assignment:
        """Assign ``role`` to ``identity`` (or an object id) at ``scope`` (an ARM resource id)."""
        definition = self.role(role)
        if not isinstance(scope, str) or not scope.startswith("/subscriptions/"):
            raise RoleError(f"a scope is an ARM resource id starting with /subscriptions/, not {scope!r}")
        assignment = Assignment(_oid(identity), definition.name, scope.rstrip("/"))
        with self._lock:
            self._assignments.add(assignment)
        return assignment

    def revoke(self, identity: Identity | str, role: str | None = None, scope: str | None = None) -> int:
        """Remove ``identity``'s assignments of ``role`` (any if None) at exactly ``scope`` (any if None);
        returns how many were removed."""
        oid = _oid(identity)
        with self._lock:
            gone = {
                a
                for a in self._assignments
                if a.principal == oid
                and (role is None or a.role.lower() == role.lower())
                and (scope is None or a.scope.lower() == scope.rstrip("/").lower())
            }
            self._assignments -= gone
        return len(gone)

    def assignments(self, identity: Identity | str | None = None) -> list[Assignment]:
        oid = None if identity is None else _oid(identity)
        with self._lock:
            held = [a for a in self._assignments if oid is None or a.principal == oid]
        return sorted(held, key=lambda a: (a.principal, a.scope.lower(), a.role))

    def allowed(self, principal: str, action: str, resource: str, *, data: bool) -> bool:
        """Whether ``principal`` (an object id) may perform ``action`` on ``resource``."""
        with self._lock:
            held = [a for a in self._assignments if a.principal == principal and a.covers(resource)]
            roles = [self._roles.get(a.role.lower()) for a in held]
        return any(r is not None and r.allows(action, data=data) for r in roles)


def _oid(identity: Identity | str) -> str:
    return identity.object_id if isinstance(identity, Identity) else str(identity)


def role_summary(rbac: Rbac, names: Mapping[str, str]) -> list[dict[str, Any]]:
    """Assignments as JSON, with the identity's name where ``names`` (object id -> name) knows it."""
    return [{**a.as_dict(), "principalName": names.get(a.principal)} for a in rbac.assignments()]
