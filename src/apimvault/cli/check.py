"""``apimvault check``: walk the request path and stop at the first broken link."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import re
import time
from collections.abc import Callable
from typing import Any

from .._redact import watch_value
from .._settings import EXPIRY_WARNING_WINDOW
from ..exceptions import (
    AccessDeniedError,
    ConfigurationError,
    CredentialError,
    KeyUnavailableError,
    SecretNotFoundError,
    VaultUnavailableError,
)
from . import check_token
from .config import env_var, header_name, missing_variables, vault_url_variable
from .identity import capture_identity_log, describe_identity, identity_of, jwt_claims, vault_scope
from .output import (
    EXIT_ACCESS_DENIED,
    EXIT_APIM_UNREACHABLE,
    EXIT_CODES,
    EXIT_CONFIG,
    EXIT_CREDENTIAL,
    EXIT_KEY_REJECTED,
    EXIT_OK,
    EXIT_REQUEST_FAILED,
    EXIT_SECRET_MISSING,
    EXIT_SECRET_UNUSABLE,
    EXIT_VAULT_UNREACHABLE,
    Output,
    exit_code_for,
)


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------- check


@dataclasses.dataclass
class _Step:
    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


def _forbidden_scope(exc: BaseException) -> str | None:
    """The ``Resource: '...'`` line of Key Vault's 403 body (the scope to grant the role on)."""
    cause: BaseException | None = exc
    while cause is not None:
        response = getattr(cause, "response", None)
        if response is not None:
            with contextlib.suppress(Exception):
                text = response.text()
                match = re.search(r"Resource:\s*'([^']+)'", text) or re.search(
                    r'Resource:\s*\\?"([^"\\]+)', text
                )
                if match:
                    return match.group(1)
        cause = cause.__cause__
    return None


class _Check:
    """One run of ``apimvault check``: the steps taken so far, the report, and what later steps need."""

    def __init__(self, args: argparse.Namespace, out: Output, resources: contextlib.ExitStack) -> None:
        self.args = args
        self.out = out
        self.resources = resources  # closed when the run ends, whatever step it stopped at
        self.steps: list[_Step] = []
        self.warnings: list[dict[str, Any]] = []
        self.report: dict[str, Any] = {}
        self.vault_url = self.secret_name = self.endpoint = self.deployment = ""
        self.credential: Any = None
        self.identity: dict[str, str] = {}
        self.provider: Any = None
        self.key: Any = None
        self.token_scope: str | None = None

    def record(self, step: _Step) -> None:
        self.steps.append(step)
        mark = "ok  " if step.ok else "FAIL"
        self.out.line(f"{mark} {step.name:<10} {step.detail}")

    def warn(self, step: str, code: str, message: str, **data: Any) -> None:
        """A problem that does not break the path yet: a ``WARN`` line, and an entry of ``warnings`` in
        ``--json``; the exit code stays that of the path (0 when it works), as for the other warnings."""
        self.warnings.append({"step": step, "code": code, "message": message, **data})
        self.out.line(f"WARN {step:<10} {message}")

    def finish(self, code: int) -> int:
        ok = code == EXIT_OK
        steps = [dataclasses.asdict(s) for s in self.steps]
        doc = {"ok": ok, "exit_code": code, "steps": steps, "warnings": self.warnings, **self.report}
        self.out.document(doc)
        if ok:
            self.out.line("OK: the whole path works")
        else:
            self.out.line(f"FAILED at {self.steps[-1].name} (exit {code}: {EXIT_CODES[code]})")
        return code


def _config_step(check: _Check) -> int | None:
    """Every variable set and valid (an https gateway too) before any network step, all problems at once."""
    args = check.args
    vault_var = vault_url_variable()
    vault_url, secret_name = env_var(vault_var), env_var("APIMVAULT_SECRET_NAME")
    endpoint = args.endpoint or env_var("AZURE_OPENAI_ENDPOINT")
    deployment = args.deployment or env_var("APIMVAULT_DEPLOYMENT")
    missing = missing_variables(
        (
            (vault_var, vault_url),
            ("APIMVAULT_SECRET_NAME", secret_name),
            ("AZURE_OPENAI_ENDPOINT (or --endpoint)", endpoint),
            ("APIMVAULT_DEPLOYMENT (or --deployment)", deployment),
            ("OPENAI_API_VERSION", env_var("OPENAI_API_VERSION")),
        )
    )
    check.report["config"] = {
        "vault_url": vault_url,
        "secret_name": secret_name,
        "endpoint": endpoint,
        "deployment": deployment,
        "api_version": env_var("OPENAI_API_VERSION"),
    }
    if missing:
        check.record(_Step("config", False, f"not set: {', '.join(missing)}"))
        return EXIT_CONFIG
    assert vault_url and secret_name and endpoint and deployment
    from .._validation import validate_endpoint, validate_secret_name, validate_vault_url

    given_url: str = vault_url
    problems: list[str] = []
    checks: list[Callable[[], object]] = [
        lambda: validate_vault_url(given_url),
        lambda: validate_secret_name(secret_name),
        lambda: validate_endpoint(endpoint, allow_insecure_http=False),
    ]
    for validate in checks:
        try:
            validate()
        except ConfigurationError as exc:
            problems.append(str(exc))
    if problems:
        check.record(_Step("config", False, "; ".join(problems)))
        return EXIT_CONFIG
    check.vault_url = validate_vault_url(vault_url)
    check.secret_name, check.endpoint, check.deployment = secret_name, endpoint, deployment
    check.record(
        _Step(
            "config",
            True,
            f"secret {check.vault_url}/secrets/{secret_name}, APIM {endpoint}, deployment {deployment}",
        )
    )
    return None


