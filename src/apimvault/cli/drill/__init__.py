"""``apimvault drill``: the rotation drill under live traffic."""

from __future__ import annotations

import argparse

from ..output import Output


def cmd_drill(args: argparse.Namespace, out: Output) -> int:
    from .run import run

    return run(args, out)
