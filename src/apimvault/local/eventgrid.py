"""A local Event Grid: push delivery of one event subscription with Event Grid's semantics, on an injected
clock, and the Functions host's queue trigger that consumes a Storage queue destination.

What it reproduces (Learn, "Event Grid message delivery and retry"; see ``infra/README.md`` "Event
delivery" for how the deployed path uses it):

- **At least once, 30 s to answer.** Every attempt hands the event to the destination and measures, on the
  injected clock, how long the destination took to answer. An answer later than ``response_timeout``
  (30 s) is a failed attempt: the event is queued for retry 30 s after it was sent, whatever the handler
  did meanwhile (the Event Grid trigger of Azure Functions answers only when the function returns, so a
  rotation that waits minutes for the gateways fails its delivery although it succeeded).
- **Late answers and duplicates.** If the endpoint answers within 3 minutes Event Grid tries, best effort,
  to remove the queued retry; "duplicates might still be received". ``late_retry_kept`` is the chance that
  the retry still comes, ``duplicate_rate`` the chance that a delivered event comes once more, and
  :meth:`LocalEventGrid.duplicate` plants one. Draws come from the injected ``rng``.
- **Retry schedule.** 10 s, 30 s, 1 min, 5 min, 10 min, 30 min, 1 h, 3 h, 6 h, then every 12 h, each
  counted from the failure (optional ``jitter``: Event Grid adds "a small randomization"), until
  ``max_delivery_attempts`` (default 30) or ``event_ttl_minutes`` (default 1440 = 24 h) runs out; then the
  event is dead-lettered (``dead_lettered``). 400, 403 and 413 from an Azure-resource destination are not
  retried (dead-lettered at once).
- **Metrics** with the system topic's names the alerts use: ``DeliverySuccessCount``,
  ``DeliveryAttemptFailCount``, ``DeadLetteredCount``.

Attempts run one at a time on the caller's thread. A retry that falls due while a handler is still
running is delivered as soon as it returns (real Event Grid would deliver it alongside; overlapping runs are
what the rotation function's lease serialises, tested on their own).

Destinations: :class:`FunctionDestination` (``endpointType: AzureFunction``, the Event Grid trigger) and
:class:`StorageQueueDestination` (``endpointType: StorageQueue``: the attempt is one Put Message, so it is
answered at once). :class:`QueueTriggerHost` then plays the Functions host's queue listener for one
queue-triggered function: receive, invoke, delete on success; on failure make the message visible again
after ``visibilityTimeout`` and, once it has been dequeued ``maxDequeueCount`` times, move it to
``<queue>-poison`` (settings read from ``host.json`` by :meth:`QueueSettings.from_host_json`).

Driving it::

    clock = ...                                  # any () -> float; tests use a manual one
    grid = LocalEventGrid(StorageQueueDestination(queue_client), clock=clock)
    grid.publish(event)                          # one Event Grid schema dict (or a list of them)
    grid.run(advance=clock_advance)              # deliver every attempt, jumping the clock to each
    host = QueueTriggerHost(queue_client, invoke, settings=QueueSettings.from_host_json(path))
    host.drain()                                 # run the function for every visible message

Without Azurite (a drill on a machine with Python only), :class:`MemoryQueue` stands in for the queue client
on the same injected clock. ``azure-storage-queue`` (extra ``local``) is needed only for real queues.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import heapq
import itertools
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "LATE_ANSWER_WINDOW",
    "NOT_RETRIED",
    "RESPONSE_TIMEOUT",
    "RETRY_SCHEDULE",
    "Attempt",
    "DeliveryError",
    "Destination",
    "FunctionDestination",
    "Invocation",
    "LocalEventGrid",
    "MemoryQueue",
    "MemoryQueueError",
    "MemoryQueueMessage",
    "QueueSettings",
    "QueueTriggerHost",
    "ReceivedMessage",
    "StorageQueueDestination",
    "retry_delay",
]

log = logging.getLogger("apimvault.local.eventgrid")

RESPONSE_TIMEOUT = 30.0
"""Seconds Event Grid waits for the endpoint's answer before it counts the attempt as failed."""
LATE_ANSWER_WINDOW = 180.0
"""An answer within 3 minutes makes Event Grid try (best effort) to remove the queued retry."""
RETRY_SCHEDULE: tuple[float, ...] = (10, 30, 60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600)
"""Delays after the 1st, 2nd, ... failed attempt; after the last one, every 12 hours."""
EVERY_12_HOURS = 12 * 3600.0
NOT_RETRIED = frozenset({400, 403, 413})
"""Status codes of an Azure-resource destination that Event Grid dead-letters without retrying."""


