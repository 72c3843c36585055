"""Bicep snippets the infra checks are shown to refuse (``tests/infra``)."""

from __future__ import annotations

#: A Key Vault secret with a literal value and an unbounded validity parameter, tagged for rotation.
BAD_SECRET = """
param validityDays int = 30
resource apim 'Microsoft.ApiManagement/service@2024-05-01' existing = {
  name: 'apim'
}
resource s 'Microsoft.KeyVault/vaults/secrets@2024-11-01' = {
  name: 'kv/apim-subscription-key'
  tags: {
    CredentialId: 'key1'
    ProviderAddress: apim.id
    ValidityPeriodDays: string(validityDays)
  }
  properties: {
    value: 'literal'
  }
}
"""
