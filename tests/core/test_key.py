"""The key value type and what may become a header."""

from __future__ import annotations

import pickle

import pytest

from apimvault import InvalidSecretValueError, SubscriptionKey, fingerprint
from apimvault._key import validate_key_value

KEY = "0123456789abcdef0123456789abcdef"


def test_repr_and_str_never_show_the_value() -> None:
    k = SubscriptionKey.create(
        KEY, version="v" * 32, secret_id="https://v/secrets/s/x", tags={"CredentialId": "primary"}
    )
    for text in (repr(k), str(k), f"{k}", repr([k])):
        assert KEY not in text
        assert KEY[:8] not in text
        assert fingerprint(KEY) in text
    assert k.reveal() == KEY
    assert k.credential_id == "primary"


def test_key_cannot_be_pickled() -> None:
    k = SubscriptionKey.create(KEY, version="v", secret_id="x")
    with pytest.raises(TypeError):
        pickle.dumps(k)


def test_tags_are_read_only() -> None:
    k = SubscriptionKey.create(KEY, version="v", secret_id="x", tags={"a": "b"})
    with pytest.raises(TypeError):
        k.tags["a"] = "c"  # type: ignore[index]


@pytest.mark.parametrize("raw", [f"  {KEY}\n", f"{KEY}\r\n", f"\t{KEY}"])
def test_surrounding_whitespace_is_stripped(raw: str) -> None:
    assert validate_key_value(raw, secret="s") == KEY


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   \n",
        None,
        f"{KEY}\nInjected: yes",
        "ab\rcd",
        "ab\x00cd",
        "ab\x07cd",
        "ab\x7fcd",
        "clé-secrète",
        "x" * 4097,
    ],
)
def test_bad_values_are_refused_without_quoting_them(raw: str | None) -> None:
    with pytest.raises(InvalidSecretValueError) as info:
        validate_key_value(raw, secret="s")
    if raw and len(raw) > 4:
        assert raw.strip() not in str(info.value)
