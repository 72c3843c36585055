"""Every rotation setting, resolved once: :class:`RotationConfig`.

The CLI (``apimvault rotate``), the rotation function and the drill build one with
:meth:`RotationConfig.from_env` and pass it in; the library's entry points build one from the environment
when given none. Each setting has one default here. Every bad value is a :class:`ConfigurationError`
naming the variable (or argument) it came from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from .. import _settings
from ..exceptions import ConfigurationError

__all__ = [
    "DEFAULT_ARM_ENDPOINT",
    "DEFAULT_PROPAGATION_TIMEOUT",
    "ENV_APIM_SUBSCRIPTION_ID",
    "ENV_ARM_ENDPOINT",
    "ENV_GATEWAY_URLS",
    "ENV_PROBE_INTERVAL",
    "ENV_PROBE_SUCCESSES",
    "ENV_PROPAGATION_TIMEOUT",
    "ENV_REVOKE_WAIT",
    "ENV_TOKEN_SCOPE",
    "RotationConfig",
]

DEFAULT_ARM_ENDPOINT = "https://management.azure.com"
ENV_ARM_ENDPOINT = "APIMVAULT_ARM_ENDPOINT"
ENV_APIM_SUBSCRIPTION_ID = "APIMVAULT_APIM_SUBSCRIPTION_ID"
ENV_GATEWAY_URLS = "APIMVAULT_GATEWAY_URLS"
ENV_OPENAI_ENDPOINT = "AZURE_OPENAI_ENDPOINT"
ENV_PROPAGATION_TIMEOUT = "APIMVAULT_PROPAGATION_TIMEOUT"
ENV_VAULT_URL = _settings.ENV_VAULT_URL
DEFAULT_PROPAGATION_TIMEOUT = 600.0
"""Seconds to wait for the gateways to accept a regenerated key. One default for the CLI, the library and
the rotation function (which used 180 s before): Microsoft Q&A question 5922487 reports up to 10 minutes
for a regenerated key to reach every unit, and a retry resumes the wait (``RotationPending``) anyway."""
MAX_PROPAGATION_TIMEOUT = 86400.0
ENV_PROBE_SUCCESSES = "APIMVAULT_PROBE_SUCCESSES"
ENV_PROBE_INTERVAL = "APIMVAULT_PROBE_INTERVAL"
ENV_REVOKE_WAIT = "APIMVAULT_REVOKE_WAIT"
ENV_TOKEN_SCOPE = "APIMVAULT_TOKEN_SCOPE"  # noqa: S105 - a variable name (the providers' and check's too)
DEFAULT_PROBE_SUCCESSES = 10
"""Consecutive 2xx answers each gateway URL must give the new key. Units behind one hostname are
balanced per connection and cannot be addressed: with N units and one lagging, K fresh-connection probes
all miss it with probability ((N-1)/N)**K (K=10: N=2 0.1 %, N=3 1.7 %, N=4 5.6 %); a 401 that breaks a
run doubles the run needed (up to 4 K), so later tries do not add much to that chance."""
DEFAULT_PROBE_INTERVAL = 0.5
"""Seconds between the consecutive probes of one URL (each on a fresh connection)."""
DEFAULT_REVOKE_WAIT = 60.0
"""Emergency revocation: seconds between storing the new key and regenerating the leaked one, so that
the fleet (Event Grid push / ``refresh_from_event`` with spread) has moved to the new version."""


def _seconds(value: Any, name: str, what: str, *, low: float, high: float, low_open: bool = True) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigurationError(f"{name}={value!r}: the {what} is not a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{name}={value!r}: the {what} is not a number of seconds")
    if not ((low < value if low_open else low <= value) and value <= high):
        bracket = "(" if low_open else "["
        raise ConfigurationError(
            f"{name}={value!r}: the {what} must be a number of seconds in {bracket}{low:g}, {high:g}]"
        )
    return float(value)


def _count(value: Any, name: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigurationError(
                f"{name}={value!r}: the number of probes is not a whole number"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise ConfigurationError(f"{name}={value!r}: the number of consecutive probes must be in [1, 100]")
    return value


def _https_url(value: str, name: str, what: str) -> str:
    url = value.strip().rstrip("/")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError:
        raise ConfigurationError(f"{name}: {what} {url!r} has a bad port") from None
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        raise ConfigurationError(f"{name}: {what} {url!r} must be an https URL without query")
    return url


def _gateway_urls(value: Sequence[str] | str, name: str) -> tuple[str, ...]:
    raw = [u for u in re.split(r"[\s,]+", value) if u] if isinstance(value, str) else list(value)
    urls: list[str] = []
    for url in raw:
        if not isinstance(url, str):
            raise ConfigurationError(f"{name}: gateway URL {url!r} is not a string")
        checked = _https_url(url, name, "gateway URL")
        if checked not in urls:
            urls.append(checked)
    return tuple(urls)


def _header(value: str, name: str) -> str:
    from .._settings import check_header_name

    try:
        return check_header_name(value.strip())
    except ConfigurationError as exc:
        raise ConfigurationError(f"{name}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class RotationConfig:
    """The settings of a rotation (everything but the secret and the credential).

    ``gateway_urls``: every gateway URL to probe (regional and self-hosted gateways; units behind one
    hostname cannot be addressed). ``propagation_timeout``: seconds to wait for them to accept a
    regenerated key. ``apim_subscription_id``: the APIM subscription's ARM id (``None``: the secret's
    ``ProviderAddress`` tag). ``vault_url``: the only vault an event may name (``None``: the event's).
    ``probe_successes`` / ``probe_interval``: the probe rule (that many consecutive 2xx per URL, that many
    seconds apart). ``revoke_wait``: see :func:`apimvault.rotation.revoke_current`. ``token_scope``: for a
    gateway that validates an Entra token as well as the key (key-plus-token mode), the API's scope
    (``api://<app-id>/.default``); the probe then sends ``Authorization: Bearer`` with a token the rotation's
    credential gets for it (``None``: the key alone).
    Build it with :meth:`from_env`; the constructor validates too (naming the field).
    """

    gateway_urls: tuple[str, ...] = ()
    arm_endpoint: str = DEFAULT_ARM_ENDPOINT
    apim_subscription_id: str | None = None
    propagation_timeout: float = DEFAULT_PROPAGATION_TIMEOUT
    header_name: str = "Ocp-Apim-Subscription-Key"
    vault_url: str | None = None
    probe_successes: int = DEFAULT_PROBE_SUCCESSES
    probe_interval: float = DEFAULT_PROBE_INTERVAL
    revoke_wait: float = DEFAULT_REVOKE_WAIT
    token_scope: str | None = None

    def __post_init__(self) -> None:
        self._check(
            {f.name: f.name for f in dataclasses.fields(self)},
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
        )

    def _check(self, names: Mapping[str, str], values: Mapping[str, Any]) -> None:
        set_ = object.__setattr__
        if "gateway_urls" in values:
            set_(self, "gateway_urls", _gateway_urls(values["gateway_urls"], names["gateway_urls"]))
        if "arm_endpoint" in values:
            set_(
                self,
                "arm_endpoint",
                _https_url(str(values["arm_endpoint"]), names["arm_endpoint"], "ARM endpoint"),
            )
        if "propagation_timeout" in values:
            set_(
                self,
                "propagation_timeout",
                _seconds(
                    values["propagation_timeout"],
                    names["propagation_timeout"],
                    "propagation timeout",
                    low=0,
                    high=MAX_PROPAGATION_TIMEOUT,
                ),
            )
        if "probe_successes" in values:
            set_(self, "probe_successes", _count(values["probe_successes"], names["probe_successes"]))
        for field, what, high in (
            ("probe_interval", "probe interval", 600.0),
            ("revoke_wait", "revocation wait", MAX_PROPAGATION_TIMEOUT),
        ):
            if field in values:
                set_(
                    self, field, _seconds(values[field], names[field], what, low=0, high=high, low_open=False)
                )
        if "header_name" in values:
            set_(self, "header_name", _header(str(values["header_name"]), names["header_name"]))
        sub = values.get("apim_subscription_id")
        if sub is not None:
            from .ref import parse_apim_subscription_id

            try:
                set_(self, "apim_subscription_id", parse_apim_subscription_id(sub).resource_id)
            except ConfigurationError as exc:
                raise ConfigurationError(f"{names['apim_subscription_id']}: {exc}") from None
        scope = values.get("token_scope")
        if scope is not None:
            from .._entra import check_scope

            try:
                set_(self, "token_scope", check_scope(scope))
            except ConfigurationError as exc:
                raise ConfigurationError(f"{names['token_scope']}: {exc}") from None
        vault = values.get("vault_url")
        if vault is not None:
            from .._validation import validate_vault_url

            try:
                set_(self, "vault_url", validate_vault_url(vault))
            except ConfigurationError as exc:
                raise ConfigurationError(f"{names['vault_url']}: {exc}") from None

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        require_gateways: bool = True,
        subscription_from_env: bool = True,
        **overrides: Any,
    ) -> RotationConfig:
        """The settings from the environment (``environ``, default ``os.environ``); ``overrides`` that are
        not ``None`` win (the CLI's flags, a caller's arguments).

        Variables: ``APIMVAULT_GATEWAY_URLS`` (space or comma separated; else ``AZURE_OPENAI_ENDPOINT``),
        ``APIMVAULT_ARM_ENDPOINT``, ``APIMVAULT_APIM_SUBSCRIPTION_ID``, ``APIMVAULT_PROPAGATION_TIMEOUT``,
        ``APIMVAULT_HEADER_NAME``, ``AZURE_KEYVAULT_URL``, ``APIMVAULT_PROBE_SUCCESSES``,
        ``APIMVAULT_PROBE_INTERVAL``, ``APIMVAULT_REVOKE_WAIT``, ``APIMVAULT_TOKEN_SCOPE``. Raises
        :class:`ConfigurationError` naming the variable for every bad value, and when no gateway URL is
        known (unless ``require_gateways`` is false). ``subscription_from_env=False`` leaves
        ``APIMVAULT_APIM_SUBSCRIPTION_ID`` unread (the library's functions take the subscription from their
        argument or the secret's tag only).
        """
        from .._settings import DEFAULT_HEADER, ENV_HEADER

        env = os.environ if environ is None else environ
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown rotation settings: {', '.join(sorted(unknown))}")

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        sources = {
            "gateway_urls": (ENV_GATEWAY_URLS, get(ENV_GATEWAY_URLS)),
            "arm_endpoint": (ENV_ARM_ENDPOINT, get(ENV_ARM_ENDPOINT)),
            "apim_subscription_id": (ENV_APIM_SUBSCRIPTION_ID, get(ENV_APIM_SUBSCRIPTION_ID)),
            "propagation_timeout": (ENV_PROPAGATION_TIMEOUT, get(ENV_PROPAGATION_TIMEOUT)),
            "header_name": (ENV_HEADER, get(ENV_HEADER)),
            "vault_url": (ENV_VAULT_URL, get(ENV_VAULT_URL)),
            "probe_successes": (ENV_PROBE_SUCCESSES, get(ENV_PROBE_SUCCESSES)),
            "probe_interval": (ENV_PROBE_INTERVAL, get(ENV_PROBE_INTERVAL)),
            "revoke_wait": (ENV_REVOKE_WAIT, get(ENV_REVOKE_WAIT)),
            "token_scope": (ENV_TOKEN_SCOPE, get(ENV_TOKEN_SCOPE)),
        }
        if not subscription_from_env:
            sources["apim_subscription_id"] = (ENV_APIM_SUBSCRIPTION_ID, None)
        if sources["gateway_urls"][1] is None and get(ENV_OPENAI_ENDPOINT):
            sources["gateway_urls"] = (ENV_OPENAI_ENDPOINT, get(ENV_OPENAI_ENDPOINT))
        names: dict[str, str] = {}
        values: dict[str, Any] = {}
        for field, (variable, raw) in sources.items():
            given = overrides.get(field)
            if given is not None and given != ():
                names[field], values[field] = field, given
            elif raw is not None:
                names[field], values[field] = variable, raw
        config = cls.__new__(cls)
        defaults = {
            "gateway_urls": (),
            "arm_endpoint": DEFAULT_ARM_ENDPOINT,
            "apim_subscription_id": None,
            "propagation_timeout": DEFAULT_PROPAGATION_TIMEOUT,
            "header_name": DEFAULT_HEADER,
            "vault_url": None,
            "probe_successes": DEFAULT_PROBE_SUCCESSES,
            "probe_interval": DEFAULT_PROBE_INTERVAL,
            "revoke_wait": DEFAULT_REVOKE_WAIT,
            "token_scope": None,
        }
        for field, default in defaults.items():
            object.__setattr__(config, field, default)
        config._check(names, values)
        if require_gateways:
            config.require_gateways()
        return config

    def require_gateways(self) -> None:
        """Raise :class:`ConfigurationError` (naming the variables) when no gateway URL is configured."""
        if not self.gateway_urls:
            raise ConfigurationError(
                "a rotation waits until the APIM gateway accepts the new key before storing it: set "
                f"{ENV_GATEWAY_URLS} (every gateway URL: the service's and each region's / self-hosted "
                "gateway's, e.g. 'https://<apim>.azure-api.net https://<apim>-westeurope-01.regional."
                f"azure-api.net') or {ENV_OPENAI_ENDPOINT}, or pass gateway_urls"
            )

    def replace(self, **changes: Any) -> RotationConfig:
        """A copy with ``changes`` that are not ``None`` applied (and validated)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
