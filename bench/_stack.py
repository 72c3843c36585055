"""Where the benchmarks' local Azure runs.

* :func:`prepare_ca` makes the one CA of a benchmark run and points ``SSL_CERT_FILE`` /
  ``REQUESTS_CA_BUNDLE`` at it. It must run before anything imports openai or azure (aiohttp reads
  ``SSL_CERT_FILE`` once, when it is imported), so ``bench/__main__.py`` calls it first.
* The behaviour figures use an in-process :class:`~apimvault.local.LocalAzure` (direct access to faults,
  counters and APIM state).
* The throughput figures use :class:`RemoteStack`: the same stack in a child process with the same CA,
  so the stack's event loop and the client under test do not share one GIL.

Importing this module imports no SDK.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from apimvault.local import LocalCA
from apimvault.local import prepare_ca as _prepare_ca


def prepare_ca(directory: Path | None = None) -> LocalCA:
    """Create the run's CA and trust it process-wide (before openai / azure are imported)."""
    return _prepare_ca(directory if directory is not None else tempfile.mkdtemp(prefix="apimvault-bench-"))


def reuse_ca(directory: Path) -> LocalCA:
    """The CA files :func:`prepare_ca` wrote in ``directory``, without making a new CA."""
    return LocalCA.load(directory)


class RemoteStack:
    """A seeded :class:`~apimvault.local.LocalAzure` in a child process (``python -m bench._stack DIR``).

    ``environ`` holds the variables of :meth:`LocalAzure.environ` (endpoints and the CA; never a key).
    The child stops when its stdin closes.
    """

    def __init__(self, ca: LocalCA) -> None:
        self.ca = ca
        self._proc: subprocess.Popen[str] | None = None
        self.environ: dict[str, str] = {}

    def __enter__(self) -> RemoteStack:
        self._proc = subprocess.Popen(  # noqa: S603 - our own module, with our interpreter
            [sys.executable, "-m", "bench._stack", str(self.ca.directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(10)
            self._proc.stdout.close()
            raise RuntimeError("the benchmark's local Azure child process did not start")
        self.environ = json.loads(line)
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is not None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None


def _child(directory: str) -> None:
    from apimvault.local import LocalAzure

    with LocalAzure(ca=reuse_ca(Path(directory))) as azure:
        print(json.dumps(azure.environ()), flush=True)
        sys.stdin.read()  # until the parent closes our stdin


if __name__ == "__main__":
    _child(sys.argv[1])
