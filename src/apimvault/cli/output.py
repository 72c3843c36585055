"""Exit codes, the error-to-exit-code mapping and the command output (human lines or one JSON document)."""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any

from .._redact import redact_text
from ..exceptions import (
    AccessDeniedError,
    ConfigurationError,
    CredentialError,
    InvalidSecretValueError,
    KeyUnavailableError,
    RotationError,
    SecretDisabledError,
    SecretExpiredError,
    SecretNotFoundError,
    SecretNotYetValidError,
    VaultUnavailableError,
)

# ------------------------------------------------------------------------------------------ exit codes

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_CREDENTIAL = 3
EXIT_VAULT_UNREACHABLE = 4
EXIT_ACCESS_DENIED = 5
EXIT_SECRET_MISSING = 6
EXIT_SECRET_UNUSABLE = 7
EXIT_KEY_REJECTED = 8
EXIT_APIM_UNREACHABLE = 9
EXIT_ROTATION = 10
EXIT_REQUEST_FAILED = 11
EXIT_VAULT_REFUSED = 12
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_FAILED: "failed: drill requests failed or clients did not converge, a check of `local --check` "
    "failed, or a confirmation was declined / impossible without --yes",
    EXIT_CONFIG: "configuration or usage error (missing/invalid environment variable or argument)",
    EXIT_CREDENTIAL: "no token: no credential in DefaultAzureCredential's chain worked, or the token was "
    "refused (401)",
    EXIT_VAULT_UNREACHABLE: "Key Vault unreachable or failing (timeout, connection error, 5xx, 429)",
    EXIT_ACCESS_DENIED: "access denied (403): the identity lacks the Key Vault role on the secret",
    EXIT_SECRET_MISSING: "secret not found (404)",
    EXIT_SECRET_UNUSABLE: "secret unusable: disabled, expired, not yet valid, or not a valid key value",
    EXIT_KEY_REJECTED: "APIM rejected the key (401/403): revoked, regenerated or suspended subscription",
    EXIT_APIM_UNREACHABLE: "APIM gateway unreachable or failing (connection error, timeout, 5xx)",
    EXIT_ROTATION: "rotation refused or failed (inconsistent CredentialId/ProviderAddress, ARM error)",
    EXIT_REQUEST_FAILED: "APIM accepted the key but the request failed (deployment not found, 4xx)",
    EXIT_VAULT_REFUSED: "Key Vault refused the request for good (another 4xx, e.g. 400 BadParameter)",
    EXIT_INTERRUPTED: 'interrupted (Ctrl-C); with --json the document says "interrupted": true',
}


def exit_code_table() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())


def request_failure(exc: BaseException, deployment: str) -> str:
    """``"<type>: <text>"``, naming the deployment when Azure OpenAI (behind APIM) answered 404."""
    message = f"{type(exc).__name__}: {exc}"
    if getattr(exc, "status_code", None) == 404 and type(exc).__module__.startswith("openai"):
        api_version = os.environ.get("OPENAI_API_VERSION", "").strip() or "<unset>"
        message += (
            f" (deployment {deployment!r} not found: check --deployment / APIMVAULT_DEPLOYMENT, "
            f"OPENAI_API_VERSION={api_version} and the API path of AZURE_OPENAI_ENDPOINT)"
        )
    return message


def exit_code_for(exc: BaseException) -> int:
    """The exit code of an error (see :data:`EXIT_CODES`)."""
    if isinstance(exc, ConfigurationError):
        return EXIT_CONFIG
    if isinstance(exc, CredentialError):
        return EXIT_CREDENTIAL
    if isinstance(exc, VaultUnavailableError):
        return EXIT_VAULT_UNREACHABLE
    if isinstance(exc, AccessDeniedError):
        return EXIT_ACCESS_DENIED
    if isinstance(exc, SecretNotFoundError):
        return EXIT_SECRET_MISSING
    if isinstance(
        exc, SecretDisabledError | SecretExpiredError | SecretNotYetValidError | InvalidSecretValueError
    ):
        return EXIT_SECRET_UNUSABLE
    if isinstance(exc, KeyUnavailableError):  # none of the above: a failing vault, or a refusal for good
        return EXIT_VAULT_REFUSED if exc.permanent else EXIT_VAULT_UNREACHABLE
    if isinstance(exc, RotationError):
        return EXIT_ROTATION
    module = type(exc).__module__
    if module.startswith("openai"):
        import openai

        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            return EXIT_KEY_REJECTED
        if isinstance(exc, openai.APIConnectionError):
            return EXIT_APIM_UNREACHABLE
        if isinstance(exc, openai.APIStatusError):
            return EXIT_APIM_UNREACHABLE if exc.status_code >= 500 else EXIT_REQUEST_FAILED
    if module.startswith("azure.core") or module.startswith("azure.identity"):
        from azure.core.exceptions import ClientAuthenticationError

        if isinstance(exc, ClientAuthenticationError):
            return EXIT_CREDENTIAL
    return EXIT_FAILED


# -------------------------------------------------------------------------------------------- output


class Output:
    """Human lines on stdout (errors on stderr), or one JSON document with ``--json``."""

    def __init__(self, as_json: bool, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> None:
        self.json = as_json
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr

    # Everything printed goes through redact_text: no key or token the process holds (nor any JWT) is ever
    # shown, also when an endpoint echoes request headers into an error message.

    def line(self, text: str = "") -> None:
        if not self.json:
            print(redact_text(text), file=self.stdout, flush=True)

    def note(self, text: str) -> None:
        """Progress/information (stdout); with ``--json`` nothing: what matters goes into the document."""
        if not self.json:
            print(redact_text(text), file=self.stdout, flush=True)

    def write(self, text: str) -> None:
        """Raw text on stdout (a streamed reply), without a newline."""
        self.stdout.write(redact_text(text))
        self.stdout.flush()

    def error(self, text: str) -> None:
        print(redact_text(f"apimvault: {text}"), file=self.stderr, flush=True)

    def document(self, doc: dict[str, Any]) -> None:
        if self.json:
            text = json.dumps(doc, indent=2, sort_keys=False, default=str)
            print(redact_text(text), file=self.stdout, flush=True)


def fail(
    out: Output, exc: BaseException, doc: dict[str, Any] | None = None, *, message: str | None = None
) -> int:
    """Print the error once (``message``, default ``"<type>: <text>"``) and return its exit code."""
    if isinstance(exc, BrokenPipeError):  # stdout is gone: main() ends quietly
        raise exc
    code = exit_code_for(exc)
    message = message or f"{type(exc).__name__}: {exc}"
    out.error(message)
    if out.json:
        out.document({**(doc or {}), "ok": False, "exit_code": code, "error": message})
    return code
