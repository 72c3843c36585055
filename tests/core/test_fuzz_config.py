"""Fuzzing configuration inputs with hypothesis: vault URLs, secret names/versions, header names, CachePolicy
arguments and environment-variable configs. Every input either works or raises the documented
``ConfigurationError`` (``InsecureTransportError`` is one) — never another exception, never a hang."""

from __future__ import annotations

import math
import string
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from apimvault import CachePolicy, ConfigurationError, InsecureTransportError, SubscriptionKeyProvider
from apimvault._settings import ENV_HEADER, ENV_SECRET_NAME, ENV_SECRET_VERSION, ENV_VAULT_URL
from apimvault.local import temporary_environ

FAST = settings(
    max_examples=150, deadline=timedelta(milliseconds=1500), suppress_health_check=[HealthCheck.too_slow]
)


class _Credential:
    """Never asked for a token: construction does no I/O."""

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        raise AssertionError("no I/O expected while constructing a provider")


def _construct(vault_url: Any, name: Any, version: Any = None, header_name: Any = None, **kw: Any) -> None:
    kwargs: dict[str, Any] = {"version": version, "credential": _Credential(), **kw}
    if header_name is not None:
        kwargs["header_name"] = header_name
    try:
        provider = SubscriptionKeyProvider(vault_url, name, **kwargs)
    except ConfigurationError:
        return
    # Accepted: the normalised configuration is what the rules promise.
    assert provider.vault_url.lower().startswith("https://") or (
        kw.get("allow_insecure_http") and provider.vault_url.lower().startswith("http://")
    )
    assert "?" not in provider.vault_url and "#" not in provider.vault_url
    assert 1 <= len(provider.secret_name) <= 127
    assert provider.version is None or (
        len(provider.version) == 32 and provider.version == provider.version.lower()
    )
    provider.close()


hosts = st.one_of(
    st.sampled_from(["kv.vault.azure.net", "127.0.0.1", "[::1]", "localhost", "xn--bcher-kva.example", ""]),
    st.text(min_size=0, max_size=30),
)
urls = st.one_of(
    st.builds(
        lambda scheme, host, port, path: f"{scheme}{host}{port}{path}",
        st.sampled_from(["https://", "http://", "HTTPS://", "ftp://", "", "https:/", "//"]),
        hosts,
        st.sampled_from(["", ":443", ":0", ":65535", ":99999", ":-1", ":abc", ":"]),
        st.sampled_from(["", "/", "/secrets/x", "?a=1", "#frag", "/?", "  "]),
    ),
    st.text(max_size=60),
    st.none(),
    st.integers(),
)
names = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=0, max_size=140),
    st.text(max_size=40),
    st.none(),
)
versions = st.one_of(
    st.none(),
    st.just(""),
    st.text(alphabet="0123456789abcdefABCDEF", min_size=30, max_size=34),
    st.text(max_size=40),
    st.integers(),
)


@FAST
@given(urls, names, versions, st.booleans())
@example("https://kv.vault.azure.net", "apim-key", "0" * 32, False)
@example("http://127.0.0.1:1", "s", None, False)
@example("https://[::1", "s", None, False)
def test_provider_configuration(vault_url: Any, name: Any, version: Any, insecure: bool) -> None:
    _construct(vault_url, name, version, allow_insecure_http=insecure)


@FAST
@given(st.one_of(st.text(max_size=40), st.none(), st.integers(), st.binary(max_size=10)))
@example("Ocp-Apim-Subscription-Key")
@example("api-key")
@example("X-Key\r\nInjected: 1")
def test_header_name(header_name: Any) -> None:
    _construct("https://kv.vault.azure.net", "s", header_name=header_name if header_name is not None else "")


@pytest.mark.parametrize(
    "url", ["https://kv.vault.azure.net/?", "https://kv.vault.azure.net#", "https://kv.vault.azure.net?#"]
)
def test_empty_query_or_fragment_marker_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        SubscriptionKeyProvider(url, "s", credential=_Credential())


def test_http_vault_is_an_insecure_transport_error() -> None:
    with pytest.raises(InsecureTransportError):
        SubscriptionKeyProvider("http://kv.example", "s", credential=_Credential())


durations = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.builds(timedelta, seconds=st.floats(min_value=-1e6, max_value=1e6)),
    st.booleans(),
    st.text(max_size=5),
    st.none(),
)
fractions = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 3),
    st.booleans(),
    st.text(max_size=5),
    st.none(),
)


@settings(max_examples=300, deadline=timedelta(milliseconds=500))
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "ttl": durations,
            "jitter": fractions,
            "refresh_margin": durations,
            "max_staleness": durations,
            "backoff_initial": durations,
            "backoff_max": durations,
            "backoff_multiplier": st.one_of(
                fractions,
                st.floats(min_value=1000),  # huge finite multipliers, up to the largest float
                st.integers(-3, 10**400),  # ints beyond the float range
            ),
            "retry_after_max": durations,
            "forced_refresh_interval": durations,
        },
    )
)
def test_cache_policy_arguments(kwargs: dict[str, Any]) -> None:
    try:
        policy = CachePolicy(**kwargs)
    except ConfigurationError:
        return
    assert policy.ttl > 0 and math.isfinite(policy.ttl)
    assert 0 <= policy.jitter <= 0.5
    assert 0 <= policy.margin <= policy.ttl / 2
    assert policy.max_staleness >= 0
    import random

    rng = random.Random(0)
    assert 0 < policy.jittered_ttl(rng) <= policy.ttl
    for failures in (1, 2, 10, 10**6):
        delay = policy.backoff(failures, rng, retry_after=rng.choice([None, 0, 5, 1e9]))
        assert delay >= 0 and math.isfinite(delay)


@pytest.mark.parametrize("field", ["jitter", "backoff_multiplier"])
@pytest.mark.parametrize("value", ["", "0.1", None])
def test_non_numeric_fractions_are_a_configuration_error(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError):
        CachePolicy(**{field: value})


def test_huge_backoff_multiplier_never_overflows() -> None:
    import random

    policy = CachePolicy(backoff_multiplier=65536.0)
    assert policy.backoff(65, random.Random(0)) <= float(policy.backoff_max)


env_text = st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=60)


@FAST
@given(
    st.fixed_dictionaries(
        {},
        optional={
            ENV_VAULT_URL: st.one_of(env_text, urls.filter(lambda u: isinstance(u, str) and "\x00" not in u)),
            ENV_SECRET_NAME: st.one_of(
                env_text, names.filter(lambda n: isinstance(n, str) and "\x00" not in n)
            ),
            ENV_SECRET_VERSION: st.one_of(
                env_text, versions.filter(lambda v: isinstance(v, str) and "\x00" not in v)
            ),
            ENV_HEADER: env_text,
        },
    )
)
def test_from_env_with_arbitrary_environment(env: dict[str, str]) -> None:
    values: dict[str, str | None] = {
        k: None for k in (ENV_VAULT_URL, ENV_SECRET_NAME, ENV_SECRET_VERSION, ENV_HEADER)
    }
    values.update(env)
    with temporary_environ(values):
        try:
            provider = SubscriptionKeyProvider.from_env(credential=_Credential())
        except ConfigurationError:
            return
    assert provider.vault_url.lower().startswith("https://")
    provider.close()
