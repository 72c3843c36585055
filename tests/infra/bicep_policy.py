"""Policy checks over the parsed Bicep in ``infra/`` for what checkov does not check (or checks vacuously).

Each ``check_*`` function takes parsed templates and returns a list of violations (strings); an empty list
means compliant. ``tests/infra/test_bicep_policy.py`` runs them over the real templates and over
deliberately bad snippets, so every check is shown to be able to fail.

Parsing is pycep (the parser checkov's Bicep runner uses). pycep does not tell a string literal from an
identifier, so a string equal to a symbol of the same file (parameter, variable, resource, module) is read
as a reference to it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pycep
from pycep import BicepParser

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"

KEY_VAULT = "Microsoft.KeyVault/vaults"
SECRET = "Microsoft.KeyVault/vaults/secrets"
APIM = "Microsoft.ApiManagement/service"
APIM_API = "Microsoft.ApiManagement/service/apis"
APIM_SUBSCRIPTION = "Microsoft.ApiManagement/service/subscriptions"
ROLE_ASSIGNMENT = "Microsoft.Authorization/roleAssignments"
ROLE_DEFINITION = "Microsoft.Authorization/roleDefinitions"
DIAGNOSTIC_SETTINGS = "Microsoft.Insights/diagnosticSettings"
SYSTEM_TOPIC = "Microsoft.EventGrid/systemTopics"
EVENT_SUBSCRIPTION = "Microsoft.EventGrid/systemTopics/eventSubscriptions"
COGNITIVE_ACCOUNT = "Microsoft.CognitiveServices/accounts"

KEY_VAULT_ROLES = {
    "4633458b-17de-408a-b874-0445c86b69e6": "Key Vault Secrets User",
    "b86a8fe4-44ce-4948-aee5-eccb2c155cd7": "Key Vault Secrets Officer",
    "00482a5a-887f-4fb3-b363-3b7fe8e74483": "Key Vault Administrator",
    "21090545-7ca7-4776-b22c-e363652d74d2": "Key Vault Reader",
    "f25e0fa2-a7c8-4377-a976-54943a77a395": "Key Vault Contributor",
}
SECRETS_USER = "4633458b-17de-408a-b874-0445c86b69e6"
SECRETS_OFFICER = "b86a8fe4-44ce-4948-aee5-eccb2c155cd7"
KEY_VAULT_ADMINISTRATOR = "00482a5a-887f-4fb3-b363-3b7fe8e74483"

# Principals (parameter names) that are the app's and the rotation function's identities.
APP_OR_ROTATOR_PRINCIPALS = re.compile(r"^(app|rotator)PrincipalId$")
# What a role assignment for those identities may be scoped to.
NARROW_SCOPES = {SECRET, APIM_SUBSCRIPTION}
ROTATOR_ACTIONS = {
    "Microsoft.ApiManagement/service/subscriptions/read",
    "Microsoft.ApiManagement/service/subscriptions/listSecrets/action",
    "Microsoft.ApiManagement/service/subscriptions/regeneratePrimaryKey/action",
    "Microsoft.ApiManagement/service/subscriptions/regenerateSecondaryKey/action",
}
# The rotator's Key Vault data role: read the value, write new versions, update versions' tags (the rotation's
# RotationPending / CredentialId tags), read versions' metadata. No delete, purge, backup, restore or recover
# (Key Vault Secrets Officer has all of those).
SECRET_ROTATOR_DATA_ACTIONS = {
    "Microsoft.KeyVault/vaults/secrets/getSecret/action",
    "Microsoft.KeyVault/vaults/secrets/setSecret/action",
    "Microsoft.KeyVault/vaults/secrets/update/action",
    "Microsoft.KeyVault/vaults/secrets/readMetadata/action",
}
# Custom role kind -> (actions, data actions, the resource type it is assignable on, where it is assigned).
CUSTOM_ROLES = {
    "apim-key-rotator": (ROTATOR_ACTIONS, set(), APIM, APIM_SUBSCRIPTION),
    "secret-rotator": (set(), SECRET_ROTATOR_DATA_ACTIONS, KEY_VAULT, SECRET),
}
WEAK_PROTOCOLS = [
    f"Microsoft.WindowsAzure.ApiManagement.Gateway.Security.{side}Protocols.{proto}"
    for side in ("", "Backend.")
    for proto in ("Tls10", "Tls11", "Ssl30")
]
# Output values must not touch these (names, accessors or functions in the parsed expression).
SECRET_MARKERS = re.compile(
    r"listSecrets|listKeys|\blist[A-Z]\w*|primaryKey|secondaryKey|getSecret", re.IGNORECASE
)
SECRET_OUTPUT_NAME = re.compile(r"password|primarykey|secondarykey|subscriptionkey|apikey|accountkey", re.I)


@dataclasses.dataclass
class Template:
    """One parsed Bicep file."""

    name: str
    doc: dict[str, Any]

    @property
    def resources(self) -> dict[str, dict[str, Any]]:
        return self.doc.get("resources") or {}

    @property
    def parameters(self) -> dict[str, dict[str, Any]]:
        return self.doc.get("parameters") or {}

    @property
    def variables(self) -> dict[str, dict[str, Any]]:
        return self.doc.get("variables") or {}

    @property
    def outputs(self) -> dict[str, dict[str, Any]]:
        return self.doc.get("outputs") or {}

    @property
    def modules(self) -> dict[str, dict[str, Any]]:
        return self.doc.get("modules") or {}

    def of_type(self, rtype: str, *, include_existing: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
        for symbol, res in self.resources.items():
            if res.get("type", "").lower() == rtype.lower() and (include_existing or not res.get("existing")):
                yield symbol, res

    def resolve(self, value: Any, _depth: int = 0) -> Any:
        """Follow variable references to their value and parameter references to their default."""
        if _depth > 10 or not isinstance(value, str):
            return value
        if value in self.variables:
            return self.resolve(self.variables[value].get("value"), _depth + 1)
        if value in self.parameters and self.parameters[value].get("default") is not None:
            return self.resolve(self.parameters[value]["default"], _depth + 1)
        return value

    def resource_type_of(self, symbol: Any) -> str | None:
        if isinstance(symbol, str) and symbol in self.resources:
            return str(self.resources[symbol].get("type"))
        return None

    def decorator(self, param: str, kind: str) -> Any:
        for deco in self.parameters.get(param, {}).get("decorators") or []:
            if deco.get("type") == kind:
                return deco.get("argument")
        return None


@functools.cache
def _parser() -> BicepParser:
    """One parser per process: building pycep's Lark grammar is what costs time, not parsing."""
    return BicepParser()


