"""``apimvault local``: run the embedded local Azure in the foreground, or check every service once."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..exceptions import ConfigurationError
from .embedded import embedded_stack
from .identity import describe_identity, identity_of, jwt_claims
from .output import (
    EXIT_FAILED,
    EXIT_OK,
    Output,
)

# --------------------------------------------------------------------------------------------- local


def add_local_stack_options(p: argparse.ArgumentParser) -> None:
    """The stack's options on ``apimvault local`` (see :class:`apimvault.local.LocalAzure`)."""
    p.add_argument(
        "--api-suffix",
        default="openai",
        metavar="SUFFIX",
        help="URL suffix the gateway serves the Azure OpenAI API under (default %(default)s; '' serves it at "
        "the root: https://<gateway>/deployments/<deployment>/...)",
    )
    p.add_argument(
        "--gateway-units",
        type=int,
        default=2,
        metavar="N",
        help="gateway units behind the one gateway URL, each request balanced to one (default %(default)s)",
    )
    # Default balanced (as real APIM): `rotate` requires K consecutive accepted probes per URL, each on a
    # fresh connection, so it sees a lagging unit behind the shared URL (tests/cli/test_drill_delivery.py).
    p.add_argument(
        "--gateway-routing",
        choices=("balanced", "per-unit"),
        default="balanced",
        help="'balanced': the units share the one gateway URL, one unit per request (as real APIM's units "
        "of a region); 'per-unit': each unit also at <gateway>/<unit> (default %(default)s)",
    )
    p.add_argument(
        "--rotate-as",
        choices=("officer", "rotator"),
        default="officer",
        help="identity `rotate`/`drill` use with the env file: 'rotator' holds exactly infra/'s roles "
        "(infra/roles/rotator.json; sets APIMVAULT_ROTATOR_CLIENT_ID), 'officer' Key Vault Secrets Officer "
        "(default %(default)s)",
    )


def _stack_options(args: argparse.Namespace) -> dict[str, Any]:
    units = getattr(args, "gateway_units", 2)
    if not isinstance(units, int) or not 1 <= units <= 64:
        raise ConfigurationError(f"--gateway-units must be 1 to 64, not {units}")
    try:
        from ..local.apim import normalize_suffix

        suffix = normalize_suffix(getattr(args, "api_suffix", "openai"))
    except ValueError as exc:
        raise ConfigurationError(f"--api-suffix: {exc}") from None
    options: dict[str, Any] = {
        "api_suffix": suffix,
        "rotate_as": getattr(args, "rotate_as", "officer"),
        "gateway_routing": getattr(args, "gateway_routing", "balanced"),
    }
    if units != 2:  # default: the two named units region1, region2
        options["gateway_units"] = units
    return options


def cmd_local(args: argparse.Namespace, out: Output) -> int:
    options = _stack_options(args)
    if args.check:
        return _local_check(out, options)
    env_file = Path(args.env_file)
    with _env_file_lock(env_file):
        return _serve(env_file, out, options)


