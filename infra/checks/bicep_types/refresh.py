"""Refresh the vendored subset of Azure's Bicep resource type definitions from a bicep-types-az checkout.

    python infra/checks/bicep_types/refresh.py /path/to/bicep-types-az [--commit SHA]

- Reads every ``resource <symbol> '<type>@<api-version>'`` declaration under ``infra/`` (``existing`` ones
  too: their api-version must exist as well).
- Finds each in ``generated/*/<namespace>/<api-version>/types.json`` of the checkout (the files Bicep itself
  compiles against; the ``generated/index.json`` of the repository maps the same names).
- Writes ``subset.json`` next to this script: only the type graph reachable from those resource types,
  renumbered into one table, plus the repository, the commit and the source file of each resource type.
- Copies the repository's ``LICENSE`` (MIT) next to it.

The commit is taken from ``git -C <checkout> rev-parse HEAD`` unless ``--commit`` is given (for an exported
tree without ``.git``). A type/api-version that the checkout does not define is an error: fix the template
(a wrong api-version) or update the checkout. No network access; the script only reads the checkout.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
INFRA = REPO / "infra"
REPOSITORY = "https://github.com/Azure/bicep-types-az"

RESOURCE_DECL = re.compile(r"^\s*resource\s+\w+\s+'([^'@]+)@([^']+)'", re.MULTILINE)


def used_resource_types(root: Path = INFRA) -> list[str]:
    """``Type@api-version`` of every resource declaration in the Bicep files under ``root``, sorted."""
    found = set()
    for path in root.rglob("*.bicep"):
        if any(part.startswith(".venv") for part in path.parts):
            continue
        for rtype, version in RESOURCE_DECL.findall(path.read_text()):
            found.add(f"{rtype}@{version}")
    return sorted(found, key=str.lower)


def _ref(value: Any) -> int:
    return int(str(value["$ref"]).removeprefix("#/"))


def _find(checkout: Path, name: str) -> tuple[Path, list[dict[str, Any]], int]:
    rtype, version = name.split("@", 1)
    namespace = rtype.split("/", 1)[0].lower()
    candidates = sorted((checkout / "generated").glob(f"*/{namespace}/{version}/types.json"))
    for path in candidates:
        table = json.loads(path.read_text())
        for index, entry in enumerate(table):
            if entry.get("$type") == "ResourceType" and str(entry.get("name", "")).lower() == name.lower():
                return path, table, index
    raise LookupError(f"{name}: not defined in {checkout}/generated/*/{namespace}/{version}/types.json")


class _Subset:
    """One renumbered type table built from several source tables."""

    def __init__(self) -> None:
        self.types: list[dict[str, Any]] = []
        self._seen: dict[tuple[str, int], int] = {}

    def add(self, source: str, table: list[dict[str, Any]], index: int) -> int:
        key = (source, index)
        if key in self._seen:
            return self._seen[key]
        new_index = len(self.types)
        self._seen[key] = new_index
        self.types.append({})  # placeholder: cycles refer back to it
        self.types[new_index] = self._rewrite(source, table, table[index])
        return new_index

    def _rewrite(self, source: str, table: list[dict[str, Any]], value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"$ref"}:
                return {"$ref": f"#/{self.add(source, table, _ref(value))}"}
            return {k: self._rewrite(source, table, v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._rewrite(source, table, v) for v in value]
        return value


def build(checkout: Path, commit: str, names: list[str]) -> dict[str, Any]:
    subset = _Subset()
    resources: dict[str, dict[str, Any]] = {}
    for name in names:
        path, table, index = _find(checkout, name)
        source = str(path.relative_to(checkout))
        resources[name] = {"$ref": f"#/{subset.add(source, table, index)}", "source": source}
    return {
        "repository": REPOSITORY,
        "commit": commit,
        "note": "Subset of the repository's generated/**/types.json: only the resource types infra/ uses "
        "and the types they reach, renumbered. Regenerate with refresh.py; do not edit by hand.",
        "resources": resources,
        "types": subset.types,
    }


def dump(data: dict[str, Any]) -> str:
    """JSON with one type entry per line: small, and a refresh shows as a readable diff."""
    head = {k: v for k, v in data.items() if k != "types"}
    text = json.dumps(head, indent=1, sort_keys=True)[:-2]
    rows = ",\n".join("  " + json.dumps(t, sort_keys=True, separators=(",", ":")) for t in data["types"])
    return f'{text},\n "types": [\n{rows}\n ]\n}}\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkout", type=Path, help="a checkout (or exported tree) of Azure/bicep-types-az")
    parser.add_argument("--commit", help="commit the tree came from (default: git rev-parse HEAD)")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: next to this script)")
    args = parser.parse_args(argv)
    checkout: Path = args.checkout.resolve()
    commit = (
        args.commit
        or subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
        ).stdout.strip()
    )
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        parser.error(f"not a full commit id: {commit!r}")
    names = used_resource_types()
    try:
        data = build(checkout, commit, names)
    except LookupError as exc:
        print(f"refresh: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "subset.json").write_text(dump(data))
    shutil.copyfile(checkout / "LICENSE", args.out / "LICENSE")
    print(f"refresh: {len(names)} resource types, {len(data['types'])} type entries, commit {commit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
