"""Cut the subsets kept here out of full upstream spec files (Azure/azure-rest-api-specs).

    python make_subsets.py inference <full inference.json>  > azure-openai-inference-2024-10-21.subset.json

Keeps the listed paths' responses and the component schemas they reach, drops documentation-only keys
(``description``, ``example``, ``title``, ``x-ms-*``, ``x-oai*``). Run on a subset it reproduces the subset
(the test ``test_subsets_are_closed`` checks that every ``$ref`` resolves).
"""

from __future__ import annotations

import json
import sys
from typing import Any

DROP = ("description", "example", "title", "summary")
SUBSETS: dict[str, dict[str, Any]] = {
    "inference": {
        "paths": {
            "/deployments/{deployment-id}/chat/completions": ["post"],
            "/deployments/{deployment-id}/embeddings": ["post"],
        },
    },
}


def strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: strip(v)
            for k, v in node.items()
            if k not in DROP and not k.startswith("x-ms-") and not k.startswith("x-oai")
        }
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#/components/schemas/"):
                found.add(v.rsplit("/", 1)[1])
            else:
                found |= refs(v)
    elif isinstance(node, list):
        for v in node:
            found |= refs(v)
    return found


def subset(spec: dict[str, Any], which: str) -> dict[str, Any]:
    wanted = SUBSETS[which]["paths"]
    paths: dict[str, Any] = {}
    for path, methods in wanted.items():
        paths[path] = {}
        for method in methods:
            op = spec["paths"][path][method]
            paths[path][method] = strip({"operationId": op["operationId"], "responses": op["responses"]})
    schemas = spec["components"]["schemas"]
    keep: dict[str, Any] = {}
    todo = refs(paths)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = strip(schemas[name])
        todo |= refs(keep[name]) - set(keep)
    return {
        "openapi": spec["openapi"],
        "info": strip(spec["info"]),
        "paths": paths,
        "components": {"schemas": dict(sorted(keep.items()))},
    }


if __name__ == "__main__":
    which, source = sys.argv[1], sys.argv[2]
    with open(source, encoding="utf-8") as f:
        print(json.dumps(subset(json.load(f), which), indent=2))
