"""Every test the documents cite exists: each ``tests/...`` path named in SECURITY.md (its guarantees ->
tests table), README.md, infra/README.md and BENCHMARKS.md is a file or folder of the repository, and each
``path::name`` names a function (or class) defined in that file. So moving or renaming a test cannot leave a
guarantee citing nothing. CHANGELOG.md is history (old paths stay as they were) and is not checked.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("SECURITY.md", "README.md", "infra/README.md", "BENCHMARKS.md")
# A path under tests/ (``*`` a glob), optionally ``::name`` (a parametrized id's brackets are not part of it).
CITATION = re.compile(r"(?<![\w/.])(tests/[A-Za-z0-9_.*/-]*[A-Za-z0-9_/*])(?:::([A-Za-z_][A-Za-z0-9_]*))?")


def citations(text: str) -> list[tuple[str, str | None]]:
    """``(path, name or None)`` for every ``tests/...`` citation in ``text``, in order."""
    return [(m.group(1), m.group(2)) for m in CITATION.finditer(text)]


def defined_names(path: Path) -> set[str]:
    """Every function and class name defined anywhere in the Python file ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return {node.name for node in ast.walk(tree) if isinstance(node, kinds)}


def missing(root: Path, cited: list[tuple[str, str | None]]) -> list[str]:
    """The citations among ``cited`` that name no file under ``root``, or no such function in the file."""
    bad: list[str] = []
    for path, name in cited:
        target = root / path
        if "*" in path:
            if not list(root.glob(path)):
                bad.append(path)
        elif not target.exists():
            bad.append(path)
        elif name is not None and (target.suffix != ".py" or name not in defined_names(target)):
            bad.append(f"{path}::{name}")
    return bad


def test_the_citation_check_finds_a_moved_file_and_a_renamed_test(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("def test_here() -> None:\n    pass\n")
    text = "`tests/test_a.py::test_here`, `tests/test_a.py::test_gone`, `tests/test_b.py`, tests/x/, "
    text += "tests/t*.py, tests/u*.py"
    assert citations(text) == [
        ("tests/test_a.py", "test_here"),
        ("tests/test_a.py", "test_gone"),
        ("tests/test_b.py", None),
        ("tests/x/", None),
        ("tests/t*.py", None),
        ("tests/u*.py", None),
    ]
    assert missing(tmp_path, citations(text)) == [
        "tests/test_a.py::test_gone",
        "tests/test_b.py",
        "tests/x/",
        "tests/u*.py",
    ]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_test_path_a_document_cites_exists(document: str) -> None:
    cited = citations((ROOT / document).read_text(encoding="utf-8"))
    assert missing(ROOT, cited) == [], f"{document} cites tests that do not exist"


def test_the_security_table_cites_tests() -> None:
    """The check above has something to check: SECURITY.md's table cites tests by path and by name."""
    cited = citations((ROOT / "SECURITY.md").read_text(encoding="utf-8"))
    assert len(cited) > 100
    assert sum(1 for _, name in cited if name) > 20
