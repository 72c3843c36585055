"""The ``apimvault`` command: ``local``, ``check``, ``chat``, ``rotate`` and the rotation ``drill``.

The module imports only the standard library at load time; Azure SDKs, openai and the local stack are
imported inside the commands. That matters for the embedded local Azure: aiohttp (imported by openai and
the async Azure SDK) reads ``SSL_CERT_FILE`` once, when it is imported, so a command that starts an
embedded stack creates the stack's CA and points ``SSL_CERT_FILE`` at it *before* importing them.

No command prints a key or a token: keys appear as their version and 8-hex fingerprint.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from ..exceptions import ApimVaultError
from .config import require_live_stack
from .output import EXIT_CODES, EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, Output, fail
from .parser import build_parser

__all__ = ["EXIT_CODES", "build_parser", "main"]


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted (tests swap it)."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


_VERBOSE = _CurrentStderr()
# The core's messages name apimvault themselves: no logger name in the line.
_VERBOSE.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))


@contextlib.contextmanager
def _verbose_logging(verbose: bool) -> Iterator[None]:
    """``-v``: apimvault's INFO lines on stderr for the run, then the logger as it was.

    main() may run many times in one process (tests, embedding): each run adds the one handler at most
    once and removes it when it ends.
    """
    logger = logging.getLogger("apimvault")
    if not verbose or _VERBOSE in logger.handlers:
        yield
        return
    level = logger.level
    logger.addHandler(_VERBOSE)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(_VERBOSE)
        logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``apimvault`` command; returns the exit code."""
    try:
        return _main(argv)
    except BrokenPipeError:  # `apimvault ... | head`: the reader left; no traceback about it
        with contextlib.suppress(Exception):  # and none when the interpreter flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_CONFIG
    out = Output(bool(getattr(args, "json", False)))
    with _verbose_logging(args.verbose):
        return _run(args, out)


def _run(args: argparse.Namespace, out: Output) -> int:
    try:
        if args.command != "local":  # `local` makes a new stack; every other command uses the shell's
            require_live_stack()
        code: int = args.func(args, out)
    except KeyboardInterrupt:
        out.error("interrupted")
        out.document({"ok": False, "exit_code": EXIT_INTERRUPTED, "interrupted": True})
        return EXIT_INTERRUPTED
    except ApimVaultError as exc:
        return fail(out, exc)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
