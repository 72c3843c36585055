"""The env file ``apimvault local`` writes is read whole by the shell the README tells users to use."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Literal

import pytest

from apimvault.local import LocalAzure


@pytest.mark.parametrize("routing", ["balanced", "per-unit"])
def test_env_file_sources_in_a_shell_with_every_value_intact(
    azure: LocalAzure, tmp_path: Path, routing: Literal["balanced", "per-unit"]
) -> None:
    # Not started: the env file needs only the bound ports. per-unit routing lists several gateway URLs.
    stack = LocalAzure(ca=azure.ca, seed=False, gateway_routing=routing, rotate_as="rotator")
    try:
        path = stack.write_env_file(tmp_path / ".env")
    finally:
        stack.stop()
    # The README's line: `set -a; . file; set +a`. A value with a space (the gateway unit list) once broke it.
    shell = subprocess.run(
        ["bash", "-c", 'set -a; . "$1" || exit 9; set +a; env -0', "bash", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert shell.returncode == 0 and shell.stderr == "", shell.stderr
    seen = dict(item.split("=", 1) for item in shell.stdout.split("\0") if "=" in item)
    expected = stack.environ()
    assert {k: seen.get(k) for k in expected} == expected
    assert expected["APIMVAULT_GATEWAY_URLS"] == ",".join(stack.gateway_urls)
    assert expected["APIMVAULT_ROTATOR_CLIENT_ID"] == stack.rotator_identity.client_id
    if routing == "per-unit":
        assert "," in expected["APIMVAULT_GATEWAY_URLS"]  # every gateway unit, one variable
    else:
        assert expected["APIMVAULT_GATEWAY_URLS"] == stack.gateway_url  # units share one URL
