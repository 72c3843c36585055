"""The stack's admin API (its own HTTPS port) and a small sync client for driving a stack in another process.

Routes (JSON; errors are ``{"error": {"code", "message"}}``)::

    GET    /services                   names, URLs and request totals of the services
    GET    /{service}/counters         {"operations": {...}, "labels": {...}}
    POST   /{service}/counters/reset   204
    GET    /{service}/faults           {"faults": [...]}
    POST   /{service}/faults           body: Fault fields (kind, operation, times, seconds, status,
                                       retry_after); on "openai" also slow_stream / drop_stream (after_chunks)
    DELETE /{service}/faults           204
    GET    /gateway/recent             recent gateway key uses: time, sid, slot, fingerprint (never a key)
    GET    /gateway/propagation        per gateway unit: {"min", "max", "pending"} (seconds, queued changes)
    PUT    /gateway/propagation        body: {"delay": seconds | [low, high], "unit": name (optional: all)}
    GET|PUT|DELETE /gateway/policies   the /openai API's policies (apimvault.local.policies)
    GET    /gateway/api                {"suffix", "path", "operations", "routing", "balance", "units", "urls"}
    PUT    /gateway/api                body: {"suffix": "openai" | "" | ..., "operations": [[METHOD, tmpl]]}
    GET    /rbac/roles                 role definitions: built-in and infra's (infra/roles/rotator.json)
    GET    /rbac/identities            [{"name", "client_id", "object_id"}] the identity endpoint knows
    POST   /rbac/identities            body: {"name"} -> a new (or the existing) identity, no roles
    GET    /rbac/assignments           [{"principalId", "principalName", "roleName", "scope"}]
    POST   /rbac/assignments           body: {"principal": client id | object id | name, "role",
                                       and "scope" (ARM id) or "secret" or "apim_subscription"}
    DELETE /rbac/assignments           body: {"principal", "role"?, "scope"? | "secret"? | ...}
    POST   /rbac/rotator-roles         body: {"principal", "secret"?, "apim_subscription"?}: infra's
                                       rotator roles on that secret and APIM subscription

Every route needs ``Authorization: Bearer <token>``: the stack's owner gets the token from
``LocalAzure.admin_token`` (and ``APIMVAULT_ADMIN_TOKEN`` in its env file, mode 0600), so other local users
cannot inject faults or read counters. Nothing here returns a key or token value.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import secrets
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx2
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ._faults import Fault, FaultKind
from ._server import Service, json_response
from .apim import ApimGateway
from .openai_backend import STREAM_FAULT_KINDS, BackendFaults, StreamFaultKind
from .policies import admin_route as policies_admin_route
from .rbac import RoleError

if TYPE_CHECKING:
    from ._tokens import Identity
    from .stack import LocalAzure

FAULT_KINDS: tuple[str, ...] = ("latency", "status", "throttle", "reset", "hang")
MAX_BODY_BYTES = 64 * 1024
ENV_ADMIN_TOKEN = "APIMVAULT_ADMIN_TOKEN"  # noqa: S105 - a variable name


def _error(status: int, code: str, message: str) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status)


class _BadRequest(Exception):
    pass


def _number(
    body: dict[str, Any], name: str, default: float, *, integer: bool = False, minimum: float = 0
) -> Any:
    value = body.get(name, default)
    if value is None:
        return None if name == "times" else default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        raise _BadRequest(f"'{name}' must be a {'integer' if integer else 'number'}")
    if value < minimum:
        raise _BadRequest(f"'{name}' must be >= {minimum}")
    return value


class AdminService(Service):
    """Counters, faults and recent key use of the other services, over HTTPS on its own port.

    ``token`` (a new random one by default) must come as ``Authorization: Bearer <token>`` on every call.
    """

    name = "admin"

    def __init__(
        self, services: dict[str, Service], *, token: str | None = None, stack: LocalAzure | None = None
    ) -> None:
        super().__init__()
        self.services = services
        self.stack = stack  # identities and roles (/rbac/...) when it serves a LocalAzure
        self.token = token if token is not None else secrets.token_urlsafe(32)
        self._expected = f"Bearer {self.token}".encode()

    def __repr__(self) -> str:
        return f"AdminService({self.url!r})"

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        return hmac.compare_digest(given, self._expected)

    def classify(self, method: str, path: str) -> str:
        return "Admin"

    def error_response(self, status: int, message: str) -> Response:
        return _error(status, str(status), message)

    def build_app(self) -> ASGIApp:
        return self._app

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        if not self._authorized(request):
            response = json_response(
                {
                    "error": {
                        "code": "Unauthorized",
                        "message": "missing or wrong admin bearer token (the stack's owner has it: "
                        f"LocalAzure.admin_token, {ENV_ADMIN_TOKEN} in its env file)",
                    }
                },
                401,
                {"WWW-Authenticate": 'Bearer realm="apimvault-local-admin"'},
            )
            await response(scope, receive, send)
            return
        try:
            response = await self._handle(request)
        except _BadRequest as exc:
            response = _error(400, "BadRequest", str(exc))
        await response(scope, receive, send)

    async def _json(self, request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise _BadRequest("Content-Type must be application/json")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise _BadRequest(f"body larger than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _BadRequest("body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest("body must be a JSON object")
        return body

    async def _handle(self, request: Request) -> Response:
        parts = [p for p in request.url.path.split("/") if p]
        method = request.method
        if parts == ["services"]:
            if method != "GET":
                return _error(405, "MethodNotAllowed", f"{method} is not allowed here")
            return json_response(
                {
                    "services": [
                        {"name": name, "url": svc.url, "requests": svc.counters.total()}
                        for name, svc in self.services.items()
                    ]
                }
            )
        if not parts or len(parts) > 3:
            return _error(404, "NotFound", f"no admin route {request.url.path}")
        if parts[0] == "rbac" and self.stack is not None:
            return await self._rbac(self.stack, parts[1:], method, request)
        service = self.services.get(parts[0])
        if service is None:
            return _error(
                404, "ServiceNotFound", f"no service {parts[0]!r}; known: {', '.join(sorted(self.services))}"
            )
        route = parts[1:]
        if route == ["counters"] and method == "GET":
            return json_response(
                {"operations": service.counters.snapshot(), "labels": service.counters.labels()}
            )
        if route == ["counters", "reset"] and method == "POST":
            service.counters.reset()
            return Response(status_code=204)
        if route == ["faults"]:
            if method == "GET":
                return json_response({"faults": _faults_of(service)})
            if method == "DELETE":
                service.faults.clear()
                return Response(status_code=204)
            if method == "POST":
                return json_response(self._add_fault(service, await self._json(request)), 201)
            return _error(405, "MethodNotAllowed", f"{method} is not allowed here")
        if route == ["policies"] and isinstance(service, ApimGateway):
            return await policies_admin_route(service.policies, service.api_id, method, request)
        if route == ["api"] and isinstance(service, ApimGateway):
            if method == "GET":
                return json_response(service.api_config())
            if method == "PUT":
                body = await self._json(request)
                unknown = sorted(set(body) - {"suffix", "operations"})
                if unknown:
                    raise _BadRequest(f"unknown API fields: {', '.join(unknown)}")
                try:
                    service.configure_api(suffix=body.get("suffix"), operations=body.get("operations"))
                except (ValueError, TypeError) as exc:
                    raise _BadRequest(str(exc)) from None
                return json_response(service.api_config())
            return _error(405, "MethodNotAllowed", f"{method} is not allowed here")
        if route == ["recent"] and method == "GET" and isinstance(service, ApimGateway):
            return json_response({"recent": [u._asdict() for u in service.recent()]})
        if route == ["propagation"] and isinstance(service, ApimGateway):
            if method == "GET":
                return json_response({"units": service.state.propagation()})
            if method == "PUT":
                self._set_propagation(service, await self._json(request))
                return json_response({"units": service.state.propagation()})
            return _error(405, "MethodNotAllowed", f"{method} is not allowed here")
        return _error(404, "NotFound", f"no admin route {method} {request.url.path}")

    async def _rbac(self, stack: LocalAzure, route: list[str], method: str, request: Request) -> Response:
        identities = stack.identity.identities
        names = {i.object_id: i.name for i in identities}
        if route == ["roles"] and method == "GET":
            return json_response({"roles": [r.as_dict() for r in stack.rbac.roles]})
        if route == ["identities"]:
            if method == "GET":
                return json_response({"identities": [_identity_json(i) for i in identities]})
            if method == "POST":
                name = (await self._json(request)).get("name")
                if not isinstance(name, str) or not name.strip() or len(name) > 128:
                    raise _BadRequest("'name' must be a non-empty string (at most 128 characters)")
                return json_response(_identity_json(stack.add_identity(name.strip())), 201)
            return _error(405, "MethodNotAllowed", f"{method} is not allowed here")
        if route == ["assignments"] and method == "GET":
            rows = [
                {**a.as_dict(), "principalName": names.get(a.principal)} for a in stack.rbac.assignments()
            ]
            return json_response({"assignments": rows})
        if route in (["assignments"], ["rotator-roles"]) and method in ("POST", "DELETE"):
            body = await self._json(request)
            known = {"principal", "role", "scope", "secret", "apim_subscription"}
            unknown = sorted(set(body) - known)
            if unknown:
                raise _BadRequest(f"unknown fields: {', '.join(unknown)}")
            who = _principal(identities, body.get("principal"))
            try:
                if route == ["rotator-roles"]:
                    if method != "POST":
                        return _error(405, "MethodNotAllowed", f"{method} is not allowed here")
                    made = stack.grant_rotator_roles(
                        who,
                        secret=_text(body, "secret", default="apim-subscription-key"),
                        apim_subscription=_text(body, "apim_subscription", default="apimvault-app"),
                    )
                    return json_response({"assignments": [a.as_dict() for a in made]}, 201)
                scope = _scope(stack, body)
                role = body.get("role")
                if method == "DELETE":
                    if role is not None and not isinstance(role, str):
                        raise _BadRequest("'role' must be a string")
                    return json_response({"removed": stack.revoke_role(who, role, scope)})
                if not isinstance(role, str) or scope is None:
                    raise _BadRequest(
                        "'role' and a scope ('scope', 'secret' or 'apim_subscription') are required"
                    )
                return json_response(stack.assign_role(who, role, scope).as_dict(), 201)
            except RoleError as exc:
                raise _BadRequest(str(exc)) from None
        return _error(404, "NotFound", f"no admin route {method} {request.url.path}")

    @staticmethod
    def _set_propagation(service: ApimGateway, body: dict[str, Any]) -> None:
        unknown = sorted(set(body) - {"delay", "unit"})
        if unknown:
            raise _BadRequest(f"unknown propagation fields: {', '.join(unknown)}")
        if "delay" not in body:
            raise _BadRequest("'delay' is required: seconds or [low, high]")
        unit = body.get("unit")
        if unit is not None and not isinstance(unit, str):
            raise _BadRequest("'unit' must be a string or null")
        delay = body["delay"]
        if isinstance(delay, list):
            delay = tuple(delay)
        try:
            service.state.set_propagation(delay, unit)
        except ValueError as exc:
            raise _BadRequest(str(exc)) from None

    @staticmethod
    def _add_fault(service: Service, body: dict[str, Any]) -> dict[str, Any]:
        known = {"kind", "operation", "times", "seconds", "status", "retry_after", "after_chunks"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise _BadRequest(f"unknown fault fields: {', '.join(unknown)}")
        kind = body.get("kind")
        operation = body.get("operation")
        if operation is not None and not isinstance(operation, str):
            raise _BadRequest("'operation' must be a string or null")
        times = _number(body, "times", 0, integer=True, minimum=1) if body.get("times") is not None else None
        seconds = float(_number(body, "seconds", 0.0))
        if kind in STREAM_FAULT_KINDS:
            if not isinstance(service.faults, BackendFaults):
                raise _BadRequest(f"fault kind {kind!r} applies to the openai service only")
            stream = service.faults.inject_stream(
                cast(StreamFaultKind, kind),
                operation=operation,
                times=times,
                seconds=seconds if "seconds" in body else 0.1,
                after_chunks=int(_number(body, "after_chunks", 2, integer=True)),
            )
            return dataclasses.asdict(stream)
        if kind not in FAULT_KINDS:
            raise _BadRequest(f"'kind' must be one of {', '.join(FAULT_KINDS + STREAM_FAULT_KINDS)}")
        status = int(_number(body, "status", 503, integer=True, minimum=100))
        if status > 599:
            raise _BadRequest("'status' must be an HTTP status code")
        fault = service.faults.add(
            Fault(
                cast(FaultKind, kind),
                operation,
                times,
                seconds,
                status,
                int(_number(body, "retry_after", 1, integer=True)),
            )
        )
        return dataclasses.asdict(fault)


def _identity_json(identity: Identity) -> dict[str, str]:
    return {"name": identity.name, "client_id": identity.client_id, "object_id": identity.object_id}


def _principal(identities: list[Identity], given: Any) -> Identity:
    if not isinstance(given, str) or not given:
        raise _BadRequest("'principal' (a client id, object id or identity name) is required")
    for identity in identities:
        if given.lower() in (identity.client_id.lower(), identity.object_id.lower(), identity.name.lower()):
            return identity
    raise _BadRequest(f"no identity {given!r}; create it with POST /rbac/identities")


def _text(body: dict[str, Any], name: str, *, default: str) -> str:
    value = body.get(name, default)
    if not isinstance(value, str) or not value:
        raise _BadRequest(f"'{name}' must be a non-empty string")
    return value


def _scope(stack: LocalAzure, body: dict[str, Any]) -> str | None:
    given = [k for k in ("scope", "secret", "apim_subscription") if body.get(k) is not None]
    if len(given) > 1:
        raise _BadRequest("give one of 'scope', 'secret' and 'apim_subscription'")
    if not given:
        return None
    value = _text(body, given[0], default="")
    if given[0] == "secret":
        return stack.secret_scope(value)
    if given[0] == "apim_subscription":
        return stack.apim_subscription_scope(value)
    return value


def _faults_of(service: Service) -> list[dict[str, Any]]:
    faults = [dataclasses.asdict(f) for f in service.faults.active]
    if isinstance(service.faults, BackendFaults):
        faults += [dataclasses.asdict(f) for f in service.faults.stream_active]
    return faults


# ---------------------------------------------------------------------------------------------- client


class AdminError(Exception):
    """The admin API answered with an error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class AdminClient:
    """Sync client of :class:`AdminService`, for driving a stack that runs in another process.

    ``token`` defaults to ``APIMVAULT_ADMIN_TOKEN`` (set by the stack's env file).
    """

    def __init__(
        self, url: str, ca_path: str | Path, *, token: str | None = None, timeout: float = 10.0
    ) -> None:
        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get(ENV_ADMIN_TOKEN, "").strip()
        self._client = httpx2.Client(
            base_url=self.url,
            timeout=timeout,
            verify=ssl.create_default_context(cafile=str(ca_path)),
            headers={"Authorization": f"Bearer {token}"} if token else None,
        )

    def __repr__(self) -> str:
        return f"AdminClient({self.url!r})"

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._client.request(method, path, json=body)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise AdminError(response.status_code, str(message))
        return response.json() if response.content else None

    def services(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._call("GET", "/services")["services"])

    def counters(self, service: str) -> dict[str, dict[str, int]]:
        return cast(dict[str, dict[str, int]], self._call("GET", f"/{service}/counters"))

    def reset_counters(self, service: str) -> None:
        self._call("POST", f"/{service}/counters/reset")

    def faults(self, service: str) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._call("GET", f"/{service}/faults")["faults"])

    def add_fault(
        self,
        service: str,
        kind: str,
        *,
        operation: str | None = None,
        times: int | None = None,
        **fields: float | int,
    ) -> dict[str, Any]:
        """Inject a fault (``seconds``, ``status``, ``retry_after``, ``after_chunks`` as keyword fields)."""
        body: dict[str, Any] = {"kind": kind, "operation": operation, "times": times, **fields}
        return cast(dict[str, Any], self._call("POST", f"/{service}/faults", body))

    def clear_faults(self, service: str) -> None:
        self._call("DELETE", f"/{service}/faults")

    def recent(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._call("GET", "/gateway/recent")["recent"])

    def propagation(self) -> dict[str, dict[str, float]]:
        """Per gateway unit: the propagation delay range (``min``, ``max``) and queued key changes."""
        return cast(dict[str, dict[str, float]], self._call("GET", "/gateway/propagation")["units"])

    def set_propagation(
        self, delay: float | tuple[float, float], *, unit: str | None = None
    ) -> dict[str, dict[str, float]]:
        """Set the propagation delay (seconds, or a ``(low, high)`` range) of one unit or of all."""
        body: dict[str, Any] = {"delay": list(delay) if isinstance(delay, tuple) else delay, "unit": unit}
        return cast(dict[str, dict[str, float]], self._call("PUT", "/gateway/propagation", body)["units"])

    # the gateway's API: URL suffix and operations
    def api(self) -> dict[str, Any]:
        return cast(dict[str, Any], self._call("GET", "/gateway/api"))

    def set_api(
        self, *, suffix: str | None = None, operations: list[tuple[str, str]] | None = None
    ) -> dict[str, Any]:
        """Change the API URL suffix (``""``: the API at the root) and/or its operations."""
        body: dict[str, Any] = {}
        if suffix is not None:
            body["suffix"] = suffix
        if operations is not None:
            body["operations"] = [list(op) for op in operations]
        return cast(dict[str, Any], self._call("PUT", "/gateway/api", body))

    # identities and roles
    def roles(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._call("GET", "/rbac/roles")["roles"])

    def identities(self) -> list[dict[str, str]]:
        return cast(list[dict[str, str]], self._call("GET", "/rbac/identities")["identities"])

    def add_identity(self, name: str) -> dict[str, str]:
        """A managed identity the stack mints tokens for, with no role: ``{name, client_id, object_id}``."""
        return cast(dict[str, str], self._call("POST", "/rbac/identities", {"name": name}))

    def assignments(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._call("GET", "/rbac/assignments")["assignments"])

    def assign_role(self, principal: str, role: str, **scope: str) -> dict[str, str]:
        """Assign ``role`` to ``principal`` (client id, object id or name) at ``scope=`` (an ARM id),
        ``secret=`` or ``apim_subscription=``."""
        return cast(
            dict[str, str],
            self._call("POST", "/rbac/assignments", {"principal": principal, "role": role, **scope}),
        )

    def revoke_role(self, principal: str, role: str | None = None, **scope: str) -> int:
        body: dict[str, Any] = {"principal": principal, "role": role, **scope}
        return int(self._call("DELETE", "/rbac/assignments", body)["removed"])

    def grant_rotator_roles(self, principal: str, **where: str) -> list[dict[str, str]]:
        """infra's rotator roles for ``principal`` on ``secret=`` and ``apim_subscription=`` (default: the
        seeded ones)."""
        body: dict[str, Any] = {"principal": principal, **where}
        return cast(list[dict[str, str]], self._call("POST", "/rbac/rotator-roles", body)["assignments"])

    # the gateway's per-API policies
    def policies(self) -> dict[str, Any]:
        return cast(dict[str, Any], self._call("GET", "/gateway/policies")["policies"])

    def set_policies(self, policies: dict[str, Any]) -> dict[str, Any]:
        return cast(dict[str, Any], self._call("PUT", "/gateway/policies", policies)["policies"])

    def clear_policies(self) -> None:
        self._call("DELETE", "/gateway/policies")
