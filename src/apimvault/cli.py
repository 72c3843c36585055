"""The ``apimvault`` command: ``local``, ``check``, ``chat``, ``rotate`` and the rotation ``drill``.

The module imports only the standard library at load time; Azure SDKs, openai and the local stack are
imported inside the commands. That matters for the embedded local Azure: aiohttp (imported by openai and
the async Azure SDK) reads ``SSL_CERT_FILE`` once, when it is imported, so a command that starts an
embedded stack creates the stack's CA and points ``SSL_CERT_FILE`` at it *before* importing them.

No command prints a key or a token: keys appear as their version and 8-hex fingerprint.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .exceptions import (
    AccessDeniedError,
    ApimVaultError,
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

if TYPE_CHECKING:  # pragma: no cover
    from .local._common import LocalCA

__all__ = ["EXIT_CODES", "main"]

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
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


def _exit_code_table() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())


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
    if isinstance(exc, KeyUnavailableError):
        return EXIT_VAULT_UNREACHABLE
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

    def line(self, text: str = "") -> None:
        if not self.json:
            print(text, file=self.stdout, flush=True)

    def note(self, text: str) -> None:
        """Progress/information that must not pollute ``--json`` output: stderr in JSON mode."""
        print(text, file=self.stderr if self.json else self.stdout, flush=True)

    def error(self, text: str) -> None:
        print(f"apimvault: {text}", file=self.stderr, flush=True)

    def document(self, doc: dict[str, Any]) -> None:
        if self.json:
            print(json.dumps(doc, indent=2, sort_keys=False, default=str), file=self.stdout, flush=True)


def _fail(out: Output, exc: BaseException, doc: dict[str, Any] | None = None) -> int:
    code = exit_code_for(exc)
    message = f"{type(exc).__name__}: {exc}"
    out.error(message)
    if out.json:
        out.document({**(doc or {}), "ok": False, "exit_code": code, "error": message})
    return code


# ------------------------------------------------------------------------------------ small helpers


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def header_name() -> str:
    """The header APIM reads the key from (``APIMVAULT_HEADER_NAME``, default Ocp-Apim-Subscription-Key)."""
    return _env("APIMVAULT_HEADER_NAME") or "Ocp-Apim-Subscription-Key"


def _is_loopback_url(url: str | None) -> bool:
    if not url:
        return True
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, *not verified* (only to show which identity it belongs to)."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


_IDENTITY_CLAIMS = (
    "appid",
    "azp",
    "oid",
    "tid",
    "upn",
    "unique_name",
    "preferred_username",
    "xms_mi_name",
    "idtyp",
)


def _identity_of(claims: dict[str, Any]) -> dict[str, str]:
    return {k: str(claims[k]) for k in _IDENTITY_CLAIMS if claims.get(k)}


def _describe_identity(identity: dict[str, str]) -> str:
    parts = []
    name = identity.get("upn") or identity.get("preferred_username") or identity.get("xms_mi_name")
    if name:
        parts.append(name)
    for claim in ("appid", "azp", "oid", "tid"):
        if claim in identity:
            parts.append(f"{claim}={identity[claim]}")
    return " ".join(parts) or "(no identity claims in the token)"


def _vault_scope(vault_url: str) -> str:
    host = (urlsplit(vault_url).hostname or "").lower()
    for suffix in ("vault.azure.cn", "vault.usgovcloudapi.net", "vault.microsoftazure.de", "vault.azure.net"):
        if host.endswith("." + suffix):
            return f"https://{suffix}/.default"
    return "https://vault.azure.net/.default"


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


# ------------------------------------------------------------------------------- embedded local Azure


def prepare_embedded_ca(directory: Path) -> LocalCA:
    """Create an embedded stack's CA and trust it process-wide, before aiohttp is imported.

    Raises :class:`ConfigurationError` when aiohttp was already imported with another trust store (then
    the async Azure SDK could not verify the stack's certificates).
    """
    from .local._common import LocalCA

    already = "aiohttp" in sys.modules
    ca = LocalCA(directory)
    if already and os.environ.get("SSL_CERT_FILE") != str(ca.ca_path):
        raise ConfigurationError(
            "aiohttp is already imported in this process, so it cannot trust a new embedded stack's CA; "
            "run `apimvault local` in another terminal and point this command at it (set -a; "
            ". .apimvault-local.env; set +a), or start the embedded stack before importing openai/azure aio"
        )
    os.environ["SSL_CERT_FILE"] = str(ca.ca_path)
    os.environ["REQUESTS_CA_BUNDLE"] = str(ca.ca_path)
    return ca


@contextlib.contextmanager
def embedded_stack(*, need_async: bool) -> Iterator[Any]:
    """Start an embedded :class:`~apimvault.local.LocalAzure` with its environment applied."""
    from .local._common import temporary_environ

    directory = Path(tempfile.mkdtemp(prefix="apimvault-local-"))
    # Entered with today's values, so leaving it restores the two trust variables set below.
    trust = {k: os.environ.get(k) for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")}
    with temporary_environ(trust):
        try:
            if need_async:
                ca = prepare_embedded_ca(directory)
            else:  # sync SDK clients read SSL_CERT_FILE / REQUESTS_CA_BUNDLE when they are created
                from .local._common import LocalCA

                ca = LocalCA(directory)
                os.environ["SSL_CERT_FILE"] = str(ca.ca_path)
                os.environ["REQUESTS_CA_BUNDLE"] = str(ca.ca_path)
            from .local import LocalAzure

            azure = LocalAzure(directory=directory, ca=ca)
            # Requests still in flight when the stack stops (a background refresh, a client that timed out)
            # make uvicorn and asyncio log tracebacks about cancelled tasks; they are not news.
            quiet = {name: logging.getLogger(name).level for name in ("uvicorn.error", "asyncio")}
            try:
                with azure, azure.env():
                    try:
                        yield azure
                    finally:
                        for name in quiet:
                            logging.getLogger(name).setLevel(logging.CRITICAL)
            finally:
                for name, level in quiet.items():
                    logging.getLogger(name).setLevel(level)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------------------------- local


def cmd_local(args: argparse.Namespace, out: Output) -> int:
    if args.check:
        return _local_check(out)
    env_file = Path(args.env_file)
    stop = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _stop)
    try:
        with embedded_stack(need_async=False) as azure:
            azure.write_env_file(env_file)
            services = {name: svc.url for name, svc in azure.services.items()}
            services["admin"] = azure.admin.url
            if out.json:
                print(
                    json.dumps({"event": "ready", "env_file": str(env_file), "services": services}),
                    file=out.stdout,
                    flush=True,
                )
            else:
                out.line("local Azure is running on 127.0.0.1 (TLS, per-stack CA):")
                for name, url in services.items():
                    out.line(f"  {name:<9} {url}")
                out.line(f"  secret    {azure.environ()['APIMVAULT_SECRET_NAME']} (CredentialId=primary)")
                out.line(f"environment written to {env_file} (endpoints only, never a key); use it with")
                out.line(f"  set -a; . {env_file}; set +a; apimvault check")
                out.line("Ctrl-C (or SIGTERM) stops the stack.")
            while not stop.wait(0.5):
                pass
            with contextlib.suppress(OSError):
                env_file.unlink()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if out.json:
        print(json.dumps({"event": "stopped"}), file=out.stdout, flush=True)
    else:
        out.line("local Azure stopped; environment file removed.")
    return EXIT_OK


def _local_check(out: Output) -> int:
    results: list[dict[str, Any]] = []

    def step(name: str, fn: Callable[[], str]) -> None:
        started = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as exc:
            detail, ok = f"{type(exc).__name__}: {exc}".splitlines()[0][:300], False
        ms = (time.perf_counter() - started) * 1000
        results.append({"service": name, "ok": ok, "detail": detail, "ms": round(ms, 1)})
        out.line(f"{'ok  ' if ok else 'FAIL'} {name:<9} {detail} ({ms:.0f} ms)")

    with embedded_stack(need_async=False) as azure:
        from azure.identity import DefaultAzureCredential
        from azure.keyvault.secrets import SecretClient

        from . import SubscriptionKeyProvider, create_azure_openai, fingerprint
        from .local.admin import AdminClient
        from .local.stack import APIM_SERVICE, APIM_SUBSCRIPTION, ARM_SUBSCRIPTION, RESOURCE_GROUP

        env = azure.environ()
        vault_fp: dict[str, str] = {}

        def identity() -> str:
            with DefaultAzureCredential() as credential:
                token = credential.get_token("https://vault.azure.net/.default").token
            who = _identity_of(_jwt_claims(token))
            return f"DefaultAzureCredential -> ManagedIdentityCredential: {_describe_identity(who)}"

        def keyvault() -> str:
            with DefaultAzureCredential() as credential, SecretClient(azure.vault_url, credential) as client:
                secret = client.get_secret(env["APIMVAULT_SECRET_NAME"])
            vault_fp["fp"] = fingerprint(secret.value or "")
            tags = secret.properties.tags or {}
            return (
                f"SecretClient read {secret.name} version {secret.properties.version} "
                f"(CredentialId={tags.get('CredentialId')}, fingerprint {vault_fp['fp']})"
            )

        def arm() -> str:
            from azure.mgmt.apimanagement import ApiManagementClient

            officer = env["APIMVAULT_OFFICER_CLIENT_ID"]
            with DefaultAzureCredential(managed_identity_client_id=officer) as credential:
                client = ApiManagementClient(credential, ARM_SUBSCRIPTION, base_url=azure.arm_url)
                try:
                    keys = client.subscription.list_secrets(RESOURCE_GROUP, APIM_SERVICE, APIM_SUBSCRIPTION)
                finally:
                    client.close()
            match = (
                "matches the vault"
                if fingerprint(keys.primary_key or "") == vault_fp.get("fp")
                else "MISMATCH"
            )
            return f"ApiManagementClient listSecrets {APIM_SUBSCRIPTION}: primary key {match}"

        def gateway() -> str:
            with SubscriptionKeyProvider.from_env() as provider:
                client = create_azure_openai(provider, max_retries=0, timeout=15)
                try:
                    reply = client.chat.completions.create(
                        model=env["APIMVAULT_DEPLOYMENT"], messages=[{"role": "user", "content": "ping"}]
                    )
                finally:
                    client.close()
            used = azure.gateway.recent()[-1]
            content = (reply.choices[0].message.content or "").strip()
            deployment = env["APIMVAULT_DEPLOYMENT"]
            return f"AzureOpenAI chat via APIM ({used.slot} key) -> {deployment}: {content[:40]!r}"

        def admin() -> str:
            with AdminClient(azure.admin.url, azure.ca_path) as client:
                names = [s["name"] for s in client.services()]
            return f"admin API lists {', '.join(names)}"

        for name, fn in (
            ("identity", identity),
            ("keyvault", keyvault),
            ("arm", arm),
            ("gateway", gateway),
            ("admin", admin),
        ):
            step(name, fn)
    ok = all(r["ok"] for r in results)
    out.document({"ok": ok, "services": results})
    out.line("local Azure: all services answer" if ok else "local Azure: some services failed")
    return EXIT_OK if ok else EXIT_FAILED


# --------------------------------------------------------------------------------------------- check


@dataclasses.dataclass
class _Step:
    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


class _CredentialLog(logging.Handler):
    """Collects azure-identity's INFO/WARNING records (which credential of the chain produced a token)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _capture_identity_log() -> Iterator[_CredentialLog]:
    logger = logging.getLogger("azure.identity")
    handler = _CredentialLog()
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


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


def cmd_check(args: argparse.Namespace, out: Output) -> int:
    steps: list[_Step] = []
    report: dict[str, Any] = {}

    def record(step: _Step) -> None:
        steps.append(step)
        mark = "ok  " if step.ok else "FAIL"
        out.line(f"{mark} {step.name:<10} {step.detail}")

    def finish(code: int) -> int:
        ok = code == EXIT_OK
        out.document({"ok": ok, "exit_code": code, "steps": [dataclasses.asdict(s) for s in steps], **report})
        if ok:
            out.line("OK: the whole path works")
        else:
            out.line(f"FAILED at {steps[-1].name} (exit {code}: {EXIT_CODES[code]})")
        return code

    out.line("apimvault check")
    # 1. configuration ------------------------------------------------------------------------------
    vault_url, secret_name = _env("AZURE_KEYVAULT_URL"), _env("APIMVAULT_SECRET_NAME")
    endpoint = args.endpoint or _env("AZURE_OPENAI_ENDPOINT")
    deployment = args.deployment or _env("APIMVAULT_DEPLOYMENT")
    missing = [
        name
        for name, value in (
            ("AZURE_KEYVAULT_URL", vault_url),
            ("APIMVAULT_SECRET_NAME", secret_name),
            ("AZURE_OPENAI_ENDPOINT", endpoint),
            ("APIMVAULT_DEPLOYMENT (or --deployment)", deployment),
            ("OPENAI_API_VERSION", _env("OPENAI_API_VERSION")),
        )
        if not value
    ]
    report["config"] = {
        "vault_url": vault_url,
        "secret_name": secret_name,
        "endpoint": endpoint,
        "deployment": deployment,
        "api_version": _env("OPENAI_API_VERSION"),
    }
    if missing:
        record(_Step("config", False, f"not set: {', '.join(missing)}"))
        return finish(EXIT_CONFIG)
    assert vault_url and secret_name and endpoint and deployment
    try:
        from ._fetch import validate_secret_name, validate_vault_url

        vault_url = validate_vault_url(vault_url)
        validate_secret_name(secret_name)
    except ConfigurationError as exc:
        record(_Step("config", False, str(exc)))
        return finish(EXIT_CONFIG)
    record(
        _Step(
            "config",
            True,
            f"secret {vault_url}/secrets/{secret_name}, APIM {endpoint}, deployment {deployment}",
        )
    )

    # 2. credential ---------------------------------------------------------------------------------
    from azure.core.exceptions import ClientAuthenticationError
    from azure.identity import DefaultAzureCredential

    credential = DefaultAzureCredential()
    try:
        chain = [type(c).__name__ for c in getattr(credential, "credentials", ())]
        scope = _vault_scope(vault_url)
        with _capture_identity_log() as log:
            try:
                token = credential.get_token(scope).token
            except ClientAuthenticationError as exc:
                lines = [line.strip() for line in str(exc.message).splitlines() if line.strip()][:10]
                record(
                    _Step(
                        "credential",
                        False,
                        "DefaultAzureCredential got no token for Key Vault: " + " | ".join(lines),
                        {"chain": chain, "token_credentials": _env("AZURE_TOKEN_CREDENTIALS")},
                    )
                )
                return finish(EXIT_CREDENTIAL)
        used = None
        for message in log.messages:
            found = re.search(r"acquired a token from (\w+)", message)
            if found:
                used = found.group(1)
        if used is None:
            successful = getattr(credential, "_successful_credential", None)
            used = type(successful).__name__ if successful is not None else "unknown"
        identity = _identity_of(_jwt_claims(token))
        report["credential"] = {"chain": chain, "used": used, "identity": identity}
        record(
            _Step(
                "credential",
                True,
                f"DefaultAzureCredential -> {used} (chain: {', '.join(chain) or '?'}); identity "
                f"{_describe_identity(identity)}",
                {"used": used, "chain": chain, "identity": identity},
            )
        )

        # 3. vault, access, secret ------------------------------------------------------------------
        from . import CachePolicy, SubscriptionKeyProvider

        provider = SubscriptionKeyProvider(
            vault_url, secret_name, credential=credential, policy=CachePolicy(), header_name=header_name()
        )
        try:
            try:
                key = provider.get_key()
            except VaultUnavailableError as exc:
                record(_Step("vault", False, f"Key Vault unreachable: {exc}"))
                return finish(EXIT_VAULT_UNREACHABLE)
            except CredentialError as exc:
                record(_Step("vault", True, f"{vault_url} answered"))
                record(_Step("access", False, f"Key Vault refused the token: {exc}"))
                return finish(EXIT_CREDENTIAL)
            except AccessDeniedError as exc:
                record(_Step("vault", True, f"{vault_url} answered"))
                scope_id = _forbidden_scope(exc) or f"<vault resource id>/secrets/{secret_name}"
                principal = identity.get("oid", "<object id>")
                record(
                    _Step(
                        "access",
                        False,
                        f"403: identity {_describe_identity(identity)} may not read secret {secret_name}. "
                        f"Grant it the role 'Key Vault Secrets User' on scope '{scope_id}': "
                        "az role assignment create --role 'Key Vault Secrets User' "
                        f"--assignee-object-id {principal} --assignee-principal-type ServicePrincipal "
                        f"--scope '{scope_id}'",
                        {"role": "Key Vault Secrets User", "scope": scope_id, "principal": principal},
                    )
                )
                return finish(EXIT_ACCESS_DENIED)
            except SecretNotFoundError as exc:
                record(_Step("vault", True, f"{vault_url} answered"))
                record(_Step("access", True, "no 403"))
                record(_Step("secret", False, str(exc)))
                return finish(EXIT_SECRET_MISSING)
            except KeyUnavailableError as exc:
                code = exit_code_for(exc)
                record(_Step("vault", True, f"{vault_url} answered"))
                if code == EXIT_SECRET_UNUSABLE:
                    record(_Step("access", True, "the identity may read the secret"))
                    record(_Step("secret", False, str(exc)))
                else:
                    record(_Step("secret", False, f"{type(exc).__name__}: {exc}"))
                return finish(code)
            now = time.time()
            record(_Step("vault", True, f"{vault_url} answered"))
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
            report["secret"] = secret_info
            expiry = "no expiry"
            if key.expires_on is not None:
                days = (key.expires_on - now) / 86400
                expiry = f"expires in {days:.1f} days" + (
                    " (rotation due: under 30 days)" if days < 30 else ""
                )
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

            # 4. APIM accepts the key ---------------------------------------------------------------
            return finish(_check_apim(provider, key, endpoint, deployment, record, report))
        finally:
            provider.close()
    except ConfigurationError as exc:
        record(_Step("config", False, str(exc)))
        return finish(EXIT_CONFIG)
    finally:
        credential.close()


def _check_apim(
    provider: Any,
    key: Any,
    endpoint: str,
    deployment: str,
    record: Callable[[_Step], None],
    report: dict[str, Any],
) -> int:
    import openai

    from . import create_azure_openai

    client = create_azure_openai(provider, azure_endpoint=endpoint, max_retries=0, timeout=20)
    started = time.perf_counter()
    try:
        client.chat.completions.create(
            model=deployment, messages=[{"role": "user", "content": "ping"}], max_tokens=1
        )
    except openai.AuthenticationError as exc:
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
                f"(deployment {deployment!r}, OPENAI_API_VERSION {_env('OPENAI_API_VERSION')})",
            )
        )
        return EXIT_REQUEST_FAILED
    finally:
        client.close()
    ms = (time.perf_counter() - started) * 1000
    report["apim"] = {"endpoint": endpoint, "deployment": deployment, "latency_ms": round(ms, 1)}
    record(_Step("apim", True, f"key accepted by {endpoint} (1-token chat on {deployment}, {ms:.0f} ms)"))
    return EXIT_OK


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        message = body.get("message") or (body.get("error") or {}).get("message")
        if isinstance(message, str):
            return message
    return str(getattr(exc, "message", exc))


