"""Fixtures for the infra tests: the function folder on ``sys.path`` as the Functions host sees it, and the
parsed Bicep templates (parsed once per session; pycep results are also cached on disk by content hash)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

from tests._support.paths import FUNCTION_DIR

if TYPE_CHECKING:
    from infra.checks.bicep_policy import Template


@pytest.fixture
def function_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(FUNCTION_DIR))
    yield FUNCTION_DIR
    for name in ("rotation_handler", "function_app"):
        sys.modules.pop(name, None)


@pytest.fixture
def handler(function_dir: Path) -> ModuleType:
    """``infra/rotation_function/rotation_handler.py``, imported the way the Functions host imports it."""
    return importlib.import_module("rotation_handler")


@pytest.fixture(scope="session")
def templates() -> list[Template]:
    """Every ``infra/**/*.bicep`` file parsed by pycep, once per test session."""
    pytest.importorskip("pycep", reason="pycep-parser is in the dev extra")
    from infra.checks.bicep_policy import load_templates

    return load_templates()
