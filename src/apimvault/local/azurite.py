"""Azurite, Microsoft's Azure Storage emulator (from the npm registry), on 127.0.0.1 over TLS.

The drill's queue and blob lease (``apimvault drill`` with Azurite found) and the test suite's lease and
delivery tests start it the same way: one service per process on a free loopback port, in memory, with the
caller's CA, product-style URLs and telemetry off (it would otherwise call out to Application Insights).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from ..exceptions import ConfigurationError

__all__ = ["AZURITE_ACCOUNT", "AZURITE_ACCOUNT_KEY", "azurite_service"]

# Azurite's documented development account (public, the same in every installation; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
_LISTENING = re.compile(r"listens on (https://127\.0\.0\.1:\d+)")


@contextlib.contextmanager
def azurite_service(bin_dir: Path, service: str, cert: Path, key: Path) -> Iterator[str]:
    """One Azurite service on 127.0.0.1 (a free port), TLS, in memory, telemetry off; yields its URL."""
    process = subprocess.Popen(  # noqa: S603 - a fixed program and arguments, no shell
        [
            str(bin_dir / f"azurite-{service}"),
            f"--{service}Host",
            "127.0.0.1",
            f"--{service}Port",
            "0",
            "--inMemoryPersistence",
            "--cert",
            str(cert),
            "--key",
            str(key),
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

    reader = threading.Thread(target=read, name=f"azurite-{service}", daemon=True)
    reader.start()
    try:
        ready.wait(60)
        if not found:
            raise ConfigurationError(f"Azurite {service} did not start: {''.join(output)[-500:]}")
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
