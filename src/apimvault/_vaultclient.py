"""The ``SecretClient`` a provider reads from: built so that it never logs a secret, or checked when given.

azure-core's ``NetworkTraceLoggingPolicy`` (switched on by ``logging_enable=True``, an ordinary Azure SDK
debugging switch) logs every response body, and a GetSecret body *is* the key; it also logs request
headers unredacted, Key Vault's bearer token included. Filters cannot catch this reliably (a filter on
logger ``azure`` does not see records of its children, and no filter knows a value before it is
accepted). So the fix is at the source:

* a client the provider builds gets :class:`RedactedNetworkTraceLoggingPolicy` in place of azure-core's:
  with ``logging_enable`` it still traces method, URL, status and allow-listed headers, never a body nor a
  credential header;
* a client passed in (``secret_client=``) is inspected and refused with :class:`ConfigurationError` when
  its pipeline would log bodies, and with :class:`InsecureTransportError` when it does not verify TLS or
  Key Vault's challenge resource (a pipeline that cannot be inspected is refused too: it cannot be
  shown safe).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import ClientAuthenticationError
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import HttpLoggingPolicy, NetworkTraceLoggingPolicy, SansIOHTTPPolicy

from .exceptions import ConfigurationError, InsecureTransportError

if TYPE_CHECKING:
    pass

__all__ = [
    "AsyncDeadlineCredential",
    "DeadlineCredential",
    "RedactedNetworkTraceLoggingPolicy",
    "check_secret_client",
    "checked",
    "secret_client_kwargs",
    "token_deadline",
]

#: The logger azure-core's network trace writes to, so ``logging_enable`` output shows up where it would.
_LOGGER = logging.getLogger("azure.core.pipeline.policies._universal")
_NOT_LOGGED = "<not logged by apimvault: Key Vault bodies carry secret values>"
#: ``client_kwargs`` that would replace the redacting policy.
_REFUSED_KWARGS = ("policies", "logging_policy")
_KEYVAULT_HEADERS = frozenset(
    {"x-ms-keyvault-network-info", "x-ms-keyvault-region", "x-ms-keyvault-service-version"}
)


class RedactedNetworkTraceLoggingPolicy(SansIOHTTPPolicy[Any, Any]):
    """Drop-in for azure-core's ``NetworkTraceLoggingPolicy`` that never logs a body or a secret header.

    Honours ``logging_enable`` (client-wide or per call) like the original and logs at DEBUG on the same
    logger, but header values outside azure-core's ``HttpLoggingPolicy`` allow-list show as ``REDACTED``
    and bodies are never read or written.
    """

    def __init__(self, logging_enable: bool = False, **kwargs: Any) -> None:
        self.enable_http_logger = logging_enable

    @staticmethod
    def _headers(headers: Mapping[str, str]) -> str:
        allowed = {h.lower() for h in HttpLoggingPolicy.DEFAULT_HEADERS_ALLOWLIST} | _KEYVAULT_HEADERS
        return "".join(
            f"\n    {name!r}: {value if name.lower() in allowed else 'REDACTED'!r}"
            for name, value in headers.items()
        )

    def on_request(self, request: PipelineRequest[Any]) -> None:
        enabled = request.context.options.pop("logging_enable", self.enable_http_logger)
        request.context["logging_enable"] = enabled
        if enabled and _LOGGER.isEnabledFor(logging.DEBUG):
            http = request.http_request
            _LOGGER.debug(
                "Request URL: %r\nRequest method: %r\nRequest headers:%s\nRequest body: %s",
                http.url.split("?", 1)[0],
                http.method,
                self._headers(http.headers),
                _NOT_LOGGED,
            )

    def on_response(self, request: PipelineRequest[Any], response: PipelineResponse[Any, Any]) -> None:
        if response.context.get("logging_enable") and _LOGGER.isEnabledFor(logging.DEBUG):
            http = response.http_response
            _LOGGER.debug(
                "Response status: %r\nResponse headers:%s\nResponse content: %s",
                http.status_code,
                self._headers(http.headers),
                _NOT_LOGGED,
            )


def token_deadline(credential_kwargs: Mapping[str, Any]) -> float:
    """The documented bound for one token request of the provider's own credential, in seconds: every
    attempt (``retry_total`` + 1) connecting and reading once (``connection_timeout`` + ``read_timeout``).
    With the defaults 2 x (5 + 10) = 30 s."""
    try:
        attempts = int(credential_kwargs.get("retry_total", 1)) + 1
        per_try = float(credential_kwargs.get("connection_timeout", 5)) + float(
            credential_kwargs.get("read_timeout", 10)
        )
    except (TypeError, ValueError):
        raise ConfigurationError(
            "credential_kwargs retry_total / connection_timeout / read_timeout must be numbers"
        ) from None
    if not attempts >= 1 or not per_try > 0 or per_try == float("inf"):
        raise ConfigurationError("credential_kwargs timeouts must be positive and finite")
    return attempts * per_try


def _too_slow(seconds: float) -> ClientAuthenticationError:
    return ClientAuthenticationError(
        f"the identity endpoint did not complete the token request within {seconds:.0f} s (a deadline for "
        "the whole request, not per read: it may be answering too slowly)"
    )


class DeadlineCredential:
    """The provider's own ``DefaultAzureCredential`` as its SecretClient sees it: each token request has a
    deadline for the whole request. azure-core's ``read_timeout`` bounds each socket read only, so an
    identity endpoint that trickles its answer a byte at a time held a caller indefinitely; now the caller
    gets ``ClientAuthenticationError`` (so :class:`~apimvault.CredentialError`) at the deadline while the
    request finishes (or fails) in a daemon thread."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self._inner = inner
        self._seconds = seconds

    def _bounded(self, call: Callable[[], Any]) -> Any:
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = call()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, name="apimvault-token", daemon=True).start()
        if not done.wait(self._seconds):
            raise _too_slow(self._seconds)
        if "error" in box:
            raise box["error"]
        return box["value"]

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        return self._bounded(lambda: self._inner.get_token(*scopes, **kwargs))

    def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        return self._bounded(lambda: self._inner.get_token_info(*scopes, options=options))

    def close(self) -> None:
        """The provider closes the credential it owns itself."""


