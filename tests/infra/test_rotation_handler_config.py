"""The rotation function reads its settings once, through ``RotationConfig.from_env``: a bad value is a
``ConfigurationError`` naming the variable, raised before any lease or Azure call (issue 19.6/19.9)."""

from __future__ import annotations

from types import ModuleType

import pytest

from apimvault import ConfigurationError
from tests._support.events import near_expiry_event

SECRET = "apim-subscription-key"


@pytest.mark.parametrize(
    ("variable", "value"),
    [("APIMVAULT_PROPAGATION_TIMEOUT", "abc"), ("APIMVAULT_PROBE_SUCCESSES", "-3")],
)
def test_a_bad_setting_is_named_before_anything_runs(
    handler: ModuleType, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv("APIMVAULT_SECRET_NAME", SECRET)
    monkeypatch.setenv("APIMVAULT_GATEWAY_URLS", "https://gw.example")
    monkeypatch.setenv(variable, value)
    event = near_expiry_event(
        vault_url="https://kv-apimvault-local.vault.azure.net",
        secret=SECRET,
        version="0f1e2d3c4b5a69788796a5b4c3d2e1f0",
    )

    class NoLease:  # acquiring it would mean the settings were read too late
        def acquire(self) -> None:
            raise AssertionError("the lease was taken before the settings were checked")

        def release(self) -> None:  # pragma: no cover - never acquired
            pass

    with pytest.raises(ConfigurationError, match=variable):
        handler.handle_event(event, lease=NoLease())
