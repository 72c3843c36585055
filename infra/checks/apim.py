"""API Management checks: the service's TLS and diagnostics, key-masked logging, token limits.

Each ``check_*`` takes parsed templates (:mod:`infra.checks.bicep`) and returns its findings (strings); an
empty list means compliant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .alerts import expand
from .bicep import (
    APIM,
    APIM_API,
    APIM_SUBSCRIPTION,
    INFRA,
    WEAK_PROTOCOLS,
    Template,
    accessor_of,
    config_of,
    diagnostics_problems,
    is_false,
    is_true,
    res_props,
    strip_quotes,
)

# --------------------------------------------------------------------------------------------------- APIM


def check_apim(templates: Iterable[Template]) -> list[str]:
    """TLS 1.0/1.1 and SSL 3.0 off on both sides, a minimum management API version, diagnostics; APIs require
    a subscription with the Ocp-Apim-Subscription-Key header; subscriptions are product-scoped with tracing
    explicitly off."""
    problems: list[str] = []
    for t in templates:
        for symbol, res in t.of_type(APIM):
            where = f"{t.name}:{symbol}"
            p = res_props(res)
            for guard, custom in custom_property_branches(t, p.get("customProperties")):
                for setting in WEAK_PROTOCOLS:
                    if not is_false(custom.get(setting)):
                        problems.append(f"{where}: {setting.rsplit('.', 2)[-2:]} not explicitly disabled")
                ciphers = sorted(k for k in custom if ".Security.Ciphers." in k)
                if ciphers and not _excludes_v2_tiers(t, guard):
                    problems.append(
                        f"{where}: cipher settings {ciphers} also sent to v2 tiers, which do not support "
                        "changes to the default cipher configuration"
                    )
            if not (p.get("apiVersionConstraint") or {}).get("minApiVersion"):
                problems.append(f"{where}: no apiVersionConstraint.minApiVersion")
            problems += diagnostics_problems(t, symbol, where, need_logs=True)
        for symbol, res in t.of_type(APIM_API):
            where = f"{t.name}:{symbol}"
            p = res_props(res)
            if not is_true(p.get("subscriptionRequired")):
                problems.append(f"{where}: subscriptionRequired is not true")
            header = (p.get("subscriptionKeyParameterNames") or {}).get("header")
            if header != "Ocp-Apim-Subscription-Key":
                problems.append(f"{where}: subscription key header is {header!r}")
        for symbol, res in t.of_type(APIM_SUBSCRIPTION):
            where = f"{t.name}:{symbol}"
            p = res_props(res)
            if p.get("allowTracing") is not False:
                problems.append(f"{where}: allowTracing is not explicitly false")
            scope = accessor_of(p.get("scope"))
            scope_text = t.resolve(p.get("scope"))
            scoped_to_product = (
                scope and t.resource_type_of(scope[0]) == "Microsoft.ApiManagement/service/products"
            ) or (isinstance(scope_text, str) and "/products/" in scope_text)
            if not scoped_to_product:
                problems.append(f"{where}: not scoped to a product")
            name = t.resolve(config_of(res).get("name"))
            if isinstance(name, str) and name.lower() == "master":
                problems.append(f"{where}: uses the built-in all-access 'master' subscription")
    return problems


V2_TIERS = {"BasicV2", "StandardV2", "PremiumV2"}


def custom_property_branches(t: Template, value: Any, guard: Any = None) -> list[tuple[Any, dict[str, Any]]]:
    """Every object an APIM customProperties expression can evaluate to (through variables, conditionals and
    union()), each with the condition that selects it (None: unconditional; ("not", c) for a false branch)."""
    value = t.resolve(value)
    if isinstance(value, dict):
        op = value.get("operator") or {}
        fn = value.get("function") or {}
        if op.get("type") == "conditional":
            ops = op.get("operands") or {}
            cond = ops.get("condition")
            return custom_property_branches(t, ops.get("true_value"), cond) + custom_property_branches(
                t, ops.get("false_value"), ("not", cond)
            )
        if fn.get("type") == "union":
            merged: dict[str, Any] = {}
            for arg in (fn.get("parameters") or {}).values():
                for _, part in custom_property_branches(t, arg):
                    merged.update(part)
            return [(guard, merged)]
        if not op and not fn:
            return [(guard, {strip_quotes(k): t.resolve(v) for k, v in value.items()})]
    return [(guard, {})]


def _excludes_v2_tiers(t: Template, guard: Any) -> bool:
    """True if ``guard`` is (a variable holding) ``!contains([...all v2 tiers...], <sku parameter>)``."""
    if guard is None or isinstance(guard, tuple):
        return False
    op = (t.resolve(guard) or {}).get("operator") if isinstance(t.resolve(guard), dict) else None
    if not op or op.get("type") != "not":
        return False
    fn = ((op.get("operands") or {}).get("bool_value") or {}).get("function") or {}
    params = fn.get("parameters") or {}
    container = params.get("container")
    return fn.get("type") == "contains" and isinstance(container, list) and set(container) >= V2_TIERS


# ------------------------------------------------------------------------------- APIM logging: key masked

APIM_LOGGER = "Microsoft.ApiManagement/service/loggers"
APIM_DIAGNOSTICS = (
    "Microsoft.ApiManagement/service/diagnostics",
    "Microsoft.ApiManagement/service/apis/diagnostics",
)
KEY_QUERY_PARAMETER = "subscription-key"
KEY_HEADER = "ocp-apim-subscription-key"
MASK_MODES = {"Hide", "Mask"}


def _masks(entities: Any, name: str) -> bool:
    return isinstance(entities, list) and any(
        isinstance(e, dict) and str(e.get("value", "")).lower() == name and e.get("mode") in MASK_MODES
        for e in entities
    )


def check_apim_logging(templates: Iterable[Template]) -> list[str]:
    """Every APIM diagnostic (service-wide and per API, i.e. every logger's) masks the subscription key where
    a request carries it: dataMasking on frontend.request and backend.request with the subscription-key query
    parameter and the Ocp-Apim-Subscription-Key header, mode Hide or Mask. Every logger declared is used by
    such a diagnostic."""
    problems: list[str] = []
    used_loggers: set[str] = set()
    loggers: list[tuple[str, str]] = []
    for t in templates:
        loggers += [(t.name, symbol) for symbol, _ in t.of_type(APIM_LOGGER)]
        for rtype in APIM_DIAGNOSTICS:
            for symbol, res in t.of_type(rtype):
                where = f"{t.name}:{symbol}"
                p = expand(t, res_props(res))
                logger = accessor_of(p.get("loggerId"))
                if logger and logger[1] == "id":
                    used_loggers.add(f"{t.name}:{logger[0]}")
                for side in ("frontend", "backend"):
                    request = (
                        ((p.get(side) or {}).get("request") or {}) if isinstance(p.get(side), dict) else {}
                    )
                    masking = request.get("dataMasking") if isinstance(request, dict) else None
                    masking = masking if isinstance(masking, dict) else {}
                    if not _masks(masking.get("queryParams"), KEY_QUERY_PARAMETER):
                        problems.append(
                            f"{where}: {side}.request.dataMasking does not hide/mask query parameter "
                            f"{KEY_QUERY_PARAMETER}"
                        )
                    if not _masks(masking.get("headers"), KEY_HEADER):
                        problems.append(
                            f"{where}: {side}.request.dataMasking does not hide/mask header "
                            "Ocp-Apim-Subscription-Key"
                        )
    for name, symbol in loggers:
        if f"{name}:{symbol}" not in used_loggers:
            problems.append(f"{name}:{symbol}: logger without a diagnostic that masks the key")
    return problems


# ------------------------------------------------------------------------------------ token limits


TOKEN_LIMIT_POLICIES = ("azure-openai-token-limit", "llm-token-limit")


def policy_text(t: Template, res: dict[str, Any]) -> str | None:
    """The XML of an APIM policy resource: a literal value, or the file loadTextContent() names (relative
    to the template's folder under infra/)."""
    value = res_props(res).get("value")
    if isinstance(value, str):
        return value
    fn = (value or {}).get("function") if isinstance(value, dict) else None
    if fn and fn.get("type") == "load_text_content":
        path = (fn.get("parameters") or {}).get("file_path")
        if isinstance(path, str):
            file = INFRA / Path(t.name).parent / path
            return file.read_text() if file.is_file() else None
    return None


def _prompt_estimate_problems(templates: Iterable[Template]) -> list[str]:
    """estimate-prompt-tokens="true" only on an API imported from a specification (properties.format and
    value): APIM estimates prompt tokens from the API's prompt schema, which a hand-defined API lacks, so
    there the attribute promises a pre-check that never happens."""
    problems: list[str] = []
    for t in templates:
        for symbol, res in t.of_type("Microsoft.ApiManagement/service/apis/policies"):
            text = policy_text(t, res) or ""
            if not re.search(r'estimate-prompt-tokens\s*=\s*"true"', text):
                continue
            if not any(tag in text for tag in TOKEN_LIMIT_POLICIES):
                continue
            api = t.resources.get(str(config_of(res).get("parent")))
            api_props = res_props(api) if api else {}
            if not (api_props.get("format") and api_props.get("value")):
                problems.append(
                    f'{t.name}:{symbol}: estimate-prompt-tokens="true" on an API without an imported '
                    "specification (no prompt schema to estimate from)"
                )
    return problems


def check_token_limits(templates: Iterable[Template]) -> list[str]:
    """The APIM named value the token-limit policy reads is set from a bounded parameter with a default, the
    API's Application Insights diagnostic has custom metrics on (the token-metric policy needs it), and
    prompt-token estimation is asked for only where the API has a prompt schema."""
    templates = list(templates)
    problems: list[str] = []
    named = metrics = False
    for t in templates:
        for symbol, res in t.of_type("Microsoft.ApiManagement/service/namedValues"):
            p = res_props(res)
            if config_of(res).get("name") != "apimvault-tokens-per-minute":
                continue
            named = True
            value = p.get("value")
            fn = value.get("function") if isinstance(value, dict) else None
            ref = ((fn or {}).get("parameters") or {}).get("value_to_convert")
            param = t.parameters.get(ref) if isinstance(ref, str) else None
            if (
                param is None
                or not isinstance(ref, str)
                or not isinstance(param.get("default"), int)
                or t.decorator(ref, "min_value") is None
            ):
                problems.append(
                    f"{t.name}:{symbol}: value is not string(<int param with default and @minValue>)"
                )
            if p.get("secret") is not False:
                problems.append(f"{t.name}:{symbol}: secret is not explicitly false")
        for _, res in t.of_type("Microsoft.ApiManagement/service/apis/diagnostics"):
            p = res_props(res)
            if p.get("metrics") is True and p.get("logClientIp") is False:
                metrics = True
    problems += _prompt_estimate_problems(templates)
    emits = any(
        "emit-token-metric" in (policy_text(t, res) or "")
        for t in templates
        for _, res in t.of_type("Microsoft.ApiManagement/service/apis/policies")
    )
    for t in templates:
        for symbol, res in t.of_type("Microsoft.Insights/components"):
            if emits and t.resolve(res_props(res).get("CustomMetricsOptedInType")) != "WithDimensions":
                problems.append(
                    f"{t.name}:{symbol}: CustomMetricsOptedInType is not 'WithDimensions' (the token "
                    "metrics' dimensions would be dropped)"
                )
    if not named:
        problems.append("no named value apimvault-tokens-per-minute for the azure-openai-token-limit policy")
    if not metrics:
        problems.append("no API diagnostic with metrics: true (and logClientIp: false) for the token metrics")
    return problems
