"""The embedded local Azure of ``drill`` and ``local``: its CA is trusted before aiohttp is imported."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..exceptions import (
    ConfigurationError,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..local._common import LocalCA


# ------------------------------------------------------------------------------- embedded local Azure


def prepare_embedded_ca(directory: Path) -> LocalCA:
    """Create an embedded stack's CA and trust it process-wide, before aiohttp is imported.

    Raises :class:`ConfigurationError` when aiohttp was already imported with another trust store (then
    the async Azure SDK could not verify the stack's certificates).
    """
    from ..local._common import LocalCA

    already = "aiohttp" in sys.modules
    ca = LocalCA(directory)
    if already and os.environ.get("SSL_CERT_FILE") != str(ca.ca_path):
        raise ConfigurationError(
            "aiohttp is already imported in this process, so it cannot trust a new embedded stack's CA; "
            "run `apimvault local` in another terminal and point this command at it (set -a; "
            ". .apimvault-local.env; set +a), or start the embedded stack before importing openai/azure aio"
        )
    os.environ["SSL_CERT_FILE"] = str(ca.ca_path)
    os.environ["REQUESTS_CA_BUNDLE"] = str(ca.ca_path)
    return ca


@contextlib.contextmanager
def embedded_stack(*, need_async: bool) -> Iterator[Any]:
    """Start an embedded :class:`~apimvault.local.LocalAzure` with its environment applied."""
    from ..local._common import temporary_environ

    directory = Path(tempfile.mkdtemp(prefix="apimvault-local-"))
    # Entered with today's values, so leaving it restores the two trust variables set below.
    trust = {k: os.environ.get(k) for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")}
    with temporary_environ(trust):
        try:
            if need_async:
                ca = prepare_embedded_ca(directory)
            else:  # sync SDK clients read SSL_CERT_FILE / REQUESTS_CA_BUNDLE when they are created
                from ..local._common import LocalCA

                ca = LocalCA(directory)
                os.environ["SSL_CERT_FILE"] = str(ca.ca_path)
                os.environ["REQUESTS_CA_BUNDLE"] = str(ca.ca_path)
            from ..local import LocalAzure

            azure = LocalAzure(directory=directory, ca=ca)
            # Requests still in flight when the stack stops (a background refresh, a client that timed out)
            # make uvicorn and asyncio log tracebacks about cancelled tasks; they are not news.
            quiet = {name: logging.getLogger(name).level for name in ("uvicorn.error", "asyncio")}
            try:
                with azure, azure.env():
                    try:
                        yield azure
                    finally:
                        for name in quiet:
                            logging.getLogger(name).setLevel(logging.CRITICAL)
            finally:
                for name, level in quiet.items():
                    logging.getLogger(name).setLevel(level)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
