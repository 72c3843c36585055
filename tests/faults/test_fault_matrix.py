"""The fault matrix: every fault the local stack injects, per service, x sync/async x plain/streaming.

For each case: what the caller sees (success or which typed apimvault / openai error), how many vault reads
the fault cost, and that the good key is never dropped (the cached key survives every transient fault until
its documented hard limit, and every request that reached the gateway carried a valid key).

The matrix is one declared table, :data:`MATRIX`: a row per (service, fault, phase) with the modes it runs in
and what the caller sees; every row runs for both APIs (sync, async). The tests below take their cases and
their expected outcome from it, so a new fault is a new row (plus its injection, if it is a new kind).

Outcomes are recorded (``outcome_log``; rows land even when a case fails, flagged) and rendered into
SECURITY.md by ``tests/faults/gen_table.py``. Time is a FakeClock; waits are on callbacks, never on sleeps.
SecretClient retries are off (``retry_total=0``) so each vault read is one HTTP attempt and counts are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from apimvault import CachePolicy, KeyUnavailableError, VaultUnavailableError
from apimvault.local import LocalAzure
from tests._support.core import AppSecret, new_app_secret, rotate_to_secondary
from tests._support.faults import Api, OutcomeLog, make, outcome, recorded

pytestmark = pytest.mark.timeout(60)

# Its own numbers: SHORT_BACKOFF's plus a forced refresh every 5 s; STALE and HARD_LIMIT derive from them.
POLICY = CachePolicy(
    ttl=300,
    jitter=0,
    refresh_margin=60,
    max_staleness=600,
    backoff_initial=1,
    backoff_max=8,
    forced_refresh_interval=5,
)
STALE = 310  # past the fresh period (300 s), inside max_staleness (600 s)
PAST_BACKOFF = 9  # > backoff_max
HARD_LIMIT = 300 + 600  # fresh period + max_staleness
APIS: list[Api] = ["sync", "async"]
MODES = ["plain", "stream"]
PLAIN = ["plain"]
STREAM = ["stream"]


@dataclass(frozen=True)
class Row:
    """One row of the matrix: run for every API in :data:`APIS` and every mode in ``modes``."""

    service: str  # "keyvault", "identity", "gateway", "backend"
    fault: str
    phase: str  # "warm" (key or token cached), "cold" (nothing cached), "-" (the gateway / backend faults)
    modes: list[str]
    caller_sees: str  # "ok", or the class name of what the caller gets; a sequence is ", "-joined


# fmt: off
MATRIX: tuple[Row, ...] = (
    # Key Vault, key cached: the caller is served the cached key whatever the refresh meets.
    Row("keyvault", "latency 0.3 s",                   "warm", MODES, "ok"),
    Row("keyvault", "500",                             "warm", MODES, "ok"),
    Row("keyvault", "503",                             "warm", MODES, "ok"),
    Row("keyvault", "429 + Retry-After 30",            "warm", MODES, "ok"),
    Row("keyvault", "connection reset",                "warm", MODES, "ok"),
    Row("keyvault", "hang past read_timeout (1 s)",    "warm", MODES, "ok"),
    # Key Vault, cold start: nothing to serve, so the typed transient error.
    Row("keyvault", "latency 0.3 s",                   "cold", PLAIN, "ok"),
    Row("keyvault", "500",                             "cold", PLAIN, "VaultUnavailableError"),
    Row("keyvault", "503",                             "cold", PLAIN, "VaultUnavailableError"),
    Row("keyvault", "429 + Retry-After 30",            "cold", PLAIN, "VaultUnavailableError"),
    Row("keyvault", "connection reset",                "cold", PLAIN, "VaultUnavailableError"),
    Row("keyvault", "hang past read_timeout (1 s)",    "cold", PLAIN, "VaultUnavailableError"),
    # Key Vault fails twice then recovers (three requests, one vault read each).
    Row("keyvault", "503 x2 then recover",             "cold", PLAIN,
        "VaultUnavailableError, VaultUnavailableError, success"),
    Row("keyvault", "503 x2 then recover",             "warm", PLAIN, "success, success, success"),
    # Managed identity, a fresh credential (no token cached).
    Row("identity", "down (500)",                      "cold", PLAIN, "CredentialError"),
    Row("identity", "down (connection reset)",         "cold", PLAIN, "CredentialError"),
    Row("identity", "503 once",                        "cold", PLAIN, "ok"),
    Row("identity", "slow (0.3 s)",                    "cold", PLAIN, "ok"),
    Row("identity", "down (500)",                      "warm", PLAIN, "ok"),
    # APIM gateway (max_retries=0, so openai's own retries do not hide the answer).
    Row("gateway",  "401 key rotated",                 "-",    MODES, "ok"),
    Row("gateway",  "401 key revoked",                 "-",    MODES, "AuthenticationError"),
    Row("gateway",  "429",                             "-",    MODES, "RateLimitError"),
    Row("gateway",  "503",                             "-",    MODES, "InternalServerError"),
    # Azure OpenAI backend behind the gateway.
    Row("backend",  "500",                             "-",    MODES, "InternalServerError"),
    Row("backend",  "connection reset",                "-",    MODES, "APIConnectionError"),
    Row("backend",  "slow stream (0.05 s/chunk)",      "-",    STREAM, "ok"),
    Row("backend",  "dropped stream (after 2 events)", "-",    STREAM, "APIConnectionError"),
)
# fmt: on


def faults(service: str, phase: str) -> list[str]:
    """The faults of ``service`` in ``phase``, in table order."""
    return [r.fault for r in MATRIX if (r.service, r.phase) == (service, phase)]


def expected(service: str, fault: str, phase: str) -> str:
    """What the caller sees in the table's one row for (service, fault, phase); fails if there is none."""
    (found,) = [r for r in MATRIX if (r.service, r.fault, r.phase) == (service, fault, phase)]
    return found.caller_sees


