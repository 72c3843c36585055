"""The embedded local Azure of ``drill`` and ``local``: its CA is trusted before aiohttp is imported."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._settings import TRUST_FILE_VARIABLES
from ..exceptions import (
    ConfigurationError,
)


@contextlib.contextmanager
def embedded_stack(*, need_async: bool, **options: Any) -> Iterator[Any]:
    """Start an embedded :class:`~apimvault.local.LocalAzure` (``options``: its keyword arguments) with its
    environment applied."""
    from ..local import LocalAzure, prepare_ca, temporary_environ

    directory = Path(tempfile.mkdtemp(prefix="apimvault-local-"))
    # Entered with today's values, so leaving it restores the two trust variables set below.
    trust = {k: os.environ.get(k) for k in TRUST_FILE_VARIABLES}
    with temporary_environ(trust):
        try:
            # Sync SDK clients read SSL_CERT_FILE / REQUESTS_CA_BUNDLE when they are created; aiohttp reads
            # SSL_CERT_FILE once, when it is imported, so only async use needs it not imported yet.
            try:
                ca = prepare_ca(directory, for_aiohttp=need_async)
            except ConfigurationError as exc:
                raise ConfigurationError(
                    f"{exc}; or run `apimvault local` in another terminal and point this command at it "
                    "(set -a; . .apimvault-local.env; set +a)"
                ) from exc
            azure = LocalAzure(directory=directory, ca=ca, **options)
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
