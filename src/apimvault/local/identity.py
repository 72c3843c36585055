"""A local managed-identity endpoint (App Service protocol) and a stand-in ``az`` for the laptop path.

With ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` set, azure-identity's
``ManagedIdentityCredential`` (through MSAL) sends ``GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=R
[&client_id=|&object_id=|&mi_res_id=]`` with ``X-IDENTITY-HEADER``, and needs ``access_token`` and
``expires_on`` back (``Azure/azure-sdk-for-python`` ``sdk/identity/azure-identity/azure/identity/_credentials/
managed_identity.py`` and ``app_service.py``; Microsoft Learn, "Managed identities for App Service", REST
endpoint reference). This endpoint is served over HTTPS by the stack CA; IMDS (169.254.169.254) is never used.

:func:`write_az_stub` writes an executable ``az`` that answers ``az account get-access-token`` from the
same endpoint, so ``AzureCliCredential`` (``AZURE_TOKEN_CREDENTIALS=dev``) works without the Azure CLI.
"""

from __future__ import annotations

import secrets
import stat
import sys
import threading
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ._server import Service, json_response
from ._tokens import TENANT_ID, Identity, TokenIssuer

TOKEN_PATH = "/msi/token"  # noqa: S105 - a URL path, not a secret
API_VERSION = "2019-08-01"


def _error(status: int, message: str) -> Response:
    # App Service's error shape; MSAL turns it into "<statusCode>, <message>" (azure-identity app_service.py).
    return json_response({"statusCode": status, "message": message}, status)


class IdentityService(Service):
    """The App Service managed-identity token endpoint of the stack.

    ``default`` is the system-assigned-like identity used when a request names no identity; :meth:`add`
    registers user-assigned identities, selected by ``client_id``, ``object_id`` or ``mi_res_id``.
    """

    name = "identity"

    def __init__(self, tokens: TokenIssuer) -> None:
        super().__init__()
        self.tokens = tokens
        self.header_secret = secrets.token_urlsafe(24)
        self.default = Identity.new("default")
        self._lock = threading.Lock()
        self._named: dict[str, Identity] = {}

    def add(self, name: str) -> Identity:
        """Register a user-assigned identity called ``name`` (idempotent per name)."""
        with self._lock:
            if name not in self._named:
                self._named[name] = Identity.new(name)
            return self._named[name]

    @property
    def identities(self) -> list[Identity]:
        with self._lock:
            return [self.default, *self._named.values()]

    @property
    def endpoint(self) -> str:
        """The full token URL: what ``IDENTITY_ENDPOINT`` is set to."""
        return f"{self.url}{TOKEN_PATH}"

    def resolve(
        self, *, client_id: str | None = None, object_id: str | None = None, mi_res_id: str | None = None
    ) -> Identity | None:
        """The identity a request selects (the default one when it names none), or None if unknown."""
        if not (client_id or object_id or mi_res_id):
            return self.default
        for identity in self.identities:
            if client_id and identity.client_id.lower() == client_id.lower():
                return identity
            if object_id and identity.object_id.lower() == object_id.lower():
                return identity
            if mi_res_id and mi_res_id.rstrip("/").lower().endswith(
                f"/providers/microsoft.managedidentity/userassignedidentities/{identity.name.lower()}"
            ):
                return identity
        return None

    # ------------------------------------------------------------------------------ Service protocol

    def classify(self, method: str, path: str) -> str:
        return "GetToken" if path.rstrip("/").lower() == TOKEN_PATH else "unknown"

    def error_response(self, status: int, message: str) -> Response:
        return _error(status, message)

    def build_app(self) -> ASGIApp:
        return self._app

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        response = self._handle(Request(scope, receive))
        await response(scope, receive, send)

    def _handle(self, request: Request) -> Response:
        if request.url.path.rstrip("/").lower() != TOKEN_PATH:
            return _error(404, f"No such endpoint: {request.url.path}")
        if request.method != "GET":
            return _error(405, f"Method {request.method} is not allowed; use GET.")
        supplied = request.headers.get("x-identity-header")
        if supplied is None or not secrets.compare_digest(supplied.encode(), self.header_secret.encode()):
            return _error(401, "The X-IDENTITY-HEADER header is missing or does not match IDENTITY_HEADER.")
        query = request.query_params
        if not query.get("api-version"):
            return _error(400, "The api-version query parameter is required.")
        resource = query.get("resource", "").strip()
        if not resource:
            return _error(400, "The resource query parameter is required.")
        selectors = {k: query.get(k) for k in ("client_id", "object_id", "mi_res_id") if query.get(k)}
        if len(selectors) > 1:
            return _error(400, "Specify at most one of client_id, object_id and mi_res_id.")
        identity = self.resolve(**selectors)
        if identity is None:
            ((kind, value),) = selectors.items()
            return _error(400, f"No managed identity with {kind} '{value}' is assigned to this resource.")
        token, expires_on = self.tokens.issue(identity, resource)
        return json_response(
            {
                "access_token": token,
                "expires_on": str(expires_on),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": identity.client_id,
            }
        )


