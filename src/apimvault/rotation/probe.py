"""The gateway probe: does a gateway URL accept a key? (``GET <url>/openai/v1/models``, no tokens.)

The rule (issue 19): only a 2xx is "accepted"; APIM's key 401 is "not yet"; anything else (404, 3xx, 400,
403, another 401, 5xx) is a :class:`GatewayProbeError` that stops the rotation, because APIM matches the
route before it checks the key: a path the API does not route answers 404 for any key, so it proves
nothing. A gateway that validates an Entra token as well as the key (key-plus-token mode) checks the token
after the key: with ``token_scope`` the probe sends ``Authorization: Bearer`` with a token the rotation's
credential gets for that scope (azure-identity's cache: a new one near expiry); without it the gateway's
token 401 (classified as :mod:`apimvault._refusal` does) is a :class:`GatewayProbeError` naming
``APIMVAULT_TOKEN_SCOPE``. The token, like the key, is never logged nor put in a message. Every probe
opens a fresh connection, so that the load balancer in front of a gateway's units picks a unit per probe
(a kept-alive connection would ask the same unit every time).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..exceptions import ConfigurationError, CredentialError, RotationError
from .config import ENV_TOKEN_SCOPE
from .model import PROBE_PATH

if TYPE_CHECKING:  # pragma: no cover
    from azure.core.credentials import TokenCredential

    from .._entra import BearerTokenSource

log = logging.getLogger("apimvault.rotation")

_HOW_TO_ROUTE = (
    "The probe must reach an operation of the API that APIM authenticates with the subscription key: add "
    f"a GET operation for {PROBE_PATH} to the API (infra/modules/apim.bicep, openAiApi), or list in "
    "APIMVAULT_GATEWAY_URLS the gateway URL the API is served on"
)


class GatewayProbeError(RotationError):
    """A gateway answered the probe with something that is neither a 2xx nor APIM's key 401: the
    probe cannot tell whether the key is accepted, so the rotation stops (``url`` and ``status`` say
    where and what)."""

    def __init__(self, url: str, status: int, why: str, *, hint: str = _HOW_TO_ROUTE) -> None:
        super().__init__(
            f"gateway probe GET {url}{PROBE_PATH} answered {status}: {why}. Only a 2xx counts as accepted "
            f"and APIM's subscription-key 401 as not yet. {hint}",
            permanent=True,
        )
        self.url = url
        self.status = status


_NEEDS_ENTRA = (
    "the gateway also requires an Entra token (key-plus-token mode: validate-azure-ad-token / validate-jwt "
    "refused the probe, which sent the key alone)"
)
_HOW_TO_ADD_ENTRA = (
    f"Set {ENV_TOKEN_SCOPE} (or `apimvault rotate --token-scope`, RotationConfig.token_scope) to the API's "
    "scope, e.g. api://<app-id>/.default: the probe then sends a token the rotation's credential gets for it"
)
_ENTRA_REFUSED = "the gateway refused the probe's Entra token (validate-azure-ad-token / validate-jwt)"
_HOW_TO_FIX_ENTRA = (
    f"Check {ENV_TOKEN_SCOPE} (the audience the gateway's policy validates) and that the rotation's identity "
    "is allowed to call the API (client application ids, required roles)"
)


def _why(status: int) -> str:
    if status == 404:
        return "the API does not route this path (APIM answers 404 before it checks the key)"
    if 300 <= status < 400:
        return "the gateway redirects (the probe follows no redirect: the key must not travel on)"
    if status == 401:
        return "a 401 that is not APIM's subscription-key refusal (the backend's?)"
    if status == 403:
        return "refused by a policy (IP filter, ...) whatever the key"
    if status >= 500:
        return "the gateway or its backend failed, so the answer says nothing about the key"
    return "an answer that says nothing about the key"


class GatewayProbe:
    """Asks each gateway URL whether it accepts a key: ``GET <url>/openai/v1/models`` with the key in
    ``header_name`` (and, with ``token_scope``, ``Authorization: Bearer`` with a token ``credential`` gets
    for that scope). The gateway authenticates the call like any call of the API; listing models costs no
    tokens. :meth:`accepts` gives True (2xx), False (APIM's key 401) or None (no answer: connection
    error, timeout); any other answer raises :class:`GatewayProbeError`. TLS is verified as by any httpx2
    client; the key and the token are sent to nothing but these URLs, and never across a redirect.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        header_name: str | None = None,
        timeout: float = 10.0,
        token_scope: str | None = None,
        credential: TokenCredential | None = None,
    ) -> None:
        import os

        import httpx2

        from .._entra import BearerTokenSource
        from .._settings import DEFAULT_HEADER, ENV_HEADER, check_header_name

        self.urls = tuple(urls)
        self.header_name = check_header_name(
            header_name or os.environ.get(ENV_HEADER, "").strip() or DEFAULT_HEADER
        )
        self._tokens: BearerTokenSource | None = None
        if token_scope is not None:
            if credential is None:
                raise ConfigurationError(
                    f"{ENV_TOKEN_SCOPE}: a probe with an Entra token needs the rotation's credential"
                )
            # azure-identity's bearer token provider: its cache, a new token shortly before expiry; the
            # source masks the tokens it hands out in apimvault's logs.
            self._tokens = BearerTokenSource(credential, token_scope)
        self._client = httpx2.Client(
            timeout=timeout, follow_redirects=False, limits=httpx2.Limits(max_keepalive_connections=0)
        )

    @property
    def token_scope(self) -> str | None:
        """The scope of the probe's Entra token (``None``: the key alone)."""
        return self._tokens.scope if self._tokens is not None else None

    def describe(self) -> list[str]:
        token = f" and Authorization: Bearer <token for {self.token_scope}>" if self._tokens else ""
        return [f"GET {url}{PROBE_PATH} with {self.header_name}: <new key>{token}" for url in self.urls]

    def _headers(self, key: str) -> dict[str, str]:
        """The probe's headers (never logged: they hold the key, and the token)."""
        if self._tokens is None:
            return {self.header_name: key}
        from azure.core.exceptions import ClientAuthenticationError

        try:
            token = self._tokens.token()
        except ClientAuthenticationError as exc:
            raise CredentialError(
                f"no Entra token for {self._tokens.scope} ({ENV_TOKEN_SCOPE}) for the gateway probe: "
                f"{type(exc).__name__}: {exc.message}"
            ) from None
        return {self.header_name: key, "Authorization": f"Bearer {token}"}

    def accepts(self, url: str, key: str) -> bool | None:
        """True (2xx), False (APIM refused the key: not yet) or None (no answer); raises
        :class:`GatewayProbeError` for any other answer."""
        import httpx2

        from .._refusal import classify

        try:
            response = self._client.get(f"{url}{PROBE_PATH}", headers=self._headers(key))
        except httpx2.HTTPError as exc:
            log.info("gateway probe of %s: no answer (%s)", url, type(exc).__name__)
            return None
        status = response.status_code
        if 200 <= status < 300:
            return True
        kind = classify(status, response.headers, response.content)
        if kind == "key":
            return False
        log.warning("gateway probe of %s%s: %s (%s)", url, PROBE_PATH, status, kind or "not a refusal")
        if kind == "token" and self._tokens is None:
            raise GatewayProbeError(url, status, _NEEDS_ENTRA, hint=_HOW_TO_ADD_ENTRA)
        if kind == "token":
            raise GatewayProbeError(url, status, _ENTRA_REFUSED, hint=_HOW_TO_FIX_ENTRA)
        raise GatewayProbeError(url, status, _why(status))

    def close(self) -> None:
        self._client.close()
