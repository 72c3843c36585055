"""What the README's command section promises about `apimvault local` and its environment file (issue 23:
12), through the real entry points."""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
from pathlib import Path

import pytest

import apimvault
from apimvault.cli.config import LOCAL_ENV_VARIABLES, unset_local_env_command
from apimvault.local import LocalAzure
from tests._support.cli import APIMVAULT, clean_env, new_rotating_app, read_line, run_cli


def test_the_unset_hint_names_every_variable_the_env_file_sets(azure: LocalAzure) -> None:
    written = list(azure.environ())
    assert [v for v in LOCAL_ENV_VARIABLES if v in written] == written
    with LocalAzure(ca=azure.ca, rotate_as="rotator") as rotator_stack:
        assert set(rotator_stack.environ()) == set(LOCAL_ENV_VARIABLES)


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
        ready = json.loads(read_line(proc, 60))
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
    section = readme.split("## Before the examples", 1)[1].split("\n## ", 1)[0]
    prelude = re.findall(r"^export (\w+)=", section, flags=re.M)
    assert prelude and line.split()[1:] == [*LOCAL_ENV_VARIABLES, *prelude]


def _command_rows() -> dict[str, str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `apimvault (\w+)([^|]*(?:\\\|[^|]*)*)\| (.*) \|$", readme, flags=re.M)
    return {name: usage + " " + what for name, usage, what in rows}


def test_the_readme_command_table_names_every_option_of_every_command() -> None:
    """The README's command table is as complete as `--help`: every subcommand, every option."""
    from apimvault.cli.parser import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    rows = _command_rows()
    assert set(rows) == set(sub.choices), (set(rows), set(sub.choices))
    for name, command in sub.choices.items():
        for action in command._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help", "--json"):
                    continue  # every command's; said once above the table
                assert flag in rows[name], f"README's `apimvault {name}` row lacks {flag}"


def test_check_help_names_the_token_scope_variable() -> None:
    run = run_cli(["check", "--help"])
    assert "APIMVAULT_TOKEN_SCOPE" in run.out


def test_one_framework_test_command_in_the_readme_and_ci() -> None:
    """The framework section, the Development section and .ci/run give the same integrations command."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    ci = (root / ".ci" / "run").read_text(encoding="utf-8")
    framework = readme.split("## Use with your framework", 1)[1].split("\n## ", 1)[0]
    development = readme.split("## Development", 1)[1].split("\n## ", 1)[0]
    commands = [
        [line.strip() for line in text.splitlines() if "pytest" in line and "-m integrations" in line]
        for text in (framework, development, ci)
    ]
    assert all(len(c) == 1 for c in commands), commands
    assert commands[0] == commands[1] == commands[2], commands
    assert "-W default::DeprecationWarning" in commands[0][0]
    # A leaked socket is reported as an unraisable-exception warning (a UserWarning): named last, an error.
    assert commands[0][0].index("default::UserWarning") < commands[0][0].index(
        "error::pytest.PytestUnraisableExceptionWarning"
    )


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_the_installed_openai_and_httpx2_are_in_the_readmes_tested_range() -> None:
    from importlib.metadata import version

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    stated = re.search(r"Tested with openai ([\d.]+) to ([\d.]+) and httpx2 ([\d.]+) to ([\d.]+)", readme)
    assert stated, "README states the tested openai/httpx2 range"
    for name, low, high in (("openai", *stated.group(1, 2)), ("httpx2", *stated.group(3, 4))):
        installed = version(name)
        assert _version(low) <= _version(installed) <= _version(high), (
            f"{name} {installed} is outside the README's tested range {low} to {high}: run the suite with "
            "it and update the range"
        )


@pytest.mark.parametrize("argv", [["chat", "hi"], ["drill", "--duration", "2"]], ids=lambda a: a[0])
def test_a_wrong_deployment_is_named_once(azure: LocalAzure, argv: list[str]) -> None:
    """`chat` names the deployment Azure OpenAI did not find, as `check` does; `drill` prints the 404 once."""
    app = new_rotating_app(azure)
    run = run_cli([*argv, "--deployment", "no-such-deployment"], app.env())
    assert run.code == 11, run.err
    assert "deployment 'no-such-deployment' not found" in run.err
    assert run.err.count("404") == 1, run.err
    assert "APIMVAULT_DEPLOYMENT" in run.err


def test_the_drill_log_tells_each_rotation_before_its_recovery_with_both_times(azure: LocalAzure) -> None:
    """The timeline says rotation N (when it began, when its version was stored: the summary's times)
    before any line about the key rotation N revoked."""
    app = new_rotating_app(azure)
    run = run_cli(["drill", "--json", "--duration", "5", "--concurrency", "8"], app.env())
    assert run.code == 0, run.err
    report = run.json()
    timeline: list[str] = report["timeline"]
    assert len(report["rotation_log"]) >= 2
    for r in report["rotation_log"]:
        [told] = [i for i, line in enumerate(timeline) if f"rotation {r['index']} (began " in line]
        assert f"(began t={r['started_s']:.1f}s)" in timeline[told]
        assert f"at t={r['at_s']:.1f}s" in timeline[told]
        later = [i for i, line in enumerate(timeline) if f"revoked by rotation {r['index']} any more" in line]
        assert all(i > told for i in later), timeline
