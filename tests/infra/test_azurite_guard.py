"""The Azurite tests skip on a machine without Azurite, but never in CI (issue 23 item 16): there the lease
and delivery guarantees SECURITY.md cites must run, so a missing install fails the run instead."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .azurite import _require_installed


def test_missing_azurite_skips_outside_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Azurite is not installed"):
        _require_installed(tmp_path / "azurite-blob")


def test_missing_azurite_fails_in_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the Azurite tests"):
        _require_installed(tmp_path / "azurite-blob")


def test_installed_azurite_neither_skips_nor_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    program = tmp_path / "azurite-blob"
    program.write_text("")
    if shutil.which("node") is None:
        pytest.skip("Node.js is not on PATH here")
    _require_installed(program)  # returns: the tests that need it run
