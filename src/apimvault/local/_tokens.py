"""The stack's identities and access tokens (HS256 JWTs with Entra-shaped claims)."""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import jwt.algorithms
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.requests import Request

Clock = Callable[[], float]

TENANT_ID = "72f988bf-0000-4000-8000-00000000a2ae"
"""Tenant GUID the local identity service puts in tokens and the vault names in its challenge."""


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
        # RS256 with a published key (apimvault.local.oidc serves it as JWKS), as Entra signs.
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
