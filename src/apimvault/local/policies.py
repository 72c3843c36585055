"""The local APIM gateway's per-API policies: quota, rate limit, Azure OpenAI token limit, Entra token check.

Each policy answers as Microsoft documents it; every refusal has APIM's own error shape
``{"statusCode": N, "message": "..."}`` (``application/json``), the shape of the subscription-key 401
(Learn: "Subscriptions in Azure API Management"). Sources:

* ``quota-by-key`` (Learn "Set usage quota by key", quota-by-key-policy): "When the quota is exceeded, the
  caller receives a 403 Forbidden response status code, and the response includes a Retry-After header whose
  value is the recommended retry interval in seconds." The message is the one seen on the wire (a
  Stack Overflow capture of a real gateway, question 3869590): ``Out of call volume quota. Quota will be
  replenished in 5.03:23:11.`` (a .NET ``TimeSpan``: ``[d.]hh:mm:ss``).
* ``rate-limit-by-key`` (Learn rate-limit-by-key-policy): 429 with ``Retry-After``; message ``Rate limit is
  exceeded. Try again in N seconds.`` (the same wire text the gateway's plain rate limit sends).
* ``azure-openai-token-limit`` (Learn azure-openai-token-limit-policy): "When a specified token rate limit
  is exceeded, the caller receives a 429 Too Many Requests response status code. When a specified quota is
  exceeded, the caller receives a 403 Forbidden response status code." ``retry-after-header-name``
  (default ``Retry-After``), ``remaining-tokens-header-name`` and ``remaining-quota-tokens-header-name``
  are optional headers (sent here, as ``0``, on a refusal). Learn does not print the message texts; the
  ones used here (``Token limit is exceeded. Try again in N seconds.`` / ``Token quota is exceeded. Try
  again in d.hh:mm:ss.``) follow the other policies' wording, so a client must not depend on them:
  apimvault's classifier uses status, shape and the word "quota" only. ``estimate-prompt-tokens`` as
  Learn's usage notes describe it: ``true`` (this stack's default) charges an estimate of the prompt when
  the request is admitted, about four bytes of request body a token; ``false`` (what ``infra/`` deploys)
  admits a request while the window has tokens left and charges the ``usage.total_tokens`` of the model's
  response, so the request that crosses the limit passes and the following ones are refused. A streamed
  request (``"stream": true``) is always estimated: its prompt when admitted, its completion from the
  streamed text when the stream ends.
* ``validate-azure-ad-token`` (Learn validate-azure-ad-token-policy): ``failed-validation-httpcode``
  (default 401) and ``failed-validation-error-message``; without a custom message the reasons of Learn's
  "Error handling in API Management policies" table for JWT validation: ``JWT not present.``, the token
  library's message followed by ``Access denied.`` for a bad signature, audience, issuer or lifetime
  (IdentityModel ``IDX10503`` / ``IDX10214`` / ``IDX10205`` / ``IDX10223``), ``JWT is missing the following
  claims: roles. Access denied.`` and ``Claim roles value of X is not allowed. Access denied.`` The
  policy sends no ``WWW-Authenticate`` header. The signature is checked against the stack's published
  signing keys (:mod:`apimvault.local.oidc`), the issuer, the audiences, the expiry and optional roles.

Policies are set per API (``/openai`` is the stack's one API) with :meth:`PolicyEngine.set` (or
``LocalAzure(policies=...)`` and the admin API's ``PUT /gateway/policies``). Each refusal counts a gateway
label ``policy:<kind>`` (``quota``, ``rate-limit``, ``token-rate``, ``token-quota``, ``token``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jwt
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ._faults import Counters
from ._server import json_response
from ._tokens import Clock

__all__ = [
    "ApiPolicies",
    "AzureOpenAITokenLimit",
    "PolicyEngine",
    "QuotaByKey",
    "RateLimitByKey",
    "ValidateAzureAdToken",
    "timespan",
]

QUOTA_PERIODS = {
    "Hourly": 3600,
    "Daily": 86400,
    "Weekly": 7 * 86400,
    "Monthly": 30 * 86400,
    "Yearly": 365 * 86400,
}
_BYTES_PER_TOKEN = 4
_CLOCK_SKEW_S = 300  # IdentityModel's default ClockSkew


def timespan(seconds: float) -> str:
    """A .NET ``TimeSpan`` as APIM prints it: ``hh:mm:ss`` or ``d.hh:mm:ss``."""
    total = max(0, math.ceil(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}.{clock}" if days else clock


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class QuotaByKey:
    """``<quota-by-key calls=... renewal-period=... counter-key="@(context.Subscription.Id)" />``."""

    calls: int
    renewal_period: int = 3600

    def __post_init__(self) -> None:
        _positive_int(self.calls, "calls")
        _positive_int(self.renewal_period, "renewal_period")


@dataclasses.dataclass(frozen=True)
class RateLimitByKey:
    """``<rate-limit-by-key calls=... renewal-period=... counter-key="@(context.Subscription.Id)" />``."""

    calls: int
    renewal_period: int = 60

    def __post_init__(self) -> None:
        _positive_int(self.calls, "calls")
        _positive_int(self.renewal_period, "renewal_period")


@dataclasses.dataclass(frozen=True)
class AzureOpenAITokenLimit:
    """``<azure-openai-token-limit tokens-per-minute=... token-quota=... token-quota-period=... />``."""

    tokens_per_minute: int | None = None
    token_quota: int | None = None
    token_quota_period: str = "Hourly"  # noqa: S105 - a period name
    remaining_tokens_header_name: str | None = None
    remaining_quota_tokens_header_name: str | None = None
    #: ``estimate-prompt-tokens``: ``False`` charges the usage the model reports instead of an estimate.
    estimate_prompt_tokens: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.estimate_prompt_tokens, bool):
            raise ValueError("estimate_prompt_tokens must be true or false")
        if self.tokens_per_minute is None and self.token_quota is None:
            raise ValueError("set tokens_per_minute, token_quota or both")
        if self.tokens_per_minute is not None:
            _positive_int(self.tokens_per_minute, "tokens_per_minute")
        if self.token_quota is not None:
            _positive_int(self.token_quota, "token_quota")
        if self.token_quota_period not in QUOTA_PERIODS:
            raise ValueError(f"token_quota_period must be one of {', '.join(QUOTA_PERIODS)}")


@dataclasses.dataclass(frozen=True)
class ValidateAzureAdToken:
    """``<validate-azure-ad-token tenant-id=...>`` with ``<audiences>`` and an optional required role."""

    audiences: tuple[str, ...]
    required_roles: tuple[str, ...] = ()
    header_name: str = "Authorization"
    failed_validation_httpcode: int = 401
    failed_validation_error_message: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.audiences, str) or not self.audiences:
            raise ValueError("audiences must be a non-empty list of audience strings")
        object.__setattr__(self, "audiences", tuple(self.audiences))
        object.__setattr__(self, "required_roles", tuple(self.required_roles))
        if self.failed_validation_httpcode not in range(400, 600):
            raise ValueError("failed_validation_httpcode must be a 4xx or 5xx status")


_KINDS: dict[str, type[Any]] = {
    "validate_azure_ad_token": ValidateAzureAdToken,
    "rate_limit_by_key": RateLimitByKey,
    "quota_by_key": QuotaByKey,
    "azure_openai_token_limit": AzureOpenAITokenLimit,
}


@dataclasses.dataclass(frozen=True)
class ApiPolicies:
    """The inbound policies of one API, applied in this order after the subscription-key check."""

    validate_azure_ad_token: ValidateAzureAdToken | None = None
    rate_limit_by_key: RateLimitByKey | None = None
    quota_by_key: QuotaByKey | None = None
    azure_openai_token_limit: AzureOpenAITokenLimit | None = None
    #: The API setting ``subscriptionRequired``: ``False`` lets requests without a key through (counters
    #: then count them under the empty subscription), e.g. for token-only clients.
    subscription_required: bool = True

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ApiPolicies:
        """From the admin API's JSON (``{"quota_by_key": {"calls": 5, "renewal_period": 60}, ...}``)."""
        unknown = set(doc) - set(_KINDS) - {"subscription_required"}
        if unknown:
            raise ValueError(f"unknown policies {sorted(unknown)}; known: {sorted(_KINDS)}")
        built: dict[str, Any] = {}
        for name, value in doc.items():
            if value is None:
                continue
            if name == "subscription_required":
                if not isinstance(value, bool):
                    raise ValueError("subscription_required must be true or false")
                built[name] = value
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"{name} must be an object")
            try:
                built[name] = _KINDS[name](**value)
            except TypeError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return cls(**built)

    def to_dict(self) -> dict[str, Any]:
        """The admin API's JSON form (policies not set are left out)."""
        out: dict[str, Any] = {} if self.subscription_required else {"subscription_required": False}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and not isinstance(value, bool):
                out[field.name] = {
                    k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(value).items()
                }
        return out


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"statusCode": status, "message": message}, status, headers)


