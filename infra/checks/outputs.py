"""Output and parameter checks: no secret in an output, secure parameters for secret values.

Each ``check_*`` takes parsed templates (:mod:`infra.checks.bicep`) and returns its findings (strings); an
empty list means compliant.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .bicep import SECRET_MARKERS, SECRET_OUTPUT_NAME, Template, accessor_of

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
        acc = accessor_of(value)
        if acc and acc[1] == "value":
            return True
        return any(_accesses_value(v) for v in value.values())
    if isinstance(value, list):
        return any(_accesses_value(v) for v in value)
    return isinstance(value, str) and value.endswith(".value")
