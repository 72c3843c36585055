"""Helpers for the core tests: a fake clock and per-test secrets/subscriptions on the local stack."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from azure.core.pipeline.policies import AsyncHTTPPolicy, SansIOHTTPPolicy
from openai.types.chat import ChatCompletionMessageParam

from apimvault import KeyEvent
from apimvault.local import ROLE_USER, LocalAzure
from apimvault.local.apim import Subscription
from apimvault.local.stack import APIM_SERVICE, ARM_SUBSCRIPTION, RESOURCE_GROUP


def user_messages(text: str) -> list[ChatCompletionMessageParam]:
    """A one-message chat, typed as openai's ``create`` overloads expect."""
    return [{"role": "user", "content": text}]


class FakeClock:
    """A clock the test moves by hand (the one fake clock of the suite, shared by every test module).

    It starts at the real time unless told otherwise, so Key Vault expiries compare sensibly; ``start`` gives
    a fixed epoch for pure tests. ``advance`` may be called from any thread (and doubles as an injected
    ``sleep`` where the code under test sleeps on the clock)."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@dataclass
class AppSecret:
    """A vault secret holding the primary key of its own APIM subscription (test isolation)."""

    name: str
    subscription: Subscription

    @property
    def sid(self) -> str:
        return self.subscription.sid

    @property
    def resource_id(self) -> str:
        return self.subscription.id


def new_app_secret(
    azure: LocalAzure,
    *,
    grant: bool = True,
    name: str | None = None,
    keys: tuple[str, str] | None = None,
    rotation: bool = False,
    tags: Mapping[str, str] | None = None,
    **secret_kwargs: Any,
) -> AppSecret:
    """An APIM subscription of its own and a vault secret holding its primary key (the suite's one factory).

    ``name`` names both the subscription and the secret (default: fresh ``app-…`` / ``key-…`` names);
    ``keys`` gives the subscription known (primary, secondary) keys; ``rotation`` tags and types the secret
    the way ``apimvault local`` seeds it for ``apimvault rotate`` (validity period, provider address,
    ``text/plain``); ``tags`` are added on top; the rest goes to ``put_secret`` (``value``, ``expires``,
    ``enabled``, ...). ``grant`` gives the stack's default identity Secrets User on the secret."""
    suffix = uuid.uuid4().hex[:10]
    sid, secret = (name, name) if name else (f"app-{suffix}", f"key-{suffix}")
    sub = azure.apim_state.create_subscription(
        ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE, sid, display_name=f"test {name or suffix}"
    )
    if keys is not None:
        azure.apim_state.set_key(sub.sid, "primary", keys[0])
        azure.apim_state.set_key(sub.sid, "secondary", keys[1])
        assert azure.apim_state.lookup(keys[0]) == (sub, "primary")
    all_tags = {"CredentialId": "primary"}
    if rotation:
        all_tags |= {"ValidityPeriodDays": "60", "ProviderAddress": sub.id}
        secret_kwargs.setdefault("content_type", "text/plain")
    all_tags |= tags or {}
    value = secret_kwargs.pop("value", sub.primary_key)
    azure.keyvault.put_secret(secret, value, tags=all_tags, **secret_kwargs)
    if grant:
        azure.keyvault.grant(azure.default_identity, ROLE_USER, secret=secret)
    return AppSecret(secret, sub)


def rotate_to_secondary(azure: LocalAzure, app: AppSecret) -> str:
    """Microsoft's dual-key rotation, done in-process: regenerate secondary, store it, revoke primary."""
    azure.apim_state.regenerate(app.sid, "secondary")
    sub = azure.apim_state.get(app.sid)
    assert sub is not None
    new = azure.keyvault.put_secret(app.name, sub.secondary_key, tags={"CredentialId": "secondary"})
    azure.apim_state.regenerate(app.sid, "primary")  # the key clients started with stops working
    return new.version


def new_version_event(azure: LocalAzure, app: AppSecret, version: str) -> dict[str, Any]:
    """A ``SecretNewVersionCreated`` event (Event Grid schema) for ``app``'s secret naming ``version``."""
    return {
        "id": uuid.uuid4().hex,
        "topic": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/v",
        "subject": app.name,
        "eventType": "Microsoft.KeyVault.SecretNewVersionCreated",
        "eventTime": "2026-11-26T10:00:00Z",
        "data": {
            "Id": f"{azure.vault_url}/secrets/{app.name}/{version}",
            "VaultName": "v",
            "ObjectType": "Secret",
            "ObjectName": app.name,
            "Version": version,
        },
        "dataVersion": "1",
        "metadataVersion": "1",
    }


class Callbacks(TypedDict, total=False):
    """The providers' event callbacks, as keyword arguments (what :meth:`Events.callbacks` returns)."""

    on_refresh: Callable[[KeyEvent], None] | None
    on_error: Callable[[KeyEvent], None] | None
    on_rotate: Callable[[KeyEvent], None] | None


class Events:
    """Collects provider callbacks and lets a test wait for them (an Event, not a sleep)."""

    def __init__(self) -> None:
        self.refreshed: list[KeyEvent] = []
        self.errors: list[KeyEvent] = []
        self.rotated: list[KeyEvent] = []
        self._cond = threading.Condition()

    def on_refresh(self, e: KeyEvent) -> None:
        with self._cond:
            self.refreshed.append(e)
            self._cond.notify_all()

    def on_error(self, e: KeyEvent) -> None:
        with self._cond:
            self.errors.append(e)
            self._cond.notify_all()

    def on_rotate(self, e: KeyEvent) -> None:
        with self._cond:
            self.rotated.append(e)
            self._cond.notify_all()

    def callbacks(self) -> Callbacks:
        return {"on_refresh": self.on_refresh, "on_error": self.on_error, "on_rotate": self.on_rotate}

    def wait(self, what: str, count: int, timeout: float = 30) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(getattr(self, what)) >= count, timeout)
        assert ok, f"timed out waiting for {count} {what} (have {len(getattr(self, what))})"


class Gate(SansIOHTTPPolicy[Any, Any]):
    """A public azure-core per-call policy: holds the next GetSecret response until the test opens it."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.holding = threading.Event()
        self.open = threading.Event()

    def on_response(self, request: Any, response: Any) -> None:
        if self.armed.is_set() and request.http_request.method == "GET":
            self.armed.clear()
            self.holding.set()
            assert self.open.wait(30)


class AsyncGate(AsyncHTTPPolicy[Any, Any]):
    """The aio twin of :class:`Gate` (holds the response without blocking the event loop)."""

    def __init__(self) -> None:
        self.armed = False
        self.holding = asyncio.Event()
        self.open = asyncio.Event()

    async def send(self, request: Any) -> Any:
        response = await self.next.send(request)
        if self.armed and request.http_request.method == "GET":
            self.armed = False
            self.holding.set()
            await asyncio.wait_for(self.open.wait(), 30)
        return response


def blocked_in(thread: threading.Thread, *names: str, module: str = "_sync.py") -> bool:
    """Whether ``thread`` is inside a function called one of ``names`` of ``module`` (a wait, not time)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name in names and frame.f_code.co_filename.endswith(module):
            return True
        frame = frame.f_back
    return False


def wait_until(predicate: Any, what: str, limit_s: float = 30) -> None:
    """Poll ``predicate()`` until it holds, bounded by a generous deadline (a condition, not a sleep)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        threading.Event().wait(0.005)
