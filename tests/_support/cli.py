"""Helpers for the CLI, rotation and drill tests: per-test APIM subscriptions and secrets set up the way
``apimvault local`` seeds them, gateway probes, and a check that output never carries a key."""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import ssl
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

from apimvault.local import DEPLOYMENT, LocalAzure, temporary_environ
from apimvault.local.stack import API_VERSION
from tests._support.core import AppSecret, new_app_secret


@dataclass
class RotatingApp(AppSecret):
    """The suite's :class:`AppSecret`, tagged for rotation, with the stack it lives on and the keys seen."""

    azure: LocalAzure
    seen_keys: set[str] = field(default_factory=set)

    def keys(self) -> tuple[str, str]:
        sub = self.azure.apim_state.get(self.sid)
        assert sub is not None
        self.seen_keys.update((sub.primary_key, sub.secondary_key))
        return sub.primary_key, sub.secondary_key

    def env(self) -> dict[str, str | None]:
        """Overrides pointing the CLI at this app instead of the stack's seeded secret. ``rotate`` runs as
        the stack's rotator identity (``APIMVAULT_ROTATOR_CLIENT_ID``, which the CLI prefers to the
        officer's), holding only infra's roles, granted on this app by :func:`new_rotating_app`."""
        return {
            "APIMVAULT_SECRET_NAME": self.name,
            "APIMVAULT_APIM_SUBSCRIPTION_ID": self.resource_id,
            "APIMVAULT_ROTATOR_CLIENT_ID": self.azure.rotator_identity.client_id,
            "AZURE_CLIENT_ID": None,
        }


def new_rotating_app(
    azure: LocalAzure,
    *,
    tags: dict[str, str] | None = None,
    grant: bool = True,
    rotator: bool = True,
    **secret_kwargs: Any,
) -> RotatingApp:
    """:func:`~tests._support.core.new_app_secret` tagged for rotation, wrapped with the CLI's helpers.

    ``rotator`` grants the stack's rotator identity exactly infra's roles on this app's secret and APIM
    subscription (infra assigns them per secret and subscription, so each app needs its own grant); the
    ``azure`` fixture revokes grants made during a test."""
    secret = new_app_secret(azure, rotation=True, tags=tags, grant=grant, **secret_kwargs)
    if rotator:
        azure.grant_rotator_roles(azure.rotator_identity, secret=secret.name, apim_subscription=secret.sid)
    app = RotatingApp(secret.name, secret.subscription, azure)
    app.keys()
    return app


def gateway_status(azure: LocalAzure, key: str) -> int:
    """Status of a one-token chat through the gateway with ``key`` (TLS verified against the stack CA)."""
    with httpx2.Client(verify=ssl.create_default_context(cafile=str(azure.ca_path)), timeout=10) as client:
        response = client.post(
            f"{azure.gateway_url}/openai/deployments/{DEPLOYMENT}/chat/completions",
            params={"api-version": API_VERSION},
            headers={"Ocp-Apim-Subscription-Key": key},
            json={"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1},
        )
    return response.status_code


def assert_no_key(text: str, keys: Iterable[str]) -> None:
    """Neither any key nor any 8-character piece of one appears in ``text``."""
    for key in keys:
        assert key not in text, "a full key leaked into the output"
        for i in range(len(key) - 7):
            piece = key[i : i + 8]
            assert piece not in text, f"8 characters of a key ({i}:{i + 8}) appear in the output"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run_cli(argv: list[str], env: dict[str, str | None] | None = None, stdin: str | None = None) -> Run:
    """``apimvault.cli.main(argv)`` in-process with captured stdout/stderr and temporary env overrides."""
    from apimvault.cli import main

    out, err = io.StringIO(), io.StringIO()
    with (
        temporary_environ(env or {}),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        contextlib.ExitStack() as stack,
    ):
        if stdin is not None:
            import sys

            saved = sys.stdin
            sys.stdin = io.StringIO(stdin)
            stack.callback(setattr, sys, "stdin", saved)
        code = main(argv)
    return Run(code, out.getvalue(), err.getvalue())


# ------------------------------------------------------------------------------------- subprocesses

#: The ``apimvault`` console script of the running interpreter's environment.
APIMVAULT = str(Path(sys.executable).parent / "apimvault")


def clean_env(**extra: str) -> dict[str, str]:
    """A child environment without the test session's local-Azure variables."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line the child printed, waited for at most ``timeout`` s (``select``, not a sleep)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no output from `apimvault local` in time"
    return proc.stdout.readline()
