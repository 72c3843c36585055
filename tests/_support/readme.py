"""The README's fenced blocks: found, given their place, and run as scripts after the README's prelude.

Shared by ``tests/test_readme_blocks.py`` (the default run's blocks) and
``tests/integrations/test_readme_blocks.py`` (the framework section's). Each block runs in its own Python
process (forked from one that imported openai once), with the session stack's variables plus the prelude's,
the socket layer limited to loopback, and ``-X dev`` (ResourceWarning shown).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import apimvault
from apimvault.local import LocalAzure

README = Path(__file__).resolve().parents[2] / "README.md"
FRAMEWORK_SECTION = "Use with your framework"
FRAGMENT = "<!-- fragment -->"
PRELUDE_TITLE = "Before the examples"

#: Runs each block file given in argv (``<path>.py``) as ``__main__`` in a forked child of one process
#: that imported openai and the Azure SDK once (4 s on a loaded machine, per process otherwise), with
#: connections limited to loopback; the child's stdout/stderr go to ``<path>.out`` / ``<path>.err`` and its
#: exit code (after the interpreter's own shutdown: atexit, unclosed-resource warnings) to the JSON printed.
_RUNNER = """
import json, os, runpy, socket, sys, traceback
_connect = socket.socket.connect
def _loopback_only(self, address):
    if isinstance(address, tuple) and self.family in (socket.AF_INET, socket.AF_INET6):
        host = str(address[0])
        if not (host.startswith("127.") or host in ("::1", "localhost")):
            raise ConnectionRefusedError(f"README block tried to reach non-loopback address {host!r}")
    return _connect(self, address)
socket.socket.connect = _loopback_only
import azure.identity, azure.keyvault.secrets, openai  # shared by every block: imported once
codes = {}
for path in sys.argv[1:]:
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for fd, suffix in ((1, ".out"), (2, ".err")):
            os.dup2(os.open(path + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit:
            raise
        except BaseException:
            traceback.print_exc()
            sys.exit(1)
        sys.exit(0)  # unwinds to the interpreter's shutdown in the child
    codes[path] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(codes))
"""


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    section: str  # the "## " heading it is under
    heading: str  # the nearest heading ("## " or "### ")
    fragment: bool

    @property
    def id(self) -> str:
        return f"L{self.line}-{re.sub(r'[^A-Za-z0-9]+', '-', self.heading).strip('-')[:40]}"


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of the README with its place and whether it is marked a fragment."""
    lines = (text if text is not None else README.read_text(encoding="utf-8")).splitlines()
    blocks: list[Block] = []
    section = heading = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = heading = line[3:].strip()
        elif line.startswith("### "):
            heading = line[4:].strip()
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            start = i
            i += 1
            body: list[str] = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            blocks.append(
                Block(fence.group(1), "\n".join(body) + "\n", start + 1, section, heading, before == FRAGMENT)
            )
        i += 1
    return blocks


def python_blocks() -> list[Block]:
    return [b for b in readme_blocks() if b.lang == "python"]


def prelude_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The ``export`` lines of the README's prelude block (beyond the sourced env file), a ``"$NAME"``
    value taken from ``env`` (the sourced file's variables)."""
    code = "".join(b.code for b in readme_blocks() if b.heading == PRELUDE_TITLE and b.lang == "sh")
    exports = dict(re.findall(r"^export (\w+)=(\S+)", code, flags=re.M))
    for name, value in exports.items():
        ref = re.fullmatch(r'"?\$(\w+)"?', value)
        if ref:
            assert env is not None and ref.group(1) in env, f"the prelude's {name} needs {ref.group(1)}"
            exports[name] = env[ref.group(1)]
    return exports


def block_env(azure: LocalAzure) -> dict[str, str]:
    """What a shell has after the prelude: its own basics, the stack's env file, the prelude's exports."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(azure.environ())
    env.update(prelude_env(env))
    env["PYTHONPATH"] = str(Path(apimvault.__file__).parents[1])  # these sources
    return env


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


def run_blocks(blocks: list[Block], env: dict[str, str], where: Path) -> dict[int, Ran]:
    """Run each block as a script (README line -> its exit code and output), in ``where``."""
    paths = {b.line: where / f"block_{b.line}.py" for b in blocks}
    for block in blocks:
        paths[block.line].write_text(block.code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", _RUNNER, *map(str, paths.values())],
        env=env,
        cwd=where,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        line: Ran(
            codes[str(path)],
            Path(f"{path}.out").read_text(encoding="utf-8"),
            Path(f"{path}.err").read_text(encoding="utf-8"),
        )
        for line, path in paths.items()
    }


def assert_ran_clean(block: Block, done: Ran) -> None:
    assert done.code == 0, f"README.md line {block.line} ({block.heading}):\n{done.out}\n{done.err}"
    for noise in ("ResourceWarning", "Exception ignored", "Unclosed"):
        assert noise not in done.err, f"README.md line {block.line}:\n{done.err}"