def used_slots(azure: LocalAzure, app: AppSecret) -> list[str]:
    return [u.slot for u in azure.gateway.recent() if u.sid == app.sid]


def invalid_count(azure: LocalAzure) -> int:
    return azure.gateway.counters.labels().get("key:invalid", 0)


# ------------------------------------------------------------------------------------------ Key Vault

KV_FAULTS: dict[str, dict[str, Any]] = {
    "latency 0.3 s": {"kind": "latency", "seconds": 0.3},
    "500": {"kind": "status", "status": 500},
    "503": {"kind": "status", "status": 503},
    "429 + Retry-After 30": {"kind": "throttle", "retry_after": 30},
    "connection reset": {"kind": "reset"},
    "hang past read_timeout (1 s)": {"kind": "hang", "seconds": 3},
}
HANG_KWARGS = {"read_timeout": 1, "connection_timeout": 2}


def _kv_params() -> list[Any]:
    """The injected Key Vault faults (each a warm and a cold row of the table)."""
    return [f for f in faults("keyvault", "warm") if f in KV_FAULTS]


def _kv_kwargs(fault: str) -> dict[str, Any]:
    return {"policy": POLICY, "client_kwargs": HANG_KWARGS if fault.startswith("hang") else {}}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", _kv_params())
@pytest.mark.parametrize("api", APIS)
def test_keyvault_fault_with_warm_cache(
    azure: LocalAzure, outcome_log: OutcomeLog, api: Api, fault: str, mode: str
) -> None:
    app = new_app_secret(azure)
    stream = mode == "stream"
    with recorded(
        outcome_log,
        f"keyvault/{fault}/warm/{api}/{mode}",
        service="Key Vault",
        fault=fault,
        phase="key cached",
        api=api,
        mode=mode,
    ) as row:
        h = make(api, azure, app.name, **_kv_kwargs(fault))
        try:
            assert h.chat(stream)
            good = h.current()
            assert good is not None
            reads0 = h.stats().vault_reads
            azure.keyvault.faults.inject(operation="GetSecret", **KV_FAULTS[fault])
            h.advance(STALE)  # the next request triggers a background refresh that meets the fault
            seen, _ = outcome(lambda: h.chat(stream))
            row["caller_sees"] = "success (cached key)" if seen == "ok" else seen
            assert seen == expected("keyvault", fault, "warm"), (
                "a caller waited on (or failed because of) a failing vault"
            )
            if fault.startswith("latency"):
                h.wait("refreshed", 2)
                row["refresh_sees"] = "fresh (after the delay)"
            else:
                h.wait("errors", 1)
                error = h.rec.errors[0].error
                row["refresh_sees"] = type(error).__name__
            row["vault_reads"] = h.stats().vault_reads - reads0
            row["good_key_kept"] = h.current() == good
            assert row["vault_reads"] == 1
            assert row["good_key_kept"], "the good key was dropped"
            if not fault.startswith("latency"):
                assert isinstance(error, VaultUnavailableError) and not error.permanent
            if fault.startswith("429"):
                # Retry-After 30 outranks back-off (<= 8 s): no read before 30 s have passed.
                h.advance(29)
                assert h.get_key() == good
                h.settle()
                assert h.stats().vault_reads == reads0 + 1
                h.advance(2)
            azure.keyvault.faults.clear()
            if not fault.startswith("latency"):
                h.advance(PAST_BACKOFF)
                assert h.chat(stream)  # recovery: served at once, refreshed behind
                h.wait("refreshed", 2)
            assert h.current() == good and h.stats().consecutive_failures == 0
            assert set(used_slots(azure, app)) == {"primary"}
        finally:
            h.close()


