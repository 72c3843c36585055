"""The local services and the runner that serves them.

Every service of :class:`apimvault.local.LocalAzure` is a Starlette app served by uvicorn on its own
``127.0.0.1`` port with a certificate from one per-stack CA (trustme). All servers share one event loop
in one background thread, so a stack costs one thread however many services it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import uvicorn
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from ._faults import Counters, Faults, ServiceMiddleware
from ._tls import LocalCA

LOOPBACK = "127.0.0.1"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response with Azure's ``application/json; charset=utf-8`` content type."""
    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        headers=headers,
        media_type="application/json; charset=utf-8",
    )


class Service:
    """Base of every local service: a name, an ASGI app, faults, counters and a bound loopback socket."""

    name = "service"

    def __init__(self) -> None:
        self.faults = Faults()
        self.counters = Counters()
        self.stopping = asyncio.Event()
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto is TCP,
        # and without it every response written in two parts (headers, body) waits ~40 ms for a delayed ACK.
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((LOOPBACK, 0))
        self.port: int = self.socket.getsockname()[1]

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    def classify(self, method: str, path: str) -> str:
        return f"{method} {path}"

    def error_response(self, status: int, message: str) -> Response:
        return JSONResponse({"error": {"code": str(status), "message": message}}, status_code=status)

    def build_app(self) -> ASGIApp:
        raise NotImplementedError

    def asgi(self) -> ASGIApp:
        return ServiceMiddleware(self.build_app(), self)


class _QuietServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the stack runs in a thread; the caller owns signals
        return None


class ServerThread:
    """Runs the uvicorn servers of a stack's services on one event loop in one daemon thread."""

    def __init__(self, services: list[Service], ca: LocalCA) -> None:
        self.services = services
        self.ca = ca
        self.loop = asyncio.new_event_loop()
        self._servers: list[_QuietServer] = []
        self._thread = threading.Thread(target=self._run, name="apimvault-local", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced to start()
            self._error = exc
            self._ready.set()
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        for service in self.services:
            service.stopping = asyncio.Event()
            config = uvicorn.Config(
                service.asgi(),
                log_level="warning",
                access_log=False,
                ssl_certfile=str(self.ca.cert_path),
                ssl_keyfile=str(self.ca.key_path),
                lifespan="off",
                timeout_graceful_shutdown=2,
                timeout_keep_alive=30,
                backlog=1024,
            )
            self._servers.append(_QuietServer(config))
        tasks = [
            asyncio.create_task(server.serve(sockets=[service.socket]))
            for server, service in zip(self._servers, self.services, strict=True)
        ]
        while not all(server.started for server in self._servers):
            if any(task.done() for task in tasks):
                break
            await asyncio.sleep(0.01)
        self._ready.set()
        await asyncio.gather(*tasks)
        # uvicorn asks idle connections to close (a TLS shutdown that waits for the client) and a forced
        # exit leaves busy ones open, while this loop stops when this returns. Abort what is left, then let
        # the callbacks that close the sockets run, so no socket is left for the garbage collector.
        for server in self._servers:
            for connection in list(server.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()
        for _ in range(3):
            await asyncio.sleep(0)

    def start(self, timeout: float = 30) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("local Azure did not start in time")
        if self._error is not None:
            raise RuntimeError("local Azure failed to start") from self._error
        if not all(server.started for server in self._servers):
            raise RuntimeError("local Azure failed to start a service")

    def stop(self) -> None:
        def _signal() -> None:
            for service in self.services:
                service.stopping.set()
            for server in self._servers:
                server.should_exit = True
                server.force_exit = True  # don't wait for idle keep-alive connections of clients

        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(_signal)
            self._thread.join(timeout=15)
        elif self._thread.ident is None and not self.loop.is_closed():
            self.loop.close()  # never started: _run (which closes it) never ran
        for service in self.services:
            with contextlib.suppress(OSError):
                service.socket.close()

    def call(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run a coroutine factory on the stack's loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result()
