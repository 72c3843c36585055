"""Retry policies for the SecretClient a provider builds: azure-core's, minus sleeping on ``Retry-After``.

azure-core's ``RetryPolicy`` retries any response that carries ``Retry-After`` and sleeps that long inside
the call: a Key Vault 429 with ``Retry-After: 45`` held a caller's read for 45 s (cold start, 401 re-read).
Here such a response comes back at once; the provider maps it to ``VaultUnavailableError(retry_after=...)``
and its own back-off honours it (capped by ``CachePolicy.retry_after_max``), so no caller waits for it.
Everything else (which statuses and errors are retried, back-off, ``retry_total``) is azure-core's.
"""

from __future__ import annotations

from typing import Any

from azure.core.pipeline import PipelineResponse
from azure.core.pipeline.policies import AsyncRetryPolicy, RetryPolicy

__all__ = ["AsyncNoRetryAfterSleep", "NoRetryAfterSleep"]


def _carries_retry_after(response: PipelineResponse[Any, Any]) -> bool:
    return bool(response.http_response.headers.get("Retry-After"))


class NoRetryAfterSleep(RetryPolicy[Any, Any]):
    """``RetryPolicy`` that hands a response carrying ``Retry-After`` back instead of sleeping on it."""

    def is_retry(self, settings: dict[str, Any], response: PipelineResponse[Any, Any]) -> bool:
        return not _carries_retry_after(response) and super().is_retry(settings, response)


class AsyncNoRetryAfterSleep(AsyncRetryPolicy[Any, Any]):
    """The aio twin of :class:`NoRetryAfterSleep`."""

    def is_retry(self, settings: dict[str, Any], response: PipelineResponse[Any, Any]) -> bool:
        return not _carries_retry_after(response) and super().is_retry(settings, response)