# ---------------------------------------------------------------------------------------------- chat


def cmd_chat(args: argparse.Namespace, out: Output) -> int:
    deployment = args.deployment or _env("APIMVAULT_DEPLOYMENT")
    if not deployment:
        return _fail(out, ConfigurationError("set APIMVAULT_DEPLOYMENT or pass --deployment"))
    try:
        from . import SubscriptionKeyProvider, create_azure_openai

        with SubscriptionKeyProvider.from_env() as provider:
            key = provider.get_key()
            client = create_azure_openai(provider, max_retries=args.retries, timeout=args.timeout)
            started = time.perf_counter()
            parts: list[str] = []
            finish_reason = None
            try:
                stream = client.chat.completions.create(
                    model=deployment, messages=[{"role": "user", "content": args.prompt}], stream=True
                )
                with stream:
                    for chunk in stream:
                        for choice in chunk.choices:
                            text = choice.delta.content or ""
                            if text:
                                parts.append(text)
                                if not out.json:
                                    out.stdout.write(text)
                                    out.stdout.flush()
                            finish_reason = choice.finish_reason or finish_reason
            finally:
                client.close()
            ms = (time.perf_counter() - started) * 1000
            used = provider.current() or key
    except Exception as exc:
        if not out.json:
            out.stdout.write("\n")
        return _fail(out, exc, {"deployment": deployment})
    if not out.json:
        out.stdout.write("\n")
        print(
            f"[{deployment}, key version {used.version} fingerprint {used.fingerprint}, {ms:.0f} ms]",
            file=out.stderr,
            flush=True,
        )
    out.document(
        {
            "ok": True,
            "deployment": deployment,
            "content": "".join(parts),
            "finish_reason": finish_reason,
            "key_version": used.version,
            "fingerprint": used.fingerprint,
            "latency_ms": round(ms, 1),
        }
    )
    return EXIT_OK