# --------------------------------------------------------------------------------------------- az stub

_AZ_TEMPLATE = '''#!{python}
"""Stand-in `az` written by apimvault.local: answers `az account get-access-token` from the local stack."""
import datetime
import json
import os
import ssl
import sys
import urllib.parse
import urllib.request

ENDPOINT = {endpoint!r}
HEADER = {header!r}
CA_PATH = {ca_path!r}
TENANT = {tenant!r}
SUBSCRIPTION = {subscription!r}


def fail(message):
    sys.stderr.write("ERROR: " + message + "\\n")
    sys.exit(1)


def main(argv):
    if argv[:2] != ["account", "get-access-token"]:
        fail("this stand-in az only supports 'az account get-access-token' (got: az " + " ".join(argv) + ")")
    options = {{}}
    rest = argv[2:]
    i = 0
    while i < len(rest):
        name = rest[i]
        if not name.startswith("--"):
            fail("unrecognized argument: " + name)
        if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            options[name] = rest[i + 1]
            i += 2
        else:
            options[name] = ""
            i += 1
    if options.get("--output", options.get("-o", "json")) != "json":
        fail("only --output json is supported")
    resource = options.get("--resource") or ""
    scope = options.get("--scope") or ""
    if not resource and scope:
        resource = scope[: -len("/.default")] if scope.endswith("/.default") else scope
    if not resource:
        resource = "https://management.core.windows.net/"
    parsed = urllib.parse.urlsplit(ENDPOINT)
    if parsed.hostname != "127.0.0.1":
        fail("refusing a non-loopback identity endpoint")
    query = urllib.parse.urlencode({{"api-version": "2019-08-01", "resource": resource}})
    request = urllib.request.Request(ENDPOINT + "?" + query, headers={{"X-IDENTITY-HEADER": HEADER}})
    cafile = CA_PATH if os.path.exists(CA_PATH) else os.environ.get("SSL_CERT_FILE")
    context = ssl.create_default_context(cafile=cafile)
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            token = json.loads(response.read())
    except Exception as exc:
        fail("could not get a token from the local identity endpoint: " + str(exc))
    expires_on = int(token["expires_on"])
    print(json.dumps({{
        "accessToken": token["access_token"],
        "expiresOn": datetime.datetime.fromtimestamp(expires_on).strftime("%Y-%m-%d %H:%M:%S.%f"),
        "expires_on": expires_on,
        "subscription": options.get("--subscription") or SUBSCRIPTION,
        "tenant": options.get("--tenant") or TENANT,
        "tokenType": "Bearer",
    }}, indent=2))


main(sys.argv[1:])
'''


def write_az_stub(
    target_dir: Path,
    identity: IdentityService,
    *,
    subscription: str,
    ca_path: Path | None = None,
) -> None:
    """Write an executable ``az`` into ``target_dir`` that gets tokens for the default identity.

    The stub bakes in the endpoint, the header secret and the CA (default: ``ca.pem`` next to
    ``target_dir``, where :class:`~apimvault.local.LocalAzure` keeps it) and only talks to 127.0.0.1.
    """
    if ca_path is None:
        ca_path = target_dir.parent / "ca.pem"
    target_dir.mkdir(parents=True, exist_ok=True)
    script = target_dir / "az"
    script.write_text(
        _AZ_TEMPLATE.format(
            python=sys.executable,
            endpoint=identity.endpoint,
            header=identity.header_secret,
            ca_path=str(ca_path),
            tenant=TENANT_ID,
            subscription=subscription,
        )
    )
    script.chmod(stat.S_IRWXU)
