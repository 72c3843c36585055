"""``python -m bench [--quick] [--no-write] [--out PATH]``: every benchmark in one run.

Prints the tables and writes ``BENCHMARKS.md`` (machine description and date included) at the repo root.
The local stack's CA is created first and trusted through ``SSL_CERT_FILE`` before openai / azure (and so
aiohttp, which reads that variable once at import) are imported.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench._stack import prepare_ca


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes (about a minute); not for publishing"
    )
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (BENCHMARKS.md)")
    args = parser.parse_args(argv)

    ca = prepare_ca()  # before anything imports openai / azure / aiohttp

    from bench.run import print_tables, run, write_markdown

    results = run(ca, quick=args.quick)
    print_tables(results)
    if not args.no_write:
        path = write_markdown(results, args.out)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
