"""A logging filter that keeps subscription keys out of log records, whatever logger they come from."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from ._key import fingerprint

__all__ = ["KeyRedactionFilter", "install_log_redaction"]

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
        # Re-entrant: garbage collection during the WeakSet walk can finalize a client whose close()
        # logs (httpcore2 DEBUG) and so re-enters this filter on the same thread.
        self._lock = threading.RLock()

    def watch(self, provider: Any) -> None:
        with self._lock:
            self._providers.add(provider)

    def _secrets(self) -> list[str]:
        with self._lock:
            providers = list(self._providers)
        values: list[str] = []
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
