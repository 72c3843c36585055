"""The README's framework blocks: each runs as a script, as written, on the local stack (marker
``integrations``), and every block is run by a test (checked in the default run, no framework needed)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from apimvault.local import LocalAzure
from tests._support.readme import (
    FRAMEWORK_SECTION,
    Block,
    Ran,
    assert_ran_clean,
    block_env,
    readme_blocks,
    run_blocks,
)

from .support import README, SECTION, readme_block

HERE = Path(__file__).parent


def _framework_blocks() -> list[Block]:
    return [
        b for b in readme_blocks() if b.lang == "python" and b.section == FRAMEWORK_SECTION and not b.fragment
    ]


def _is_script(block: Block) -> bool:
    """A self-contained block (makes its own providers) runs as a script; one that uses ``provider`` /
    ``aprovider`` from "Use" is run by its test with the test's providers passed in."""
    return "from_env()" in block.code


SCRIPTS = [b for b in _framework_blocks() if _is_script(b)]


def test_every_readme_framework_block_is_run_by_a_test() -> None:
    section = README.read_text(encoding="utf-8").split(SECTION, 1)[1].split("\n## ", 1)[0]
    titles = re.findall(r"^### (.+)$", section, flags=re.M)
    assert len(titles) >= 7
    blocks = {b.heading: b for b in _framework_blocks()}
    assert set(blocks) == set(titles), set(titles) ^ set(blocks)
    sources = "".join(p.read_text(encoding="utf-8") for p in HERE.glob("test_*.py"))
    injected = set(re.findall(r"run_readme_block\(\s*\"([^\"]+)\"", sources))
    scripts = {b.heading for b in SCRIPTS}
    assert scripts | injected == set(titles), (
        f"README blocks without a test: {set(titles) - scripts - injected}"
    )
    assert not scripts & injected, f"scripts need no injected providers: {scripts & injected}"
    for title in titles:
        flags = 0 if title in scripts else ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        compile(readme_block(title), title, "exec", flags=flags)  # a script has no top-level await


@pytest.fixture(scope="module")
def ran_scripts(
    local_azure: LocalAzure, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> dict[int, Ran]:
    if "integrations" not in (request.config.getoption("markexpr", "") or ""):
        # This module is collected in every run (its first test needs no framework); the frameworks'
        # imports (half a minute) belong to the integrations run only.
        pytest.skip("the framework blocks run in the integrations run (-m integrations)")
    return run_blocks(SCRIPTS, block_env(local_azure), tmp_path_factory.mktemp("readme-framework-blocks"))


@pytest.mark.integrations
@pytest.mark.parametrize("block", SCRIPTS, ids=lambda b: b.heading)
def test_readme_framework_block_runs_as_a_script(block: Block, ran_scripts: dict[int, Ran]) -> None:
    """As written, after the README's prelude: exit 0, an answer printed, nothing left unclosed."""
    done = ran_scripts[block.line]
    assert_ran_clean(block, done)
    assert done.out.strip(), done.err
