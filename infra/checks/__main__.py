"""``python -m infra.checks [--root DIR]``: every check over the Bicep templates and APIM policies under
``infra/`` (or ``DIR``); prints one line per finding (``check: finding``) and exits 1 if there is any, 0 if
there is none."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from .apim_policy import check_policy_document, policy_files
from .bicep import INFRA, load_templates
from .bicep_policy import BICEP_CHECKS
from .type_check import check_module_wiring, check_resource_types


def findings(root: Path) -> Iterator[tuple[str, str]]:
    """``(check name, finding)`` for every finding of every check over the templates under ``root``."""
    templates = load_templates(root)
    for check in (*BICEP_CHECKS, check_resource_types, check_module_wiring):
        for finding in check(templates):
            yield check.__name__, finding
    for path in policy_files(root):
        for finding in check_policy_document(path.read_text(encoding="utf-8"), path.name):
            yield "check_policy_document", f"{path.relative_to(root)}: {finding}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.checks", description=__doc__)
    parser.add_argument(
        "--root", type=Path, default=INFRA, help="the infra folder to check (default: infra/)"
    )
    args = parser.parse_args(argv)
    found = 0
    for name, finding in findings(args.root.resolve()):
        print(f"{name}: {finding}")
        found += 1
    print(f"infra checks: {found} finding(s)", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
