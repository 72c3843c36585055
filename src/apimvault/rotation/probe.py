"""The gateway probe: does a gateway URL accept a key? (``GET <url>/openai/v1/models``, no tokens.)

The rule (issue 19): only a 2xx is "accepted"; APIM's key 401 is "not yet"; anything else (404, 3xx, 400,
403, another 401, 5xx) is a :class:`GatewayProbeError` that stops the rotation, because APIM matches the
route before it checks the key: a path the API does not route answers 404 for any key, so it proves
nothing. Every probe opens a fresh connection, so that the load balancer in front of a gateway's units
picks a unit per probe (a kept-alive connection would ask the same unit every time).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..exceptions import RotationError
from .model import PROBE_PATH

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

    def __init__(self, url: str, status: int, why: str) -> None:
        super().__init__(
            f"gateway probe GET {url}{PROBE_PATH} answered {status}: {why}. Only a 2xx counts as accepted "
            f"and APIM's subscription-key 401 as not yet. {_HOW_TO_ROUTE}",
            permanent=True,
        )
        self.url = url
        self.status = status


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
    ``header_name``. The gateway authenticates the call like any call of the API; listing models costs no
    tokens. :meth:`accepts` gives True (2xx), False (APIM's key 401) or None (no answer: connection
    error, timeout); any other answer raises :class:`GatewayProbeError`. TLS is verified as by any httpx2
    client; the key is sent to nothing but these URLs, and never across a redirect.
    """

    def __init__(self, urls: Sequence[str], *, header_name: str | None = None, timeout: float = 10.0) -> None:
        import os

        import httpx2

        from .._settings import DEFAULT_HEADER, ENV_HEADER, check_header_name

        self.urls = tuple(urls)
        self.header_name = check_header_name(
            header_name or os.environ.get(ENV_HEADER, "").strip() or DEFAULT_HEADER
        )
        self._client = httpx2.Client(
            timeout=timeout, follow_redirects=False, limits=httpx2.Limits(max_keepalive_connections=0)
        )

    def describe(self) -> list[str]:
        return [f"GET {url}{PROBE_PATH} with {self.header_name}: <new key>" for url in self.urls]

    def accepts(self, url: str, key: str) -> bool | None:
        """True (2xx), False (APIM refused the key: not yet) or None (no answer); raises
        :class:`GatewayProbeError` for any other answer."""
        import httpx2

        from .._auth import is_apim_key_rejection

        try:
            response = self._client.get(f"{url}{PROBE_PATH}", headers={self.header_name: key})
        except httpx2.HTTPError as exc:
            log.info("gateway probe of %s: no answer (%s)", url, type(exc).__name__)
            return None
        status = response.status_code
        if 200 <= status < 300:
            return True
        if status == 401 and is_apim_key_rejection(status, response.headers, response.content):
            return False
        log.warning("gateway probe of %s%s: %s", url, PROBE_PATH, status)
        raise GatewayProbeError(url, status, _why(status))

    def close(self) -> None:
        self._client.close()
