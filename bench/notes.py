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
behaviour are equal. For the behaviour figures each contender gets its own APIM subscription and vault
secret and a `SecretClient` whose token and challenge are already cached (vault reads then count secret
reads only).

1. **static** — `get_secret()` once at start-up; `AzureOpenAI(api_key=key, default_headers={"Ocp-Apim-Subscription-Key": key})`.
2. **per-request** — openai's own `api_key=callable`, the callable doing `SecretClient.get_secret()` on
   every request. With `AzureOpenAI` a callable fills `api-key`, which this APIM (like most) does not read, so
   an httpx2 request hook moves the value to `Ocp-Apim-Subscription-Key` — what APIM configured for
   `api-key` would do. openai calls the callable once per request; the hook adds no vault read.
3. **ttl-lock** — `cachetools.cached(TTLCache(maxsize=1, ttl=300), lock=threading.Lock())` around
   `get_secret`, fed to openai as contender 2 is (callable + header hook).
4. **ttl-cond** — the same with `condition=threading.Condition()`.
5. **apimvault** — `SubscriptionKeyProvider` (default `CachePolicy`) + `create_azure_openai`; the async rows
   use `AsyncSubscriptionKeyProvider` + `create_async_azure_openai`. cachetools has no asyncio form, so
   contenders 3 and 4 have no async row.

### What each column measures

- **cold-start vault reads** — a fresh key source; 256 threads released by one barrier (1,000 tasks in one
  `gather` for async) each ask for the key once, with 50 ms of Key Vault latency injected (a cloud-like round
  trip, so the herd overlaps). The static contender's start-up read is counted. Counted by the vault.
- **blocked** — after the first load, 300 ms of latency is injected on every secret read. A simulated clock
  advances in steps of half a TTL (150 s) across the given number of TTL expiries; at every step 16 threads
  (tasks) each ask for the key once, timed with the real clock. A call taking > 100 ms waited for a vault
  read. "reads" counts vault reads during the run.
- **60 s outage** — every secret read answers 503 from 30 s before to 30 s after the cached key's expiry
  (simulated clock; for apimvault the end of its jittered fresh period, reproduced from the seeded rng).
  Callers are idle between the first load and the outage, then 8 callers every 2 s.
- **rotation + revocation** — real chat completions through the gateway, 8 threads (tasks) in a loop on
  one shared client; after 0.4 s the key is rotated the Microsoft way (regenerate secondary, store it as a
  new secret version, regenerate primary = revoke the key in use) and traffic continues. Real clock, so the
  cachetools TTL (300 s) does not pass: their failures last until the TTL expires, the static key's until
  a restart.
- **cache hit** — the key getter on a warm cache, `time.perf_counter_ns` over batches of 2,000 calls,
  median of the batch means (for per-request it is a Key Vault read).
- **client µs/request (mock transport)** — one `chat.completions.create` with the network replaced by an
  `httpx2.MockTransport`: the client-side cost of each way of supplying the key, free of server noise.
- **chat throughput vs 1** — 32 threads sharing one client (32 tasks for the async clients) against the
  stack running in a child process (so server and client do not share a GIL); rounds interleave the
  contenders (the order rotates each round); the figure is the median over rounds of each contender's
  rate divided by the static contender's rate in the same round. **client CPU µs/request** is the client
  process's CPU time per completed request in those rounds (the server's CPU is in the other process).
- **import ms beyond deps** — `python -X importtime`: `openai, httpx2, azure.identity(.aio),
  azure.keyvault.secrets, cachetools` first, then `import apimvault` plus the first touch of
  `SubscriptionKeyProvider` and `create_azure_openai` (the top level is lazy); the self-times of every
  module imported after that point, median of runs.
"""


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
        fleet_rows,
        header,
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
        "interleaved rounds for that reason)",
        "",
        "## Contenders",
        "",
        markdown_table(header(r), contender_rows(r)),
        "",
        f"apimvault `get_key()` (what its auth flow calls per request): {r.get_key_us:.3f} µs median. "
        f"Import: apimvault's own modules {r.imports[0]:.1f} ms on top of {r.imports[1]:.0f} ms of dependencies.",
        "",
        "## Targets",
        "",
        *[f"- {'✅' if ok else '❌'} {name}: {detail}" for name, ok, detail in targets(r)],
        "",
        METHOD,
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
