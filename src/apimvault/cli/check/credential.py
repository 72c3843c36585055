"""``apimvault check``'s credential probe: which credential of ``DefaultAzureCredential`` gets a Key Vault
token, and for which identity (the token's claims only, never the token)."""

from __future__ import annotations

import re
from typing import Any

from ..._redact import watch_value
from ..config import env_var
from ..identity import capture_identity_log, describe_identity, identity_of, jwt_claims, vault_scope
from ..output import EXIT_CREDENTIAL
from .run import CheckRun, Step

__all__ = ["credential_step", "credential_used"]


def credential_step(check: CheckRun) -> int | None:
    """Which credential of DefaultAzureCredential gets a Key Vault token, for which identity (claims only)."""
    from azure.core.exceptions import ClientAuthenticationError
    from azure.identity import DefaultAzureCredential

    from ..._settings import DEFAULT_CREDENTIAL_KWARGS  # the providers' bounds on the identity endpoint

    credential = check.credential = DefaultAzureCredential(**DEFAULT_CREDENTIAL_KWARGS)
    check.resources.callback(credential.close)
    chain = [type(c).__name__ for c in getattr(credential, "credentials", ())]
    with capture_identity_log() as log:
        try:
            token = credential.get_token(vault_scope(check.vault_url)).token
            watch_value(token)  # redaction: never printed, whatever echoes it
        except ClientAuthenticationError as exc:
            lines = [line.strip() for line in str(exc.message).splitlines() if line.strip()][:10]
            check.record(
                Step(
                    "credential",
                    False,
                    "DefaultAzureCredential got no token for Key Vault: " + " | ".join(lines),
                    {"chain": chain, "token_credentials": env_var("AZURE_TOKEN_CREDENTIALS")},
                )
            )
            return EXIT_CREDENTIAL
    used = credential_used(credential, vault_scope(check.vault_url), log.messages)
    identity = check.identity = identity_of(jwt_claims(token))
    check.report["credential"] = {"chain": chain, "used": used, "identity": identity}
    check.record(
        Step(
            "credential",
            True,
            f"DefaultAzureCredential -> {used} (chain: {', '.join(chain) or '?'}); identity "
            f"{describe_identity(identity)}",
            {"used": used, "chain": chain, "identity": identity},
        )
    )
    return None


def credential_used(credential: Any, scope: str, log_messages: list[str]) -> str:
    """The name of the credential of a ``DefaultAzureCredential`` chain that got the token.

    azure-identity says it in an INFO record (``... acquired a token from ManagedIdentityCredential``);
    without one (logging disabled), each credential of the chain (its public ``credentials``) is asked in
    the chain's order, as the chain asks them: the first that answers is the one the chain used."""
    used = None
    for message in log_messages:
        found = re.search(r"acquired a token from (\w+)", message)
        if found:
            used = found.group(1)
    if used is not None:
        return used
    for member in getattr(credential, "credentials", ()):
        try:
            watch_value(member.get_token(scope).token)  # redaction: never printed
        except Exception:  # noqa: S112 - the chain, too, moves on after any error of a member
            continue
        return type(member).__name__
    return "unknown"