# -------------------------------------------------------------------------------------------- rotate


def _rotation_credential(client_id: str | None) -> Any:
    from azure.identity import DefaultAzureCredential

    return (
        DefaultAzureCredential(managed_identity_client_id=client_id)
        if client_id
        else DefaultAzureCredential()
    )


def rotator_client_id(explicit: str | None) -> str | None:
    return explicit or _env("APIMVAULT_ROTATOR_CLIENT_ID") or _env("APIMVAULT_OFFICER_CLIENT_ID")


def confirm(out: Output, question: str, target: str) -> bool:
    """Ask on the terminal; without one, refuse (the caller says to pass --yes)."""
    stdin = sys.stdin
    if stdin is None or not stdin.isatty():
        out.error(f"refusing to regenerate APIM keys of {target} without --yes (no terminal to confirm on)")
        return False
    print(f"{question} [y/N] ", end="", file=out.stderr, flush=True)
    answer = stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        out.error("not confirmed; nothing changed")
        return False
    return True


def cmd_rotate(args: argparse.Namespace, out: Output) -> int:
    from .rotation import plan_rotation, rotate, rotate_from_event

    arm_endpoint = _env("APIMVAULT_ARM_ENDPOINT")
    apim_subscription_id = args.apim_subscription_id or _env("APIMVAULT_APIM_SUBSCRIPTION_ID")
    credential = None
    try:
        credential = _rotation_credential(rotator_client_id(args.client_id))
        if args.event is not None:
            raw = sys.stdin.read() if args.event == "-" else Path(args.event).read_text(encoding="utf-8")
            from ._events import parse_secret_events

            events = parse_secret_events(raw)
            for event in events:
                out.note(f"event {event.event_type} for {event.secret_name} version {event.version}")
            vault = _env("AZURE_KEYVAULT_URL") or next((e.secret_id for e in events if e.secret_id), None)
            target = vault or "the event's vault"
            needs_yes = not args.yes and not (_is_loopback_url(vault) and _is_loopback_url(arm_endpoint))
            if needs_yes and args.event == "-":  # stdin carried the event: nobody to ask
                out.error(f"refusing to regenerate APIM keys of {target} without --yes")
                return _declined(out)
            if needs_yes and not confirm(out, f"Rotate the key of {target} if the event is current?", target):
                return _declined(out)
            result = rotate_from_event(
                raw,
                credential=credential,
                arm_endpoint=arm_endpoint,
                apim_subscription_id=apim_subscription_id,
                propagation_timeout=args.propagation_timeout,
            )
            return _rotated(out, result, None)

        vault_url = args.vault_url or _env("AZURE_KEYVAULT_URL")
        secret_name = args.secret or _env("APIMVAULT_SECRET_NAME")
        if not vault_url or not secret_name:
            raise ConfigurationError(
                "set AZURE_KEYVAULT_URL and APIMVAULT_SECRET_NAME (or --vault-url/--secret)"
            )
        plan = plan_rotation(
            vault_url=vault_url,
            secret_name=secret_name,
            apim_subscription_id=apim_subscription_id,
            arm_endpoint=arm_endpoint,
            credential=credential,
            propagation_timeout=args.propagation_timeout,
        )
        out.note("rotation plan:")
        for line in plan.describe():
            out.note(f"  {line}")
        loopback = _is_loopback_url(plan.vault_url) and _is_loopback_url(plan.arm_endpoint)
        if (
            not args.yes
            and not loopback
            and not confirm(out, "Regenerate and store the key?", plan.vault_url)
        ):
            return _declined(out, plan.as_dict())
        result = rotate(
            vault_url=plan.vault_url,
            secret_name=plan.secret_name,
            apim_subscription_id=plan.apim_subscription,
            arm_endpoint=plan.arm_endpoint,
            credential=credential,
            expected_version=plan.current_version,
            gateway_urls=plan.gateway_urls,
            propagation_timeout=plan.propagation_timeout,
        )
        return _rotated(out, result, plan.as_dict())
    except Exception as exc:
        return _fail(out, exc)
    finally:
        if credential is not None:
            credential.close()


