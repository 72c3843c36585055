"""The shape of the source tree: no import cycles, local's private modules stay private, cheap import."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import of a module, function-level ones included, ``if TYPE_CHECKING:`` blocks excluded."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for sub in ast.iter_child_nodes(node):
            visit(sub)

    visit(tree)
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the modules of ``src`` it imports (``from pkg import mod`` counts as an import of mod)."""
    paths = {_module_name(p, src): p for p in src.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                targets = [
                    f"{target}.{a.name}" if f"{target}.{a.name}" in paths else target for a in node.names
                ]
            edges.update(t for t in targets if t in paths and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that starts and ends at the same module), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    graph = import_graph(tmp_path)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == set()
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_no_import_cycles_in_src() -> None:
    graph = import_graph()
    assert "apimvault.cli.drill.run" in graph and "apimvault.local.stack" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


# Which parts of the package a part may not import (a part: a subpackage, or "core" for the top-level
# modules: apimvault/_*.py, exceptions.py and __init__.py).
FORBIDDEN_IMPORTS = {
    "core": {"cli", "local", "rotation", "integrations"},
    "local": {"cli", "rotation"},
    "rotation": {"cli", "local"},
}


def _part(module: str) -> str:
    """``apimvault.local.apim`` -> ``local``; ``apimvault._base`` / ``apimvault`` -> ``core``."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1].startswith("_") or parts[1] == "exceptions":
        return "core"
    return parts[1]


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """``"a -> b"`` for every import of ``graph`` that crosses a line ``FORBIDDEN_IMPORTS`` draws."""
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if _part(target) in FORBIDDEN_IMPORTS.get(_part(module), set())
    )


def test_the_layering_check_sees_function_level_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "apimvault"
    for sub in ("local", "rotation", "cli"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "_base.py").write_text("def f():\n    from .cli import main\n")
    (pkg / "local" / "stack.py").write_text("from ..rotation import ref\n")
    (pkg / "rotation" / "ref.py").write_text("from .. import _base\n")
    graph = import_graph(tmp_path)
    assert _part("apimvault._base") == "core" and _part("apimvault.local.stack") == "local"
    assert layering_violations(graph) == [
        "apimvault._base -> apimvault.cli",
        "apimvault.local.stack -> apimvault.rotation.ref",
    ]


def test_the_core_local_and_rotation_keep_to_their_layers() -> None:
    """The core imports none of cli, local, rotation, integrations; local imports neither cli nor rotation;
    rotation imports neither cli nor local (function-level imports included, TYPE_CHECKING blocks not)."""
    graph = import_graph()
    assert "apimvault._base" in graph and "apimvault.local.stack" in graph and "apimvault.rotation" in graph
    assert layering_violations(graph) == []


MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """``(name, lines)`` of every function or method in ``path`` longer than ``limit`` lines (decorators
    and docstring included), nested ones too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.name, size)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (size := (node.end_lineno or node.lineno) - node.lineno + 1) > limit
    ]


