"""Local Azure API Management: subscription state, the gateway in front of Azure OpenAI, and the ARM plane.

* :class:`ApimState` holds the APIM subscriptions and their two keys (both valid at once; Microsoft Learn,
  "Subscriptions in Azure API Management").
* :class:`ApimGateway` routes a request to the API's operations (APIM's 404 ``Resource not found`` for a
  path or method no operation matches, before any key check), checks ``Ocp-Apim-Subscription-Key`` (or the
  ``subscription-key`` query parameter),
  applies an optional rate-limit policy, strips the key and forwards to the Azure OpenAI backend in-process
  (the backend's ASGI app, faults and counters included), relaying the response, SSE chunks included, as the
  backend sends it.
* :class:`ArmService` is the ``Microsoft.ApiManagement`` management plane for subscriptions: get, list,
  ``listSecrets`` and ``regeneratePrimaryKey`` / ``regenerateSecondaryKey``, behind ARM bearer auth, so the
  unmodified ``azure.mgmt.apimanagement.ApiManagementClient`` works against it.

Propagation (undocumented by Microsoft; Microsoft Q&A question 5922487 reports up to 10 minutes).
Real APIM gateways pick a regenerated key up asynchronously, each gateway
unit (region, self-hosted gateway) on its own: until a unit has synced it refuses the new value with the
ordinary invalid-key 401 and keeps accepting the value it replaced. Here every unit keeps its own replica
of the key table; ``regenerate`` changes the authoritative table (what ARM's ``listSecrets`` answers) at
once and queues the change for each unit, which applies it ``delay`` seconds later on the state's injected
``clock`` (a fixed delay or one drawn uniformly from ``(low, high)`` for each regeneration and unit; the
changes of one unit apply in order). A delay of 0 (the default) applies the change at once, as before.
Units (``routing="balanced"``, the default) share the gateway's one URL as the units of a region share one
hostname behind a load balancer: each routed request goes to one unit, round-robin or seeded random, so
one accepted request proves nothing about the other units. ``routing="per-unit"`` keeps the earlier
model where the first unit answers at the root and every unit also under ``/<unit>/...``. Only regional
and self-hosted gateways have URLs of their own in real APIM. The gateway counts, per
unit, ``propagation-refused`` (a current key refused because the unit has not synced it yet) and
``propagation-stale`` (a replaced key still accepted).

The three planes live in their own modules (``_apim_state``, ``_apim_gateway``, ``_apim_arm``); this module
is their public face.
"""

from __future__ import annotations

from ._apim_arm import AUTHORIZATION_FAILED, RBAC_ACTIONS, ArmService
from ._apim_gateway import (
    DEFAULT_API_SUFFIX,
    DEFAULT_OPERATIONS,
    INVALID_KEY_MESSAGE,
    MISSING_KEY_MESSAGE,
    NOT_FOUND_MESSAGE,
    ApimGateway,
    Balance,
    KeyUse,
    Routing,
    normalize_operations,
    normalize_suffix,
)
from ._apim_state import (
    DEFAULT_UNITS,
    ApimState,
    DelaySpec,
    LookupResult,
    Slot,
    Subscription,
    UseSlot,
    subscription_resource_id,
)

__all__ = [
    "AUTHORIZATION_FAILED",
    "DEFAULT_API_SUFFIX",
    "DEFAULT_OPERATIONS",
    "DEFAULT_UNITS",
    "INVALID_KEY_MESSAGE",
    "MISSING_KEY_MESSAGE",
    "NOT_FOUND_MESSAGE",
    "RBAC_ACTIONS",
    "ApimGateway",
    "ApimState",
    "ArmService",
    "Balance",
    "DelaySpec",
    "KeyUse",
    "LookupResult",
    "Routing",
    "Slot",
    "Subscription",
    "UseSlot",
    "normalize_operations",
    "normalize_suffix",
    "subscription_resource_id",
]
