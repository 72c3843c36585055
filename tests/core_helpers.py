"""Helpers for the core tests: a fake clock and per-test secrets/subscriptions on the local stack."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

from apimvault import KeyEvent
from apimvault.local import ROLE_USER, LocalAzure
from apimvault.local.apim import Subscription
from apimvault.local.stack import APIM_SERVICE, ARM_SUBSCRIPTION, RESOURCE_GROUP


class FakeClock:
    """A clock the test moves by hand; starts at the real time so Key Vault expiries compare sensibly."""

    def __init__(self) -> None:
        self.now = time.time()
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


def new_app_secret(azure: LocalAzure, *, grant: bool = True, **secret_kwargs: object) -> AppSecret:
    suffix = uuid.uuid4().hex[:10]
    sub = azure.apim_state.create_subscription(
        ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE, f"app-{suffix}", display_name=f"test {suffix}"
    )
    name = f"key-{suffix}"
    value = secret_kwargs.pop("value", sub.primary_key)
    azure.keyvault.put_secret(name, value, tags={"CredentialId": "primary"}, **secret_kwargs)  # type: ignore[arg-type]
    if grant:
        azure.keyvault.grant(azure.default_identity, ROLE_USER, secret=name)
    return AppSecret(name, sub)


def rotate_to_secondary(azure: LocalAzure, app: AppSecret) -> str:
    """Microsoft's dual-key rotation, done in-process: regenerate secondary, store it, revoke primary."""
    azure.apim_state.regenerate(app.sid, "secondary")
    sub = azure.apim_state.get(app.sid)
    assert sub is not None
    new = azure.keyvault.put_secret(app.name, sub.secondary_key, tags={"CredentialId": "secondary"})
    azure.apim_state.regenerate(app.sid, "primary")  # the key clients started with stops working
    return new.version


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

    def callbacks(self) -> dict[str, object]:
        return {"on_refresh": self.on_refresh, "on_error": self.on_error, "on_rotate": self.on_rotate}

    def wait(self, what: str, count: int, timeout: float = 30) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(getattr(self, what)) >= count, timeout)
        assert ok, f"timed out waiting for {count} {what} (have {len(getattr(self, what))})"
