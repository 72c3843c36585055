"""What a drill is asked to do (:class:`DrillConfig`, validated once) and the numbers derived from it
(:class:`DrillPlan`: the clients, workers, cache policy and gateway propagation it runs with).

Both are plain values: no stack, no network. The CLI builds the config with :meth:`DrillConfig.from_args`;
Python builds it directly and passes it to :func:`apimvault.cli.drill.run_drill`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import TYPE_CHECKING

from ...exceptions import ApimVaultError, ConfigurationError

if TYPE_CHECKING:  # pragma: no cover
    from ..._policy import CachePolicy

MIN_DURATION = 2.0
"""Shortest drill (seconds of traffic): three rotations need at least two forced-refresh intervals apart."""
MIN_WORKERS = 2
"""Fewest workers and clients: one sync and one async of each."""
DELIVERIES = ("auto", "azurite", "memory")
"""The Storage queue between the local Event Grid and the rotation function's handler."""
DEFAULT_PROPAGATION = 2.0
"""Seconds a local stack's gateway units wait at most before accepting a regenerated key."""
FORCED_REFRESH_INTERVAL = 1.0
"""The drill policy's forced-refresh interval: rotations stay two of them apart."""


class DrillDeclined(ApimVaultError):
    """The drill would regenerate the keys of a non-loopback target without ``yes``."""


class PreflightFailed(Exception):
    """A request of the preflight failed: the drill stops before the first rotation."""

    def __init__(self, kind: str, cause: Exception) -> None:
        super().__init__(f"the {kind} preflight request failed: {type(cause).__name__}: {cause}")
        self.kind = kind
        self.cause = cause


def _seconds(name: str, value: object, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ConfigurationError(
            f"{name} must be a finite number of seconds, at least {minimum:g}: {value!r}"
        )
    return float(value)


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be a whole number, not {value!r}")
    if value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum}: {value!r}")
    return value


