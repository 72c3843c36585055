"""What a gateway refusal means, read from what APIM actually sends, and what the client does about it.

* ``key``: 401 with ``WWW-Authenticate: AzureApiManagementKey ...`` or APIM's body ``{"statusCode": 401,
  "message": "Access denied due to missing/invalid subscription key..."}`` (Learn: "Subscriptions in Azure
  API Management").
  Action: the coalesced key refresh and one re-send (the auth flow's own path).
* ``token``: any other 401 in APIM's own ``{"statusCode", "message"}`` shape (or a bare ``WWW-Authenticate:
  Bearer`` challenge with no JSON body): ``validate-azure-ad-token`` / ``validate-jwt`` failed (Learn: default
  ``failed-validation-httpcode`` 401; messages such as ``JWT not present.`` or ``IDX10223: Lifetime
  validation failed...``). A backend's ``{"error": ...}`` 401 is ``backend`` even with a Bearer challenge.
  Action: one token refresh (bounded by the source's ``min_refresh_interval``) and one re-send; the key is
  never touched.
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
from typing import TYPE_CHECKING, Literal, TypeAlias

import httpx2

from . import _telemetry
from .exceptions import QuotaExceededError

if TYPE_CHECKING:
    from ._auth import AsyncKeySource, AsyncTokenSource, KeySource, TokenSource

#: Whose counts a refusal goes to: a key provider, or a token-only client's token source.
RefusalOwner: TypeAlias = "KeySource | AsyncKeySource | TokenSource | AsyncTokenSource"

__all__ = ["RefusalKind", "RefusalStats", "classify", "refusal_stats"]

RefusalKind = Literal["key", "token", "quota", "rate", "backend", "other"]
KINDS: tuple[RefusalKind, ...] = ("key", "token", "quota", "rate", "backend", "other")
WATCHED = frozenset((401, 403, 429))
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


def _note(provider: RefusalOwner, name: str) -> None:
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


def _backend_body(body: bytes) -> bool:
    """Whether ``body`` is a JSON document that is not APIM's (Azure OpenAI's ``{"error": ...}``...)."""
    if not body.strip():
        return False
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def classify(status: int, headers: httpx2.Headers, body: bytes) -> RefusalKind | None:
    """The kind of gateway refusal (see the module table), or ``None`` for a status that is not one."""
    if status not in WATCHED:
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
        if apim:  # validate-azure-ad-token / validate-jwt: APIM's own shape, no key words
            return "token"
        if challenge.startswith("bearer") and not _backend_body(body):
            return "token"  # a bare Bearer challenge (a custom failed-validation response)
        return "backend"  # Azure OpenAI's {"error": ...}, with or without a Bearer challenge
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
#
# The auth flow (apimvault._auth.GuardedAuth) calls these with the owner of the counts: the key provider,
# or the token source of a token-only client.


def on_refusal(owner: RefusalOwner, response: httpx2.Response, body: bytes) -> RefusalKind | None:
    """Classify a watched response, count it against ``owner``; APIM's quota 403 raises
    :class:`~apimvault.exceptions.QuotaExceededError`. Returns the kind (``None``: not a refusal)."""
    kind = classify(response.status_code, response.headers, body)
    if kind is None:
        return None
    _note(owner, kind)
    if kind == "quota":
        raise _quota_error(response, body)
    return kind


def note_token_refresh(owner: RefusalOwner) -> None:
    """Hook: a token 401 got a new token (one refresh, or one another request made meanwhile)."""
    _note(owner, "token_refreshes")


def note_resend(owner: RefusalOwner, kind: Literal["key", "token"]) -> None:
    """Hook: the auth flow re-sends a request after a ``kind`` 401."""
    _note(owner, f"{kind}_resends")
    _telemetry.resend_event(kind, owner)
