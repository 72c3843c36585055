"""Azurite (Microsoft's Azure Storage emulator, from the npm registry) on 127.0.0.1 over TLS, for the
rotation function's blob lease and its delivery queue. Installed by ``npm ci`` in the repository root
(package.json; .ci/run does it); without it the tests that need it are skipped, saying so, except in CI
(``CI=true``), where they fail: the lease and delivery guarantees in SECURITY.md rest on them."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from apimvault.local import LocalCA
from apimvault.local.azurite import AZURITE_ACCOUNT, AZURITE_ACCOUNT_KEY, azurite_service

ROOT = Path(__file__).resolve().parents[2]
INSTALL = f"cd {ROOT} && npm ci   # installs Azurite from package.json (needs Node 20+)"
ACCOUNT, ACCOUNT_KEY = AZURITE_ACCOUNT, AZURITE_ACCOUNT_KEY  # Azurite's documented development account


@dataclasses.dataclass(frozen=True)
class Azurite:
    blob_url: str
    queue_url: str | None = None

    @property
    def connection_string(self) -> str:
        """The account's connection string as the Functions host reads ``AzureWebJobsStorage``."""
        queue = f"QueueEndpoint={self.queue_url}/{ACCOUNT};" if self.queue_url else ""
        return (
            f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.blob_url}/{ACCOUNT};{queue}"
        )


def _require_installed(program: Path) -> None:
    """Skip when Azurite or Node.js is missing, except in CI (``CI=true``, as .ci/run runs): there the lease
    and delivery tests that SECURITY.md cites must run, so a missing install fails instead of skipping."""
    missing = None
    if not program.exists():
        missing = f"Azurite is not installed; install it with: {INSTALL}"
    elif shutil.which("node") is None:
        missing = f"Node.js is not on PATH (Azurite needs Node 20+); then: {INSTALL}"
    if missing is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the Azurite tests: {missing}")
    pytest.skip(missing)


@contextlib.contextmanager
def _start(service: str, ca: LocalCA) -> Iterator[str]:
    """One Azurite service (``blob`` or ``queue``) with the test session's CA, started as the drill starts it
    (:func:`apimvault.local.azurite.azurite_service`); yields its URL."""
    program = ROOT / "node_modules" / ".bin" / f"azurite-{service}"
    _require_installed(program)
    with azurite_service(program.parent, service, ca.cert_path, ca.key_path) as url:
        yield url


@pytest.fixture(scope="session")
def azurite(session_ca: LocalCA) -> Iterator[Azurite]:
    """Azurite's blob service (the rotation function's lease)."""
    with _start("blob", session_ca) as url:
        yield Azurite(url)


@pytest.fixture(scope="session")
def azurite_storage(azurite: Azurite, session_ca: LocalCA) -> Iterator[Azurite]:
    """Azurite's blob and queue services: the function's storage account as ``AzureWebJobsStorage`` sees it
    (the lease blob, the rotation queue and its poison queue)."""
    with _start("queue", session_ca) as url:
        yield Azurite(azurite.blob_url, url)
