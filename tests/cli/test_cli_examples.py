"""Every ``apimvault`` command line the README shows parses with the command's parser: the command table's
usage of each subcommand (placeholders filled, every choice tried) and the example commands of its code
blocks and inline code. Parsing only: nothing runs, so nothing needs a stack."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from apimvault.cli.parser import build_parser
from tests._support.paths import REPO

README = REPO / "README.md"

# A value for each placeholder of the README's command table, valid for the option that names it.
PLACEHOLDERS = {
    "F": "local.env",
    "SUFFIX": "openai",
    "N": "4",
    "D": "gpt-4o-mini",
    "URL": "https://example.vault.azure.net",
    "S": "30",
    "FILE": "event.json",
    "NAME": "apim-subscription-key",
    "ID": "00000000-0000-0000-0000-000000000001",
    "SCOPE": "api://00000000-0000-0000-0000-000000000002/.default",
    '"prompt"': "Hello there",
}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _table_usages() -> dict[str, str]:
    """``name -> usage`` of each row of the README's command table (``[--flag VALUE] ... positional``)."""
    text = README.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `apimvault (\w+)((?:[^`])*)` \|", text, flags=re.M)
    return {name: usage.replace("\\|", "|") for name, usage in rows}


def _argv_variants(usage: str) -> list[list[str]]:
    """The argv lists a usage line allows: every option with its placeholder filled, once per choice of
    the option with the most choices (``balanced|per-unit``: two argv lists)."""
    options = [group.split() for group in re.findall(r"\[([^\]]+)\]", usage)]
    positionals = [PLACEHOLDERS[word] for word in re.sub(r"\[[^\]]+\]", " ", usage).split()]
    widest = max((len(opt[1].split("|")) for opt in options if len(opt) == 2), default=1)
    variants = []
    for index in range(widest):
        argv: list[str] = []
        for option in options:
            argv.append(option[0])
            if len(option) == 2:
                choices = option[1].split("|")
                choice = choices[min(index, len(choices) - 1)]
                argv.append(PLACEHOLDERS.get(choice, choice))
        variants.append(argv + positionals)
    return variants


def _example_commands() -> list[str]:
    """``apimvault ...`` commands of the README's code blocks and whole-command inline code spans."""
    text = README.read_text(encoding="utf-8")
    found, fence = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence not in ("sh", "bash", "console", ""):
            continue  # prose, or a block of another language
        for part in line.split("#", 1)[0].split("&&"):
            words = part.split()
            if words and words[0].split("/")[-1] == "apimvault":
                found.append(" ".join(words[1:]))
    found += re.findall(r"(?<!\| )`apimvault ((?:local|check|chat|rotate|drill)\b[^`\[]*)`", text)
    return found


def _takes_a_value(parser: argparse.ArgumentParser, flag: str) -> bool:
    return any(flag in a.option_strings and a.nargs != 0 for a in parser._actions)


def test_the_command_table_has_a_usage_for_every_subcommand() -> None:
    assert set(_table_usages()) == set(_subcommands())


@pytest.mark.parametrize("name", ["local", "check", "chat", "rotate", "drill"])
def test_each_subcommand_parses_its_documented_usage(name: str) -> None:
    commands = _subcommands()
    usage = _table_usages()[name]
    variants = _argv_variants(usage)
    assert variants and all(variants), usage
    for argv in variants:
        args = build_parser().parse_args([name, *argv])
        assert args.command == name and args.func is commands[name].get_default("func")
        for action in commands[name]._actions:
            given = [f for f in action.option_strings if f in argv]
            if not given:
                continue
            # every option the usage names landed with the value the argv gave it
            if action.nargs == 0:
                assert getattr(args, action.dest) == action.const, (name, given)
            else:
                text = argv[argv.index(given[0]) + 1]
                expected = action.type(text) if callable(action.type) else text
                assert getattr(args, action.dest) == expected, (name, given)
        if name == "chat":
            assert args.prompt == "Hello there"


def test_the_readmes_example_commands_parse() -> None:
    commands = _subcommands()
    examples = _example_commands()
    assert {
        "local",
        "check",
        "drill --yes --concurrency 4 --duration 60",
        "rotate --event event.json",
    } <= set(examples)
    assert {shlex.split(e)[0] for e in examples} <= set(commands)  # chat: only in the table
    for example in examples:
        argv = shlex.split(example)
        if _takes_a_value(commands[argv[0]], argv[-1]):
            continue  # an option named in prose (`apimvault rotate --event`), not a command line
        args = build_parser().parse_args(argv)
        assert args.func is commands[argv[0]].get_default("func"), example


def test_the_documented_choices_are_the_parsers() -> None:
    """A usage's ``a|b`` list is exactly the option's choices (so every choice above was tried)."""
    for name, usage in _table_usages().items():
        for flag, values in re.findall(r"\[(--[\w-]+) ([\w-]+(?:\|[\w-]+)+)\]", usage):
            [action] = [a for a in _subcommands()[name]._actions if flag in a.option_strings]
            if action.choices is not None:
                assert set(values.split("|")) == set(action.choices), (name, flag)