def _optional_text(name: str, value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a string or None, not {type(value).__name__}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class DrillConfig:
    """One drill's settings (the ``apimvault drill`` flags). Every bad value raises
    :class:`~apimvault.exceptions.ConfigurationError` (a ``ValueError``) naming the field, by the rules the
    CLI's parser applies to the flags."""

    duration: float = 20.0
    """Seconds of traffic, finite, at least :data:`MIN_DURATION`."""
    concurrency: int = 16
    """Workers in total (half threads, half asyncio tasks), at least 2."""
    clients: int = 4
    """Providers/clients the workers share, at least 2 (at most ``concurrency`` are used)."""
    chaos: bool = False
    """A Key Vault outage, latency spikes, random propagation and a duplicate, overlapping delivery."""
    propagation: float | None = None
    """Local stacks: a unit's longest delay before it accepts a regenerated key (``None``: 2 s; 0: off)."""
    token_scope: str | None = None
    """Also send an Entra token for this scope (key plus token)."""
    delivery: str = "auto"
    """One of :data:`DELIVERIES`."""
    revoke: bool = False
    """Make rotation 3 an emergency revocation of the key the clients hold."""
    deployment: str | None = None
    """The Azure OpenAI deployment (``None``: ``APIMVAULT_DEPLOYMENT``)."""
    client_id: str | None = None
    """The rotator's managed identity client id (``None``: ``APIMVAULT_ROTATOR_CLIENT_ID``)."""
    yes: bool = False
    """Allow regenerating the keys of a non-loopback target."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: store the normalised values once
        set_(self, "duration", _seconds("duration", self.duration, MIN_DURATION))
        set_(self, "concurrency", _count("concurrency", self.concurrency, MIN_WORKERS))
        set_(self, "clients", _count("clients", self.clients, MIN_WORKERS))
        if self.propagation is not None:
            set_(self, "propagation", _seconds("propagation", self.propagation, 0.0))
        if self.delivery not in DELIVERIES:
            raise ConfigurationError(
                f"delivery must be one of {', '.join(DELIVERIES)}, not {self.delivery!r}"
            )
        for name in ("chaos", "revoke", "yes"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(f"{name} must be True or False, not {getattr(self, name)!r}")
        for name in ("token_scope", "deployment", "client_id"):
            _optional_text(name, getattr(self, name))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DrillConfig:
        """The config of ``apimvault drill``'s parsed arguments (flags it lacks keep their defaults)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {name: value for name, value in vars(args).items() if name in fields}
        if given.get("delivery") is None:
            given.pop("delivery", None)
        for name in ("chaos", "revoke", "yes"):
            if name in given:
                given[name] = bool(given[name])
        return cls(**given)

    def plan(self, *, local: bool) -> DrillPlan:
        """The numbers this drill runs with; ``local``: the target is a local stack whose gateway
        propagation the drill sets (real gateways propagate as they do: 0 here)."""
        propagation = (
            (DEFAULT_PROPAGATION if self.propagation is None else self.propagation) if local else 0.0
        )
        return DrillPlan(
            duration=self.duration,
            concurrency=self.concurrency,
            clients=max(MIN_WORKERS, min(self.clients, self.concurrency)),
            chaos=self.chaos,
            propagation=propagation,
            local=local,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DrillPlan:
    """The derived numbers of one drill (see :meth:`DrillConfig.plan`)."""

    duration: float
    concurrency: int
    clients: int
    """Providers/clients in use: ``clients`` capped at ``concurrency``."""
    chaos: bool
    propagation: float
    """Seconds of gateway propagation the drill sets on a local stack (0 elsewhere)."""
    local: bool

    @property
    def sync_clients(self) -> int:
        return math.ceil(self.clients / 2)

    @property
    def async_clients(self) -> int:
        return self.clients - self.sync_clients

    @property
    def threads(self) -> int:
        return math.ceil(self.concurrency / 2)

    @property
    def asyncio_tasks(self) -> int:
        return self.concurrency // 2

    @property
    def ttl(self) -> float:
        """The provider TTL: ``max(4 s, 0.6 D)``, and with propagation long enough that the earliest
        refresh-ahead comes 4 s after the gateway units stop accepting the key rotation 2 revokes."""
        longest = self.propagation * (1.5 if self.chaos else 1.0)
        ttl = max(4.0, self.duration * 0.6)
        if longest > 0:
            # Rotation 2 must revoke the key the clients still hold: the gateway units stop accepting it
            # only `longest` after it is regenerated, and rotation 1 itself waits up to ~1.5 x longest for
            # them. The earliest refresh-ahead is at 0.55 x TTL (TTL jittered down 20 %, margin a quarter).
            revoked_by = max(0.2 * self.duration, 0.1 * self.duration + 1.5 * longest + 2.5) + longest
            ttl = max(ttl, (revoked_by + 4.0) / 0.55)
        return ttl

    @property
    def policy(self) -> CachePolicy:
        """The clients' cache policy: :attr:`ttl`, a quarter of it as refresh margin."""
        from ..._policy import CachePolicy

        ttl = self.ttl
        return CachePolicy(
            ttl=ttl,
            jitter=0.2,
            refresh_margin=ttl / 4,
            max_staleness=max(60.0, self.duration * 2),
            backoff_initial=0.25,
            backoff_max=2.0,
            forced_refresh_interval=FORCED_REFRESH_INTERVAL,
        )

    @property
    def rotation_gap(self) -> float:
        """Rotations stay at least this far apart, however short the drill: a client may force one refresh
        per forced-refresh interval, and two revocations inside one would drill the rate limit, not the
        rotation."""
        return 2 * FORCED_REFRESH_INTERVAL

    @property
    def propagation_timeout(self) -> float | None:
        """How long a rotation waits for the gateway units (a local stack's delays are known; real
        gateways get the library's default, ``None``)."""
        return max(60.0, 20 * self.propagation) if self.local else None

    @property
    def revoke_wait(self) -> float | None:
        """A revocation's fleet wait on a local stack (``None``: the library's default)."""
        return max(2.0, 2 * FORCED_REFRESH_INTERVAL) if self.local else None

    def unit_delays(self, units: list[str]) -> dict[str, float | tuple[float, float]]:
        """Each gateway unit's propagation delay: unit k of n waits ``S * k / n``; with chaos each draws a
        random delay in ``[S / 4, 1.5 S]`` for every regeneration."""
        delays: dict[str, float | tuple[float, float]] = {}
        for k, unit in enumerate(units, start=1):
            if self.chaos and self.propagation > 0:
                delays[unit] = (round(self.propagation / 4, 3), round(self.propagation * 1.5, 3))
            else:
                delays[unit] = round(self.propagation * k / len(units), 3)
        return delays
