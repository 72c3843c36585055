"""``apimvault local`` stack options (in-process ``--check``): the API suffix, gateway units, rotate-as."""

from __future__ import annotations

import pytest

from tests._support.cli import run_cli


def test_check_with_an_empty_suffix_three_units_and_infras_rotator() -> None:
    argv = ["--api-suffix", "", "--gateway-units", "3", "--rotate-as", "rotator"]
    argv += ["--gateway-routing", "balanced"]
    run = run_cli(["local", "--check", "--json", *argv])
    assert run.code == 0, run.out + run.err
    services = {s["service"]: s for s in run.json()["services"]}
    assert all(s["ok"] for s in services.values()), services
    assert "API /)" in services["gateway"]["detail"]  # served at the root
    assert "unit unit" in services["gateway"]["detail"]  # the units are unit1..unit3


def test_check_with_the_default_suffix_names_it() -> None:
    run = run_cli(["local", "--check", "--json"])
    assert run.code == 0, run.out + run.err
    gateway = next(s for s in run.json()["services"] if s["service"] == "gateway")
    assert gateway["ok"] and "API /openai)" in gateway["detail"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--api-suffix", "a b"], "--api-suffix"),
        (["--gateway-units", "0"], "--gateway-units"),
        (["--rotate-as", "owner"], "--rotate-as"),
        (["--gateway-routing", "anycast"], "--gateway-routing"),
    ],
)
def test_bad_stack_options_are_refused(argv: list[str], message: str) -> None:
    run = run_cli(["local", "--check", *argv])
    assert run.code == 2 and message in run.err, run.err
