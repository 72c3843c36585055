"""Validating local answers against Microsoft's OpenAPI 3.0 specs (``data/specs/``, see its SOURCES.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]

SPECS = Path(__file__).parent / "data" / "specs"
_DROP = frozenset({"nullable", "deprecated", "discriminator", "readOnly", "writeOnly", "x-oaiTypeLabel"})


def to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 schema -> JSON Schema (draft 2020-12): ``nullable`` becomes a ``null`` alternative,
    ``#/components/schemas/X`` becomes ``#/$defs/X``."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key.startswith("x-"):
            continue
        if key == "$ref" and isinstance(value, str):
            out[key] = value.replace("#/components/schemas/", "#/$defs/")
        elif key in ("properties", "$defs", "patternProperties"):
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        else:
            out[key] = to_json_schema(value)
    if node.get("nullable") is True:
        if isinstance(out.get("type"), str) and "$ref" not in out:
            out["type"] = [out["type"], "null"]
            if isinstance(out.get("enum"), list):
                out["enum"] = [*out["enum"], None]
        else:
            return {"anyOf": [out, {"type": "null"}]}
    return out


class OpenApiSpec:
    """One spec file: look up an operation's response schema and validate bodies against it."""

    def __init__(self, filename: str) -> None:
        self.raw: dict[str, Any] = json.loads((SPECS / filename).read_text(encoding="utf-8"))
        self.defs = {k: to_json_schema(v) for k, v in self.raw["components"]["schemas"].items()}
        self.validated: list[str] = []

    def response(self, path: str, method: str, status: int) -> dict[str, Any]:
        responses = self.raw["paths"][path][method]["responses"]
        found = responses.get(str(status)) or responses.get("default")
        assert found is not None, f"the spec gives {method.upper()} {path} no {status} answer"
        return dict(found)

    def schema_of(
        self, path: str, method: str, status: int, media: str = "application/json"
    ) -> dict[str, Any]:
        schema = self.response(path, method, status)["content"][media]["schema"]
        return {"$defs": self.defs, **to_json_schema(schema)}

    def component(self, name: str) -> dict[str, Any]:
        return {"$defs": self.defs, "$ref": f"#/$defs/{name}"}

    def errors(self, schema: dict[str, Any], body: Any) -> list[str]:
        validator = jsonschema.Draft202012Validator(schema)
        return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]

    def check(self, schema: dict[str, Any], body: Any, label: str) -> None:
        problems = self.errors(schema, body)
        assert not problems, f"{label}: {problems[:5]}"
        self.validated.append(label)


def sse_data(text: str) -> list[tuple[str | None, str]]:
    """``(event, data)`` per server-sent event of ``text``."""
    events: list[tuple[str | None, str]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        events.append((event, "\n".join(data)))
    return events