@contextlib.contextmanager
def _env_file_lock(env_file: Path) -> Iterator[None]:
    """One ``apimvault local`` per environment file: an exclusive lock on ``<env-file>.lock`` next to it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX: no lock
        yield
        return
    lock_path = env_file.with_name(env_file.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as exc:  # a symlink there (never followed), a read-only directory, ...
        raise ConfigurationError(f"cannot create the lock {lock_path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigurationError(
                f"another `apimvault local` is running with --env-file {env_file} (it holds {lock_path}); "
                "stop it first, or give this one another --env-file"
            ) from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock_path.unlink()
    finally:
        os.close(fd)


def _serve(env_file: Path, out: Output, options: dict[str, Any]) -> int:
    stop = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        # SIGHUP: the terminal closed. Stopped like SIGTERM, so the env file and the CA directory go too.
        hup = (signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()
        for sig in (signal.SIGINT, signal.SIGTERM, *hup):
            previous[sig] = signal.signal(sig, _stop)
    try:
        with embedded_stack(need_async=False, **options) as azure:
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
                units = len(azure.apim_state.units)
                out.line(
                    f"  api       {azure.environ()['APIMVAULT_OPENAI_BASE_URL']} (suffix "
                    f"{azure.gateway.api_suffix!r}; {units} gateway units behind one URL)"
                )
                out.line(f"  rotation  runs as {azure.rotation_identity.name} (--rotate-as)")
                out.line(
                    f"environment written to {env_file} (mode 0600): endpoints, the CA, IDENTITY_HEADER "
                    "(the local identity endpoint's credential) and APIMVAULT_ADMIN_TOKEN (the admin "
                    "API's), never the APIM key; use it with"
                )
                out.line(f"  set -a; . {env_file}; set +a; apimvault check")
                out.line("Ctrl-C (or SIGTERM, or closing the terminal) stops the stack.")
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


def _local_check(out: Output, options: dict[str, Any]) -> int:
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

    with embedded_stack(need_async=False, **options) as azure:
        env = azure.environ()
        vault_fp: dict[str, str] = {}
        for name, fn in (
            ("identity", _check_identity),
            ("keyvault", lambda: _check_keyvault(azure, env, vault_fp)),
            ("arm", lambda: _check_arm(azure, env, vault_fp)),
            ("gateway", lambda: _check_gateway(azure, env)),
            ("admin", lambda: _check_admin(azure)),
        ):
            step(name, fn)
    ok = all(r["ok"] for r in results)
    out.document({"ok": ok, "services": results})
    out.line("local Azure: all services answer" if ok else "local Azure: some services failed")
    return EXIT_OK if ok else EXIT_FAILED


# Each check below runs inside the embedded stack (its SDK imports come after the stack trusts its CA).


def _check_identity() -> str:
    from azure.identity import DefaultAzureCredential

    with DefaultAzureCredential() as credential:
        token = credential.get_token("https://vault.azure.net/.default").token
    who = identity_of(jwt_claims(token))
    return f"DefaultAzureCredential -> ManagedIdentityCredential: {describe_identity(who)}"


def _check_keyvault(azure: Any, env: dict[str, str], vault_fp: dict[str, str]) -> str:
    from azure.identity import DefaultAzureCredential
    from azure.keyvault.secrets import SecretClient

    from .. import fingerprint

    with DefaultAzureCredential() as credential, SecretClient(azure.vault_url, credential) as client:
        secret = client.get_secret(env["APIMVAULT_SECRET_NAME"])
    vault_fp["fp"] = fingerprint(secret.value or "")
    tags = secret.properties.tags or {}
    return (
        f"SecretClient read {secret.name} version {secret.properties.version} "
        f"(CredentialId={tags.get('CredentialId')}, fingerprint {vault_fp['fp']})"
    )


def _check_arm(azure: Any, env: dict[str, str], vault_fp: dict[str, str]) -> str:
    from azure.identity import DefaultAzureCredential
    from azure.mgmt.apimanagement import ApiManagementClient

    from .. import fingerprint
    from ..local.stack import APIM_SERVICE, APIM_SUBSCRIPTION, ARM_SUBSCRIPTION, RESOURCE_GROUP

    officer = env["APIMVAULT_OFFICER_CLIENT_ID"]
    with DefaultAzureCredential(managed_identity_client_id=officer) as credential:
        client = ApiManagementClient(credential, ARM_SUBSCRIPTION, base_url=azure.arm_url)
        try:
            keys = client.subscription.list_secrets(RESOURCE_GROUP, APIM_SERVICE, APIM_SUBSCRIPTION)
        finally:
            client.close()
    match = "matches the vault" if fingerprint(keys.primary_key or "") == vault_fp.get("fp") else "MISMATCH"
    return f"ApiManagementClient listSecrets {APIM_SUBSCRIPTION}: primary key {match}"


def _check_gateway(azure: Any, env: dict[str, str]) -> str:
    from .. import SubscriptionKeyProvider, create_azure_openai

    with SubscriptionKeyProvider.from_env() as provider:
        if azure.gateway.api_suffix == "openai":
            client = create_azure_openai(provider, max_retries=0, timeout=15)
        else:  # the API under another suffix: the published base_url pattern, key in a header
            import openai

            client = openai.AzureOpenAI(
                base_url=env["APIMVAULT_OPENAI_BASE_URL"],
                api_key="placeholder",
                api_version=env["OPENAI_API_VERSION"],
                default_headers={"Ocp-Apim-Subscription-Key": provider.get_key().reveal()},
                max_retries=0,
                timeout=15,
            )
        try:
            reply = client.chat.completions.create(
                model=env["APIMVAULT_DEPLOYMENT"], messages=[{"role": "user", "content": "ping"}]
            )
        finally:
            client.close()
    used = azure.gateway.recent()[-1]
    content = (reply.choices[0].message.content or "").strip()
    deployment = env["APIMVAULT_DEPLOYMENT"]
    return (
        f"AzureOpenAI chat via APIM ({used.slot} key, unit {used.unit}, API "
        f"{azure.gateway.api_path or '/'}) -> {deployment}: {content[:40]!r}"
    )


def _check_admin(azure: Any) -> str:
    from ..local.admin import AdminClient

    with AdminClient(azure.admin.url, azure.ca_path, token=azure.admin_token) as client:
        names = [s["name"] for s in client.services()]
    return f"admin API lists {', '.join(names)}"
