"""OpenTelemetry (issue 14, part 1): metrics and spans match stats(), and never carry a key.

opentelemetry-sdk's InMemoryMetricReader and InMemorySpanExporter are installed as the global providers
once for this module's tests (the API allows setting them only once per process); every test reads only
the series of its own secret (``apimvault.secret``), so tests do not see each other's figures.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import openai
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from apimvault import (
    AsyncSubscriptionKeyProvider,
    CachePolicy,
    SubscriptionKeyProvider,
    VaultUnavailableError,
    create_async_azure_openai,
    create_azure_openai,
    refusal_stats,
)
from apimvault.local import DEPLOYMENT, Fault, LocalAzure
from tests._support.cli import new_rotating_app
from tests._support.core import Events, FakeClock, new_app_secret, rotate_to_secondary, user_messages
from tests._support.rotation import rotator_access

MESSAGES = user_messages("hello")
# Its own numbers: FAST_REFRESH's plus an hour of staleness, so a key past its TTL reads "stale", not expired.
POLICY = CachePolicy(ttl=300, jitter=0, refresh_margin=60, forced_refresh_interval=5, max_staleness=3600)


class Otel:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        metrics.set_meter_provider(MeterProvider(metric_readers=[self.reader]))
        trace.set_tracer_provider(tracer_provider)

    def points(self, name: str, secret: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found = []
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                if sm.scope.name != "apimvault":
                    continue
                for metric in sm.metrics:
                    if metric.name == name:
                        found += [
                            p
                            for p in metric.data.data_points
                            if (p.attributes or {}).get("apimvault.secret") == secret
                        ]
        return found

    def total(self, name: str, secret: str, **attrs: str) -> float:
        return float(
            sum(
                p.value
                for p in self.points(name, secret)
                if all(
                    (p.attributes or {}).get(f"apimvault.{k.replace('_', '.')}") == v
                    for k, v in attrs.items()
                )
            )
        )

    def read_spans(self, secret: str) -> list[Any]:
        return [
            s
            for s in self.spans.get_finished_spans()
            if s.name == "apimvault.vault.read" and (s.attributes or {}).get("apimvault.secret") == secret
        ]

    def everything_exported(self) -> str:
        """Every exported name, attribute and event of metrics and spans, as one text."""
        data = self.reader.get_metrics_data()
        metric_text = data.to_json() if data else ""
        span_text = "\n".join(s.to_json() for s in self.spans.get_finished_spans())
        return metric_text + span_text


@pytest.fixture(scope="module")
def otel() -> Otel:
    return Otel()


def _chat(client: openai.AzureOpenAI) -> None:
    assert client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES).choices


def test_metrics_and_spans_match_stats_through_rotation_outage_and_resend(
    otel: Otel, azure: LocalAzure
) -> None:
    app = new_app_secret(azure)
    clock = FakeClock()
    events = Events()
    provider = SubscriptionKeyProvider(
        azure.vault_url,
        app.name,
        clock=clock,
        policy=POLICY,
        **events.callbacks(),
    )
    client = create_azure_openai(provider, max_retries=0)
    where = provider.where
    tracer = trace.get_tracer("test")
    try:
        _chat(client)  # load
        old_key = provider.get()
        rotate_to_secondary(azure, app)
        with tracer.start_as_current_span("app.request") as request_span:
            _chat(client)  # 401 -> forced refresh -> re-send
        new_key = provider.get()
        azure.keyvault.faults.add(Fault("status", status=503))  # outage
        with pytest.raises(VaultUnavailableError):
            provider.refresh()
        clock.advance(POLICY.ttl + 30)  # past the fresh period: served stale
        _chat(client)  # starts a background refresh, which fails too
        events.wait("errors", 2)
        azure.keyvault.faults.clear()
        stats = provider.stats()
        assert (
            stats.state == "stale" and stats.failures >= 1 and stats.rotations == 1 and stats.resends_401 == 1
        )

        assert otel.total("apimvault.vault.reads", where) == stats.vault_reads
        assert otel.total("apimvault.vault.reads", where, outcome="success") == stats.refreshes
        failed = stats.vault_reads - stats.refreshes
        assert failed >= 1 and stats.failures == failed
        assert otel.total("apimvault.vault.reads", where, outcome="VaultUnavailableError") >= 1
        assert otel.total("apimvault.vault.reads", where, reason="401 from gateway") == 1
        durations = otel.points("apimvault.vault.read.duration", where)
        assert sum(p.count for p in durations) == stats.vault_reads
        assert {p.attributes["apimvault.outcome"] for p in durations} == {"success", "VaultUnavailableError"}
        assert otel.total("apimvault.gateway.resends", where, refusal_kind="key") == stats.resends_401 == 1
        assert (
            otel.total("apimvault.gateway.refusals", where, refusal_kind="key") == refusal_stats(provider).key
        )
        assert otel.total("apimvault.key.rotations", where) == stats.rotations
        (age,) = otel.points("apimvault.key.age", where)
        assert age.value == pytest.approx(provider.stats().age_s)
        (staleness,) = otel.points("apimvault.key.staleness", where)
        assert staleness.value == pytest.approx(30, abs=1)
        states = {p.attributes["apimvault.state"]: p.value for p in otel.points("apimvault.key.state", where)}
        assert states == {"empty": 0, "fresh": 0, "refresh-due": 0, "stale": 1, "expired": 0}

        spans = otel.read_spans(where)
        assert len(spans) == stats.vault_reads
        ok = [s for s in spans if s.attributes["apimvault.outcome"] == "success"]
        assert len(ok) == stats.refreshes
        assert {s.attributes["apimvault.key.version"] for s in ok} == {
            provider.get_key().version,
            *{s.attributes["apimvault.key.version"] for s in ok[:1]},
        }
        assert all(
            s.attributes["apimvault.key.fingerprint"] in {provider.get_key().fingerprint, _fp(old_key)}
            for s in ok
        )
        bad = [s for s in spans if s.attributes["apimvault.outcome"] != "success"]
        assert bad and all(s.status.status_code is trace.StatusCode.ERROR for s in bad)
        # The re-send is an event on the request's span, and the forced read ran inside it.
        (finished_request,) = [s for s in otel.spans.get_finished_spans() if s.name == "app.request"]
        assert [e.name for e in finished_request.events] == ["apimvault.resend"]
        assert finished_request.events[0].attributes == {"apimvault.refusal.kind": "key"}
        forced = [s for s in spans if s.attributes["apimvault.reason"] == "401 from gateway"]
        assert forced[0].parent is not None
        assert forced[0].parent.span_id == request_span.get_span_context().span_id

        exported = otel.everything_exported()
        assert where in exported  # the check below reads the real export
        for secret in (old_key, new_key):
            assert secret not in exported
    finally:
        azure.keyvault.faults.clear()
        client.close()
        provider.close()


def _fp(value: str) -> str:
    from apimvault import fingerprint

    return fingerprint(value)


async def test_async_reads_and_refusals_are_counted(otel: Otel, azure: LocalAzure) -> None:
    app = new_app_secret(azure)
    provider = AsyncSubscriptionKeyProvider(azure.vault_url, app.name, clock=FakeClock(), policy=POLICY)
    client = create_async_azure_openai(provider, max_retries=0)
    where = provider.where
    azure.gateway.policies.set("/openai", {"rate_limit_by_key": {"calls": 1, "renewal_period": 60}})
    try:
        await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        stats = provider.stats()
        assert (
            otel.total("apimvault.vault.reads", where, outcome="success", reason="load")
            == stats.vault_reads
            == 1
        )
        assert otel.total("apimvault.gateway.refusals", where, refusal_kind="rate") == 1
        assert len(otel.read_spans(where)) == 1
        assert (await provider.get()) not in otel.everything_exported()
    finally:
        azure.gateway.policies.clear()
        await client.close()
        await provider.close()


def test_azure_sdk_spans_are_children_of_the_read_span(otel: Otel, azure: LocalAzure) -> None:
    from azure.core.settings import settings

    app = new_app_secret(azure)
    provider = SubscriptionKeyProvider(azure.vault_url, app.name, clock=FakeClock(), policy=POLICY)
    previous = settings.tracing_enabled()
    settings.tracing_enabled = True
    try:
        provider.refresh()
    finally:
        settings.tracing_enabled = previous
        provider.close()
    (read,) = otel.read_spans(provider.where)
    children = [
        s
        for s in otel.spans.get_finished_spans()
        if s.parent is not None and s.parent.span_id == read.context.span_id
    ]
    assert children, "the Azure SDK's spans should be children of apimvault.vault.read"
    assert all(s.context.trace_id == read.context.trace_id for s in children)


def test_rotate_runs_are_counted(otel: Otel, azure: LocalAzure) -> None:
    from apimvault.rotation import rotate

    app = new_rotating_app(azure)
    where = f"{azure.vault_url}/secrets/{app.name}"
    with rotator_access(azure) as rotator:  # infra's rotator roles on this app only, not Secrets Officer
        credential = rotator.for_app(app)
        result = rotate(
            vault_url=azure.vault_url, secret_name=app.name, apim_subscription_id=None, credential=credential
        )
        assert result.reason == "rotated"
        skipped = rotate(
            vault_url=azure.vault_url,
            secret_name=app.name,
            apim_subscription_id=None,
            credential=credential,
            expected_version=result.old_version,
        )
    assert skipped.skipped
    assert otel.total("apimvault.rotate.runs", where, outcome="rotated") == 1
    assert otel.total("apimvault.rotate.runs", where, outcome="skipped") == 1
    new_value = azure.keyvault.latest(app.name).value
    assert new_value not in otel.everything_exported()


@pytest.mark.parametrize(
    "setup",
    [
        "",  # opentelemetry-api installed, no provider configured
        "import sys; sys.modules['opentelemetry'] = None",  # not installed
    ],
    ids=["no-provider", "not-installed"],
)
def test_no_provider_or_no_package_means_no_telemetry_work(setup: str) -> None:
    code = f"""{setup}