def retry_delay(failed_attempts: int) -> float:
    """Seconds from the ``failed_attempts``-th failure to the next attempt (1-based), per the schedule."""
    if failed_attempts < 1:
        raise ValueError("failed_attempts counts from 1")
    if failed_attempts <= len(RETRY_SCHEDULE):
        return float(RETRY_SCHEDULE[failed_attempts - 1])
    return EVERY_12_HOURS


class DeliveryError(Exception):
    """A destination refused an attempt; ``status`` is the HTTP status Event Grid saw (500 by default)."""

    def __init__(self, message: str, *, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


class Destination(Protocol):
    """An event subscription's destination: ``deliver`` returns when the endpoint answered success and
    raises (``DeliveryError`` with a status, or anything else = 500) when it answered failure."""

    endpoint_type: str

    def deliver(self, event: Mapping[str, Any]) -> None: ...


class FunctionDestination:
    """``endpointType: AzureFunction``: the Functions Event Grid trigger. It answers when ``function``
    returns (success) or raises (failure), however long that takes."""

    endpoint_type = "AzureFunction"

    def __init__(self, function: Callable[[dict[str, Any]], object]) -> None:
        self.function = function

    def deliver(self, event: Mapping[str, Any]) -> None:
        self.function(json.loads(json.dumps(event)))  # what the function gets is a fresh copy of the JSON


class StorageQueueDestination:
    """``endpointType: StorageQueue``: one Put Message of the event (one event per message, Event Grid
    schema) on ``queue_client`` (an ``azure.storage.queue.QueueClient``). The body is the event's JSON,
    Base64-encoded (what Event Grid writes today, azure-docs#102923; ``base64=False`` writes the plain
    JSON that older deliveries wrote, azure-docs#69702). ``message_ttl`` is the subscription's
    ``queueMessageTimeToLiveInSeconds`` (-1: never expires). Answered as soon as the message is stored."""

    endpoint_type = "StorageQueue"

    def __init__(self, queue_client: Any, *, base64: bool = True, message_ttl: int | None = -1) -> None:
        self.queue_client = queue_client
        self.base64 = base64
        self.message_ttl = message_ttl

    def encode(self, event: Mapping[str, Any]) -> str:
        text = json.dumps(event, separators=(",", ":"))
        return base64.b64encode(text.encode()).decode("ascii") if self.base64 else text

    def deliver(self, event: Mapping[str, Any]) -> None:
        from azure.core.exceptions import HttpResponseError

        try:
            self.queue_client.send_message(self.encode(event), time_to_live=self.message_ttl)
        except HttpResponseError as exc:
            raise DeliveryError(
                f"Put Message failed: {exc.status_code}", status=exc.status_code or 500
            ) from exc


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One delivery attempt. ``outcome``: ``delivered`` (answered success in time), ``timed-out``
    (answered after ``response_timeout``, success or not), ``failed`` (answered failure in time).
    ``answered_after`` is on the injected clock; ``duplicate`` marks an extra delivery of a delivered
    event."""

    event_id: str
    number: int
    sent_at: float
    answered_after: float
    outcome: str
    status: int | None = None
    error: str | None = None
    duplicate: bool = False


@dataclasses.dataclass
class _Pending:
    event: dict[str, Any]
    published_at: float
    attempts: int = 0
    failures: int = 0


class LocalEventGrid:
    """One event subscription's push delivery (see the module doc). Public state: ``attempts`` (every
    :class:`Attempt`, in order), ``dead_lettered`` (``(event, reason)``), ``metrics``."""

    def __init__(
        self,
        destination: Destination,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_delivery_attempts: int = 30,
        event_ttl_minutes: int = 1440,
        response_timeout: float = RESPONSE_TIMEOUT,
        late_retry_kept: float = 0.0,
        duplicate_rate: float = 0.0,
        jitter: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 1 <= max_delivery_attempts <= 30:
            raise ValueError("max_delivery_attempts is 1-30 (Event Grid's range)")
        if not 1 <= event_ttl_minutes <= 1440:
            raise ValueError("event_ttl_minutes is 1-1440 (Event Grid's range)")
        self.destination = destination
        self.clock = clock
        self.max_delivery_attempts = max_delivery_attempts
        self.event_ttl = event_ttl_minutes * 60.0
        self.response_timeout = response_timeout
        self.late_retry_kept = late_retry_kept
        self.duplicate_rate = duplicate_rate
        self.jitter = jitter
        self.rng = rng or random.Random(0)  # noqa: S311 - delivery draws, not secrets
        self.attempts: list[Attempt] = []
        self.dead_lettered: list[tuple[dict[str, Any], str]] = []
        self.metrics: dict[str, int] = {
            "DeliverySuccessCount": 0,
            "DeliveryAttemptFailCount": 0,
            "DeadLetteredCount": 0,
        }
        self._queue: list[tuple[float, int, _Pending, bool]] = []
        self._seq = itertools.count()
        self._delivered: dict[str, _Pending] = {}

    # -- publishing ---------------------------------------------------------------------------------

    def publish(self, events: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Accept one event or a list (Event Grid schema); each is first delivered at once (now)."""
        items = [events] if isinstance(events, Mapping) else list(events)
        now = self.clock()
        for event in items:
            if not isinstance(event, Mapping) or not isinstance(event.get("id"), str):
                raise ValueError("an Event Grid event is an object with a string id")
            self._schedule(now, _Pending(json.loads(json.dumps(event)), now))

    def duplicate(self, event_id: str, *, after: float = 0.0) -> None:
        """Deliver an already delivered event once more, ``after`` seconds from now (a duplicate)."""
        pending = self._delivered.get(event_id)
        if pending is None:
            raise KeyError(f"event {event_id} has not been delivered")
        self._schedule(self.clock() + after, pending, duplicate=True)

    def _schedule(self, at: float, pending: _Pending, *, duplicate: bool = False) -> None:
        heapq.heappush(self._queue, (at, next(self._seq), pending, duplicate))

    # -- delivering ---------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Attempts still scheduled."""
        return len(self._queue)

    def next_due(self) -> float | None:
        """Clock time of the next scheduled attempt (``None``: nothing left)."""
        return self._queue[0][0] if self._queue else None

    def deliver_due(self) -> list[Attempt]:
        """Make every attempt due by now (the clock when called; one that falls due while these run waits
        for the next call); return them."""
        now = self.clock()
        done: list[Attempt] = []
        while self._queue and self._queue[0][0] <= now:
            _, _, pending, duplicate = heapq.heappop(self._queue)
            done.append(self._attempt(pending, duplicate))
        return done

    def run(self, advance: Callable[[float], None], *, until: float | None = None) -> list[Attempt]:
        """Deliver until nothing is scheduled (or the next attempt is after ``until``), moving the
        injected clock forward to each attempt with ``advance(seconds)``; return the attempts made."""
        done: list[Attempt] = []
        while self._queue:
            due = self._queue[0][0]
            if until is not None and due > until:
                break
            now = self.clock()
            if due > now:
                advance(due - now)
            done.extend(self.deliver_due())
        return done

    def _attempt(self, pending: _Pending, duplicate: bool) -> Attempt:
        event_id = str(pending.event["id"])
        pending.attempts += 1
        sent = self.clock()
        status: int | None = None
        error: str | None = None
        try:
            self.destination.deliver(pending.event)
            ok = True
        except DeliveryError as exc:
            ok, status, error = False, exc.status, str(exc)
        except Exception as exc:  # the function failed: the trigger answers 500
            ok, status, error = False, 500, f"{type(exc).__name__}: {exc}"
        elapsed = self.clock() - sent
        if ok and elapsed <= self.response_timeout:
            outcome = "delivered"
        elif elapsed > self.response_timeout:
            outcome = "timed-out"
        else:
            outcome = "failed"
        attempt = Attempt(event_id, pending.attempts, sent, elapsed, outcome, status, error, duplicate)
        self.attempts.append(attempt)
        log.info(
            "event %s attempt %d%s: %s after %.1f s%s",
            event_id,
            pending.attempts,
            " (duplicate)" if duplicate else "",
            outcome,
            elapsed,
            f" ({error})" if error else "",
        )
        if outcome == "delivered":
            self.metrics["DeliverySuccessCount"] += 1
            self._delivered[event_id] = pending
            if not duplicate and self.rng.random() < self.duplicate_rate:
                self._schedule(self.clock(), pending, duplicate=True)
            return attempt
        self.metrics["DeliveryAttemptFailCount"] += 1
        if duplicate:  # a duplicate's failure: the event was delivered before; nothing is retried
            return attempt
        if outcome == "timed-out" and ok and elapsed <= LATE_ANSWER_WINDOW:
            # Answered late but within 3 minutes: Event Grid tries to remove the queued retry.
            self._delivered[event_id] = pending
            if self.rng.random() >= self.late_retry_kept:
                return attempt
        if status in NOT_RETRIED and outcome == "failed":
            self._dead_letter(pending, f"DeliveryFailed ({status}, not retried)")
            return attempt
        pending.failures += 1
        failed_at = sent + self.response_timeout if outcome == "timed-out" else self.clock()
        delay = retry_delay(pending.failures)
        if self.jitter:
            delay *= 1.0 + self.rng.uniform(-self.jitter, self.jitter)
        next_at = failed_at + delay
        if pending.attempts >= self.max_delivery_attempts:
            self._dead_letter(pending, "MaxDeliveryAttemptsExceeded")
        elif next_at > pending.published_at + self.event_ttl:
            self._dead_letter(pending, "TimeToLiveExceeded")
        else:
            self._schedule(next_at, pending)
        return attempt

    def _dead_letter(self, pending: _Pending, reason: str) -> None:
        self.metrics["DeadLetteredCount"] += 1
        self.dead_lettered.append((pending.event, reason))
        log.warning("event %s dead-lettered: %s", pending.event.get("id"), reason)