def _cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"apimvault-pycep-{os.getuid() if hasattr(os, 'getuid') else 0}"


def parse_bicep(text: str) -> dict[str, Any]:
    """pycep's JSON for ``text``, cached on disk by content hash (and pycep version) across test runs."""
    version = getattr(pycep, "__version__", "?")
    digest = hashlib.sha256(f"{version}\0{text}".encode()).hexdigest()
    cached = _cache_dir() / f"{digest}.json"
    try:
        return json.loads(cached.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        pass
    doc: dict[str, Any] = json.loads(json.dumps(_parser().parse(text=text)))
    try:
        cached.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(cached)
    except OSError:
        pass  # a read-only temp dir only costs speed
    return doc


def parse_text(text: str, name: str = "<snippet>") -> Template:
    return Template(name, parse_bicep(text))


def bicep_files(root: Path = INFRA) -> list[Path]:
    return sorted(p for p in root.rglob("*.bicep") if not any(x.startswith(".venv") for x in p.parts))


def load_templates(root: Path = INFRA) -> list[Template]:
    return [
        Template(str(p.relative_to(root)), inline_json_content(parse_bicep(p.read_text()), p.parent))
        for p in bicep_files(root)
    ]


def inline_json_content(node: Any, base: Path) -> Any:
    """``node`` with every ``loadJsonContent('file'[, '$.a.b'])`` replaced by the JSON it loads (Bicep inlines
    it at compile time too), so the checks see e.g. the rotator roles of ``infra/roles/rotator.json``."""
    if isinstance(node, list):
        return [inline_json_content(item, base) for item in node]
    if not isinstance(node, dict):
        return node
    fn = node.get("function")
    if isinstance(fn, dict) and fn.get("type") == "load_json_content":
        params = fn.get("parameters") or {}
        value: Any = json.loads((base / str(params["file_path"])).read_text(encoding="utf-8"))
        for key in [k for k in str(params.get("json_path") or "$").removeprefix("$").split(".") if k]:
            value = value[key]
        return value
    return {key: inline_json_content(value, base) for key, value in node.items()}


def config_of(res: dict[str, Any]) -> dict[str, Any]:
    """A resource's body; a conditional resource (``= if (cond) {...}``) is checked as if deployed, and a
    loop (``= [for x in xs: {...}]``) by its body (``x.field`` left unresolved: see :func:`loop_items`)."""
    config = res.get("config") or {}
    if set(config) in ({"condition", "config"}, {"loop_type", "condition", "config"}) and isinstance(
        config["config"], dict
    ):
        config = config["config"]
    return config


def loop_items(t: Template, res: dict[str, Any]) -> tuple[str, list[Any]] | None:
    """``(item name, items)`` of a resource loop over a literal array variable; ``None`` otherwise."""
    detail = (((res.get("config") or {}).get("loop_type") or {}).get("detail")) or {}
    items = t.resolve(detail.get("array_name"))
    if isinstance(detail.get("item_name"), str) and isinstance(items, list):
        return detail["item_name"], items
    return None


def _props(res: dict[str, Any]) -> dict[str, Any]:
    props = config_of(res).get("properties")
    return props if isinstance(props, dict) else {}


def _strip_quotes(key: str) -> str:
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == "'" else key


def _accessor(value: Any) -> tuple[Any, Any] | None:
    """``(operand_1, operand_2)`` of a property accessor such as ``x.id``."""
    if isinstance(value, dict):
        op = value.get("operator") or {}
        if op.get("type") == "property_accessor":
            operands = op.get("operands") or {}
            return operands.get("operand_1"), operands.get("operand_2")
    return None


def dotted(value: Any) -> str | None:
    """``a.b.c`` for a chain of property accessors (pycep nests them as ``a.(b.c)``), else None."""
    if isinstance(value, str):
        return value
    acc = _accessor(value)
    if acc is None:
        return None
    left, right = dotted(acc[0]), dotted(acc[1])
    return None if left is None or right is None else f"{left}.{right}"


def _literals(value: Any) -> set[Any]:
    """The literal values an expression can take (through conditionals), or {value} for a literal."""
    if isinstance(value, dict):
        op = value.get("operator") or {}
        if op.get("type") == "conditional":
            operands = op.get("operands") or {}
            return _literals(operands.get("true_value")) | _literals(operands.get("false_value"))
        return {json.dumps(value, sort_keys=True)}
    return {value}


def _is_true(value: Any) -> bool:
    return value is True


def _is_false(value: Any) -> bool:
    return value is False or (isinstance(value, str) and value.lower() == "false")


# ------------------------------------------------------------------------------------------- Key Vault


def check_key_vaults(templates: Iterable[Template]) -> list[str]:
    """RBAC mode, explicit soft delete with 90 days, purge protection, network default Deny, public access
    Disabled (or, through a parameter switch, Enabled only with Deny + IP rules), enabledFor* false,
    diagnostics with audit logs and metrics, a private endpoint."""
    problems: list[str] = []
    for t in templates:
        for symbol, res in t.of_type(KEY_VAULT):
            where = f"{t.name}:{symbol}"
            p = _props(res)
            if not _is_true(t.resolve(p.get("enableRbacAuthorization"))):
                problems.append(f"{where}: enableRbacAuthorization is not true")
            if p.get("accessPolicies") not in (None, []):
                problems.append(f"{where}: has access policies")
            if not _is_true(t.resolve(p.get("enableSoftDelete"))):
                problems.append(f"{where}: enableSoftDelete is not set true explicitly")
            if t.resolve(p.get("softDeleteRetentionInDays")) != 90:
                problems.append(f"{where}: softDeleteRetentionInDays is not 90")
            if not _is_true(t.resolve(p.get("enablePurgeProtection"))):
                problems.append(f"{where}: enablePurgeProtection is not true")
            for flag in ("enabledForDeployment", "enabledForTemplateDeployment", "enabledForDiskEncryption"):
                if t.resolve(p.get(flag)) is not False:
                    problems.append(f"{where}: {flag} is not false")
            acls = p.get("networkAcls")
            if not isinstance(acls, dict):
                acls = {}
            if t.resolve(acls.get("defaultAction")) != "Deny":
                problems.append(f"{where}: networkAcls.defaultAction is not Deny")
            public = _literals(t.resolve(p.get("publicNetworkAccess")))
            public = {t.resolve(v) for v in public}
            if "Disabled" not in public or not public <= {"Disabled", "Enabled"}:
                problems.append(
                    f"{where}: publicNetworkAccess is not Disabled (got {sorted(map(str, public))})"
                )
            problems += _diagnostics_problems(t, symbol, where, need_logs=True)
            if not _has_private_endpoint(t, symbol, "vault"):
                problems.append(f"{where}: no private endpoint (groupId 'vault')")
    return problems


def _diagnostics_problems(t: Template, symbol: str, where: str, *, need_logs: bool) -> list[str]:
    for _, diag in t.of_type(DIAGNOSTIC_SETTINGS):
        if config_of(diag).get("scope") != symbol:
            continue
        p = _props(diag)
        groups = {
            (log.get("categoryGroup") or log.get("category"))
            for log in p.get("logs") or []
            if isinstance(log, dict) and log.get("enabled") is True
        }
        metrics = {
            m.get("category") for m in p.get("metrics") or [] if isinstance(m, dict) and m.get("enabled")
        }
        missing = []
        if need_logs and not groups & {"audit", "allLogs", "AuditEvent", "GatewayLogs"}:
            missing.append("audit logs")
        if "AllMetrics" not in metrics:
            missing.append("AllMetrics")
        if not p.get("workspaceId"):
            missing.append("a Log Analytics workspace")
        return [f"{where}: diagnostic settings lack {', '.join(missing)}"] if missing else []
    return [f"{where}: no diagnostic settings scoped to it"]


def _has_private_endpoint(t: Template, symbol: str, group_id: str) -> bool:
    for mod in t.modules.values():
        params = (mod.get("config") or {}).get("params") or {}
        if _accessor(params.get("targetResourceId")) == (symbol, "id") and params.get("groupId") == group_id:
            return True
    for _, pe in t.of_type("Microsoft.Network/privateEndpoints"):
        text = json.dumps(pe)
        if f'"operand_1": "{symbol}"' in text and f'"{group_id}"' in text:
            return True
    return False


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
            p = _props(res)
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
            scopes = _props(res).get("assignableScopes") or []
            assignable = [_accessor(sc) for sc in scopes]
            if len(scopes) != 1 or not assignable[0] or assignable[0][1] != "id":
                problems.append(f"{where}: assignableScopes {json.dumps(scopes)} is not one resource's id")
            elif t.resource_type_of(assignable[0][0]) != CUSTOM_ROLES[role_kind][2]:
                on = t.resource_type_of(assignable[0][0])
                problems.append(f"{where}: assignable on {on}, not {CUSTOM_ROLES[role_kind][2]}")
    return problems


def custom_role_kind(res: dict[str, Any]) -> str | None:
    """The CUSTOM_ROLES key whose actions and data actions a role definition holds exactly, else None."""
    perms = _props(res).get("permissions") or []
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
            role = _role_id(t, _props(res).get("roleDefinitionId"))
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
    acc = _accessor(value)
    if acc and t.resource_type_of(acc[0]) == ROLE_DEFINITION:
        return f"custom:{custom_role_kind(t.resources[acc[0]]) or '?'}"
    resolved = t.resolve(value)
    return resolved if isinstance(resolved, str) else None


def role_grants(templates: Iterable[Template]) -> set[tuple[str, str, str]]:
    """(role, principal parameter, scope type) of every role assignment, for presence checks."""
    grants = set()
    for t in templates:
        for _, res in t.of_type(ROLE_ASSIGNMENT):
            p = _props(res)
            scope_type = t.resource_type_of(config_of(res).get("scope")) or "?"
            grants.add(
                (str(_role_id(t, p.get("roleDefinitionId"))), json.dumps(p.get("principalId")), scope_type)
            )
    return grants


# ------------------------------------------------------------------------------------------------ outputs


def check_outputs_and_parameters(templates: Iterable[Template]) -> list[str]:
    """No output carries a key (list*() calls, primaryKey/secondaryKey, a secret's .value, getSecret, a
    @secure() parameter) or has a key-like name; no parameter default holds a key; secure params have no
    default."""
    problems: list[str] = []
    for t in templates:
        secure = {
            n
            for n, p in t.parameters.items()
            if any(d.get("type") == "secure" for d in p.get("decorators") or [])
        }
        for name, out in t.outputs.items():
            where = f"{t.name}: output {name}"
            text = json.dumps(out.get("value"))
            marker = SECRET_MARKERS.search(text)
            if marker:
                problems.append(f"{where}: value references a key ({marker.group(0)})")
            if _accesses_value(out.get("value")):
                problems.append(f"{where}: value reads a .value property")
            if any(f'"{p}"' in text for p in secure):
                problems.append(f"{where}: value references a @secure() parameter")
            if SECRET_OUTPUT_NAME.search(name):
                problems.append(f"{where}: name suggests a secret")
        for name, param in t.parameters.items():
            default = json.dumps(param.get("default"))
            if name in secure and param.get("default") not in (None, ""):
                problems.append(f"{t.name}: @secure() parameter {name} has a default")
            if SECRET_MARKERS.search(default):
                problems.append(f"{t.name}: parameter {name} default references a key")
    return problems


def _accesses_value(value: Any) -> bool:
    if isinstance(value, dict):
        acc = _accessor(value)
        if acc and acc[1] == "value":
            return True
        return any(_accesses_value(v) for v in value.values())
    if isinstance(value, list):
        return any(_accesses_value(v) for v in value)
    return isinstance(value, str) and value.endswith(".value")


# --------------------------------------------------------------------------------------------------- APIM


def check_apim(templates: Iterable[Template]) -> list[str]:
    """TLS 1.0/1.1 and SSL 3.0 off on both sides, a minimum management API version, diagnostics; APIs require
    a subscription with the Ocp-Apim-Subscription-Key header; subscriptions are product-scoped with tracing
    explicitly off."""
    problems: list[str] = []
    for t in templates:
        for symbol, res in t.of_type(APIM):
            where = f"{t.name}:{symbol}"
            p = _props(res)
            for guard, custom in custom_property_branches(t, p.get("customProperties")):
                for setting in WEAK_PROTOCOLS:
                    if not _is_false(custom.get(setting)):
                        problems.append(f"{where}: {setting.rsplit('.', 2)[-2:]} not explicitly disabled")
                ciphers = sorted(k for k in custom if ".Security.Ciphers." in k)
                if ciphers and not _excludes_v2_tiers(t, guard):
                    problems.append(
                        f"{where}: cipher settings {ciphers} also sent to v2 tiers, which do not support "
                        "changes to the default cipher configuration"
                    )
            if not (p.get("apiVersionConstraint") or {}).get("minApiVersion"):
                problems.append(f"{where}: no apiVersionConstraint.minApiVersion")
            problems += _diagnostics_problems(t, symbol, where, need_logs=True)
        for symbol, res in t.of_type(APIM_API):
            where = f"{t.name}:{symbol}"
            p = _props(res)
            if not _is_true(p.get("subscriptionRequired")):
                problems.append(f"{where}: subscriptionRequired is not true")
            header = (p.get("subscriptionKeyParameterNames") or {}).get("header")
            if header != "Ocp-Apim-Subscription-Key":
                problems.append(f"{where}: subscription key header is {header!r}")
        for symbol, res in t.of_type(APIM_SUBSCRIPTION):
            where = f"{t.name}:{symbol}"
            p = _props(res)
            if p.get("allowTracing") is not False:
                problems.append(f"{where}: allowTracing is not explicitly false")
            scope = _accessor(p.get("scope"))
            scope_text = t.resolve(p.get("scope"))
            scoped_to_product = (
                scope and t.resource_type_of(scope[0]) == "Microsoft.ApiManagement/service/products"
            ) or (isinstance(scope_text, str) and "/products/" in scope_text)
            if not scoped_to_product:
                problems.append(f"{where}: not scoped to a product")
            name = t.resolve(config_of(res).get("name"))
            if isinstance(name, str) and name.lower() == "master":
                problems.append(f"{where}: uses the built-in all-access 'master' subscription")
    return problems


V2_TIERS = {"BasicV2", "StandardV2", "PremiumV2"}


def custom_property_branches(t: Template, value: Any, guard: Any = None) -> list[tuple[Any, dict[str, Any]]]:
    """Every object an APIM customProperties expression can evaluate to (through variables, conditionals and
    union()), each with the condition that selects it (None: unconditional; ("not", c) for a false branch)."""
    value = t.resolve(value)
    if isinstance(value, dict):
        op = value.get("operator") or {}
        fn = value.get("function") or {}
        if op.get("type") == "conditional":
            ops = op.get("operands") or {}
            cond = ops.get("condition")
            return custom_property_branches(t, ops.get("true_value"), cond) + custom_property_branches(
                t, ops.get("false_value"), ("not", cond)
            )
        if fn.get("type") == "union":
            merged: dict[str, Any] = {}
            for arg in (fn.get("parameters") or {}).values():
                for _, part in custom_property_branches(t, arg):
                    merged.update(part)
            return [(guard, merged)]
        if not op and not fn:
            return [(guard, {_strip_quotes(k): t.resolve(v) for k, v in value.items()})]
    return [(guard, {})]


def _excludes_v2_tiers(t: Template, guard: Any) -> bool:
    """True if ``guard`` is (a variable holding) ``!contains([...all v2 tiers...], <sku parameter>)``."""
    if guard is None or isinstance(guard, tuple):
        return False
    op = (t.resolve(guard) or {}).get("operator") if isinstance(t.resolve(guard), dict) else None
    if not op or op.get("type") != "not":
        return False
    fn = ((op.get("operands") or {}).get("bool_value") or {}).get("function") or {}
    params = fn.get("parameters") or {}
    container = params.get("container")
    return fn.get("type") == "contains" and isinstance(container, list) and set(container) >= V2_TIERS


# --------------------------------------------------------------------------------------------- the secret


def check_rotation_secret(templates: Iterable[Template]) -> list[str]:
    """The APIM key secret: seeded from an APIM subscription's listSecrets().primaryKey, contentType and exp
    set, tags CredentialId=primary, ProviderAddress=<APIM subscription id>, ValidityPeriodDays > 30."""
    problems: list[str] = []
    for t in templates:
        for symbol, res in t.of_type(SECRET):
            where = f"{t.name}:{symbol}"
            p = _props(res)
            tags = config_of(res).get("tags") or {}
            if t.resolve(tags.get("CredentialId")) != "primary":
                problems.append(f"{where}: tag CredentialId is not 'primary'")
            provider = _accessor(tags.get("ProviderAddress"))
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


# ------------------------------------------------------------------------------------ the function app

FUNCTION_APP = "Microsoft.Web/sites"
# Flex Consumption maximumInstanceCount: 40 is the lowest value every region accepts (lower ones only in some
# regions in preview: azure-functions-host#10523), 1000 the highest (Learn: Flex Consumption plan).
FLEX_INSTANCES_MIN = 40
FLEX_INSTANCES_MAX = 1000


def _max_value(t: Template, value: Any) -> int | None:
    """An int literal, or the largest value a parameter can take (its @maxValue, else None = unbounded)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value in t.parameters:
        ceiling = t.decorator(value, "max_value")
        return ceiling if isinstance(ceiling, int) else None
    return None


def _min_value(t: Template, value: Any) -> int | None:
    """An int literal, or the smallest value a parameter can take (its @minValue, else None = unbounded)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value in t.parameters:
        floor = t.decorator(value, "min_value")
        return floor if isinstance(floor, int) else None
    return None


def check_function_apps(templates: Iterable[Template]) -> list[str]:
    """Flex Consumption function apps: no cors block (unsupported there), an instance cap every region
    accepts (FLEX_INSTANCES_MIN..FLEX_INSTANCES_MAX, a parameter's whole @minValue..@maxValue range and its
    default included; overlapping runs are serialised by the rotation lease, not by the cap), one invocation
    per instance (HTTP trigger concurrency 1 and a one-thread Python pool), and the app deployed after its
    storage's private endpoint."""
    problems: list[str] = []
    for t in templates:
        for symbol, res in t.of_type(FUNCTION_APP):
            where = f"{t.name}:{symbol}"
            p = _props(res)
            site = p.get("siteConfig") or {}
            if "cors" in site:
                problems.append(f"{where}: siteConfig.cors is not supported on Flex Consumption")
            scale = (p.get("functionAppConfig") or {}).get("scaleAndConcurrency") or {}
            cap = scale.get("maximumInstanceCount")
            least, most = _min_value(t, cap), _max_value(t, cap)
            if least is None or least < FLEX_INSTANCES_MIN or most is None or most > FLEX_INSTANCES_MAX:
                problems.append(
                    f"{where}: maximumInstanceCount can be {least!r}..{most!r}, outside the range every "
                    f"region accepts ({FLEX_INSTANCES_MIN}..{FLEX_INSTANCES_MAX})"
                )
            default = t.parameters.get(cap, {}).get("default") if isinstance(cap, str) else None
            if isinstance(default, int) and not FLEX_INSTANCES_MIN <= default <= FLEX_INSTANCES_MAX:
                problems.append(f"{where}: maximumInstanceCount defaults to {default}")
            per_instance = ((scale.get("triggers") or {}).get("http") or {}).get("perInstanceConcurrency")
            if per_instance != 1:
                problems.append(f"{where}: triggers.http.perInstanceConcurrency is {per_instance!r}, not 1")
            settings = {
                s.get("name"): s.get("value") for s in site.get("appSettings") or [] if isinstance(s, dict)
            }
            if settings.get("PYTHON_THREADPOOL_THREAD_COUNT") != "1":
                problems.append(f"{where}: PYTHON_THREADPOOL_THREAD_COUNT is not '1'")
            depends = config_of(res).get("dependsOn") or []
            blob_endpoints = {
                name
                for name, mod in t.modules.items()
                if ((mod.get("config") or {}).get("params") or {}).get("groupId") == "blob"
            }
            if not blob_endpoints & set(depends):
                problems.append(f"{where}: does not depend on the storage account's blob private endpoint")
    return problems


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


# ---------------------------------------------------------------------------------------------- alerts

ACTION_GROUP = "Microsoft.Insights/actionGroups"
METRIC_ALERT = "Microsoft.Insights/metricAlerts"
SCHEDULED_QUERY = "Microsoft.Insights/scheduledQueryRules"
REQUIRED_METRIC_ALERTS = {
    ("Microsoft.EventGrid/systemTopics", "DeadLetteredCount"): "a dead-lettered rotation event",
    ("Microsoft.EventGrid/systemTopics", "DeliveryAttemptFailCount"): "Event Grid delivery failures",
    ("microsoft.insights/components", "requests/failed"): "rotation function errors",
}
FUNCTION_ROLE_DIMENSION = "cloud/roleName"


def expand(t: Template, value: Any, _depth: int = 0) -> Any:
    """``value`` with every variable reference replaced by the variable's value, recursively."""
    if _depth > 10:
        return value
    if isinstance(value, str) and value in t.variables:
        return expand(t, t.variables[value].get("value"), _depth + 1)
    if isinstance(value, dict):
        return {k: expand(t, v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(t, v, _depth + 1) for v in value]
    return value


def _receivers_guaranteed(t: Template, receivers: Any) -> bool:
    """A non-empty literal list, or a loop over a required parameter (no default) with @minLength >= 1."""
    if isinstance(receivers, list):
        return bool(receivers)
    if isinstance(receivers, dict) and "loop_type" in receivers:
        array = ((receivers.get("loop_type") or {}).get("detail") or {}).get("array_name")
        if not isinstance(array, str) or array not in t.parameters:
            return False
        param = t.parameters[array]
        floor = t.decorator(array, "min_length")
        return param is not None and param.get("default") is None and isinstance(floor, int) and floor >= 1
    return False


def check_action_groups(templates: Iterable[Template]) -> list[str]:
    """Every action group created is unconditional and has at least one receiver for sure: some
    ``*Receivers`` list is a non-empty literal or a loop over a required parameter with @minLength(1), so a
    deployment without a receiver fails validation instead of creating alerts that reach nobody."""
    problems: list[str] = []
    for t in templates:
        for symbol, res in t.of_type(ACTION_GROUP):
            where = f"{t.name}:{symbol}"
            if (res.get("config") or {}).get("condition") is not None:
                problems.append(f"{where}: created only under a condition (alerts could reach nobody)")
            p = _props(res)
            lists = {k: v for k, v in p.items() if k.endswith("Receivers")}
            if not any(_receivers_guaranteed(t, v) for v in lists.values()):
                problems.append(
                    f"{where}: no receiver guaranteed (needs a non-empty list or a loop over a required "
                    "parameter with @minLength(1))"
                )
    return problems


def _group_outputs(templates: list[Template]) -> dict[str, set[str]]:
    """File -> names of its outputs whose value is the id of an action group the file creates."""
    found: dict[str, set[str]] = {}
    for t in templates:
        groups = {symbol for symbol, _ in t.of_type(ACTION_GROUP)}
        for name, out in t.outputs.items():
            acc = _accessor(t.resolve(out.get("value")))
            if acc and acc[0] in groups and acc[1] == "id":
                found.setdefault(t.name, set()).add(name)
    return found


def _param_is_created_group(t: Template, param: str, templates: list[Template]) -> bool:
    """Every module call of ``t`` (in any file) passes ``param`` a created action group's id output."""
    outputs = _group_outputs(templates)
    calls = [
        (caller, mod)
        for caller in templates
        for mod in caller.modules.values()
        if str(((mod.get("detail") or {}).get("path")) or "") == t.name
    ]
    if not calls:
        return False
    for caller, mod in calls:
        passed = dotted(((mod.get("config") or {}).get("params") or {}).get(param))
        parts = (passed or "").split(".")
        if len(parts) != 3 or parts[1] != "outputs" or parts[0] not in caller.modules:
            return False
        path = str(((caller.modules[parts[0]].get("detail") or {}).get("path")) or "")
        if parts[2] not in outputs.get(path, set()):
            return False
    return True


def _notifies_created_group(t: Template, actions: Any, templates: list[Template]) -> bool:
    """The (variable-expanded) actions reference the id of an action group created in the same file, or a
    parameter that every caller fills with such an id from the module that creates it."""
    text = json.dumps(expand(t, actions))
    if any(f'"operand_1": "{symbol}", "operand_2": "id"' in text for symbol, _ in t.of_type(ACTION_GROUP)):
        return True
    referenced = {p for p in t.parameters if f'"{p}"' in text}
    return any(_param_is_created_group(t, p, templates) for p in referenced)


def check_alerts(templates: Iterable[Template]) -> list[str]:
    """The alerts that make a silent stop of rotation (or a bad key) page someone: metric alerts for
    dead-lettered events, delivery failures and function errors (the latter only for the function's own
    cloud_RoleName), a scheduled query on the vault's audit logs for "near expiry and no new version
    written", and a scheduled query on the gateway's 401 rate; every alert notifies an action group created
    in the same file (whose receivers check_action_groups guarantees)."""
    problems: list[str] = []
    templates = list(templates)
    found: set[tuple[str, str]] = set()
    overdue = unauthorized = False
    overdue_severity: Any = None
    expiring: dict[int, Any] = {}  # days before the expiry -> severity
    for t in templates:
        for symbol, res in t.of_type(METRIC_ALERT):
            where = f"{t.name}:{symbol}"
            p = _props(res)
            for criterion in (p.get("criteria") or {}).get("allOf") or []:
                key = (str(criterion.get("metricNamespace")), str(criterion.get("metricName")))
                found.add(key)
                if criterion.get("threshold") != 0 or criterion.get("operator") != "GreaterThan":
                    problems.append(f"{where}: must fire on the first occurrence (GreaterThan 0)")
                if key == ("microsoft.insights/components", "requests/failed"):
                    dims = [d for d in criterion.get("dimensions") or [] if isinstance(d, dict)]
                    role = [
                        d
                        for d in dims
                        if d.get("name") == FUNCTION_ROLE_DIMENSION
                        and d.get("operator") == "Include"
                        and isinstance(d.get("values"), list)
                        and d["values"]
                        and "*" not in d["values"]
                    ]
                    if not role:
                        problems.append(
                            f"{where}: requests/failed is not limited to the function's "
                            f"{FUNCTION_ROLE_DIMENSION}"
                        )
            if not _notifies_created_group(t, p.get("actions"), templates):
                problems.append(f"{where}: does not notify the action group created with receivers")
        for symbol, res in t.of_type(SCHEDULED_QUERY):
            where = f"{t.name}:{symbol}"
            p = _props(res)
            criteria = (p.get("criteria") or {}).get("allOf") or []
            text = json.dumps([t.resolve(c.get("query")) for c in criteria if isinstance(c, dict)])
            if "SecretNearExpiryEventGridNotification" in text and "SecretSet" in text:
                overdue = True
                overdue_severity = p.get("severity")
                if p.get("autoMitigate") is not False:
                    problems.append(f"{where}: autoMitigate must be false (the alert stays until closed)")
                if "ago(overdue)" not in text:
                    problems.append(f"{where}: query has no overdue grace period")
                if p.get("skipQueryValidation") is not True:
                    problems.append(
                        f"{where}: skipQueryValidation is not true (AzureDiagnostics has no Key Vault "
                        "columns before the vault's first log: creating the rule would fail on a fresh "
                        "workspace)"
                    )
            if "ApiManagementGatewayLogs" in text and "ResponseCode == 401" in text:
                unauthorized = True
            for days, severity in _expiry_thresholds(t, res, criteria):
                expiring[days] = severity
                if p.get("autoMitigate") is not False or p.get("skipQueryValidation") is not True:
                    problems.append(
                        f"{where}: expiry alerts need autoMitigate false, skipQueryValidation true"
                    )
            if not _notifies_created_group(t, (p.get("actions") or {}).get("actionGroups"), templates):
                problems.append(f"{where}: does not notify the action group created with receivers")
    for key, what in REQUIRED_METRIC_ALERTS.items():
        if key not in found:
            problems.append(f"no metric alert for {what} ({key[0]} {key[1]})")
    if not overdue:
        problems.append("no scheduled query alert for a secret near expiry without a new version")
    if not unauthorized:
        problems.append("no scheduled query alert on the gateway's 401 rate (ApiManagementGatewayLogs)")
    for days in EXPIRY_ALERT_DAYS:
        if days not in expiring:
            problems.append(f"no scheduled query alert {days} day(s) before the key's expiry")
    # escalating: overdue (about 29 days before), then 7 days, then 1 day; 0 is the most severe
    ladder = [overdue_severity] + [expiring.get(d) for d in EXPIRY_ALERT_DAYS]
    if all(isinstance(s, int) for s in ladder) and not all(a > b for a, b in itertools.pairwise(ladder)):
        problems.append(f"expiry alert severities do not escalate (overdue, 7 days, 1 day): {ladder}")
    return problems


EXPIRY_ALERT_DAYS = (7, 1)


def _expiry_thresholds(t: Template, res: dict[str, Any], criteria: list[Any]) -> list[tuple[int, Any]]:
    """(days, severity) of each rule a scheduled-query resource makes whose query is a near-expiry query
    (the vault's notification and SecretSet rows) filtered on ``daysToExpiry <= days``: a loop over a literal
    array whose items give ``days`` (the format argument) and ``severity``."""
    loop = loop_items(t, res)
    if loop is None:
        return []
    item, items = loop
    found = []
    for criterion in criteria:
        fn = ((criterion.get("query") or {}) if isinstance(criterion, dict) else {}).get("function") or {}
        params = fn.get("parameters") or {}
        template = t.resolve(params.get("format_string"))
        if fn.get("type") != "format" or not isinstance(template, str):
            continue
        if "SecretNearExpiryEventGridNotification" not in template or "daysToExpiry <= days" not in template:
            continue
        for arg in (params[k] for k in sorted(params) if k.startswith("arg_")):
            if _accessor(arg) == (item, "days"):
                severity = _accessor(_props(res).get("severity"))
                for entry in items:
                    if isinstance(entry, dict) and isinstance(entry.get("days"), int):
                        value = entry.get("severity") if severity == (item, "severity") else None
                        found.append((entry["days"], value))
    return found


# ------------------------------------------------------------------------------- APIM logging: key masked

APIM_LOGGER = "Microsoft.ApiManagement/service/loggers"
APIM_DIAGNOSTICS = (
    "Microsoft.ApiManagement/service/diagnostics",
    "Microsoft.ApiManagement/service/apis/diagnostics",
)
KEY_QUERY_PARAMETER = "subscription-key"
KEY_HEADER = "ocp-apim-subscription-key"
MASK_MODES = {"Hide", "Mask"}


def _masks(entities: Any, name: str) -> bool:
    return isinstance(entities, list) and any(
        isinstance(e, dict) and str(e.get("value", "")).lower() == name and e.get("mode") in MASK_MODES
        for e in entities
    )


def check_apim_logging(templates: Iterable[Template]) -> list[str]:
    """Every APIM diagnostic (service-wide and per API, i.e. every logger's) masks the subscription key where
    a request carries it: dataMasking on frontend.request and backend.request with the subscription-key query
    parameter and the Ocp-Apim-Subscription-Key header, mode Hide or Mask. Every logger declared is used by
    such a diagnostic."""
    problems: list[str] = []
    used_loggers: set[str] = set()
    loggers: list[tuple[str, str]] = []
    for t in templates:
        loggers += [(t.name, symbol) for symbol, _ in t.of_type(APIM_LOGGER)]
        for rtype in APIM_DIAGNOSTICS:
            for symbol, res in t.of_type(rtype):
                where = f"{t.name}:{symbol}"
                p = expand(t, _props(res))
                logger = _accessor(p.get("loggerId"))
                if logger and logger[1] == "id":
                    used_loggers.add(f"{t.name}:{logger[0]}")
                for side in ("frontend", "backend"):
                    request = (
                        ((p.get(side) or {}).get("request") or {}) if isinstance(p.get(side), dict) else {}
                    )
                    masking = request.get("dataMasking") if isinstance(request, dict) else None
                    masking = masking if isinstance(masking, dict) else {}
                    if not _masks(masking.get("queryParams"), KEY_QUERY_PARAMETER):
                        problems.append(
                            f"{where}: {side}.request.dataMasking does not hide/mask query parameter "
                            f"{KEY_QUERY_PARAMETER}"
                        )
                    if not _masks(masking.get("headers"), KEY_HEADER):
                        problems.append(
                            f"{where}: {side}.request.dataMasking does not hide/mask header "
                            "Ocp-Apim-Subscription-Key"
                        )
    for name, symbol in loggers:
        if f"{name}:{symbol}" not in used_loggers:
            problems.append(f"{name}:{symbol}: logger without a diagnostic that masks the key")
    return problems


# ---------------------------------------------------------------------------------- function egress

SUBNET_DELEGATION_FUNCTIONS = "Microsoft.App/environments"
NAT_GATEWAY = "Microsoft.Network/natGateways"


def check_function_egress(templates: Iterable[Template]) -> list[str]:
    """The Flex Consumption integration subnet (delegated to Microsoft.App/environments) has explicit egress:
    a NAT gateway of the same file attached, and defaultOutboundAccess false (no reliance on the implicit
    outbound access Microsoft is retiring)."""
    problems: list[str] = []
    for t in templates:
        nat_symbols = {symbol for symbol, _ in t.of_type(NAT_GATEWAY)}
        for symbol, res in t.of_type("Microsoft.Network/virtualNetworks"):
            for subnet in _props(res).get("subnets") or []:
                if not isinstance(subnet, dict):
                    continue
                sp = subnet.get("properties") or {}
                delegations = json.dumps(sp.get("delegations") or [])
                if SUBNET_DELEGATION_FUNCTIONS not in delegations:
                    continue
                where = f"{t.name}:{symbol}/{t.resolve(subnet.get('name'))}"
                nat = (
                    _accessor((sp.get("natGateway") or {}).get("id"))
                    if isinstance(sp.get("natGateway"), dict)
                    else None
                )
                if not nat or nat[0] not in nat_symbols or nat[1] != "id":
                    problems.append(f"{where}: function subnet without a NAT gateway (egress left implicit)")
                if sp.get("defaultOutboundAccess") is not False:
                    problems.append(f"{where}: defaultOutboundAccess is not false")
    return problems


# ------------------------------------------------------------------------------------ token limits


TOKEN_LIMIT_POLICIES = ("azure-openai-token-limit", "llm-token-limit")


def policy_text(t: Template, res: dict[str, Any]) -> str | None:
    """The XML of an APIM policy resource: a literal value, or the file loadTextContent() names (relative
    to the template's folder under infra/)."""
    value = _props(res).get("value")
    if isinstance(value, str):
        return value
    fn = (value or {}).get("function") if isinstance(value, dict) else None
    if fn and fn.get("type") == "load_text_content":
        path = (fn.get("parameters") or {}).get("file_path")
        if isinstance(path, str):
            file = INFRA / Path(t.name).parent / path
            return file.read_text() if file.is_file() else None
    return None


def _prompt_estimate_problems(templates: Iterable[Template]) -> list[str]:
    """estimate-prompt-tokens="true" only on an API imported from a specification (properties.format and
    value): APIM estimates prompt tokens from the API's prompt schema, which a hand-defined API lacks, so
    there the attribute promises a pre-check that never happens."""
    problems: list[str] = []
    for t in templates:
        for symbol, res in t.of_type("Microsoft.ApiManagement/service/apis/policies"):
            text = policy_text(t, res) or ""
            if not re.search(r'estimate-prompt-tokens\s*=\s*"true"', text):
                continue
            if not any(tag in text for tag in TOKEN_LIMIT_POLICIES):
                continue
            api = t.resources.get(str(config_of(res).get("parent")))
            api_props = _props(api) if api else {}
            if not (api_props.get("format") and api_props.get("value")):
                problems.append(
                    f'{t.name}:{symbol}: estimate-prompt-tokens="true" on an API without an imported '
                    "specification (no prompt schema to estimate from)"
                )
    return problems


def check_token_limits(templates: Iterable[Template]) -> list[str]:
    """The APIM named value the token-limit policy reads is set from a bounded parameter with a default, the
    API's Application Insights diagnostic has custom metrics on (the token-metric policy needs it), and
    prompt-token estimation is asked for only where the API has a prompt schema."""
    templates = list(templates)
    problems: list[str] = []
    named = metrics = False
    for t in templates:
        for symbol, res in t.of_type("Microsoft.ApiManagement/service/namedValues"):
            p = _props(res)
            if config_of(res).get("name") != "apimvault-tokens-per-minute":
                continue
            named = True
            value = p.get("value")
            fn = value.get("function") if isinstance(value, dict) else None
            ref = ((fn or {}).get("parameters") or {}).get("value_to_convert")
            param = t.parameters.get(ref) if isinstance(ref, str) else None
            if (
                param is None
                or not isinstance(ref, str)
                or not isinstance(param.get("default"), int)
                or t.decorator(ref, "min_value") is None
            ):
                problems.append(
                    f"{t.name}:{symbol}: value is not string(<int param with default and @minValue>)"
                )
            if p.get("secret") is not False:
                problems.append(f"{t.name}:{symbol}: secret is not explicitly false")
        for _, res in t.of_type("Microsoft.ApiManagement/service/apis/diagnostics"):
            p = _props(res)
            if p.get("metrics") is True and p.get("logClientIp") is False:
                metrics = True
    problems += _prompt_estimate_problems(templates)
    emits = any(
        "emit-token-metric" in (policy_text(t, res) or "")
        for t in templates
        for _, res in t.of_type("Microsoft.ApiManagement/service/apis/policies")
    )
    for t in templates:
        for symbol, res in t.of_type("Microsoft.Insights/components"):
            if emits and t.resolve(_props(res).get("CustomMetricsOptedInType")) != "WithDimensions":
                problems.append(
                    f"{t.name}:{symbol}: CustomMetricsOptedInType is not 'WithDimensions' (the token "
                    "metrics' dimensions would be dropped)"
                )
    if not named:
        problems.append("no named value apimvault-tokens-per-minute for the azure-openai-token-limit policy")
    if not metrics:
        problems.append("no API diagnostic with metrics: true (and logClientIp: false) for the token metrics")
    return problems
