"""One run of ``apimvault check``: the steps recorded so far, the warnings, the report and what later
steps need (the credential, the provider, the key)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from typing import Any

from ..output import EXIT_CODES, EXIT_OK, Output

__all__ = ["CheckRun", "Step"]


@dataclasses.dataclass
class Step:
    """One line of the walk: a link of the request path, whether it holds, and what was seen."""

    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


class CheckRun:
    """One run of ``apimvault check``: the steps taken so far, the report, and what later steps need."""

    def __init__(self, args: argparse.Namespace, out: Output, resources: contextlib.ExitStack) -> None:
        self.args = args
        self.out = out
        self.resources = resources  # closed when the run ends, whatever step it stopped at
        self.steps: list[Step] = []
        self.warnings: list[dict[str, Any]] = []
        self.report: dict[str, Any] = {}
        self.vault_url = self.secret_name = self.endpoint = self.deployment = ""
        self.credential: Any = None
        self.identity: dict[str, str] = {}
        self.provider: Any = None
        self.key: Any = None
        self.token_scope: str | None = None

    def record(self, step: Step) -> None:
        self.steps.append(step)
        mark = "ok  " if step.ok else "FAIL"
        self.out.line(f"{mark} {step.name:<10} {step.detail}")

    def warn(self, step: str, code: str, message: str, **data: Any) -> None:
        """A problem that does not break the path yet: a ``WARN`` line, and an entry of ``warnings`` in
        ``--json``; the exit code stays that of the path (0 when it works), as for the other warnings."""
        self.warnings.append({"step": step, "code": code, "message": message, **data})
        self.out.line(f"WARN {step:<10} {message}")

    def finish(self, code: int) -> int:
        ok = code == EXIT_OK
        steps = [dataclasses.asdict(s) for s in self.steps]
        doc = {"ok": ok, "exit_code": code, "steps": steps, "warnings": self.warnings, **self.report}
        self.out.document(doc)
        if ok:
            self.out.line("OK: the whole path works")
        else:
            self.out.line(f"FAILED at {self.steps[-1].name} (exit {code}: {EXIT_CODES[code]})")
        return code