@pytest.mark.parametrize("fault", _kv_params())
@pytest.mark.parametrize("api", APIS)
def test_keyvault_fault_on_cold_start(
    azure: LocalAzure, outcome_log: OutcomeLog, api: Api, fault: str
) -> None:
    app = new_app_secret(azure)
    with recorded(
        outcome_log,
        f"keyvault/{fault}/cold/{api}/plain",
        service="Key Vault",
        fault=fault,
        phase="cold start",
        api=api,
        mode="plain",
        refresh_sees="-",
    ) as row:
        h = make(api, azure, app.name, **_kv_kwargs(fault))
        try:
            azure.keyvault.faults.inject(operation="GetSecret", **KV_FAULTS[fault])
            seen, exc = outcome(lambda: h.chat(False))
            row["vault_reads"] = h.stats().vault_reads
            row["good_key_kept"] = "n/a"
            assert seen == expected("keyvault", fault, "cold"), repr(exc)
            if fault.startswith("latency"):
                row["caller_sees"] = "success (after the delay)"
                assert seen == "ok"
            else:
                transient = isinstance(exc, KeyUnavailableError) and not exc.permanent
                row["caller_sees"] = f"{seen} (permanent=False)" if transient else f"{seen} (untyped)"
                assert isinstance(exc, VaultUnavailableError) and not exc.permanent, repr(exc)
                assert app.subscription.primary_key not in f"{exc}{exc!r}"
                if fault.startswith("429"):
                    assert exc.retry_after == 30
                assert used_slots(azure, app) == [], "a request went out without a key"
            assert row["vault_reads"] == 1
            azure.keyvault.faults.clear()
            h.advance(31)  # past any back-off and the 30 s Retry-After
            assert h.chat(False)
            assert h.current_key().reveal() == app.subscription.primary_key
        finally:
            h.close()


@pytest.mark.parametrize("phase", ["cold", "warm"])
@pytest.mark.parametrize("api", APIS)
def test_keyvault_fails_twice_then_recovers(
    azure: LocalAzure, outcome_log: OutcomeLog, api: Api, phase: str
) -> None:
    app = new_app_secret(azure)
    with recorded(
        outcome_log,
        f"keyvault/fail 2 then recover/{phase}/{api}/plain",
        service="Key Vault",
        fault="503 x2 then recover",
        phase="key cached" if phase == "warm" else "cold start",
        api=api,
        mode="plain",
    ) as row:
        h = make(api, azure, app.name, policy=POLICY)
        try:
            good = None
            if phase == "warm":
                assert h.chat(False)
                good = h.current()
                h.advance(STALE)
            reads0 = h.stats().vault_reads
            azure.keyvault.faults.fail_next(2, status=503, operation="GetSecret")
            seen = []
            for attempt in range(3):
                result, _ = outcome(lambda: h.chat(False))
                seen.append("success" if result == "ok" else result)
                if phase == "warm":
                    h.wait("errors", attempt + 1) if attempt < 2 else h.wait("refreshed", 2)
                h.advance(PAST_BACKOFF)
            row["caller_sees"] = ", ".join(seen)
            row["refresh_sees"] = "VaultUnavailableError x2, then fresh" if phase == "warm" else "-"
            row["vault_reads"] = h.stats().vault_reads - reads0
            row["good_key_kept"] = h.current() == good if phase == "warm" else "n/a"
            assert seen == expected("keyvault", "503 x2 then recover", phase).split(", ")
            if phase == "warm":
                assert h.current() == good
            assert row["vault_reads"] == 3
            assert set(used_slots(azure, app)) == {"primary"}
        finally:
            h.close()


