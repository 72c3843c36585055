"""What the README's command section promises about `apimvault local` and its environment file (issue 23:
12), through the real entry points."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

import apimvault
from apimvault.cli.config import LOCAL_ENV_VARIABLES, unset_local_env_command
from apimvault.local import LocalAzure

from .cli_support import new_rotating_app, run_cli
from .test_cli_local import APIMVAULT, _read_line, clean_env


def test_the_unset_hint_names_every_variable_the_env_file_sets(azure: LocalAzure) -> None:
    assert list(LOCAL_ENV_VARIABLES) == list(azure.environ())


def test_a_stopped_stack_prints_the_whole_unset_command(azure: LocalAzure, tmp_path: Path) -> None:
    app = new_rotating_app(azure)
    gone = str(tmp_path / "apimvault-local-x" / "ca.pem")
    run = run_cli(["check"], {**app.env(), "SSL_CERT_FILE": gone, "REQUESTS_CA_BUNDLE": gone})
    assert run.code == 2, run.err
    assert unset_local_env_command() in run.err
    assert "..." not in run.err


@pytest.mark.slow
def test_local_stops_on_sighup_removing_env_file_and_ca(tmp_path: Path) -> None:
    """Closing the terminal (SIGHUP) stops `apimvault local` like SIGTERM: env file and CA directory gone."""
    env_file = tmp_path / "local.env"
    proc = subprocess.Popen(
        [APIMVAULT, "local", "--json", "--env-file", str(env_file)],
        env=clean_env(PYTHONPATH=str(Path(apimvault.__file__).parents[1])),  # these sources
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = json.loads(_read_line(proc, 60))
        assert ready["event"] == "ready"
        file_env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if line)
        ca = Path(file_env["SSL_CERT_FILE"])
        assert ca.is_file()
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"event": "stopped"}
    assert not env_file.exists()
    assert not ca.parent.exists()


def test_the_readmes_way_back_unsets_every_variable_of_the_env_file() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    [line] = [x for x in readme.splitlines() if x.startswith("unset ")]
    assert line.startswith(unset_local_env_command() + " ")
    assert line.split()[1:] == [*LOCAL_ENV_VARIABLES, "APIMVAULT_TOKEN_SCOPE"]
