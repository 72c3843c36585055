// Rights on the Key Vault secret holding the APIM subscription key (the secret itself is written once, by
// secretSeed.bicep, and afterwards only by the rotation). Both assignments are scoped to the one secret.
//  - App identity: Key Vault Secrets User (read the value).
//  - Rotator identity: a custom data role with exactly the data actions of keyVaultSecretRotator in
//    ../roles/rotator.json (get, set, update and read metadata; the local stack enforces the same file). Key Vault
//    Secrets Officer would also let it delete, purge, back up and restore; rotation needs none of that. The definition is
//    assignable on this vault only and is created on every deployment; the assignment only when
//    assignRotatorRole is true (the second deployment), so it never races the replication of a role definition
//    created moments before ("RoleDefinitionDoesNotExist").
//  - Neither identity has any right on the vault or on other secrets.

param keyVaultName string
param secretName string

param appPrincipalId string
param rotatorPrincipalId string

@description('Assign the secret-rotator custom role to the rotator identity (false on the first deployment, see infra/README.md).')
param assignRotatorRole bool = false

var keyVaultSecretsUserRoleId = '4633458b-17de-408a-b874-0445c86b69e6'
// One source for the rotator's rights: infra/roles/rotator.json, also read by apimvault.local's RBAC.
var secretRotatorRoleSpec = loadJsonContent('../roles/rotator.json', '$.keyVaultSecretRotator')

resource vault 'Microsoft.KeyVault/vaults@2024-11-01' existing = {
  name: keyVaultName
}

// Existing on every deployment: seeded by secretSeed.bicep (main.bicep deploys it first when seedSecret is true).
resource apimKeySecret 'Microsoft.KeyVault/vaults/secrets@2024-11-01' existing = {
  parent: vault
  name: secretName
}

resource secretRotatorRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(vault.id, 'apimvault-secret-rotator')
  properties: {
    roleName: '${secretRotatorRoleSpec.roleName} (${vault.name}, ${uniqueString(vault.id)})'
    description: secretRotatorRoleSpec.description
    type: 'CustomRole'
    permissions: [
      {
        actions: []
        notActions: []
        dataActions: loadJsonContent('../roles/rotator.json', '$.keyVaultSecretRotator.dataActions')
        notDataActions: []
      }
    ]
    assignableScopes: [
      vault.id
    ]
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

resource rotatorSecretRotator 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (assignRotatorRole) {
  name: guid(vault.id, secretName, rotatorPrincipalId, 'apimvault-secret-rotator')
  scope: apimKeySecret
  properties: {
    roleDefinitionId: secretRotatorRole.id
    principalId: rotatorPrincipalId
    principalType: 'ServicePrincipal'
  }
}

output secretName string = apimKeySecret.name
output secretResourceId string = apimKeySecret.id
