"""Queue-backed delivery (issue 19 item 4): Event Grid -> Storage queue -> the queue-triggered function.

The real function code runs: ``function_app.py``'s registered queue trigger (called with the Functions
worker's own ``QueueMessage`` converter) -> ``rotation_handler`` -> ``apimvault.rotation``, against the local
stack (Key Vault, ARM, gateway) and Azurite (the lease blob, the queue and its poison queue; real
azure-storage-blob / azure-storage-queue over TLS on 127.0.0.1). Event Grid is
:mod:`apimvault.local.eventgrid` on an injected clock: nothing waits for time.

- Through the Event Grid trigger (the old path) a rotation longer than 30 s fails its delivery (the
  delivery-failure alert's metric) and is redelivered.
- Through the queue the delivery is answered at once, and duplicates (Event Grid's and concurrent
  instances') end in one rotation.
- A message that fails ``maxDequeueCount`` times is in ``<queue>-poison``.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("azure.storage.queue")
pytest.importorskip("azure.functions")

from azure.core.exceptions import ResourceExistsError
from azure.functions import meta
from azure.functions.queue import QueueMessageInConverter
from azure.storage.queue import QueueClient

from apimvault.local import LocalAzure, temporary_environ
from apimvault.local.eventgrid import (
    FunctionDestination,
    LocalEventGrid,
    MemoryQueue,
    QueueSettings,
    QueueTriggerHost,
    ReceivedMessage,
    StorageQueueDestination,
)
from apimvault.rotation import RotationConfig
from tests._support.cli import RotatingApp, assert_no_key, gateway_status, new_rotating_app
from tests._support.events import near_expiry_event
from tests._support.paths import FUNCTION_DIR
from tests._support.rotation import ManualClock

from .azurite import Azurite, azurite, azurite_storage  # noqa: F401 - the fixtures

HOST_JSON = FUNCTION_DIR / "host.json"


def _datum(value: Any) -> meta.Datum:
    return meta.Datum(value, "int" if isinstance(value, int) else "string")


def worker_message(message: ReceivedMessage) -> Any:
    """The ``azure.functions.QueueMessage`` the Python worker builds from the host's trigger metadata."""
    metadata = {
        "Id": _datum(message.id),
        "DequeueCount": _datum(message.dequeue_count),
        "InsertionTime": _datum(message.insertion_time.isoformat()),
        "ExpirationTime": _datum(message.expiration_time.isoformat()),
        "NextVisibleTime": _datum(message.next_visible_time.isoformat()),
        "PopReceipt": _datum(message.pop_receipt),
    }
    return QueueMessageInConverter.decode(
        meta.Datum(message.body.decode(), "string"), trigger_metadata=metadata
    )


@pytest.fixture
def function_app(function_dir: Path) -> ModuleType:
    return importlib.import_module("function_app")


@pytest.fixture
def registered(function_app: ModuleType) -> Callable[[ReceivedMessage], object]:
    """The queue-triggered function as the host finds it in ``function_app.app``, called the way the
    worker calls it."""
    (function,) = function_app.app.get_functions()
    (binding,) = function.get_bindings()
    assert binding.type == "queueTrigger"
    user_function = function.get_user_function()

    def invoke(message: ReceivedMessage) -> object:
        return user_function(worker_message(message))

    return invoke


@pytest.fixture
def queues(azurite_storage: Azurite, handler: ModuleType) -> Iterator[tuple[QueueClient, QueueClient]]:  # noqa: F811
    """The rotation queue and its poison queue, fresh (empty) for each test."""
    name = handler.ROTATION_QUEUE
    queue = QueueClient.from_connection_string(azurite_storage.connection_string, name)
    poison = QueueClient.from_connection_string(azurite_storage.connection_string, f"{name}-poison")
    for client in (queue, poison):
        try:
            client.create_queue()
        except ResourceExistsError:  # from an earlier test: empty it
            client.clear_messages()
    yield queue, poison
    for client in (queue, poison):
        client.clear_messages()
        client.close()


def _host(
    queues: tuple[QueueClient, QueueClient], invoke: Callable[[ReceivedMessage], object]
) -> QueueTriggerHost:
    queue, poison = queues
    # host.json as deployed, except that a failed message is visible again at once (instead of after
    # visibilityTimeout) so the test need not wait; test_host_json_... checks the deployed figures.
    settings = QueueSettings.from_host_json(HOST_JSON)
    settings = QueueSettings(**{**settings.__dict__, "visibility_timeout": 0.0})
    return QueueTriggerHost(queue, invoke, settings=settings, poison_queue_client=poison)


