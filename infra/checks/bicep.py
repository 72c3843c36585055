"""The Bicep model the checks share: pycep parsing (cached on disk), :class:`Template`, the resource types and
role ids they name, and small helpers over pycep's JSON.

Parsing is pycep (the parser checkov's Bicep runner uses). pycep does not tell a string literal from an
identifier, so a string equal to a symbol of the same file (parameter, variable, resource, module) is read
as a reference to it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
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


def res_props(res: dict[str, Any]) -> dict[str, Any]:
    props = config_of(res).get("properties")
    return props if isinstance(props, dict) else {}


def strip_quotes(key: str) -> str:
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == "'" else key


def accessor_of(value: Any) -> tuple[Any, Any] | None:
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
    acc = accessor_of(value)
    if acc is None:
        return None
    left, right = dotted(acc[0]), dotted(acc[1])
    return None if left is None or right is None else f"{left}.{right}"


def literal_values(value: Any) -> set[Any]:
    """The literal values an expression can take (through conditionals), or {value} for a literal."""
    if isinstance(value, dict):
        op = value.get("operator") or {}
        if op.get("type") == "conditional":
            operands = op.get("operands") or {}
            return literal_values(operands.get("true_value")) | literal_values(operands.get("false_value"))
        return {json.dumps(value, sort_keys=True)}
    return {value}


def is_true(value: Any) -> bool:
    return value is True


def is_false(value: Any) -> bool:
    return value is False or (isinstance(value, str) and value.lower() == "false")


def diagnostics_problems(t: Template, symbol: str, where: str, *, need_logs: bool) -> list[str]:
    for _, diag in t.of_type(DIAGNOSTIC_SETTINGS):
        if config_of(diag).get("scope") != symbol:
            continue
        p = res_props(diag)
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


def has_private_endpoint(t: Template, symbol: str, group_id: str) -> bool:
    for mod in t.modules.values():
        params = (mod.get("config") or {}).get("params") or {}
        if (
            accessor_of(params.get("targetResourceId")) == (symbol, "id")
            and params.get("groupId") == group_id
        ):
            return True
    for _, pe in t.of_type("Microsoft.Network/privateEndpoints"):
        text = json.dumps(pe)
        if f'"operand_1": "{symbol}"' in text and f'"{group_id}"' in text:
            return True
    return False
