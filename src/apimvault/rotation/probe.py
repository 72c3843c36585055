"""The gateway probe: does a gateway URL accept a key? (``GET <url>/openai/v1/models``, no tokens.)"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .model import PROBE_PATH

log = logging.getLogger("apimvault.rotation")


class GatewayProbe:
    """Asks each gateway URL whether it accepts a key: ``GET <url>/openai/v1/models`` with the key in
    ``header_name``. The gateway authenticates the call like any call of the API; listing models costs no
    tokens. APIM's key 401 (``WWW-Authenticate: AzureApiManagementKey`` or its "subscription key" body)
    means "not (yet) accepted"; any other answer means accepted. Connection errors and 5xx are "unknown"
    and retried. TLS is verified as by any httpx2 client; the key is sent to nothing but these URLs.
    """

    def __init__(self, urls: Sequence[str], *, header_name: str | None = None, timeout: float = 10.0) -> None:
        import os

        import httpx2

        from .._base import DEFAULT_HEADER, ENV_HEADER, check_header_name

        self.urls = tuple(urls)
        self.header_name = check_header_name(
            header_name or os.environ.get(ENV_HEADER, "").strip() or DEFAULT_HEADER
        )
        self._client = httpx2.Client(timeout=timeout, follow_redirects=False)

    def describe(self) -> list[str]:
        return [f"GET {url}{PROBE_PATH} with {self.header_name}: <new key>" for url in self.urls]

    def accepts(self, url: str, key: str) -> bool | None:
        """True (accepted), False (APIM refused the key) or None (no answer we can judge)."""
        import httpx2

        from .._auth import is_apim_key_rejection

        try:
            response = self._client.get(f"{url}{PROBE_PATH}", headers={self.header_name: key})
        except httpx2.HTTPError as exc:
            log.info("gateway probe of %s: no answer (%s)", url, type(exc).__name__)
            return None
        if response.status_code == 401:
            return not is_apim_key_rejection(response.status_code, response.headers, response.content)
        if response.status_code >= 500:
            log.info("gateway probe of %s: %s", url, response.status_code)
            return None
        return True

    def close(self) -> None:
        self._client.close()