# ------------------------------------------------------------------------------------ an in-memory queue


@dataclasses.dataclass
class MemoryQueueMessage:
    """The fields of ``azure.storage.queue.QueueMessage`` that the host and the destination use."""

    id: str
    content: str
    dequeue_count: int
    inserted_on: datetime.datetime
    expires_on: datetime.datetime | None
    next_visible_on: datetime.datetime
    pop_receipt: str | None


@dataclasses.dataclass(frozen=True)
class MemoryQueueProperties:
    approximate_message_count: int


class MemoryQueueError(Exception):
    """A queue operation Azure Storage would refuse (404 MessageNotFound, 400 PopReceiptMismatch)."""

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class MemoryQueue:
    """A Storage queue in memory on the injected ``clock``: the subset of ``azure.storage.queue.QueueClient``
    that :class:`StorageQueueDestination` and :class:`QueueTriggerHost` call, with Azure's semantics for
    visibility timeouts (default 30 s on receive), dequeue counts, pop receipts (a stale one is refused) and
    message time-to-live (default 7 days, -1 never). For a drill that runs without Azurite: visibility
    follows the injected clock, so a ``visibilityTimeout`` of 15 minutes costs no waiting. Tests of the
    deployed path use Azurite (real azure-storage-queue); ``test_rotation_delivery.py`` checks that both give
    the same invocations and poison queue for the same messages."""

    def __init__(self, queue_name: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.queue_name = queue_name
        self.clock = clock
        self._messages: dict[str, MemoryQueueMessage] = {}
        self._ids = itertools.count(1)

    def _at(self, seconds: float) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)

    def _expired(self, message: MemoryQueueMessage) -> bool:
        return message.expires_on is not None and message.expires_on <= self._at(self.clock())

    def create_queue(self) -> None:
        """Idempotent here (Azure answers 409 QueueAlreadyExists only for different metadata)."""

    def close(self) -> None:
        """Nothing to close."""

    def send_message(self, content: str, *, time_to_live: int | None = None) -> MemoryQueueMessage:
        now = self.clock()
        ttl = 7 * 86400 if time_to_live is None else time_to_live
        message = MemoryQueueMessage(
            id=f"{self.queue_name}-{next(self._ids)}",
            content=content,
            dequeue_count=0,
            inserted_on=self._at(now),
            expires_on=None if ttl == -1 else self._at(now + ttl),
            next_visible_on=self._at(now),
            pop_receipt=None,
        )
        self._messages[message.id] = message
        return dataclasses.replace(message)

    def receive_messages(
        self,
        *,
        messages_per_page: int | None = None,
        max_messages: int | None = None,
        visibility_timeout: int | None = None,
    ) -> list[MemoryQueueMessage]:
        now = self.clock()
        limit = max_messages or messages_per_page or 1
        hidden_for = 30 if visibility_timeout is None else visibility_timeout
        taken: list[MemoryQueueMessage] = []
        for message in list(self._messages.values()):
            if self._expired(message):
                del self._messages[message.id]
                continue
            if len(taken) == limit or message.next_visible_on > self._at(now):
                continue
            message.dequeue_count += 1
            message.pop_receipt = uuid.uuid4().hex
            message.next_visible_on = self._at(now + hidden_for)
            taken.append(dataclasses.replace(message))
        return taken

    def _owned(self, message_id: str, pop_receipt: str | None) -> MemoryQueueMessage:
        message = self._messages.get(message_id)
        if message is None or self._expired(message):
            raise MemoryQueueError(f"message {message_id} not found", status_code=404)
        if pop_receipt != message.pop_receipt:
            raise MemoryQueueError(f"pop receipt of {message_id} does not match", status_code=400)
        return message

    def update_message(self, message_id: str, pop_receipt: str | None, *, visibility_timeout: int) -> None:
        message = self._owned(message_id, pop_receipt)
        message.pop_receipt = uuid.uuid4().hex
        message.next_visible_on = self._at(self.clock() + visibility_timeout)

    def delete_message(self, message_id: str, pop_receipt: str | None) -> None:
        self._owned(message_id, pop_receipt)
        del self._messages[message_id]

    def peek_messages(self, *, max_messages: int = 1) -> list[MemoryQueueMessage]:
        now = self._at(self.clock())
        visible = [m for m in self._messages.values() if not self._expired(m) and m.next_visible_on <= now]
        return [dataclasses.replace(m) for m in visible[:max_messages]]

    def get_queue_properties(self) -> MemoryQueueProperties:
        return MemoryQueueProperties(sum(1 for m in self._messages.values() if not self._expired(m)))

    def clear_messages(self) -> None:
        self._messages.clear()


