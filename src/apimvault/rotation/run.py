"""One rotation run: a method per step (read, check, regenerate, probe, write, verify, repair).

See :mod:`apimvault.rotation` for the algorithm and why each step is there.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from typing import NoReturn

from .._key import fingerprint
from ..exceptions import RotationError
from .azure import Session, check_in_use, kv_error, raise_from, refuse_shared, resolve_target
from .config import RotationConfig
from .model import (
    TAG_CREDENTIAL_ID,
    TAG_PENDING,
    TAG_PROVIDER_ADDRESS,
    Current,
    RotationResult,
    flip_tag,
    holder,
    iso,
    other_slot,
    styled,
)
from .probe import GatewayProbe
from .ref import ApimSubscriptionRef

log = logging.getLogger("apimvault.rotation")

MAX_SETTLE_ROUNDS = 24


class Concurrent(Exception):
    """Another rotation changed the vault or the keys under this one: settle instead of going on."""


class _Settle(Exception):
    """Stop rotating: verify (and repair) the vault and return a skipped result with ``reason``."""

    def __init__(self, reason: str, old_version: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.old_version = old_version


@dataclasses.dataclass
class Run:
    """One rotation's context: clients, probe, time sources and the step hook."""

    session: Session
    probe: GatewayProbe
    secret_name: str
    where: str
    settings: RotationConfig
    clock: Callable[[], float]
    sleep: Callable[[float], None]
    on_step: Callable[[str], None] | None
    now: dt.datetime

    @property
    def apim_subscription_id(self) -> str | None:
        return self.settings.apim_subscription_id

    @property
    def timeout(self) -> float:
        return self.settings.propagation_timeout

    def step(self, name: str) -> None:
        if self.on_step is not None:
            self.on_step(name)

    def latest(self) -> Current:
        return self.session.read_current(self.secret_name, self.where)

    # ------------------------------------------------------------------------------------- the run

    def rotate(self, expected: str | None) -> RotationResult:
        """The whole rotation (steps 1-6 of the module doc)."""
        try:
            return self._rotate(expected)
        except _Settle as stop:
            return self.settled(stop.reason, stop.old_version)

    def _rotate(self, expected: str | None) -> RotationResult:
        current, ref, tagged_slot, days = self.read(expected)
        slot, before = self.check(current, ref, tagged_slot)
        other = other_slot(slot)
        new_value, resumed, started = self.regenerate(current, ref, slot, before)
        # Make before break: the vault gets the new key only once every gateway unit accepts it.
        try:
            propagation = self.wait_accepted(new_value, other, ref, started)
        except Concurrent as exc:
            raise _Settle(f"{exc} (another rotation)", current.version) from None
        log.info(
            "rotation of %s: the gateway accepted the new %s key after %.1f s", self.where, other, propagation
        )
        new_version = self.write_successor(current, ref, slot, new_value, days, propagation)
        verified, repaired = self.settle()
        return RotationResult(
            skipped=False,
            reason=(
                "rotated"
                + (" (resumed the wait for the key an earlier attempt regenerated)" if resumed else "")
            )
            + (f"; repaired the vault afterwards ({', '.join(repaired)})" if repaired else ""),
            old_version=current.version,
            new_version=new_version,
            credential_id=(verified.tags.get(TAG_CREDENTIAL_ID) or other).strip().lower(),
            fingerprint=fingerprint(new_value),
            secret=self.where,
            regenerated=other,
            expires_on=iso(self.now + dt.timedelta(days=days)),
            propagation_seconds=round(propagation, 3),
            verified_version=verified.version,
            repaired_versions=tuple(repaired),
        )

    def read(self, expected: str | None) -> tuple[Current, ApimSubscriptionRef, str | None, int]:
        """Step 1: the latest version, its APIM subscription, tagged slot and validity."""
        self.step("read")
        current = self.latest()
        if expected is not None and current.version.lower() != expected:
            raise _Settle(
                f"version {expected} is no longer the latest ({current.version}): already rotated", expected
            )
        ref, tagged_slot, days = resolve_target(current, self.apim_subscription_id, self.where)
        refuse_shared(self.session.secrets_naming(ref, self.secret_name), ref, self.where)
        return current, ref, tagged_slot, days

    def check(
        self, current: Current, ref: ApimSubscriptionRef, tagged_slot: str | None
    ) -> tuple[str, dict[str, str]]:
        """Step 2: the slot the stored value holds (tag written if missing) and the keys before."""
        self.step("check")
        before = self.session.list_keys(ref, "listSecrets before regenerating")
        slot = tagged_slot
        if slot is None:
            slot = holder(current.value, before)
            if slot is None:
                raise RotationError(
                    f"{self.where} version {current.version} has no {TAG_CREDENTIAL_ID} tag and holds "
                    f"neither key of {ref.resource_id}; store the current key with the tag (az keyvault "
                    f"secret set ... --tags {TAG_CREDENTIAL_ID}=primary|secondary ...) and rotate again"
                )
            current.tags[TAG_CREDENTIAL_ID] = slot
            self.session.update_tags(self.secret_name, current.version, current.tags, self.where, "tag")
            log.info(
                "%s version %s had no %s tag: set it to %s",
                self.where,
                current.version,
                TAG_CREDENTIAL_ID,
                slot,
            )
        problem = check_in_use(current, slot, before, ref, self.where)
        if problem is not None:
            if self.latest().version != current.version:
                raise _Settle("another rotation wrote a new version meanwhile", current.version)
            result = self.settled(problem, current.version)
            raise RotationError(
                f"{problem}. Nothing was regenerated. "
                + (
                    f"The vault was repaired: version {result.verified_version} holds the live "
                    f"{result.credential_id} key; rotate again"
                    if result.repaired_versions
                    else "Fix the tag and rotate again"
                )
            )
        self.check_routes(current)
        return slot, before

    def check_routes(self, current: Current) -> None:
        """Before anything changes: every gateway URL must answer the probe for the key in use with a
        2xx (a 404, 3xx, 403, ... raises :class:`GatewayProbeError`: the probe could never judge the new
        key). A key 401 means the gateway refuses the key the vault holds: settle (verify, repair)."""
        for url in self.probe.urls:
            if self.probe.accepts(url, current.value) is False:
                raise _Settle(
                    f"{url} refuses the key the vault holds (version {current.version})", current.version
                )

    def regenerate(
        self, current: Current, ref: ApimSubscriptionRef, slot: str, before: dict[str, str]
    ) -> tuple[str, bool, float]:
        """Step 3: regenerate the other key (or resume the wait for the one an earlier attempt
        regenerated); the new key, whether resumed, and when it started on the run's clock."""
        other = other_slot(slot)
        # A run that started after another one wrote must not regenerate: re-read just before.
        self.step("regenerate")
        if self.latest().version != current.version:
            raise _Settle("another rotation wrote a new version meanwhile", current.version)
        started = self.clock()
        # An earlier attempt that timed out waiting for the gateways left the key it regenerated named in
        # RotationPending: wait for that key again instead of regenerating it (which would restart the
        # gateways' sync, so a gateway slower than one attempt would never get there).
        pending_slot, _, pending_fp = (current.tags.get(TAG_PENDING) or "").partition(":")
        if pending_slot == other and bool(before[other]) and fingerprint(before[other]) == pending_fp:
            log.info(
                "rotation of %s: resuming with the %s key an earlier attempt regenerated (fingerprint %s)",
                self.where,
                other,
                pending_fp,
            )
            return before[other], True, started
        # Prove the right to tag the current version (secrets/update/action) before regenerating: the
        # RotationPending tag below is what lets a retry resume instead of regenerating again.
        self.session.update_tags(self.secret_name, current.version, current.tags, self.where, "tag")
        self.session.regenerate(ref, other)
        log.info("rotation of %s: regenerated the %s key of %s", self.where, other, ref.resource_id)
        after = self.session.list_keys(ref, f"listSecrets after regenerating the {other} key")
        new_value = after[other]
        if not new_value or new_value == before[other]:
            raise RotationError(
                f"ARM did not return a new {other} key for {ref.resource_id} after regenerating it",
                permanent=False,
            )
        if after[slot] != before[slot]:
            raise _Settle(f"the {slot} key changed during the rotation (another rotation)", current.version)
        # Name the regenerated key (its fingerprint) on the current version, so that a retry after a
        # timeout resumes the wait instead of regenerating again. The value is not changed.
        pending_tags = {**current.tags, TAG_PENDING: f"{other}:{fingerprint(new_value)}"}
        try:
            self.session.secrets.update_secret_properties(
                self.secret_name, current.version, tags=pending_tags
            )
        except Exception as exc:  # best effort (e.g. the 15-tag limit): a retry then regenerates again
            log.warning(
                "%s: could not tag the pending key on version %s (%s)",
                self.where,
                current.version,
                type(exc).__name__,
            )
        return new_value, False, started

    def write_successor(
        self, current: Current, ref: ApimSubscriptionRef, slot: str, value: str, days: int, propagation: float
    ) -> str:
        """Step 5: store the accepted key as the new version (unless another run wrote meanwhile)."""
        # A concurrent rotation that wrote meanwhile would make our version the latest with a key that its
        # own regeneration may already have revoked: re-read just before writing.
        self.step("write")
        latest = self.latest()
        if latest.version != current.version:
            raise _Settle(f"another rotation wrote version {latest.version} meanwhile", current.version)
        tags = dict(current.tags)
        tags.pop(TAG_PENDING, None)
        tags[TAG_CREDENTIAL_ID] = flip_tag(current.tags.get(TAG_CREDENTIAL_ID) or slot)
        tags.setdefault(TAG_PROVIDER_ADDRESS, ref.resource_id)
        new_version = self.write(value, current, tags, days)
        log.info(
            "rotated %s: version %s -> %s (CredentialId=%s, fingerprint %s, gateway propagation %.1f s)",
            self.where,
            current.version,
            new_version,
            tags[TAG_CREDENTIAL_ID],
            fingerprint(value),
            propagation,
        )
        return new_version

    # ---------------------------------------------------------------------------------- step 4: probe

    def wait_accepted(self, value: str, slot: str, ref: ApimSubscriptionRef, started: float) -> float:
        """Poll every gateway until each accepts ``value`` in ``probe_successes`` (K) consecutive probes
        ``probe_interval`` seconds apart; the seconds since ``started`` when the last URL completed its run.

        A key 401 starts the count again, and when it breaks a run of acceptances (some unit behind the
        URL accepts, another still lags) the run needed doubles, up to 4 K: a lucky run that misses the
        lagging unit then gets rarer with every try, so the chance of missing it stays about
        ``((N-1)/N)**K`` for N units however long it lags. No answer restarts the count too. Raises
        :class:`Concurrent` if the key is regenerated meanwhile, :class:`GatewayProbeError` for an answer
        that is neither, and :class:`RotationError` on timeout."""
        deadline = started + self.timeout
        first = self.settings.probe_successes
        streak = dict.fromkeys(self.probe.urls, 0)
        needed = dict.fromkeys(self.probe.urls, first)
        delay, done_at = 0.5, started
        unknown: dict[str, str] = {}
        while True:
            self.step("probe")
            for url in [u for u, n in streak.items() if n < needed[u]]:
                verdict = self.probe.accepts(url, value)
                if verdict is False and streak[url]:
                    needed[url] = min(needed[url] * 2, 4 * first)
                streak[url] = streak[url] + 1 if verdict else 0
                if verdict is None:
                    unknown[url] = "no answer"
                else:
                    unknown.pop(url, None)
                if streak[url] >= needed[url]:
                    done_at = self.clock()
            waiting = [u for u, n in streak.items() if n < needed[u]]
            if not waiting:
                return max(0.0, done_at - started)
            now = self.clock()
            if now >= deadline:
                self.timed_out(slot, ref, waiting, unknown, streak, needed)
            counting = any(streak[u] for u in waiting)
            pause = self.settings.probe_interval if counting else delay
            self.sleep(min(pause, max(0.0, deadline - now)))
            if not counting:
                delay = min(delay * 1.5, 15.0)
            # Before probing again: was the key regenerated once more meanwhile (another rotation)?
            if self.session.list_keys(ref, "listSecrets while waiting for the gateway")[slot] != value:
                raise Concurrent(f"the {slot} key was regenerated again while waiting for the gateway")

    def timed_out(
        self,
        slot: str,
        ref: ApimSubscriptionRef,
        waiting: list[str],
        unknown: dict[str, str],
        streak: dict[str, int],
        needed: dict[str, int],
    ) -> NoReturn:
        still = ", ".join(
            f"{u} ({unknown.get(u, 'refused')}; {streak[u]} of {needed[u]} consecutive acceptances)"
            for u in waiting
        )
        raise RotationError(
            f"the gateway did not accept the new {slot} key of {ref.resource_id} within "
            f"{self.timeout:g} s: {still}. The vault was NOT changed ({self.where} still holds its "
            "latest version) and the key in use still works. The gateway may still be syncing: "
            "rotate again later (the next attempt waits for this same key, named by the "
            f"{TAG_PENDING} tag, instead of regenerating it; or raise --propagation-timeout), or "
            "check the gateway URLs",
            permanent=False,
        )

    # ------------------------------------------------------------------------ step 6: verify, repair

    def settled(self, reason: str, old_version: str | None) -> RotationResult:
        """A result for a run that did not rotate, after verifying (and, if needed, repairing) the vault."""
        latest, repaired = self.settle()
        slot = (latest.tags.get(TAG_CREDENTIAL_ID) or "").strip().lower()
        if repaired:
            reason = f"{reason}; repaired the vault: version {', '.join(repaired)} holds the live {slot} key"
        log.info("rotation of %s skipped: %s", self.where, reason)
        return RotationResult(
            skipped=True,
            reason=reason,
            old_version=old_version,
            new_version=None,
            credential_id=slot,
            fingerprint=fingerprint(latest.value),
            secret=self.where,
            verified_version=latest.version,
            repaired_versions=tuple(repaired),
        )

    def settle(self) -> tuple[Current, list[str]]:
        """Step 6: make the latest version hold a live key of the slot its tag names; the versions written
        to get there."""
        repaired: list[str] = []
        for _ in range(MAX_SETTLE_ROUNDS):
            self.step("verify")
            latest = self.latest()
            ref, slot, days = resolve_target(latest, self.apim_subscription_id, self.where)
            keys = self.session.list_keys(ref, "listSecrets to verify the vault")
            holds = holder(latest.value, keys)
            if slot is not None and holds == slot:
                return latest, repaired
            version = self.repair(latest, ref, slot, holds, keys, days)
            if version is not None:
                repaired.append(version)
        raise RotationError(
            f"{self.where} did not settle on a live key after {MAX_SETTLE_ROUNDS} rounds (rotations still "
            "running?); run `apimvault rotate` again once they are done",
            permanent=False,
        )

    def repair(
        self,
        latest: Current,
        ref: ApimSubscriptionRef,
        slot: str | None,
        holds: str | None,
        keys: dict[str, str],
        days: int,
    ) -> str | None:
        """Write the live key of the slot ``latest`` holds (or is tagged with) as a new version, once the
        gateway accepts it; the version written, or ``None`` when another run changed things meanwhile."""
        target = holds or slot
        if target is None:
            raise RotationError(
                f"{self.where} version {latest.version} has no {TAG_CREDENTIAL_ID} tag and holds "
                f"neither key of {ref.resource_id}; store the current key by hand (az keyvault secret "
                f"set ... --tags {TAG_CREDENTIAL_ID}=primary|secondary ...) and rotate again"
            )
        value = keys[target]
        log.warning(
            "%s version %s (CredentialId=%s, fingerprint %s) is not the live %s key; repairing",
            self.where,
            latest.version,
            slot,
            fingerprint(latest.value),
            target,
        )
        try:
            self.wait_accepted(value, target, ref, self.clock())
        except Concurrent:
            return None
        self.step("repair")
        if self.latest().version != latest.version:
            return None  # someone wrote meanwhile: verify that version instead
        tags = dict(latest.tags)
        tags.pop(TAG_PENDING, None)
        tags[TAG_CREDENTIAL_ID] = styled(target, latest.tags.get(TAG_CREDENTIAL_ID))
        tags.setdefault(TAG_PROVIDER_ADDRESS, ref.resource_id)
        version = self.write(value, latest, tags, days)
        log.warning(
            "repaired %s: version %s holds the live %s key (fingerprint %s)",
            self.where,
            version,
            target,
            fingerprint(value),
        )
        return version

    # ------------------------------------------------------------------------------------ writes

    def write(self, value: str, like: Current, tags: dict[str, str], days: int) -> str:
        expires = self.now + dt.timedelta(days=days)
        try:
            written = self.session.secrets.set_secret(
                self.secret_name,
                value,
                content_type=like.content_type,
                tags=tags,
                expires_on=expires,
                enabled=True,
            )
        except Exception as exc:
            raise_from(kv_error(exc, where=self.where, writing=True), exc)
        return str(written.properties.version)
