"""How the drill's rotations are delivered: as in the deployed function (infra/README.md "Event delivery").

A ``SecretNearExpiry`` event goes to the local Event Grid (:class:`apimvault.local.eventgrid.LocalEventGrid`),
whose ``StorageQueue`` destination puts it on the queue ``apimvault-rotation-events``; the Functions host's
queue listener (:class:`~apimvault.local.eventgrid.QueueTriggerHost`, with host.json's queue settings)
receives it and calls the rotation function's handler,
:func:`apimvault.rotation.function.handle_queue_message`, which rotates as the rotator identity. The queue is
Azurite's (``node_modules/.bin/azurite-queue`` under the working directory, or ``azurite-queue`` on PATH,
plus Node.js), started on 127.0.0.1 over TLS with a CA of the drill's own; then the handler also holds its
per-secret blob lease on Azurite's blob service, as in Azure. Without Azurite (a machine with Python only)
the queue is :class:`~apimvault.local.eventgrid.MemoryQueue` and the handler runs without a lease (the drill
itself serialises its deliveries but for the overlapping duplicate, which the library's own check resolves).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ...exceptions import ConfigurationError
from ...local.azurite import AZURITE_ACCOUNT, AZURITE_ACCOUNT_KEY, azurite_service
from .config import DELIVERIES as CHOICES


def host_settings() -> Any:
    """``infra/rotation_function/host.json``'s ``extensions.queues`` and ``functionTimeout`` (the wheel does
    not carry host.json; tests/cli/test_drill_delivery.py checks these equal the file's)."""
    from ...local.eventgrid import QueueSettings

    return QueueSettings(
        max_dequeue_count=5,
        visibility_timeout=900.0,
        batch_size=1,
        new_batch_threshold=0,
        message_encoding="none",
        function_timeout=900.0,
    )


def find_azurite(cwd: Path | None = None) -> Path | None:
    """``azurite-queue`` (with its sibling ``azurite-blob``) under ``./node_modules/.bin`` or on PATH, if
    Node.js is on PATH too; else ``None``."""
    if shutil.which("node") is None:
        return None
    local = (cwd or Path.cwd()) / "node_modules" / ".bin" / "azurite-queue"
    candidates = [local] if local.exists() else []
    found = shutil.which("azurite-queue")
    if found:
        candidates.append(Path(found))
    for program in candidates:
        if (program.parent / "azurite-blob").exists():
            return program.parent
    return None


@dataclasses.dataclass
class Outcome:
    """One run of the handler for one queue message."""

    message_id: str
    dequeue_count: int
    result: Any = None
    error: BaseException | None = None


class Delivery:
    """Event Grid -> Storage queue -> queue trigger -> the rotation function's handler (see the module)."""

    def __init__(
        self,
        kind: str,
        queue: Any,
        poison: Any,
        *,
        lease_container: Any = None,
        why: str = "",
    ) -> None:
        from ...local.eventgrid import LocalEventGrid, StorageQueueDestination

        self.kind = kind  # "azurite" | "memory"
        self.why = why
        self.queue = queue
        self.poison = poison
        self.lease_container = lease_container
        self.grid = LocalEventGrid(StorageQueueDestination(queue))
        self.settings = host_settings()
        self.credential: Any = None
        self.config: Any = None
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {
            "path": "Event Grid (local) -> Storage queue -> queue trigger -> "
            "apimvault.rotation.function.handle_queue_message",
            "queue": f"{self.kind}:{self.queue.queue_name}",
            "kind": self.kind,
            "lease": "blob lease on Azurite" if self.lease_container is not None else "none (no storage)",
            "why": self.why,
            "event_grid": dict(self.grid.metrics),
            "invocations": [
                {"dequeue_count": o.dequeue_count, "outcome": "failed" if o.error else "succeeded"}
                for o in self.outcomes
            ],
        }

    def _lease(self, secret_name: str) -> Any:
        from ...rotation.function import NO_LEASE, RotationLease

        if self.lease_container is None:
            return NO_LEASE
        return RotationLease(self.lease_container, secret_name)

    def _host(self, on_step: Callable[[str], None] | None, secret_name: str) -> Any:
        from ...local.eventgrid import QueueTriggerHost, ReceivedMessage
        from ...rotation.function import handle_queue_message

        def invoke(message: ReceivedMessage) -> object:
            outcome = Outcome(message.id, message.dequeue_count)
            try:
                outcome.result = handle_queue_message(
                    message.body,
                    message_id=message.id,
                    dequeue_count=message.dequeue_count,
                    credential=self.credential,
                    lease=self._lease(secret_name),
                    on_step=on_step,
                    config=self.config,
                )
            except Exception as exc:
                outcome.error = exc
                raise
            finally:
                with self._lock:
                    self.outcomes.append(outcome)
            return outcome.result

        return QueueTriggerHost(
            self.queue,
            invoke,
            settings=self.settings,
            poison_queue_client=self.poison,
            processing_visibility=int(self.settings.function_timeout or 600),
        )

    def deliver(
        self, event: dict[str, Any], *, on_step: Callable[[str], None] | None = None
    ) -> list[Outcome]:
        """Publish ``event``; Event Grid puts it on the queue; the host runs the handler for it. With
        ``on_step`` the handler's rotation calls it before each step (the drill uses it to overlap a
        duplicate delivery). Returns the handler runs this delivery made."""
        before = len(self.outcomes)
        self.grid.publish(event)
        self.grid.deliver_due()
        self._host(on_step, event["subject"]).poll_once()
        return self.outcomes[before:]

    def redeliver_concurrently(self, event_id: str, secret_name: str) -> threading.Thread:
        """Event Grid delivers ``event_id`` once more (at least once: a duplicate) and a second host
        instance runs the handler for it on another thread, while the first run goes on."""
        self.grid.duplicate(event_id)
        self.grid.deliver_due()
        host = self._host(None, secret_name)
        thread = threading.Thread(target=host.poll_once, name="drill-second-instance", daemon=True)
        thread.start()
        return thread


