"""What a gateway refusal means, read from what APIM actually sends, and what the client does about it.

* ``key``: 401 with ``WWW-Authenticate: AzureApiManagementKey ...`` or APIM's body ``{"statusCode": 401,
  "message": "Access denied due to missing/invalid subscription key..."}`` (Learn: "Subscriptions in Azure
  API Management").
  Action: the coalesced key refresh and one re-send (the auth flow's own path).
* ``token``: any other 401 in APIM's ``{"statusCode", "message"}`` shape, or a ``WWW-Authenticate: Bearer``
  challenge: ``validate-azure-ad-token`` / ``validate-jwt`` failed (Learn: default
  ``failed-validation-httpcode`` 401; messages such as ``JWT not present.`` or ``IDX10223: Lifetime
  validation failed...``). Action: one token refresh and one re-send; the key is never touched.
* ``quota``: 403 in APIM's shape whose message speaks of a quota: ``quota-by-key`` (Learn: 403 with
  ``Retry-After``; wire message ``Out of call volume quota. Quota will be replenished in d.hh:mm:ss.``) or
  ``azure-openai-token-limit``'s token quota (Learn: 403 when the quota is exceeded). Action: raise
  :class:`~apimvault.exceptions.QuotaExceededError` (policy, renewal period); no refresh, no re-send.
* ``rate``: 429 (``rate-limit-by-key``; ``azure-openai-token-limit``'s rate, Learn: 429; or the backend's
  own 429). Action: none; openai's retries honour ``Retry-After``.
* ``backend``: 401/403 in Azure OpenAI's ``{"error": {...}}`` shape (or no JSON). Action: none.
* ``other``: another APIM 403 (``ip-filter``, ``check-header``...). Action: none.

Sources: Learn "quota-by-key policy", "rate-limit-by-key policy", "azure-openai-token-limit policy",
"validate-azure-ad-token policy", "Error handling in API Management policies"; the wire texts are in
:mod:`apimvault.local.policies`. Exact message texts are not relied on beyond the words
"subscription key" and "quota".

Counts per provider: :func:`refusal_stats`. Nothing here reads or records a key or token value.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import weakref
from collections.abc import Awaitable
from typing import Literal, Protocol

import httpx2

from . import _telemetry
from .exceptions import QuotaExceededError

__all__ = ["RefusalKind", "RefusalStats", "classify", "refusal_stats"]

RefusalKind = Literal["key", "token", "quota", "rate", "backend", "other"]
KINDS: tuple[RefusalKind, ...] = ("key", "token", "quota", "rate", "backend", "other")
_WATCHED = frozenset((401, 403, 429))
_TIMESPAN = re.compile(r"(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})")


@dataclasses.dataclass(frozen=True)
class RefusalStats:
    """Gateway refusals seen by a provider's clients, per kind, and what was done about them."""

    key: int = 0
    token: int = 0
    quota: int = 0
    rate: int = 0
    backend: int = 0
    other: int = 0
    key_resends: int = 0
    token_refreshes: int = 0
    token_resends: int = 0


