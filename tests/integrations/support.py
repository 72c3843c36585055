"""Shared by the framework tests: README blocks run as written, a rotating app secret, a log capture."""

from __future__ import annotations

import ast
import inspect
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apimvault import AsyncSubscriptionKeyProvider, SubscriptionKeyProvider
from apimvault.local import LocalAzure
from tests._support.core import AppSecret, FakeClock, new_app_secret, rotate_to_secondary
from tests._support.policies import FAST_REFRESH

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Use with your framework"


def readme_block(title: str) -> str:
    """The first ```python block under ``### <title>`` in the README's framework section."""
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    parts = re.split(r"^### ", section, flags=re.M)
    matches = [p for p in parts if p.split("\n", 1)[0].strip() == title]
    assert len(matches) == 1, f"README {SECTION!r} needs exactly one '### {title}'"
    blocks = re.findall(r"```python\n(.*?)```", matches[0], re.S)
    assert blocks, f"README '### {title}' has no python block"
    return str(blocks[0])


def run_readme_block(title: str, **names: Any) -> dict[str, Any]:
    """Run the README block for ``title`` as written, with ``names`` (``provider``, ``aprovider``) defined."""
    namespace: dict[str, Any] = dict(names)
    code = compile(readme_block(title), f"README.md ### {title}", "exec")
    exec(code, namespace)  # noqa: S102 - the README's own text, so the docs are exactly what is tested
    return namespace


async def arun_readme_block(title: str, **names: Any) -> dict[str, Any]:
    """:func:`run_readme_block` for a block with top-level ``await`` (run on the test's event loop)."""
    namespace: dict[str, Any] = dict(names)
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    code = compile(readme_block(title), f"README.md ### {title}", "exec", flags=flags)
    result = eval(code, namespace)  # noqa: S307 - the README's own text, so the docs are exactly what is tested
    if inspect.iscoroutine(result):
        await result
    return namespace


@dataclass
class Rotating:
    """An app secret on the local stack, its providers' clock, and every key value it has ever had."""

    azure: LocalAzure
    app: AppSecret
    clock: FakeClock = field(default_factory=FakeClock)
    keys: set[str] = field(default_factory=set)

    @classmethod
    def new(cls, azure: LocalAzure) -> Rotating:
        app = new_app_secret(azure)
        made = cls(azure, app)
        made._remember()
        return made

    def _remember(self) -> None:
        sub = self.azure.apim_state.get(self.app.sid)
        assert sub is not None
        self.keys |= {sub.primary_key, sub.secondary_key}

    def provider(self) -> SubscriptionKeyProvider:
        return SubscriptionKeyProvider(
            self.azure.vault_url, self.app.name, clock=self.clock, policy=FAST_REFRESH
        )

    def aprovider(self) -> AsyncSubscriptionKeyProvider:
        return AsyncSubscriptionKeyProvider(
            self.azure.vault_url, self.app.name, clock=self.clock, policy=FAST_REFRESH
        )

    def rotate(self) -> None:
        """Rotate so the key every provider holds is revoked at the gateway, and allow a forced refresh."""
        rotate_to_secondary(self.azure, self.app)
        self._remember()
        self.clock.advance(FAST_REFRESH.forced_refresh_interval + 1)

    def slots(self) -> list[str]:
        """Which key slot the gateway accepted, request by request, for this app (oldest first)."""
        return [u.slot for u in self.azure.gateway.recent() if u.sid == self.app.sid]


class LogCapture(logging.Handler):
    """Keeps each record's rendered text (message, arguments, exception) for a leak check."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []
        self._levels: dict[str, int] = {}
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.texts.append(f"{self.format(record)} {record.args!r} {record.__dict__!r}")

    def debug(self, *names: str) -> None:
        """Turn these framework loggers to DEBUG for the test (their own level may be higher)."""
        for name in names:
            logger = logging.getLogger(name)
            self._levels.setdefault(name, logger.level)
            logger.setLevel(logging.DEBUG)

    def restore_levels(self) -> None:
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)

    def names(self) -> set[str]:
        return {r.name for r in self.records}


def assert_no_key(keys: set[str], *texts: str) -> None:
    """No 12-character run of any key value appears in any text.

    12 hex characters, not 8: the texts hold many random hex ids (request ids, completion ids), and a chance
    8-character match against one of a dozen 32-character keys in a megabyte of them is not negligible.
    """
    joined = "\n".join(texts)
    for key in keys:
        for i in range(len(key) - 11):
            assert key[i : i + 12] not in joined, "a key value appeared in the framework's output"
