"""Retry policies for the SecretClient a provider builds: azure-core's, minus sleeping on ``Retry-After``.

azure-core's ``RetryPolicy`` retries any response that carries ``Retry-After`` (or ``retry-after-ms`` /
``x-ms-retry-after-ms``) and sleeps that long inside the call: a Key Vault 429 with ``Retry-After: 45`` held
a caller's read for 45 s (cold start, 401 re-read). Here such a response comes back at once; the provider
maps it to ``VaultUnavailableError(retry_after=...)`` (:func:`retry_after_seconds`) and its own back-off
honours it (capped by ``CachePolicy.retry_after_max``), so no caller waits for it.
Everything else (which statuses and errors are retried, back-off, ``retry_total``) is azure-core's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

from azure.core.pipeline import PipelineResponse
from azure.core.pipeline.policies import AsyncRetryPolicy, RetryPolicy

__all__ = ["AsyncNoRetryAfterSleep", "NoRetryAfterSleep", "retry_after_seconds"]

#: Headers azure-core's ``RetryPolicy`` sleeps on, in its order: seconds (or an HTTP date), then milliseconds.
_SECONDS = "retry-after"
_MILLISECONDS = ("retry-after-ms", "x-ms-retry-after-ms")


def _number(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value == value and value not in (float("inf"), float("-inf")) else None


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The delay a response asks for, in seconds, read as azure-core reads it: ``Retry-After`` (seconds
    or an HTTP date), else ``retry-after-ms`` / ``x-ms-retry-after-ms`` (milliseconds). ``None`` if none
    is present or parseable. Never negative."""
    lowered = {k.lower(): v for k, v in headers.items()}
    raw = lowered.get(_SECONDS)
    if raw:
        value = _number(raw)
        if value is None:
            try:
                value = parsedate_to_datetime(raw).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
        return max(0.0, value)
    for name in _MILLISECONDS:
        raw = lowered.get(name)
        if raw:
            value = _number(raw)
            return None if value is None else max(0.0, value / 1000.0)
    return None


def _carries_retry_after(response: PipelineResponse[Any, Any]) -> bool:
    names = {_SECONDS, *_MILLISECONDS}
    return any(value for name, value in response.http_response.headers.items() if name.lower() in names)


class NoRetryAfterSleep(RetryPolicy[Any, Any]):
    """``RetryPolicy`` that hands a response carrying ``Retry-After`` (or ``retry-after-ms`` /
    ``x-ms-retry-after-ms``) back instead of sleeping on it."""

    def is_retry(self, settings: dict[str, Any], response: PipelineResponse[Any, Any]) -> bool:
        return not _carries_retry_after(response) and super().is_retry(settings, response)


class AsyncNoRetryAfterSleep(AsyncRetryPolicy[Any, Any]):
    """The aio twin of :class:`NoRetryAfterSleep`."""

    def is_retry(self, settings: dict[str, Any], response: PipelineResponse[Any, Any]) -> bool:
        return not _carries_retry_after(response) and super().is_retry(settings, response)
