"""The local ``Microsoft.ApiManagement`` management plane for subscriptions (see
:mod:`apimvault.local.apim`)."""

from __future__ import annotations

import re
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ._apim_state import ApimState
from ._arm_versions import api_version_problem
from ._server import Service, json_response
from ._tokens import TENANT_ID, TokenError, TokenIssuer
from .rbac import APIM_SUBSCRIPTIONS, Rbac

# -------------------------------------------------------------------------------------------------- ARM

_ARM_PATH = re.compile(
    r"^/subscriptions/(?P<arm>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.ApiManagement/"
    r"service/(?P<svc>[^/]+)/subscriptions(?:/(?P<sid>[^/]+)(?:/(?P<action>[^/]+))?)?/?$",
    re.IGNORECASE,
)
_ACTIONS = {
    "listsecrets": "ListSecrets",
    "regenerateprimarykey": "RegeneratePrimaryKey",
    "regeneratesecondarykey": "RegenerateSecondaryKey",
}
# The Azure RBAC action each operation needs (Learn, "Azure permissions for Integration":
# Microsoft.ApiManagement/service/subscriptions/...).
RBAC_ACTIONS = {
    "GetSubscription": APIM_SUBSCRIPTIONS + "read",
    "GetSubscriptionEntityTag": APIM_SUBSCRIPTIONS + "read",
    "ListSubscriptions": APIM_SUBSCRIPTIONS + "read",
    "ListSecrets": APIM_SUBSCRIPTIONS + "listSecrets/action",
    "RegeneratePrimaryKey": APIM_SUBSCRIPTIONS + "regeneratePrimaryKey/action",
    "RegenerateSecondaryKey": APIM_SUBSCRIPTIONS + "regenerateSecondaryKey/action",
}
# ARM's 403 when no role assignment grants the action (wire text as ARM returns it, e.g. Azure/ARO-RP#66,
# microsoft/foundry-dev-tools#555): {"error":{"code":"AuthorizationFailed","message":"The client '<id>' with
# object id '<oid>' does not have authorization to perform action '<action>' over scope '<scope>' or the
# scope is invalid. If access was recently granted, please refresh your credentials."}}
AUTHORIZATION_FAILED = (
    "The client '{client}' with object id '{oid}' does not have authorization to perform action "
    "'{action}' over scope '{scope}' or the scope is invalid. If access was recently granted, please "
    "refresh your credentials."
)


def _arm_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


