"""The test tree's own rules (issue 24 item 5), checked by AST over every module under ``tests/``:

* no module imports a ``conftest`` (fixtures reach tests by pytest's discovery; shared objects live in
  ``tests/_support``, the session CA is the ``session_ca`` fixture);
* no module imports a test module (``test_*``): what two test modules share lives in ``tests/_support``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _imported_modules(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in ``tree``, relative ones with their leading dots; for
    ``from X import a, b`` both ``X`` and ``X.a``, ``X.b`` (a name may be a submodule)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.append((node.lineno, base))
            joiner = "" if base.endswith(".") else "."
            found += [(node.lineno, f"{base}{joiner}{alias.name}") for alias in node.names]
    return found


def forbidden_imports(source: str) -> list[str]:
    """What in ``source`` breaks the rules: ``line: name`` for each import of a conftest or a test module."""
    bad: list[str] = []
    for line, name in _imported_modules(ast.parse(source)):
        parts = [p for p in name.split(".") if p]
        if any(p == "conftest" for p in parts):
            bad.append(f"{line}: {name} (a conftest)")
        elif (
            parts
            and parts[-1].startswith("test_")
            and any(p.startswith("test_") for p in parts[:-1]) is False
        ):
            # ``from .test_x import y`` records both ``.test_x`` and ``.test_x.y``: report the module once.
            bad.append(f"{line}: {name} (a test module)")
    return sorted(set(bad))


def _modules() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "data" not in p.relative_to(TESTS).parts)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "from .conftest import SESSION_CA",
            ["1: .conftest (a conftest)", "1: .conftest.SESSION_CA (a conftest)"],
        ),
        (
            "from tests.conftest import X",
            ["1: tests.conftest (a conftest)", "1: tests.conftest.X (a conftest)"],
        ),
        ("from . import conftest", ["1: .conftest (a conftest)"]),
        ("import tests.conftest", ["1: tests.conftest (a conftest)"]),
        ("from ..test_readme_blocks import Block", ["1: ..test_readme_blocks (a test module)"]),
        ("from .faults import test_fault_matrix", ["1: .faults.test_fault_matrix (a test module)"]),
        ("from tests._support.faults import Api\nimport pytest", []),
    ],
)
def test_the_rule_checker_flags_what_it_should(source: str, expected: list[str]) -> None:
    assert forbidden_imports(source) == expected


def test_no_module_imports_a_conftest_or_a_test_module() -> None:
    modules = _modules()
    assert len(modules) > 100, "the walk found too few modules to mean anything"
    findings = {
        str(path.relative_to(TESTS.parent)): found
        for path in modules
        if (found := forbidden_imports(path.read_text(encoding="utf-8")))
    }
    assert findings == {}, f"import shared helpers from tests._support instead: {findings}"


def test_shared_helpers_live_in_support_and_are_not_test_modules() -> None:
    support = TESTS / "_support"
    names = {p.name for p in support.glob("*.py")}
    assert {"core.py", "policies.py", "providers.py", "cli.py", "ca.py"} <= names, names
    assert not [n for n in names if n.startswith("test_")], names


def test_the_test_folders_mirror_src() -> None:
    """Each package of ``src/apimvault`` has its test folder (the core's ``_*.py`` modules: ``core/``), and no
    test module but the tree-wide ones (README, structure, canary, bench) sits at the top."""
    src = TESTS.parent / "src" / "apimvault"
    packages = {p.name for p in src.iterdir() if (p / "__init__.py").exists()}
    folders = {p.name for p in TESTS.iterdir() if (p / "__init__.py").exists()}
    assert packages | {"core"} <= folders, sorted(packages | {"core"} - folders)
    top = sorted(p.name for p in TESTS.glob("test_*.py"))
    allowed = (
        "test_readme_",
        "test_structure",
        "test_test_tree",
        "test_docs_paths",
        "test_canary",
        "test_bench_",
    )
    assert [name for name in top if not name.startswith(allowed)] == []