def test_the_size_check_finds_a_long_function(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    body = "\n".join(f"        x{i} = {i}" for i in range(81))
    module.write_text(f"def short():\n    return 1\n\n\nclass C:\n    async def long(self):\n{body}\n")
    assert long_functions(module) == [("long", 82)]


def test_no_module_in_src_over_700_lines() -> None:
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
        for path in SRC.rglob("*.py")
    }
    assert len(sizes) > 50
    assert {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_no_function_in_src_over_80_lines() -> None:
    found = {
        (str(path.relative_to(ROOT)), name): size
        for path in SRC.rglob("*.py")
        for name, size in long_functions(path)
    }
    assert found == {}


def private_names_imported(src: Path = SRC) -> list[str]:
    """``"module: name"`` for every underscore name (not a module, not a dunder) a module of ``src`` imports
    from another module of ``src``: what crosses a module boundary has a public name."""
    paths = {_module_name(p, src): p for p in src.rglob("*.py")}
    found = []
    for name, path in paths.items():
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target not in paths:
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and f"{target}.{alias.name}" not in paths:
                    found.append(f"{name}: {target}.{alias.name}")
    return sorted(found)


def test_the_private_name_check_finds_one(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_a.py").write_text("_x = 1\ny = 2\n")
    (pkg / "b.py").write_text("from . import _a\nfrom ._a import y\ndef f():\n    from ._a import _x\n")
    assert private_names_imported(tmp_path) == ["pkg.b: pkg._a._x"]


def test_no_underscore_name_crosses_a_module_boundary_in_src() -> None:
    assert private_names_imported() == []


def settings_defined_again(src: Path = SRC) -> list[str]:
    """``"module: NAME"`` for every module-level constant outside ``apimvault._settings`` whose value is one
    of ``_settings``' strings or tuples (an environment name, the header, an event type, the trust variables):
    those have one home."""
    from apimvault import _settings

    values = {
        v
        for n in _settings.__all__
        if isinstance(v := getattr(_settings, n), str | tuple) and not callable(v)
    }
    found = []
    for path in src.rglob("*.py"):
        if path == SRC / "apimvault" / "_settings.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                try:
                    value = ast.literal_eval(node.value)
                    hash(value)
                except (ValueError, TypeError):
                    continue
                if isinstance(value, str | tuple) and value in values:
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    names = [t.id for t in targets if isinstance(t, ast.Name)]
                    found.append(f"{_module_name(path, src)}: {', '.join(names)}")
    return sorted(found)


def test_the_settings_check_finds_a_copy(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        'ENV = "AZURE_KEYVAULT_URL"\nOTHER = "x"\nTRUST = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")\n'
    )
    assert settings_defined_again(tmp_path) == ["pkg.m: ENV", "pkg.m: TRUST"]


def test_settings_and_constants_have_one_home() -> None:
    assert settings_defined_again() == []


def test_nothing_outside_local_imports_a_private_local_module() -> None:
    offenders = []
    for top in ("src", "tests", "bench"):
        for path in (ROOT / top).rglob("*.py"):
            if (SRC / "apimvault" / "local") in path.parents:
                continue
            for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [f"{node.module}.{a.name}" for a in node.names]
                    if node.module and not node.level
                    else []
                )
                for name in names:
                    parts = name.split(".")
                    if parts[:2] == ["apimvault", "local"] and any(p.startswith("_") for p in parts[2:]):
                        offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []


def test_import_apimvault_is_cheap() -> None:
    """``import apimvault`` loads neither openai, azure, importlib.metadata nor apimvault.local."""
    code = (
        "import json, sys; import apimvault; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('openai', 'azure', 'aiohttp', 'importlib') or m.startswith('apimvault'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(done.stdout)
    assert not [m for m in loaded if m.split(".")[0] in ("openai", "azure", "aiohttp")], loaded
    assert "importlib.metadata" not in loaded and "apimvault.local" not in loaded, loaded
    assert {m for m in loaded if m.startswith("apimvault")} == {"apimvault", "apimvault.exceptions"}, loaded


def test_all_is_the_lazy_map_plus_the_exceptions_and_version() -> None:
    import apimvault
    from apimvault import exceptions

    errors = {n for n in vars(exceptions) if isinstance(getattr(exceptions, n), type) and n.endswith("Error")}
    assert errors <= set(dir(apimvault))
    assert sorted(apimvault.__all__) == sorted({*apimvault._LAZY, *errors, "__version__"})
    assert isinstance(apimvault.__version__, str) and apimvault.__version__
    for name in apimvault.__all__:
        assert getattr(apimvault, name) is not None


def test_sources_cite_public_sources_not_a_file_outside_the_repository() -> None:
    """Docstrings and comments cite public sources; ``protocols.md`` is not part of this repository."""
    citing = [
        str(path.relative_to(ROOT))
        for path in SRC.rglob("*.py")
        if "protocols.md" in path.read_text(encoding="utf-8") or "shared/reference" in path.read_text("utf-8")
    ]
    assert citing == []
