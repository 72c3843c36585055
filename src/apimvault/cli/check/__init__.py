"""``apimvault check``: walk the request path and stop at the first broken link.

The links, in order, each in its own module: :mod:`.configuration` (every variable set and valid),
:mod:`.credential` (which credential of ``DefaultAzureCredential`` gets a token, for which identity),
:mod:`.vault` (Key Vault reachable, access, the secret), :mod:`.tokens` (with ``APIMVAULT_TOKEN_SCOPE``,
the Entra token's claims) and :mod:`.gateway` (APIM accepting the key: a 1-token chat). :mod:`.run` holds
the run they share: the steps recorded, the warnings and the report.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable

from ...exceptions import ConfigurationError
from ..output import EXIT_CONFIG, EXIT_OK, Output
from .configuration import config_step
from .credential import credential_step, credential_used
from .gateway import apim_step
from .run import CheckRun, Step
from .tokens import ENV_TOKEN_SCOPE, describe_token_refusal, token_step
from .vault import secret_step

__all__ = [
    "ENV_TOKEN_SCOPE",
    "STEPS",
    "CheckRun",
    "Step",
    "cmd_check",
    "credential_used",
    "describe_token_refusal",
]


STEPS: tuple[Callable[[CheckRun], int | None], ...] = (
    config_step,
    credential_step,
    secret_step,
    token_step,
    apim_step,
)
"""The links of the request path, in order; a step returns an exit code to stop at, or None to go on."""


def cmd_check(args: argparse.Namespace, out: Output) -> int:
    out.line("apimvault check")
    with contextlib.ExitStack() as resources:
        check = CheckRun(args, out, resources)
        for step in STEPS:
            try:
                code = step(check)
            except ConfigurationError as exc:  # e.g. a header name the core refuses
                check.record(Step("config", False, str(exc)))
                code = EXIT_CONFIG
            if code is not None:
                return check.finish(code)
        return check.finish(EXIT_OK)
