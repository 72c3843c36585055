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
    from azure.identity import DefaultAzureCredential

    return (
        DefaultAzureCredential(managed_identity_client_id=client_id)
        if client_id
        else DefaultAzureCredential()
    )


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
    from ..rotation import RotationConfig, plan_rotation, rotate, rotate_from_event

    arm_endpoint = env_var("APIMVAULT_ARM_ENDPOINT")
    credential = None
    raw = None
    if args.event is not None and args.event != "-":
        try:
            raw = Path(args.event).read_text(encoding="utf-8")
        except OSError as exc:
            return fail(
                out, ConfigurationError(f"--event {args.event}: cannot read it ({exc.strerror or exc})")
            )
    try:
        # Every setting resolved once (a bad value is a ConfigurationError naming its variable).
        config = RotationConfig.from_env(
            apim_subscription_id=args.apim_subscription_id, propagation_timeout=args.propagation_timeout
        )
        credential = _rotation_credential(rotator_client_id(args.client_id))
        if args.event is not None:
            if raw is None:
                raw = sys.stdin.read()
            from .._events import parse_secret_events

            events = parse_secret_events(raw)
            for event in events:
                out.note(f"event {event.event_type} for {event.secret_name} version {event.version}")
            vault = env_var(vault_url_variable()) or next((e.secret_id for e in events if e.secret_id), None)
            target = vault or "the event's vault"
            needs_yes = not args.yes and not (is_loopback_url(vault) and is_loopback_url(arm_endpoint))
            if needs_yes and args.event == "-":  # stdin carried the event: nobody to ask
                out.error(f"refusing to regenerate APIM keys of {target} without --yes")
                return _declined(out)
            if needs_yes and not confirm(out, f"Rotate the key of {target} if the event is current?", target):
                return _declined(out)
            result = rotate_from_event(raw, credential=credential, config=config)
            seen = [
                {"event_type": e.event_type, "secret": e.secret_name, "version": e.version} for e in events
            ]
            return _rotated(out, result, None, events=seen)

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
        plan = plan_rotation(
            vault_url=vault_url, secret_name=secret_name, credential=credential, config=config
        )
        out.note("rotation plan:")
        for line in plan.describe():
            out.note(f"  {line}")
        loopback = is_loopback_url(plan.vault_url) and is_loopback_url(plan.arm_endpoint)
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
            credential=credential,
            expected_version=plan.current_version,
            config=config,
        )
        return _rotated(out, result, plan.as_dict())
    except Exception as exc:
        return fail(out, exc)
    finally:
        if credential is not None:
            credential.close()


def _declined(out: Output, plan: dict[str, Any] | None = None) -> int:
    out.document({"ok": False, "exit_code": EXIT_FAILED, "declined": True, "plan": plan})
    return EXIT_FAILED


def _rotated(
    out: Output, result: Any, plan: dict[str, Any] | None, *, events: list[dict[str, Any]] | None = None
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
    out.document(doc)
    return EXIT_OK