class ArmService(Service):
    """``Microsoft.ApiManagement`` subscription operations behind ARM bearer-token auth.

    azure-mgmt-apimanagement 5.0.0 sends ``api-version=2024-05-01`` and asks for the default scope
    ``https://management.azure.com/.default`` (``_configuration.py``); the local identity endpoint issues
    that audience, so the client needs no ``credential_scopes`` override. An api-version the provider does not
    serve gets ARM's 400 ``NoRegisteredProviderFound`` (:mod:`apimvault.local._arm_versions`).

    With ``rbac`` (as :class:`~apimvault.local.LocalAzure` wires it) every operation needs its action
    (:data:`RBAC_ACTIONS`) from a role assigned to the caller's ``oid`` at the resource or above it, else
    403 ``AuthorizationFailed``; without it any valid token may do everything.
    """

    name = "arm"
    audience_prefix = "https://management."

    def __init__(self, state: ApimState, tokens: TokenIssuer, *, rbac: Rbac | None = None) -> None:
        super().__init__()
        self.state = state
        self.tokens = tokens
        self.rbac = rbac

    def classify(self, method: str, path: str) -> str:
        match = _ARM_PATH.match(path)
        if match is None:
            return "unknown"
        if match.group("action"):
            return _ACTIONS.get(match.group("action").lower(), "unknown")
        if match.group("sid") is None:
            return "ListSubscriptions"
        return {"GET": "GetSubscription", "HEAD": "GetSubscriptionEntityTag"}.get(method, "unknown")

    def error_response(self, status: int, message: str) -> Response:
        code = {429: "TooManyRequests", 500: "InternalServerError", 503: "ServiceUnavailable"}.get(
            status, str(status)
        )
        return _arm_error(status, code, message)

    def build_app(self) -> ASGIApp:
        return self._app

    @staticmethod
    def _challenge(description: str) -> dict[str, str]:
        # The challenge ARM sends (captured in Azure SDK tests, e.g. azure-sdk-for-go's bearer-token policy
        # tests): authorization_uri on login.windows.net with the tenant, error="invalid_token".
        return {
            "WWW-Authenticate": (
                f'Bearer authorization_uri="https://login.windows.net/{TENANT_ID}", '
                f'error="invalid_token", error_description="{description}"'
            )
        }

    def _authenticate(self, request: Request) -> dict[str, Any] | Response:
        # Missing header: ARM's body {"error":{"code":"AuthenticationFailed","message":"Authentication failed.
        # The 'Authorization' header is missing."}} as Azure docs and ARM test doubles record it (e.g. the
        # Azure Monitor resource-scoped query docs, mock ARM servers in Go SDK tests). Bad tokens get ARM's
        # InvalidAuthenticationToken / ExpiredAuthenticationToken / InvalidAuthenticationTokenAudience codes.
        token = TokenIssuer.bearer(request)
        if token is None:
            return _arm_error(
                401,
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is missing.",
                self._challenge("The authentication failed because of missing 'Authorization' header."),
            )
        try:
            claims = self.tokens.verify(token)
        except TokenError as exc:
            code = "ExpiredAuthenticationToken" if "expired" in str(exc) else "InvalidAuthenticationToken"
            message = (
                "The access token expiry UTC time is earlier than current UTC time."
                if code.startswith("Expired")
                else "The access token is invalid."
            )
            return _arm_error(401, code, message, self._challenge("The access token is invalid."))
        audience = str(claims.get("aud", ""))
        if not audience.startswith(self.audience_prefix):
            return _arm_error(
                401,
                "InvalidAuthenticationTokenAudience",
                f"The access token has been obtained for wrong audience or resource '{audience}'. It should "
                "exactly match with one of the allowed audiences 'https://management.core.windows.net/',"
                "'https://management.core.windows.net','https://management.azure.com/',"
                "'https://management.azure.com'.",
                self._challenge("The access token has been obtained for wrong audience or resource."),
            )
        return claims

    def _authorize(self, claims: dict[str, Any], operation: str, match: re.Match[str]) -> Response | None:
        """403 ``AuthorizationFailed`` unless a role assigned to the caller grants the operation's action."""
        action = RBAC_ACTIONS.get(operation)
        if self.rbac is None or action is None:
            return None
        scope = (
            f"/subscriptions/{match.group('arm')}/resourceGroups/{match.group('rg')}/providers/"
            f"Microsoft.ApiManagement/service/{match.group('svc')}/subscriptions"
        )
        if match.group("sid"):
            scope += f"/{match.group('sid')}"
        oid = str(claims.get("oid", ""))
        if self.rbac.allowed(oid, action, scope, data=False):
            return None
        client = str(claims.get("appid", "") or oid)
        message = AUTHORIZATION_FAILED.format(client=client, oid=oid, action=action, scope=scope)
        return _arm_error(403, "AuthorizationFailed", message)

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response = await self._handle(request)
        response.headers.setdefault("x-ms-request-id", str(uuid.uuid4()))
        response.headers.setdefault(
            "x-ms-correlation-request-id", request.headers.get("x-ms-client-request-id", str(uuid.uuid4()))
        )
        await response(scope, receive, send)

    async def _handle(self, request: Request) -> Response:
        claims = self._authenticate(request)
        if isinstance(claims, Response):
            return claims
        if not request.query_params.get("api-version"):
            return _arm_error(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        match = _ARM_PATH.match(request.url.path)
        if match is None:
            return _arm_error(404, "NotFound", f"No route for '{request.method} {request.url.path}'.")
        unserved = api_version_problem(request.query_params["api-version"])
        if unserved is not None:
            return _arm_error(400, *unserved)
        arm, rg, svc = match.group("arm"), match.group("rg"), match.group("svc")
        sid, action = match.group("sid"), match.group("action")
        # ARM authorizes before it looks the resource up ("... or the scope is invalid").
        forbidden = self._authorize(claims, self.classify(request.method, request.url.path), match)
        if forbidden is not None:
            return forbidden
        if not self.state.service_exists(arm, rg, svc):
            return _arm_error(
                404,
                "ResourceNotFound",
                f"The Resource 'Microsoft.ApiManagement/service/{svc}' under resource group '{rg}' was not "
                "found. For more details please go to https://aka.ms/ARMResourceNotFoundFix",
            )
        if sid is None:
            if request.method != "GET":
                return _arm_error(405, "MethodNotAllowed", f"The method '{request.method}' is not allowed.")
            subs = self.state.list(arm, rg, svc)
            # One page: no nextLink (the spec types it as a string; ``null`` would not validate).
            return json_response({"value": [s.contract() for s in subs], "count": len(subs)})
        sub = self.state.find(arm, rg, svc, sid)
        if sub is None:
            return _arm_error(404, "ResourceNotFound", "Subscription not found.")
        if action is None:
            if request.method in ("GET", "HEAD"):
                return json_response(sub.contract(), headers={"ETag": sub.etag})
            return _arm_error(405, "MethodNotAllowed", f"The method '{request.method}' is not allowed.")
        operation = _ACTIONS.get(action.lower())
        if operation is None:
            return _arm_error(404, "NotFound", f"No route for '{request.method} {request.url.path}'.")
        if request.method != "POST":
            return _arm_error(405, "MethodNotAllowed", f"The method '{request.method}' is not allowed.")
        if operation == "ListSecrets":
            return json_response(
                {"primaryKey": sub.primary_key, "secondaryKey": sub.secondary_key}, headers={"ETag": sub.etag}
            )
        self.state.regenerate(sub.sid, "primary" if operation == "RegeneratePrimaryKey" else "secondary")
        return Response(status_code=204)
