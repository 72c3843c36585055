"""Every exception apimvault raises. None of them ever carries the subscription key.

The tree::

    ApimVaultError
    ├── ConfigurationError (also ValueError)     bad arguments or environment: fix the code or the env
    │   ├── InsecureTransportError                 the key would travel over plain http
    │   └── KeyInHeadersError                      a static key in ``default_headers`` (the provider sets it)
    ├── RotationError                              a dual-key rotation could not be done safely
    ├── QuotaExceededError (also openai.PermissionDeniedError)  APIM's quota (quota-by-key or the
    │                                              azure-openai-token-limit quota) is spent until renewal
    └── KeyUnavailableError                        no usable key could be produced
        ├── VaultUnavailableError                  transient: Key Vault or the identity endpoint failed
        │                                          (timeout, connection error, 5xx, 429) and no cached
        │                                          key is still within its staleness bound
        ├── CredentialError                        the credential produced no token (which credential, why)
        ├── AccessDeniedError                      403: the identity lacks a role on the secret
        ├── SecretNotFoundError                    404: no such secret (or version) in the vault
        ├── SecretDisabledError                    the secret (version) is disabled
        ├── SecretExpiredError                     past the secret's ``expires_on``
        ├── SecretNotYetValidError                 before the secret's ``not_before``
        └── InvalidSecretValueError                the value cannot be a header (empty, control chars...)

``KeyUnavailableError.permanent`` tells whether retrying without a change on the Azure side can help.
The Azure SDK's original exception is chained (``raise ... from``) and is safe to log: Key Vault error
bodies never contain secret values.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

__all__ = [
    "AccessDeniedError",
    "ApimVaultError",
    "ConfigurationError",
    "CredentialError",
    "InsecureTransportError",
    "InvalidSecretValueError",
    "KeyInHeadersError",
    "KeyUnavailableError",
    "QuotaExceededError",
    "RotationError",
    "SecretDisabledError",
    "SecretExpiredError",
    "SecretNotFoundError",
    "SecretNotYetValidError",
    "VaultUnavailableError",
]


class ApimVaultError(Exception):
    """Base class of every apimvault error."""


class ConfigurationError(ApimVaultError, ValueError):
    """Invalid arguments or environment (missing ``AZURE_KEYVAULT_URL``, a bad TTL, ...)."""


class InsecureTransportError(ConfigurationError):
    """The key would be sent over plain http; pass ``allow_insecure_http=True`` only for loopback tests."""


class KeyInHeadersError(ConfigurationError):
    """``default_headers`` carries a subscription-key header: a static key there would be sent as it is,
    never rotated, beside the provider's. Remove it: the client sets the provider's current key itself."""


class RotationError(ApimVaultError):
    """A dual-key rotation could not be done safely (inconsistent tags, unknown key, ARM refused or failed).

    ``permanent`` says whether retrying without a change on the Azure side can help.
    """

    def __init__(self, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


class KeyUnavailableError(ApimVaultError):
    """No usable subscription key. ``secret`` names the secret (``vault_url/secrets/name``)."""

    permanent: bool = True

    def __init__(self, message: str, *, secret: str | None = None) -> None:
        super().__init__(message)
        self.secret = secret


class VaultUnavailableError(KeyUnavailableError):
    """Key Vault or the identity endpoint failed transiently and no cached key is usable any more."""

    permanent = False

    def __init__(self, message: str, *, secret: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, secret=secret)
        self.retry_after = retry_after


class CredentialError(KeyUnavailableError):
    """The credential could not produce a token for Key Vault (which credential and why is in the message)."""

    permanent = False


class AccessDeniedError(KeyUnavailableError):
    """Key Vault answered 403: the identity lacks ``Key Vault Secrets User`` (or more) on the secret."""


class SecretNotFoundError(KeyUnavailableError):
    """Key Vault answered 404 for the secret or the pinned version."""


class SecretDisabledError(KeyUnavailableError):
    """The secret version is disabled (``enabled=false``)."""


class SecretExpiredError(KeyUnavailableError):
    """The secret version is past its ``expires_on``; Key Vault still serves it, apimvault does not."""


class SecretNotYetValidError(KeyUnavailableError):
    """The secret version's ``not_before`` is in the future."""


class InvalidSecretValueError(KeyUnavailableError):
    """The secret value cannot be sent as a header (empty, control characters, non-ASCII, too long)."""


if TYPE_CHECKING:
    import httpx2
    import openai

    class QuotaExceededError(ApimVaultError, openai.PermissionDeniedError):
        policy: str
        renewal_s: float | None
        gateway_message: str

        def __init__(
            self,
            message: str,
            *,
            response: httpx2.Response,
            body: object,
            policy: str,
            renewal_s: float | None,
            gateway_message: str,
        ) -> None: ...

else:

    def __getattr__(name: str) -> type:
        # QuotaExceededError subclasses openai's PermissionDeniedError; it is built on first use so that
        # importing this module does not import openai.
        if name == "QuotaExceededError":
            return _quota_error_class()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    @functools.cache
    def _quota_error_class() -> type:
        import openai

        class QuotaExceededError(ApimVaultError, openai.PermissionDeniedError):
            """APIM refused the call with its quota 403: the subscription's quota is spent until it renews.

            Raised by the client's auth flow instead of openai's plain ``PermissionDeniedError`` (which it
            also is, so existing ``except openai.PermissionDeniedError`` still works), with no key refresh
            and no re-send: neither a new key nor a retry can help before the renewal. openai passes an
            ``OpenAIError`` raised while sending straight through, without its retries.

            * ``policy``: ``"quota-by-key"`` (call volume) or ``"azure-openai-token-limit"`` (token quota);
            * ``renewal_s``: seconds until the quota renews (APIM's ``Retry-After``, else the time span in
              its message), or ``None`` if APIM gave neither;
            * ``gateway_message``: APIM's own message. The message never carries the key.
            """

            def __init__(
                self,
                message: str,
                *,
                response: Any,
                body: object,
                policy: str,
                renewal_s: float | None,
                gateway_message: str,
            ) -> None:
                openai.PermissionDeniedError.__init__(self, message, response=response, body=body)
                self.policy = policy
                self.renewal_s = renewal_s
                self.gateway_message = gateway_message

        QuotaExceededError.__module__ = __name__
        QuotaExceededError.__qualname__ = "QuotaExceededError"
        globals()["QuotaExceededError"] = QuotaExceededError
        return QuotaExceededError