import json
from apimvault import _telemetry as t
calls = []
out = t.traced_read(object(), "load", lambda: calls.append(1) or "value")
t.refusal_counted(object(), "key"); t.resend_event("key"); t.rotation_counted("rotated", "x")
print(json.dumps([out, calls, t._active() is None, t._instruments is None, len(t._providers)]))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == ["value", [1], True, True, 0]


def test_canary_key_never_appears_in_any_export(otel: Otel, azure: LocalAzure) -> None:
    from tests._support.canary import CANARY_PRIMARY, CANARY_SECONDARY, find_leaks, seed_canary_app

    app = seed_canary_app(azure, "otel")
    provider = SubscriptionKeyProvider(azure.vault_url, app.name, clock=FakeClock(), policy=POLICY)
    client = create_azure_openai(provider, max_retries=0)
    tracer = trace.get_tracer("test")
    try:
        with tracer.start_as_current_span("app.request"):
            _chat(client)
        azure.apim_state.regenerate(app.sid, "primary")  # the canary key is refused: 401, refresh, re-send
        azure.keyvault.put_secret(app.name, CANARY_SECONDARY, tags={"CredentialId": "secondary"})
        with tracer.start_as_current_span("app.request"):
            _chat(client)
        assert refusal_stats(provider).key_resends == 1
    finally:
        client.close()
        provider.close()
    exported = otel.everything_exported()
    assert provider.where in exported and "apimvault.resend" in exported
    assert find_leaks({"otel": exported}, [CANARY_PRIMARY, CANARY_SECONDARY]) == []


