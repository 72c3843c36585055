"""Check parsed Bicep resource blocks against Azure's published resource type definitions.

No Bicep compiler is available here, so this is the next best thing: every resource declaration in
``infra/`` is compared with the type definitions Bicep itself compiles against (the ``Azure/bicep-types-az``
repository; the subset for the types ``infra/`` uses is vendored in ``bicep_types/subset.json`` with its
licence and commit).

What is checked, for each resource (``existing`` ones: only that the type@api-version exists):
- the type and api-version exist in the definitions;
- every property name, at every depth (objects, arrays, loops, discriminated objects such as an Event Grid
  destination), is defined for that type; a read-only property is not assigned;
- required properties are present (only where the value is an object literal);
- literal values have the right kind (string, integer, boolean, object, array), string literals match a
  closed enum (a union of string literals without a free-form ``string`` member), integer literals respect
  min/max, string literals respect min/max length;
- a value that references a parameter is checked through the parameter's ``@allowed`` values and default,
  a variable through its value.

Across files (``check_module_wiring``): every parameter a module call passes exists in the module file, every
parameter without a default is passed, every ``<module>.outputs.<name>`` read exists.

What is not checked: expressions (function calls, interpolated strings, property accessors, conditionals
other than through literals) are accepted for any type; regex ``pattern`` constraints are not applied (.NET
and Python regex dialects differ); the types of module parameters and outputs; resource functions
(``listSecrets()``).
pycep does not tell a string literal from an identifier, so a string equal to a symbol of the file
(parameter, variable, resource, module, loop variable) is read as a reference to it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .bicep import Template

TYPES_DIR = Path(__file__).resolve().parent / "bicep_types"
SUBSET = TYPES_DIR / "subset.json"

REQUIRED = 1
READ_ONLY = 2
# Properties ARM accepts that the published definitions lack, each with its evidence and the literal values
# allowed. Anything else unknown is still an error.
UNDOCUMENTED_PROPERTIES: dict[tuple[str, str], tuple[set[str], str]] = {
    ("ApplicationInsightsComponentProperties", "CustomMetricsOptedInType"): (
        {"WithDimensions", "NoDimensions", "NoMeasurements", "Off"},
        "Azure/bicep#6595 (a Microsoft engineer lists the values; the portal's 'Custom metrics: With "
        "dimensions' switch writes it); MicrosoftDocs/azure-docs#54745",
    ),
}
BICEP_KEYWORDS = {"parent", "scope", "dependsOn"}  # resource-body keys Bicep handles itself
_EXPRESSION_KEYS = ({"operator"}, {"function"})


class TypeIndex:
    """The vendored type table with lookups by ``Type@api-version`` (case-insensitive, as ARM is)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.commit: str = data["commit"]
        self.repository: str = data["repository"]
        self.types: list[dict[str, Any]] = data["types"]
        self.resources = {name.lower(): entry for name, entry in data["resources"].items()}
        self.names = sorted(data["resources"])

    def deref(self, ref: dict[str, Any]) -> dict[str, Any]:
        return self.types[int(str(ref["$ref"]).removeprefix("#/"))]

    def body(self, rtype: str, api_version: str) -> dict[str, Any] | None:
        entry = self.resources.get(f"{rtype}@{api_version}".lower())
        return None if entry is None else self.deref(self.deref(entry)["body"])

    def known_versions(self, rtype: str) -> list[str]:
        prefix = f"{rtype.lower()}@"
        return sorted(n.split("@", 1)[1] for n in self.names if n.lower().startswith(prefix))


@functools.cache
def load_index(path: Path = SUBSET) -> TypeIndex:
    return TypeIndex(json.loads(path.read_text()))


def check_resource_types(templates: Iterable[Template], index: TypeIndex | None = None) -> list[str]:
    """Every violation found in ``templates`` (empty when all resource blocks match their definitions)."""
    index = index or load_index()
    problems: list[str] = []
    for t in templates:
        checker = _Checker(t, index)
        for symbol, res in t.resources.items():
            problems += checker.resource(symbol, res)
    return problems


