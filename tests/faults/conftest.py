"""Fault-matrix plumbing: each case records what the caller saw; the session writes ``.outcomes.json``.

``gen_table.py`` renders that file into SECURITY.md. Rows are merged by case id, so running a subset of the
matrix updates those rows and keeps the others.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

OUTCOMES = Path(__file__).with_name(".outcomes.json")


class OutcomeLog:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def record(self, case_id: str, **row: Any) -> None:
        self.rows[case_id] = {"id": case_id, **row}


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


@contextlib.contextmanager
def recorded(log: OutcomeLog, case_id: str, **fixed: Any) -> Iterator[dict[str, Any]]:
    """Record a case's row whatever happens: ``verdict`` is "as documented" only if the block completed.

    A failing (or xfail'ed) case still lands in the table, flagged, with what was observed up to the failure.
    """
    row: dict[str, Any] = {**fixed, "verdict": "DEVIATES (known bug, see xfail)"}
    try:
        yield row
        row["verdict"] = "as documented"
    finally:
        log.record(case_id, **row)
