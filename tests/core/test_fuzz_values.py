"""Fuzzing what may become a header: ``validate_key_value`` and ``SubscriptionKey``. Every value is either
refused with ``InvalidSecretValueError`` (which never quotes it) or returned header-safe: 1..4096 visible
ASCII characters (inner spaces allowed), equal to the input minus surrounding spaces/tabs/CR/LF, and
accepted by httpx2 as a header value. Never another exception."""

from __future__ import annotations

import string
from datetime import timedelta

import httpx2
from hypothesis import example, given, settings
from hypothesis import strategies as st

from apimvault import InvalidSecretValueError, SubscriptionKey, fingerprint
from apimvault._key import MAX_KEY_LENGTH, validate_key_value

WS = " \t\r\n"
values = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=string.printable, max_size=80),
    st.text(alphabet=string.hexdigits, min_size=30, max_size=34).map(lambda k: f" \t{k}\r\n"),
    st.builds(
        lambda a, c, b: a + c + b,
        st.text(string.hexdigits, max_size=8),
        st.characters(),
        st.text(string.hexdigits, max_size=8),
    ),
    st.integers(MAX_KEY_LENGTH - 2, MAX_KEY_LENGTH + 2).map(lambda n: "k" * n),
    st.none(),
)


@settings(max_examples=500, deadline=timedelta(milliseconds=200))
@given(values)
@example("abc\r\nX-Injected: 1")
@example("\x00")
@example("a" * 25 * 1024)
@example("\u00a0key\u00a0")
@example("key\u2028")
def test_validate_key_value(raw: str | None) -> None:
    try:
        value = validate_key_value(raw, secret="kv/secrets/s")
    except InvalidSecretValueError as exc:
        assert exc.permanent
        stripped = (raw or "").strip(WS)
        if len(stripped) >= 8:
            assert stripped not in str(exc)
        return
    assert raw is not None and value == raw.strip(WS)
    assert 1 <= len(value) <= MAX_KEY_LENGTH
    assert all(0x20 <= ord(c) <= 0x7E for c in value) and value[0] != " " and value[-1] != " "
    headers = httpx2.Headers({"Ocp-Apim-Subscription-Key": value})  # a header can really be built
    assert headers["Ocp-Apim-Subscription-Key"] == value
    request = httpx2.Request("GET", "https://127.0.0.1/", headers=headers)
    assert request.headers["ocp-apim-subscription-key"] == value


@settings(max_examples=200, deadline=timedelta(milliseconds=200))
@given(
    st.text(alphabet=string.ascii_letters + string.digits + "-_+/=", min_size=8, max_size=64),
    st.text(max_size=40),
    st.text(max_size=80),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
)
def test_subscription_key_never_shows_its_value(
    value: str, version: str, secret_id: str, tags: dict[str, str]
) -> None:
    key = SubscriptionKey.create(value, version=version, secret_id=secret_id, tags=tags)
    assert key.reveal() == value and key.fingerprint == fingerprint(value)
    for text in (repr(key), str(key), f"{key}", f"{key!r}"):
        # The text quotes the version; only check the value where the version cannot explain it.
        if value not in version and value not in repr(version):
            assert value not in text
    assert key == SubscriptionKey.create(value, version=version, secret_id="other")
    assert hash(key) == hash(SubscriptionKey.create(value, version=version, secret_id="other"))
