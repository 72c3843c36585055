"""``apimvault drill``: rotate the APIM key under live chat traffic and prove no request fails.

Clients are built by the core (:func:`create_azure_openai` / :func:`create_async_azure_openai`); sync
workers are threads, async workers are asyncio tasks on one loop; every worker alternates plain and
streaming chat completions. openai's own retries are off, so every recovery is apimvault's.

Timeline (``D`` = duration; every client loads the key just before traffic starts)::

    0.10 D  rotation 1   regenerates the secondary key and stores it; the primary key the clients hold
                         stays valid
    0.20 D  rotation 2   regenerates the primary key: the key every client started with is revoked while
                         they still hold it (their TTL is longer), so they recover via APIM's 401 -> one
                         coalesced refresh -> one re-send per refused request (landing on rotation 1's
                         version, which is valid); they reach rotation 2's version at their refresh-ahead
    0.45 D  chaos only   Key Vault GetSecret answers 503 for 0.15 D (refreshes fail; stale-if-error)
    0.70 D  rotation 3   regenerates the secondary key; clients converge via the Event Grid helper
                         (``refresh_from_event`` with a SecretNewVersionCreated event). With ``--revoke``
                         it is an emergency revocation instead (``revoke_current``): rotate to the other
                         key, push it to the clients, then regenerate the key they held and report when
                         every gateway refused it
    0.85 D  chaos only   latency spikes on the gateway and on Key Vault
    D       traffic stops once every client holds the last version (at most TTL + 5 s more)

Every rotation (but the revocation, an operator's command) is delivered as in Azure (:mod:`.delivery`):
a ``SecretNearExpiry`` event through the local Event Grid to the Storage queue (Azurite's when found,
else in memory), whose queue trigger runs the rotation function's handler
(:func:`apimvault.rotation.function.handle_queue_message`) as the rotator identity (``--client-id`` /
``APIMVAULT_ROTATOR_CLIENT_ID``; the embedded stack's holds exactly ``infra/roles/rotator.json``'s roles).
The report names the identity, its roles and the delivery path.

Gateway propagation (APIM syncs a regenerated key to each gateway unit asynchronously; Microsoft Q&A
question 5922487 reports up to 10 minutes): on a local stack the drill makes each gateway unit accept a
regenerated key only after a delay (``--propagation S``, default 2 s: unit k of n waits ``S * k / n``;
with ``--chaos`` each unit draws a random delay in ``[S / 4, 1.5 S]`` for every regeneration). The
embedded stack's units answer behind one URL (balanced, as a region's units share a hostname): the
rotation accepts a new key only after K consecutive accepted probes per URL, each on a fresh connection
(``APIMVAULT_PROBE_SUCCESSES``); with a stack serving units at their own URLs the clients are spread over
them. Every rotation is make-before-break (it stores the new key only once
every unit accepts it) and reports the measured propagation; after each one the drill checks,
independently, that the vault's latest version holds a live key of its tagged slot that every unit
accepts. With ``--chaos`` rotation 3 is two overlapping deliveries of the same ``SecretNearExpiry`` event
(the second starts while the first waits for the gateways), as Event Grid's at-least-once delivery makes
happen; one rotates, the other finds that out and verifies the vault.

The provider TTL is ``max(4 s, 0.6 D)`` (with propagation, long enough that the earliest refresh-ahead
comes 4 s after the gateway units revoke the key of rotation 2), with a quarter of it as refresh margin,
so refresh-ahead happens during the run but not before rotation 2. Convergence after a rotation is the
time from its Key Vault write until every client's current version is that version (or a later one);
revocation recovery is the time from the start of a rotation until no client holds the key it
regenerated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ...exceptions import ApimVaultError, ConfigurationError
from ..config import env_var, vault_url_variable
from ..embedded import embedded_stack
from ..output import EXIT_FAILED, EXIT_OK, fail, request_failure
from .metrics import ClientSlot
from .report import DrillReport, print_report
from .schedule import RotationSchedule
from .target import StackFaults, Target, external_target
from .traffic import achat, async_worker, chat, sync_worker

if TYPE_CHECKING:  # pragma: no cover
    from ..output import Output


class PreflightFailed(Exception):
    """A request of the preflight failed: the drill stops before the first rotation."""

    def __init__(self, kind: str, cause: Exception) -> None:
        super().__init__(f"the {kind} preflight request failed: {type(cause).__name__}: {cause}")
        self.kind = kind
        self.cause = cause


class Drill(RotationSchedule, DrillReport):
    """One drill: clients, traffic, rotations, report."""

    # ---------------------------------------------------------------------------- setup

    def setup(self) -> None:
        from azure.identity import DefaultAzureCredential

        from ... import SubscriptionKeyProvider, create_azure_openai
        from ...rotation import plan_rotation
        from ..config import header_name

        with contextlib.suppress(ImportError):  # a heavy import: not during the first rotation
            import azure.mgmt.apimanagement  # noqa: F401

        from ...rotation.azure import bounded_credential  # bounded like `apimvault rotate`'s

        self._rotation_credential = (
            bounded_credential(managed_identity_client_id=self.target.rotator_client_id)
            if self.target.rotator_client_id
            else bounded_credential()
        )
        plan = plan_rotation(  # fail fast: tags, subscription, rotator access, gateway URLs
            vault_url=self.target.vault_url,
            secret_name=self.target.secret_name,
            apim_subscription_id=self.target.apim_subscription_id,
            arm_endpoint=self.target.arm_endpoint,
            credential=self._rotation_credential,
            gateway_urls=self.target.gateway_urls or None,
            token_scope=self.token_scope,
        )
        self._configure_propagation()
        self._configure_rotation()
        self.versions.append(plan.current_version)
        self.start_credential_id = plan.credential_id
        self._sync_credential = DefaultAzureCredential()
        n_sync = math.ceil(self.n_clients / 2)
        for i in range(n_sync):
            slot = ClientSlot(f"sync-{i + 1}", "sync", None)
            provider = SubscriptionKeyProvider(
                self.target.vault_url,
                self.target.secret_name,
                credential=self._sync_credential,
                policy=self.policy,
                header_name=header_name(),
                on_refresh=self._on_refresh(slot),
            )
            slot.provider = provider
            slot.gateway_url = self._client_url(i)
            slot.client = create_azure_openai(
                provider,
                azure_endpoint=slot.gateway_url,
                max_retries=0,
                timeout=30,
                token_scope=self.token_scope,
            )
            self.slots.append(slot)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._run_loop, name="apimvault-drill-async", daemon=True)
        self._loop_thread.start()
        if not self._async_ready.wait(60):
            raise RuntimeError("the async clients did not start")
        if self._async_error is not None:
            raise self._async_error
        for slot in self.slots:
            if slot.kind == "sync":
                slot.provider.get_key()

    def _client_url(self, n: int) -> str:
        """The gateway unit of the ``n``-th client of a kind: sync client ``i`` gets unit ``i``, async client
        ``i`` unit ``i + 1`` (modulo the units), so with two clients of each kind every unit serves both."""
        urls = self.target.client_urls
        return urls[n % len(urls)]

    def _configure_rotation(self) -> None:
        """The rotations' settings, the rotator's identity and roles, and the delivery path."""
        from ...rotation import RotationConfig
        from .delivery import open_delivery

        local = self.target.faults is not None
        # A local stack's delays are known; real gateways get the library's defaults (or the env's).
        self._rotation_config = RotationConfig.from_env(
            gateway_urls=self.target.gateway_urls or None,
            arm_endpoint=self.target.arm_endpoint,
            apim_subscription_id=self.target.apim_subscription_id,
            vault_url=self.target.vault_url,
            propagation_timeout=max(60.0, 20 * self.propagation) if local else None,
            revoke_wait=max(2.0, 2 * self.policy.forced_refresh_interval) if local else None,
            token_scope=self.token_scope,  # key plus token: the probes send a token too
        )
        self.rotator = self._rotator_info()
        roles = self.rotator["roles"]
        self.log(
            f"rotator: {self.rotator['identity']}"
            + (f" holding {', '.join(r['role'] for r in roles)}" if roles is not None else "")
            + f" (roles file {self.rotator['roles_file']})"
        )
        self.delivery = self._exit.enter_context(open_delivery(self.delivery_choice))
        self.delivery.credential = self._rotation_credential
        self.delivery.config = self._rotation_config
        self.log(
            f"delivery: Event Grid -> {self.delivery.kind} queue -> queue trigger -> rotation function "
            f"handler ({self.delivery.why}; lease: {self.delivery.describe()['lease']})"
        )

    def _rotator_info(self) -> dict[str, Any]:
        """Who the rotations run as, the roles it holds (local stacks) and infra's roles file."""
        from ...local.rbac import load_infra_roles, roles_file

        path = roles_file()
        infra = sorted(role.name for role in load_infra_roles(path).values())
        client_id = self.target.rotator_client_id
        info: dict[str, Any] = {
            "client_id": client_id,
            "name": None,
            "identity": f"managed identity {client_id}" if client_id else "DefaultAzureCredential's identity",
            "roles": None,  # unknown outside a local stack
            "roles_file": str(path),
            "roles_file_roles": infra,
            "only_roles_file_roles": None,
        }
        if client_id and self.target.faults is not None:
            name, roles = self.target.faults.identity_roles(client_id)
            info["name"] = name
            info["identity"] = f"{name} (client id {client_id})" if name else info["identity"]
            info["roles"] = roles
            info["only_roles_file_roles"] = bool(roles) and {r["role"] for r in roles} <= set(infra)
        return info

    def _configure_propagation(self) -> None:
        faults = self.target.faults
        if faults is None:
            return
        try:
            self._propagation_before = faults.propagation()
        except Exception as exc:  # a stack without the propagation model
            raise ConfigurationError(f"the local stack cannot set gateway propagation: {exc}") from None
        units = list(self._propagation_before)
        settings: dict[str, Any] = {}
        for k, unit in enumerate(units, start=1):
            delay: float | tuple[float, float]
            if self.chaos and self.propagation > 0:
                delay = (round(self.propagation / 4, 3), round(self.propagation * 1.5, 3))
            else:
                delay = round(self.propagation * k / len(units), 3)
            faults.set_propagation(delay, unit)
            settings[unit] = list(delay) if isinstance(delay, tuple) else delay
        self.propagation_settings = settings
        self.log(
            f"gateway propagation per unit: {settings} s"
            + (" (random per regeneration)" if self.chaos else "")
        )

    def _restore_propagation(self) -> None:
        faults, before = self.target.faults, self._propagation_before
        if faults is None or before is None:
            return
        for unit, spec in before.items():
            with contextlib.suppress(Exception):
                low, high = float(spec["min"]), float(spec["max"])
                faults.set_propagation(low if low == high else (low, high), unit)

    def _check_loaded(self) -> None:
        for slot in self.slots:
            key = slot.provider.current()
            if key is None or key.version != self.versions[0]:
                raise ApimVaultError(
                    f"{slot.name} loaded version {key.version if key else None}, expected {self.versions[0]}"
                )

    def _run_loop(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._async_main())
        except BaseException as exc:
            self._async_error = exc
            self._async_ready.set()
        finally:
            self._async_done.set()
            self._loop.close()

    async def _async_main(self) -> None:
        from azure.identity.aio import DefaultAzureCredential

        from ... import AsyncSubscriptionKeyProvider, create_async_azure_openai
        from ..config import header_name

        credential = DefaultAzureCredential()
        n_async = self.n_clients - math.ceil(self.n_clients / 2)
        mine: list[ClientSlot] = []
        try:
            for i in range(n_async):
                slot = ClientSlot(f"async-{i + 1}", "async", None)
                provider = AsyncSubscriptionKeyProvider(
                    self.target.vault_url,
                    self.target.secret_name,
                    credential=credential,
                    policy=self.policy,
                    header_name=header_name(),
                    on_refresh=self._on_refresh(slot),
                )
                slot.provider = provider
                slot.gateway_url = self._client_url(i + 1)
                slot.client = create_async_azure_openai(
                    provider,
                    azure_endpoint=slot.gateway_url,
                    max_retries=0,
                    timeout=30,
                    token_scope=self.token_scope,
                )
                mine.append(slot)
            with self._lock:
                self.slots.extend(mine)
            self._async_ready.set()
            await asyncio.get_running_loop().run_in_executor(None, self._started.wait)
            try:
                for slot in mine:
                    await slot.provider.get_key()
            except BaseException as exc:
                self._async_error = exc
                raise
            finally:
                self._async_loaded.set()
            await asyncio.get_running_loop().run_in_executor(None, self._traffic.wait)
            n_tasks = self.concurrency // 2
            tasks = [
                asyncio.create_task(
                    async_worker(self.stop, self.metrics, mine[i % len(mine)], self.target.deployment, i)
                )
                for i in range(n_tasks)
            ]
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for slot in mine:
                with contextlib.suppress(Exception):
                    await slot.client.close()
                with contextlib.suppress(Exception):
                    await slot.provider.close()
            await credential.close()

    # ---------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        self.live = self.out.stdout.isatty() and not self.out.json
        counters_before = self._counters()
        try:
            self.setup()
            self._started.set()
            if not self._async_loaded.wait(60):
                raise RuntimeError("the async clients did not load the key")
            if self._async_error is not None:
                raise self._async_error
            self._check_loaded()
            self._preflight()
            self._t0 = time.monotonic()
            self._traffic.set()
            sync_slots = [s for s in self.slots if s.kind == "sync"]
            workers = [
                threading.Thread(
                    target=sync_worker,
                    args=(
                        self.stop,
                        self.metrics,
                        sync_slots[i % len(sync_slots)],
                        self.target.deployment,
                        i,
                    ),
                    daemon=True,
                    name=f"drill-{i}",
                )
                for i in range(math.ceil(self.concurrency / 2))
            ]
            for worker in workers:
                worker.start()
            self.log(
                f"traffic started: {len(workers)} threads + {self.concurrency // 2} asyncio tasks over "
                f"{len(self.slots)} clients on version {self.versions[0][:8]} ({self.start_credential_id})"
            )
            monitor = threading.Thread(target=self._monitor, daemon=True, name="drill-monitor")
            monitor.start()
            with self._display():
                self._schedule()
                self.stop.set()
            for worker in workers:
                worker.join(60)
            self._async_done.wait(60)
            monitor.join(5)
            elapsed = self.elapsed()
        finally:
            self.stop.set()
            self._traffic.set()
            self._started.set()
            self._cleanup()
        return self._report(elapsed, counters_before, self._counters())

    def _preflight(self) -> None:
        """One request of each kind (plain and streaming, sync and async) before anything is rotated.

        A wrong deployment, API version or gateway fails every request; rotating the keys then (both of
        them, against real Azure) would prove nothing. Raises :class:`PreflightFailed`.
        """
        sync = next(s for s in self.slots if s.kind == "sync")
        asyncs = [s for s in self.slots if s.kind == "async"]
        for streaming in (False, True):
            kind = f"sync {'streaming' if streaming else 'plain'}"
            try:
                chat(sync.client, self.target.deployment, streaming)
            except Exception as exc:
                raise PreflightFailed(kind, exc) from exc
            if asyncs and self._loop is not None:
                kind = f"async {'streaming' if streaming else 'plain'}"
                request = achat(asyncs[0].client, self.target.deployment, streaming)
                try:
                    asyncio.run_coroutine_threadsafe(request, self._loop).result(60)
                except Exception as exc:
                    raise PreflightFailed(kind, exc) from exc
        self.log("preflight: a plain and a streaming request of each kind (sync, async) succeeded")

    def _cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self._exit.close()  # the delivery's queue clients (and Azurite, if the drill started it)
        self._restore_propagation()
        if self.target.faults is not None:
            for service in ("keyvault", "gateway"):
                with contextlib.suppress(Exception):
                    self.target.faults.clear(service)
        for slot in self.slots:
            if slot.kind == "sync":
                with contextlib.suppress(Exception):
                    slot.client.close()
                with contextlib.suppress(Exception):
                    slot.provider.close()
        for credential in (self._sync_credential, self._rotation_credential):
            if credential is not None:
                with contextlib.suppress(Exception):
                    credential.close()


