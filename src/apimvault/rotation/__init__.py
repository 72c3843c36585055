"""Two-credential rotation of an APIM subscription key kept in Key Vault (Learn: tutorial-rotation-dual).

The secret's versions alternate between the subscription's two keys; its ``CredentialId`` tag says which
one the latest version holds. A rotation

1. reads the latest version (value, ``CredentialId``, ``ProviderAddress``, ``ValidityPeriodDays``).
   Without ``ValidityPeriodDays`` it refuses: the new version would get no expiry, so no
   ``SecretNearExpiry`` would ever fire again and rotation would silently stop; with fewer than 31 days
   it refuses too (``SecretNearExpiry`` fires 30 days before expiry). Where the identity may list the
   vault's secrets, it refuses when another secret's ``ProviderAddress`` names the same APIM subscription
   (:class:`SharedSubscriptionError`). Without ``CredentialId`` it asks ``listSecrets`` which key the
   stored value is and writes the tag on that version;
2. checks with ``listSecrets`` that the stored value really is the key the tag names (so the key in use
   is never the one regenerated), and that every gateway URL answers the probe for it with a 2xx (a 404
   means the probe path is not routed: :class:`GatewayProbeError`, before anything changes);
3. proves it may tag the current version (``secrets/update/action``), then regenerates the *other* key
   (``regeneratePrimaryKey`` / ``regenerateSecondaryKey``), reads it back and names it (fingerprint) in
   the ``RotationPending`` tag, so that a retry resumes instead of regenerating again;
4. **make-before-break**: APIM gateways pick a regenerated key up asynchronously, each unit (region,
   self-hosted gateway) on its own, refusing it until then. So the rotation probes every configured
   gateway URL with the new key until each has accepted it ``probe_successes`` times in a row,
   ``probe_interval`` seconds apart (units behind one hostname are picked per connection; every probe
   opens a fresh one), for at most ``propagation_timeout`` seconds. The probe is
   ``GET <gateway>/openai/v1/models`` with the key in the subscription-key header: the gateway
   authenticates it like any call of the API, and listing models costs no tokens. Only a 2xx is
   "accepted", APIM's key 401 is "not yet", anything else stops the rotation
   (:class:`GatewayProbeError`); the key itself is never logged. A gateway that validates an Entra token
   as well (key-plus-token mode) needs ``token_scope`` (``APIMVAULT_TOKEN_SCOPE``): the probe then sends
   ``Authorization: Bearer`` with a token the rotation's credential gets for that scope (never logged);
   without it the gateway's token 401 is a :class:`GatewayProbeError` that says so;
5. only then writes it as a new secret version with ``CredentialId`` flipped, the other tags and the
   content type kept, and ``expires = now + ValidityPeriodDays``;
6. verifies that the vault's latest version holds a live key of the slot its tag names, and repairs it
   when not: it writes the live value of that slot as a new version, again only once the gateway
   accepts it.

The key the clients use stays valid throughout: it is revoked only by the *next* rotation, by which time
the vault has served its successor for a whole rotation period. If the gateways do not accept the new key
in time, :class:`RotationError` says so and that the vault was not changed: the current key still works.

Overlap. Event Grid delivers at least once and re-delivers an event it got no answer for within 30 s, so
runs for the same secret can overlap; a run may also meet a rotation started by hand. Step 6 runs after
every rotation, after every skip (an event whose version is no longer the latest) and whenever a run sees
that another one changed the vault or the keys under it, so any number of overlapping runs end with the
vault's latest version holding a key the gateway accepts, tagged with its slot. Serialising the runs (the
rotation function in ``infra/rotation_function`` holds a blob lease per secret) keeps clients from ever
seeing the short-lived state that step 6 repairs.

:func:`revoke_current` is the emergency revocation: rotate, wait for the fleet, then regenerate the leaked
key (:mod:`apimvault.rotation.revoke`). A failed rotation's traceback keeps no key in its frames' locals.

Needs the ``rotation`` extra (``azure-mgmt-apimanagement``). The identity needs, on the secret, the data
actions ``getSecret``, ``setSecret`` and ``update`` (the custom role ``apimvault secret rotator`` that
``infra/`` defines, or Key Vault Secrets Officer) and, on the APIM subscription, the four-action custom
role that ``infra/modules/apim.bicep`` defines (``apimvault APIM subscription key rotator``:
``Microsoft.ApiManagement/service/subscriptions/read``, ``.../listSecrets/action``,
``.../regeneratePrimaryKey/action``, ``.../regenerateSecondaryKey/action``).
Nothing here logs, returns or raises with a key: only versions and fingerprints.

Modules: :mod:`.config` (:class:`RotationConfig`, every setting and its one default), :mod:`.model`
(tags, results, the subscription reference), :mod:`.azure` (Key Vault and ARM I/O, error mapping),
:mod:`.probe` (the gateway probe), :mod:`.run` (one method per step), :mod:`.revoke`. This module is
the front.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .. import _telemetry
from .._key import fingerprint
from ..exceptions import ConfigurationError, RotationError
from .azure import Session, refuse_shared, resolve_target
from .config import (
    DEFAULT_ARM_ENDPOINT,
    DEFAULT_PROBE_INTERVAL,
    DEFAULT_PROBE_SUCCESSES,
    DEFAULT_PROPAGATION_TIMEOUT,
    DEFAULT_REVOKE_WAIT,
    ENV_APIM_SUBSCRIPTION_ID,
    ENV_ARM_ENDPOINT,
    ENV_GATEWAY_URLS,
    ENV_PROBE_INTERVAL,
    ENV_PROBE_SUCCESSES,
    ENV_PROPAGATION_TIMEOUT,
    ENV_REVOKE_WAIT,
    ENV_TOKEN_SCOPE,
    RotationConfig,
)
from .model import (
    EXPIRED,
    NEAR_EXPIRY,
    PROBE_PATH,
    ROTATING_EVENTS,
    ROTATOR_ROLE,
    TAG_CREDENTIAL_ID,
    TAG_PENDING,
    TAG_PROVIDER_ADDRESS,
    TAG_VALIDITY_DAYS,
    LatestCheck,
    RotationPlan,
    RotationResult,
    SharedSubscriptionError,
    holder,
    iso,
    other_slot,
    utc_now,
)
from .probe import GatewayProbe, GatewayProbeError
from .ref import ApimSubscriptionRef, parse_apim_subscription_id
from .revoke import RevocationResult, revoke
from .run import Run

if TYPE_CHECKING:  # pragma: no cover
    from azure.core.credentials import TokenCredential

__all__ = [
    "DEFAULT_ARM_ENDPOINT",
    "DEFAULT_PROBE_INTERVAL",
    "DEFAULT_PROBE_SUCCESSES",
    "DEFAULT_PROPAGATION_TIMEOUT",
    "DEFAULT_REVOKE_WAIT",
    "ENV_APIM_SUBSCRIPTION_ID",
    "ENV_ARM_ENDPOINT",
    "ENV_GATEWAY_URLS",
    "ENV_PROBE_INTERVAL",
    "ENV_PROBE_SUCCESSES",
    "ENV_PROPAGATION_TIMEOUT",
    "ENV_REVOKE_WAIT",
    "ENV_TOKEN_SCOPE",
    "EXPIRED",
    "NEAR_EXPIRY",
    "PROBE_PATH",
    "ROTATING_EVENTS",
    "ROTATOR_ROLE",
    "TAG_CREDENTIAL_ID",
    "TAG_PENDING",
    "TAG_PROVIDER_ADDRESS",
    "TAG_VALIDITY_DAYS",
    "ApimSubscriptionRef",
    "GatewayProbe",
    "GatewayProbeError",
    "LatestCheck",
    "RevocationResult",
    "RotationConfig",
    "RotationError",
    "RotationPlan",
    "RotationResult",
    "SharedSubscriptionError",
    "check_latest",
    "parse_apim_subscription_id",
    "plan_rotation",
    "revoke_current",
    "rotate",
    "rotate_from_event",
]

log = logging.getLogger("apimvault.rotation")


def _settings(
    config: RotationConfig | None,
    *,
    apim_subscription_id: str | None = None,
    arm_endpoint: str | None = None,
    gateway_urls: Sequence[str] | str | None = None,
    propagation_timeout: float | None = None,
    header_name: str | None = None,
    token_scope: str | None = None,
) -> RotationConfig:
    """``config`` (default: the environment, all but the subscription) with the arguments given applied."""
    overrides: dict[str, Any] = {
        "apim_subscription_id": apim_subscription_id,
        "arm_endpoint": arm_endpoint,
        "gateway_urls": gateway_urls,
        "propagation_timeout": propagation_timeout,
        "header_name": header_name,
        "token_scope": token_scope,
    }
    if config is None:
        return RotationConfig.from_env(subscription_from_env=False, **overrides)
    config = config.replace(**overrides)
    config.require_gateways()
    return config


def _probe(settings: RotationConfig, session: Session) -> GatewayProbe:
    """The gateway probe of a rotation: the key, and with ``settings.token_scope`` a token the rotation's
    credential gets for that scope (key-plus-token gateways)."""
    return GatewayProbe(
        settings.gateway_urls,
        header_name=settings.header_name,
        token_scope=settings.token_scope,
        credential=session.credential,
    )


def scrub_traceback(exc: BaseException) -> None:
    """Clear the locals of the finished frames of ``exc``'s traceback and of its causes and contexts, so
    that a failed rotation's traceback (as error reporters record it, locals included) holds no APIM key:
    the rotation's frames held both keys (in use and regenerated), the SDK's frames the request body.
    The frames still running (the caller's) are left alone; file names and line numbers stay."""
    import traceback

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        traceback.clear_frames(item.__traceback__)
        todo += [item.__cause__, item.__context__]


def _target(vault_url: str, secret_name: str) -> tuple[str, str, str]:
    from .._validation import validate_secret_name, validate_vault_url

    vault_url = validate_vault_url(vault_url)
    secret_name = validate_secret_name(secret_name)
    return vault_url, secret_name, f"{vault_url}/secrets/{secret_name}"


def plan_rotation(
    *,
    vault_url: str,
    secret_name: str,
    apim_subscription_id: str | None = None,
    arm_endpoint: str | None = None,
    credential: TokenCredential | None = None,
    gateway_urls: Sequence[str] | str | None = None,
    propagation_timeout: float | None = None,
    config: RotationConfig | None = None,
    token_scope: str | None = None,
) -> RotationPlan:
    """Read the secret and describe what :func:`rotate` would do, changing nothing.

    Raises what :func:`rotate` would raise before changing anything (missing ``ValidityPeriodDays``, no
    gateway URL, ...). Without a ``CredentialId`` tag it asks ``listSecrets`` which key the value is.
    ``config`` carries the settings (default: the environment); the other arguments override it.
    """
    vault_url, secret_name, where = _target(vault_url, secret_name)
    settings = _settings(
        config,
        apim_subscription_id=apim_subscription_id,
        arm_endpoint=arm_endpoint,
        gateway_urls=gateway_urls,
        propagation_timeout=propagation_timeout,
        token_scope=token_scope,
    )
    session = Session(vault_url, settings.arm_endpoint, credential)
    probe = _probe(settings, session)
    try:
        current = session.read_current(secret_name, where)
        ref, slot, days = resolve_target(current, settings.apim_subscription_id, where)
        shared = session.secrets_naming(ref, secret_name)
        refuse_shared(shared, ref, where)
        inferred = slot is None
        if slot is None:
            slot = holder(current.value, session.list_keys(ref, "listSecrets to infer CredentialId"))
            if slot is None:
                raise RotationError(
                    f"{where} version {current.version} has no {TAG_CREDENTIAL_ID} tag and holds neither "
                    f"key of {ref.resource_id}; store the current key with the tag and rotate again"
                )
        _check_routes(probe, current.value, where, current.version)
    except BaseException as exc:
        scrub_traceback(exc)
        raise
    finally:
        probe.close()
        session.close()
    return RotationPlan(
        vault_url=vault_url,
        secret_name=secret_name,
        current_version=current.version,
        current_fingerprint=fingerprint(current.value),
        credential_id=slot,
        regenerate=other_slot(slot),
        apim_subscription=ref.resource_id,
        arm_endpoint=settings.arm_endpoint,
        validity_days=days,
        current_expires_on=iso(current.expires_on),
        gateway_urls=settings.gateway_urls,
        propagation_timeout=settings.propagation_timeout,
        credential_id_inferred=inferred,
        probe_successes=settings.probe_successes,
        probe_interval=settings.probe_interval,
        shared_checked=shared is not None,
        token_scope=settings.token_scope,
    )


def _check_routes(probe: GatewayProbe, key: str, where: str, version: str) -> None:
    """Plan time, before anything changes: each gateway URL must accept the key in use (2xx)."""
    for url in probe.urls:
        answer = probe.accepts(url, key)  # a 404, 3xx, 403, 5xx ... raises GatewayProbeError
        if answer is not True:
            raise RotationError(
                f"{url} {'refuses' if answer is False else 'did not answer the probe for'} the key {where} "
                f"holds now (version {version}): a rotation could not tell when the new key is accepted. "
                "Nothing was changed. Run `apimvault check`; repair the vault or fix the gateway URL first"
            )


def rotate(
    *,
    vault_url: str,
    secret_name: str,
    apim_subscription_id: str | None = None,
    arm_endpoint: str | None = None,
    credential: TokenCredential | None = None,
    now: dt.datetime | float | None = None,
    expected_version: str | None = None,
    gateway_urls: Sequence[str] | str | None = None,
    propagation_timeout: float | None = None,
    header_name: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_step: Callable[[str], None] | None = None,
    config: RotationConfig | None = None,
    token_scope: str | None = None,
) -> RotationResult:
    """Rotate the APIM subscription key held in ``secret_name`` (the dual-credential pattern, see the module).

    Args:
        vault_url / secret_name: the secret whose versions alternate between the two keys.
        apim_subscription_id: the APIM subscription's ARM resource id (the CLI and the rotation function
            pass ``APIMVAULT_APIM_SUBSCRIPTION_ID`` through ``config``); ``None`` uses the config's, else
            the secret's ``ProviderAddress`` tag. When both are present they must name the same
            subscription.
        arm_endpoint: Azure Resource Manager (``APIMVAULT_ARM_ENDPOINT``, default
            ``https://management.azure.com``).
        credential: any ``TokenCredential``; ``None`` means ``DefaultAzureCredential()``. It needs Key
            Vault getSecret/setSecret/update on the secret and the custom role ``infra/`` defines on the
            subscription (see the module).
        now: the instant the new expiry is computed from (default: the current UTC time).
        expected_version: rotate only if the latest version is this one (Event Grid idempotency);
            otherwise verify the latest version (and repair it if needed) and return a skipped result.
        gateway_urls: every gateway unit's URL to probe before storing the new key (default
            ``APIMVAULT_GATEWAY_URLS``, else ``AZURE_OPENAI_ENDPOINT``).
        propagation_timeout: seconds to wait for the gateways to accept the new key (default
            ``APIMVAULT_PROPAGATION_TIMEOUT`` or 600).
        header_name: the header the gateway reads the key from (default ``APIMVAULT_HEADER_NAME`` or
            ``Ocp-Apim-Subscription-Key``).
        clock / sleep: the monotonic time source and the wait between probes (tests inject both).
        on_step: called with the name of each step before it runs (``read``, ``check``, ``regenerate``,
            ``probe``, ``write``, ``verify``, ``repair``); tests use it to force interleavings.
        config: the settings (:class:`RotationConfig`, default: the environment); the arguments above
            override it.
        token_scope: for a gateway that validates an Entra token as well as the key, the API's scope
            (``api://<app-id>/.default``, default ``APIMVAULT_TOKEN_SCOPE``): the probe sends a token
            ``credential`` gets for it. Without one, the gateway's token 401 is a
            :class:`GatewayProbeError` naming ``APIMVAULT_TOKEN_SCOPE``.

    Raises the typed errors of :mod:`apimvault.exceptions` (``AccessDeniedError`` names the role),
    :class:`ConfigurationError` for bad input and :class:`RotationError` when rotating would be unsafe,
    ARM refused, or the gateways did not accept the new key in time (then the vault was not changed).
    """
    from .._validation import validate_version

    vault_url, secret_name, where = _target(vault_url, secret_name)
    expected = validate_version(expected_version)
    settings = _settings(
        config,
        apim_subscription_id=apim_subscription_id,
        arm_endpoint=arm_endpoint,
        gateway_urls=gateway_urls,
        propagation_timeout=propagation_timeout,
        header_name=header_name,
        token_scope=token_scope,
    )
    with _running(vault_url, secret_name, credential, settings, clock, sleep, on_step, now) as run:
        result = run.rotate(expected)
    _telemetry.rotation_counted("skipped" if result.skipped else "rotated", where)
    return result


@contextlib.contextmanager
def _running(
    vault_url: str,
    secret_name: str,
    credential: TokenCredential | None,
    settings: RotationConfig,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    on_step: Callable[[str], None] | None,
    now: dt.datetime | float | None,
) -> Iterator[Run]:
    """A :class:`Run` with its clients; closes them, counts a failure and scrubs its traceback."""
    where = f"{vault_url}/secrets/{secret_name}"
    session = Session(vault_url, settings.arm_endpoint, credential)
    probe = _probe(settings, session)
    try:
        yield Run(session, probe, secret_name, where, settings, clock, sleep, on_step, utc_now(now))
    except BaseException as exc:
        _telemetry.rotation_counted("failed", where)
        scrub_traceback(exc)
        raise
    finally:
        probe.close()
        session.close()


def revoke_current(
    *,
    vault_url: str,
    secret_name: str,
    credential: TokenCredential | None = None,
    config: RotationConfig | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_step: Callable[[str], None] | None = None,
    now: dt.datetime | float | None = None,
) -> RevocationResult:
    """Emergency revocation of the key the vault serves now (leaked), without a storm (see
    :mod:`apimvault.rotation.revoke`): rotate make-before-break to the other key, wait
    ``config.revoke_wait`` seconds for the fleet to move to the new version, then regenerate the leaked
    key and probe until every gateway refuses it. ``on_step`` also sees ``spread`` and ``revoke``."""
    vault_url, secret_name, where = _target(vault_url, secret_name)
    settings = _settings(config)
    with _running(vault_url, secret_name, credential, settings, clock, sleep, on_step, now) as run:
        result = revoke(run)
    _telemetry.rotation_counted("rotated", where)
    return result


def check_latest(
    *,
    vault_url: str,
    secret_name: str,
    apim_subscription_id: str | None = None,
    arm_endpoint: str | None = None,
    credential: TokenCredential | None = None,
    gateway_urls: Sequence[str] | str | None = None,
    header_name: str | None = None,
    config: RotationConfig | None = None,
    token_scope: str | None = None,
) -> LatestCheck:
    """Check, changing nothing, that the latest version holds a live key of the slot its tag names and
    that every gateway accepts it (one probe each, see :class:`GatewayProbe`)."""
    vault_url, secret_name, where = _target(vault_url, secret_name)
    settings = _settings(
        config,
        apim_subscription_id=apim_subscription_id,
        arm_endpoint=arm_endpoint,
        gateway_urls=gateway_urls,
        header_name=header_name,
        token_scope=token_scope,
    )
    session = Session(vault_url, settings.arm_endpoint, credential)
    probe = _probe(settings, session)
    try:
        latest = session.read_current(secret_name, where)
        ref, slot, _ = resolve_target(latest, settings.apim_subscription_id, where)
        keys = session.list_keys(ref, "listSecrets to check the vault")
        live = slot is not None and keys[slot] == latest.value
        accepted = {url: probe.accepts(url, latest.value) for url in settings.gateway_urls}
    except BaseException as exc:
        scrub_traceback(exc)
        raise
    finally:
        probe.close()
        session.close()
    return LatestCheck(where, latest.version, slot or "", fingerprint(latest.value), live, accepted)


def _event_vault_url(event: Any, configured: str | None) -> str:
    """The vault an event is about; must agree with ``AZURE_KEYVAULT_URL`` when that is set."""
    from .._validation import validate_vault_url

    from_id = None
    if event.secret_id:
        parts = urlsplit(event.secret_id)
        if parts.scheme == "https" and parts.hostname:
            from_id = f"https://{parts.netloc}"
    if configured:
        url = validate_vault_url(configured)
        host = (urlsplit(url).hostname or "").lower()
        same = (from_id is not None and urlsplit(from_id).netloc.lower() == urlsplit(url).netloc.lower()) or (
            host.split(".", 1)[0] == event.vault_name.lower()
        )
        if not same:
            raise RotationError(
                f"event is about vault {event.vault_name!r} ({event.secret_id or 'no id'}), not the "
                f"configured {url}; refusing"
            )
        return url
    if from_id is not None:
        return validate_vault_url(from_id)
    return validate_vault_url(f"https://{event.vault_name}.vault.azure.net")


def rotate_from_event(
    event: Mapping[str, Any] | list[Any] | str | bytes,
    *,
    credential: TokenCredential | None = None,
    arm_endpoint: str | None = None,
    apim_subscription_id: str | None = None,
    gateway_urls: Sequence[str] | str | None = None,
    propagation_timeout: float | None = None,
    header_name: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_step: Callable[[str], None] | None = None,
    config: RotationConfig | None = None,
    token_scope: str | None = None,
) -> RotationResult:
    """Rotate on a Key Vault ``SecretNearExpiry`` (or ``SecretExpired``) event, idempotently.

    ``event`` is an Event Grid or CloudEvents payload (dict, list, JSON text). The rotation happens only
    if the event's version is still the latest; otherwise the result is ``skipped`` ("already rotated")
    after the latest version was verified live (and repaired if it was not). The other arguments are
    :func:`rotate`'s.
    The vault is ``config.vault_url`` (``AZURE_KEYVAULT_URL``) when set (the event must be about that
    vault), else the one the event's ``Id`` names. ``SecretNewVersionCreated`` is refused: rotating on it
    would rotate again on the version the rotation writes.
    """
    from .._events import parse_secret_events

    events = parse_secret_events(event)
    if not events:
        raise ConfigurationError("the payload holds no Key Vault secret event")
    wanted = [e for e in events if e.event_type in ROTATING_EVENTS]
    if not wanted:
        kinds = ", ".join(sorted({e.event_type for e in events}))
        raise ConfigurationError(
            f"{kinds} does not trigger a rotation (only SecretNearExpiry / SecretExpired do; rotating on "
            "SecretNewVersionCreated would loop)"
        )
    settings = _settings(
        config,
        apim_subscription_id=apim_subscription_id,
        arm_endpoint=arm_endpoint,
        gateway_urls=gateway_urls,
        propagation_timeout=propagation_timeout,
        header_name=header_name,
        token_scope=token_scope,
    )
    results: list[RotationResult] = []
    for item in wanted:
        if not item.version:
            raise ConfigurationError(f"{item.event_type} event for {item.secret_name} has no Version")
        results.append(
            rotate(
                vault_url=_event_vault_url(item, settings.vault_url),
                secret_name=item.secret_name,
                credential=credential,
                expected_version=item.version,
                clock=clock,
                sleep=sleep,
                on_step=on_step,
                config=settings,
            )
        )
    done = [r for r in results if not r.skipped]
    return done[0] if done else results[-1]
