"""An APIM subscription's ARM resource id, parsed (no other rotation module imported)."""

from __future__ import annotations

import dataclasses
import re

from ..exceptions import ConfigurationError

_APIM_SUB_ID = re.compile(
    r"^/subscriptions/(?P<arm>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.ApiManagement/"
    r"service/(?P<svc>[^/]+)/subscriptions/(?P<sid>[^/]+)/?$",
    re.IGNORECASE,
)


@dataclasses.dataclass(frozen=True)
class ApimSubscriptionRef:
    """The parts of an APIM subscription's ARM resource id."""

    arm_subscription: str
    resource_group: str
    service: str
    sid: str

    @property
    def resource_id(self) -> str:
        return (
            f"/subscriptions/{self.arm_subscription}/resourceGroups/{self.resource_group}/providers/"
            f"Microsoft.ApiManagement/service/{self.service}/subscriptions/{self.sid}"
        )

    def same_as(self, other: ApimSubscriptionRef) -> bool:
        return self.resource_id.lower() == other.resource_id.lower()


def parse_apim_subscription_id(resource_id: str) -> ApimSubscriptionRef:
    """Split ``/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.ApiManagement/service/{svc}/
    subscriptions/{sid}``; raise :class:`ConfigurationError` for anything else."""
    match = _APIM_SUB_ID.match(resource_id.strip()) if isinstance(resource_id, str) else None
    if match is None:
        raise ConfigurationError(
            f"{resource_id!r} is not an APIM subscription resource id "
            "(/subscriptions/<id>/resourceGroups/<rg>/providers/Microsoft.ApiManagement/service/<name>/"
            "subscriptions/<sid>)"
        )
    return ApimSubscriptionRef(match["arm"], match["rg"], match["svc"], match["sid"])
