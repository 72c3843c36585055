"""A release a maintainer could publish (issue 23): one version, license metadata, typed, and the wheel step
of .ci/run (build, twine check, fresh venv, the Quickstart's drill from the wheel) as the README says."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import metadata, version
from pathlib import Path

import apimvault

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_the_version_has_one_place() -> None:
    """pyproject.toml holds it; the package reads its own metadata (no second literal in the sources)."""
    assert "version" in PROJECT and "version" not in PROJECT.get("dynamic", [])
    assert version("apimvault") == PROJECT["version"] == apimvault.__version__
    literal = re.compile(r"""__version__\s*=\s*["']""")
    assert not [p for p in (ROOT / "src").rglob("*.py") if literal.search(p.read_text(encoding="utf-8"))]


def test_license_and_classifiers_are_in_the_metadata() -> None:
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    assert "Typing :: Typed" in PROJECT["classifiers"]
    assert (ROOT / "src" / "apimvault" / "py.typed").is_file()
    classifiers = metadata("apimvault").get_all("Classifier") or []
    assert "Programming Language :: Python :: 3.11" in classifiers


def test_ci_builds_checks_and_smoke_tests_the_wheel_outside_the_tree() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    step = ci.split('echo "::: wheel', 1)[1].split('echo ":::', 1)[0]
    for needed in ("-m build", "twine check --strict dist/*", "-m venv", "[local,cli,rotation]", "drill"):
        assert needed in step, needed
    assert 'cd "$smoke"' in step  # the drill runs outside the source tree
    assert "build>=" in " ".join(PROJECT["optional-dependencies"]["dev"])
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "python3 -m build" in readme and "apimvault-*-py3-none-any.whl)[local,cli,rotation]" in readme
