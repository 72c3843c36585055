"""Every Bicep policy check, in one list (the checks themselves live by concern in the sibling modules).

Each ``check_*`` function takes parsed templates and returns a list of violations (strings); an empty list
means compliant. ``tests/infra/test_bicep_policy.py`` runs them over the real templates and over
deliberately bad snippets, so every check is shown to be able to fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .alerts import check_action_groups, check_alerts
from .apim import V2_TIERS, check_apim, check_apim_logging, check_token_limits, custom_property_branches
from .bicep import (
    APIM_SUBSCRIPTION,
    EVENT_SUBSCRIPTION,
    INFRA,
    REPO,
    SECRET,
    SECRETS_OFFICER,
    SECRETS_USER,
    SYSTEM_TOPIC,
    Template,
    dotted,
    load_templates,
    parse_bicep,
    parse_text,
)
from .function_app import check_function_apps, check_function_egress
from .keyvault import check_key_vaults, check_rotation_secret, check_secret_seeding
from .outputs import check_outputs_and_parameters
from .roles import check_custom_role_ordering, check_role_assignments, custom_role_kind, role_grants

Check = Callable[[Iterable[Template]], list[str]]

#: Every Bicep check, in the order ``python -m infra.checks`` reports them.
BICEP_CHECKS: tuple[Check, ...] = (
    check_key_vaults,
    check_role_assignments,
    check_custom_role_ordering,
    check_outputs_and_parameters,
    check_apim,
    check_rotation_secret,
    check_function_apps,
    check_secret_seeding,
    check_action_groups,
    check_alerts,
    check_apim_logging,
    check_function_egress,
    check_token_limits,
)

__all__ = [
    "APIM_SUBSCRIPTION",
    "BICEP_CHECKS",
    "EVENT_SUBSCRIPTION",
    "INFRA",
    "REPO",
    "SECRET",
    "SECRETS_OFFICER",
    "SECRETS_USER",
    "SYSTEM_TOPIC",
    "V2_TIERS",
    "Check",
    "Template",
    "check_action_groups",
    "check_alerts",
    "check_apim",
    "check_apim_logging",
    "check_custom_role_ordering",
    "check_function_apps",
    "check_function_egress",
    "check_key_vaults",
    "check_outputs_and_parameters",
    "check_role_assignments",
    "check_rotation_secret",
    "check_secret_seeding",
    "check_token_limits",
    "custom_property_branches",
    "custom_role_kind",
    "dotted",
    "load_templates",
    "parse_bicep",
    "parse_text",
    "role_grants",
]
