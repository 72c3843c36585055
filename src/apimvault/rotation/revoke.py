"""Emergency revocation without a storm: the leaked key dies only after the fleet has left it.

Regenerating a leaked key at once makes every process that holds it fail and hit the vault together
(the fleet simulation: 10,000 processes, tens of thousands of failed requests). Instead:

1. rotate make-before-break to the *other* slot (the normal rotation: the new key is accepted by every
   gateway URL before it is stored);
2. the new version reaches the fleet through Event Grid (``SecretNewVersionCreated``) or
   ``refresh_from_event`` with a spread: wait out that window (``RotationConfig.revoke_wait``);
3. only then regenerate the leaked slot, and probe until every gateway URL refuses the leaked key
   (``probe_successes`` consecutive key 401s): the result says when it died.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import Any

from .._key import fingerprint
from ..exceptions import RotationError
from .model import TAG_CREDENTIAL_ID, RotationResult, holder, iso, other_slot
from .run import Run

log = logging.getLogger("apimvault.rotation")


@dataclasses.dataclass(frozen=True)
class RevocationResult:
    """What :func:`~apimvault.rotation.revoke_current` did. ``rotation`` is the make-before-break
    rotation to the other slot; ``revoked_slot`` / ``revoked_fingerprint`` name the leaked key;
    ``waited_seconds`` is the wait for the fleet; ``dead_after_seconds`` the time from its regeneration
    until every gateway URL refused it (injected clock), ``dead_at`` the UTC time then. No key."""

    rotation: RotationResult
    revoked_slot: str
    revoked_fingerprint: str
    waited_seconds: float
    dead_after_seconds: float
    dead_at: str | None

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rotation"] = self.rotation.as_dict()
        return data


def revoke(run: Run) -> RevocationResult:
    """Steps 1-3 of the module doc on ``run``."""
    leaked = run.latest()
    result = run.rotate(None)
    if result.skipped or result.regenerated is None:
        raise RotationError(
            f"emergency revocation of {run.where}: the rotation to the other key did not happen "
            f"({result.reason}); the leaked key was NOT revoked. Run it again",
            permanent=False,
        )
    leaked_slot = other_slot(result.regenerated)
    started = run.clock()
    run.step("spread")
    log.warning(
        "revoking %s: waiting %g s for the fleet to move to version %s before regenerating the %s key",
        run.where,
        run.settings.revoke_wait,
        result.new_version,
        leaked_slot,
    )
    run.sleep(run.settings.revoke_wait)
    waited = run.clock() - started
    run.step("revoke")
    latest = run.latest()
    ref = _ref(run, latest)
    keys = run.session.list_keys(ref, "listSecrets before revoking")
    if holder(latest.value, keys) == leaked_slot:
        raise RotationError(
            f"{run.where} version {latest.version} holds the {leaked_slot} key again (another rotation?): "
            "not revoking the key the vault serves. Nothing was regenerated"
        )
    if keys[leaked_slot] == leaked.value:
        run.session.regenerate(ref, leaked_slot)
        log.warning(
            "revoked %s: regenerated the leaked %s key of %s", run.where, leaked_slot, ref.resource_id
        )
    revoked_at = run.clock()
    dead_after = wait_refused(run, leaked.value, revoked_at)
    return RevocationResult(
        rotation=result,
        revoked_slot=leaked_slot,
        revoked_fingerprint=fingerprint(leaked.value),
        waited_seconds=round(waited, 3),
        dead_after_seconds=round(dead_after, 3),
        dead_at=iso(dt.datetime.now(dt.UTC)),
    )


def _ref(run: Run, latest: Any) -> Any:
    from .azure import resolve_target

    ref, slot, _ = resolve_target(latest, run.apim_subscription_id, run.where)
    if slot is None:  # pragma: no cover - the rotation just wrote the tag
        raise RotationError(f"{run.where} version {latest.version} has no {TAG_CREDENTIAL_ID} tag")
    return ref


def wait_refused(run: Run, value: str, started: float) -> float:
    """Probe until every gateway URL refuses ``value`` (APIM's key 401) ``probe_successes`` times in a
    row (a 2xx that breaks a run doubles the run needed, up to 4 K, as in
    :meth:`~apimvault.rotation.run.Run.wait_accepted`); the seconds since ``started``. Raises
    :class:`RotationError` after ``propagation_timeout``."""
    first = run.settings.probe_successes
    streak = dict.fromkeys(run.probe.urls, 0)
    needed = dict.fromkeys(run.probe.urls, first)
    done_at, delay = started, 0.5
    while True:
        run.step("probe")
        for url in [u for u, n in streak.items() if n < needed[u]]:
            refused = run.probe.accepts(url, value) is False
            if not refused and streak[url]:
                needed[url] = min(needed[url] * 2, 4 * first)
            streak[url] = streak[url] + 1 if refused else 0
            if streak[url] >= needed[url]:
                done_at = run.clock()
        waiting = [u for u, n in streak.items() if n < needed[u]]
        if not waiting:
            return max(0.0, done_at - started)
        if run.clock() - started >= run.timeout:
            raise RotationError(
                f"the leaked key of {run.where} was regenerated but {', '.join(waiting)} still accepted it "
                f"after {run.timeout:g} s (gateway sync): check again with `apimvault check`",
                permanent=False,
            )
        counting = any(streak[u] for u in waiting)
        run.sleep(run.settings.probe_interval if counting else delay)
        if not counting:
            delay = min(delay * 1.5, 15.0)