@pytest.mark.parametrize("clocks", ["real", "split"])
def test_staleness_compares_the_scheduling_clock_only(otel: Otel, azure: LocalAzure, clocks: str) -> None:
    """Issue 21 item 14: a fresh key's staleness is 0, not ~1.8e9 s (wall minus monotonic); past the
    fresh period it counts on the scheduling clock."""
    app = new_app_secret(azure)
    wall, mono = FakeClock(), FakeClock(start=1000.0)
    kwargs: dict[str, Any] = {"clock": wall, "monotonic": mono} if clocks == "split" else {}
    provider = SubscriptionKeyProvider(azure.vault_url, app.name, policy=POLICY, **kwargs)
    try:
        provider.get_key()
        (staleness,) = otel.points("apimvault.key.staleness", provider.where)
        assert staleness.value == 0
        if clocks == "split":
            mono.advance(POLICY.ttl + 30)  # the wall clock stands still: only the scheduling clock counts
            (staleness,) = otel.points("apimvault.key.staleness", provider.where)
            assert staleness.value == pytest.approx(30)
    finally:
        provider.close()


DAY = 86400.0


@pytest.mark.parametrize("api", ["sync", "async"])
def test_near_expiry_warns_once_a_day_and_exports_seconds_left(
    otel: Otel, azure: LocalAzure, api: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 19 item 7: from 7 days before expires_on a provider logs a WARNING once a day and exports
    apimvault.key.expires_in (seconds left); before that window neither."""
    clock = FakeClock()
    expires = int(clock.now + 8 * DAY)
    app = new_app_secret(azure, expires=expires)
    policy = CachePolicy(ttl=3600, jitter=0, refresh_margin=60, max_staleness=0)

    def warnings() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelname == "WARNING" and "expires at" in r.getMessage()
        ]

    async def aload(provider: AsyncSubscriptionKeyProvider) -> None:
        await provider.get_key()

    loop = asyncio.new_event_loop()
    if api == "sync":
        provider: Any = SubscriptionKeyProvider(azure.vault_url, app.name, clock=clock, policy=policy)

        def load() -> None:
            provider.get_key()
    else:
        provider = loop.run_until_complete(_build_async(azure.vault_url, app.name, clock, policy))

        def load() -> None:
            loop.run_until_complete(aload(provider))

    caplog.set_level("WARNING", logger="apimvault")
    try:
        load()
        assert warnings() == []
        assert otel.points("apimvault.key.expires_in", provider.where) == []
        clock.advance(DAY + 1)  # 7 days minus 1 s left: past the hard limit, so the next get_key reads
        load()
        assert len(warnings()) == 1 and app.name in warnings()[0]
        (left,) = otel.points("apimvault.key.expires_in", provider.where)
        assert left.value == pytest.approx(expires - clock.now)
        assert provider.stats().expires_in_s == pytest.approx(expires - clock.now)
        for _ in range(5):  # five more reads within the day: no second warning
            clock.advance(3601)
            load()
        assert len(warnings()) == 1
        clock.advance(DAY - 5 * 3601)  # a day after the first warning
        load()
        assert len(warnings()) == 2
        (left,) = otel.points("apimvault.key.expires_in", provider.where)
        assert left.value == pytest.approx(expires - clock.now)
    finally:
        if api == "sync":
            provider.close()
        else:
            loop.run_until_complete(provider.close())
        loop.close()


async def _build_async(
    url: str, name: str, clock: FakeClock, policy: CachePolicy
) -> AsyncSubscriptionKeyProvider:
    return AsyncSubscriptionKeyProvider(url, name, clock=clock, policy=policy)