class _Tally:
    __slots__ = ("_counts", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys((f.name for f in dataclasses.fields(RefusalStats)), 0)

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def stats(self) -> RefusalStats:
        with self._lock:
            return RefusalStats(**self._counts)


_tallies: weakref.WeakKeyDictionary[object, _Tally] = weakref.WeakKeyDictionary()
_tallies_lock = threading.Lock()


def _tally(provider: object) -> _Tally:
    tally = _tallies.get(provider)
    if tally is None:
        with _tallies_lock:
            tally = _tallies.setdefault(provider, _Tally())
    return tally


def refusal_stats(provider: object) -> RefusalStats:
    """Refusals seen by the clients built on ``provider`` (all zero before the first one)."""
    tally = _tallies.get(provider)
    return tally.stats() if tally is not None else RefusalStats()


def _note(provider: object, name: str) -> None:
    _tally(provider).add(name)
    _telemetry.refusal_counted(provider, name)


# ---------------------------------------------------------------------------------------- classify


def _apim_body(body: bytes) -> tuple[bool, str]:
    """Whether ``body`` is APIM's own error shape, and its message."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False, ""
    if not isinstance(doc, dict) or "error" in doc:
        return False, ""
    message = doc.get("message")
    status = doc.get("statusCode")
    if isinstance(status, int) and not isinstance(status, bool) and isinstance(message, str):
        return True, message
    return False, ""


def classify(status: int, headers: httpx2.Headers, body: bytes) -> RefusalKind | None:
    """The kind of gateway refusal (see the module table), or ``None`` for a status that is not one."""
    if status not in _WATCHED:
        return None
    if status == 429:
        return "rate"
    challenge = headers.get("www-authenticate", "").strip().lower()
    apim, message = _apim_body(body)
    if status == 401:
        if challenge.startswith("azureapimanagementkey"):
            return "key"
        if apim and "subscription key" in message.lower():
            return "key"
        if apim or challenge.startswith("bearer"):
            return "token"
        return "backend"
    if apim:
        return "quota" if "quota" in message.lower() else "other"
    return "backend"


def renewal_seconds(headers: httpx2.Headers, message: str) -> float | None:
    """Seconds until an APIM quota renews: ``Retry-After``, else the message's ``d.hh:mm:ss``."""
    value = headers.get("retry-after", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds >= 0 and seconds == seconds:  # not NaN
        return seconds
    match = _TIMESPAN.search(message)
    if match is None:
        return None
    days, hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
    return float(days * 86400 + hours * 3600 + minutes * 60 + secs)


def _quota_error(response: httpx2.Response, body: bytes) -> QuotaExceededError:
    _, message = _apim_body(body)
    policy = "azure-openai-token-limit" if "token" in message.lower() else "quota-by-key"
    renewal = renewal_seconds(response.headers, message)
    when = f"renews in {renewal:.0f} s" if renewal is not None else "renewal period not given"
    try:
        doc: object = json.loads(body)
    except ValueError:
        doc = None
    return QuotaExceededError(
        f"APIM quota exhausted ({policy}); {when}: {message}",
        response=response,
        body=doc,
        policy=policy,
        renewal_s=renewal,
        gateway_message=message,
    )


# ------------------------------------------------------------------------------- auth-flow hooks


class TokenSource(Protocol):
    """What the auth flow needs from a bearer-token source to act on a token 401 (see ``_entra``)."""

    def refresh_after_rejection(self, sent: str) -> str | Awaitable[str | None] | None: ...


def _sent_token(request: httpx2.Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def after_response(provider: object, response: httpx2.Response) -> None:
    """Sync hook for a response that is not a 401: count a refusal; APIM's quota 403 raises."""
    if response.status_code not in _WATCHED:
        return
    body = response.read()
    _act(provider, response, body)


async def aafter_response(provider: object, response: httpx2.Response) -> None:
    """Async twin of :func:`after_response`."""
    if response.status_code not in _WATCHED:
        return
    body = await response.aread()
    _act(provider, response, body)


def _act(provider: object, response: httpx2.Response, body: bytes) -> None:
    kind = classify(response.status_code, response.headers, body)
    if kind is None:
        return
    _note(provider, kind)
    if kind == "quota":
        raise _quota_error(response, body)


def after_other_401(
    auth: object, provider: object, request: httpx2.Request, response: httpx2.Response, body: bytes
) -> httpx2.Request | None:
    """Sync hook for a 401 that is not APIM's key 401: a token 401 gets one token refresh and re-send."""
    source, sent = _token_401(auth, provider, request, response, body)
    if source is None or sent is None:
        return None
    token = source.refresh_after_rejection(sent)
    return _resend_with(provider, request, token if isinstance(token, str) else None)


async def aafter_other_401(
    auth: object, provider: object, request: httpx2.Request, response: httpx2.Response, body: bytes
) -> httpx2.Request | None:
    """Async twin of :func:`after_other_401`."""
    source, sent = _token_401(auth, provider, request, response, body)
    if source is None or sent is None:
        return None
    result = source.refresh_after_rejection(sent)
    token = await result if not isinstance(result, str | None) else result
    return _resend_with(provider, request, token)


def _token_401(
    auth: object, provider: object, request: httpx2.Request, response: httpx2.Response, body: bytes
) -> tuple[TokenSource | None, str | None]:
    kind = classify(response.status_code, response.headers, body)
    if kind is None:
        return None, None
    _note(provider, kind)
    if kind != "token":
        return None, None
    return getattr(auth, "token_source", None), _sent_token(request)


def _resend_with(provider: object, request: httpx2.Request, token: str | None) -> httpx2.Request | None:
    if token is None:
        return None
    _note(provider, "token_refreshes")
    request.headers["Authorization"] = f"Bearer {token}"
    note_resend(provider, "token")
    return request


def note_key_401(provider: object) -> None:
    """Hook: APIM refused the subscription key (the auth flow's own key path then acts)."""
    _note(provider, "key")


def note_resend(provider: object, kind: Literal["key", "token"]) -> None:
    """Hook: the auth flow re-sends a request after a ``kind`` 401."""
    _note(provider, f"{kind}_resends")
    _telemetry.resend_event(kind, provider)
