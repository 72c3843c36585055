"""infra/rotation_function/requirements.txt installs apimvault only from the wheel built from this repository,
pinned by sha256, and never by name from a package index (issue 15 point 5)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .bicep_policy import INFRA, REPO

REQUIREMENTS = INFRA / "rotation_function" / "requirements.txt"
BUILD_SCRIPT = INFRA / "rotation_function" / "build_package.sh"
PINNED = re.compile(
    r"^apimvault\[rotation\] @ file://\$\{APIMVAULT_WHEELHOUSE\}/"
    r"apimvault-(?P<version>[^-]+)-py3-none-any\.whl#sha256=(?P<sha256>[0-9a-f]{64})$"
)
INDEX_OPTIONS = re.compile(r"^\s*(-i\b|--index-url|--extra-index-url|-f\b|--find-links|--trusted-host)")


def requirement_problems(text: str) -> list[str]:
    """Problems with a rotation requirements file; [] if apimvault is pinned to the hashed wheel only."""
    problems = []
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    pinned = [line for line in lines if PINNED.match(line)]
    if len(pinned) != 1:
        problems.append(f"expected exactly one hash-pinned apimvault wheel line, found {len(pinned)}")
    for line in lines:
        if INDEX_OPTIONS.match(line):
            problems.append(f"index option in the file: {line!r}")
        elif re.match(r"^apimvault\b", line, re.IGNORECASE) and not PINNED.match(line):
            problems.append(f"apimvault not pinned to the hashed wheel: {line!r}")
    return problems


def test_requirements_pin_apimvault_to_the_hashed_wheel() -> None:
    text = REQUIREMENTS.read_text()
    assert requirement_problems(text) == []
    (line,) = [m for m in map(PINNED.match, text.splitlines()) if m]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert line["version"] == version, "the wheel name must follow pyproject's version"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("apimvault[rotation]>=0.1.0.dev0\n", "apimvault not pinned to the hashed wheel"),
        ("apimvault\n", "expected exactly one hash-pinned"),
        ("./wheels/apimvault-0.1.0.dev0-py3-none-any.whl[rotation]\n", "expected exactly one"),
        (
            "--extra-index-url https://example.org/simple\n"
            "apimvault[rotation] @ file://${APIMVAULT_WHEELHOUSE}/apimvault-0.1-py3-none-any.whl#sha256="
            + "a"
            * 64,
            "index option in the file",
        ),
    ],
)
def test_unpinned_or_index_requirements_are_flagged(text: str, expected: str) -> None:
    assert expected in "\n".join(requirement_problems(text))


def test_build_script_rewrites_exactly_the_pinned_line() -> None:
    script = BUILD_SCRIPT.read_text()
    assert "pip wheel --quiet --no-deps" in script
    assert 'APIMVAULT_WHEELHOUSE="$wheels"' in script
    assert "--only-binary=:all:" in script
    assert (INFRA / ".gitignore").read_text().count("rotation_function/wheels/") == 1


@pytest.mark.slow
def test_pip_refuses_a_wheel_whose_hash_differs(tmp_path: Path) -> None:
    """pip itself enforces the pin: a file at the pinned name with other content is refused (offline)."""
    (line,) = [m for m in map(PINNED.match, REQUIREMENTS.read_text().splitlines()) if m]
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    (wheelhouse / f"apimvault-{line['version']}-py3-none-any.whl").write_bytes(b"not the pinned wheel")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(line.group(0) + "\n")
    env = {**os.environ, "APIMVAULT_WHEELHOUSE": str(wheelhouse), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-deps",
            "--no-index",
            "-r",
            str(requirements),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "sha256" in result.stderr.lower() and "expected" in result.stderr.lower(), result.stderr
