// The Key Vault secret holding the APIM subscription key, and the only two data-plane role assignments on it.
//  - Seeded from the product subscription's listSecrets().primaryKey at deployment time; the key never passes
//    through a parameter or an output. Every deployment writes a new version (primary key, CredentialId=primary,
//    expiry reset to now + validityDays). That is safe with dual keys: the primary key is valid whatever the
//    last rotation did, the rotated-away key stays valid, and the reset expiry puts the next rotation at least
//    30 days out, far beyond any client cache TTL.
//  - Tags are the dual-credential rotation contract: CredentialId (which APIM key the latest version holds),
//    ProviderAddress (the APIM subscription's resource id), ValidityPeriodDays (expiry of each new version).
//  - Expiry = seed time + validityDays; Key Vault raises SecretNearExpiry 30 days before it.
//  - App identity: Key Vault Secrets User on this secret only. Rotator identity: Key Vault Secrets Officer on this
//    secret only. Neither has any right on the vault or on other secrets.

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

param appPrincipalId string
param rotatorPrincipalId string

var keyVaultSecretsUserRoleId = '4633458b-17de-408a-b874-0445c86b69e6'
var keyVaultSecretsOfficerRoleId = 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'

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

resource appSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, secretName, appPrincipalId, keyVaultSecretsUserRoleId)
  scope: apimKeySecret
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUserRoleId)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource rotatorSecretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, secretName, rotatorPrincipalId, keyVaultSecretsOfficerRoleId)
  scope: apimKeySecret
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsOfficerRoleId)
    principalId: rotatorPrincipalId
    principalType: 'ServicePrincipal'
  }
}

output secretName string = apimKeySecret.name
output secretResourceId string = apimKeySecret.id
