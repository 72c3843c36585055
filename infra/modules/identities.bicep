// User-assigned managed identities. Three, so each holds only the rights its job needs:
//  - app:          the services that call Azure OpenAI through APIM; reads the one secret (Key Vault Secrets User).
//  - rotator:      the identity the rotation code uses (AZURE_CLIENT_ID in the function); reads and writes the one
//                  secret (custom role: get, set, read metadata) and reads/regenerates the keys of the one APIM
//                  subscription (custom role: four actions). Both assigned in phase 2 (infra/README.md).
//  - functionHost: the Functions host's own plumbing (deployment package, host storage, telemetry); no rights on
//                  the secret or APIM.

param appIdentityName string
param rotatorIdentityName string
param functionHostIdentityName string
param location string
param tags object = {}

resource app 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' = {
  name: appIdentityName
  location: location
  tags: tags
}

resource rotator 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' = {
  name: rotatorIdentityName
  location: location
  tags: tags
}

resource functionHost 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' = {
  name: functionHostIdentityName
  location: location
  tags: tags
}

output appId string = app.id
output appPrincipalId string = app.properties.principalId
output appClientId string = app.properties.clientId
output rotatorId string = rotator.id
output rotatorPrincipalId string = rotator.properties.principalId
output rotatorClientId string = rotator.properties.clientId
output functionHostId string = functionHost.id
output functionHostPrincipalId string = functionHost.properties.principalId
output functionHostClientId string = functionHost.properties.clientId
