"""``apimvault check``'s first step: every variable set and valid before any network step."""

from __future__ import annotations

from collections.abc import Callable

from ...exceptions import ConfigurationError
from ..config import env_var, missing_variables, vault_url_variable
from ..output import EXIT_CONFIG
from .run import CheckRun, Step

__all__ = ["config_step"]


def config_step(check: CheckRun) -> int | None:
    """Every variable set and valid (an https gateway too) before any network step, all problems at once."""
    args = check.args
    vault_var = vault_url_variable()
    vault_url, secret_name = env_var(vault_var), env_var("APIMVAULT_SECRET_NAME")
    endpoint = args.endpoint or env_var("AZURE_OPENAI_ENDPOINT")
    deployment = args.deployment or env_var("APIMVAULT_DEPLOYMENT")
    missing = missing_variables(
        (
            (vault_var, vault_url),
            ("APIMVAULT_SECRET_NAME", secret_name),
            ("AZURE_OPENAI_ENDPOINT (or --endpoint)", endpoint),
            ("APIMVAULT_DEPLOYMENT (or --deployment)", deployment),
            ("OPENAI_API_VERSION", env_var("OPENAI_API_VERSION")),
        )
    )
    check.report["config"] = {
        "vault_url": vault_url,
        "secret_name": secret_name,
        "endpoint": endpoint,
        "deployment": deployment,
        "api_version": env_var("OPENAI_API_VERSION"),
    }
    if missing:
        check.record(Step("config", False, f"not set: {', '.join(missing)}"))
        return EXIT_CONFIG
    assert vault_url and secret_name and endpoint and deployment
    from ..._validation import validate_endpoint, validate_secret_name, validate_vault_url

    given_url: str = vault_url
    problems: list[str] = []
    checks: list[Callable[[], object]] = [
        lambda: validate_vault_url(given_url),
        lambda: validate_secret_name(secret_name),
        lambda: validate_endpoint(endpoint, allow_insecure_http=False),
    ]
    for validate in checks:
        try:
            validate()
        except ConfigurationError as exc:
            problems.append(str(exc))
    if problems:
        check.record(Step("config", False, "; ".join(problems)))
        return EXIT_CONFIG
    check.vault_url = validate_vault_url(vault_url)
    check.secret_name, check.endpoint, check.deployment = secret_name, endpoint, deployment
    check.record(
        Step(
            "config",
            True,
            f"secret {check.vault_url}/secrets/{secret_name}, APIM {endpoint}, deployment {deployment}",
        )
    )
    return None
