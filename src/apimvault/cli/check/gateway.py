"""``apimvault check``'s gateway probe: APIM accepts the key (and the Entra token, with
``APIMVAULT_TOKEN_SCOPE``), shown by a 1-token chat through the core's client."""

from __future__ import annotations

import time
from typing import Any

from ..config import env_var
from ..output import (
    EXIT_APIM_UNREACHABLE,
    EXIT_KEY_REJECTED,
    EXIT_OK,
    EXIT_REQUEST_FAILED,
)
from .run import CheckRun, Step
from .tokens import describe_token_refusal

__all__ = ["apim_step"]


def apim_step(check: CheckRun) -> int:
    """APIM accepts the key (and the token, with ``APIMVAULT_TOKEN_SCOPE``): a 1-token chat."""
    import openai

    from ... import create_azure_openai

    record, report, key = check.record, check.report, check.key
    endpoint, deployment, token_scope = check.endpoint, check.deployment, check.token_scope
    client = create_azure_openai(
        check.provider, azure_endpoint=endpoint, max_retries=0, timeout=20, token_scope=token_scope
    )
    started = time.perf_counter()
    try:
        client.chat.completions.create(
            model=deployment, messages=[{"role": "user", "content": "ping"}], max_tokens=1
        )
    except openai.AuthenticationError as exc:
        if token_scope and (refused := describe_token_refusal(exc)):
            record(Step("apim", False, refused))
            return EXIT_KEY_REJECTED
        record(
            Step(
                "apim",
                False,
                f"APIM rejected the key (401, revoked key?): version {key.version} "
                f"fingerprint {key.fingerprint} "
                f"is not a valid key of an active subscription: {_api_message(exc).rstrip('.')}. The key was "
                "regenerated without updating the vault: store the current key, or run `apimvault rotate`",
            )
        )
        return EXIT_KEY_REJECTED
    except openai.PermissionDeniedError as exc:
        record(
            Step(
                "apim", False, f"APIM refused the request (403; subscription suspended?): {_api_message(exc)}"
            )
        )
        return EXIT_KEY_REJECTED
    except openai.RateLimitError as exc:
        record(Step("apim", True, f"key accepted (APIM throttled the probe: {_api_message(exc)})"))
        return EXIT_OK
    except openai.APIConnectionError as exc:
        record(Step("apim", False, f"APIM gateway {endpoint} unreachable: {type(exc).__name__}: {exc}"))
        return EXIT_APIM_UNREACHABLE
    except openai.APIStatusError as exc:
        if exc.status_code >= 500:
            record(Step("apim", False, f"APIM/Azure OpenAI answered {exc.status_code}: {_api_message(exc)}"))
            return EXIT_APIM_UNREACHABLE
        record(
            Step(
                "apim",
                False,
                f"key accepted, but the request failed ({exc.status_code}): {_api_message(exc)} "
                f"(deployment {deployment!r}, OPENAI_API_VERSION {env_var('OPENAI_API_VERSION')})",
            )
        )
        return EXIT_REQUEST_FAILED
    finally:
        client.close()
    ms = (time.perf_counter() - started) * 1000
    report["apim"] = {"endpoint": endpoint, "deployment": deployment, "latency_ms": round(ms, 1)}
    what = "key and token accepted" if token_scope else "key accepted"
    record(Step("apim", True, f"{what} by {endpoint} (1-token chat on {deployment}, {ms:.0f} ms)"))
    return EXIT_OK


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        message = body.get("message") or (body.get("error") or {}).get("message")
        if isinstance(message, str):
            return message
    return str(getattr(exc, "message", exc))