@pytest.mark.parametrize("api", APIS)
def test_keyvault_outage_longer_than_max_staleness(
    azure: LocalAzure, outcome_log: OutcomeLog, api: Api
) -> None:
    app = new_app_secret(azure)
    with recorded(
        outcome_log,
        f"keyvault/outage > max_staleness/warm/{api}/plain",
        service="Key Vault",
        fault="503 longer than max_staleness",
        phase="key cached",
        api=api,
        mode="plain",
        refresh_sees="VaultUnavailableError",
    ) as row:
        h = make(api, azure, app.name, policy=POLICY)
        try:
            assert h.chat(False)
            good = h.current()
            azure.keyvault.faults.inject("status", operation="GetSecret", status=503)
            h.advance(STALE)
            assert h.chat(False)  # stale but usable
            h.wait("errors", 1)
            h.advance(HARD_LIMIT - STALE - 1)  # one second before the hard limit
            assert outcome(lambda: h.chat(False))[0] == "ok"
            h.wait("errors", 2)  # that request started one more (failing) background refresh
            assert h.current() == good
            h.advance(2)  # past the hard limit: the key is dropped, the caller gets the typed error
            seen, exc = outcome(lambda: h.chat(False))
            row["caller_sees"] = f"success until fresh + max_staleness, then {seen}"
            row["vault_reads"] = h.stats().vault_reads - 1
            row["good_key_kept"] = "until the hard limit (by design)"
            assert isinstance(exc, VaultUnavailableError), seen
            assert h.current() is None and h.stats().state == "expired"
            azure.keyvault.faults.clear()
            h.advance(PAST_BACKOFF)
            assert h.chat(False)
            assert h.current() == good
            assert set(used_slots(azure, app)) == {"primary"}
        finally:
            h.close()


# ------------------------------------------------------------------------------- identity endpoint

IDENTITY_FAULTS: dict[str, dict[str, Any]] = {
    "down (500)": {"kind": "status", "status": 500},
    "down (connection reset)": {"kind": "reset"},
    "503 once": {"kind": "status", "status": 503, "times": 1},
    "slow (0.3 s)": {"kind": "latency", "seconds": 0.3},
}


@pytest.mark.parametrize("fault", [f for f in faults("identity", "cold") if f in IDENTITY_FAULTS])
@pytest.mark.parametrize("api", APIS)
def test_identity_fault_on_cold_credential(
    azure: LocalAzure, outcome_log: OutcomeLog, api: Api, fault: str
) -> None:
    """A fresh provider owns a fresh DefaultAzureCredential: no cached token, so the fault bites."""
    app = new_app_secret(azure)
    with recorded(
        outcome_log,
        f"identity/{fault}/cold/{api}/plain",
        service="Managed identity",
        fault=fault,
        phase="cold credential",
        api=api,
        mode="plain",
        refresh_sees="-",
        good_key_kept="n/a",
    ) as row:
        h = make(api, azure, app.name, policy=POLICY)
        try:
            azure.identity.faults.inject(**IDENTITY_FAULTS[fault])
            seen, exc = outcome(lambda: h.chat(False))
            row["caller_sees"] = "success" if seen == "ok" else f"{seen} (permanent=False)"
            row["vault_reads"] = h.stats().vault_reads
            row["notes"] = f"{azure.identity.counters['GetToken']} token request(s)"
            assert seen == expected("identity", fault, "cold")  # "503 once": azure-identity retries it itself
            if fault.startswith("down"):
                assert isinstance(exc, KeyUnavailableError) and not exc.permanent, seen
                assert used_slots(azure, app) == []
        finally:
            h.close()
        # Recovery, with a fresh credential: MSAL (sync ManagedIdentityCredential) replays a 5xx answer
        # for 5 s of wall-clock time, so the same credential would keep failing briefly (not a sleep here).
        azure.identity.faults.clear()
        fresh = make(api, azure, app.name, policy=POLICY)
        try:
            assert fresh.chat(False)
        finally:
            fresh.close()


