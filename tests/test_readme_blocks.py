"""Every ```python block in README.md runs as written (issue 23), as a script, after one stated prelude: a
running local stack whose environment file is sourced (the README's "Before the examples" block). A block
that is deliberately a fragment is marked by an ``<!-- fragment -->`` line just before it.

The framework section's blocks ("## Use with your framework") need the frameworks: they run in the
integrations run (tests/integrations/test_readme_blocks.py); the rest run here, in the default run.

Each block runs in its own Python process (forked from one that imported openai once), with the session
stack's variables (what `apimvault local`'s env file holds) plus the prelude's, the socket layer limited to
loopback as in the test session, and ``-X dev`` (ResourceWarning shown): it must exit 0 and leave nothing
unclosed.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from azure.identity import DefaultAzureCredential

from apimvault.local import LocalAzure
from tests._support.readme import (
    FRAGMENT,
    FRAMEWORK_SECTION,
    PRELUDE_TITLE,
    README,
    Block,
    Ran,
    assert_ran_clean,
    block_env,
    prelude_env,
    python_blocks,
    readme_blocks,
    run_blocks,
)

DEFAULT_RUN = [b for b in python_blocks() if b.section != FRAMEWORK_SECTION and not b.fragment]


@pytest.fixture(scope="module")
def ran(local_azure: LocalAzure, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Ran]:
    """Every default-run block, run once, outside the source tree."""
    return run_blocks(DEFAULT_RUN, block_env(local_azure), tmp_path_factory.mktemp("readme-blocks"))


def test_the_readme_has_a_prelude_and_marks_its_fragments() -> None:
    blocks = readme_blocks()
    assert any(b.heading == PRELUDE_TITLE and b.lang == "sh" for b in blocks)
    assert prelude_env({"AZURE_OPENAI_ENDPOINT": "x"}), "the prelude exports the variables the examples read"
    text = README.read_text(encoding="utf-8").splitlines()
    markers = [i for i, line in enumerate(text) if line.strip() == FRAGMENT]
    marked = {b.line - 1 for b in blocks if b.fragment}  # each marker must precede a block
    assert len(markers) == len(marked)
    assert len(DEFAULT_RUN) >= 6, [b.id for b in DEFAULT_RUN]


@pytest.mark.parametrize("block", DEFAULT_RUN, ids=lambda b: b.id)
def test_readme_python_block_runs_as_written(block: Block, ran: dict[int, Ran]) -> None:
    assert_ran_clean(block, ran[block.line])


def test_a_fragment_marker_takes_its_block_out_of_the_run() -> None:
    text = "## A\n\n<!-- fragment -->\n\n```python\nx = undefined\n```\n\n```python\nprint(1)\n```\n"
    first, second = readme_blocks(text)
    assert first.fragment and not second.fragment
    assert (first.line, second.line, first.section) == (5, 9, "A")


def test_the_observability_block_prints_apimvaults_span(ran: dict[int, Ran]) -> None:
    [block] = [b for b in DEFAULT_RUN if b.section == "Observability"]
    assert '"name": "apimvault.vault.read"' in ran[block.line].out


def test_token_only_works_on_the_local_stack_after_the_readmes_policies_put(azure: LocalAzure) -> None:
    """The README's `PUT /gateway/policies` (run as written, with curl) turns the key requirement off, and
    then a token-only client gets answers; before it, the stack refuses it (no subscription key)."""
    import openai

    from apimvault import create_token_azure_openai

    [put] = [b for b in readme_blocks() if b.lang == "sh" and "/gateway/policies" in b.code]
    scope = prelude_env(block_env(azure))["APIMVAULT_TOKEN_SCOPE"]
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    credential = DefaultAzureCredential()
    with credential, create_token_azure_openai(scope, credential=credential, max_retries=0) as token_only:
        with pytest.raises(openai.AuthenticationError):
            token_only.chat.completions.create(model="gpt-4o-mini", messages=messages)
        try:
            done = subprocess.run(
                ["bash", "-c", put.code], env=block_env(azure), capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert '"subscription_required":false' in done.stdout.replace(" ", "")
            reply = token_only.chat.completions.create(model="gpt-4o-mini", messages=messages)
            assert reply.choices[0].message.content
        finally:
            azure.gateway.policies.set(azure.gateway.api_path, None)