# ------------------------------------------------------------------------------------ the queue trigger

_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})(?:\.\d+)?$")


def _timespan(value: str) -> float:
    """Seconds of a .NET TimeSpan string as host.json writes it (``hh:mm:ss`` or ``d.hh:mm:ss``)."""
    match = _TIMESPAN.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a TimeSpan (hh:mm:ss)")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


@dataclasses.dataclass(frozen=True)
class QueueSettings:
    """``host.json`` ``extensions.queues`` (Storage queues extension 5.x), with its defaults."""

    max_dequeue_count: int = 5
    visibility_timeout: float = 0.0
    batch_size: int = 16
    new_batch_threshold: int | None = None
    message_encoding: str = "base64"
    function_timeout: float | None = None

    @classmethod
    def from_host_json(cls, path: str | Path) -> QueueSettings:
        data = json.loads(Path(path).read_text())
        queues = data.get("extensions", {}).get("queues", {})
        timeout = data.get("functionTimeout")
        return cls(
            max_dequeue_count=int(queues.get("maxDequeueCount", 5)),
            visibility_timeout=_timespan(queues.get("visibilityTimeout", "00:00:00")),
            batch_size=int(queues.get("batchSize", 16)),
            new_batch_threshold=queues.get("newBatchThreshold"),
            message_encoding=str(queues.get("messageEncoding", "base64")),
            function_timeout=_timespan(timeout) if isinstance(timeout, str) else None,
        )


