"""Azurite (Microsoft's Azure Storage emulator, from the npm registry) on 127.0.0.1 over TLS, for the
rotation function's blob lease. Installed by ``npm ci`` in the repository root (package.json; .ci/run does
it); without it the tests that need it are skipped, saying so."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SESSION_CA

ROOT = Path(__file__).resolve().parents[2]
AZURITE_BLOB = ROOT / "node_modules" / ".bin" / "azurite-blob"
INSTALL = f"cd {ROOT} && npm ci   # installs Azurite from package.json (needs Node 20+)"
# Azurite's documented development account (public, the same in every installation).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_LISTENING = re.compile(r"listens on (https://127\.0\.0\.1:\d+)")


@dataclasses.dataclass(frozen=True)
class Azurite:
    blob_url: str

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.blob_url}/{ACCOUNT};"
        )


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """Azurite's blob service on 127.0.0.1 (a free port), TLS with the test session's CA, in memory,
    telemetry off (it would otherwise call out to Application Insights)."""
    if not AZURITE_BLOB.exists():
        pytest.skip(f"Azurite is not installed; install it with: {INSTALL}")
    if shutil.which("node") is None:
        pytest.skip(f"Node.js is not on PATH (Azurite needs Node 20+); then: {INSTALL}")
    process = subprocess.Popen(
        [
            str(AZURITE_BLOB),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
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
            raise RuntimeError(f"Azurite did not start: {''.join(output)[-2000:]}")
        yield Azurite(found[0])
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)