def run(args: argparse.Namespace, out: Output) -> int:
    try:
        if env_var(vault_url_variable()):
            target = external_target(args)
            if not target.loopback and not args.yes:
                out.error(
                    f"the drill regenerates the APIM keys of {target.label}; it does so against a "
                    "non-loopback target only with --yes"
                )
                out.document({"ok": False, "exit_code": EXIT_FAILED, "declined": True})
                return EXIT_FAILED
            if args.chaos and target.faults is None:
                return fail(
                    out,
                    ConfigurationError(
                        "--chaos needs a local stack's admin API (APIMVAULT_ADMIN_URL from `apimvault local`)"
                    ),
                )
            try:
                return _run_target(target, args, out)
            finally:
                if target.faults is not None:
                    target.faults.close()
        # Rotation as infra's rotator identity (only infra/roles/rotator.json's roles), against the gateway
        # units behind one URL (the stack's balanced default): the rotation's probe rule (K consecutive
        # accepted probes per URL, each on a fresh connection) sees a lagging unit there.
        with embedded_stack(need_async=True, rotate_as="rotator") as azure:
            env = azure.environ()
            if getattr(args, "token_scope", None):  # the gateway then checks the token too
                audience = args.token_scope.strip().removesuffix("/.default")
                azure.gateway.policies.set(
                    azure.gateway.api_path, {"validate_azure_ad_token": {"audiences": [audience]}}
                )
            target = Target(
                vault_url=azure.vault_url,
                secret_name=env["APIMVAULT_SECRET_NAME"],
                gateway_url=azure.gateway_url,
                deployment=args.deployment or env["APIMVAULT_DEPLOYMENT"],
                apim_subscription_id=azure.apim_subscription_id,
                arm_endpoint=azure.arm_url,
                rotator_client_id=azure.rotation_identity.client_id,
                label="embedded local Azure (127.0.0.1, TLS)",
                loopback=True,
                faults=StackFaults(azure=azure),
                gateway_urls=azure.gateway_urls,
            )
            return _run_target(target, args, out)
    except Exception as exc:
        return fail(out, exc)


def _run_target(target: Target, args: argparse.Namespace, out: Output) -> int:
    drill = Drill(target, args, out)
    if not out.json:
        out.line(
            f"apimvault drill: {drill.duration:g}s of traffic against {target.label}"
            + (", with chaos" if drill.chaos else "")
        )
    try:
        report = drill.run()
    except PreflightFailed as failed:
        cause = request_failure(failed.cause, target.deployment)
        message = (
            f"the {failed.kind} preflight request failed: {cause}; the drill stopped before rotating anything"
        )
        return fail(out, failed.cause, {"preflight": failed.kind, "rotations": 0}, message=message)
    if out.json:
        out.document(report)
    else:
        print_report(out, report)
    sys.stdout.flush()
    return EXIT_OK if report["ok"] else EXIT_FAILED