@pytest.mark.parametrize("api", APIS)
def test_identity_down_with_warm_credential(azure: LocalAzure, outcome_log: OutcomeLog, api: Api) -> None:
    """The credential caches its token: an identity outage does not stop refreshes until the token expires."""
    app = new_app_secret(azure)
    with recorded(
        outcome_log,
        f"identity/down (500)/warm/{api}/plain",
        service="Managed identity",
        fault="down (500)",
        phase="token cached",
        api=api,
        mode="plain",
    ) as row:
        h = make(api, azure, app.name, policy=POLICY)
        try:
            assert h.chat(False)
            good = h.current()
            azure.identity.faults.inject("status", status=500)
            h.advance(STALE)
            seen, _ = outcome(lambda: h.chat(False))
            row["caller_sees"] = "success" if seen == "ok" else seen
            h.wait("refreshed", 2)
            row["refresh_sees"] = "fresh (token from the credential's cache)"
            row["vault_reads"] = 1
            row["good_key_kept"] = h.current() == good
            assert (
                seen == expected("identity", "down (500)", "warm")
                and h.rec.errors == []
                and h.current() == good
            )
            assert azure.identity.counters["GetToken"] == 1  # only the cold start asked for a token
        finally:
            h.close()


# ------------------------------------------------------------------------------------- APIM gateway


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
def test_gateway_401_after_rotation_is_resent_once(
    azure: LocalAzure, outcome_log: OutcomeLog, api: Api, mode: str
) -> None:
    app = new_app_secret(azure)
    stream = mode == "stream"
    with recorded(
        outcome_log,
        f"gateway/401 key rotated/-/{api}/{mode}",
        service="APIM gateway",
        fault="401: key rotated (vault has the new one)",
        phase="key cached",
        api=api,
        mode=mode,
        refresh_sees="forced refresh: new version",
    ) as row:
        h = make(api, azure, app.name, policy=POLICY)
        try:
            assert h.chat(stream)
            rotate_to_secondary(azure, app)  # the cached key is revoked; the vault holds the new one
            seen, _ = outcome(lambda: h.chat(stream))
            row["caller_sees"] = "success (one refresh, one re-send)" if seen == "ok" else seen
            stats = h.stats()
            row["vault_reads"] = stats.vault_reads - 1
            row["good_key_kept"] = h.current() is not None and (
                h.current_key().reveal() == app.subscription.secondary_key
            )
            assert seen == expected("gateway", "401 key rotated", "-")
            assert (stats.vault_reads, stats.forced_refreshes, stats.resends_401) == (2, 1, 1)
            assert invalid_count(azure) == stats.resends_401
            assert row["good_key_kept"]
        finally:
            h.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
def test_gateway_401_revoked_key(azure: LocalAzure, outcome_log: OutcomeLog, api: Api, mode: str) -> None:
    app = new_app_secret(azure)
    stream = mode == "stream"
    with recorded(
        outcome_log,
        f"gateway/401 key revoked/-/{api}/{mode}",
        service="APIM gateway",
        fault="401: key revoked (vault not updated)",
        phase="key cached",
        api=api,
        mode=mode,
        refresh_sees="1 forced refresh per forced_refresh_interval",
        good_key_kept="n/a (no valid key exists)",
    ) as row:
        h = make(api, azure, app.name, policy=POLICY)
        try:
            assert h.chat(stream)
            azure.apim_state.regenerate(app.sid, "primary")  # revoked, and the vault still holds it
            seen, _ = outcome(lambda: h.chat(stream))
            again, _ = outcome(lambda: h.chat(stream))  # inside forced_refresh_interval
            row["caller_sees"] = f"openai.{seen}"
            stats = h.stats()
            row["vault_reads"] = stats.vault_reads - 1
            assert seen == again == expected("gateway", "401 key revoked", "-")
            assert (stats.vault_reads, stats.forced_refreshes, stats.resends_401) == (2, 1, 0)
            assert h.current() is not None  # the vault's current version stays cached
        finally:
            h.close()