def _app_with_version(azure: LocalAzure) -> tuple[RotatingApp, Any]:
    app = new_rotating_app(azure)
    tags = dict(azure.keyvault.latest(app.name).tags or {})
    azure.keyvault.put_secret(
        app.name, app.keys()[0], content_type="text/plain", tags=tags, expires=2_000_000_000
    )
    return app, azure.keyvault.latest(app.name)


def _env(azure: LocalAzure, app: RotatingApp, storage: Azurite, **extra: str | None) -> dict[str, str | None]:
    return {
        "APIMVAULT_SECRET_NAME": app.name,
        "APIMVAULT_APIM_SUBSCRIPTION_ID": app.resource_id,
        "AZURE_CLIENT_ID": azure.rotator_identity.client_id,  # infra's rotator, granted by new_rotating_app
        "AzureWebJobsStorage": storage.connection_string,  # the lease, as in the deployed app
        **extra,
    }


def test_host_json_gives_a_rotation_room_and_moves_failures_to_the_poison_queue(handler: ModuleType) -> None:
    settings = QueueSettings.from_host_json(HOST_JSON)
    longest = (
        handler.DEFAULT_LEASE_WAIT + handler.DEFAULT_FUNCTION_PROPAGATION_TIMEOUT + handler.ROTATION_OVERHEAD
    )
    assert longest == 780.0  # 1 min lease wait + 10 min propagation + 2 min of calls and probes
    # the handler's figure is the rotation's own default (RotationConfig reads the same variable)
    assert RotationConfig().propagation_timeout == handler.DEFAULT_FUNCTION_PROPAGATION_TIMEOUT
    assert settings.function_timeout is not None and settings.function_timeout > longest
    # A run that failed (e.g. another run held the lease) is retried only after the longest run is over.
    assert settings.visibility_timeout >= settings.function_timeout
    assert settings.max_dequeue_count == 5
    assert settings.batch_size == 1 and settings.new_batch_threshold == 0  # one message at a time
    assert settings.message_encoding == "none"  # the handler decodes Event Grid's Base64 or plain JSON


def test_function_app_registers_one_queue_trigger_on_the_rotation_queue(
    function_app: ModuleType, handler: ModuleType
) -> None:
    (function,) = function_app.app.get_functions()
    assert function.get_function_name() == function_app.FUNCTION_NAME == "rotate_apim_key"
    (binding,) = function.get_bindings()
    assert binding.type == "queueTrigger"
    assert binding.queue_name == handler.ROTATION_QUEUE == "apimvault-rotation-events"
    assert binding.connection == "AzureWebJobsStorage"
    # What the host reads from the indexed function (the function.json of the v2 model).
    assert json.loads(function.get_function_json())["bindings"] == [
        {
            "direction": "IN",
            "type": "queueTrigger",
            "name": "msg",
            "queueName": "apimvault-rotation-events",
            "connection": "AzureWebJobsStorage",
        }
    ]


def test_a_long_rotation_through_the_event_grid_trigger_times_out_and_is_redelivered(
    azure: LocalAzure,
    azurite_storage: Azurite,  # noqa: F811
    handler: ModuleType,
) -> None:
    """The old path: Event Grid -> Event Grid trigger, which answers when the function returns. The
    gateways take 4 minutes (on the injected clock) to accept the new key."""
    app, v1 = _app_with_version(azure)
    before = len(azure.keyvault.versions(app.name))
    clock = ManualClock()

    probed: list[str] = []

    def slow_gateways(step: str) -> None:
        # the rotation probes each gateway URL several times (consecutive 2xx): the 4 minutes pass once
        if step == "probe" and not probed:
            clock.advance(240.0)
        if step == "probe":
            probed.append(step)

    runs: list[Any] = []

    def event_grid_trigger(event: dict[str, Any]) -> None:
        runs.append(handler.handle_event(event, on_step=slow_gateways))

    grid = LocalEventGrid(FunctionDestination(event_grid_trigger), clock=clock)
    event = near_expiry_event(vault_url=azure.vault_url, secret=app.name, version=v1.version)
    with temporary_environ(_env(azure, app, azurite_storage)):
        grid.publish(event)
        attempts = grid.run(clock.advance)

    first, second = attempts
    assert (first.outcome, first.answered_after) == ("timed-out", 240.0)  # the rotation itself succeeded
    assert second.outcome == "delivered" and second.number == 2
    assert second.sent_at - first.sent_at == 240.0  # due at 30 s + 10 s, sent once the first returned
    assert [r.skipped for r in runs] == [False, True]  # redelivered: ran twice, the second found it done
    assert grid.metrics["DeliveryAttemptFailCount"] == 1  # what pages the delivery-failure alert
    assert len(azure.keyvault.versions(app.name)) == before + 1


