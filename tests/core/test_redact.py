"""The logging filter: masks key headers and any watched key wherever it appears in a record."""

from __future__ import annotations

import logging

import pytest

from apimvault import SubscriptionKeyProvider, install_log_redaction
from apimvault.local import LocalAzure
from tests._support.core import new_app_secret


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


def test_redact_text_masks_every_key_and_token_the_process_holds(azure: LocalAzure) -> None:
    from apimvault import SubscriptionKeyProvider
    from apimvault._redact import redact_text, watch_value
    from tests._support.core import new_app_secret

    app = new_app_secret(azure)
    key = app.subscription.primary_key
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJhcGk6Ly94In0.c2lnbmF0dXJl"
    assert redact_text(f"echo {key}") == f"echo {key}"  # not held by any provider yet
    with SubscriptionKeyProvider(azure.vault_url, app.name) as provider:  # no client: never watched for logs
        provider.get_key()
        masked = redact_text(
            f"headers: {{'ocp-apim-subscription-key': '{key}', 'authorization': 'Bearer {jwt}'}}"
        )
    assert key not in masked and f"<redacted:{provider.current().fingerprint}>" in masked  # type: ignore[union-attr]
    assert jwt not in masked and "<redacted:jwt>" in masked
    watch_value("opaque-token-value-1234")
    assert redact_text("x opaque-token-value-1234 y").startswith("x <redacted:")