GATEWAY_FAULTS: dict[str, dict[str, Any]] = {
    "429": {"kind": "throttle", "retry_after": 1},
    "503": {"kind": "status", "status": 503},
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", [f for f in faults("gateway", "-") if f in GATEWAY_FAULTS])
@pytest.mark.parametrize("api", APIS)
def test_gateway_error_status(
    azure: LocalAzure, outcome_log: OutcomeLog, api: Api, fault: str, mode: str
) -> None:
    spec, caller_sees = GATEWAY_FAULTS[fault], expected("gateway", fault, "-")
    app = new_app_secret(azure)
    stream = mode == "stream"
    with recorded(
        outcome_log,
        f"gateway/{fault}/-/{api}/{mode}",
        service="APIM gateway",
        fault=fault,
        phase="key cached",
        api=api,
        mode=mode,
        refresh_sees="-",
    ) as row:
        h = make(api, azure, app.name, policy=POLICY)
        try:
            assert h.chat(stream)
            good = h.current()
            azure.gateway.faults.inject(times=1, **spec)
            seen, _ = outcome(lambda: h.chat(stream))
            row["caller_sees"] = f"openai.{seen} (max_retries=0)"
            stats = h.stats()
            row["vault_reads"] = stats.vault_reads - 1
            row["good_key_kept"] = h.current() == good
            assert seen == caller_sees
            assert (stats.vault_reads, stats.forced_refreshes) == (1, 0)
            assert row["good_key_kept"]
            assert h.chat(stream)
        finally:
            h.close()


# ------------------------------------------------------------------------------ Azure OpenAI backend


def _inject_backend(azure: LocalAzure, fault: str) -> None:
    faults = azure.openai.faults
    if fault == "500":
        faults.inject("status", status=500, times=1)
    elif fault == "connection reset":
        faults.inject("reset", times=1)
    elif fault.startswith("slow"):
        faults.inject_stream("slow_stream", seconds=0.05, times=1)
    else:
        faults.inject_stream("drop_stream", after_chunks=2, times=1)


@pytest.mark.parametrize(
    ("fault", "mode"), [(r.fault, m) for r in MATRIX if r.service == "backend" for m in r.modes]
)
@pytest.mark.parametrize("api", APIS)
def test_backend_fault(azure: LocalAzure, outcome_log: OutcomeLog, api: Api, fault: str, mode: str) -> None:
    caller_sees = expected("backend", fault, "-")
    app = new_app_secret(azure)
    stream = mode == "stream"
    with recorded(
        outcome_log,
        f"backend/{fault}/-/{api}/{mode}",
        service="Azure OpenAI backend",
        fault=fault,
        phase="key cached",
        api=api,
        mode=mode,
        refresh_sees="-",
    ) as row:
        h = make(api, azure, app.name, policy=POLICY)
        try:
            assert h.chat(stream)
            good = h.current()
            _inject_backend(azure, fault)
            seen, exc = outcome(lambda: h.chat(stream))
            cause = exc.__cause__ if exc is not None else None
            row["caller_sees"] = (
                "success"
                if seen == "ok"
                else f"openai.{seen}" + (f" ({type(cause).__name__})" if cause is not None else "")
            )
            stats = h.stats()
            row["vault_reads"] = stats.vault_reads - 1
            row["good_key_kept"] = h.current() == good
            assert seen == caller_sees, repr(exc)
            assert (stats.vault_reads, stats.forced_refreshes, stats.resends_401) == (1, 0, 0)
            assert row["good_key_kept"]
            assert h.chat(stream)
            assert set(used_slots(azure, app)) == {"primary"}
        finally:
            h.close()


# ------------------------------------------------------------------------------------------- the table

#: The rows run by a test of their own (not through an injection table above).
OWN_TESTS = {
    ("keyvault", "503 x2 then recover", "cold"),
    ("keyvault", "503 x2 then recover", "warm"),
    ("identity", "down (500)", "warm"),
    ("gateway", "401 key rotated", "-"),
    ("gateway", "401 key revoked", "-"),
}


def test_every_row_of_the_matrix_is_run_by_a_test() -> None:
    """A row the tests do not run would sit in the table unchecked: each is injected by a table above or
    has its own test; and each (service, fault, phase) has exactly one row."""
    keys = [(r.service, r.fault, r.phase) for r in MATRIX]
    assert len(keys) == len(set(keys))
    injected = {
        "keyvault": set(KV_FAULTS),
        "identity": set(IDENTITY_FAULTS),
        "gateway": set(GATEWAY_FAULTS),
        "backend": {
            "500",
            "connection reset",
            "slow stream (0.05 s/chunk)",
            "dropped stream (after 2 events)",
        },
    }
    not_run = [k for k in keys if k not in OWN_TESTS and k[1] not in injected[k[0]]]
    assert not_run == []
    assert all(set(r.modes) <= set(MODES) and r.modes for r in MATRIX)
