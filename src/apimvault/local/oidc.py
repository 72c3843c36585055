"""OpenID Connect discovery for the stack's token issuer: what ``validate-azure-ad-token`` reads.

Entra publishes ``https://login.microsoftonline.com/{tenant}/.well-known/openid-configuration`` (v1 tokens,
issuer ``https://sts.windows.net/{tenant}/``) whose ``jwks_uri`` lists the RSA keys that sign access
tokens, each named by the ``kid`` in a token's header (Microsoft identity platform, "Access tokens" and
"OpenID Connect on the Microsoft identity platform"). This service serves the same two documents for the
local identity endpoint's tokens::

    GET /{tenant}/.well-known/openid-configuration   issuer, jwks_uri, token endpoint, algorithms
    GET /{tenant}/discovery/keys                     {"keys": [{"kty": "RSA", "use": "sig", "kid", "n", "e"}]}

(``/common/...`` answers too.) The gateway's token policy checks signatures against these keys.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ._server import Service, json_response
from ._tokens import TENANT_ID, TokenIssuer

__all__ = ["OidcService"]


class OidcService(Service):
    """The token issuer's OpenID configuration and JWKS (public keys only; nothing secret)."""

    name = "oidc"

    def __init__(self, tokens: TokenIssuer) -> None:
        super().__init__()
        self.tokens = tokens

    def classify(self, method: str, path: str) -> str:
        if path.endswith("/.well-known/openid-configuration"):
            return "OpenIdConfiguration"
        if path.endswith("/discovery/keys"):
            return "Keys"
        return "unknown"

    def error_response(self, status: int, message: str) -> Response:
        return json_response({"error": "server_error", "error_description": message}, status)

    def build_app(self) -> ASGIApp:
        return self._app

    def configuration(self) -> dict[str, object]:
        base = f"{self.url}/{TENANT_ID}"
        return {
            "issuer": self.tokens.issuer,
            "jwks_uri": f"{base}/discovery/keys",
            "token_endpoint": f"{base}/oauth2/token",
            "authorization_endpoint": f"{base}/oauth2/authorize",
            "response_types_supported": ["code", "id_token", "code id_token", "token id_token", "token"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "tenant_region_scope": "local",
        }

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        parts = [p for p in request.url.path.split("/") if p]
        response: Response
        if request.method != "GET":
            response = self.error_response(405, f"Method {request.method} is not allowed; use GET.")
        elif len(parts) < 2 or parts[0].lower() not in (TENANT_ID, "common"):
            response = self.error_response(404, f"No such endpoint: {request.url.path}")
        elif parts[1:] == [".well-known", "openid-configuration"]:
            response = json_response(self.configuration())
        elif parts[1:] == ["discovery", "keys"]:
            response = json_response(self.tokens.jwks())
        else:
            response = self.error_response(404, f"No such endpoint: {request.url.path}")
        await response(scope, receive, send)
