"""Role checks: role assignments (scope, principal, role), custom role definitions and their ordering.

Each ``check_*`` takes parsed templates (:mod:`infra.checks.bicep`) and returns its findings (strings); an
empty list means compliant.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .bicep import (
    APP_OR_ROTATOR_PRINCIPALS,
    CUSTOM_ROLES,
    KEY_VAULT,
    KEY_VAULT_ADMINISTRATOR,
    KEY_VAULT_ROLES,
    NARROW_SCOPES,
    ROLE_ASSIGNMENT,
    ROLE_DEFINITION,
    SECRET,
    SECRETS_OFFICER,
    Template,
    accessor_of,
    config_of,
    res_props,
)

# ------------------------------------------------------------------------------------- role assignments


def check_role_assignments(templates: Iterable[Template]) -> list[str]:
    """Every role assignment has an explicit resource scope (never the resource group or the vault); Key Vault
    roles are granted on a secret only; the app and rotator identities get roles only on the secret or the
    APIM subscription; each custom role is one of CUSTOM_ROLES (exactly its actions / data actions),
    assignable on one resource (not a resource group or subscription) and assigned where its kind says;
    no built-in Key Vault role that can delete (Secrets Officer and above) is granted."""
    problems: list[str] = []
    for t in templates:
        for symbol, res in t.of_type(ROLE_ASSIGNMENT):
            where = f"{t.name}:{symbol}"
            scope = config_of(res).get("scope")
            scope_type = t.resource_type_of(scope)
            p = res_props(res)
            role = _role_id(t, p.get("roleDefinitionId"))
            principal = p.get("principalId")
            if scope is None:
                problems.append(f"{where}: no scope (assigned at the resource group)")
                continue
            if scope_type is None:
                problems.append(f"{where}: scope {json.dumps(scope)} is not a resource of this file")
                continue
            if scope_type.lower() == KEY_VAULT.lower():
                problems.append(f"{where}: scoped to the whole vault")
            if role in KEY_VAULT_ROLES and scope_type.lower() != SECRET.lower():
                problems.append(f"{where}: {KEY_VAULT_ROLES[role]} scoped to {scope_type}, not to the secret")
            principal_name = principal if isinstance(principal, str) else ""
            if APP_OR_ROTATOR_PRINCIPALS.match(principal_name) and scope_type not in NARROW_SCOPES:
                problems.append(
                    f"{where}: {principal_name} gets a role on {scope_type}, not the secret/APIM subscription"
                )
            if role is not None and role.startswith("custom:"):
                kind = role.split(":", 1)[1]
                wanted = CUSTOM_ROLES[kind][3] if kind in CUSTOM_ROLES else None
                if scope_type != wanted:
                    problems.append(f"{where}: custom role {kind} assigned on {scope_type}, not {wanted}")
            if role in (SECRETS_OFFICER, KEY_VAULT_ADMINISTRATOR):
                problems.append(
                    f"{where}: {KEY_VAULT_ROLES[role]} can delete and purge; use the secret-rotator role"
                )
            if p.get("principalType") != "ServicePrincipal":
                problems.append(f"{where}: principalType is not ServicePrincipal")
        for symbol, res in t.of_type(ROLE_DEFINITION):
            where = f"{t.name}:{symbol}"
            role_kind = custom_role_kind(res)
            if role_kind is None:
                problems.append(
                    f"{where}: permissions are not exactly one of the custom roles {sorted(CUSTOM_ROLES)}"
                )
                continue
            scopes = res_props(res).get("assignableScopes") or []
            assignable = [accessor_of(sc) for sc in scopes]
            if len(scopes) != 1 or not assignable[0] or assignable[0][1] != "id":
                problems.append(f"{where}: assignableScopes {json.dumps(scopes)} is not one resource's id")
            elif t.resource_type_of(assignable[0][0]) != CUSTOM_ROLES[role_kind][2]:
                on = t.resource_type_of(assignable[0][0])
                problems.append(f"{where}: assignable on {on}, not {CUSTOM_ROLES[role_kind][2]}")
    return problems


def custom_role_kind(res: dict[str, Any]) -> str | None:
    """The CUSTOM_ROLES key whose actions and data actions a role definition holds exactly, else None."""
    perms = res_props(res).get("permissions") or []
    if len(perms) != 1 or not isinstance(perms[0], dict):
        return None
    actions, data = set(perms[0].get("actions") or []), set(perms[0].get("dataActions") or [])
    if perms[0].get("notActions") or perms[0].get("notDataActions"):
        return None
    for kind, (want_actions, want_data, _, _) in CUSTOM_ROLES.items():
        if actions == want_actions and data == want_data:
            return kind
    return None


def check_custom_role_ordering(templates: Iterable[Template]) -> list[str]:
    """A custom role defined in a file is assigned only under a condition (the second deployment): a role
    definition created moments before can still be replicating ("RoleDefinitionDoesNotExist")."""
    problems = []
    for t in templates:
        for symbol, res in t.of_type(ROLE_ASSIGNMENT):
            role = _role_id(t, res_props(res).get("roleDefinitionId"))
            config = res.get("config") or {}
            if role and role.startswith("custom:") and not config.get("condition"):
                problems.append(f"{t.name}:{symbol}: assigns a custom role defined in the same deployment")
    return problems


def _role_id(t: Template, value: Any) -> str | None:
    """The built-in role GUID of a roleDefinitionId expression, or 'custom:<kind>' for a role defined in the
    file (kind from CUSTOM_ROLES, '?' if it matches none)."""
    if isinstance(value, dict) and "function" in value:
        fn = value["function"]
        if fn.get("type") == "subscription_resource_id":
            params = fn.get("parameters") or {}
            return str(t.resolve(params.get("resource_name_1")))
    acc = accessor_of(value)
    if acc and t.resource_type_of(acc[0]) == ROLE_DEFINITION:
        return f"custom:{custom_role_kind(t.resources[acc[0]]) or '?'}"
    resolved = t.resolve(value)
    return resolved if isinstance(resolved, str) else None


def role_grants(templates: Iterable[Template]) -> set[tuple[str, str, str]]:
    """(role, principal parameter, scope type) of every role assignment, for presence checks."""
    grants = set()
    for t in templates:
        for _, res in t.of_type(ROLE_ASSIGNMENT):
            p = res_props(res)
            scope_type = t.resource_type_of(config_of(res).get("scope")) or "?"
            grants.add(
                (str(_role_id(t, p.get("roleDefinitionId"))), json.dumps(p.get("principalId")), scope_type)
            )
    return grants