class _Window:
    """Fixed windows per counter key (APIM's quota and rate-limit counters), amounts per window."""

    def __init__(self) -> None:
        self.start: dict[str, float] = {}
        self.used: collections.Counter[str] = collections.Counter()

    def usage(self, key: str, period: float, now: float) -> tuple[int, float]:
        """Amount used in ``key``'s current window and the seconds until the window renews."""
        start = self.start.get(key)
        if start is None or now >= start + period:
            self.start[key] = start = now
            self.used[key] = 0
        return self.used[key], start + period - now


class PolicyEngine:
    """Per-API policy state and evaluation for :class:`~apimvault.local.apim.ApimGateway`."""

    def __init__(
        self,
        counters: Counters,
        *,
        clock: Clock = time.time,
        jwks: Callable[[], Mapping[str, Any]] | None = None,
        issuer: str | None = None,
    ) -> None:
        self.counters = counters
        self.clock = clock
        self.jwks = jwks
        self.issuer = issuer
        self._lock = threading.Lock()
        self._apis: dict[str, ApiPolicies] = {}
        self._windows: dict[str, _Window] = collections.defaultdict(_Window)

    # ---------------------------------------------------------------------------------- configure

    def bind(self, *, clock: Clock, jwks: Callable[[], Mapping[str, Any]], issuer: str) -> None:
        """Use the stack's clock and its token issuer's published keys (LocalAzure does this)."""
        self.clock, self.jwks, self.issuer = clock, jwks, issuer

    def set(self, api: str, policies: ApiPolicies | Mapping[str, Any] | None) -> ApiPolicies:
        """Replace ``api``'s policies (``None`` or an empty mapping removes them); counters restart."""
        if not isinstance(policies, ApiPolicies):
            policies = ApiPolicies.from_dict(policies or {})
        with self._lock:
            self._apis[api] = policies
            self._windows.clear()
        return policies

    def get(self, api: str) -> ApiPolicies:
        with self._lock:
            return self._apis.get(api, ApiPolicies())

    def clear(self) -> None:
        with self._lock:
            self._apis.clear()
            self._windows.clear()

    # ----------------------------------------------------------------------------------- evaluate

    async def inbound(
        self, api: str, sid: str, scope: Scope, receive: Receive, send: Send
    ) -> tuple[Response | None, Receive, Send]:
        """Apply ``api``'s policies to one request of subscription ``sid``.

        Returns the refusal (or ``None``) and the ``receive`` and ``send`` to forward with: the body is
        buffered when the token limit needs it, and ``send`` charges the response's tokens when the limit
        counts reported usage or a stream.
        """
        policies = self.get(api)
        if policies.validate_azure_ad_token is not None:
            refused = self._validate(policies.validate_azure_ad_token, scope)
            if refused is not None:
                self.counters.label("policy:token")
                return refused, receive, send
        if policies.rate_limit_by_key is not None:
            refused = self._count("rate", policies.rate_limit_by_key, sid)
            if refused is not None:
                self.counters.label("policy:rate-limit")
                return refused, receive, send
        if policies.quota_by_key is not None:
            refused = self._count("quota", policies.quota_by_key, sid)
            if refused is not None:
                self.counters.label("policy:quota")
                return refused, receive, send
        limit = policies.azure_openai_token_limit
        if limit is None:
            return None, receive, send
        body, receive = await _buffer(receive)
        streamed = _is_stream(body)
        prompt = max(1, len(body) // _BYTES_PER_TOKEN) if limit.estimate_prompt_tokens or streamed else 0
        refused = self._tokens(limit, sid, prompt)
        if refused is not None or (limit.estimate_prompt_tokens and not streamed):
            return refused, receive, send
        return None, receive, self._metered(limit, sid, send, streamed)

    def _metered(self, limit: AzureOpenAITokenLimit, sid: str, send: Send, streamed: bool) -> Send:
        """``send`` that charges, once the response ends, its reported usage (or, for a stream, an
        estimate of the streamed text) to ``sid``'s token windows."""
        chunks: list[bytes] = []

        async def charging(message: Message) -> None:
            if message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body = b"".join(chunks)
                    self._charge(limit, sid, _streamed_tokens(body) if streamed else _reported_tokens(body))
            await send(message)

        return charging

    def _charge(self, limit: AzureOpenAITokenLimit, sid: str, tokens: int) -> None:
        if tokens > 0:
            now = self.clock()
            with self._lock:
                self._add_locked(limit, sid, tokens, now)

    def _add_locked(self, limit: AzureOpenAITokenLimit, sid: str, tokens: int, now: float) -> None:
        """Charge ``tokens`` to ``sid``'s token windows (renewing one that has ended); hold ``_lock``."""
        if limit.tokens_per_minute is not None:
            window = self._windows["token-rate"]
            window.usage(sid, 60, now)
            window.used[sid] += tokens
        if limit.token_quota is not None:
            window = self._windows["token-quota"]
            window.usage(sid, QUOTA_PERIODS[limit.token_quota_period], now)
            window.used[sid] += tokens

    def _count(self, name: str, policy: QuotaByKey | RateLimitByKey, sid: str) -> Response | None:
        now = self.clock()
        with self._lock:
            window = self._windows[name]
            used, renews_in = window.usage(sid, policy.renewal_period, now)
            if used < policy.calls:
                window.used[sid] += 1
                return None
        wait = max(1, math.ceil(renews_in))
        if isinstance(policy, QuotaByKey):
            return _error(
                403,
                f"Out of call volume quota. Quota will be replenished in {timespan(renews_in)}.",
                {"Retry-After": str(wait)},
            )
        return _error(
            429, f"Rate limit is exceeded. Try again in {wait} seconds.", {"Retry-After": str(wait)}
        )

    def _tokens(self, limit: AzureOpenAITokenLimit, sid: str, tokens: int) -> Response | None:
        """Refuse when a token window is spent; else charge ``tokens`` (the prompt estimate) to both."""
        now = self.clock()
        with self._lock:
            if limit.token_quota is not None:
                window = self._windows["token-quota"]
                used, renews_in = window.usage(sid, QUOTA_PERIODS[limit.token_quota_period], now)
                if used >= limit.token_quota:
                    self.counters.label("policy:token-quota")
                    wait = max(1, math.ceil(renews_in))
                    extra = {"Retry-After": str(wait)}
                    if limit.remaining_quota_tokens_header_name:
                        extra[limit.remaining_quota_tokens_header_name] = "0"
                    return _error(403, f"Token quota is exceeded. Try again in {timespan(renews_in)}.", extra)
            if limit.tokens_per_minute is not None:
                window = self._windows["token-rate"]
                used, renews_in = window.usage(sid, 60, now)
                if used >= limit.tokens_per_minute:
                    self.counters.label("policy:token-rate")
                    wait = max(1, math.ceil(renews_in))
                    extra = {"Retry-After": str(wait)}
                    if limit.remaining_tokens_header_name:
                        extra[limit.remaining_tokens_header_name] = "0"
                    return _error(429, f"Token limit is exceeded. Try again in {wait} seconds.", extra)
            self._add_locked(limit, sid, tokens, now)
        return None

    def _validate(self, policy: ValidateAzureAdToken, scope: Scope) -> Response | None:
        wanted = policy.header_name.lower().encode("latin-1")
        raw = next((bytes(v).decode("latin-1") for k, v in scope["headers"] if k == wanted), "")
        scheme, _, token = raw.partition(" ")
        reason = self._check(policy, token.strip() if scheme.lower() == "bearer" else "")
        if reason is None:
            return None
        message = policy.failed_validation_error_message or reason
        return _error(policy.failed_validation_httpcode, message)

    def _check(self, policy: ValidateAzureAdToken, token: str) -> str | None:
        """Why ``token`` fails ``policy`` (Learn's messages), or None when it passes."""
        if not token:
            return "JWT not present."
        if self.jwks is None or self.issuer is None:
            return "IDX10500: Signature validation failed. No security keys were provided. Access denied."
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            keys = {k["kid"]: k for k in self.jwks()["keys"]}
            if kid not in keys:
                return "IDX10503: Signature validation failed. Access denied."
            key = jwt.PyJWK(keys[kid], algorithm="RS256")
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=["RS256"],
                # Times are checked below against the stack's clock, not the wall clock PyJWT would use.
                options={
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError:
            return "IDX10503: Signature validation failed. Access denied."
        if claims.get("iss") != self.issuer:
            return "IDX10205: Issuer validation failed. Access denied."
        if claims.get("aud") not in policy.audiences:
            return "IDX10214: Audience validation failed. Access denied."
        if int(claims.get("exp", 0)) <= int(self.clock()):
            return "IDX10223: Lifetime validation failed. The token is expired. Access denied."
        if int(claims.get("nbf", 0)) > int(self.clock()) + _CLOCK_SKEW_S:
            return "IDX10222: Lifetime validation failed. The token is not yet valid. Access denied."
        if policy.required_roles:
            roles = claims.get("roles")
            if not roles:
                return "JWT is missing the following claims: roles. Access denied."
            if not set(policy.required_roles) & set(roles):
                return f"Claim roles value of {', '.join(map(str, roles))} is not allowed. Access denied."
        return None


def _is_stream(body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("stream") is True


def _reported_tokens(body: bytes) -> int:
    """``usage.total_tokens`` of a JSON response (chat completions, embeddings, responses), else 0."""
    try:
        usage = json.loads(body).get("usage")
    except (ValueError, AttributeError):
        return 0
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) and not isinstance(total, bool) and total > 0 else 0


def _streamed_tokens(body: bytes) -> int:
    """An estimate of the completion in a server-sent event stream: its text deltas, four bytes a token."""
    size = 0
    for line in body.splitlines():
        if not line.startswith(b"data:"):
            continue
        try:
            event = json.loads(line[5:])
        except ValueError:
            continue  # "[DONE]"
        if not isinstance(event, dict):
            continue
        for choice in event.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            text = delta.get("content") if isinstance(delta, dict) else None
            size += len(text.encode()) if isinstance(text, str) else 0
        text = event.get("delta") if event.get("type") == "response.output_text.delta" else None
        size += len(text.encode()) if isinstance(text, str) else 0
    return -(-size // _BYTES_PER_TOKEN)


async def _buffer(receive: Receive) -> tuple[bytes, Receive]:
    """Read the whole request body and return it with a ``receive`` that replays it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def admin_route(engine: PolicyEngine, api: str, method: str, request: Request) -> Response:
    """The admin API's ``/gateway/policies``: GET the API's policies, PUT new ones (JSON), DELETE them."""
    if method == "GET":
        return json_response({"api": api, "policies": engine.get(api).to_dict()})
    if method == "DELETE":
        engine.set(api, None)
        return Response(status_code=204)
    if method != "PUT":
        return json_response(
            {"error": {"code": "MethodNotAllowed", "message": f"{method} is not allowed"}}, 405
        )
    try:
        body = json.loads(await request.body())
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object of policies")
        policies = engine.set(api, body)
    except (ValueError, UnicodeDecodeError) as exc:
        return json_response({"error": {"code": "BadRequest", "message": str(exc)}}, 400)
    return json_response({"api": api, "policies": policies.to_dict()})
