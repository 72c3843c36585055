"""The trust variables (``SSL_CERT_FILE``, ``SSL_CERT_DIR``, ``REQUESTS_CA_BUNDLE``) naming a CA that is gone.

Python's ``ssl``, httpx2 and requests read these variables when a client is made or a request is sent, and
a missing file gives a bare ``FileNotFoundError`` (no path) or an ``OSError`` deep in a stack trace. The
usual cause is a shell that sourced ``apimvault local``'s environment file after the stack stopped (the
stack deletes its CA directory when it stops). :func:`trust_problem` names the variable and the path;
:func:`check_trust_files` raises a :class:`~apimvault.exceptions.ConfigurationError` that says what to do.
"""

from __future__ import annotations

import os

from ._settings import TRUST_VARIABLES
from .exceptions import ConfigurationError

__all__ = ["TRUST_VARIABLES", "check_trust_files", "trust_problem"]


def trust_problem() -> str | None:
    """``"SSL_CERT_FILE=/path does not exist"``: the first trust variable naming a missing path, or None."""
    for name in TRUST_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value and not os.path.exists(value):
            return f"{name}={value} does not exist"
    return None


def trust_error(problem: str) -> ConfigurationError:
    set_ones = " ".join(name for name in TRUST_VARIABLES if os.environ.get(name, "").strip())
    return ConfigurationError(
        f"TLS cannot be set up: {problem}. The trust variables name a CA file that is gone: if they come "
        "from `apimvault local`'s environment file, the stack has stopped (it deletes its CA when it "
        "stops): start `apimvault local` again and re-source the file, or leave the stack's environment "
        f"with `unset {set_ones}` (to trust the system's CAs again)"
    )


def check_trust_files() -> None:
    """Raise :class:`ConfigurationError` naming the variable and the missing path, if any trust variable
    names a path that does not exist."""
    problem = trust_problem()
    if problem is not None:
        raise trust_error(problem)