def _unwrap(config: Any) -> Any:
    """The body of a resource or array item, through ``if (...)`` and ``[for ...]`` wrappers."""
    wrappers = {"loop_type", "condition", "config"}
    while isinstance(config, dict) and "config" in config and set(config) <= wrappers:
        config = config["config"]
    return config


def _is_loop(value: Any) -> bool:
    return isinstance(value, dict) and "loop_type" in value and "config" in value


def _is_expression(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and any(set(value) == keys for keys in _EXPRESSION_KEYS)
        and isinstance(next(iter(value.values())), dict)
    )


def _loop_variables(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        detail = (value.get("loop_type") or {}).get("detail") if "loop_type" in value else None
        if isinstance(detail, dict):
            for key in ("item_name", "index_name"):
                if isinstance(detail.get(key), str):
                    yield detail[key]
        for v in value.values():
            yield from _loop_variables(v)
    elif isinstance(value, list):
        for v in value:
            yield from _loop_variables(v)


class _Checker:
    def __init__(self, template: Template, index: TypeIndex) -> None:
        self.t = template
        self.index = index
        doc = template.doc
        self.symbols = (
            set(template.parameters)
            | set(template.variables)
            | set(template.resources)
            | set(template.modules)
            | set(_loop_variables(doc))
        )

    def resource(self, symbol: str, res: dict[str, Any]) -> list[str]:
        rtype, version = str(res.get("type")), str(res.get("api_version"))
        where = f"{self.t.name}:{symbol}"
        body = self.index.body(rtype, version)
        if body is None:
            known = self.index.known_versions(rtype)
            hint = f"vendored api-versions of this type: {', '.join(known)}" if known else "type not vendored"
            return [
                f"{where}: {rtype}@{version} is not in the published type definitions ({hint}; a wrong "
                "api-version, or a new type: run infra/checks/bicep_types/refresh.py)"
            ]
        if res.get("existing"):
            return []
        config = _unwrap(res.get("config") or {})
        if not isinstance(config, dict):
            return [f"{where}: body is not an object"]
        return self.object(config, body, where, skip=BICEP_KEYWORDS)

    # ----------------------------------------------------------------------------------------- values

    def check(self, value: Any, type_ref: dict[str, Any], where: str) -> list[str]:
        return self.value(value, self.index.deref(type_ref), where)

    def value(self, value: Any, typ: dict[str, Any], where: str, _depth: int = 0) -> list[str]:
        kind = typ["$type"]
        if kind == "AnyType" or _is_expression(value) or value is None:
            return []
        if isinstance(value, str) and (value in self.symbols or "${" in value):
            return self.reference(value, typ, where, _depth)
        if kind == "ObjectType":
            if not isinstance(value, dict):
                return [f"{where}: expected an object, got {json.dumps(value)}"]
            return self.object(value, typ, where)
        if kind == "DiscriminatedObjectType":
            if not isinstance(value, dict):
                return [f"{where}: expected an object, got {json.dumps(value)}"]
            return self.discriminated(value, typ, where)
        if kind == "ArrayType":
            if _is_loop(value):
                return self.check(_unwrap(value), typ["itemType"], f"{where}[for]")
            if not isinstance(value, list):
                return [f"{where}: expected an array, got {json.dumps(value)}"]
            problems = []
            if "minLength" in typ and len(value) < typ["minLength"]:
                problems.append(f"{where}: at least {typ['minLength']} items required")
            if "maxLength" in typ and len(value) > typ["maxLength"]:
                problems.append(f"{where}: at most {typ['maxLength']} items allowed")
            for i, item in enumerate(value):
                problems += self.check(item, typ["itemType"], f"{where}[{i}]")
            return problems
        if kind == "UnionType":
            return self.union(value, typ, where)
        if kind == "StringLiteralType":
            if value != typ["value"]:
                return [f"{where}: {json.dumps(value)} is not {json.dumps(typ['value'])}"]
            return []
        if kind == "StringType":
            if not isinstance(value, str):
                return [f"{where}: expected a string, got {json.dumps(value)}"]
            problems = []
            if "minLength" in typ and len(value) < typ["minLength"]:
                problems.append(f"{where}: {json.dumps(value)} is shorter than {typ['minLength']}")
            if "maxLength" in typ and len(value) > typ["maxLength"]:
                problems.append(f"{where}: {json.dumps(value)} is longer than {typ['maxLength']}")
            return problems
        if kind == "IntegerType":
            if isinstance(value, bool) or not isinstance(value, int):
                return [f"{where}: expected an integer, got {json.dumps(value)}"]
            problems = []
            if "minValue" in typ and value < typ["minValue"]:
                problems.append(f"{where}: {value} is below the minimum {typ['minValue']}")
            if "maxValue" in typ and value > typ["maxValue"]:
                problems.append(f"{where}: {value} is above the maximum {typ['maxValue']}")
            return problems
        if kind == "BooleanType":
            if not isinstance(value, bool):
                return [f"{where}: expected a boolean, got {json.dumps(value)}"]
            return []
        if kind == "NullType":
            return [f"{where}: expected null, got {json.dumps(value)}"]
        return [f"{where}: unsupported type kind {kind}"]

    def reference(self, name: str, typ: dict[str, Any], where: str, depth: int) -> list[str]:
        """A parameter (its @allowed values and default) or a variable (its value); anything else passes."""
        if depth > 5 or "${" in name:
            return []
        candidates: list[Any] = []
        if name in self.t.parameters:
            allowed = self.t.decorator(name, "allowed")
            if isinstance(allowed, list):
                candidates += allowed
            default = self.t.parameters[name].get("default")
            if default is not None:
                candidates.append(default)
        elif name in self.t.variables:
            candidates.append(self.t.variables[name].get("value"))
        problems = []
        for candidate in candidates:
            if candidate == name:
                continue
            problems += [f"{p} (through {name})" for p in self.value(candidate, typ, where, depth + 1)]
        return problems

    def union(self, value: Any, typ: dict[str, Any], where: str) -> list[str]:
        members = [self.index.deref(m) for m in typ["elements"]]
        results = [self.value(value, m, where) for m in members]
        if any(not r for r in results):
            return []
        literals = [m["value"] for m in members if m["$type"] == "StringLiteralType"]
        if literals and isinstance(value, str):
            return [f"{where}: {json.dumps(value)} is not one of {json.dumps(literals)}"]
        return min(results, key=len)

    def object(
        self, value: dict[str, Any], typ: dict[str, Any], where: str, *, skip: set[str] | None = None
    ) -> list[str]:
        properties: dict[str, Any] = typ.get("properties") or {}
        additional = typ.get("additionalProperties")
        problems = []
        for raw_key, item in value.items():
            key = raw_key[1:-1] if len(raw_key) >= 2 and raw_key[0] == raw_key[-1] == "'" else raw_key
            if skip and key in skip:
                continue
            path = f"{where}.{key}"
            prop = properties.get(key)
            undocumented = UNDOCUMENTED_PROPERTIES.get((str(typ.get("name")), key))
            if prop is None and undocumented is not None:
                allowed, _evidence = undocumented
                resolved = self.t.resolve(item)
                if isinstance(resolved, str) and resolved not in allowed and not _is_expression(resolved):
                    problems.append(f"{path}: {json.dumps(resolved)} is not one of {sorted(allowed)}")
                continue
            if prop is None:
                if additional is not None:
                    problems += self.check(item, additional, path)
                else:
                    known = ", ".join(sorted(k for k, p in properties.items() if not p["flags"] & READ_ONLY))
                    name = typ.get("name", "object")
                    problems.append(f"{path}: unknown property of {name} (known: {known})")
                continue
            if prop["flags"] & READ_ONLY:
                problems.append(f"{path}: read-only property of {typ.get('name', 'object')}")
                continue
            problems += self.check(item, prop["type"], path)
        present = {k[1:-1] if len(k) >= 2 and k[0] == k[-1] == "'" else k for k in value}
        for key, prop in properties.items():
            if prop["flags"] & REQUIRED and not prop["flags"] & READ_ONLY and key not in present:
                problems.append(f"{where}: required property {key} missing")
        return problems

    def discriminated(self, value: dict[str, Any], typ: dict[str, Any], where: str) -> list[str]:
        key = typ["discriminator"]
        chosen = value.get(key, value.get(f"'{key}'"))
        elements: dict[str, Any] = typ["elements"]
        if isinstance(chosen, str) and chosen not in self.symbols and chosen in elements:
            element = self.index.deref(elements[chosen])
            merged = {
                "name": element.get("name", typ.get("name")),
                "properties": {**(typ.get("baseProperties") or {}), **(element.get("properties") or {})},
            }
            return self.object(value, merged, where)
        if isinstance(chosen, str) and chosen not in self.symbols:
            return [f"{where}.{key}: {json.dumps(chosen)} is not one of {json.dumps(sorted(elements))}"]
        if chosen is None:
            return [f"{where}: discriminator {key} missing (one of {json.dumps(sorted(elements))})"]
        return []  # an expression picks the variant: nothing more to check statically


def check_module_wiring(templates: Iterable[Template]) -> list[str]:
    """What the Bicep compiler would say about module calls between the files: every module parameter passed
    exists in the module file, every parameter without a default is passed, and every ``<module>.outputs.<x>``
    read exists in the module file's outputs."""
    templates = list(templates)
    by_name = {t.name: t for t in templates}
    problems: list[str] = []
    for t in templates:
        base = Path(t.name).parent
        targets: dict[str, Template] = {}
        for symbol, mod in t.modules.items():
            path = str((mod.get("detail") or {}).get("path") or "")
            target = by_name.get(str(base / path)) or by_name.get(path)
            where = f"{t.name}:{symbol}"
            if target is None:
                problems.append(f"{where}: module file {path!r} not found")
                continue
            targets[symbol] = target
            params = _unwrap(mod.get("config") or {}).get("params") or {}
            for name in params:
                if name not in target.parameters:
                    problems.append(f"{where}: {target.name} has no parameter {name!r}")
            for name, param in target.parameters.items():
                if param.get("default") is None and name not in params:  # pycep: None = no default
                    problems.append(f"{where}: required parameter {name!r} of {target.name} not passed")
        for symbol, output in _output_reads(t.doc):
            if symbol in targets and output not in targets[symbol].outputs:
                problems.append(
                    f"{t.name}: {symbol}.outputs.{output} is not an output of {targets[symbol].name}"
                )
    return problems


def _output_reads(value: Any) -> Iterator[tuple[str, str]]:
    """(module symbol, output name) of every ``<symbol>.outputs.<name>`` accessor in a parsed document."""
    if isinstance(value, dict):
        op = value.get("operator")
        if isinstance(op, dict) and op.get("type") == "property_accessor":
            operands = op.get("operands") or {}
            left, right = operands.get("operand_1"), operands.get("operand_2")
            inner = (right.get("operator") or {}) if isinstance(right, dict) else {}
            if isinstance(left, str) and inner.get("type") == "property_accessor":
                names = inner.get("operands") or {}
                if names.get("operand_1") == "outputs" and isinstance(names.get("operand_2"), str):
                    yield left, names["operand_2"]
        for v in value.values():
            yield from _output_reads(v)
    elif isinstance(value, list):
        for v in value:
            yield from _output_reads(v)
