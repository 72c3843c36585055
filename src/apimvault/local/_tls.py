"""TLS of the local stack: one CA per stack (trustme), its loopback certificate, the process trust."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import trustme

from .._settings import TRUST_FILE_VARIABLES
from ..exceptions import ConfigurationError


class LocalCA:
    """One certificate authority per stack; issues the loopback server certificate and writes the CA PEM.

    ``LocalCA(directory)`` makes a new CA and writes ``ca.pem``, ``server.pem`` and ``server-key.pem`` into
    ``directory``; :meth:`load` uses the files an earlier ``LocalCA`` wrote there (another process's CA).
    """

    def __init__(self, directory: Path, *, _write: bool = True) -> None:
        self.directory = Path(directory)
        self.ca_path = self.directory / "ca.pem"
        self.cert_path = self.directory / "server.pem"
        self.key_path = self.directory / "server-key.pem"
        if not _write:
            return
        ca = trustme.CA(organization_name="apimvault local Azure")
        ca.cert_pem.write_to_path(str(self.ca_path))
        leaf = ca.issue_cert("127.0.0.1", "localhost", "::1")
        leaf.cert_chain_pems[0].write_to_path(str(self.cert_path))
        for extra in leaf.cert_chain_pems[1:]:
            extra.write_to_path(str(self.cert_path), append=True)
        leaf.private_key_pem.write_to_path(str(self.key_path))

    @classmethod
    def load(cls, directory: Path) -> LocalCA:
        """The CA files a ``LocalCA`` wrote in ``directory`` (no new CA is made)."""
        ca = cls(directory, _write=False)
        missing = [p.name for p in (ca.ca_path, ca.cert_path, ca.key_path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"no local CA in {directory}: missing {', '.join(missing)}")
        return ca


def prepare_ca(
    directory: str | Path | None = None, *, reuse: bool = False, for_aiohttp: bool = True
) -> LocalCA:
    """Make (or, with ``reuse=True``, load) a local stack's CA and trust it process-wide.

    Sets ``SSL_CERT_FILE`` and ``REQUESTS_CA_BUNDLE`` to the CA's PEM. aiohttp (the async Azure SDK's
    transport, imported by openai and ``azure.*.aio``) reads ``SSL_CERT_FILE`` once, when it is imported,
    so call this before anything imports them. ``directory`` defaults to a new temporary directory.

    With ``for_aiohttp`` (the default), raises :class:`~apimvault.exceptions.ConfigurationError` when aiohttp
    is already imported with another ``SSL_CERT_FILE``: its clients could not verify this CA's certificates.
    Pass ``for_aiohttp=False`` when only sync clients (which read the variables when they are created) use
    the stack.
    """
    if directory is None:
        directory = tempfile.mkdtemp(prefix="apimvault-local-")
    directory = Path(directory)
    ca = LocalCA.load(directory) if reuse else LocalCA(directory)
    if for_aiohttp and "aiohttp" in sys.modules and os.environ.get("SSL_CERT_FILE") != str(ca.ca_path):
        raise ConfigurationError(
            "aiohttp is already imported in this process, so it cannot trust a new local stack's CA: "
            "call apimvault.local.prepare_ca() before importing openai or azure's aio clients"
        )
    for name in TRUST_FILE_VARIABLES:
        os.environ[name] = str(ca.ca_path)
    return ca
