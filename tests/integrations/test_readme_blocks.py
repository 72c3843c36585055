"""The README's framework blocks and the tests that run them stay in step (no framework needed)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from .support import README, SECTION, readme_block

HERE = Path(__file__).parent


def test_every_readme_framework_block_is_run_by_a_test() -> None:
    section = README.read_text(encoding="utf-8").split(SECTION, 1)[1].split("\n## ", 1)[0]
    titles = re.findall(r"^### (.+)$", section, flags=re.M)
    assert len(titles) >= 7
    sources = "".join(p.read_text(encoding="utf-8") for p in HERE.glob("test_*.py"))
    run = set(re.findall(r"run_readme_block\(\s*\"([^\"]+)\"", sources))
    assert run == set(titles), (
        f"README blocks without a test: {set(titles) - run}; tests without: {run - set(titles)}"
    )
    for title in titles:
        compile(readme_block(title), title, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
