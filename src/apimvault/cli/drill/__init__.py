"""``apimvault drill``: the rotation drill under live traffic, from the CLI or from Python.

From Python, the public face is :class:`DrillConfig` (the flags, validated: a bad value raises
:class:`~apimvault.exceptions.ConfigurationError`) and :func:`run_drill`, which returns the report (the
``--json`` document)::

    from apimvault.cli.drill import DrillConfig, run_drill

    report = run_drill(DrillConfig(duration=10, concurrency=8, delivery="memory"))
    assert report["ok"], report["verdict"]

It drills ``AZURE_KEYVAULT_URL``'s target when that is set (a non-loopback one only with ``yes=True``, else
:class:`DrillDeclined`), else the embedded local Azure. ``DrillConfig(...).plan(local=True)`` gives the
numbers the drill derives (:class:`DrillPlan`: the cache policy, TTL, clients and workers), no stack needed.

Modules: ``config`` (the config, the plan, the drill's errors), ``context`` (what the parts share),
``traffic`` (clients and workers), ``rotations`` (rotator, delivery, revocation, gateway propagation),
``schedule`` (the schedule and the convergence monitor), ``report`` (live display and report), ``run``
(the :class:`~.run.Drill` composing them, and the CLI entry), ``delivery``, ``target``, ``metrics``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .config import DrillConfig, DrillDeclined, DrillPlan, PreflightFailed

if TYPE_CHECKING:  # pragma: no cover
    from ..output import Output

__all__ = ["DrillConfig", "DrillDeclined", "DrillPlan", "PreflightFailed", "cmd_drill", "run_drill"]


def run_drill(config: DrillConfig, out: Output | None = None) -> dict[str, Any]:
    """Run a drill; its report. See :func:`apimvault.cli.drill.run.run_drill`."""
    from .run import run_drill as run

    return run(config, out)


def cmd_drill(args: argparse.Namespace, out: Output) -> int:
    from .run import run

    return run(args, out)
