"""Azurite (Microsoft's Azure Storage emulator, from the npm registry) on 127.0.0.1 over TLS, for the
rotation function's blob lease and its delivery queue. Installed by ``npm ci`` in the repository root
(package.json; .ci/run does it); without it the tests that need it are skipped, saying so, except in CI
(``CI=true``), where they fail: the lease and delivery guarantees in SECURITY.md rest on them."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SESSION_CA

ROOT = Path(__file__).resolve().parents[2]
INSTALL = f"cd {ROOT} && npm ci   # installs Azurite from package.json (needs Node 20+)"
# Azurite's documented development account (public, the same in every installation).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_LISTENING = re.compile(r"listens on (https://127\.0\.0\.1:\d+)")


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
def _start(service: str) -> Iterator[str]:
    """One Azurite service (``blob`` or ``queue``) on 127.0.0.1 (a free port), TLS with the test session's
    CA, in memory, telemetry off (it would otherwise call out to Application Insights); yields its URL."""
    program = ROOT / "node_modules" / ".bin" / f"azurite-{service}"
    _require_installed(program)
    process = subprocess.Popen(
        [
            str(program),
            f"--{service}Host",
            "127.0.0.1",
            f"--{service}Port",
            "0",
            "--inMemoryPersistence",
            "--cert",
            str(SESSION_CA.cert_path),
            "--key",
            str(SESSION_CA.key_path),
            "--skipApiVersionCheck",
            "--disableProductStyleUrl",
            "--disableTelemetry",
            "--silent",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    found: list[str] = []
    output: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            match = _LISTENING.search(line)
            if match and not found:
                found.append(match.group(1))
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        ready.wait(60)
        if not found:
            raise RuntimeError(f"Azurite {service} did not start: {''.join(output)[-2000:]}")
        yield found[0]
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)
        reader.join(15)
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """Azurite's blob service (the rotation function's lease)."""
    with _start("blob") as url:
        yield Azurite(url)


@pytest.fixture(scope="session")
def azurite_storage(azurite: Azurite) -> Iterator[Azurite]:
    """Azurite's blob and queue services: the function's storage account as ``AzureWebJobsStorage`` sees it
    (the lease blob, the rotation queue and its poison queue)."""
    with _start("queue") as url:
        yield Azurite(azurite.blob_url, url)
