"""Where a new user tripped (issue 13), each step reproduced through the real ``apimvault`` entry point."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from apimvault.cli.drill.metrics import BROKEN_WINDOW, Metrics
from apimvault.local import LocalAzure
from tests._support.cli import APIMVAULT, clean_env, new_rotating_app, read_line, run_cli


def _closed_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# 1. the drill does not rotate when traffic cannot work ---------------------------------------------------


def test_drill_with_a_wrong_deployment_stops_before_rotating(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    before = azure.keyvault.latest(app.name).version
    run = run_cli(
        ["drill", "--json", "--duration", "5"], {**app.env(), "APIMVAULT_DEPLOYMENT": "gpt-4o-mino"}
    )
    assert run.code == 11, run.err  # the exit code of the cause: APIM accepted the key, the request failed
    doc = run.json()
    assert doc["ok"] is False and doc["rotations"] == 0 and doc["preflight"] == "sync plain"
    assert "NotFoundError" in doc["error"] and "before rotating anything" in run.err
    assert azure.keyvault.latest(app.name).version == before  # nothing was rotated
    assert app.keys() == (app.subscription.primary_key, app.subscription.secondary_key)
    assert azure.arm.counters.total() == 0  # ARM never asked to regenerate a key


def test_drill_stops_rotating_when_traffic_breaks_mid_run(azure: LocalAzure) -> None:
    """The preflight passes, then every chat fails (the gateway answers 404 from the 5th request on):
    the drill stops rotating instead of regenerating every key, and fails."""
    app = new_rotating_app(azure)
    azure.gateway.faults.inject("status", operation="ChatCompletions", status=404, after=4)  # 4 = preflight
    run = run_cli(["drill", "--json", "--duration", "5", "--concurrency", "8"], app.env())
    assert run.code == 1, run.err
    report = run.json()
    assert report["ok"] is False and report["rotations_stopped"], report["verdict"]
    assert "rotations stopped because the traffic was failing" in report["verdict"]
    assert report["rotations"] < 3  # the last rotation (at 0.7 of the run) never came
    assert len(azure.keyvault.versions(app.name)) == 1 + report["rotations"]


def test_a_fault_can_start_after_n_requests() -> None:
    from apimvault.local import Faults

    faults = Faults()
    faults.inject("status", operation="ChatCompletions", status=404, after=2, times=1)
    taken = [len(faults.take("ChatCompletions")) for _ in range(4)]
    assert taken == [0, 0, 1, 0]  # two pass, the third fails, then the counted fault is used up
    assert faults.take("GetSecret") == [] and faults.active == []


def test_failing_traffic_is_judged_broken_on_the_latest_requests() -> None:
    metrics = Metrics()
    for _ in range(BROKEN_WINDOW):
        metrics.ok(0.01, streaming=False)
    assert metrics.broken() is None
    for _ in range(BROKEN_WINDOW // 2 - 1):
        metrics.fail(0.01, streaming=False, exc=RuntimeError("404"))
    assert metrics.broken() is None  # 19 of the latest 40 failed: a bad moment, not broken traffic
    metrics.fail(0.01, streaming=True, exc=RuntimeError("404"))
    assert metrics.broken() == f"{BROKEN_WINDOW // 2} of the latest {BROKEN_WINDOW} requests failed"


# 2. a stopped stack, a still-sourced shell ----------------------------------------------------------------

COMMANDS = [["check"], ["chat", "hello"], ["rotate", "--yes"], ["drill", "--duration", "2"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: a[0])
def test_deleted_ca_says_the_stack_is_not_running(azure: LocalAzure, tmp_path: Path, argv: list[str]) -> None:
    app = new_rotating_app(azure)
    gone = str(tmp_path / "apimvault-local-x" / "ca.pem")
    run = run_cli(argv, {**app.env(), "SSL_CERT_FILE": gone, "REQUESTS_CA_BUNDLE": gone})
    assert run.code == 2, run.err
    assert "the local stack is not running" in run.err and f"SSL_CERT_FILE={gone}" in run.err
    assert "apimvault local" in run.err and "unset" in run.err


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: a[0])
def test_refused_loopback_endpoint_says_the_stack_is_not_running(azure: LocalAzure, argv: list[str]) -> None:
    app = new_rotating_app(azure)
    vault = f"https://127.0.0.1:{_closed_loopback_port()}"
    run = run_cli([*argv[:1], "--json", *argv[1:]], {**app.env(), "AZURE_KEYVAULT_URL": vault})
    assert run.code == 2, run.err
    assert f"AZURE_KEYVAULT_URL={vault} refuses connections" in run.err
    assert run.json()["exit_code"] == 2


# 3 and 12. two `apimvault local` on one env file; the env file is written safely ---------------------


@pytest.mark.slow
def test_second_local_on_the_same_env_file_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not yours\n")
    env_file = tmp_path / "local.env"
    env_file.symlink_to(elsewhere)  # a symlink where the file goes: replaced, never followed
    first = subprocess.Popen(
        [APIMVAULT, "local", "--env-file", str(env_file)],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [read_line(first, 60)]
        assert first.stdout is not None
        while "Ctrl-C" not in lines[-1] and len(lines) < 20:  # the rest of the banner follows at once
            lines.append(first.stdout.readline())
        banner = "".join(lines)
        assert "IDENTITY_HEADER" in banner and "credential" in banner and "never the APIM key" in banner
        written = env_file.read_text()
        assert not env_file.is_symlink() and (env_file.stat().st_mode & 0o777) == 0o600
        assert elsewhere.read_text() == "not yours\n"

        second = run_cli(["local", "--env-file", str(env_file)])
        assert second.code == 2
        assert "another `apimvault local`" in second.err and str(env_file) in second.err
        assert env_file.read_text() == written  # the first stack's file is untouched
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0 and not env_file.exists()


def test_env_file_replaces_a_symlink_and_is_private(azure: LocalAzure, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep me\n")
    link = tmp_path / "stack.env"
    link.symlink_to(target)
    azure.write_env_file(link)
    assert not link.is_symlink() and target.read_text() == "keep me\n"
    assert (link.stat().st_mode & 0o777) == 0o600
    assert dict(line.split("=", 1) for line in link.read_text().splitlines()) == azure.environ()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# 4. --duration -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1.5", "0", "soon"])
def test_drill_duration_is_refused_with_a_message_about_the_flag(value: str) -> None:
    run = run_cli(["drill", "--duration", value])
    assert run.code == 2
    assert "--duration" in run.err and "ttl" not in run.err.lower()


# 5. logging --------------------------------------------------------------------------------------------


def test_library_failure_without_logging_configured_prints_nothing(azure: LocalAzure) -> None:
    script = (
        "from apimvault import SubscriptionKeyProvider, SecretNotFoundError\n"
        "import os\n"
        "p = SubscriptionKeyProvider(os.environ['AZURE_KEYVAULT_URL'], 'apim-subscription-kee')\n"
        "try:\n    p.get_key()\nexcept Exception as exc:\n    print(type(exc).__name__)\n"
        "p.close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() in ("AccessDeniedError", "SecretNotFoundError"), done.stderr
    assert done.stderr == ""  # no WARNING through Python's last-resort handler, no traceback


def test_verbose_log_lines_have_one_prefix_and_one_handler(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    logger = logging.getLogger("apimvault")
    handlers = list(logger.handlers)
    runs = [run_cli(["-v", "rotate", "--yes"], app.env()) for _ in range(2)]
    for run in runs:
        assert run.code == 0, run.err
        lines = [line for line in run.err.splitlines() if "rotation of" in line and "regenerated" in line]
        assert len(lines) == 1, run.err  # once: main() does not add a handler per call
        assert " INFO rotation of" in lines[0] and "apimvault INFO" not in run.err
    assert logger.handlers == handlers  # -v's handler is gone again after the run
    quiet = run_cli(["rotate", "--yes"], app.env())
    assert quiet.code == 0 and "rotation of" not in quiet.err


# 6. 403 on the secret: or the name is wrong --------------------------------------------------------------


def test_403_says_the_secret_name_may_be_wrong(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)  # the identity's role is scoped to this one secret
    run = run_cli(["check"], {**app.env(), "APIMVAULT_SECRET_NAME": app.name + "-typo"})
    assert run.code == 5, run.out
    assert "secret name is wrong" in run.out and f"APIMVAULT_SECRET_NAME={app.name}-typo" in run.out
    assert "a role scoped to one secret makes Key Vault answer 403 for any other name" in run.out


# 7. configuration first, all of it -----------------------------------------------------------------------


def test_check_validates_all_configuration_before_any_network_step(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    run = run_cli(
        ["check", "--json"],
        {
            **app.env(),
            "APIMVAULT_SECRET_NAME": "bad_name!",
            "AZURE_OPENAI_ENDPOINT": "http://apim.example.com",
        },
    )
    assert run.code == 2
    detail = run.json()["steps"][-1]["detail"]
    assert "bad_name!" in detail and "http://apim.example.com" in detail and "not https" in detail
    assert azure.identity.counters.total() == 0 and azure.keyvault.counters.total() == 0


def test_chat_lists_every_missing_variable() -> None:
    run = run_cli(
        ["chat", "hi"],
        {"APIMVAULT_DEPLOYMENT": None, "AZURE_OPENAI_ENDPOINT": None, "APIMVAULT_SECRET_NAME": None},
    )
    assert run.code == 2
    for name in ("APIMVAULT_DEPLOYMENT", "AZURE_OPENAI_ENDPOINT", "APIMVAULT_SECRET_NAME"):
        assert name in run.err


def test_rotate_missing_event_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "event.json"
    run = run_cli(["rotate", "--json", "--event", str(missing)])
    assert run.code == 2
    assert str(missing) in run.json()["error"] and "--event" in run.err


# 8. --json: one document, nothing human on stderr, also when interrupted ---------------------------------


def test_rotate_json_keeps_stderr_clean_and_puts_the_plan_in_the_document(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    run = run_cli(["rotate", "--json", "--yes"], app.env())
    assert run.code == 0 and run.err == ""
    doc = run.json()
    assert doc["plan"]["secret_name"] == app.name and doc["result"]["new_version"]


class _CtrlC(io.StringIO):
    def read(self, size: int | None = -1) -> str:
        raise KeyboardInterrupt


def test_interrupted_json_command_prints_one_document(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    saved = sys.stdin
    sys.stdin = _CtrlC()  # Ctrl-C while `rotate --event -` waits for the event on stdin
    try:
        run = run_cli(["rotate", "--json", "--yes", "--event", "-"], app.env())
    finally:
        sys.stdin = saved
    assert run.code == 130
    assert run.json() == {"ok": False, "exit_code": 130, "interrupted": True}


# 9. --version, help texts ------------------------------------------------------------------------------


def test_version_and_help_texts() -> None:
    import apimvault

    version = run_cli(["--version"])
    assert version.code == 0 and version.out.strip() == f"apimvault {apimvault.__version__}"
    top = run_cli(["--help"])
    assert top.code == 0 and "exit codes:" in top.out and "  12  Key Vault refused" in top.out
    chat = run_cli(["chat", "--help"])
    assert chat.code == 0 and "the user message to send" in chat.out
    assert "exit codes: see `apimvault --help`" in chat.out and "  3  no token" not in chat.out


def test_stdout_json_is_one_document_per_command_also_on_errors(azure: LocalAzure) -> None:
    app = new_rotating_app(azure)
    for argv in (["check", "--json"], ["chat", "--json", "hi"], ["rotate", "--json", "--yes"]):
        run = run_cli(argv, {**app.env(), "APIMVAULT_SECRET_NAME": "no-such-secret"})
        assert run.code != 0
        assert isinstance(json.loads(run.out), dict)


# 10. README's Use snippets run as written, and close what they open --------------------------------------


def _readme_use_snippets() -> list[str]:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Use\n", 1)[1].split("\n### ", 1)[0]
    return [
        block.split("\n", 1)[1]
        for block in section.split("```python")[1:]
        for block in [block.split("```")[0]]
    ]


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1], ids=["sync", "async"])
def test_readme_use_snippet_runs_and_leaks_nothing(azure: LocalAzure, index: int) -> None:
    snippet = _readme_use_snippets()[index]
    env = {**os.environ, "PYTHONWARNINGS": "default", "PYTHONDEVMODE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the snippet printed no answer"
    assert "Unclosed" not in done.stderr and "ResourceWarning" not in done.stderr, done.stderr


@pytest.mark.slow
def test_a_reader_that_left_gets_no_traceback(azure: LocalAzure) -> None:
    """``apimvault rotate --json | head -1``: stdout closes early; the command ends without a traceback."""
    app = new_rotating_app(azure)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes
    try:
        done = subprocess.run(
            [APIMVAULT, "rotate", "--json", "--yes"],
            env={**os.environ, **{k: v for k, v in app.env().items() if v is not None}},
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 1
    tags = azure.keyvault.latest(app.name).tags
    assert tags is not None and tags["CredentialId"] == "secondary"  # the rotation itself happened


def test_local_refuses_a_symlinked_lock(tmp_path: Path) -> None:
    """The lock next to the env file is never followed through a symlink (exit 2, nothing started)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("keep\n")
    (tmp_path / "local.env.lock").symlink_to(elsewhere)
    run = run_cli(["local", "--env-file", str(tmp_path / "local.env")])
    assert run.code == 2 and "cannot create the lock" in run.err
    assert elsewhere.read_text() == "keep\n" and not (tmp_path / "local.env").exists()
