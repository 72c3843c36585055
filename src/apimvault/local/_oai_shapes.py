"""Deterministic model output for the local Azure OpenAI backend: tool calls and structured outputs.

Real Azure OpenAI answers ``tools`` + ``tool_choice`` with ``tool_calls`` whose ``arguments`` match each
function's JSON schema, and ``response_format`` ``json_schema`` (``strict``) / ``json_object`` with JSON
content matching the schema. The local backend derives both from the schema and the request alone, so the
same request always gets the same answer and framework tests can assert on it.

The rule (documented in the backend's module docstring too):

* ``tool_choice`` ``{"type": "function", "function": {"name": N}}`` -> one call of ``N``;
* ``"required"`` -> a call of every tool when ``parallel_tool_calls`` is not false, else of the first;
* ``"auto"`` (or absent, with tools) -> the same as ``"required"`` while the conversation has no tool
  result yet (no ``role: "tool"`` message / ``function_call_output`` item); once one is present, a plain
  text answer (so an agent loop calls its tool once, then finishes);
* ``"none"`` -> plain text.

Instances come from :func:`instance_for`, a compact generator (no library on the package lists generates
instances deterministically: ``hypothesis-jsonschema`` and ``jsf`` draw random ones). It handles the JSON
Schema subset structured outputs allow (object/array/string/number/integer/boolean/null, ``enum``,
``const``, ``anyOf``/``oneOf``/``allOf``, ``$ref`` into ``$defs``/``definitions``, ``required``, length and
range bounds, common ``format``s). ``pattern`` is not honoured (strict mode accepts it; a generated string
may not match).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

_MAX_DEPTH = 12


class SchemaError(ValueError):
    """The schema cannot be instantiated (a dangling ``$ref``, a cycle without an exit)."""


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    if not ref.startswith("#/"):
        raise SchemaError(f"only local $ref is supported, not {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise SchemaError(f"$ref {ref!r} does not resolve")
        node = node[part]
    if not isinstance(node, dict):
        raise SchemaError(f"$ref {ref!r} is not a schema")
    return node


def _string(schema: dict[str, Any], seed: str) -> str:
    fmt = schema.get("format")
    h = _digest("str", seed)
    if fmt == "date-time":
        return f"2026-{int(h[:2], 16) % 12 + 1:02d}-{int(h[2:4], 16) % 28 + 1:02d}T12:00:00Z"
    if fmt == "date":
        return f"2026-{int(h[:2], 16) % 12 + 1:02d}-{int(h[2:4], 16) % 28 + 1:02d}"
    if fmt == "time":
        return "12:00:00Z"
    if fmt == "email":
        return f"user-{h[:8]}@example.com"
    if fmt == "uuid":
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"
    if fmt in ("uri", "url"):
        return f"https://example.com/{h[:8]}"
    if fmt == "ipv4":
        return f"192.0.2.{int(h[:2], 16) % 254 + 1}"
    text = f"value-{h[:8]}"
    low = int(schema.get("minLength", 0))
    high = schema.get("maxLength")
    if len(text) < low:
        text = (text * (low // len(text) + 1))[:low]
    if isinstance(high, int) and len(text) > high:
        text = text[:high]
    return text


def _number(schema: dict[str, Any], seed: str, integer: bool) -> int | float:
    low = schema.get("minimum")
    high = schema.get("maximum")
    if isinstance(schema.get("exclusiveMinimum"), (int, float)):
        low = schema["exclusiveMinimum"] + (1 if integer else 0.5)
    if isinstance(schema.get("exclusiveMaximum"), (int, float)):
        high = schema["exclusiveMaximum"] - (1 if integer else 0.5)
    raw = int(_digest("num", seed)[:6], 16) % 100
    lo = low if isinstance(low, (int, float)) else (0 if not isinstance(high, (int, float)) else high - 100)
    hi = high if isinstance(high, (int, float)) else lo + 100
    if hi < lo:
        hi = lo
    value: int | float = lo + (hi - lo) * raw / 100
    if integer:
        value = int(value)
        if isinstance(low, (int, float)) and value < low:
            value = int(low) + (0 if float(low).is_integer() else 1)
    multiple = schema.get("multipleOf")
    if isinstance(multiple, (int, float)) and multiple > 0:
        value = type(value)(round(value / multiple) * multiple)
    return value


def instance_for(schema: Any, seed: str, root: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A JSON value valid against ``schema``, the same for the same ``(schema, seed)``."""
    if schema is True or schema is None:
        return _string({}, seed)
    if not isinstance(schema, dict):
        raise SchemaError("a schema must be an object")
    root = schema if root is None else root
    if depth > _MAX_DEPTH:
        raise SchemaError("schema nests too deeply (a $ref cycle without an optional exit?)")
    if "$ref" in schema:
        merged = {**_resolve(str(schema["$ref"]), root), **{k: v for k, v in schema.items() if k != "$ref"}}
        return instance_for(merged, seed, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        options = schema["enum"]
        return options[int(_digest("enum", seed)[:4], 16) % len(options)]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            # The first branch that is not null: frameworks read Optional[X] as anyOf [X, null].
            branches = [b for b in schema[key] if not (isinstance(b, dict) and b.get("type") == "null")]
            return instance_for((branches or schema[key])[0], seed, root, depth + 1)
    if isinstance(schema.get("allOf"), list):
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = _resolve(part["$ref"], root) if isinstance(part, dict) and "$ref" in part else part
            if isinstance(part, dict):
                for k, v in part.items():
                    if k in ("properties",) and isinstance(v, dict):
                        merged.setdefault(k, {}).update(v)
                    elif k == "required" and isinstance(v, list):
                        merged["required"] = [*merged.get("required", []), *v]
                    else:
                        merged.setdefault(k, v)
        return instance_for(merged, seed, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if kinds else "null"
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        required = schema.get("required")
        out: dict[str, Any] = {}
        for name in props:  # every property (strict mode makes them all required anyway)
            out[name] = instance_for(props[name], f"{seed}/{name}", root, depth + 1)
        for name in required or []:
            if name not in out:
                out[name] = _string({}, f"{seed}/{name}")
        return out
    if kind == "array":
        items = schema.get("items", {})
        count = max(1, int(schema.get("minItems", 1)))
        if isinstance(schema.get("maxItems"), int):
            count = min(count, schema["maxItems"])
        if isinstance(schema.get("prefixItems"), list):
            return [
                instance_for(s, f"{seed}[{i}]", root, depth + 1) for i, s in enumerate(schema["prefixItems"])
            ]
        return [instance_for(items, f"{seed}[{i}]", root, depth + 1) for i in range(count)]
    if kind == "string":
        return _string(schema, seed)
    if kind == "integer":
        return _number(schema, seed, integer=True)
    if kind == "number":
        return _number(schema, seed, integer=False)
    if kind == "boolean":
        return int(_digest("bool", seed)[:2], 16) % 2 == 0
    if kind == "null":
        return None
    raise SchemaError(f"unsupported schema type {kind!r}")


# ------------------------------------------------------------------------------------------- tools


def function_tools(tools: Any) -> list[dict[str, Any]]:
    """The function definitions of ``tools`` (chat shape ``{"type":"function","function":{...}}`` or the
    Responses shape ``{"type":"function","name":...,"parameters":...}``), as ``{"name","parameters"}``."""
    out: list[dict[str, Any]] = []
    if not isinstance(tools, list):
        return out
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        inner = tool.get("function")
        fn: dict[str, Any] = inner if isinstance(inner, dict) else tool
        name = fn.get("name")
        if isinstance(name, str) and name:
            params = fn.get("parameters")
            out.append(
                {"name": name, "parameters": params if isinstance(params, dict) else {"type": "object"}}
            )
    return out


def chosen_tools(
    tools: list[dict[str, Any]], tool_choice: Any, parallel: Any, has_tool_result: bool
) -> list[dict[str, Any]]:
    """Which functions the model calls for this request (the rule in the module docstring)."""
    if not tools or tool_choice == "none":
        return []
    if isinstance(tool_choice, dict):
        inner = tool_choice.get("function")
        picked: dict[str, Any] = inner if isinstance(inner, dict) else tool_choice
        name = picked.get("name")
        return [t for t in tools if t["name"] == name][:1]
    if tool_choice in (None, "auto") and has_tool_result:
        return []
    return tools if parallel is not False else tools[:1]


def call_id(prefix: str, seed: str, name: str, index: int) -> str:
    return prefix + _digest("call", seed, name, str(index))[:24]


def arguments_for(tool: dict[str, Any], seed: str) -> str:
    """The JSON ``arguments`` string of a call of ``tool``, valid against its ``parameters``."""
    value = instance_for(tool["parameters"], f"{tool['name']}:{seed}")
    return json.dumps(value, separators=(",", ":"))


def structured_content(response_format: Any, seed: str) -> str | None:
    """The JSON text for ``response_format`` ``json_schema`` / ``json_object``; None for text."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return json.dumps({"reply": f"apimvault local reply to {_digest('json', seed)[:16]}."})
    if kind == "json_schema":
        inner = response_format.get("json_schema")
        # Responses API: text.format carries "schema" at the top level.
        spec: dict[str, Any] = inner if isinstance(inner, dict) else response_format
        schema = spec.get("schema") if isinstance(spec.get("schema"), dict) else {"type": "object"}
        return json.dumps(instance_for(schema, seed), separators=(",", ":"))
    return None
