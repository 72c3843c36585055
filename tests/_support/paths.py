"""Where things are in the repository, for the tests that read files outside ``tests/``."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: The rotation function's folder, as the Functions host sees it (``infra/rotation_function``).
FUNCTION_DIR = REPO / "infra" / "rotation_function"
