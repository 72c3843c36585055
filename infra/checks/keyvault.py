"""Key Vault checks: the vault's settings, the rotated secret, and secret seeding across redeploys.

Each ``check_*`` takes parsed templates (:mod:`infra.checks.bicep`) and returns its findings (strings); an
empty list means compliant.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .bicep import (
    APIM_SUBSCRIPTION,
    KEY_VAULT,
    SECRET,
    Template,
    accessor_of,
    config_of,
    diagnostics_problems,
    has_private_endpoint,
    is_true,
    literal_values,
    res_props,
)

# ------------------------------------------------------------------------------------------- Key Vault


def check_key_vaults(templates: Iterable[Template]) -> list[str]:
    """RBAC mode, explicit soft delete with 90 days, purge protection, network default Deny, public access
    Disabled (or, through a parameter switch, Enabled only with Deny + IP rules), enabledFor* false,
    diagnostics with audit logs and metrics, a private endpoint."""
    problems: list[str] = []
    for t in templates:
        for symbol, res in t.of_type(KEY_VAULT):
            where = f"{t.name}:{symbol}"
            p = res_props(res)
            if not is_true(t.resolve(p.get("enableRbacAuthorization"))):
                problems.append(f"{where}: enableRbacAuthorization is not true")
            if p.get("accessPolicies") not in (None, []):
                problems.append(f"{where}: has access policies")
            if not is_true(t.resolve(p.get("enableSoftDelete"))):
                problems.append(f"{where}: enableSoftDelete is not set true explicitly")
            if t.resolve(p.get("softDeleteRetentionInDays")) != 90:
                problems.append(f"{where}: softDeleteRetentionInDays is not 90")
            if not is_true(t.resolve(p.get("enablePurgeProtection"))):
                problems.append(f"{where}: enablePurgeProtection is not true")
            for flag in ("enabledForDeployment", "enabledForTemplateDeployment", "enabledForDiskEncryption"):
                if t.resolve(p.get(flag)) is not False:
                    problems.append(f"{where}: {flag} is not false")
            acls = p.get("networkAcls")
            if not isinstance(acls, dict):
                acls = {}
            if t.resolve(acls.get("defaultAction")) != "Deny":
                problems.append(f"{where}: networkAcls.defaultAction is not Deny")
            public = literal_values(t.resolve(p.get("publicNetworkAccess")))
            public = {t.resolve(v) for v in public}
            if "Disabled" not in public or not public <= {"Disabled", "Enabled"}:
                problems.append(
                    f"{where}: publicNetworkAccess is not Disabled (got {sorted(map(str, public))})"
                )
            problems += diagnostics_problems(t, symbol, where, need_logs=True)
            if not has_private_endpoint(t, symbol, "vault"):
                problems.append(f"{where}: no private endpoint (groupId 'vault')")
    return problems


# --------------------------------------------------------------------------------------------- the secret


def check_rotation_secret(templates: Iterable[Template]) -> list[str]:
    """The APIM key secret: seeded from an APIM subscription's listSecrets().primaryKey, contentType and exp
    set, tags CredentialId=primary, ProviderAddress=<APIM subscription id>, ValidityPeriodDays > 30."""
    problems: list[str] = []
    for t in templates:
        for symbol, res in t.of_type(SECRET):
            where = f"{t.name}:{symbol}"
            p = res_props(res)
            tags = config_of(res).get("tags") or {}
            if t.resolve(tags.get("CredentialId")) != "primary":
                problems.append(f"{where}: tag CredentialId is not 'primary'")
            provider = accessor_of(tags.get("ProviderAddress"))
            if not provider or provider[1] != "id" or t.resource_type_of(provider[0]) != APIM_SUBSCRIPTION:
                problems.append(f"{where}: tag ProviderAddress is not an APIM subscription's id")
            days = _validity_days(t, tags.get("ValidityPeriodDays"))
            if days is None or days <= 30:
                problems.append(f"{where}: tag ValidityPeriodDays is {days!r}, must be > 30")
            if not p.get("contentType"):
                problems.append(f"{where}: no contentType")
            if not (p.get("attributes") or {}).get("exp"):
                problems.append(f"{where}: no attributes.exp (SecretNearExpiry never fires)")
            value = json.dumps(p.get("value"))
            if "listSecrets" not in value or "primaryKey" not in value:
                problems.append(f"{where}: value is not seeded from listSecrets().primaryKey")
    return problems


def _validity_days(t: Template, value: Any) -> int | None:
    """An int for ValidityPeriodDays: a literal, or string(param) with the param's default and @minValue."""
    if isinstance(value, dict) and (value.get("function") or {}).get("type") == "string":
        ref = (value["function"].get("parameters") or {}).get("value_to_convert")
        if isinstance(ref, str) and ref in t.parameters:
            floor = t.decorator(ref, "min_value")
            default = t.parameters[ref].get("default")
            candidates = [v for v in (floor, default) if isinstance(v, int)]
            if floor is None:
                return None  # unbounded parameter: a caller could pass 1
            return min(candidates)
        return None
    resolved = t.resolve(value)
    try:
        return int(resolved)
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------- redeploys


def check_secret_seeding(templates: Iterable[Template]) -> list[str]:
    """Redeploys keep the rotation: a file that writes a Key Vault secret is deployed only by a module whose
    condition is a bool parameter defaulting to false (the first deployment sets it), and no other file writes
    a secret (the role-assignment module references it as existing)."""
    problems: list[str] = []
    templates = list(templates)
    writers = {t.name for t in templates if any(True for _ in t.of_type(SECRET))}
    for t in templates:
        for symbol, mod in t.modules.items():
            path = str(((mod.get("detail") or {}).get("path")) or "")
            if path not in writers:
                continue
            condition = (mod.get("config") or {}).get("condition")
            param = t.parameters.get(condition) if isinstance(condition, str) else None
            if param is None or param.get("type") != "bool" or param.get("default") is not False:
                problems.append(
                    f"{t.name}:{symbol}: deploys {path}, which writes the secret, on every deployment "
                    "(needs `if (<bool param defaulting to false>)`)"
                )
    called = {
        str(((mod.get("detail") or {}).get("path")) or "") for t in templates for mod in t.modules.values()
    }
    for t in templates:
        if t.name in called:
            continue  # checked through the module calls above
        for symbol, res in t.of_type(SECRET):  # a secret in the root template itself
            condition = (res.get("config") or {}).get("condition")
            param = t.parameters.get(condition) if isinstance(condition, str) else None
            if param is None or param.get("type") != "bool" or param.get("default") is not False:
                problems.append(f"{t.name}:{symbol}: writes the secret on every deployment")
    return problems
