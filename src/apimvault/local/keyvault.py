"""Key Vault secrets data plane on loopback TLS: the twelve operations of the spec, RBAC and challenges.

The wire format follows ``Azure/azure-rest-api-specs``
``specification/keyvault/data-plane/Secrets/stable/2026-04-01/secrets.json`` and what the real service sends
in the Azure SDKs' recorded tests (``Azure/azure-sdk-for-js`` ``sdk/keyvault/keyvault-secrets/recordings/``);
the challenge follows ``Azure/azure-sdk-for-python`` ``sdk/keyvault/azure-keyvault-secrets/azure/keyvault/
secrets/_shared/challenge_auth_policy.py`` and ``http_challenge.py``. Error strings quote the real service
where a public source shows them (each is cited next to its constant); the rest are marked **(inference)**.

Behaviour worth knowing:

* **Authentication before everything.** Any request without ``Authorization: Bearer`` gets 401 with a
  ``WWW-Authenticate`` challenge before routing or body validation (as the recordings show), so the SDK's
  bodiless first request and unknown routes are challenged alike. The challenge names ``resource="https://0.0.1:PORT"``,
  which makes ``https://127.0.0.1:PORT`` pass the SDK's challenge-resource verification with it left ON.
* **Tokens** must come from the stack's :class:`~apimvault.local.TokenIssuer`, be unexpired and carry
  a Key Vault audience (``https://vault.azure.net`` or the challenge resource); anything else is 401.
* **RBAC** is keyed by the token's ``oid`` and checks the operation's *data action* against the roles
  assigned to it (:mod:`apimvault.local.rbac`: built-in roles and infra's custom roles from
  ``infra/roles/rotator.json``). ``Key Vault Secrets User`` may read values and metadata; ``Key Vault Secrets
  Officer`` (and ``Key Vault Administrator``) may do everything. Assignments are at vault scope or on one
  secret; vault-wide operations (list secrets, list deleted secrets, restore) need vault scope. A refusal is
  403 ``Forbidden`` / innererror ``ForbiddenByRbac`` naming the action, as the real vault answers.
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

import binascii
import bisect
import json
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

from .._jwt import unverified_claims
from ._kv_parsing import (
    KvRoute,
    b64url_decode,
    b64url_encode,
    max_results,
    parse_set,
    parse_update,
    route_of,
    skip_token,
)
from ._kv_store import SecretStore, SecretVersion, StoredSecret
from ._kv_wire import (
    ACTIONS,
    CLIENT_REQUEST_ID_RE,
    HOST_RE,
    KEYVAULT_APP_ID,
    MAX_BODY_BYTES,
    MSG_API_VERSION,
    MSG_BAD_BACKUP,
    MSG_BAD_NAME,
    MSG_BAD_SIGNATURE,
    MSG_BODY_TOO_LARGE,
    MSG_CONTENT_TYPE,
    MSG_EXPIRED,
    MSG_FORBIDDEN_RBAC,
    MSG_INVALID_AUDIENCE,
    MSG_INVALID_ISSUER,
    MSG_MISSING_TOKEN,
    MSG_NO_ROUTE,
    MSG_NOT_JSON,
    MSG_NOT_OBJECT,
    MSG_PROPERTY_INVALID,
    MSG_VALUE_REQUIRED,
    NAME_RE,
    ROLE_ADMINISTRATOR,
    ROLE_OFFICER,
    ROLE_USER,
    SERVICE_VERSION,
    STATUS_CODES,
    VAULT_LOCATION,
    VAULT_NAME,
    VAULT_RESOURCE,
    VAULT_WIDE,
    WITH_BODY,
    KeyVaultError,
    bad_parameter,
    check_api_version,
)
from ._server import Service, json_response
from ._tokens import TENANT_ID, Clock, Identity, TokenError, TokenIssuer
from .rbac import Rbac

__all__ = [
    "ROLE_ADMINISTRATOR",
    "ROLE_OFFICER",
    "ROLE_USER",
    "KeyVaultError",
    "KeyVaultService",
    "SecretStore",
    "SecretVersion",
]


# -------------------------------------------------------------------------------------------- the service


class KeyVaultService(Service):
    """An in-memory Key Vault (secrets only) speaking the real wire protocol; see the module docstring."""

    name = "keyvault"

    def __init__(self, tokens: TokenIssuer, *, clock: Clock = time.time, rbac: Rbac | None = None) -> None:
        super().__init__()
        self.tokens = tokens
        self.clock = clock
        self._lock = threading.Lock()  # guards the token cache
        self.store = SecretStore(clock)
        # Role definitions and assignments (apimvault.local.rbac), shared with the ARM plane in a stack.
        self.rbac = rbac if rbac is not None else Rbac()
        self._token_cache: dict[str, dict[str, Any]] = {}
        self._backup_key = AESGCM(AESGCM.generate_key(bit_length=256))
        challenge_resource = f"https://0.0.1:{self.port}"
        self._audiences = frozenset(
            {
                "https://vault.azure.net",
                "https://vault.azure.net/",
                KEYVAULT_APP_ID,
                challenge_resource,
                challenge_resource + "/",
            }
        )
        authority = f"https://login.microsoftonline.com/{TENANT_ID}"
        self.challenge = f'Bearer authorization="{authority}", resource="{challenge_resource}"'
        """The ``WWW-Authenticate`` value of every 401 (shape: azure-sdk-for-python ``http_challenge.py``)."""

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
            return self.store.set(name, value, content_type, tags, enabled, not_before, expires)
        except KeyVaultError as exc:
            raise ValueError(exc.message) from None

    def latest(self, name: str) -> SecretVersion:
        """The current version of a live secret; ``KeyError`` if there is none (absent or soft-deleted)."""
        secret = self.store.live(name)
        if secret is None:
            raise KeyError(name)
        return secret.latest

    def versions(self, name: str) -> list[SecretVersion]:
        """Every version of a live secret, oldest first; ``KeyError`` if there is none."""
        secret = self.store.live(name)
        if secret is None:
            raise KeyError(name)
        return list(secret.versions)

    @staticmethod
    def scope(secret: str | None = None) -> str:
        """The ARM resource id of the vault (``secret=None``) or of one of its secrets: a role scope."""
        return VAULT_RESOURCE if secret is None else f"{VAULT_RESOURCE}/secrets/{secret.lower()}"

    def grant(self, identity: Identity, role: str, *, secret: str | None = None) -> None:
        """Assign ``role`` (a built-in role or one of :attr:`rbac`'s custom roles, e.g. infra's
        ``apimvault secret rotator``) to ``identity`` on the whole vault (``secret=None``) or on one secret.
        ``ValueError`` for an unknown role."""
        self.rbac.assign(identity, role, self.scope(secret))

    def revoke(self, identity: Identity, role: str | None = None, *, secret: str | None = None) -> None:
        """Remove assignments of ``identity``: of ``role`` (any role if ``None``) on ``secret`` (every scope,
        vault and per-secret, if ``None``). ``revoke(identity)`` removes all of its access."""
        self.rbac.revoke(identity, role, None if secret is None else self.scope(secret))

    # ------------------------------------------------------------------------------ service hooks

    def classify(self, method: str, path: str) -> str:
        return route_of(method, path).operation

    def error_response(self, status: int, message: str) -> Response:
        code = STATUS_CODES.get(status, "InternalServerError" if status >= 500 else "BadParameter")
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
        if crid is not None and not CLIENT_REQUEST_ID_RE.match(crid):
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
        # 1. Authentication comes first, before routing or reading the body (as the real service does).
        claims = self._authenticate(headers.get("authorization", ""))
        method: str = scope["method"]
        path: str = scope["path"]
        route = route_of(method, path)
        if route.operation == "unknown":
            raise KeyVaultError(404, "NotFound", MSG_NO_ROUTE.format(method=method, path=path))
        query = urllib.parse.parse_qs(
            scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
        )
        api_version = (query.get("api-version") or [""])[0]
        if not api_version:
            raise bad_parameter(MSG_API_VERSION)
        check_api_version(api_version)
        # 2. Authorization, then input validation.
        self._authorize(claims, route)
        if route.name is not None and not NAME_RE.match(route.name):
            raise bad_parameter(MSG_BAD_NAME.format(name=route.name))
        payload: dict[str, Any] = {}
        if route.operation in WITH_BODY:
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
        issuer = unverified_claims(token).get("iss")
        if isinstance(issuer, str) and issuer != self.tokens.issuer:
            return MSG_INVALID_ISSUER.format(tenant=TENANT_ID, found=issuer)
        return MSG_BAD_SIGNATURE

    def _authorize(self, claims: dict[str, Any], route: KvRoute) -> None:
        action = ACTIONS[route.operation]
        oid = str(claims.get("oid", ""))
        secret_scope = None if route.operation in VAULT_WIDE or route.name is None else route.name.lower()
        if self.rbac.allowed(oid, action, self.scope(secret_scope), data=True):
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
        if not HOST_RE.match(host):
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
                raise bad_parameter(MSG_NOT_JSON)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise KeyVaultError(413, "RequestEntityTooLarge", MSG_BODY_TOO_LARGE)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            raise bad_parameter(MSG_CONTENT_TYPE)
        try:
            payload = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise bad_parameter(MSG_NOT_JSON) from None
        if not isinstance(payload, dict):
            raise bad_parameter(MSG_NOT_OBJECT)
        return payload

    # ------------------------------------------------------------------------------ operations

    def _dispatch(
        self,
        route: KvRoute,
        payload: dict[str, Any],
        query: dict[str, list[str]],
        api_version: str,
        base: str,
    ) -> tuple[int, dict[str, Any] | None]:
        op = route.operation
        name = route.name or ""
        if op == "GetSecret":
            return 200, self.store.get(name, route.version).bundle(base, with_value=True)
        if op == "SetSecret":
            created = self.store.set(name, **parse_set(payload))
            return 200, created.bundle(base, with_value=True)
        if op == "UpdateSecret":
            return 200, self.store.update(name, route.version, parse_update(payload)).bundle(
                base, with_value=False
            )
        if op in ("GetSecrets", "GetSecretVersions", "GetDeletedSecrets"):
            page_size = max_results(query)
            marker = skip_token(query)
            path = {"GetSecrets": "/secrets", "GetDeletedSecrets": "/deletedsecrets"}.get(op)
            if path is None:
                path = f"/secrets/{name}/versions"
            keyed = self._listing(op, name, base)
            keys = [key for key, _ in keyed]
            start = bisect.bisect_right(keys, marker) if marker is not None else 0
            page = keyed[start : start + page_size]
            next_link = None
            if start + page_size < len(keyed):
                token = b64url_encode(json.dumps({"NextMarker": page[-1][0]}).encode())
                params = {"api-version": api_version, "$skiptoken": token}
                if "maxresults" in query:
                    params["maxresults"] = str(page_size)
                next_link = f"{base}{path}?{urllib.parse.urlencode(params, safe='$')}"
            return 200, {"value": [item for _, item in page], "nextLink": next_link}
        if op == "DeleteSecret":
            secret = self.store.delete(name)
            return 200, {**secret.deleted_fields(base), **secret.latest.bundle(base, with_value=False)}
        if op == "GetDeletedSecret":
            secret = self.store.deleted(name)
            return 200, {**secret.deleted_fields(base), **secret.latest.bundle(base, with_value=False)}
        if op == "PurgeDeletedSecret":
            self.store.purge(name)
            return 204, None
        if op == "RecoverDeletedSecret":
            secret = self.store.recover(name)
            return 200, secret.latest.bundle(base, with_value=False)
        if op == "BackupSecret":
            return 200, {"value": self._backup(name)}
        if op == "RestoreSecret":
            return 200, self._restore(payload).latest.bundle(base, with_value=False)
        raise KeyVaultError(404, "NotFound", MSG_NO_ROUTE.format(method="?", path=op))  # pragma: no cover

    def _listing(self, op: str, name: str, base: str) -> list[tuple[str, dict[str, Any]]]:
        """``(sort key, item)`` pairs in page order; the key of a page's last item is its skiptoken marker."""
        if op == "GetSecretVersions":
            secret = self.store.live(name)
            versions: Iterable[SecretVersion] = () if secret is None else list(secret.versions)
            return [(f"{i:08d}", v.item(base, with_version=True)) for i, v in enumerate(versions)]
        if op == "GetSecrets":
            return [(s.name.lower(), s.latest.item(base, with_version=False)) for s in self.store.all_live()]
        return [
            (s.name.lower(), {**s.deleted_fields(base), **s.latest.item(base, with_version=False)})
            for s in self.store.all_deleted()
        ]

    # ------------------------------------------------------------------------------ backup / restore

    _BACKUP_AAD = b"apimvault-local-keyvault-secret-backup-v1"

    def _backup(self, name: str) -> str:
        state = self.store.export(name)
        nonce = secrets.token_bytes(12)
        sealed = self._backup_key.encrypt(nonce, json.dumps(state).encode("utf-8"), self._BACKUP_AAD)
        return b64url_encode(nonce + sealed)

    def _restore(self, payload: dict[str, Any]) -> StoredSecret:
        blob = payload.get("value")
        if not isinstance(blob, str) or not blob:
            raise bad_parameter(
                MSG_VALUE_REQUIRED if blob is None else MSG_PROPERTY_INVALID.format(name="value")
            )
        try:
            raw = b64url_decode(blob)
            state = json.loads(self._backup_key.decrypt(raw[:12], raw[12:], self._BACKUP_AAD))
            secret = StoredSecret(str(state["name"]))
            for fields in state["versions"]:
                if fields.get("tags") is not None:
                    fields["tags"] = dict(fields["tags"])
                secret.add(SecretVersion(**fields))
        except (ValueError, KeyError, TypeError, InvalidTag, binascii.Error):
            raise bad_parameter(MSG_BAD_BACKUP) from None
        if not secret.versions:
            raise bad_parameter(MSG_BAD_BACKUP)
        return self.store.restore(secret)
