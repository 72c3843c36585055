"""Framework tests (marker ``integrations``): each framework's own objects, on apimvault clients, driven
through a key rotation against the local stack.

The frameworks' own phone-home features are switched off here, before any of them is imported (collection
imports them, before the session's loopback guard is up): LiteLLM's model-cost-map download at import,
Haystack's telemetry, the Agents SDK's trace export, LangSmith tracing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import LogCapture

HERE = Path(__file__).parent
#: The one module here that imports no framework: it runs in the default suite.
_ALWAYS = "test_readme_blocks.py"

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ["HAYSTACK_TELEMETRY_ENABLED"] = "False"
os.environ["OPENAI_AGENTS_DISABLE_TRACING"] = "1"
os.environ["LANGSMITH_TRACING"] = "false"
os.environ["LANGCHAIN_TRACING_V2"] = "false"


@pytest.fixture
def debug_logs() -> Iterator[LogCapture]:
    """Every log record of the test, at DEBUG, as a handler on the root logger sees it."""
    root = logging.getLogger()
    capture = LogCapture()
    level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(level)
        capture.restore_levels()


def _asked(config: pytest.Config) -> bool:
    return "integrations" in (config.getoption("markexpr", "") or "")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Leave the framework modules out of a run that does not ask for them (``-m integrations``).

    Not even imported: importing the frameworks alone takes half a minute on a loaded machine, and the
    README's test command keeps its time budget whether or not they are installed.
    """
    name = collection_path.name
    if collection_path.parent == HERE and name.startswith("test_") and name != _ALWAYS and not _asked(config):
        return True
    return None
