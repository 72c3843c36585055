"""The ``apimvault`` command: ``local``, ``check``, ``chat``, ``rotate`` and the rotation ``drill``.

The module imports only the standard library at load time; Azure SDKs, openai and the local stack are
imported inside the commands. That matters for the embedded local Azure: aiohttp (imported by openai and
the async Azure SDK) reads ``SSL_CERT_FILE`` once, when it is imported, so a command that starts an
embedded stack creates the stack's CA and points ``SSL_CERT_FILE`` at it *before* importing them.

No command prints a key or a token: keys appear as their version and 8-hex fingerprint.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from ..exceptions import ApimVaultError
from .output import EXIT_CODES, EXIT_CONFIG, EXIT_INTERRUPTED, Output, fail
from .parser import build_parser

__all__ = ["EXIT_CODES", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``apimvault`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_CONFIG
    out = Output(bool(getattr(args, "json", False)))
    if not args.verbose:  # the commands report errors themselves; keep library warnings off the terminal
        logging.getLogger("apimvault").addHandler(logging.NullHandler())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger("apimvault").addHandler(handler)
        logging.getLogger("apimvault").setLevel(logging.INFO)
    try:
        code: int = args.func(args, out)
    except KeyboardInterrupt:
        out.error("interrupted")
        return EXIT_INTERRUPTED
    except ApimVaultError as exc:
        return fail(out, exc)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
