"""``apimvault chat``: one streamed chat completion through the core's client."""

from __future__ import annotations

import argparse
import time

from ..exceptions import (
    ConfigurationError,
)
from .config import env_var, require, vault_url_variable
from .output import (
    EXIT_OK,
    Output,
    fail,
    request_failure,
)

# ---------------------------------------------------------------------------------------------- chat


def cmd_chat(args: argparse.Namespace, out: Output) -> int:
    deployment = args.deployment or env_var("APIMVAULT_DEPLOYMENT")
    vault_var = vault_url_variable()
    try:
        require(
            (
                (vault_var, env_var(vault_var)),
                ("APIMVAULT_SECRET_NAME", env_var("APIMVAULT_SECRET_NAME")),
                ("AZURE_OPENAI_ENDPOINT", env_var("AZURE_OPENAI_ENDPOINT")),
                ("OPENAI_API_VERSION", env_var("OPENAI_API_VERSION")),
                ("APIMVAULT_DEPLOYMENT (or --deployment)", deployment),
            )
        )
    except ConfigurationError as exc:
        return fail(out, exc)
    assert deployment
    try:
        from .. import SubscriptionKeyProvider, create_azure_openai

        with SubscriptionKeyProvider.from_env() as provider:
            key = provider.get_key()
            client = create_azure_openai(provider, max_retries=args.retries, timeout=args.timeout)
            started = time.perf_counter()
            parts: list[str] = []
            finish_reason = None
            try:
                stream = client.chat.completions.create(
                    model=deployment, messages=[{"role": "user", "content": args.prompt}], stream=True
                )
                with stream:
                    for chunk in stream:
                        for choice in chunk.choices:
                            text = choice.delta.content or ""
                            if text:
                                parts.append(text)
                                if not out.json:
                                    out.write(text)
                            finish_reason = choice.finish_reason or finish_reason
            finally:
                client.close()
            ms = (time.perf_counter() - started) * 1000
            used = provider.current() or key
    except Exception as exc:
        if not out.json:
            out.stdout.write("\n")
        return fail(out, exc, {"deployment": deployment}, message=request_failure(exc, deployment))
    if not out.json:
        out.stdout.write("\n")
        print(
            f"[{deployment}, key version {used.version} fingerprint {used.fingerprint}, {ms:.0f} ms]",
            file=out.stderr,
            flush=True,
        )
    out.document(
        {
            "ok": True,
            "deployment": deployment,
            "content": "".join(parts),
            "finish_reason": finish_reason,
            "key_version": used.version,
            "fingerprint": used.fingerprint,
            "latency_ms": round(ms, 1),
        }
    )
    return EXIT_OK
