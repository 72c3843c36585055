# ruff: noqa: E501 - Markdown prose lines
"""BENCHMARKS.md: the tables of one run with the method and the reading of the numbers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .report import markdown_table

if TYPE_CHECKING:
    from .fleet import FleetResult
    from .run import Results


METHOD = """\
### How each contender is built

All contenders run against the same embedded local Azure (Key Vault, managed identity, APIM gateway,
Azure OpenAI backend on loopback TLS), authenticate with `DefaultAzureCredential()` and use the same
`SecretClient` settings (apimvault's `DEFAULT_CLIENT_KWARGS`: one quick SDK retry), so transport and retry
behaviour are equal. Each `SecretClient` has read a warm-up secret first, so its token and the Key Vault
challenge are cached and vault reads count secret reads only.

1. **static** — `get_secret()` once at start-up; `AzureOpenAI(api_key=key, default_headers={{"Ocp-Apim-Subscription-Key": key}})`.
2. **per-request** — openai's own `api_key=callable`, the callable doing `SecretClient.get_secret()` on
   every request. With `AzureOpenAI` a callable fills `api-key`, which this APIM (like most) does not read, so
   an httpx2 request hook moves the value to `Ocp-Apim-Subscription-Key` — what APIM configured for
   `api-key` would do. openai calls the callable once per request; the hook adds no vault read.
3. **ttl-lock** — `cachetools.cached(TTLCache(maxsize=1, ttl=TTL), lock=threading.Lock())` around
   `get_secret`, fed to openai as contender 2 is (callable + header hook).
4. **ttl-cond** — the same with `condition=threading.Condition()`.
5. **aws** — aws-secretsmanager-caching's `SecretCache(SecretCacheConfig(secret_refresh_interval=TTL))`,
   the one peer that also serves its last value through an outage. Its boto client is replaced by
   `KeyVaultForSecretCache` (`bench/contenders.py`, about 20 lines): `describe_secret` reads the latest
   Key Vault version and reports it as `AWSCURRENT`; `get_secret_value` returns the value of that version
   (kept from the same read, so one refresh is one vault read). AWS is never contacted. Fed to openai as
   contender 2 is. It draws each refresh interval from 0.5-1x TTL (whole seconds), holds a lock through the
   read (readers wait), and serves the last value with no bound while reads fail.
6. **apimvault** — `SubscriptionKeyProvider` + `create_azure_openai`; the async rows use
   `AsyncSubscriptionKeyProvider` + `create_async_azure_openai`. cachetools and aws-secretsmanager-caching
   have no asyncio form, so contenders 3-5 have no async row.

TTL: 300 s (apimvault's default `CachePolicy`) in the first table; the real-clock table scales everything
down (below).

### What each column measures

- **cold-start vault reads** — a fresh key source; 256 threads released by one barrier (1,000 tasks in one
  `gather` for async) each ask for the key once, with 50 ms of Key Vault latency injected (a cloud-like round
  trip, so the herd overlaps). The static contender's start-up read is counted. Counted by the vault.
- **rotation + revocation** — real chat completions through the gateway, 8 threads (tasks) in a loop on
  one shared client; after 0.4 s the key is rotated the Microsoft way (regenerate secondary, store it as a
  new secret version, regenerate primary = revoke the key in use) and traffic continues. The cached
  contenders' TTL (300 s) does not pass: their failures last until it expires, the static key's until a
  restart.
- **cache hit** — the key getter on a warm cache, `time.perf_counter_ns` over batches of 2,000 calls,
  median of the batch means (for per-request it is a Key Vault read). apimvault's figure is measured with
  `opentelemetry-api` installed (the `dev` extra pulls in the `otel` extra) and no OpenTelemetry provider
  configured: the hit path has no telemetry hook either way.
- **client µs/request (mock transport)** — one `chat.completions.create` with the network replaced by an
  `httpx2.MockTransport`: the client-side cost of each way of supplying the key, free of server noise.
- **chat throughput vs 1** — 32 threads sharing one client (32 tasks for the async clients) against the
  stack running in a child process (so server and client do not share a GIL), in **interleaved pairs**:
  each round runs the static contender and one other back to back (order alternating between rounds, the
  order of the pairs rotating), so load drift on this shared machine hits both halves of a pair alike.
  The figure is the median of the per-pair ratios (contender's rate / static's rate) with the interquartile
  range in brackets and the median rate in parentheses. **client CPU µs/request** is the client process's
  CPU time per completed request in those runs, median [IQR] (the server's CPU is in the other process).
- **import ms beyond deps** — `python -X importtime`: `openai, httpx2, azure.identity(.aio),
  azure.keyvault.secrets(.aio), cachetools` first, then `import apimvault` plus the first touch of
  `SubscriptionKeyProvider` and `create_azure_openai` (the top level is lazy); the self-times of every
  module imported after that point, median of runs.

### The real-clock figures (`bench/realclock.py`)

Every contender — sync rows on threads, async rows each on its own event loop — runs **at the same time**
against one in-process stack, so all of them see the same injected latency and the same outage, on the
real clock (no simulated time). The policy is scaled down so the run stays short: **TTL {ttl:g} s** for
every contender; apimvault with `CachePolicy(ttl={ttl:g}, refresh_margin={margin:g}, max_staleness={stale:g},
jitter=0)` (jitter off so the reads per TTL can be stated exactly). Each contender has {callers} callers
(threads or tasks) asking for the key, then pausing {pace:g} ms. Each contender's vault reads are the HTTP
responses to its own `SecretClient`'s reads of the secret, seen through azure-core's public
`raw_response_hook` (an SDK retry counts as a read).

- **blocked at expiry** — every secret read answers {latency:g} ms late for {seconds:.1f} s: long enough for
  {expiries} expiries of a TTL-based cache that reads on expiry (TTL + read time each). A call taking
  > 100 ms waited for a vault read; "slowest call" is the worst single call. **vault reads (per TTL)**:
  reads in the run, and divided by the run's length in TTLs. A refresh-ahead cache reads once per
  TTL - margin + read time ({period:.1f} s here, {per_ttl:.2f} per TTL), i.e. *more* often than once per
  TTL; that is the price of never blocking. aws reads once per 0.5-1x TTL + read time.
- **outage** — from {outage_at:g} s after every contender loaded its key, every secret read answers 503 for
  {outage:g} s, longer than TTL + `max_staleness` ({hard:g} s): apimvault's key passes its hard limit inside
  the outage, {hard_in:g} s in, by design. Then the vault is back and the run watches until every contender
  has gone {settle:g} s without a failure (at most {recovery_max:g} s). "failing for" runs from the first
  failed call to the end of the last; "last failure after vault back" is the recovery time callers see;
  "first good read after vault back" is when the contender itself read the vault successfully again.
"""


def method(r: Results) -> str:
    from .realclock import SCALE as S

    expiries = r.sizes.expiries
    seconds = r.expiry[0].seconds if r.expiry else 0.0
    return METHOD.format(
        ttl=S.ttl,
        margin=S.margin,
        stale=S.staleness,
        callers=r.sizes.callers,
        pace=S.pace * 1000,
        latency=S.latency * 1000,
        seconds=seconds,
        expiries=expiries,
        period=S.refresh_period(),
        per_ttl=S.ttl / S.refresh_period(),
        outage_at=S.outage_at,
        outage=S.outage,
        hard=S.ttl + S.staleness,
        hard_in=S.ttl + S.staleness - S.outage_at,
        settle=S.settle,
        recovery_max=S.recovery_max,
    )


def real_clock_reading(r: Results) -> str:
    from .contenders import AWS, PER_REQUEST, TTL_COND, TTL_LOCK
    from .realclock import SCALE as S
    from .run import apimvault_lanes

    exp_s, exp_a, out_s, out_a = apimvault_lanes(r)
    by_label = {e.label: e for e in r.expiry}
    out_by = {o.label: o for o in r.outage}
    lock, cond, aws = by_label[TTL_LOCK.label], by_label[TTL_COND.label], by_label[AWS.label]
    aws_out, cond_out, per_out = out_by[AWS.label], out_by[TTL_COND.label], out_by[PER_REQUEST.label]
    slow = max(out_s.recovery, out_a.recovery) > 2.0
    why = " (set by the provider's back-off after a long outage, not by the vault)" if slow else ""
    return f"""\
### Reading the real-clock figures

- **At expiry** apimvault blocked {exp_s.blocked} of {exp_s.calls:,} sync calls and {exp_a.blocked} of
  {exp_a.calls:,} async calls (slowest {max(exp_s.worst_ms, exp_a.worst_ms):.1f} ms, against
  {S.latency * 1000:.0f} ms per vault read). A cache that reads on expiry makes the callers that arrive
  during the read wait for it: ttl-cond {cond.blocked} calls, aws {aws.blocked} (its lock is held through
  the read); ttl-lock {lock.blocked}, and it also reads once per waiting caller ({lock.reads} reads against
  ttl-cond's {cond.reads}).
- **Reads per TTL**, stated plainly: apimvault read {exp_s.reads} times in {exp_s.seconds:.1f} s
  ({exp_s.reads_per_ttl:.2f} per TTL), ttl-cond {cond.reads} ({cond.reads_per_ttl:.2f}), aws {aws.reads}
  ({aws.reads_per_ttl:.2f}). Refresh-ahead reads once per TTL - margin (+ the read itself), more often
  than once per TTL: with the defaults (300 s, 60 s margin) a process reads about every 240 s. The fleet
  simulation below drives the same `KeyCache`, so its read counts include that.
- **Outage** ({S.outage:g} s of 503s): aws failed {aws_out.failed} of {aws_out.calls:,} calls — it serves
  its last value for as long as reads fail, with no bound (a revoked, disabled or deleted secret
  included), and read the vault again {_opt(aws_out.reread)} s after it was back. apimvault served its key
  until its hard limit (first failure {_opt(out_s.first_failure)} s sync, {_opt(out_a.first_failure)} s
  async; TTL + `max_staleness` after the load ended {out_s.hard_limit:.2f} s and {out_a.hard_limit:.2f} s
  in), then failed fast; its callers' last failure came {out_s.recovery:.2f} s (sync) and
  {out_a.recovery:.2f} s (async) after the vault was back{why}. ttl-cond failed from {_opt(cond_out.first_failure)} s in (its TTL) and recovered
  {cond_out.recovery:.2f} s after; per-request failed every call in the outage ({per_out.failed:,}).
"""


def _opt(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def _fleet(r: Results, name: str) -> FleetResult | None:
    for n, f in r.fleet:
        if n == name:
            return f
    return None


def fleet_reading(r: Results) -> str:
    base = _fleet(r, "jitter 0.2, push off")
    flat = _fleet(r, "jitter 0, push off")
    push = _fleet(r, "jitter 0.2, push on")
    spread = _fleet(r, "jitter 0.2, push spread 30 s")
    if base is None or flat is None or push is None or spread is None:
        return ""
    n = base.config.processes
    limit = base.config.limit
    sweep = {f.config.policy.ttl: f for name, f in r.fleet if name.startswith("sweep")}
    ttl60 = sweep.get(60.0)
    ttl60_line = ""
    if ttl60 is not None:
        rate60 = ttl60.reads / ttl60.config.day * 10
        ttl60_line = (
            f" A 60 s TTL would average {rate60:,.0f} reads per 10 s (peak {ttl60.peak.get('steady', 0):,}), "
            f"{'over' if ttl60.peak.get('steady', 0) > limit else 'close to'} the {limit:,} limit by itself."
        )
    return f"""\
### Reading the simulation

{n:,} processes, each with apimvault's own `KeyCache` (`apimvault._policy`), {base.config.rate:g} request/s
each (Poisson), Key Vault admitting {limit:,} reads per 10 s and answering 429 with `Retry-After` beyond,
{base.config.latency * 1000:.0f} ms per read. The fleet starts within {base.config.start_window:.0f} s; at
08:00 a planned rotation writes a new version (old key revoked at APIM an hour later); at 16:00 an emergency
rotation writes a new version and revokes the key in use at the same instant (the 401 storm). "push" delivers
an Event Grid `SecretNewVersionCreated` → `invalidate()` to every process within {push.config.push_delay:g} s
of each rotation ("push spread 30 s": within 30 s). Failed requests are requests that got no usable key or
whose 401 reached the caller.

- **Steady state:** with the default TTL (300 s) and jitter (0.2) the peak is {base.peak.get("steady", 0):,} reads
  per 10 s ({base.peak.get("steady", 0) / limit:.0%} of the limit); without jitter the fleet stays in step with
  its start and peaks at {flat.peak.get("steady", 0):,} ({flat.peak.get("steady", 0) / limit:.0%}).{ttl60_line}
- **Planned rotation:** without push the fleet converges in {base.rotation_converged_s:.0f} s (one refresh
  period) with no extra load and no failures, as long as the old key stays valid at APIM for at least the
  TTL; push converges in {push.rotation_converged_s:.0f} s but sends the whole fleet to the vault at once
  (peak {push.peak.get("rotation", 0):,} per 10 s, {push.throttled:,} 429s over the day); spreading the
  push-triggered refreshes over 30 s converges in {spread.rotation_converged_s:.0f} s at a peak of
  {spread.peak.get("rotation", 0):,}.
- **401 storm:** every process needs a new key at the same moment, so the vault limit sets the pace:
  {base.storm_converged_s:.0f} s to converge (the floor is {n / limit * 10:.0f} s = {n:,} reads at {limit:,} per
  10 s), {sum(base.failed.values()):,} failed requests, {base.peak.get("storm", 0):,} vault requests in the
  busiest 10 s (most of them 429s: every process's first 401 forces one read at the same instant; after a
  429 the 401 path waits out `Retry-After` before it reads again). Push makes it worse ({sum(push.failed.values()):,} failed): its refreshes and the
  401-forced ones hit the throttled vault together, and the key is revoked before anyone could have the new
  one anyway. Only revoking later avoids the storm.
"""


def recommendations(r: Results) -> str:
    base = _fleet(r, "jitter 0.2, push off")
    if base is None:
        return ""
    limit = base.config.limit
    n = base.config.processes
    steady = max(base.peak.get("steady", 1), 1)
    supported = int(n * limit / steady)
    return f"""\
### Defaults this supports

- **TTL 300 s, jitter 0.2, refresh margin 60 s (keep):** the steady peak uses {steady / limit:.0%} of one
  vault's limit for {n:,} processes, so one vault carries about {supported:,} processes at this TTL before the
  steady peak alone reaches the limit; a shorter TTL buys nothing (rotation needs no TTL expiry: 401 →
  refresh) and a 60 s TTL would eat the whole limit at this fleet size. Jitter is what keeps a fleet that
  started together from refreshing together; 0.2 halves the steady peak compared with 0.
- **forced_refresh_interval 5 s (keep), but see the 401 storm:** the interval caps each process at one
  forced read per 5 s; it cannot stop a fleet-wide storm from exceeding the vault limit, only the vault's
  429s pace it.
- **Rotation procedure:** revoke the old key no sooner than TTL + refresh margin after writing the new
  version (the planned rotation above: 0 failures, no extra load). Immediate revocation costs every process
  a few seconds of 401s however the cache is tuned.
- **Push invalidation:** spread the refreshes it triggers (a random delay of up to `N / {limit // 10}` s for
  N processes per vault, 30 s for {n:,}) — delivered to everyone at once it causes the only avoidable 429 burst
  of the day.
"""


def render(r: Results) -> str:
    from .run import (
        FLEET_HEADER,
        STACK_HEADER,
        SWEEP_HEADER,
        contender_rows,
        cpu_line,
        fleet_rows,
        header,
        real_header,
        real_rows,
        stack_rows,
        sweep_rows,
        targets,
    )

    m = r.machine
    s = r.stack
    parts = [
        "# Benchmarks",
        "",
        "apimvault against what users would write themselves, measured side by side in one run on one machine.",
        f"Regenerate with `python -m bench` (`--quick` for a smaller run). This file: "
        f"`python -m bench{' --quick' if r.quick else ''}`, {m['date']}, {r.elapsed:.0f} s.",
        "",
        f"- **Machine:** {m['machine']}; {m['os']}; {m['python']}",
        f"- **Packages:** {m['packages']}; commit `{m['commit']}`",
        f"- **Load average at start:** {m['load']} (a shared 2-core machine: throughput figures are medians of "
        "interleaved pairs for that reason)",
        "",
        "## Contenders",
        "",
        markdown_table(header(r), contender_rows(r)),
        "",
        f"apimvault `get_key()` (what its auth flow calls per request): {r.get_key_us:.3f} µs median. "
        f"Import: apimvault's own modules {r.imports[0]:.1f} ms on top of {r.imports[1]:.0f} ms of dependencies.",
        "",
        f"Client CPU per request (c=32, median [IQR] over interleaved pairs) — {cpu_line(r)}.",
        "",
        "## Refresh at expiry and a vault outage (real clock, every contender at once)",
        "",
        markdown_table(real_header(r), real_rows(r)),
        "",
        real_clock_reading(r),
        "## Targets",
        "",
        *[f"- {'✅' if ok else '❌'} {name}: {detail}" for name, ok, detail in targets(r)],
        "",
        method(r),
        "## Local stack throughput",
        "",
        markdown_table(STACK_HEADER, stack_rows(r)),
        "",
        f"One client process with 32 threads sharing one client is how an application runs; there the client "
        f"(GIL, TLS, openai's request building) is the bottleneck. {s.procs} client processes x "
        f"{s.threads_per_proc} threads (`bench/_worker.py`) show what the stack itself sustains. Either way it "
        "is well above what the library figures need, so they measure the library, not the stack.",
        "",
        "## Fleet simulation",
        "",
        markdown_table(FLEET_HEADER, fleet_rows(r)),
        "",
        markdown_table(SWEEP_HEADER, sweep_rows(r)),
        "",
        "(TTL sweep: the same fleet for "
        f"{next((f.config.day for n, f in r.fleet if n.startswith('sweep')), 0) / 3600:g} h without rotations.)",
        "",
        fleet_reading(r),
        recommendations(r),
    ]
    return "\n".join(parts)
