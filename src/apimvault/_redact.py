"""Keeping keys and tokens out of text: a logging filter (whatever logger a record comes from) and
:func:`redact_text` for everything a command prints (the CLI's output, errors included)."""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

from ._key import fingerprint

__all__ = ["KeyRedactionFilter", "install_log_redaction", "redact_text", "watch_value"]

#: A JSON Web Token (an Entra access token): header and payload are base64url JSON, so they start ``eyJ``.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")

SENSITIVE_HEADERS = frozenset({"ocp-apim-subscription-key", "api-key", "authorization", "subscription-key"})

#: Loggers that can see request headers or secret values at DEBUG.
DEFAULT_LOGGERS = (
    "apimvault",
    "openai",
    "openai._base_client",
    "httpx2",
    "httpx2._client",
    "httpcore2",
    "httpcore2.connection",
    "httpcore2.http11",
    "httpcore2.http2",
    "azure",
    "azure.core.pipeline.policies.http_logging_policy",
    "azure.identity",
)


class KeyRedactionFilter(logging.Filter):
    """Masks sensitive header values and every registered key (value -> ``<redacted:fp>``) in records.

    Providers register nothing themselves: :func:`install_log_redaction` hooks the filter up and
    :meth:`watch` registers the providers whose current keys must never appear.
    """

    def __init__(self) -> None:
        super().__init__()
        self._providers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._values: deque[str] = deque(maxlen=32)  # tokens a command got itself (watch_value)
        # Re-entrant: garbage collection during the WeakSet walk can finalize a client whose close()
        # logs (httpcore2 DEBUG) and so re-enters this filter on the same thread.
        self._lock = threading.RLock()

    def watch(self, provider: Any) -> None:
        with self._lock:
            self._providers.add(provider)

    def watch_value(self, value: str) -> None:
        with self._lock:
            if value and value not in self._values:
                self._values.append(value)

    def _secrets(self) -> list[str]:
        with self._lock:
            providers = list(self._providers)
            values = list(self._values)
        for provider in providers:
            values.extend(provider._redaction_values())
        return values

    def _scrub(self, value: Any, secrets: Iterable[str]) -> Any:
        if isinstance(value, str):
            for secret in secrets:
                if secret in value:
                    value = value.replace(secret, f"<redacted:{fingerprint(secret)}>")
            return value
        if isinstance(value, dict):
            return {
                k: ("<redacted>" if str(k).lower() in SENSITIVE_HEADERS else self._scrub(v, secrets))
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return type(value)(self._scrub(v, secrets) for v in value)
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self._secrets()
        record.msg = self._scrub(record.msg, secrets)
        if record.args:
            if isinstance(record.args, dict):
                record.args = self._scrub(record.args, secrets)
            else:
                args = tuple(self._scrub(a, secrets) for a in record.args)
                # Objects (e.g. httpx2.Headers) are formatted late; format now so the text can be scrubbed.
                if secrets and any(not isinstance(a, str | int | float | type(None)) for a in args):
                    try:
                        record.msg, record.args = self._scrub(str(record.msg) % args, secrets), ()
                    except (TypeError, ValueError):
                        record.args = args
                else:
                    record.args = args
        return True


_FILTER = KeyRedactionFilter()


def install_log_redaction(*providers: Any, loggers: Iterable[str] = DEFAULT_LOGGERS) -> KeyRedactionFilter:
    """Attach the redaction filter to the loggers that can see keys and watch these providers' keys.

    Idempotent. The filter masks ``Ocp-Apim-Subscription-Key`` / ``api-key`` / ``Authorization`` values in
    dict arguments (openai's request-options log) and any watched key wherever it appears in a message.
    Records propagated from child loggers not listed here are not filtered: add handlers' filters with
    ``handler.addFilter(apimvault.install_log_redaction())`` to cover everything a handler emits.
    """
    for name in loggers:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for provider in providers:
        _FILTER.watch(provider)
    return _FILTER


def watch_value(value: str) -> None:
    """Mask ``value`` (a token a command got itself) in logs and in :func:`redact_text` from now on."""
    _FILTER.watch_value(value)


def _held() -> list[str]:
    """Every key and token this process holds: each live provider's current and previous key, the tokens
    of the watched token sources, and the watched values."""
    from ._per_process import PROVIDERS  # every live provider (the registry the fork handler uses)

    values = _FILTER._secrets()
    for provider in list(PROVIDERS):
        values.extend(provider._redaction_values())
    return sorted({v for v in values if v}, key=len, reverse=True)  # longest first: no partial leftovers


def redact_text(text: str) -> str:
    """``text`` with every key and token this process holds replaced by ``<redacted:fingerprint>``, and any
    other JWT by ``<redacted:jwt>`` (an endpoint that echoes request headers in its error body)."""
    if not text:
        return text
    for secret in _held():
        if secret in text:
            text = text.replace(secret, f"<redacted:{fingerprint(secret)}>")
    return _JWT.sub("<redacted:jwt>", text)