def test_through_the_queue_the_delivery_is_answered_at_once_and_duplicates_rotate_once(
    azure: LocalAzure,
    azurite_storage: Azurite,  # noqa: F811
    queues: tuple[QueueClient, QueueClient],
    handler: ModuleType,
    registered: Callable[[ReceivedMessage], object],
) -> None:
    app, v1 = _app_with_version(azure)
    before = len(azure.keyvault.versions(app.name))
    clock = ManualClock()
    queue, poison = queues
    grid = LocalEventGrid(StorageQueueDestination(queue), clock=clock, duplicate_rate=1.0)
    event = near_expiry_event(vault_url=azure.vault_url, secret=app.name, version=v1.version)
    grid.publish(event)
    grid.run(clock.advance)
    grid.duplicate(event["id"], after=3600.0)  # and one more, an hour later
    grid.run(clock.advance)
    attempts = grid.attempts

    assert [(a.outcome, a.answered_after, a.duplicate) for a in attempts] == [
        ("delivered", 0.0, False),
        ("delivered", 0.0, True),
        ("delivered", 0.0, True),
    ]
    assert grid.metrics == {"DeliverySuccessCount": 3, "DeliveryAttemptFailCount": 0, "DeadLetteredCount": 0}
    assert queue.get_queue_properties().approximate_message_count == 3

    host = _host(queues, registered)
    with temporary_environ(_env(azure, app, azurite_storage)):
        invocations = host.drain()

    assert [i.outcome for i in invocations] == ["succeeded"] * 3
    assert len(azure.keyvault.versions(app.name)) == before + 1  # one rotation for three deliveries
    latest = azure.keyvault.latest(app.name)
    assert (latest.tags or {})["CredentialId"] == "secondary" and gateway_status(azure, latest.value) == 200
    assert queue.get_queue_properties().approximate_message_count == 0
    assert list(poison.peek_messages(max_messages=32)) == []
    assert_no_key(repr(invocations) + repr(attempts), app.seen_keys | set(app.keys()))


@pytest.mark.slow  # real lease back-off (seconds) while instances wait: in CI's `-m slow` run
def test_duplicates_taken_by_concurrent_instances_rotate_once_under_the_lease(
    caplog: pytest.LogCaptureFixture,
    azure: LocalAzure,
    azurite_storage: Azurite,  # noqa: F811
    queues: tuple[QueueClient, QueueClient],
    handler: ModuleType,
    registered: Callable[[ReceivedMessage], object],
) -> None:
    """Three deliveries of one event, each taken by its own instance at the same time: the lease lets one
    rotate; the others wait for it, then find the version rotated and skip."""
    app, v1 = _app_with_version(azure)
    before = len(azure.keyvault.versions(app.name))
    queue, _ = queues
    grid = LocalEventGrid(StorageQueueDestination(queue), clock=ManualClock())
    event = near_expiry_event(vault_url=azure.vault_url, secret=app.name, version=v1.version)
    grid.publish(event)
    grid.deliver_due()
    grid.duplicate(event["id"])
    grid.duplicate(event["id"])
    grid.deliver_due()

    results: list[Any] = []
    lock = threading.Lock()

    def instance(host: QueueTriggerHost) -> None:
        done = host.poll_once()
        with lock:
            results.extend(done)

    hosts = [_host(queues, registered) for _ in range(3)]
    for h in hosts:  # one message per instance
        h.settings = QueueSettings(**{**h.settings.__dict__, "batch_size": 1})
    with (
        temporary_environ(_env(azure, app, azurite_storage, APIMVAULT_LEASE_WAIT="120")),
        caplog.at_level(logging.INFO, logger="apimvault.rotation_function"),
    ):
        threads = [threading.Thread(target=instance, args=(h,)) for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)

    assert sorted(i.outcome for i in results) == ["succeeded"] * 3
    # The function returns nothing (a queue trigger); its log says what each run did.
    messages = [r.getMessage() for r in caplog.records if r.name == "apimvault.rotation_function"]
    assert len([m for m in messages if m.startswith("rotated:")]) == 1
    assert len([m for m in messages if m.startswith("rotation skipped:")]) == 2
    assert len(azure.keyvault.versions(app.name)) == before + 1