class AsyncDeadlineCredential:
    """The aio twin of :class:`DeadlineCredential` (``asyncio.timeout``: the request is cancelled)."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self._inner = inner
        self._seconds = seconds

    async def _bounded(self, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            async with asyncio.timeout(self._seconds):
                return await call()
        except TimeoutError:
            raise _too_slow(self._seconds) from None

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        return await self._bounded(lambda: self._inner.get_token(*scopes, **kwargs))

    async def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        return await self._bounded(lambda: self._inner.get_token_info(*scopes, options=options))

    async def close(self) -> None:
        """The provider closes the credential it owns itself."""

    async def __aenter__(self) -> AsyncDeadlineCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def secret_client_kwargs(
    defaults: Mapping[str, Any], client_kwargs: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``SecretClient`` keyword arguments: ``defaults``, the caller's ``client_kwargs``, and the redacting
    network-trace policy in place of azure-core's (``client_kwargs`` that would replace it are refused)."""
    given = dict(client_kwargs or {})
    refused = [k for k in _REFUSED_KWARGS if k in given]
    if refused:
        raise ConfigurationError(
            f"client_kwargs {', '.join(refused)} would swap out the SecretClient policy that keeps secret "
            "values out of logs; apimvault builds that pipeline itself (pass secret_client= to use your own)"
        )
    kwargs = {**defaults, **given}
    kwargs["logging_policy"] = RedactedNetworkTraceLoggingPolicy(**kwargs)
    return kwargs


def _pipeline_parts(client: Any) -> tuple[list[Any], Any] | None:
    """The policies and transport of a ``SecretClient``'s pipeline, or ``None`` if they cannot be found.

    azure-core exposes no public accessor; this reads the generated client's ``PipelineClient``. The
    tests pin it for the installed SDK versions (sync and aio).
    """
    pipeline = getattr(getattr(getattr(client, "_client", None), "_client", None), "_pipeline", None)
    policies = getattr(pipeline, "_impl_policies", None)
    if not isinstance(policies, list):
        return None
    return [getattr(p, "_policy", p) for p in policies], getattr(pipeline, "_transport", None)


def check_secret_client(client: Any, *, where: str, built: bool = False) -> None:
    """Refuse a ``SecretClient`` whose pipeline would log secret bodies or skip TLS / challenge checks.

    ``built``: the provider built it from ``client_kwargs``, so its pipeline holds the redacting policy and
    no azure-core ``NetworkTraceLoggingPolicy`` at all: one passed in ``per_call_policies`` /
    ``per_retry_policies`` would log bodies whenever ``logging_enable`` is on (it reads the flag the
    redacting policy sets for the request), so it is refused whatever its own flag says.
    """
    parts = _pipeline_parts(client)
    if parts is None:
        raise ConfigurationError(
            f"secret_client for {where}: cannot inspect its pipeline to prove it never logs secret values; "
            "let the provider build it (credential= and client_kwargs=)"
        )
    policies, transport = parts
    if built and any(isinstance(p, NetworkTraceLoggingPolicy) for p in policies):
        raise ConfigurationError(
            f"client_kwargs for {where} add azure-core's NetworkTraceLoggingPolicy (per_call_policies / "
            "per_retry_policies): it logs every Key Vault response body, i.e. the key. Leave it out; "
            "logging_enable=True in client_kwargs traces requests without bodies"
        )
    if any(isinstance(p, NetworkTraceLoggingPolicy) and p.enable_http_logger for p in policies):
        raise ConfigurationError(
            f"secret_client for {where} has logging_enable=True: azure-core would log every Key Vault "
            "response body, i.e. the key. Pass logging_enable in client_kwargs instead (the provider's own "
            "client traces requests without bodies)"
        )
    if any(getattr(p, "_verify_challenge_resource", True) is False for p in policies):
        raise InsecureTransportError(
            f"secret_client for {where} has verify_challenge_resource=False: its Key Vault token could go "
            "to any server naming itself a vault"
        )
    config = getattr(transport, "connection_config", None)
    if getattr(config, "verify", True) is False:
        raise InsecureTransportError(
            f"secret_client for {where} has connection_verify=False: TLS certificates are not verified"
        )


def checked(client: Any, owned: Iterable[Any], *, where: str) -> None:
    """:func:`check_secret_client` for a client the provider built: on refusal, close what it made."""
    try:
        check_secret_client(client, where=where, built=True)
    except ConfigurationError:
        for resource in owned:
            close = resource.close()
            if close is not None:  # aio: nothing was opened yet, so the coroutine is simply dropped
                close.close()
        raise
