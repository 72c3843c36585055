"""ARM's answer to an api-version ``Microsoft.ApiManagement`` does not serve (issue 22.1).

ARM resolves the resource provider per (location, api-version, resource type) and, when the version is not
registered, answers 400 ``NoRegisteredProviderFound`` naming the type and listing the supported versions
and locations. The text below follows the real answer for ``Microsoft.ApiManagement/service`` quoted in
Azure/bicep#15227 ("No registered resource provider found for location 'westeurope' and API version
'2024-05-01' for type 'service'. The supported api-versions are '2014-02-14, ...'. The supported locations
are '...'."); the status is 400 (pulumi/pulumi-azure-nextgen#170: "Status=400
Code=\"NoRegisteredProviderFound\"").
"""

from __future__ import annotations

# The versions Azure/bicep#15227 lists for the type, plus the API Management spec folders published since
# (specification/apimanagement/resource-manager/Microsoft.ApiManagement: stable/2024-05-01,
# preview/2024-06-01-preview, preview/2024-10-01-preview). azure-mgmt-apimanagement 5.0.0 sends 2024-05-01.
APIM_API_VERSIONS: tuple[str, ...] = (
    "2014-02-14",
    "2015-09-15",
    "2016-07-07",
    "2016-10-10",
    "2017-03-01",
    "2018-01-01",
    "2018-06-01-preview",
    "2019-01-01",
    "2019-12-01-preview",
    "2019-12-01",
    "2020-06-01-preview",
    "2020-12-01",
    "2021-01-01-preview",
    "2021-04-01-preview",
    "2021-08-01",
    "2021-12-01-preview",
    "2022-04-01-preview",
    "2022-08-01",
    "2022-09-01-preview",
    "2023-03-01-preview",
    "2023-05-01-preview",
    "2023-09-01-preview",
    "2024-05-01",
    "2024-06-01-preview",
    "2024-10-01-preview",
)
LOCATION = "local"


def api_version_problem(version: str) -> tuple[str, str] | None:
    """``(code, message)`` of ARM's 400 for an unserved ``version``; None when it is served."""
    if version in APIM_API_VERSIONS:
        return None
    return (
        "NoRegisteredProviderFound",
        f"No registered resource provider found for location '{LOCATION}' and API version '{version}' for "
        f"type 'service'. The supported api-versions are '{', '.join(APIM_API_VERSIONS)}'. "
        f"The supported locations are '{LOCATION}'.",
    )
