"""Shared fixtures: one local Azure stack per test session, reset between tests.

Nothing here patches an SDK: the real clients talk HTTPS to the stack on 127.0.0.1.
"""

from __future__ import annotations

import gc
import socket
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from apimvault.local import LocalAzure, LocalCA

# aiohttp (azure-core's async transport) builds its default SSL context from SSL_CERT_FILE once, when it
# is first imported. So the session's CA exists, and the variable points at it, before anything imports it.
from tests._support.ca import SESSION_CA

# isort: split
# Imported now, aiohttp keeps trusting the session CA even when a test (an in-process `apimvault local`)
# points SSL_CERT_FILE at another stack's CA for a while, whatever order the tests run in.
import aiohttp  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def _loopback_only() -> Iterator[None]:
    """Refuse, for the whole test session, any connection to an address outside the loopback range."""
    original = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> object:
        if isinstance(address, tuple) and self.family in (socket.AF_INET, socket.AF_INET6):
            host = str(address[0])
            if not (host.startswith("127.") or host in ("::1", "localhost")):
                raise ConnectionRefusedError(f"test tried to reach non-loopback address {host!r}")
        return original(self, address)  # type: ignore[arg-type]

    socket.socket.connect = guarded  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        socket.socket.connect = original  # type: ignore[method-assign]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what collection imported and built (modules, test items: live for the whole session) out of the
    collector's sight, so the full collection after each test scans only what tests create."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect garbage after every test, so an unclosed socket or transport is reported (as an error, see
    pyproject's ``filterwarnings``) in the test that leaked it, not in whichever test the collector next
    happens to run in."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def session_ca() -> LocalCA:
    """The test session's CA (made before aiohttp was imported): give it to any ``LocalAzure`` a test
    starts, so every stack of the session is trusted alike."""
    return SESSION_CA


@pytest.fixture(scope="session")
def local_azure(session_ca: LocalCA) -> Iterator[LocalAzure]:
    # The stack's default: both gateway units behind one URL, each request to one of them in turn, as real
    # APIM's units of a region. `rotate` stores a key only after K consecutive accepted probes per URL; the
    # drills that rotate here with propagation keep (K - 1) x interval above the longest unit delay, so which
    # unit each probe reaches cannot matter (tests/cli/test_drill_delivery.py's module doc).
    with LocalAzure(ca=session_ca) as azure, azure.env():
        yield azure


@pytest.fixture
def azure(local_azure: LocalAzure) -> Iterator[LocalAzure]:
    """The session's stack with no faults and zeroed counters for this test; role assignments the test
    gave the shared rotator identity (per-app grants) are revoked after it."""
    for service in local_azure.services.values():
        service.faults.clear()
        service.counters.reset()
    rotator = local_azure.rotator_identity
    held = set(local_azure.rbac.assignments(rotator))
    yield local_azure
    for service in local_azure.services.values():
        service.faults.clear()
    for extra in set(local_azure.rbac.assignments(rotator)) - held:
        local_azure.revoke_role(rotator, extra.role, extra.scope)


@pytest.fixture
def closing() -> Iterator[ExitStack]:
    """Closes what a test hands it (``closing.enter_context(provider)``) when the test ends, passed or
    failed, last opened first: so no socket is left for the garbage collector to report in another test."""
    with ExitStack() as stack:
        yield stack