def _declined(out: Output, plan: dict[str, Any] | None = None) -> int:
    out.document({"ok": False, "exit_code": EXIT_FAILED, "declined": True, "plan": plan})
    return EXIT_FAILED


def _rotated(out: Output, result: Any, plan: dict[str, Any] | None) -> int:
    if result.skipped:
        out.line(f"skipped: {result.reason}")
    else:
        previous = "primary" if result.credential_id == "secondary" else "secondary"
        out.line(
            f"rotated {result.secret}: version {result.old_version} ({previous}) -> {result.new_version} "
            f"({result.credential_id}, fingerprint {result.fingerprint}, "
            f"expires {result.expires_on or 'never'})"
        )
        out.line(
            f"the gateway accepted the new key {result.propagation_seconds:.1f} s after it was regenerated; "
            f"the vault's latest version {result.verified_version} is live"
        )
        out.line(
            f"the {previous} key stays valid until the next rotation; clients pick up the new version at "
            "their next refresh, or at once on a 401 or an Event Grid push"
        )
    out.document({"ok": True, "exit_code": EXIT_OK, "result": result.as_dict(), "plan": plan})
    return EXIT_OK


# --------------------------------------------------------------------------------------------- drill


def cmd_drill(args: argparse.Namespace, out: Output) -> int:
    from . import _drill

    return _drill.run(args, out)


