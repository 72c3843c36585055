"""The rotation function's thin handler: envelope checks and the Functions adapter (no Azure needed).

The end-to-end rotation against the local stack is in test_rotation_function.py (it activates once
``apimvault.rotation`` exists).
"""

from __future__ import annotations

import datetime
import importlib
import json
from types import ModuleType
from typing import Any

import pytest

from tests._support.events import near_expiry_event

VAULT = "https://kv-apimvault-local.vault.azure.net"
SECRET = "apim-subscription-key"
VERSION = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def _event(**overrides: Any) -> dict[str, Any]:
    return near_expiry_event(vault_url=VAULT, secret=SECRET, version=VERSION, **overrides)


def test_parse_accepts_a_near_expiry_event_and_returns_a_copy(
    handler: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APIMVAULT_SECRET_NAME", SECRET)
    event = _event(nbf=1764150000, exp=1769334000)
    parsed = handler.parse_event(event)
    assert parsed == event
    assert parsed is not event and parsed["data"] is not event["data"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e.update(eventType="Microsoft.KeyVault.SecretNewVersionCreated"), "is not handled"),
        (lambda e: e.update(subject="other-secret"), "differ"),
        (lambda e: e["data"].update(ObjectType="Key"), "is not Secret"),
        (lambda e: e["data"].pop("Version"), "data.Version"),
        (lambda e: e.pop("data"), "data missing"),
        (lambda e: e.pop("id"), "event id"),
    ],
)
def test_parse_refuses_malformed_or_foreign_events(
    handler: ModuleType, mutate: Any, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("APIMVAULT_SECRET_NAME", raising=False)
    event = _event()
    mutate(event)
    with pytest.raises(handler.InvalidEventError, match=message):
        handler.parse_event(event)


def test_parse_refuses_another_secret_than_the_configured_one(
    handler: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APIMVAULT_SECRET_NAME", "some-other-secret")
    with pytest.raises(handler.InvalidEventError, match="is not 'some-other-secret'"):
        handler.parse_event(_event())
    assert handler.parse_event(_event(), expected_secret=SECRET)["subject"] == SECRET


def test_invalid_event_error_is_a_value_error(handler: ModuleType) -> None:
    assert issubclass(handler.InvalidEventError, ValueError)


def test_event_to_dict_rebuilds_the_event_grid_schema(handler: ModuleType) -> None:
    original = _event()

    class FakeEvent:  # the attributes of azure.functions.EventGridEvent
        id = original["id"]
        topic = original["topic"]
        subject = original["subject"]
        event_type = original["eventType"]
        event_time = datetime.datetime(2026, 11, 26, 10, 0, tzinfo=datetime.UTC)
        data_version = "1"

        def get_json(self) -> Any:
            return original["data"]

    rebuilt = handler.event_to_dict(FakeEvent())
    assert rebuilt["eventTime"] == "2026-11-26T10:00:00+00:00"
    assert {k: v for k, v in rebuilt.items() if k != "eventTime"} == {
        k: v for k, v in original.items() if k != "eventTime"
    }


def test_function_app_hands_the_queue_message_to_the_handler(
    function_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    func = pytest.importorskip("azure.functions")
    function_app = importlib.import_module("function_app")
    functions = function_app.app.get_functions()
    assert [f.get_function_name() for f in functions] == [function_app.FUNCTION_NAME]
    assert [b.type for b in functions[0].get_bindings()] == ["queueTrigger"]
    # The runtime hands the function a QueueMessage; the adapter passes its body and metadata on.
    original = _event()
    seen: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(function_app, "handle_queue_message", lambda body, **kw: seen.append((body, kw)))
    body = json.dumps(original).encode()
    functions[0].get_user_function()(func.QueueMessage(id="m-1", body=body))
    assert seen == [(body, {"message_id": "m-1", "dequeue_count": None})]
