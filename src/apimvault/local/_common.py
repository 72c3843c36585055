"""Shared machinery of the local Azure stack: TLS, tokens, faults, counters and the server runner.

Every service of :class:`apimvault.local.LocalAzure` is a Starlette app served by uvicorn on its own
``127.0.0.1`` port with a certificate from one per-stack CA (trustme). All servers share one event loop
in one background thread, so a stack costs one thread however many services it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import secrets
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import jwt
import jwt.algorithms
import trustme
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

Clock = Callable[[], float]

LOOPBACK = "127.0.0.1"
TENANT_ID = "72f988bf-0000-4000-8000-00000000a2ae"
"""Tenant GUID the local identity service puts in tokens and the vault names in its challenge."""

FaultKind = Literal["latency", "status", "throttle", "reset", "hang"]


def fingerprint(value: str) -> str:
    """Short, non-reversible fingerprint of a secret value, safe to log (first 8 hex of SHA-256)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:8]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response with Azure's ``application/json; charset=utf-8`` content type."""
    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        headers=headers,
        media_type="application/json; charset=utf-8",
    )


# --------------------------------------------------------------------------------------------------- TLS


class LocalCA:
    """One certificate authority per stack; issues the loopback server certificate and writes the CA PEM."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._ca = trustme.CA(organization_name="apimvault local Azure")
        self.ca_path = directory / "ca.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_path))
        leaf = self._ca.issue_cert("127.0.0.1", "localhost", "::1")
        self.cert_path = directory / "server.pem"
        self.key_path = directory / "server-key.pem"
        leaf.cert_chain_pems[0].write_to_path(str(self.cert_path))
        for extra in leaf.cert_chain_pems[1:]:
            extra.write_to_path(str(self.cert_path), append=True)
        leaf.private_key_pem.write_to_path(str(self.key_path))


# ------------------------------------------------------------------------------------------------ tokens


@dataclasses.dataclass(frozen=True)
class Identity:
    """A managed identity known to the local identity service."""

    name: str
    client_id: str
    object_id: str

    @classmethod
    def new(cls, name: str) -> Identity:
        return cls(name=name, client_id=str(uuid.uuid4()), object_id=str(uuid.uuid4()))


class TokenError(Exception):
    """A bearer token the stack did not issue, or one that is expired or for another audience."""


class TokenIssuer:
    """Signs and verifies the stack's access tokens (RS256 JWTs, one RSA key per stack, ``kid`` set).

    Tokens carry Entra-shaped claims (``aud``, ``iss``, ``tid``, ``oid``, ``appid``, ``exp``...) so that
    tools like ``apimvault check`` can show which identity a token belongs to. Only tokens signed by this
    issuer verify; anything else is a :class:`TokenError`.
    """

    def __init__(self, clock: Clock = time.time, lifetime_s: int = 3600) -> None:
        # issue 14: RS256 with a published key (apimvault.local.oidc serves it as JWKS), as Entra signs.
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = secrets.token_urlsafe(16)
        self._clock = clock
        self.lifetime_s = lifetime_s
        self.issuer = f"https://sts.windows.net/{TENANT_ID}/"
        self.app_roles: dict[tuple[str, str], tuple[str, ...]] = {}  # (client_id, audience) -> roles

    def grant_app_role(self, identity: Identity, audience: str, role: str) -> None:
        """Give ``identity`` the app role ``role`` on the API ``audience`` (the ``roles`` claim)."""
        key = (identity.client_id, audience)
        self.app_roles[key] = (*self.app_roles.get(key, ()), role)

    def jwks(self) -> dict[str, Any]:
        """The public signing key as a JSON Web Key Set (what Entra's ``jwks_uri`` serves)."""
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key()))
        return {"keys": [{"kty": "RSA", "use": "sig", "kid": self.kid, "n": jwk["n"], "e": jwk["e"]}]}

    def issue(self, identity: Identity, resource: str, *, lifetime_s: int | None = None) -> tuple[str, int]:
        now = int(self._clock())
        exp = now + (self.lifetime_s if lifetime_s is None else lifetime_s)
        claims = {
            "aud": resource,
            "iss": self.issuer,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "tid": TENANT_ID,
            "oid": identity.object_id,
            "sub": identity.object_id,
            "appid": identity.client_id,
            "idtyp": "app",
            "xms_mi_name": identity.name,
            "uti": secrets.token_urlsafe(16),  # Entra's unique token id: no two tokens are the same bytes
        }
        roles = self.app_roles.get((identity.client_id, resource))
        if roles:
            claims["roles"] = list(roles)
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid}), exp

    def verify(self, token: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key.public_key(),
                algorithms=["RS256"],
                issuer=self.issuer,
                options={"verify_aud": False, "verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.PyJWTError as exc:
            raise TokenError(f"token not issued by the local identity service: {type(exc).__name__}") from exc
        if int(claims.get("exp", 0)) <= int(self._clock()):
            raise TokenError("token is expired")
        return claims

    @staticmethod
    def bearer(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        return value.strip()


# ------------------------------------------------------------------------------------------------ faults


@dataclasses.dataclass
class Fault:
    """One injected fault. ``times=None`` applies it until cleared; otherwise to the next ``times`` requests.

    Kinds:
      * ``latency``: add ``seconds`` before the request is handled (the request then succeeds);
      * ``status``: answer ``status`` (default 503) with the service's error body;
      * ``throttle``: answer 429 with ``Retry-After: retry_after``;
      * ``reset``: drop the connection without a complete response;
      * ``hang``: hold the request for ``seconds`` (default 3600) without answering, so clients time out.
    """

    kind: FaultKind
    operation: str | None = None
    times: int | None = None
    seconds: float = 0.0
    status: int = 503
    retry_after: int = 1

    def matches(self, operation: str) -> bool:
        return self.operation is None or self.operation == operation


ErrorBody = Callable[[int, str], Response]
"""How a service shapes an injected error: ``(status, message) -> Response``."""


class _CountedRule(Protocol):
    times: int | None

    def matches(self, operation: str) -> bool: ...


R = TypeVar("R", bound=_CountedRule)


def take_matching(rules: list[R], operation: str) -> list[R]:
    """The rules matching ``operation``, consuming one use of each counted rule (caller holds the lock)."""
    chosen: list[R] = []
    for rule in list(rules):
        if not rule.matches(operation):
            continue
        chosen.append(rule)
        if rule.times is not None:
            rule.times -= 1
            if rule.times <= 0:
                rules.remove(rule)
    return chosen


class Faults:
    """Runtime-settable faults of one service; thread-safe, consulted by :class:`ServiceMiddleware`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._rules.append(fault)
        return fault

    def inject(
        self,
        kind: FaultKind,
        *,
        operation: str | None = None,
        times: int | None = None,
        seconds: float = 0.0,
        status: int = 503,
        retry_after: int = 1,
    ) -> Fault:
        return self.add(Fault(kind, operation, times, seconds, status, retry_after))

    def fail_next(self, n: int, *, status: int = 503, operation: str | None = None) -> Fault:
        """Fail the next ``n`` matching requests with ``status``, then recover."""
        return self.inject("status", operation=operation, times=n, status=status)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def active(self) -> list[Fault]:
        with self._lock:
            return list(self._rules)

    def take(self, operation: str) -> list[Fault]:
        """The faults that apply to this request, consuming one use of each counted fault."""
        with self._lock:
            return take_matching(self._rules, operation)


class Counters:
    """Per-operation request counters of one service, plus free-form labelled counts (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: Counter[str] = Counter()
        self._labels: Counter[str] = Counter()

    def hit(self, operation: str) -> None:
        with self._lock:
            self._ops[operation] += 1

    def label(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._labels[name] += n

    def __getitem__(self, operation: str) -> int:
        with self._lock:
            return self._ops[operation]

    def labels(self) -> dict[str, int]:
        with self._lock:
            return dict(self._labels)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._ops)

    def total(self) -> int:
        with self._lock:
            return sum(self._ops.values())

    def reset(self) -> None:
        with self._lock:
            self._ops.clear()
            self._labels.clear()


class _Reset(Exception):
    """Raised inside the ASGI app to make uvicorn drop the connection mid-response."""


class ServiceMiddleware:
    """ASGI middleware: classify the request, count it, then apply any injected fault.

    ``classify(method, path) -> operation`` names the operation (e.g. ``GetSecret``); unknown routes
    are counted under ``"unknown"``. Faults are applied before the service handles the request.
    """

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        operation = self.service.classify(scope["method"], scope["path"])
        self.service.counters.hit(operation)
        for fault in self.service.faults.take(operation):
            if fault.kind == "latency":
                await asyncio.sleep(fault.seconds)
            elif fault.kind == "hang":
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.service.stopping.wait(), fault.seconds or 3600)
                return
            elif fault.kind == "reset":
                await _drop_connection(send)
                return
            elif fault.kind == "throttle":
                response = self.service.error_response(429, "Too many requests. Retry later.")
                response.headers["Retry-After"] = str(fault.retry_after)
                await response(scope, receive, send)
                return
            else:
                response = self.service.error_response(fault.status, "Injected fault.")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _drop_connection(send: Send) -> None:
    # A response that promises a body it never sends; raising makes uvicorn close the transport,
    # so the client sees the connection go away mid-response (httpx: RemoteProtocolError).
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"1024")],
        }
    )
    await send({"type": "http.response.body", "body": b"{", "more_body": True})
    raise _Reset("connection reset injected")


# ---------------------------------------------------------------------------------------------- services


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
        for service in self.services:
            with contextlib.suppress(OSError):
                service.socket.close()

    def call(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run a coroutine factory on the stack's loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result()


@contextlib.contextmanager
def temporary_environ(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or unset, for ``None``) environment variables for the duration of the block."""
    import os

    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
