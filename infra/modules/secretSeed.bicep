// First version of the Key Vault secret holding the APIM subscription key. main.bicep deploys this module only
// when seedSecret is true: the first deployment, or a deliberate re-seed. Every other deployment leaves the
// secret's versions, tags and expiry to the rotation (a redeploy must not write the primary key back while a
// rotation has moved on to the secondary, nor push the expiry out and postpone the next rotation).
//  - Value: the product subscription's listSecrets().primaryKey at deployment time; the key never passes through
//    a parameter or an output.
//  - Tags are the dual-credential rotation contract: CredentialId (which APIM key the latest version holds),
//    ProviderAddress (the APIM subscription's resource id), ValidityPeriodDays (expiry of each new version).
//  - Expiry = seed time + validityDays; Key Vault raises SecretNearExpiry 30 days before it.

param keyVaultName string
param secretName string
param apimName string
param apimSubscriptionName string

@description('Days each secret version is valid; must exceed the 30-day near-expiry lead time.')
@minValue(31)
@maxValue(365)
param validityDays int = 60

@description('Seed time (ISO 8601). Pass utcNow() from the caller; it can only be a parameter default.')
param seedTime string

resource vault 'Microsoft.KeyVault/vaults@2024-11-01' existing = {
  name: keyVaultName
}

resource apim 'Microsoft.ApiManagement/service@2024-05-01' existing = {
  name: apimName
}

resource apimSubscription 'Microsoft.ApiManagement/service/subscriptions@2024-05-01' existing = {
  parent: apim
  name: apimSubscriptionName
}

resource apimKeySecret 'Microsoft.KeyVault/vaults/secrets@2024-11-01' = {
  parent: vault
  name: secretName
  tags: {
    CredentialId: 'primary'
    ProviderAddress: apimSubscription.id
    ValidityPeriodDays: string(validityDays)
  }
  properties: {
    value: apimSubscription.listSecrets().primaryKey
    contentType: 'text/plain'
    attributes: {
      enabled: true
      exp: dateTimeToEpoch(dateTimeAdd(seedTime, 'P${validityDays}D'))
    }
  }
}

output secretName string = apimKeySecret.name
