"""OpenTelemetry for apimvault (placeholder; filled in by part 1 of issue 14)."""

from __future__ import annotations


def refusal_counted(provider: object, name: str) -> None:
    return None


def resend_event(kind: str) -> None:
    return None