@contextlib.contextmanager
def open_delivery(choice: str) -> Iterator[Delivery]:
    """The delivery path: ``azurite`` (required), ``memory``, or ``auto`` (Azurite when found)."""
    from ...local.eventgrid import MemoryQueue
    from ...rotation.function import ROTATION_QUEUE

    if choice not in CHOICES:
        raise ConfigurationError(f"--delivery must be one of {', '.join(CHOICES)}, not {choice!r}")
    bin_dir = find_azurite() if choice != "memory" else None
    clients = _storage_clients()
    if bin_dir is None or clients is not None:
        if choice == "azurite":
            raise ConfigurationError(
                "--delivery azurite: "
                + (
                    clients
                    or "no Azurite found (node_modules/.bin/azurite-queue or azurite-queue on PATH, and "
                    "Node.js); install it with `npm ci` (package.json)"
                )
                + "; or use --delivery memory"
            )
        why = (
            "chosen with --delivery memory"
            if choice == "memory"
            else "Azurite not found"
            if bin_dir is None
            else f"Azurite found but {clients}"
        )
        yield Delivery(
            "memory", MemoryQueue(ROTATION_QUEUE), MemoryQueue(f"{ROTATION_QUEUE}-poison"), why=why
        )
        return
    yield from _azurite_delivery(bin_dir)


def _storage_clients() -> str | None:
    """Why Azurite's queue and blob cannot be used from here (``None``: they can)."""
    import importlib

    missing = []
    for module in ("azure.storage.queue", "azure.storage.blob"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        return f"{' and '.join(missing)} not installed (extras local and rotation)"
    return None


def _azurite_delivery(bin_dir: Path) -> Iterator[Delivery]:
    from azure.storage.blob import ContainerClient
    from azure.storage.queue import QueueClient

    from ...local import LocalCA
    from ...rotation.function import LEASE_CONTAINER, ROTATION_QUEUE

    directory = Path(tempfile.mkdtemp(prefix="apimvault-drill-azurite-"))
    try:
        ca = LocalCA(directory)  # the drill's own CA: Azurite's certificate, verified by the clients below
        with (
            azurite_service(bin_dir, "blob", ca.cert_path, ca.key_path) as blob_url,
            azurite_service(bin_dir, "queue", ca.cert_path, ca.key_path) as queue_url,
        ):
            connection = (
                f"DefaultEndpointsProtocol=https;AccountName={AZURITE_ACCOUNT};"
                f"AccountKey={AZURITE_ACCOUNT_KEY};BlobEndpoint={blob_url}/{AZURITE_ACCOUNT};"
                f"QueueEndpoint={queue_url}/{AZURITE_ACCOUNT};"
            )
            verify = str(ca.ca_path)
            queue = QueueClient.from_connection_string(connection, ROTATION_QUEUE, connection_verify=verify)
            poison = QueueClient.from_connection_string(
                connection, f"{ROTATION_QUEUE}-poison", connection_verify=verify
            )
            container = ContainerClient.from_connection_string(
                connection, LEASE_CONTAINER, connection_verify=verify
            )
            queue.create_queue()
            try:
                yield Delivery(
                    "azurite", queue, poison, lease_container=container, why=f"Azurite from {bin_dir}"
                )
            finally:
                for client in (queue, poison, container):
                    with contextlib.suppress(Exception):
                        client.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
