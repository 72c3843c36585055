"""Key Vault secrets data plane on loopback TLS: the twelve operations of the spec, RBAC and challenges.

The wire format follows ``shared/specs/keyvault-secrets-2026-04-01.json`` (a byte-for-byte copy of
``Azure/azure-rest-api-specs`` ``specification/keyvault/data-plane/Secrets/stable/2026-04-01/secrets.json``)
and the observed-service facts collected in ``shared/reference/protocols.md`` sections A and B. Error strings
quote the real service where a public source shows them (each is cited next to its constant); the rest are
marked **(inference)**.

Behaviour worth knowing:

* **Authentication before everything.** Any request without ``Authorization: Bearer`` gets 401 with a
  ``WWW-Authenticate`` challenge before routing or body validation (protocols.md B.2), so the SDK's bodiless
  first request and unknown routes are challenged alike. The challenge names ``resource="https://0.0.1:PORT"``,
  which makes ``https://127.0.0.1:PORT`` pass the SDK's challenge-resource verification with it left ON.
* **Tokens** must come from the stack's :class:`~apimvault.local._common.TokenIssuer`, be unexpired and carry
  a Key Vault audience (``https://vault.azure.net`` or the challenge resource); anything else is 401.
* **RBAC** is keyed by the token's ``oid``. ``Key Vault Secrets User`` may read values and metadata;
  ``Key Vault Secrets Officer`` (and ``Key Vault Administrator``) may do everything. Assignments are at vault
  scope or on one secret; vault-wide operations (list secrets, list deleted secrets, restore) need vault
  scope.
* **exp / nbf are advisory for secrets.** Real Key Vault refuses *key* operations outside a key's validity
  window, but a secret GET returns the value whatever ``exp``/``nbf`` say; the attributes carry the dates and
  the application must honour them (observed: Altinn/altinn-studio#5029, "App has access to expired secrets
  from keyvault", closed as expected behaviour). This emulator does the same. Only ``enabled=false`` blocks a
  GET (403 ``SecretDisabled``).
* **Soft delete** is always on: ``recoveryLevel`` ``Recoverable+Purgeable``, ``recoverableDays`` 90; deleted
  and recovered secrets are visible immediately, so the SDK's delete/recover pollers finish on their first
  poll.
* **Backups** are AES-GCM sealed with a per-service key: opaque, tamper-evident, and only restorable into the
  vault that made them (real Key Vault similarly confines backups to a subscription/geography).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import json
import re
import secrets
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ._server import Service, json_response
from ._tokens import TENANT_ID, Clock, Identity, TokenError, TokenIssuer

__all__ = [
    "ROLE_ADMINISTRATOR",
    "ROLE_OFFICER",
    "ROLE_USER",
    "KeyVaultService",
    "SecretVersion",
]

ROLE_USER = "Key Vault Secrets User"
"""Read secret values and metadata (``getSecret/action``, ``readMetadata/action``)."""
ROLE_OFFICER = "Key Vault Secrets Officer"
"""Every secrets data action (``Microsoft.KeyVault/vaults/secrets/*``)."""
ROLE_ADMINISTRATOR = "Key Vault Administrator"
"""All data actions; for secrets the same as :data:`ROLE_OFFICER`."""

# -------------------------------------------------------------------------------------------- constants

RECOVERY_LEVEL = "Recoverable+Purgeable"
RECOVERABLE_DAYS = 90
MAX_VALUE_BYTES = 25_600
"""Largest secret value accepted (Key Vault's documented 25k-byte limit)."""
MAX_BODY_BYTES = 256 * 1024
"""Request bodies above this are refused with 413 without being read in full."""
MAX_TAGS = 15  # Key Vault's per-object tag limit (inference from the service docs; not verified on the wire)
DEFAULT_PAGE = 25  # spec: "If not specified the service will return up to 25 results."
SERVICE_VERSION = "1.9.2658.1"  # any value of the recorded shape (recordings show e.g. "1.1.6.0")

# The ARM resource the 403 messages name. The values are fictitious but shaped like the real ones.
VAULT_NAME = "kv-apimvault-local"
VAULT_LOCATION = "local"
VAULT_RESOURCE = (
    "/subscriptions/00000000-0000-4000-8000-00000000a11e/resourcegroups/rg-apimvault-local"
    f"/providers/microsoft.keyvault/vaults/{VAULT_NAME}"
)

# Key Vault's first-party application id, which is also an accepted token audience.
_KEYVAULT_APP_ID = "cfa8b339-82a2-471a-a3c9-0fc0be7a4093"

_NAME_RE = re.compile(r"^[0-9a-zA-Z-]{1,127}$")  # spec pattern ^[0-9a-zA-Z-]+$ plus the documented 1..127
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
_CLIENT_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,256}$")

_ACTION_PREFIX = "Microsoft.KeyVault/vaults/secrets/"
# operationId -> the RBAC data action it needs. Source: the Key Vault access-policy-to-RBAC mapping
# ("Secret Get,Microsoft.KeyVault/vaults/secrets/getSecret/action", "Secret List,.../readMetadata/action",
# "Secret Set,.../setSecret/action;.../update/action", "Secret Delete,.../delete", ...). Reading deleted
# secrets as readMetadata is an inference.
ACTIONS: dict[str, str] = {
    "GetSecret": _ACTION_PREFIX + "getSecret/action",
    "GetSecrets": _ACTION_PREFIX + "readMetadata/action",
    "GetSecretVersions": _ACTION_PREFIX + "readMetadata/action",
    "GetDeletedSecrets": _ACTION_PREFIX + "readMetadata/action",
    "GetDeletedSecret": _ACTION_PREFIX + "readMetadata/action",
    "SetSecret": _ACTION_PREFIX + "setSecret/action",
    "UpdateSecret": _ACTION_PREFIX + "update/action",
    "DeleteSecret": _ACTION_PREFIX + "delete",
    "PurgeDeletedSecret": _ACTION_PREFIX + "purge/action",
    "RecoverDeletedSecret": _ACTION_PREFIX + "recover/action",
    "BackupSecret": _ACTION_PREFIX + "backup/action",
    "RestoreSecret": _ACTION_PREFIX + "restore/action",
}
_ROLE_ACTIONS: dict[str, frozenset[str]] = {
    ROLE_USER: frozenset({ACTIONS["GetSecret"], ACTIONS["GetSecrets"]}),
    ROLE_OFFICER: frozenset(ACTIONS.values()),
    ROLE_ADMINISTRATOR: frozenset(ACTIONS.values()),
}
_VAULT_WIDE = frozenset({"GetSecrets", "GetDeletedSecrets", "RestoreSecret"})
_WITH_BODY = frozenset({"SetSecret", "UpdateSecret", "RestoreSecret"})

# ---- error strings (real ones are cited; the rest are inference) -------------------------------------------

# protocols.md A.4 / B.2 (azure-sdk-for-js Key Vault recordings).
MSG_MISSING_TOKEN = "Request is missing a Bearer or PoP token."  # noqa: S105
# Real strings: AKV10032 in MicrosoftDocs/azure-docs#75410; AKV10022 in MicrosoftDocs/azure-docs#109562 and
# public write-ups ("AKV10022: Invalid audience. Expected https://vault.azure.net, found: https://management...");
# AKV10046 in Azure-Samples/azuresandbox#362. The expired-token text is an inference.
MSG_INVALID_ISSUER = (
    "AKV10032: Invalid issuer. Expected one of https://sts.windows.net/{tenant}/, found {found}."
)
MSG_INVALID_AUDIENCE = "AKV10022: Invalid audience. Expected https://vault.azure.net, found: {found}."
MSG_BAD_SIGNATURE = "AKV10046: Unable to resolve the key used for signature validation."
MSG_EXPIRED = "Token validation failed: the token is expired."  # (inference)
# protocols.md A.4.
MSG_NOT_FOUND = (
    "A secret with (name/id) {name} was not found in this key vault. If you recently deleted this secret "
    "you may be able to recover it using the correct recovery command. For help resolving this issue, "
    "please see https://go.microsoft.com/fwlink/?linkid=2125182"
)
MSG_DELETED_NOT_FOUND = "Deleted Secret not found: {name}"
MSG_DELETED_BUT_RECOVERABLE = (
    "Secret {name} is currently in a deleted but recoverable state, and its name cannot be reused; "
    "in this state, the secret can only be recovered or purged."
)
# Azure/azure-sdk-for-js#24756 and ansible-collections/azure#1989 (code Forbidden, innererror SecretDisabled).
MSG_DISABLED = "Operation get is not allowed on a disabled secret."
# Observed: "(BadParameter) Secret is beyond the maximum permitted length of 25600 characters. Inner error:
# { "code": "SecretTooLarge" }" (quoted in a public PQC-on-Key-Vault write-up; also Azure/azure-cli#5639).
MSG_TOO_LARGE = "Secret is beyond the maximum permitted length of 25600 characters."
# The ForbiddenByRbac message as the real service formats it (hashicorp/terraform-provider-azurerm#27817,
# piyushsachdeva/Terraform_AKS#2): CRLF-separated lines, a space before the last CRLF of DecisionReason.
MSG_FORBIDDEN_RBAC = (
    "Caller is not authorized to perform action on resource.\r\n"
    "If role assignments, deny assignments or role definitions were changed recently, please observe "
    "propagation time.\r\n"
    "Caller: appid={appid};oid={oid};iss={iss}\r\n"
    "Action: '{action}'\r\n"
    "Resource: '{resource}'\r\n"
    "Assignment: (not found)\r\n"
    "DenyAssignmentId: null\r\n"
    "DecisionReason: 'DeniedWithNoValidRBAC' \r\n"
    "Vault: {vault};location={location}\r\n"
)
# Real text seen for an invalid request body: "Property  has invalid value" (Azure/azure-sdk-for-node#2198).
MSG_PROPERTY_INVALID = "Property {name} has invalid value"
# The following are inference (shapes follow the real BadParameter errors above).
MSG_API_VERSION = "The api-version query parameter (?api-version=) is required for all requests."
MSG_BAD_NAME = "The request URI contains an invalid name: {name}"
MSG_MAXRESULTS = "The value of maxresults is invalid: it must be an integer between 1 and 25."
MSG_SKIPTOKEN = "The $skiptoken value is invalid."
MSG_NOT_JSON = "The request body is not valid JSON."
MSG_NOT_OBJECT = "The request body must be a JSON object."
MSG_CONTENT_TYPE = "The request content type must be application/json."
MSG_VALUE_REQUIRED = "Property value is required."
MSG_TOO_MANY_TAGS = "The number of tags exceeds the maximum of 15."
MSG_BAD_BACKUP = "Backup blob contains invalid or corrupt version."
MSG_EXISTS = "Secret {name} already exists."
MSG_BODY_TOO_LARGE = "The request body is too large."
MSG_NO_ROUTE = "The requested resource does not exist: {method} {path}"

_STATUS_CODES = {
    400: "BadParameter",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "RequestEntityTooLarge",
    429: "Throttled",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


class KeyVaultError(Exception):
    """An error answer: HTTP status, Key Vault error code, message and optional inner error code."""

    def __init__(self, status: int, code: str, message: str, inner: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.inner = inner

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner is not None:
            error["innererror"] = {"code": self.inner}
        return {"error": error}


def _bad(message: str, inner: str | None = None) -> KeyVaultError:
    return KeyVaultError(400, "BadParameter", message, inner)


# ------------------------------------------------------------------------------------------------ state


@dataclasses.dataclass(frozen=True)
class SecretVersion:
    """One version of a secret. Immutable: updates replace the record."""

    name: str
    version: str
    value: str
    content_type: str | None
    tags: dict[str, str] | None
    enabled: bool
    not_before: int | None
    expires: int | None
    created: int
    updated: int
    previous_version: str | None = None

    def __repr__(self) -> str:  # never show the value
        return f"SecretVersion(name={self.name!r}, version={self.version!r}, enabled={self.enabled})"

    def attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {"enabled": self.enabled}
        if self.not_before is not None:
            attrs["nbf"] = self.not_before
        if self.expires is not None:
            attrs["exp"] = self.expires
        attrs["created"] = self.created
        attrs["updated"] = self.updated
        attrs["recoveryLevel"] = RECOVERY_LEVEL
        attrs["recoverableDays"] = RECOVERABLE_DAYS
        return attrs

    def item(self, base: str, *, with_version: bool) -> dict[str, Any]:
        """The metadata fields shared by every shape (no value)."""
        ident = (
            f"{base}/secrets/{self.name}/{self.version}" if with_version else f"{base}/secrets/{self.name}"
        )
        body: dict[str, Any] = {"id": ident, "attributes": self.attributes()}
        if self.tags is not None:
            body["tags"] = dict(self.tags)
        if self.content_type is not None:
            body["contentType"] = self.content_type
        return body

    def bundle(self, base: str, *, with_value: bool) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if with_value:
            body["value"] = self.value
        body.update(self.item(base, with_version=True))
        if self.previous_version is not None:
            body["previousVersion"] = self.previous_version
        return body


@dataclasses.dataclass
class _Secret:
    name: str  # the casing it was created with
    versions: list[SecretVersion] = dataclasses.field(default_factory=list)
    by_version: dict[str, int] = dataclasses.field(default_factory=dict)
    deleted_date: int | None = None
    scheduled_purge_date: int | None = None

    @property
    def latest(self) -> SecretVersion:
        return self.versions[-1]

    def add(self, version: SecretVersion) -> None:
        self.by_version[version.version] = len(self.versions)
        self.versions.append(version)

    def find(self, version: str) -> SecretVersion | None:
        if not version:
            return self.latest
        index = self.by_version.get(version)
        return None if index is None else self.versions[index]

    def replace(self, version: SecretVersion) -> None:
        self.versions[self.by_version[version.version]] = version

    def deleted_fields(self, base: str) -> dict[str, Any]:
        return {
            "recoveryId": f"{base}/deletedsecrets/{self.name}",
            "deletedDate": self.deleted_date,
            "scheduledPurgeDate": self.scheduled_purge_date,
        }


@dataclasses.dataclass(frozen=True)
class _Route:
    operation: str
    name: str | None = None
    version: str = ""


_UNKNOWN = _Route("unknown")


def _route(method: str, path: str) -> _Route:
    """Map ``method path`` to an operation of the spec (``unknown`` when it is none of them)."""
    segs = path.lstrip("/").split("/")
    if len(segs) > 1 and segs[-1] == "":
        segs.pop()
    n = len(segs)
    head = segs[0].lower()
    if head == "secrets":
        if n == 1:
            return _Route("GetSecrets") if method == "GET" else _UNKNOWN
        name = segs[1]
        if n == 2:
            if name.lower() == "restore" and method == "POST":
                return _Route("RestoreSecret")
            op = {"PUT": "SetSecret", "GET": "GetSecret", "PATCH": "UpdateSecret", "DELETE": "DeleteSecret"}
            return _Route(op[method], name) if method in op else _UNKNOWN
        if n == 3:
            tail = segs[2]
            if tail == "versions" and method == "GET":
                return _Route("GetSecretVersions", name)
            if tail == "backup" and method == "POST":
                return _Route("BackupSecret", name)
            if method == "GET":
                return _Route("GetSecret", name, tail)
            if method == "PATCH":
                return _Route("UpdateSecret", name, tail)
        return _UNKNOWN
    if head == "deletedsecrets":  # both /deletedsecrets and /deletedSecrets (lowkey-vault accepts both)
        if n == 1:
            return _Route("GetDeletedSecrets") if method == "GET" else _UNKNOWN
        if n == 2:
            if method == "GET":
                return _Route("GetDeletedSecret", segs[1])
            if method == "DELETE":
                return _Route("PurgeDeletedSecret", segs[1])
        if n == 3 and segs[2] == "recover" and method == "POST":
            return _Route("RecoverDeletedSecret", segs[1])
    return _UNKNOWN


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    text = text.strip().replace("+", "-").replace("/", "_")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -------------------------------------------------------------------------------------------- the service


class KeyVaultService(Service):
    """An in-memory Key Vault (secrets only) speaking the real wire protocol; see the module docstring."""

    name = "keyvault"

    def __init__(self, tokens: TokenIssuer, *, clock: Clock = time.time) -> None:
        super().__init__()
        self.tokens = tokens
        self.clock = clock
        self._lock = threading.Lock()
        self._secrets: dict[str, _Secret] = {}  # lower-cased name -> live secret
        self._deleted: dict[str, _Secret] = {}  # lower-cased name -> soft-deleted secret
        self._assignments: dict[str, set[tuple[str, str | None]]] = {}  # oid -> {(role, secret-or-None)}
        self._token_cache: dict[str, dict[str, Any]] = {}
        self._backup_key = AESGCM(AESGCM.generate_key(bit_length=256))
        challenge_resource = f"https://0.0.1:{self.port}"
        self._audiences = frozenset(
            {
                "https://vault.azure.net",
                "https://vault.azure.net/",
                _KEYVAULT_APP_ID,
                challenge_resource,
                challenge_resource + "/",
            }
        )
        authority = f"https://login.microsoftonline.com/{TENANT_ID}"
        self.challenge = f'Bearer authorization="{authority}", resource="{challenge_resource}"'
        """The ``WWW-Authenticate`` value of every 401 (protocols.md B.2)."""

    # ------------------------------------------------------------------------------ in-process API

    def put_secret(
        self,
        name: str,
        value: str,
        *,
        content_type: str | None = None,
        tags: dict[str, str] | None = None,
        expires: int | None = None,
        not_before: int | None = None,
        enabled: bool = True,
    ) -> SecretVersion:
        """Add a new version of ``name`` without HTTP (seeding, drills). Raises ``ValueError`` where the
        service would answer 400 or 409."""
        try:
            with self._lock:
                return self._set(name, value, content_type, tags, enabled, not_before, expires)
        except KeyVaultError as exc:
            raise ValueError(exc.message) from None

    def latest(self, name: str) -> SecretVersion:
        """The current version of a live secret; ``KeyError`` if there is none (absent or soft-deleted)."""
        with self._lock:
            secret = self._secrets.get(name.lower())
            if secret is None:
                raise KeyError(name)
            return secret.latest

    def versions(self, name: str) -> list[SecretVersion]:
        """Every version of a live secret, oldest first; ``KeyError`` if there is none."""
        with self._lock:
            secret = self._secrets.get(name.lower())
            if secret is None:
                raise KeyError(name)
            return list(secret.versions)

    def grant(self, identity: Identity, role: str, *, secret: str | None = None) -> None:
        """Assign ``role`` to ``identity`` on the whole vault (``secret=None``) or on one secret."""
        if role not in _ROLE_ACTIONS:
            raise ValueError(f"unknown role {role!r}; expected one of {sorted(_ROLE_ACTIONS)}")
        scope = None if secret is None else secret.lower()
        with self._lock:
            self._assignments.setdefault(identity.object_id, set()).add((role, scope))

    def revoke(self, identity: Identity, role: str | None = None, *, secret: str | None = None) -> None:
        """Remove assignments of ``identity``: of ``role`` (any role if ``None``) on ``secret`` (every scope,
        vault and per-secret, if ``None``). ``revoke(identity)`` removes all of its access."""
        with self._lock:
            held = self._assignments.get(identity.object_id)
            if not held:
                return
            scope = None if secret is None else secret.lower()
            for assignment in list(held):
                if (role is None or assignment[0] == role) and (secret is None or assignment[1] == scope):
                    held.discard(assignment)

    # ------------------------------------------------------------------------------ service hooks

    def classify(self, method: str, path: str) -> str:
        return _route(method, path).operation

    def error_response(self, status: int, message: str) -> Response:
        code = _STATUS_CODES.get(status, "InternalServerError" if status >= 500 else "BadParameter")
        return json_response({"error": {"code": code, "message": message}}, status, self._headers(None))

    def build_app(self) -> ASGIApp:
        return self._asgi

    # ------------------------------------------------------------------------------ HTTP plumbing

    @staticmethod
    def _headers(client_request_id: str | None) -> dict[str, str]:
        headers = {
            "Cache-Control": "no-cache",
            "Pragma": "no-cache",
            "Expires": "-1",
            "x-ms-request-id": str(uuid.uuid4()),
            "x-ms-keyvault-service-version": SERVICE_VERSION,
            "x-ms-keyvault-region": VAULT_LOCATION,
            "X-Content-Type-Options": "nosniff",
        }
        if client_request_id is not None:
            headers["x-ms-client-request-id"] = client_request_id
        return headers

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers: dict[str, str] = {}
        for key, value in scope.get("headers", ()):
            headers[key.decode("latin-1").lower()] = value.decode("latin-1")
        crid = headers.get("x-ms-client-request-id")
        if crid is not None and not _CLIENT_REQUEST_ID_RE.match(crid):
            crid = None
        out = self._headers(crid)
        try:
            status, body = await self._handle(scope, receive, headers)
        except KeyVaultError as exc:
            status, body = exc.status, exc.body()
            if status == 401:
                out["WWW-Authenticate"] = self.challenge
        except Exception:  # a bug must still answer in Key Vault's shape, never hang the client
            status, body = (
                500,
                {"error": {"code": "InternalServerError", "message": "Internal server error."}},
            )
        if body is None:
            response: Response = Response(status_code=status, headers=out)
        else:
            response = json_response(body, status, out)
        await response(scope, receive, send)

    async def _handle(
        self, scope: Scope, receive: Receive, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any] | None]:
        # 1. Authentication comes first, before routing or reading the body (protocols.md B.2).
        claims = self._authenticate(headers.get("authorization", ""))
        method: str = scope["method"]
        path: str = scope["path"]
        route = _route(method, path)
        if route.operation == "unknown":
            raise KeyVaultError(404, "NotFound", MSG_NO_ROUTE.format(method=method, path=path))
        query = urllib.parse.parse_qs(
            scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
        )
        api_version = (query.get("api-version") or [""])[0]
        if not api_version:
            raise _bad(MSG_API_VERSION)
        # 2. Authorization, then input validation.
        self._authorize(claims, route)
        if route.name is not None and not _NAME_RE.match(route.name):
            raise _bad(MSG_BAD_NAME.format(name=route.name))
        payload: dict[str, Any] = {}
        if route.operation in _WITH_BODY:
            payload = await self._read_json(receive, headers)
        base = self._base_url(scope, headers)
        return self._dispatch(route, payload, query, api_version, base)

    def _authenticate(self, authorization: str) -> dict[str, Any]:
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise KeyVaultError(401, "Unauthorized", MSG_MISSING_TOKEN)
        claims = self._token_cache.get(token)
        if claims is None:
            try:
                claims = self.tokens.verify(token)
            except TokenError as exc:
                raise KeyVaultError(401, "Unauthorized", self._token_problem(token, exc)) from None
            if len(self._token_cache) >= 4096:
                self._token_cache.clear()
            self._token_cache[token] = claims
        elif int(claims.get("exp", 0)) <= int(self.clock()):
            raise KeyVaultError(401, "Unauthorized", MSG_EXPIRED)
        audience = claims.get("aud")
        if not isinstance(audience, str) or audience not in self._audiences:
            raise KeyVaultError(401, "Unauthorized", MSG_INVALID_AUDIENCE.format(found=audience))
        return claims

    def _token_problem(self, token: str, exc: TokenError) -> str:
        if "expired" in str(exc):
            return MSG_EXPIRED
        try:
            unverified = json.loads(_b64url_decode(token.split(".")[1]))
            issuer = unverified.get("iss") if isinstance(unverified, dict) else None
        except (ValueError, IndexError, binascii.Error):
            issuer = None
        if isinstance(issuer, str) and issuer != self.tokens.issuer:
            return MSG_INVALID_ISSUER.format(tenant=TENANT_ID, found=issuer)
        return MSG_BAD_SIGNATURE

    def _authorize(self, claims: dict[str, Any], route: _Route) -> None:
        action = ACTIONS[route.operation]
        oid = str(claims.get("oid", ""))
        secret_scope = None if route.operation in _VAULT_WIDE or route.name is None else route.name.lower()
        with self._lock:
            held = tuple(self._assignments.get(oid, ()))
        for role, scope in held:
            if action in _ROLE_ACTIONS[role] and (scope is None or scope == secret_scope):
                return
        resource = VAULT_RESOURCE if secret_scope is None else f"{VAULT_RESOURCE}/secrets/{secret_scope}"
        message = MSG_FORBIDDEN_RBAC.format(
            appid=claims.get("appid", ""),
            oid=oid,
            iss=claims.get("iss", ""),
            action=action,
            resource=resource,
            vault=VAULT_NAME,
            location=VAULT_LOCATION,
        )
        raise KeyVaultError(403, "Forbidden", message, "ForbiddenByRbac")

    def _base_url(self, scope: Scope, headers: dict[str, str]) -> str:
        """``scheme://host:port`` exactly as the client addressed us, so ids and nextLinks round-trip."""
        host = headers.get("host", "")
        if not _HOST_RE.match(host):
            server = scope.get("server")
            host = f"{server[0]}:{server[1]}" if server else f"127.0.0.1:{self.port}"
        return f"{scope.get('scheme', 'https')}://{host}"

    async def _read_json(self, receive: Receive, headers: dict[str, str]) -> dict[str, Any]:
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            raise KeyVaultError(413, "RequestEntityTooLarge", MSG_BODY_TOO_LARGE)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                raise _bad(MSG_NOT_JSON)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise KeyVaultError(413, "RequestEntityTooLarge", MSG_BODY_TOO_LARGE)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            raise _bad(MSG_CONTENT_TYPE)
        try:
            payload = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise _bad(MSG_NOT_JSON) from None
        if not isinstance(payload, dict):
            raise _bad(MSG_NOT_OBJECT)
        return payload

    # ------------------------------------------------------------------------------ operations

    def _dispatch(
        self, route: _Route, payload: dict[str, Any], query: dict[str, list[str]], api_version: str, base: str
    ) -> tuple[int, dict[str, Any] | None]:
        op = route.operation
        name = route.name or ""
        if op == "GetSecret":
            return 200, self._get(name, route.version).bundle(base, with_value=True)
        if op == "SetSecret":
            fields = _parse_set(payload)
            with self._lock:
                created = self._set(name, **fields)
            return 200, created.bundle(base, with_value=True)
        if op == "UpdateSecret":
            return 200, self._update(name, route.version, _parse_update(payload)).bundle(
                base, with_value=False
            )
        if op in ("GetSecrets", "GetSecretVersions", "GetDeletedSecrets"):
            page_size = _maxresults(query)
            marker = _skiptoken(query)
            path = {"GetSecrets": "/secrets", "GetDeletedSecrets": "/deletedsecrets"}.get(op)
            if path is None:
                path = f"/secrets/{name}/versions"
            keyed = self._listing(op, name, base)
            keys = [key for key, _ in keyed]
            start = bisect.bisect_right(keys, marker) if marker is not None else 0
            page = keyed[start : start + page_size]
            next_link = None
            if start + page_size < len(keyed):
                token = _b64url_encode(json.dumps({"NextMarker": page[-1][0]}).encode())
                params = {"api-version": api_version, "$skiptoken": token}
                if "maxresults" in query:
                    params["maxresults"] = str(page_size)
                next_link = f"{base}{path}?{urllib.parse.urlencode(params, safe='$')}"
            return 200, {"value": [item for _, item in page], "nextLink": next_link}
        if op == "DeleteSecret":
            with self._lock:
                secret = self._secrets.pop(name.lower(), None)
                if secret is None:
                    raise KeyVaultError(404, "SecretNotFound", MSG_NOT_FOUND.format(name=name))
                now = int(self.clock())
                secret.deleted_date = now
                secret.scheduled_purge_date = now + RECOVERABLE_DAYS * 86400
                self._deleted[name.lower()] = secret
            return 200, {**secret.deleted_fields(base), **secret.latest.bundle(base, with_value=False)}
        if op == "GetDeletedSecret":
            secret = self._deleted_or_404(name)
            return 200, {**secret.deleted_fields(base), **secret.latest.bundle(base, with_value=False)}
        if op == "PurgeDeletedSecret":
            with self._lock:
                if self._deleted.pop(name.lower(), None) is None:
                    raise KeyVaultError(404, "SecretNotFound", MSG_DELETED_NOT_FOUND.format(name=name))
            return 204, None
        if op == "RecoverDeletedSecret":
            with self._lock:
                secret = self._deleted.pop(name.lower(), None)
                if secret is None:
                    raise KeyVaultError(404, "SecretNotFound", MSG_DELETED_NOT_FOUND.format(name=name))
                secret.deleted_date = secret.scheduled_purge_date = None
                self._secrets[name.lower()] = secret
            return 200, secret.latest.bundle(base, with_value=False)
        if op == "BackupSecret":
            return 200, {"value": self._backup(name)}
        if op == "RestoreSecret":
            return 200, self._restore(payload).latest.bundle(base, with_value=False)
        raise KeyVaultError(404, "NotFound", MSG_NO_ROUTE.format(method="?", path=op))  # pragma: no cover

    def _set(
        self,
        name: str,
        value: str,
        content_type: str | None,
        tags: dict[str, str] | None,
        enabled: bool,
        not_before: int | None,
        expires: int | None,
    ) -> SecretVersion:
        """Create a new version (caller holds the lock)."""
        if not _NAME_RE.match(name):
            raise _bad(MSG_BAD_NAME.format(name=name))
        if not isinstance(value, str):
            raise _bad(MSG_PROPERTY_INVALID.format(name="value"))
        if len(value.encode("utf-8")) > MAX_VALUE_BYTES:
            raise _bad(MSG_TOO_LARGE, "SecretTooLarge")
        if tags is not None and len(tags) > MAX_TAGS:
            raise _bad(MSG_TOO_MANY_TAGS)
        key = name.lower()
        if key in self._deleted:
            raise KeyVaultError(
                409,
                "Conflict",
                MSG_DELETED_BUT_RECOVERABLE.format(name=name),
                "ObjectIsDeletedButRecoverable",
            )
        secret = self._secrets.get(key)
        if secret is None:
            secret = self._secrets[key] = _Secret(name)
        now = int(self.clock())
        version = SecretVersion(
            name=secret.name,
            version=uuid.uuid4().hex,
            value=value,
            content_type=content_type,
            tags=None if tags is None else dict(tags),
            enabled=enabled,
            not_before=not_before,
            expires=expires,
            created=now,
            updated=now,
            previous_version=secret.latest.version if secret.versions else None,
        )
        secret.add(version)
        return version

    def _get(self, name: str, version: str) -> SecretVersion:
        with self._lock:
            secret = self._secrets.get(name.lower())
            found = None if secret is None else secret.find(version)
        if found is None:
            shown = f"{name}/{version}" if version else name
            raise KeyVaultError(404, "SecretNotFound", MSG_NOT_FOUND.format(name=shown))
        if not found.enabled:
            raise KeyVaultError(403, "Forbidden", MSG_DISABLED, "SecretDisabled")
        return found

    def _update(self, name: str, version: str, changes: dict[str, Any]) -> SecretVersion:
        with self._lock:
            secret = self._secrets.get(name.lower())
            found = None if secret is None else secret.find(version)
            if secret is None or found is None:
                shown = f"{name}/{version}" if version else name
                raise KeyVaultError(404, "SecretNotFound", MSG_NOT_FOUND.format(name=shown))
            if "tags" in changes and changes["tags"] is not None and len(changes["tags"]) > MAX_TAGS:
                raise _bad(MSG_TOO_MANY_TAGS)
            updated = dataclasses.replace(found, **changes, updated=int(self.clock()))
            secret.replace(updated)
            return updated

    def _deleted_or_404(self, name: str) -> _Secret:
        with self._lock:
            secret = self._deleted.get(name.lower())
        if secret is None:
            raise KeyVaultError(404, "SecretNotFound", MSG_DELETED_NOT_FOUND.format(name=name))
        return secret

    def _listing(self, op: str, name: str, base: str) -> list[tuple[str, dict[str, Any]]]:
        """``(sort key, item)`` pairs in page order; the key of a page's last item is its skiptoken marker."""
        with self._lock:
            if op == "GetSecretVersions":
                secret = self._secrets.get(name.lower())
                versions: Iterable[SecretVersion] = () if secret is None else list(secret.versions)
                return [(f"{i:08d}", v.item(base, with_version=True)) for i, v in enumerate(versions)]
            if op == "GetSecrets":
                return [
                    (k, self._secrets[k].latest.item(base, with_version=False)) for k in sorted(self._secrets)
                ]
            return [
                (
                    k,
                    {
                        **self._deleted[k].deleted_fields(base),
                        **self._deleted[k].latest.item(base, with_version=False),
                    },
                )
                for k in sorted(self._deleted)
            ]

    # ------------------------------------------------------------------------------ backup / restore

    _BACKUP_AAD = b"apimvault-local-keyvault-secret-backup-v1"

    def _backup(self, name: str) -> str:
        with self._lock:
            secret = self._secrets.get(name.lower())
            if secret is None:
                raise KeyVaultError(404, "SecretNotFound", MSG_NOT_FOUND.format(name=name))
            state = {"name": secret.name, "versions": [dataclasses.asdict(v) for v in secret.versions]}
        nonce = secrets.token_bytes(12)
        sealed = self._backup_key.encrypt(nonce, json.dumps(state).encode("utf-8"), self._BACKUP_AAD)
        return _b64url_encode(nonce + sealed)

    def _restore(self, payload: dict[str, Any]) -> _Secret:
        blob = payload.get("value")
        if not isinstance(blob, str) or not blob:
            raise _bad(MSG_VALUE_REQUIRED if blob is None else MSG_PROPERTY_INVALID.format(name="value"))
        try:
            raw = _b64url_decode(blob)
            state = json.loads(self._backup_key.decrypt(raw[:12], raw[12:], self._BACKUP_AAD))
            secret = _Secret(str(state["name"]))
            for fields in state["versions"]:
                if fields.get("tags") is not None:
                    fields["tags"] = dict(fields["tags"])
                secret.add(SecretVersion(**fields))
        except (ValueError, KeyError, TypeError, InvalidTag, binascii.Error):
            raise _bad(MSG_BAD_BACKUP) from None
        if not secret.versions:
            raise _bad(MSG_BAD_BACKUP)
        key = secret.name.lower()
        with self._lock:
            if key in self._deleted:
                raise KeyVaultError(
                    409,
                    "Conflict",
                    MSG_DELETED_BUT_RECOVERABLE.format(name=secret.name),
                    "ObjectIsDeletedButRecoverable",
                )
            if key in self._secrets:
                raise KeyVaultError(409, "Conflict", MSG_EXISTS.format(name=secret.name))
            self._secrets[key] = secret
        return secret


# ------------------------------------------------------------------------------------ request parsing


def _optional_str(payload: dict[str, Any], key: str) -> str | None:
    value = payload.get(key)
    if value is not None and not isinstance(value, str):
        raise _bad(MSG_PROPERTY_INVALID.format(name=key))
    return value


def _tags(payload: dict[str, Any]) -> dict[str, str] | None:
    tags = payload.get("tags")
    if tags is None:
        return None
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise _bad(MSG_PROPERTY_INVALID.format(name="tags"))
    return dict(tags)


def _attributes(payload: dict[str, Any]) -> dict[str, Any]:
    """The writable attributes present in the body (read-only ones are ignored, as the service does)."""
    attrs = payload.get("attributes")
    if attrs is None:
        return {}
    if not isinstance(attrs, dict):
        raise _bad(MSG_PROPERTY_INVALID.format(name="attributes"))
    out: dict[str, Any] = {}
    enabled = attrs.get("enabled")
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise _bad(MSG_PROPERTY_INVALID.format(name="attributes.enabled"))
        out["enabled"] = enabled
    for wire, field in (("nbf", "not_before"), ("exp", "expires")):
        stamp = attrs.get(wire)
        if stamp is not None:
            if isinstance(stamp, bool) or not isinstance(stamp, int) or not 0 <= stamp < 2**40:
                raise _bad(MSG_PROPERTY_INVALID.format(name=f"attributes.{wire}"))
            out[field] = stamp
    return out


def _parse_set(payload: dict[str, Any]) -> dict[str, Any]:
    if "value" not in payload or payload["value"] is None:
        raise _bad(MSG_VALUE_REQUIRED)
    if not isinstance(payload["value"], str):
        raise _bad(MSG_PROPERTY_INVALID.format(name="value"))
    attrs = _attributes(payload)
    return {
        "value": payload["value"],
        "content_type": _optional_str(payload, "contentType"),
        "tags": _tags(payload),
        "enabled": attrs.get("enabled", True),
        "not_before": attrs.get("not_before"),
        "expires": attrs.get("expires"),
    }


def _parse_update(payload: dict[str, Any]) -> dict[str, Any]:
    changes = _attributes(payload)
    if payload.get("contentType") is not None:
        changes["content_type"] = _optional_str(payload, "contentType")
    if payload.get("tags") is not None:
        changes["tags"] = _tags(payload)
    return changes


def _maxresults(query: dict[str, list[str]]) -> int:
    raw = query.get("maxresults")
    if raw is None:
        return DEFAULT_PAGE
    text = raw[0].strip()
    if not text.isdigit() or not 1 <= int(text) <= 25:
        raise _bad(MSG_MAXRESULTS)
    return int(text)


def _skiptoken(query: dict[str, list[str]]) -> str | None:
    raw = query.get("$skiptoken")
    if raw is None or raw[0] == "":
        return None
    try:
        marker = json.loads(_b64url_decode(raw[0]))["NextMarker"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise _bad(MSG_SKIPTOKEN) from None
    if not isinstance(marker, str):
        raise _bad(MSG_SKIPTOKEN)
    return marker