@dataclasses.dataclass(frozen=True)
class ReceivedMessage:
    """A queue message as the host hands it to the function (the trigger metadata of the Functions
    worker: ``Id``, ``DequeueCount``, ``InsertionTime``, ``ExpirationTime``, ``NextVisibleTime``,
    ``PopReceipt``); ``body`` is decoded per ``messageEncoding``."""

    id: str
    body: bytes
    dequeue_count: int
    insertion_time: Any
    expiration_time: Any
    next_visible_time: Any
    pop_receipt: str


@dataclasses.dataclass(frozen=True)
class Invocation:
    """One run of the function: ``outcome`` is ``succeeded``, ``failed`` (message made visible again)
    or ``poisoned`` (failed on its ``maxDequeueCount``-th dequeue: moved to the poison queue; also
    for a message that cannot be decoded or was already dequeued too often, without running)."""

    message_id: str
    dequeue_count: int
    outcome: str
    error: str | None = None
    result: Any = None


class QueueTriggerHost:
    """The Functions host's queue listener for one queue-triggered function (see the module doc).

    ``invoke`` runs the function with a :class:`ReceivedMessage` (tests wrap it into the Functions
    worker's ``QueueMessage`` and call the registered function). While a run lasts its message stays
    invisible for ``processing_visibility`` seconds (the host keeps it invisible, renewing, while the
    function runs; 10 minutes when an instance dies mid-run). ``poison_queue_client`` is
    ``<queue>-poison`` on the same account (:meth:`from_connection_string` makes both clients); it is
    created on first use, as the host does.
    """

    def __init__(
        self,
        queue_client: Any,
        invoke: Callable[[ReceivedMessage], object],
        *,
        settings: QueueSettings | None = None,
        poison_queue_client: Any,
        processing_visibility: int = 600,
    ) -> None:
        self.queue_client = queue_client
        self.invoke = invoke
        self.settings = settings or QueueSettings()
        self.processing_visibility = processing_visibility
        self.poison_queue_client = poison_queue_client
        self.invocations: list[Invocation] = []

    @classmethod
    def from_connection_string(
        cls,
        connection_string: str,
        queue_name: str,
        invoke: Callable[[ReceivedMessage], object],
        **kwargs: Any,
    ) -> QueueTriggerHost:
        """The host for ``queue_name`` on the account of ``connection_string`` (``AzureWebJobsStorage``)."""
        from azure.storage.queue import QueueClient

        queue = QueueClient.from_connection_string(connection_string, queue_name)
        poison = QueueClient.from_connection_string(connection_string, f"{queue_name}-poison")
        return cls(queue, invoke, poison_queue_client=poison, **kwargs)

    def close(self) -> None:
        self.queue_client.close()
        self.poison_queue_client.close()

    def _decode(self, content: str) -> bytes:
        if self.settings.message_encoding == "base64":
            return base64.b64decode(content.encode("ascii"), validate=True)
        return content.encode()

    def _poison(self, message: Any, reason: str) -> None:
        from azure.core.exceptions import ResourceExistsError

        with contextlib.suppress(ResourceExistsError):
            self.poison_queue_client.create_queue()
        self.poison_queue_client.send_message(message.content)
        self.queue_client.delete_message(message.id, message.pop_receipt)
        log.warning(
            "queue message %s moved to %s: %s", message.id, self.poison_queue_client.queue_name, reason
        )

    def poll_once(self) -> list[Invocation]:
        """Receive up to ``batchSize`` visible messages and run the function for each, in order."""
        messages = list(
            self.queue_client.receive_messages(
                messages_per_page=self.settings.batch_size,
                max_messages=self.settings.batch_size,
                visibility_timeout=self.processing_visibility,
            )
        )
        done: list[Invocation] = []
        for message in messages:
            done.append(self._run(message))
        self.invocations.extend(done)
        return done

    def _run(self, message: Any) -> Invocation:
        count = int(message.dequeue_count)
        limit = self.settings.max_dequeue_count
        if count > limit:  # dequeued too often without finishing (instances died): not run again
            self._poison(message, f"dequeued {count} times")
            return Invocation(message.id, count, "poisoned", f"dequeue count {count} > {limit}")
        try:
            body = self._decode(message.content)
        except ValueError as exc:
            self._poison(message, "cannot be decoded")
            return Invocation(message.id, count, "poisoned", f"undecodable: {exc}")
        received = ReceivedMessage(
            id=message.id,
            body=body,
            dequeue_count=count,
            insertion_time=message.inserted_on,
            expiration_time=message.expires_on,
            next_visible_time=message.next_visible_on,
            pop_receipt=message.pop_receipt,
        )
        try:
            result = self.invoke(received)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if count >= limit:
                self._poison(message, f"failed on dequeue {count} of {limit}")
                return Invocation(message.id, count, "poisoned", error)
            self.queue_client.update_message(
                message.id,
                message.pop_receipt,
                visibility_timeout=int(self.settings.visibility_timeout),
            )
            return Invocation(message.id, count, "failed", error)
        self.queue_client.delete_message(message.id, message.pop_receipt)
        return Invocation(message.id, count, "succeeded", None, result)

    def drain(self, *, max_polls: int = 100) -> list[Invocation]:
        """Poll until a poll finds no visible message (messages made visible later, after a non-zero
        ``visibilityTimeout``, are not waited for); return every invocation."""
        done: list[Invocation] = []
        for _ in range(max_polls):
            batch = self.poll_once()
            if not batch:
                return done
            done.extend(batch)
        raise RuntimeError(f"the queue still had messages after {max_polls} polls")
