"""``apimvault rotate``: dual-key rotation of the APIM subscription key."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..exceptions import (
    ConfigurationError,
)
from .config import env_var, is_loopback_url, require, rotator_client_id, vault_url_variable
from .output import (
    EXIT_FAILED,
    EXIT_OK,
    Output,
    fail,
)

# -------------------------------------------------------------------------------------------- rotate


def _rotation_credential(client_id: str | None) -> Any:
    """The rotator's ``DefaultAzureCredential``, with the providers' bounds on the identity endpoint."""
    from ..rotation.azure import bounded_credential

    return bounded_credential(managed_identity_client_id=client_id) if client_id else bounded_credential()


def _is_local(url: str | None) -> bool:
    """A set URL on this machine. Unset is NOT local: it means the production default (the event's vault,
    https://management.azure.com)."""
    return bool(url) and is_loopback_url(url)


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
    from ..rotation import RotationConfig

    raw = None
    if args.event is not None and args.event != "-":
        try:
            raw = Path(args.event).read_text(encoding="utf-8")
        except OSError as exc:
            return fail(
                out, ConfigurationError(f"--event {args.event}: cannot read it ({exc.strerror or exc})")
            )
    credential = None
    try:
        # Every setting resolved once (a bad value is a ConfigurationError naming its variable or flag).
        config = RotationConfig.from_env(
            apim_subscription_id=args.apim_subscription_id,
            propagation_timeout=args.propagation_timeout,
            probe_successes=args.probe_successes,
            probe_interval=args.probe_interval,
            revoke_wait=args.revoke_wait,
            token_scope=args.token_scope,
        )
        if args.revoke_current and args.event is not None:
            raise ConfigurationError("--revoke-current rotates the secret named by --secret, not an --event")
        credential = _rotation_credential(rotator_client_id(args.client_id))
        if args.event is not None:
            return _from_event(args, out, raw, config, credential)
        return _planned(args, out, config, credential)
    except Exception as exc:
        return fail(out, exc)
    finally:
        if credential is not None:
            credential.close()


def _from_event(args: argparse.Namespace, out: Output, raw: str | None, config: Any, credential: Any) -> int:
    from .._events import parse_secret_events
    from ..rotation import rotate_from_event

    if raw is None:
        raw = sys.stdin.read()
    events = parse_secret_events(raw)
    for event in events:
        out.note(f"event {event.event_type} for {event.secret_name} version {event.version}")
    vault = env_var(vault_url_variable()) or next((e.secret_id for e in events if e.secret_id), None)
    target = vault or "the event's vault"
    arm = env_var("APIMVAULT_ARM_ENDPOINT")
    needs_yes = not args.yes and not (_is_local(vault) and _is_local(arm))
    if needs_yes and args.event == "-":  # stdin carried the event: nobody to ask
        out.error(f"refusing to regenerate APIM keys of {target} without --yes")
        return _declined(out)
    if needs_yes and not confirm(out, f"Rotate the key of {target} if the event is current?", target):
        return _declined(out)
    result = rotate_from_event(raw, credential=credential, config=config)
    seen = [{"event_type": e.event_type, "secret": e.secret_name, "version": e.version} for e in events]
    return _rotated(out, result, None, events=seen)


def _planned(args: argparse.Namespace, out: Output, config: Any, credential: Any) -> int:
    from ..rotation import plan_rotation, revoke_current, rotate

    vault_var = vault_url_variable()
    vault_url = args.vault_url or env_var(vault_var)
    secret_name = args.secret or env_var("APIMVAULT_SECRET_NAME")
    require(
        (
            (f"{vault_var} (or --vault-url)", vault_url),
            ("APIMVAULT_SECRET_NAME (or --secret)", secret_name),
        )
    )
    assert vault_url and secret_name
    plan = plan_rotation(vault_url=vault_url, secret_name=secret_name, credential=credential, config=config)
    out.note("rotation plan:")
    for line in plan.describe():
        out.note(f"  {line}")
    if args.revoke_current:
        out.note(
            f"  revoke       then wait {config.revoke_wait:g} s for the fleet and regenerate the "
            f"{plan.credential_id} key in use now (fingerprint {plan.current_fingerprint}): it dies"
        )
    loopback = _is_local(plan.vault_url) and _is_local(plan.arm_endpoint)
    question = (
        "Revoke the key in use (after rotating)?" if args.revoke_current else "Regenerate and store the key?"
    )
    if not args.yes and not loopback and not confirm(out, question, plan.vault_url):
        return _declined(out, plan.as_dict())
    if args.revoke_current:
        revoked = revoke_current(
            vault_url=plan.vault_url, secret_name=plan.secret_name, credential=credential, config=config
        )
        out.line(
            f"revoked the {revoked.revoked_slot} key (fingerprint {revoked.revoked_fingerprint}) "
            f"{revoked.waited_seconds:.1f} s after storing its successor; every gateway refused it "
            f"{revoked.dead_after_seconds:.1f} s after its regeneration ({revoked.dead_at})"
        )
        return _rotated(out, revoked.rotation, plan.as_dict(), revocation=revoked.as_dict())
    result = rotate(
        vault_url=plan.vault_url,
        secret_name=plan.secret_name,
        apim_subscription_id=plan.apim_subscription,
        credential=credential,
        expected_version=plan.current_version,
        config=config,
    )
    return _rotated(out, result, plan.as_dict())


def _declined(out: Output, plan: dict[str, Any] | None = None) -> int:
    out.document({"ok": False, "exit_code": EXIT_FAILED, "declined": True, "plan": plan})
    return EXIT_FAILED


def _rotated(
    out: Output,
    result: Any,
    plan: dict[str, Any] | None,
    *,
    events: list[dict[str, Any]] | None = None,
    revocation: dict[str, Any] | None = None,
) -> int:
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
    doc = {"ok": True, "exit_code": EXIT_OK, "result": result.as_dict(), "plan": plan}
    if events is not None:
        doc["events"] = events
    if revocation is not None:
        doc["revocation"] = revocation
    out.document(doc)
    return EXIT_OK
