"""apimvault.local.eventgrid's Event Grid semantics on an injected clock (no Azure, no waiting): the 30 s
answer window, the retry schedule up to the TTL / max attempts, late answers, non-retried statuses,
duplicates, and host.json's queue settings."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import pytest

from apimvault.local.eventgrid import (
    RETRY_SCHEDULE,
    DeliveryError,
    FunctionDestination,
    LocalEventGrid,
    MemoryQueue,
    MemoryQueueError,
    QueueSettings,
    QueueTriggerHost,
    ReceivedMessage,
    StorageQueueDestination,
    retry_delay,
)
from tests._support.rotation import ManualClock

HOST_JSON = Path(__file__).resolve().parents[2] / "infra" / "rotation_function" / "host.json"

EVENT = {"id": "e-1", "eventType": "Microsoft.KeyVault.SecretNearExpiry", "subject": "s", "data": {}}


class Endpoint:
    """A destination function that takes ``seconds`` (on the clock) and then fails with ``status`` (or
    succeeds when ``status`` is None); counts its calls."""

    def __init__(self, clock: ManualClock, *, seconds: float = 0.0, status: int | None = None) -> None:
        self.clock, self.seconds, self.status = clock, seconds, status
        self.calls: list[float] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.calls.append(self.clock())
        self.clock.advance(self.seconds)
        if self.status is not None:
            raise DeliveryError("planted", status=self.status)


def _grid(endpoint: Endpoint, clock: ManualClock, **kwargs: Any) -> LocalEventGrid:
    return LocalEventGrid(FunctionDestination(endpoint), clock=clock, **kwargs)


def test_the_retry_schedule_runs_until_the_24_hour_ttl() -> None:
    clock = ManualClock(0.0)
    endpoint = Endpoint(clock, status=503)
    grid = _grid(endpoint, clock)
    grid.publish(EVENT)
    attempts = grid.run(clock.advance)
    # 10 s, 30 s, 1 min, 5 min, 10 min, 30 min, 1 h, 3 h, 6 h, then every 12 h while within 24 h.
    assert [a.sent_at for a in attempts] == [0, 10, 40, 100, 400, 1000, 2800, 6400, 17200, 38800, 82000]
    assert {a.outcome for a in attempts} == {"failed"}
    assert grid.dead_lettered == [(EVENT, "TimeToLiveExceeded")]
    assert grid.metrics == {"DeliverySuccessCount": 0, "DeliveryAttemptFailCount": 11, "DeadLetteredCount": 1}
    assert [retry_delay(n) for n in range(1, 12)] == [*RETRY_SCHEDULE, 43200.0, 43200.0]


def test_max_delivery_attempts_ends_the_retries() -> None:
    clock = ManualClock(0.0)
    grid = _grid(Endpoint(clock, status=500), clock, max_delivery_attempts=3)
    grid.publish(EVENT)
    assert len(grid.run(clock.advance)) == 3
    assert grid.dead_lettered == [(EVENT, "MaxDeliveryAttemptsExceeded")]


@pytest.mark.parametrize("status", [400, 403, 413])
def test_statuses_event_grid_does_not_retry_are_dead_lettered_at_once(status: int) -> None:
    clock = ManualClock(0.0)
    grid = _grid(Endpoint(clock, status=status), clock)
    grid.publish(EVENT)
    assert len(grid.run(clock.advance)) == 1
    assert grid.dead_lettered[0][1] == f"DeliveryFailed ({status}, not retried)"


def test_an_answer_after_30_seconds_fails_the_attempt_even_if_it_succeeded() -> None:
    clock = ManualClock(0.0)
    endpoint = Endpoint(clock, seconds=30.5)
    grid = _grid(endpoint, clock)
    grid.publish(EVENT)
    first = grid.deliver_due()[0]
    assert (first.outcome, first.answered_after) == ("timed-out", 30.5)
    # Answered within 3 minutes: the retry is removed (best effort; late_retry_kept=0 by default).
    assert grid.pending == 0 and grid.metrics["DeliveryAttemptFailCount"] == 1


def test_a_late_answer_within_3_minutes_may_still_be_retried() -> None:
    clock = ManualClock(0.0)
    endpoint = Endpoint(clock, seconds=100.0)
    grid = _grid(endpoint, clock, late_retry_kept=1.0)
    grid.publish(EVENT)
    grid.deliver_due()
    endpoint.seconds = 0.0
    grid.run(clock.advance)
    assert [(a.outcome, a.sent_at) for a in grid.attempts] == [("timed-out", 0.0), ("delivered", 100.0)]
    # The retry was due at 30 + 10 s and went out as soon as the first attempt answered.


def test_an_answer_after_3_minutes_is_always_retried_and_an_answer_in_time_is_not() -> None:
    clock = ManualClock(0.0)
    endpoint = Endpoint(clock, seconds=200.0)
    grid = _grid(endpoint, clock)
    grid.publish(EVENT)
    grid.deliver_due()
    assert grid.next_due() == 40.0  # 30 s answer window + the first retry delay
    endpoint.seconds = 29.0
    assert [a.outcome for a in grid.run(clock.advance)] == ["delivered"]
    assert grid.pending == 0 and grid.metrics["DeliverySuccessCount"] == 1


def test_duplicates_are_delivered_after_success() -> None:
    clock = ManualClock(0.0)
    endpoint = Endpoint(clock)
    grid = _grid(endpoint, clock, duplicate_rate=0.5, rng=random.Random(3))
    grid.publish([{**EVENT, "id": f"e-{i}"} for i in range(40)])
    attempts = grid.run(clock.advance)
    duplicates = [a for a in attempts if a.duplicate]
    assert 0 < len(duplicates) < 40  # some, drawn from the injected rng
    assert len(endpoint.calls) == 40 + len(duplicates)
    grid.duplicate("e-0", after=60.0)
    assert grid.next_due() == clock() + 60.0
    with pytest.raises(KeyError):
        grid.duplicate("never-published")


def test_each_attempt_gets_its_own_copy_of_the_event() -> None:
    clock = ManualClock(0.0)
    seen: list[dict[str, Any]] = []

    def mutate(event: dict[str, Any]) -> None:
        seen.append(event)
        event["data"]["touched"] = True
        raise RuntimeError("boom")

    grid = LocalEventGrid(FunctionDestination(mutate), clock=clock, max_delivery_attempts=2)
    grid.publish(EVENT)
    grid.run(clock.advance)
    assert len(seen) == 2 and seen[0] is not seen[1]
    assert "touched" not in EVENT["data"]
    assert grid.attempts[0].error == "RuntimeError: boom" and grid.attempts[0].status == 500


def test_bad_settings_are_refused() -> None:
    clock = ManualClock(0.0)
    with pytest.raises(ValueError, match="1-30"):
        _grid(Endpoint(clock), clock, max_delivery_attempts=31)
    with pytest.raises(ValueError, match="1-1440"):
        _grid(Endpoint(clock), clock, event_ttl_minutes=0)
    with pytest.raises(ValueError, match="string id"):
        _grid(Endpoint(clock), clock).publish({"eventType": "x"})


def test_queue_settings_read_host_json_with_the_extension_defaults(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    path.write_text(json.dumps({"version": "2.0"}))
    assert QueueSettings.from_host_json(path) == QueueSettings()
    path.write_text(
        json.dumps(
            {
                "functionTimeout": "1.02:00:00",
                "extensions": {"queues": {"visibilityTimeout": "00:15:00", "maxDequeueCount": 3}},
            }
        )
    )
    settings = QueueSettings.from_host_json(path)
    assert settings.function_timeout == 26 * 3600.0
    assert (settings.visibility_timeout, settings.max_dequeue_count) == (900.0, 3)
    path.write_text(json.dumps({"extensions": {"queues": {"visibilityTimeout": "15 minutes"}}}))
    with pytest.raises(ValueError, match="TimeSpan"):
        QueueSettings.from_host_json(path)


def _failing(message: ReceivedMessage) -> None:
    raise RuntimeError(f"run failed on dequeue {message.dequeue_count}")


def test_memory_queue_host_retries_after_the_visibility_timeout_then_poisons() -> None:
    """host.json's 15-minute visibilityTimeout on the injected clock: a failed message is invisible until
    it has passed, and after maxDequeueCount failed runs it is in <queue>-poison."""
    clock = ManualClock(0.0)
    queue, poison = MemoryQueue("rotation", clock=clock), MemoryQueue("rotation-poison", clock=clock)
    settings = QueueSettings.from_host_json(HOST_JSON)
    assert settings.visibility_timeout == 900.0
    grid = LocalEventGrid(StorageQueueDestination(queue), clock=clock)
    grid.publish(EVENT)
    assert [a.outcome for a in grid.deliver_due()] == ["delivered"]
    host = QueueTriggerHost(queue, _failing, settings=settings, poison_queue_client=poison)

    outcomes: list[tuple[int, str]] = []
    for _ in range(settings.max_dequeue_count):
        (run,) = host.poll_once()
        outcomes.append((run.dequeue_count, run.outcome))
        clock.advance(899.0)
        assert host.poll_once() == []  # still invisible just before the visibility timeout
        clock.advance(1.0)
    assert outcomes == [(1, "failed"), (2, "failed"), (3, "failed"), (4, "failed"), (5, "poisoned")]
    assert queue.get_queue_properties().approximate_message_count == 0
    (poisoned,) = poison.receive_messages(max_messages=32)
    assert json.loads(base64.b64decode(poisoned.content)) == EVENT


def test_memory_queue_refuses_a_stale_pop_receipt_and_drops_expired_messages() -> None:
    clock = ManualClock(0.0)
    queue = MemoryQueue("q", clock=clock)
    queue.send_message("a")
    (first,) = queue.receive_messages(visibility_timeout=0)
    (second,) = queue.receive_messages(visibility_timeout=60)
    assert (first.dequeue_count, second.dequeue_count) == (1, 2)
    with pytest.raises(MemoryQueueError) as info:
        queue.delete_message(first.id, first.pop_receipt)
    assert info.value.status_code == 400
    assert queue.receive_messages() == []  # invisible for 60 s
    queue.delete_message(second.id, second.pop_receipt)
    queue.send_message("b", time_to_live=10)
    queue.send_message("c", time_to_live=-1)
    clock.advance(10.0)
    assert [m.content for m in queue.peek_messages(max_messages=5)] == ["c"]
    assert queue.get_queue_properties().approximate_message_count == 1