# -------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apimvault",
        description="Azure OpenAI through APIM with the subscription key in Key Vault: diagnose, chat, "
        "rotate, and drill a rotation under live traffic. Keys are never printed (version + fingerprint).",
        epilog=_exit_code_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log apimvault's INFO messages to stderr"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=description,
            epilog=_exit_code_table(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--json", action="store_true", help="machine-readable output (one JSON document)")
        return p

    p = add(
        "local",
        "run the embedded local Azure in the foreground",
        "Start Key Vault, managed identity, APIM (gateway + ARM) and Azure OpenAI on loopback TLS, seed "
        "an APIM subscription and the secret apim-subscription-key, write a dotenv file for SDK clients, "
        "and run until Ctrl-C/SIGTERM. --check starts it, proves each service through the real SDKs, exits.",
    )
    p.add_argument(
        "--env-file", default=".apimvault-local.env", help="dotenv file to write (default %(default)s)"
    )
    p.add_argument("--check", action="store_true", help="start, check every service, stop; exit 0/1")
    p.set_defaults(func=cmd_local)

    p = add(
        "check",
        "walk the request path and stop at the first broken link",
        "Check, in order: configuration; which credential of DefaultAzureCredential gets a token and for "
        "which identity (claims only, never the token); Key Vault reachable; access (a 403 names the role "
        "and scope to grant); the secret (enabled, not expired, version, age, CredentialId, fingerprint); "
        "APIM accepting the key (a 1-token chat). Uses AZURE_KEYVAULT_URL, APIMVAULT_SECRET_NAME, "
        "AZURE_OPENAI_ENDPOINT, OPENAI_API_VERSION, APIMVAULT_DEPLOYMENT.",
    )
    p.add_argument("--deployment", help="Azure OpenAI deployment (default: APIMVAULT_DEPLOYMENT)")
    p.add_argument("--endpoint", help="APIM gateway URL (default: AZURE_OPENAI_ENDPOINT)")
    p.set_defaults(func=cmd_check)

    p = add(
        "chat",
        "one streamed chat completion through the core's client",
        "Send one prompt, stream the answer.",
    )
    p.add_argument("prompt")
    p.add_argument("--deployment", help="Azure OpenAI deployment (default: APIMVAULT_DEPLOYMENT)")
    p.add_argument("--timeout", type=float, default=60.0, help="request timeout in seconds")
    p.add_argument("--retries", type=int, default=2, help="openai's retries on transient errors")
    p.set_defaults(func=cmd_chat)

    p = add(
        "rotate",
        "dual-key rotation of the APIM subscription key",
        "Read the secret's CredentialId, regenerate the OTHER APIM key (ARM), read it back, wait until every "
        "gateway accepts it (probe: GET <gateway>/openai/v1/models, no tokens; gateways from "
        "APIMVAULT_GATEWAY_URLS or AZURE_OPENAI_ENDPOINT), then store it as a new secret version with "
        "CredentialId flipped and expiry now + ValidityPeriodDays, and verify the vault's latest version "
        "is live. The key in use stays valid. Asks before acting on a non-loopback target unless --yes. "
        "Credential: DefaultAzureCredential (managed identity client id from --client-id, "
        "APIMVAULT_ROTATOR_CLIENT_ID or APIMVAULT_OFFICER_CLIENT_ID); needs Key Vault Secrets Officer and "
        "the custom role infra/ defines (apimvault APIM subscription key rotator). "
        "APIMVAULT_APIM_SUBSCRIPTION_ID (or the ProviderAddress tag) names the subscription; "
        "APIMVAULT_ARM_ENDPOINT defaults to https://management.azure.com.",
    )
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument(
        "--event", metavar="FILE|-", help="Event Grid SecretNearExpiry payload: rotate only if current"
    )
    p.add_argument("--vault-url", help="default: AZURE_KEYVAULT_URL")
    p.add_argument("--secret", help="default: APIMVAULT_SECRET_NAME")
    p.add_argument(
        "--apim-subscription-id", help="default: APIMVAULT_APIM_SUBSCRIPTION_ID or the ProviderAddress tag"
    )
    p.add_argument("--client-id", help="managed identity client id of the rotator")
    p.add_argument(
        "--propagation-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to wait for the gateways to accept the new key before giving up without changing "
        "the vault (default: APIMVAULT_PROPAGATION_TIMEOUT or 600)",
    )
    p.set_defaults(func=cmd_rotate)

    p = add(
        "drill",
        "rotation drill under live traffic (embedded local Azure unless AZURE_KEYVAULT_URL is set)",
        "Run chat traffic (threads and asyncio tasks, plain and streaming) through clients built by the core "
        "while rotating the key at least twice, so both APIM keys are regenerated and the key the clients "
        "started with is revoked mid-traffic; report failures, 401s recovered, vault reads, convergence "
        "and latency. Exit 1 if any request failed. Against a non-loopback target it needs --yes.",
    )
    p.add_argument("--concurrency", type=int, default=16, help="workers in total (default %(default)s)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of traffic (default %(default)s)")
    p.add_argument(
        "--clients", type=int, default=4, help="providers/clients the workers share (default %(default)s)"
    )
    p.add_argument(
        "--chaos",
        action="store_true",
        help="add a Key Vault outage, latency spikes, a random gateway propagation delay per unit and a "
        "duplicate, overlapping delivery of a rotation event",
    )
    p.add_argument(
        "--propagation",
        type=float,
        default=None,
        metavar="SECONDS",
        help="local stacks: gateway units accept a regenerated key only after up to this delay "
        "(default 2; 0 turns it off)",
    )
    p.add_argument("--deployment", help="Azure OpenAI deployment (default: APIMVAULT_DEPLOYMENT)")
    p.add_argument("--client-id", help="managed identity client id of the rotator")
    p.add_argument("--yes", action="store_true", help="allow regenerating keys of a non-loopback target")
    p.set_defaults(func=cmd_drill)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``apimvault`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_CONFIG
    out = Output(bool(getattr(args, "json", False)))
    if not args.verbose:  # the commands report errors themselves; keep library warnings off the terminal
        logging.getLogger("apimvault").addHandler(logging.NullHandler())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger("apimvault").addHandler(handler)
        logging.getLogger("apimvault").setLevel(logging.INFO)
    try:
        code: int = args.func(args, out)
    except KeyboardInterrupt:
        out.error("interrupted")
        return EXIT_INTERRUPTED
    except ApimVaultError as exc:
        return _fail(out, exc)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
