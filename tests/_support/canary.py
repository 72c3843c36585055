"""Key-leak canary machinery, and a pytest plugin that runs the canary over the whole suite.

* :func:`seed_canary_app` creates an APIM subscription whose two keys are known canary values and a vault
  secret holding the primary one (tagged the way ``apimvault rotate`` expects).
* :class:`LeakCapture` turns DEBUG logging on for ``apimvault``, ``openai``, ``httpx2``, ``httpcore2`` and
  ``azure`` and captures every record (formatted message, ``repr(args)``, exception text) at the root.
* :func:`find_leaks` looks for each key and every substring of >= 8 of its characters in texts; findings name
  the source, the key's fingerprint and the offset, never the key.

Whole-suite mode (no conftest change needed)::

    .venv/bin/python -m pytest -p tests._support.canary --canary

With ``--canary`` every test runs with DEBUG logging on; after each phase its log records and captured
stdout/stderr are scanned for every key the session's local APIM currently knows (both slots of every
subscription) plus the canary values. Any hit fails the session and is listed in the terminal summary.
"""

from __future__ import annotations

# First: a plugin (``-p``) loads before tests/conftest.py, and the session CA must precede aiohttp.
import tests._support.ca  # noqa: F401  # isort: skip

# isort: split
import dataclasses
import logging
import traceback
from collections.abc import Generator, Iterable, Iterator
from typing import Any

import pytest

from apimvault import fingerprint
from apimvault.local import LocalAzure
from apimvault.local.stack import APIM_SERVICE, ARM_SUBSCRIPTION, RESOURCE_GROUP
from tests._support.core import AppSecret, new_app_secret

# 32 hex characters, like real APIM keys, so the canary looks like the real thing to every code path.
CANARY_PRIMARY = "c0ffee00deadbeefcafef00d5eed1e55"
CANARY_SECONDARY = "5ca1ab1e0ddba11fee1dead0b5e55ed0"
MIN_PIECE = 8
LOGGERS = ("apimvault", "openai", "httpx2", "httpcore2", "azure")
# Not scanned in whole-suite mode: the local stack's own tests send raw keys with plain httpx2 (no apimvault,
# e.g. a key in the ``subscription-key`` query string that httpx2 logs), and the canary's self-test logs a
# piece of the canary on purpose. (``apimvault local``'s option checks lived in tests/local/ when this list
# was drawn up; they keep their exemption in tests/cli/.)
EXEMPT = (
    "tests/local/",
    "tests/cli/test_cli_local_options.py",
    "tests/test_canary.py::test_capture_sees_debug_records",
)


# ------------------------------------------------------------------------------------------ seeding


@dataclasses.dataclass
class CanaryApp(AppSecret):
    """The suite's :class:`AppSecret` holding the canary keys, with the stack it lives on."""

    azure: LocalAzure

    def keys(self) -> set[str]:
        """The canaries plus whatever keys the subscription holds now (rotations regenerate them)."""
        sub = self.azure.apim_state.get(self.sid)
        assert sub is not None
        return {CANARY_PRIMARY, CANARY_SECONDARY, sub.primary_key, sub.secondary_key}

    def env(self) -> dict[str, str | None]:
        return {
            "APIMVAULT_SECRET_NAME": self.name,
            "APIMVAULT_APIM_SUBSCRIPTION_ID": self.resource_id,
            "AZURE_CLIENT_ID": None,
        }


def seed_canary_app(azure: LocalAzure, name: str) -> CanaryApp:
    for sub in azure.apim_state.list(ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE):
        if sub.primary_key in (CANARY_PRIMARY, CANARY_SECONDARY) or sub.secondary_key in (
            CANARY_PRIMARY,
            CANARY_SECONDARY,
        ):
            azure.apim_state.regenerate(sub.sid, "primary")  # a previous canary app: retire its keys
            azure.apim_state.regenerate(sub.sid, "secondary")
    secret = new_app_secret(
        azure,
        name=f"canary-{name}",
        keys=(CANARY_PRIMARY, CANARY_SECONDARY),
        rotation=True,
        expires=int(azure.clock()) + 60 * 86400,
    )
    return CanaryApp(secret.name, secret.subscription, azure)


# ---------------------------------------------------------------------------------------- capturing


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[str] = []
        self.count = 0
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        try:
            text = self.format(record)
        except Exception:  # a record that cannot be formatted still gets scanned raw
            text = f"{record.msg!r} {record.args!r}"
        self.texts.append(text)
        self.texts.append(repr(record.args))
        if record.exc_info and record.exc_info[1] is not None:
            self.texts.append("".join(traceback.format_exception(record.exc_info[1])))


