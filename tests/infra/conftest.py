"""Fixtures for the infra tests: the function folder on ``sys.path`` as the Functions host sees it."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

FUNCTION_DIR = Path(__file__).resolve().parents[2] / "infra" / "rotation_function"


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
