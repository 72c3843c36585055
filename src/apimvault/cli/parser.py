"""The argument parser of the ``apimvault`` command."""

from __future__ import annotations

import argparse
import math
from typing import TypeAlias

from .chat import cmd_chat
from .check import cmd_check
from .drill import cmd_drill
from .drill.config import MIN_DURATION as MIN_DRILL_DURATION
from .local import add_local_stack_options, cmd_local
from .output import exit_code_table
from .rotate import cmd_rotate


class _Version(argparse.Action):
    """``--version``: the installed version (read only when asked; importlib.metadata is slow to import)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        from .. import __version__

        print(f"apimvault {__version__}")
        parser.exit()


def _seconds(minimum: float) -> argparse._ActionType:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(
                f"{text!r}: give a finite number of seconds, at least {minimum:g}"
            )
        return value

    return parse


def _at_least(minimum: int) -> argparse._ActionType:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: at least {minimum}")
        return value

    return parse


_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # where subcommands go


def build_parser() -> argparse.ArgumentParser:
    """The ``apimvault`` parser: global flags, then one subparser per command (each built by its
    ``_add_<command>`` function, in the order ``--help`` lists them)."""
    parser = argparse.ArgumentParser(
        prog="apimvault",
        description="Azure OpenAI through APIM with the subscription key in Key Vault: diagnose, chat, "
        "rotate, and drill a rotation under live traffic. Keys are never printed (version + fingerprint).",
        epilog=exit_code_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log apimvault's INFO messages to stderr"
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_local, _add_check, _add_chat, _add_rotate, _add_drill):
        add(sub)
    return parser


def _add_command(sub: _Commands, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    """A command's parser with what every command has: the pointer to the exit codes and ``--json``."""
    p = sub.add_parser(
        name,
        help=help_text,
        description=description,
        epilog="exit codes: see `apimvault --help`",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output (one JSON document)")
    return p


def _add_deployment(p: argparse.ArgumentParser) -> None:
    """``--deployment`` (check, chat, drill)."""
    p.add_argument("--deployment", help="Azure OpenAI deployment (default: APIMVAULT_DEPLOYMENT)")


def _add_client_id(p: argparse.ArgumentParser) -> None:
    """``--client-id`` (rotate, drill)."""
    p.add_argument("--client-id", help="managed identity client id of the rotator")


def _add_local(sub: _Commands) -> None:
    p = _add_command(
        sub,
        "local",
        "run the embedded local Azure in the foreground",
        "Start Key Vault, managed identity, APIM (gateway + ARM) and Azure OpenAI on loopback TLS, seed "
        "an APIM subscription and the secret apim-subscription-key, write a dotenv file for SDK clients, "
        "and run until Ctrl-C/SIGTERM/SIGHUP. --check starts it, proves each service through the real SDKs, "
        "exits.",
    )
    p.add_argument(
        "--env-file", default=".apimvault-local.env", help="dotenv file to write (default %(default)s)"
    )
    p.add_argument("--check", action="store_true", help="start, check every service, stop; exit 0/1")
    add_local_stack_options(p)
    p.set_defaults(func=cmd_local)


def _add_check(sub: _Commands) -> None:
    p = _add_command(
        sub,
        "check",
        "walk the request path and stop at the first broken link",
        "Check, in order: configuration; which credential of DefaultAzureCredential gets a token and for "
        "which identity (claims only, never the token); Key Vault reachable; access (a 403 names the role "
        "and scope to grant); the secret (enabled, not expired, version, age, CredentialId, fingerprint); "
        "APIM accepting the key (a 1-token chat). Uses AZURE_KEYVAULT_URL, APIMVAULT_SECRET_NAME, "
        "AZURE_OPENAI_ENDPOINT, OPENAI_API_VERSION, APIMVAULT_DEPLOYMENT; with APIMVAULT_TOKEN_SCOPE "
        "(api://<app-id>/.default) it also gets the Entra token a key-plus-token client sends, shows its "
        "claims and sends it with the chat.",
    )
    _add_deployment(p)
    p.add_argument("--endpoint", help="APIM gateway URL (default: AZURE_OPENAI_ENDPOINT)")
    p.set_defaults(func=cmd_check)


def _add_chat(sub: _Commands) -> None:
    p = _add_command(
        sub,
        "chat",
        "one streamed chat completion through the core's client",
        "Send one prompt, stream the answer.",
    )
    p.add_argument("prompt", help='the user message to send (quote it: apimvault chat "Hello there")')
    _add_deployment(p)
    p.add_argument("--timeout", type=float, default=60.0, help="request timeout in seconds")
    p.add_argument("--retries", type=int, default=2, help="openai's retries on transient errors")
    p.set_defaults(func=cmd_chat)


def _add_rotate(sub: _Commands) -> None:
    p = _add_command(
        sub,
        "rotate",
        "dual-key rotation of the APIM subscription key",
        "Read the secret's CredentialId, regenerate the OTHER APIM key (ARM), read it back, wait until every "
        "gateway accepts it (probe: GET <gateway>/openai/v1/models, no tokens; gateways from "
        "APIMVAULT_GATEWAY_URLS or AZURE_OPENAI_ENDPOINT), then store it as a new secret version with "
        "CredentialId flipped and expiry now + ValidityPeriodDays, and verify the vault's latest version "
        "is live. The key in use stays valid. Asks before acting on a non-loopback target unless --yes. "
        "Credential: DefaultAzureCredential (managed identity client id from --client-id, "
        "APIMVAULT_ROTATOR_CLIENT_ID or APIMVAULT_OFFICER_CLIENT_ID); needs the custom roles infra/ assigns "
        "(apimvault secret rotator on the secret, or Key Vault Secrets Officer; apimvault APIM subscription "
        "key rotator on the subscription). "
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
    _add_client_id(p)
    _add_rotate_wait_options(p)
    _add_rotate_revoke_options(p)
    p.set_defaults(func=cmd_rotate)


def _add_rotate_wait_options(p: argparse.ArgumentParser) -> None:
    """``rotate``'s bounds and shape of the wait for the gateways to accept the new key."""
    p.add_argument(
        "--propagation-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to wait for the gateways to accept the new key before giving up without changing "
        "the vault (default: APIMVAULT_PROPAGATION_TIMEOUT or 600)",
    )
    p.add_argument(
        "--probe-successes",
        type=int,
        default=None,
        metavar="N",
        help="consecutive 2xx probes each gateway URL must give the new key (units behind one hostname "
        "are picked per connection; default: APIMVAULT_PROBE_SUCCESSES or 10)",
    )
    p.add_argument(
        "--probe-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds between those probes (default: APIMVAULT_PROBE_INTERVAL or 0.5)",
    )


def _add_rotate_revoke_options(p: argparse.ArgumentParser) -> None:
    """``rotate``'s emergency revocation, and the token its probes send to a key-plus-token gateway."""
    p.add_argument(
        "--revoke-current",
        action="store_true",
        help="emergency revocation of the key the vault serves now: rotate to the other key, wait for the "
        "fleet (--revoke-wait), then regenerate the leaked key and report when it died",
    )
    p.add_argument(
        "--revoke-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --revoke-current: seconds the fleet gets to move to the new version before the leaked "
        "key is regenerated (default: APIMVAULT_REVOKE_WAIT or 60)",
    )
    p.add_argument(
        "--token-scope",
        metavar="SCOPE",
        help="a gateway that validates an Entra token as well as the key: the API's scope "
        "(api://<app-id>/.default); the probes then send a token the rotator's credential gets for it "
        "(default: APIMVAULT_TOKEN_SCOPE; unset: the key alone)",
    )


def _add_drill(sub: _Commands) -> None:
    p = _add_command(
        sub,
        "drill",
        "rotation drill under live traffic (embedded local Azure unless AZURE_KEYVAULT_URL is set)",
        "Run chat traffic (threads and asyncio tasks, plain and streaming) through clients built by the core "
        "while rotating the key at least twice, so both APIM keys are regenerated and the key the clients "
        "started with is revoked mid-traffic; report failures, 401s recovered, vault reads, convergence "
        "and latency. Each rotation is a SecretNearExpiry event through a local Event Grid and a Storage "
        "queue to the rotation function's handler, run as the rotator identity; the report names the "
        "identity, its roles and the delivery path. Exit 1 if any request failed. Against a non-loopback "
        "target it needs --yes.",
    )
    _add_drill_load_options(p)
    _add_drill_fault_options(p)
    _add_deployment(p)
    _add_client_id(p)
    p.add_argument("--yes", action="store_true", help="allow regenerating keys of a non-loopback target")
    p.set_defaults(func=cmd_drill)


def _add_drill_load_options(p: argparse.ArgumentParser) -> None:
    """``drill``'s traffic: how many workers, for how long, over how many clients."""
    p.add_argument(
        "--concurrency", type=_at_least(2), default=16, help="workers in total, >= 2 (default %(default)s)"
    )
    p.add_argument(
        "--duration",
        type=_seconds(MIN_DRILL_DURATION),
        default=20.0,
        help=f"seconds of traffic, >= {MIN_DRILL_DURATION:g} (default %(default)s)",
    )
    p.add_argument(
        "--clients",
        type=_at_least(2),
        default=4,
        help="providers/clients the workers share, >= 2 (default %(default)s)",
    )


def _add_drill_fault_options(p: argparse.ArgumentParser) -> None:
    """``drill``'s faults, token, event delivery and revocation."""
    p.add_argument(
        "--chaos",
        action="store_true",
        help="add a Key Vault outage, latency spikes, a random gateway propagation delay per unit and a "
        "duplicate, overlapping delivery of a rotation event",
    )
    p.add_argument(
        "--propagation",
        type=_seconds(0),
        default=None,
        metavar="SECONDS",
        help="local stacks: gateway units accept a regenerated key only after up to this delay "
        "(default 2; 0 turns it off)",
    )
    p.add_argument(
        "--token-scope",
        help="also send an Entra token for this scope (api://<app-id>/.default); the embedded stack's "
        "gateway then validates it; the report shows token refreshes next to key refreshes",
    )
    p.add_argument(
        "--delivery",
        choices=("auto", "azurite", "memory"),
        default="auto",
        help="the Storage queue between the local Event Grid and the rotation function's handler: "
        "Azurite (node_modules/.bin or PATH, with Node.js; the handler then holds its blob lease there), "
        "in memory (Python only), or auto: Azurite when found (default %(default)s)",
    )
    p.add_argument(
        "--revoke",
        action="store_true",
        help="make rotation 3 an emergency revocation (rotate --revoke-current) of the key the clients "
        "hold, mid-traffic; the report says when every gateway refused it",
    )
