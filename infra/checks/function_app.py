"""Function app checks: the rotation function's plan, scale and settings, and its egress.

Each ``check_*`` takes parsed templates (:mod:`infra.checks.bicep`) and returns its findings (strings); an
empty list means compliant.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .bicep import Template, accessor_of, config_of, res_props

# ------------------------------------------------------------------------------------ the function app

FUNCTION_APP = "Microsoft.Web/sites"
# Flex Consumption maximumInstanceCount: 40 is the lowest value every region accepts (lower ones only in some
# regions in preview: azure-functions-host#10523), 1000 the highest (Learn: Flex Consumption plan).
FLEX_INSTANCES_MIN = 40
FLEX_INSTANCES_MAX = 1000


def _max_value(t: Template, value: Any) -> int | None:
    """An int literal, or the largest value a parameter can take (its @maxValue, else None = unbounded)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value in t.parameters:
        ceiling = t.decorator(value, "max_value")
        return ceiling if isinstance(ceiling, int) else None
    return None


def _min_value(t: Template, value: Any) -> int | None:
    """An int literal, or the smallest value a parameter can take (its @minValue, else None = unbounded)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value in t.parameters:
        floor = t.decorator(value, "min_value")
        return floor if isinstance(floor, int) else None
    return None


def check_function_apps(templates: Iterable[Template]) -> list[str]:
    """Flex Consumption function apps: no cors block (unsupported there), an instance cap every region
    accepts (FLEX_INSTANCES_MIN..FLEX_INSTANCES_MAX, a parameter's whole @minValue..@maxValue range and its
    default included; overlapping runs are serialised by the rotation lease, not by the cap), one invocation
    per instance (HTTP trigger concurrency 1 and a one-thread Python pool), and the app deployed after its
    storage's private endpoint."""
    problems: list[str] = []
    for t in templates:
        for symbol, res in t.of_type(FUNCTION_APP):
            where = f"{t.name}:{symbol}"
            p = res_props(res)
            site = p.get("siteConfig") or {}
            if "cors" in site:
                problems.append(f"{where}: siteConfig.cors is not supported on Flex Consumption")
            scale = (p.get("functionAppConfig") or {}).get("scaleAndConcurrency") or {}
            cap = scale.get("maximumInstanceCount")
            least, most = _min_value(t, cap), _max_value(t, cap)
            if least is None or least < FLEX_INSTANCES_MIN or most is None or most > FLEX_INSTANCES_MAX:
                problems.append(
                    f"{where}: maximumInstanceCount can be {least!r}..{most!r}, outside the range every "
                    f"region accepts ({FLEX_INSTANCES_MIN}..{FLEX_INSTANCES_MAX})"
                )
            default = t.parameters.get(cap, {}).get("default") if isinstance(cap, str) else None
            if isinstance(default, int) and not FLEX_INSTANCES_MIN <= default <= FLEX_INSTANCES_MAX:
                problems.append(f"{where}: maximumInstanceCount defaults to {default}")
            per_instance = ((scale.get("triggers") or {}).get("http") or {}).get("perInstanceConcurrency")
            if per_instance != 1:
                problems.append(f"{where}: triggers.http.perInstanceConcurrency is {per_instance!r}, not 1")
            settings = {
                s.get("name"): s.get("value") for s in site.get("appSettings") or [] if isinstance(s, dict)
            }
            if settings.get("PYTHON_THREADPOOL_THREAD_COUNT") != "1":
                problems.append(f"{where}: PYTHON_THREADPOOL_THREAD_COUNT is not '1'")
            depends = config_of(res).get("dependsOn") or []
            blob_endpoints = {
                name
                for name, mod in t.modules.items()
                if ((mod.get("config") or {}).get("params") or {}).get("groupId") == "blob"
            }
            if not blob_endpoints & set(depends):
                problems.append(f"{where}: does not depend on the storage account's blob private endpoint")
    return problems


# ---------------------------------------------------------------------------------- function egress

SUBNET_DELEGATION_FUNCTIONS = "Microsoft.App/environments"
NAT_GATEWAY = "Microsoft.Network/natGateways"


def check_function_egress(templates: Iterable[Template]) -> list[str]:
    """The Flex Consumption integration subnet (delegated to Microsoft.App/environments) has explicit egress:
    a NAT gateway of the same file attached, and defaultOutboundAccess false (no reliance on the implicit
    outbound access Microsoft is retiring)."""
    problems: list[str] = []
    for t in templates:
        nat_symbols = {symbol for symbol, _ in t.of_type(NAT_GATEWAY)}
        for symbol, res in t.of_type("Microsoft.Network/virtualNetworks"):
            for subnet in res_props(res).get("subnets") or []:
                if not isinstance(subnet, dict):
                    continue
                sp = subnet.get("properties") or {}
                delegations = json.dumps(sp.get("delegations") or [])
                if SUBNET_DELEGATION_FUNCTIONS not in delegations:
                    continue
                where = f"{t.name}:{symbol}/{t.resolve(subnet.get('name'))}"
                nat = (
                    accessor_of((sp.get("natGateway") or {}).get("id"))
                    if isinstance(sp.get("natGateway"), dict)
                    else None
                )
                if not nat or nat[0] not in nat_symbols or nat[1] != "id":
                    problems.append(f"{where}: function subnet without a NAT gateway (egress left implicit)")
                if sp.get("defaultOutboundAccess") is not False:
                    problems.append(f"{where}: defaultOutboundAccess is not false")
    return problems