def _credential_step(check: _Check) -> int | None:
    """Which credential of DefaultAzureCredential gets a Key Vault token, for which identity (claims only)."""
    from azure.core.exceptions import ClientAuthenticationError
    from azure.identity import DefaultAzureCredential

    from .._settings import DEFAULT_CREDENTIAL_KWARGS  # the providers' bounds on the identity endpoint

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
                _Step(
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
        _Step(
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


def _secret_step(check: _Check) -> int | None:
    """Key Vault reachable, the identity allowed to read the secret, the secret usable (three steps)."""
    from .. import CachePolicy, SubscriptionKeyProvider

    vault_url, secret_name, identity = check.vault_url, check.secret_name, check.identity
    provider = check.provider = SubscriptionKeyProvider(
        vault_url, secret_name, credential=check.credential, policy=CachePolicy(), header_name=header_name()
    )
    check.resources.callback(provider.close)
    record = check.record
    try:
        key = check.key = provider.get_key()
    except VaultUnavailableError as exc:
        record(_Step("vault", False, f"Key Vault unreachable: {exc}"))
        return EXIT_VAULT_UNREACHABLE
    except CredentialError as exc:
        record(_Step("vault", True, f"{vault_url} answered"))
        record(_Step("access", False, f"Key Vault refused the token: {exc}"))
        return EXIT_CREDENTIAL
    except AccessDeniedError as exc:
        record(_Step("vault", True, f"{vault_url} answered"))
        scope_id = _forbidden_scope(exc) or f"<vault resource id>/secrets/{secret_name}"
        principal = identity.get("oid", "<object id>")
        record(
            _Step(
                "access",
                False,
                f"403: identity {describe_identity(identity)} may not read secret {secret_name}. "
                f"Grant it the role 'Key Vault Secrets User' on scope '{scope_id}': "
                "az role assignment create --role 'Key Vault Secrets User' "
                f"--assignee-object-id {principal} --assignee-principal-type ServicePrincipal "
                f"--scope '{scope_id}'. Or the secret name is wrong: a role scoped to one secret "
                "makes Key Vault answer 403 for any other name, so check "
                f"APIMVAULT_SECRET_NAME={secret_name}",
                {"role": "Key Vault Secrets User", "scope": scope_id, "principal": principal},
            )
        )
        return EXIT_ACCESS_DENIED
    except SecretNotFoundError as exc:
        record(_Step("vault", True, f"{vault_url} answered"))
        record(_Step("access", True, "no 403"))
        record(_Step("secret", False, str(exc)))
        return EXIT_SECRET_MISSING
    except KeyUnavailableError as exc:
        code = exit_code_for(exc)
        record(_Step("vault", True, f"{vault_url} answered"))
        if code == EXIT_SECRET_UNUSABLE:
            record(_Step("access", True, "the identity may read the secret"))
            record(_Step("secret", False, str(exc)))
        else:
            record(_Step("secret", False, f"{type(exc).__name__}: {exc}"))
        return code
    _secret_found(check, key)
    return None


def _secret_found(check: _Check, key: Any) -> None:
    """Record the vault, access and secret steps of a key read: what the secret is, never its value."""
    record = check.record
    now = time.time()
    record(_Step("vault", True, f"{check.vault_url} answered"))
    record(_Step("access", True, "the identity may read the secret (Key Vault Secrets User or more)"))
    secret_info = {
        "version": key.version,
        "fingerprint": key.fingerprint,
        "credential_id": key.credential_id,
        "enabled": True,
        "created_on": _iso(key.created_on),
        "age_s": round(now - key.created_on, 1) if key.created_on else None,
        "expires_on": _iso(key.expires_on),
        "tags": {k: v for k, v in key.tags.items()},
    }
    check.report["secret"] = secret_info
    expiry = "no expiry"
    if key.expires_on is not None:
        days = (key.expires_on - now) / 86400
        expiry = f"expires in {days:.1f} days" + (" (rotation due: under 30 days)" if days < 30 else "")
    warn = "" if key.credential_id else "; WARNING: no CredentialId tag, `apimvault rotate` needs it"
    record(
        _Step(
            "secret",
            True,
            f"enabled, version {key.version}, CredentialId={key.credential_id}, fingerprint "
            f"{key.fingerprint}, age {_age(now - key.created_on) if key.created_on else '?'}, "
            f"{expiry}{warn}",
            secret_info,
        )
    )
    left = None if key.expires_on is None else key.expires_on - now
    if left is not None and left <= EXPIRY_WARNING_WINDOW:
        # The providers stop serving the key at expires_on (an outage): a rotation is stuck or missing.
        check.warn(
            "secret",
            "expires_soon",
            f"the key expires in {left / 86400:.1f} days ({_iso(key.expires_on)}), under "
            f"{EXPIRY_WARNING_WINDOW / 86400:.0f} days: clients stop using it then. Rotate now "
            "(`apimvault rotate`) and find out why the rotation did not run",
            expires_in_s=round(left, 1),
            expires_on=_iso(key.expires_on),
        )


def _token_step(check: _Check) -> int | None:
    """With ``APIMVAULT_TOKEN_SCOPE``: the Entra token a key-plus-token client would send (claims only)."""
    check.token_scope = env_var(check_token.ENV_TOKEN_SCOPE)
    if not check.token_scope:
        return None
    used = str(check.report.get("credential", {}).get("used", "unknown"))
    ok = check_token.token_step(check.credential, check.token_scope, used, check.record, _Step, check.report)
    return None if ok else EXIT_CREDENTIAL


def _apim_step(check: _Check) -> int | None:
    """APIM accepts the key (and the token, with ``APIMVAULT_TOKEN_SCOPE``): a 1-token chat."""
    return _check_apim(
        check.provider,
        check.key,
        check.endpoint,
        check.deployment,
        check.record,
        check.report,
        check.token_scope,
    )


STEPS: tuple[Callable[[_Check], int | None], ...] = (
    _config_step,
    _credential_step,
    _secret_step,
    _token_step,
    _apim_step,
)
"""The links of the request path, in order; a step returns an exit code to stop at, or None to go on."""


def cmd_check(args: argparse.Namespace, out: Output) -> int:
    out.line("apimvault check")
    with contextlib.ExitStack() as resources:
        check = _Check(args, out, resources)
        for step in STEPS:
            try:
                code = step(check)
            except ConfigurationError as exc:  # e.g. a header name the core refuses
                check.record(_Step("config", False, str(exc)))
                code = EXIT_CONFIG
            if code is not None:
                return check.finish(code)
        return check.finish(EXIT_OK)


def _check_apim(
    provider: Any,
    key: Any,
    endpoint: str,
    deployment: str,
    record: Callable[[_Step], None],
    report: dict[str, Any],
    token_scope: str | None = None,
) -> int:
    import openai

    from .. import create_azure_openai

    client = create_azure_openai(
        provider, azure_endpoint=endpoint, max_retries=0, timeout=20, token_scope=token_scope
    )
    started = time.perf_counter()
    try:
        client.chat.completions.create(
            model=deployment, messages=[{"role": "user", "content": "ping"}], max_tokens=1
        )
    except openai.AuthenticationError as exc:
        if token_scope and (refused := check_token.describe_token_refusal(exc)):
            record(_Step("apim", False, refused))
            return EXIT_KEY_REJECTED
        record(
            _Step(
                "apim",
                False,
                f"APIM rejected the key (401, revoked key?): version {key.version} "
                f"fingerprint {key.fingerprint} "
                f"is not a valid key of an active subscription: {_api_message(exc).rstrip('.')}. The key was "
                "regenerated without updating the vault: store the current key, or run `apimvault rotate`",
            )
        )
        return EXIT_KEY_REJECTED
    except openai.PermissionDeniedError as exc:
        record(
            _Step(
                "apim", False, f"APIM refused the request (403; subscription suspended?): {_api_message(exc)}"
            )
        )
        return EXIT_KEY_REJECTED
    except openai.RateLimitError as exc:
        record(_Step("apim", True, f"key accepted (APIM throttled the probe: {_api_message(exc)})"))
        return EXIT_OK
    except openai.APIConnectionError as exc:
        record(_Step("apim", False, f"APIM gateway {endpoint} unreachable: {type(exc).__name__}: {exc}"))
        return EXIT_APIM_UNREACHABLE
    except openai.APIStatusError as exc:
        if exc.status_code >= 500:
            record(_Step("apim", False, f"APIM/Azure OpenAI answered {exc.status_code}: {_api_message(exc)}"))
            return EXIT_APIM_UNREACHABLE
        record(
            _Step(
                "apim",
                False,
                f"key accepted, but the request failed ({exc.status_code}): {_api_message(exc)} "
                f"(deployment {deployment!r}, OPENAI_API_VERSION {env_var('OPENAI_API_VERSION')})",
            )
        )
        return EXIT_REQUEST_FAILED
    finally:
        client.close()
    ms = (time.perf_counter() - started) * 1000
    report["apim"] = {"endpoint": endpoint, "deployment": deployment, "latency_ms": round(ms, 1)}
    what = "key and token accepted" if token_scope else "key accepted"
    record(_Step("apim", True, f"{what} by {endpoint} (1-token chat on {deployment}, {ms:.0f} ms)"))
    return EXIT_OK


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        message = body.get("message") or (body.get("error") or {}).get("message")
        if isinstance(message, str):
            return message
    return str(getattr(exc, "message", exc))
