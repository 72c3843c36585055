"""The logging filter: masks key headers and any watched key wherever it appears in a record."""

from __future__ import annotations

import logging

import pytest

from apimvault import SubscriptionKeyProvider, install_log_redaction
from apimvault.local import LocalAzure

from .core_helpers import new_app_secret


def test_watched_key_and_key_headers_are_masked(azure: LocalAzure, caplog: pytest.LogCaptureFixture) -> None:
    app = new_app_secret(azure)
    provider = SubscriptionKeyProvider(azure.vault_url, app.name)
    key = provider.get()
    install_log_redaction(provider)
    log = logging.getLogger("openai._base_client")
    with caplog.at_level(logging.DEBUG, logger="openai._base_client"):
        log.debug("Request options: %s", {"headers": {"Ocp-Apim-Subscription-Key": key, "X-Other": "ok"}})
        log.debug("sending %s with key=%s", "POST", key)
        log.debug("headers %s", {"api-key": "anything", "Authorization": "Bearer abc"})
        log.debug(f"formatted early {key}")
    text = caplog.text
    assert key not in text
    assert "X-Other" in text and "ok" in text  # other values survive
    assert "<redacted" in text
    assert "Bearer abc" not in text


def test_install_is_idempotent() -> None:
    first = install_log_redaction()
    second = install_log_redaction()
    assert first is second
    assert logging.getLogger("httpx2").filters.count(first) == 1
