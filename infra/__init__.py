"""Not a library: this file makes ``infra.checks`` (the policy checks over these templates) importable from
the repository root, as ``python -m infra.checks`` and the tests under ``tests/infra`` import it. Nothing here
is in the wheel (pyproject's wheel target packages ``src/apimvault`` only)."""
