"""Every resource block in infra/ against Azure's published resource type definitions (bicep-types-az).

The real templates must match; planted errors (an unknown property at the top, nested, in a loop and in a
discriminated object, a bad enum value directly and through a parameter's @allowed list, a wrong
api-version, a read-only property, a wrong value kind, a missing required property) must each be flagged.
"""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("pycep", reason="pycep-parser is in the dev extra")

from infra.checks.bicep_policy import Template, parse_text
from infra.checks.bicep_types.refresh import RESOURCE_DECL, used_resource_types
from infra.checks.type_check import SUBSET, TYPES_DIR, check_module_wiring, check_resource_types, load_index


def test_every_resource_block_matches_the_published_type_definitions(templates: list[Template]) -> None:
    assert check_resource_types(templates) == []
    checked = sum(len(t.resources) for t in templates)
    assert checked >= 40, checked  # the walk saw the resources (not an empty parse)


def test_vendored_subset_is_exactly_the_types_infra_uses_with_licence_and_commit() -> None:
    index = load_index()
    assert index.names == used_resource_types(), "run infra/checks/bicep_types/refresh.py <checkout>"
    assert index.repository == "https://github.com/Azure/bicep-types-az"
    assert re.fullmatch(r"[0-9a-f]{40}", index.commit)
    licence = (TYPES_DIR / "LICENSE").read_text()
    assert "MIT License" in licence and "Microsoft Corporation" in licence
    data = json.loads(SUBSET.read_text())
    assert all(e["source"].startswith("generated/") for e in data["resources"].values())


def test_resource_declaration_pattern_sees_every_parsed_resource(templates: list[Template]) -> None:
    parsed = {f"{r['type']}@{r['api_version']}".lower() for t in templates for r in t.resources.values()}
    assert parsed == {n.lower() for n in used_resource_types()}
    assert RESOURCE_DECL.search("resource x 'Microsoft.A/b@2020-01-01' = {")


PLANTED = """
param ips array = []
@allowed([
  'standard'
  'gold'
])
param skuName string = 'standard'

resource kv 'Microsoft.KeyVault/vaults@2024-11-01' = {
  name: 'kv'
  location: 'westeurope'
  colour: 'blue'
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: skuName
    }
    enableRbacAuthorization: 'yes'
    enablePurgeProtektion: true
    networkAcls: {
      defaultAction: 'Deny'
      ipRules: [for ip in ips: {
        value: ip
        comment: 'x'
      }]
    }
  }
}

resource wrongVersion 'Microsoft.KeyVault/vaults/secrets@2024-11-02' = {
  parent: kv
  name: 's'
}

resource badSku 'Microsoft.KeyVault/vaults@2024-11-01' = {
  name: 'kv2'
  location: 'westeurope'
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: 'platinum'
    }
  }
}

resource sub 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2025-02-15' = {
  name: 'topic/sub'
  properties: {
    destination: {
      endpointType: 'AzureFunction'
      properties: {
        maxEventsPerBatch: 1
        bogus: 2
      }
    }
    retryPolicy: {
      maxDeliveryAttempts: 'thirty'
    }
  }
}

resource noName 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' = {
  location: 'westeurope'
}
"""


@pytest.mark.parametrize(
    "expected",
    [
        pytest.param("kv.colour: unknown property", id="unknown-top-level"),
        pytest.param("kv.properties.enablePurgeProtektion: unknown property of Vault", id="unknown"),
        pytest.param("kv.properties.networkAcls.ipRules[for].comment: unknown", id="unknown-in-loop"),
        pytest.param(
            "sub.properties.destination.properties.bogus: unknown property of "
            "AzureFunctionEventSubscriptionDestinationProperties",
            id="unknown-in-discriminated",
        ),
        pytest.param('sku.name: "platinum" is not one of ["standard", "premium"]', id="enum"),
        pytest.param('kv.properties.sku.name: "gold" is not one of', id="enum-through-allowed"),
        pytest.param(
            "wrongVersion: Microsoft.KeyVault/vaults/secrets@2024-11-02 is not in the published type "
            "definitions (vendored api-versions of this type: 2024-11-01",
            id="api-version",
        ),
        pytest.param('kv.properties.enableRbacAuthorization: expected a boolean, got "yes"', id="kind"),
        pytest.param('retryPolicy.maxDeliveryAttempts: expected an integer, got "thirty"', id="kind-nested"),
        pytest.param("noName: required property name missing", id="required"),
    ],
)
def test_planted_errors_are_flagged(expected: str) -> None:
    problems = "\n".join(check_resource_types([parse_text(PLANTED)]))
    assert expected in problems, problems


def test_read_only_property_is_flagged() -> None:
    snippet = """
resource id 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' = {
  name: 'id'
  location: 'westeurope'
  properties: {
    principalId: '00000000-0000-0000-0000-000000000000'
  }
}
"""
    problems = check_resource_types([parse_text(snippet)])
    assert any("id.properties.principalId: read-only property" in p for p in problems), problems


def test_planted_snippet_without_errors_passes() -> None:
    """The negative tests are not flagging everything: a correct block of the same types passes."""
    snippet = """
resource kv 'Microsoft.KeyVault/vaults@2024-11-01' = {
  name: 'kv'
  location: 'westeurope'
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    networkAcls: {
      defaultAction: 'Deny'
    }
  }
}
"""
    assert check_resource_types([parse_text(snippet)]) == []


def test_module_calls_match_the_module_files(templates: list[Template]) -> None:
    """Parameters passed exist, required ones are passed, outputs read exist (what `az bicep build` checks
    across files)."""
    assert check_module_wiring(templates) == []
    main = next(t for t in templates if t.name == "main.bicep")
    assert len(main.modules) >= 9


def test_planted_module_wiring_errors_are_flagged() -> None:
    module = parse_text(
        "param needed string\nparam optional int = 1\noutput id string = needed\n", "modules/m.bicep"
    )
    caller = parse_text(
        """
module m 'modules/m.bicep' = {
  name: 'm'
  params: {
    optinal: 2
  }
}
module gone 'modules/gone.bicep' = {
  name: 'gone'
}
output x string = m.outputs.name
""",
        "main.bicep",
    )
    problems = "\n".join(check_module_wiring([caller, module]))
    for expected in (
        "main.bicep:m: modules/m.bicep has no parameter 'optinal'",
        "main.bicep:m: required parameter 'needed' of modules/m.bicep not passed",
        "main.bicep: m.outputs.name is not an output of modules/m.bicep",
        "main.bicep:gone: module file 'modules/gone.bicep' not found",
    ):
        assert expected in problems, problems
