"""Fault-matrix plumbing: each case records what the caller saw (:class:`~tests._support.faults.OutcomeLog`,
:func:`~tests._support.faults.recorded`); the session writes ``.outcomes.json``.

``gen_table.py`` renders that file into SECURITY.md. Rows are merged by case id, so running a subset of the
matrix updates those rows and keeps the others.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._support.faults import OutcomeLog

OUTCOMES = Path(__file__).with_name(".outcomes.json")


@pytest.fixture(scope="session")
def outcome_log() -> Iterator[OutcomeLog]:
    log = OutcomeLog()
    yield log
    if not log.rows:
        return
    merged: dict[str, dict[str, Any]] = {}
    if OUTCOMES.exists():
        try:
            merged = {row["id"]: row for row in json.loads(OUTCOMES.read_text())}
        except (ValueError, KeyError, TypeError):
            merged = {}
    merged.update(log.rows)
    OUTCOMES.write_text(json.dumps(sorted(merged.values(), key=lambda r: r["id"]), indent=1) + "\n")
