"""Issue 21 item 10: an identity endpoint that trickles its answer (a byte at a time, each within the read
timeout) held a cold caller past the documented bound. The provider's own credential now has a deadline for
the whole token request ((retry_total + 1) x (connection_timeout + read_timeout)); the caller gets the typed
CredentialError while the endpoint is still trickling.

The trickling endpoint is a loopback HTTP server of this test, named by ``IDENTITY_ENDPOINT`` (App Service
managed identity, what the stack's own identity endpoint stands for); the credential is azure-identity's
unmodified ``DefaultAzureCredential`` (sync and aio).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest

from apimvault import AsyncSubscriptionKeyProvider, CredentialError, SubscriptionKeyProvider
from apimvault.local import LocalAzure
from tests._support.core import new_app_secret

# Per read 2 s (the trickle sends a byte every 0.5 s, so no read ever times out); deadline 1 x (1 + 2) = 3 s.
BOUNDS = {"connection_timeout": 1, "read_timeout": 2, "retry_total": 0}


class Trickle:
    """Answers every request with headers and then one body byte per 0.5 s, for up to 120 s."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.requests = 0
        self.finished = 0  # trickled answers that reached their end
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            self.requests += 1
            body_len = 240
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {body_len}\r\n\r\n".encode()
            )
            try:
                for _ in range(body_len):
                    if self.stop.wait(0.5):
                        return
                    conn.sendall(b" ")
            except OSError:
                return
            self.finished += 1

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def trickle(monkeypatch: pytest.MonkeyPatch) -> Iterator[Trickle]:
    server = Trickle()
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"http://127.0.0.1:{server.port}/msi/token")
    try:
        yield server
    finally:
        server.close()


def test_trickling_identity_endpoint_meets_a_deadline(azure: LocalAzure, trickle: Trickle) -> None:
    app = new_app_secret(azure)
    provider = SubscriptionKeyProvider(azure.vault_url, app.name, credential_kwargs=BOUNDS)
    try:
        with pytest.raises(CredentialError, match="within 3 s"):
            provider.get_key()
        assert trickle.requests >= 1
        assert trickle.finished == 0  # the endpoint was still trickling when the caller got its answer
        assert azure.keyvault.counters["GetSecret"] <= 1  # only the unauthenticated challenge request
    finally:
        provider.close()


def test_trickling_identity_endpoint_meets_a_deadline_async(azure: LocalAzure, trickle: Trickle) -> None:
    app = new_app_secret(azure)

    async def run() -> None:
        async with AsyncSubscriptionKeyProvider(azure.vault_url, app.name, credential_kwargs=BOUNDS) as p:
            with pytest.raises(CredentialError, match="within 3 s"):
                await p.get_key()

    asyncio.run(run())
    assert trickle.requests >= 1
    assert trickle.finished == 0


def test_the_rotations_credential_meets_the_same_deadline(azure: LocalAzure, trickle: Trickle) -> None:
    """Issue 19.6: `rotate` / `plan_rotation` (and the CLI, which builds the same credential) bound the
    identity endpoint as the providers do: a trickling endpoint gives CredentialError, not a held rotation."""
    from apimvault.rotation import plan_rotation
    from apimvault.rotation.azure import bounded_credential

    app = new_app_secret(azure)
    credential = bounded_credential(**BOUNDS)
    try:
        with pytest.raises(CredentialError, match="within 3 s"):
            plan_rotation(
                vault_url=azure.vault_url,
                secret_name=app.name,
                credential=credential,
                gateway_urls=[azure.gateway_url],
            )
    finally:
        credential.close()
    assert trickle.requests >= 1 and trickle.finished == 0  # it asked the endpoint and did not wait it out
