"""``python -m infra.checks``: the checks as a tool (issue 24 item 5). Clean on the real ``infra/``; on a
planted bad secret and a malformed policy it prints each finding under its check's name and exits 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests._support.bicep import BAD_SECRET
from tests._support.paths import REPO

pytest.importorskip("pycep", reason="pycep-parser is in the dev extra")

from infra.checks.__main__ import main
from infra.checks.bicep_policy import BICEP_CHECKS


def test_every_bicep_check_is_in_the_tool() -> None:
    import infra.checks.bicep_policy as policy

    defined = {name for name in dir(policy) if name.startswith("check_")}
    assert {check.__name__ for check in BICEP_CHECKS} == defined


def test_the_real_infra_has_no_findings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out == ""


def test_planted_errors_are_printed_and_fail_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "secret.bicep").write_text(BAD_SECRET)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "broken.xml").write_text("<policies><inbound>")
    assert main(["--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("check_rotation_secret: ") and "no contentType" in line for line in out), out
    assert any(line.startswith("check_policy_document: policies/broken.xml: ") for line in out), out


def test_runs_as_a_module_from_the_repository_root(tmp_path: Path) -> None:
    (tmp_path / "secret.bicep").write_text(BAD_SECRET)
    done = subprocess.run(
        [sys.executable, "-m", "infra.checks", "--root", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "check_rotation_secret: " in done.stdout
    assert "finding(s)" in done.stderr


def test_no_module_of_the_tool_over_700_lines() -> None:
    """The rule src/ keeps (tests/test_structure.py) holds for the checks tool too."""
    modules = sorted((REPO / "infra" / "checks").rglob("*.py"))
    assert len(modules) >= 10
    long = {str(p.relative_to(REPO)): n for p in modules if (n := len(p.read_text().splitlines())) > 700}
    assert long == {}
