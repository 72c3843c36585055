"""Alert checks: action groups, the required metric alerts, expiry alerts and their receivers.

Each ``check_*`` takes parsed templates (:mod:`infra.checks.bicep`) and returns its findings (strings); an
empty list means compliant.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from typing import Any

from .bicep import Template, accessor_of, dotted, loop_items, res_props

# ---------------------------------------------------------------------------------------------- alerts

ACTION_GROUP = "Microsoft.Insights/actionGroups"
METRIC_ALERT = "Microsoft.Insights/metricAlerts"
SCHEDULED_QUERY = "Microsoft.Insights/scheduledQueryRules"
REQUIRED_METRIC_ALERTS = {
    ("Microsoft.EventGrid/systemTopics", "DeadLetteredCount"): "a dead-lettered rotation event",
    ("Microsoft.EventGrid/systemTopics", "DeliveryAttemptFailCount"): "Event Grid delivery failures",
    ("microsoft.insights/components", "requests/failed"): "rotation function errors",
}
FUNCTION_ROLE_DIMENSION = "cloud/roleName"


def expand(t: Template, value: Any, _depth: int = 0) -> Any:
    """``value`` with every variable reference replaced by the variable's value, recursively."""
    if _depth > 10:
        return value
    if isinstance(value, str) and value in t.variables:
        return expand(t, t.variables[value].get("value"), _depth + 1)
    if isinstance(value, dict):
        return {k: expand(t, v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(t, v, _depth + 1) for v in value]
    return value


def _receivers_guaranteed(t: Template, receivers: Any) -> bool:
    """A non-empty literal list, or a loop over a required parameter (no default) with @minLength >= 1."""
    if isinstance(receivers, list):
        return bool(receivers)
    if isinstance(receivers, dict) and "loop_type" in receivers:
        array = ((receivers.get("loop_type") or {}).get("detail") or {}).get("array_name")
        if not isinstance(array, str) or array not in t.parameters:
            return False
        param = t.parameters[array]
        floor = t.decorator(array, "min_length")
        return param is not None and param.get("default") is None and isinstance(floor, int) and floor >= 1
    return False


def check_action_groups(templates: Iterable[Template]) -> list[str]:
    """Every action group created is unconditional and has at least one receiver for sure: some
    ``*Receivers`` list is a non-empty literal or a loop over a required parameter with @minLength(1), so a
    deployment without a receiver fails validation instead of creating alerts that reach nobody."""
    problems: list[str] = []
    for t in templates:
        for symbol, res in t.of_type(ACTION_GROUP):
            where = f"{t.name}:{symbol}"
            if (res.get("config") or {}).get("condition") is not None:
                problems.append(f"{where}: created only under a condition (alerts could reach nobody)")
            p = res_props(res)
            lists = {k: v for k, v in p.items() if k.endswith("Receivers")}
            if not any(_receivers_guaranteed(t, v) for v in lists.values()):
                problems.append(
                    f"{where}: no receiver guaranteed (needs a non-empty list or a loop over a required "
                    "parameter with @minLength(1))"
                )
    return problems


def _group_outputs(templates: list[Template]) -> dict[str, set[str]]:
    """File -> names of its outputs whose value is the id of an action group the file creates."""
    found: dict[str, set[str]] = {}
    for t in templates:
        groups = {symbol for symbol, _ in t.of_type(ACTION_GROUP)}
        for name, out in t.outputs.items():
            acc = accessor_of(t.resolve(out.get("value")))
            if acc and acc[0] in groups and acc[1] == "id":
                found.setdefault(t.name, set()).add(name)
    return found


def _param_is_created_group(t: Template, param: str, templates: list[Template]) -> bool:
    """Every module call of ``t`` (in any file) passes ``param`` a created action group's id output."""
    outputs = _group_outputs(templates)
    calls = [
        (caller, mod)
        for caller in templates
        for mod in caller.modules.values()
        if str(((mod.get("detail") or {}).get("path")) or "") == t.name
    ]
    if not calls:
        return False
    for caller, mod in calls:
        passed = dotted(((mod.get("config") or {}).get("params") or {}).get(param))
        parts = (passed or "").split(".")
        if len(parts) != 3 or parts[1] != "outputs" or parts[0] not in caller.modules:
            return False
        path = str(((caller.modules[parts[0]].get("detail") or {}).get("path")) or "")
        if parts[2] not in outputs.get(path, set()):
            return False
    return True


def _notifies_created_group(t: Template, actions: Any, templates: list[Template]) -> bool:
    """The (variable-expanded) actions reference the id of an action group created in the same file, or a
    parameter that every caller fills with such an id from the module that creates it."""
    text = json.dumps(expand(t, actions))
    if any(f'"operand_1": "{symbol}", "operand_2": "id"' in text for symbol, _ in t.of_type(ACTION_GROUP)):
        return True
    referenced = {p for p in t.parameters if f'"{p}"' in text}
    return any(_param_is_created_group(t, p, templates) for p in referenced)


def check_alerts(templates: Iterable[Template]) -> list[str]:
    """The alerts that make a silent stop of rotation (or a bad key) page someone: metric alerts for
    dead-lettered events, delivery failures and function errors (the latter only for the function's own
    cloud_RoleName), a scheduled query on the vault's audit logs for "near expiry and no new version
    written", and a scheduled query on the gateway's 401 rate; every alert notifies an action group created
    in the same file (whose receivers check_action_groups guarantees)."""
    problems: list[str] = []
    templates = list(templates)
    found: set[tuple[str, str]] = set()
    overdue = unauthorized = False
    overdue_severity: Any = None
    expiring: dict[int, Any] = {}  # days before the expiry -> severity
    for t in templates:
        for symbol, res in t.of_type(METRIC_ALERT):
            where = f"{t.name}:{symbol}"
            p = res_props(res)
            for criterion in (p.get("criteria") or {}).get("allOf") or []:
                key = (str(criterion.get("metricNamespace")), str(criterion.get("metricName")))
                found.add(key)
                if criterion.get("threshold") != 0 or criterion.get("operator") != "GreaterThan":
                    problems.append(f"{where}: must fire on the first occurrence (GreaterThan 0)")
                if key == ("microsoft.insights/components", "requests/failed"):
                    dims = [d for d in criterion.get("dimensions") or [] if isinstance(d, dict)]
                    role = [
                        d
                        for d in dims
                        if d.get("name") == FUNCTION_ROLE_DIMENSION
                        and d.get("operator") == "Include"
                        and isinstance(d.get("values"), list)
                        and d["values"]
                        and "*" not in d["values"]
                    ]
                    if not role:
                        problems.append(
                            f"{where}: requests/failed is not limited to the function's "
                            f"{FUNCTION_ROLE_DIMENSION}"
                        )
            if not _notifies_created_group(t, p.get("actions"), templates):
                problems.append(f"{where}: does not notify the action group created with receivers")
        for symbol, res in t.of_type(SCHEDULED_QUERY):
            where = f"{t.name}:{symbol}"
            p = res_props(res)
            criteria = (p.get("criteria") or {}).get("allOf") or []
            text = json.dumps([t.resolve(c.get("query")) for c in criteria if isinstance(c, dict)])
            if "SecretNearExpiryEventGridNotification" in text and "SecretSet" in text:
                overdue = True
                overdue_severity = p.get("severity")
                if p.get("autoMitigate") is not False:
                    problems.append(f"{where}: autoMitigate must be false (the alert stays until closed)")
                if "ago(overdue)" not in text:
                    problems.append(f"{where}: query has no overdue grace period")
                if p.get("skipQueryValidation") is not True:
                    problems.append(
                        f"{where}: skipQueryValidation is not true (AzureDiagnostics has no Key Vault "
                        "columns before the vault's first log: creating the rule would fail on a fresh "
                        "workspace)"
                    )
            if "ApiManagementGatewayLogs" in text and "ResponseCode == 401" in text:
                unauthorized = True
            for days, severity in _expiry_thresholds(t, res, criteria):
                expiring[days] = severity
                if p.get("autoMitigate") is not False or p.get("skipQueryValidation") is not True:
                    problems.append(
                        f"{where}: expiry alerts need autoMitigate false, skipQueryValidation true"
                    )
            if not _notifies_created_group(t, (p.get("actions") or {}).get("actionGroups"), templates):
                problems.append(f"{where}: does not notify the action group created with receivers")
    for key, what in REQUIRED_METRIC_ALERTS.items():
        if key not in found:
            problems.append(f"no metric alert for {what} ({key[0]} {key[1]})")
    if not overdue:
        problems.append("no scheduled query alert for a secret near expiry without a new version")
    if not unauthorized:
        problems.append("no scheduled query alert on the gateway's 401 rate (ApiManagementGatewayLogs)")
    for days in EXPIRY_ALERT_DAYS:
        if days not in expiring:
            problems.append(f"no scheduled query alert {days} day(s) before the key's expiry")
    # escalating: overdue (about 29 days before), then 7 days, then 1 day; 0 is the most severe
    ladder = [overdue_severity] + [expiring.get(d) for d in EXPIRY_ALERT_DAYS]
    if all(isinstance(s, int) for s in ladder) and not all(a > b for a, b in itertools.pairwise(ladder)):
        problems.append(f"expiry alert severities do not escalate (overdue, 7 days, 1 day): {ladder}")
    return problems


EXPIRY_ALERT_DAYS = (7, 1)


def _expiry_thresholds(t: Template, res: dict[str, Any], criteria: list[Any]) -> list[tuple[int, Any]]:
    """(days, severity) of each rule a scheduled-query resource makes whose query is a near-expiry query
    (the vault's notification and SecretSet rows) filtered on ``daysToExpiry <= days``: a loop over a literal
    array whose items give ``days`` (the format argument) and ``severity``."""
    loop = loop_items(t, res)
    if loop is None:
        return []
    item, items = loop
    found = []
    for criterion in criteria:
        fn = ((criterion.get("query") or {}) if isinstance(criterion, dict) else {}).get("function") or {}
        params = fn.get("parameters") or {}
        template = t.resolve(params.get("format_string"))
        if fn.get("type") != "format" or not isinstance(template, str):
            continue
        if "SecretNearExpiryEventGridNotification" not in template or "daysToExpiry <= days" not in template:
            continue
        for arg in (params[k] for k in sorted(params) if k.startswith("arg_")):
            if accessor_of(arg) == (item, "days"):
                severity = accessor_of(res_props(res).get("severity"))
                for entry in items:
                    if isinstance(entry, dict) and isinstance(entry.get("days"), int):
                        value = entry.get("severity") if severity == (item, "severity") else None
                        found.append((entry["days"], value))
    return found