class LeakCapture:
    """DEBUG on the named loggers and a root handler collecting every record, for the ``with`` block."""

    def __init__(self, loggers: Iterable[str] = LOGGERS) -> None:
        self.loggers = list(loggers)
        self.handler = _Collector()
        self._saved: dict[str, int] = {}
        self._root_level = logging.NOTSET

    def __enter__(self) -> LeakCapture:
        for name in self.loggers:
            logger = logging.getLogger(name)
            self._saved[name] = logger.level
            logger.setLevel(logging.DEBUG)
        root = logging.getLogger()
        self._root_level = root.level
        root.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self.handler)
        for name, level in self._saved.items():
            logging.getLogger(name).setLevel(level)

    @property
    def records(self) -> int:
        return self.handler.count

    def text(self) -> str:
        return "\n".join(self.handler.texts)


def exception_texts(exc: BaseException) -> list[str]:
    """``str``, ``repr`` and the formatted traceback of an exception and its whole cause/context chain."""
    out: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        out += [str(current), repr(current), *(str(a) for a in current.args)]
        current = current.__cause__ or current.__context__
    out.append("".join(traceback.format_exception(exc)))
    return out


# ------------------------------------------------------------------------------------------ scanning


@dataclasses.dataclass(frozen=True)
class Leak:
    source: str
    key_fingerprint: str
    offset: int  # where in the key the leaked piece starts
    length: int

    def __str__(self) -> str:
        where = f"from offset {self.offset}"
        return f"{self.source}: {self.length} characters of key fp {self.key_fingerprint} ({where})"


def pieces(key: str, size: int = MIN_PIECE) -> Iterator[tuple[int, str]]:
    for i in range(len(key) - size + 1):
        yield i, key[i : i + size]


def find_leaks(texts: dict[str, str], keys: Iterable[str]) -> list[Leak]:
    """Every (source, key) where the key or any >= 8-character substring of it appears (one finding each)."""
    leaks = []
    for key in {k for k in keys if k and len(k) >= MIN_PIECE}:
        fp = fingerprint(key)
        for source, text in texts.items():
            if key in text:
                leaks.append(Leak(source, fp, 0, len(key)))
                continue
            for offset, piece in pieces(key):
                if piece in text:
                    leaks.append(Leak(source, fp, offset, MIN_PIECE))
                    break
    return leaks


# ------------------------------------------------------------------------------- whole-suite plugin

_LEAKS = pytest.StashKey[list[str]]()
_CAPTURE = pytest.StashKey[LeakCapture]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--canary",
        action="store_true",
        default=False,
        help="run every test with DEBUG logging and fail if any local APIM key appears in logs or output",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_LEAKS] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    if item.config.getoption("--canary", default=False):
        capture = LeakCapture()
        capture.__enter__()
        item.stash[_CAPTURE] = capture
    return (yield)


def _session_keys(item: pytest.Item) -> set[str]:
    keys = {CANARY_PRIMARY, CANARY_SECONDARY}
    funcargs: dict[str, Any] = getattr(item, "funcargs", {})
    azure = funcargs.get("azure") or funcargs.get("local_azure")
    if isinstance(azure, LocalAzure):
        for sub in azure.apim_state.list(ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE):
            keys.update((sub.primary_key, sub.secondary_key))
    return keys


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    capture = item.stash.get(_CAPTURE, None)
    if capture is None:
        return report
    if item.nodeid.startswith(EXEMPT):
        if call.when == "teardown":
            capture.__exit__()
        return report
    texts = {f"{item.nodeid} logs": capture.text()}
    for name, content in report.sections:
        if "stdout" in name or "stderr" in name:
            texts[f"{item.nodeid} {name}"] = content
    capture.handler.texts.clear()
    for leak in find_leaks(texts, _session_keys(item)):
        item.config.stash[_LEAKS].append(f"[{call.when}] {leak}")
    if call.when == "teardown":
        capture.__exit__()
    return report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not config.getoption("--canary", default=False):
        return
    leaks = config.stash[_LEAKS]
    terminalreporter.section("key-leak canary")
    terminalreporter.write_line(f"{len(leaks)} leak(s) of a key or >= {MIN_PIECE} of its characters")
    for line in leaks:
        terminalreporter.write_line(f"  {line}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.getoption("--canary", default=False) and session.config.stash[_LEAKS]:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