def test_a_message_failing_max_dequeue_count_times_lands_in_the_poison_queue(
    azure: LocalAzure,
    azurite_storage: Azurite,  # noqa: F811
    queues: tuple[QueueClient, QueueClient],
    handler: ModuleType,
    registered: Callable[[ReceivedMessage], object],
) -> None:
    """The function runs as an identity without the rotator's rights: every run fails (AccessDenied)."""
    app, v1 = _app_with_version(azure)
    before = len(azure.keyvault.versions(app.name))
    queue, poison = queues
    grid = LocalEventGrid(StorageQueueDestination(queue), clock=ManualClock())
    event = near_expiry_event(vault_url=azure.vault_url, secret=app.name, version=v1.version)
    grid.publish(event)
    assert [a.outcome for a in grid.run(ManualClock().advance)] == ["delivered"]  # Event Grid is done

    host = _host(queues, registered)
    with temporary_environ(_env(azure, app, azurite_storage, AZURE_CLIENT_ID=None)):
        invocations = host.drain()

    assert [(i.dequeue_count, i.outcome) for i in invocations] == [
        (1, "failed"),
        (2, "failed"),
        (3, "failed"),
        (4, "failed"),
        (5, "poisoned"),
    ]
    assert all("AccessDenied" in (i.error or "") or "Forbidden" in (i.error or "") for i in invocations)
    assert queue.get_queue_properties().approximate_message_count == 0
    (poisoned,) = poison.receive_messages(max_messages=32)
    assert handler.event_from_queue_message(poisoned.content)["id"] == event["id"]
    assert azure.keyvault.latest(app.name).version == v1.version  # nothing was rotated
    assert len(azure.keyvault.versions(app.name)) == before


@pytest.mark.parametrize("encoded", [True, False], ids=["base64", "plain-json"])
def test_the_handler_reads_event_grid_queue_messages_either_encoding(
    handler: ModuleType, encoded: bool
) -> None:
    event = near_expiry_event(vault_url="https://kv.vault.azure.net", secret="s", version="0" * 32)
    body = StorageQueueDestination(None, base64=encoded).encode(event)
    assert handler.event_from_queue_message(body) == event
    assert handler.event_from_queue_message(f"[{body}]" if not encoded else body) == event
    with pytest.raises(handler.InvalidEventError):
        handler.event_from_queue_message("not an event")
    with pytest.raises(handler.InvalidEventError):
        handler.event_from_queue_message("[1, 2]")


def test_the_memory_queue_gives_the_host_what_azurite_gives_it(
    queues: tuple[QueueClient, QueueClient], handler: ModuleType
) -> None:
    """The drill's in-memory queue against the real one: the same deliveries, one event whose run always
    fails and one that succeeds, end in the same invocations and the same poison queue."""

    def invoke(message: ReceivedMessage) -> None:
        if handler.event_from_queue_message(message.body)["id"] == "bad":
            raise RuntimeError("planted failure")

    def script(queue: Any, poison: Any) -> tuple[list[tuple[str, int, str]], list[str]]:
        grid = LocalEventGrid(StorageQueueDestination(queue), clock=ManualClock())
        grid.publish([{"id": "good", "data": {}}, {"id": "bad", "data": {}}])
        grid.deliver_due()
        settings = QueueSettings(
            **{**QueueSettings.from_host_json(HOST_JSON).__dict__, "visibility_timeout": 0.0}
        )
        host = QueueTriggerHost(queue, invoke, settings=settings, poison_queue_client=poison)
        bodies = {m.id: m.content for m in queue.peek_messages(max_messages=32)}
        runs = sorted(
            (handler.event_from_queue_message(bodies[i.message_id])["id"], i.dequeue_count, i.outcome)
            for i in host.drain()
        )
        poisoned = [
            handler.event_from_queue_message(m.content)["id"] for m in poison.peek_messages(max_messages=32)
        ]
        return runs, poisoned

    clock = ManualClock()
    memory = script(MemoryQueue("rotation", clock=clock), MemoryQueue("rotation-poison", clock=clock))
    azurite_result = script(*queues)
    assert memory == azurite_result
    assert memory[1] == ["bad"] and ("good", 1, "succeeded") in memory[0]
    assert [r for r in memory[0] if r[0] == "bad"][-1] == ("bad", 5, "poisoned")
