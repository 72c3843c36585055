// apimvault: Azure OpenAI behind API Management, the APIM subscription key kept in Key Vault and rotated by
// itself. Deploy to a resource group:
//   az deployment group create -g <rg> -f infra/main.bicep -p @infra/main.parameters.json -p publisherEmail=... \
//     -p alertEmailAddresses="['oncall@example.com']" \
//     -p seedSecret=true   (first deployment only; see infra/README.md "Deploy" and "Runbook: what-if first")
// alertEmailAddresses is required (at least one receiver). infra/README.md "Runbook: on call" is for operators.
// See infra/README.md for what each choice guards against, the two-phase rollout (code, then Event Grid
// subscription) and the post-deploy checks.
//
// The subscription key is written to Key Vault inside the first deployment (listSecrets, seedSecret=true) and
// appears in no parameter and no output; later deployments leave the secret to the rotation.

targetScope = 'resourceGroup'

@description('Short lowercase alphanumeric prefix for resource names (3-11 characters).')
@minLength(3)
@maxLength(11)
param namePrefix string

param location string = resourceGroup().location

@description('Tags applied to every resource.')
param tags object = {}

// ------------------------------------------------------------------------------------------------ network

@description('private (default): the vault has public network access disabled and is reached through its private endpoint. ipAllowList (dev only): the public endpoint is enabled but default Deny, allowing only allowedIpAddresses.')
@allowed([
  'private'
  'ipAllowList'
])
param keyVaultNetworkMode string = 'private'

@description('Developer public IPv4 addresses/CIDRs: allowed on the vault in ipAllowList mode, and on the function app\'s deployment endpoint.')
param allowedIpAddresses array = []

param vnetAddressPrefix string = '10.60.0.0/22'
param privateEndpointSubnetPrefix string = '10.60.0.0/26'
param apimSubnetPrefix string = '10.60.0.64/26'
param functionSubnetPrefix string = '10.60.0.128/26'

// ------------------------------------------------------------------------------------------------ APIM + Azure OpenAI

@description('APIM publisher e-mail (required by APIM).')
param publisherEmail string

@description('APIM publisher name.')
param publisherName string

@allowed([
  'StandardV2'
  'PremiumV2'
])
param apimSkuName string = 'StandardV2'

param apimSkuCapacity int = 1

param openAiDeploymentName string = 'gpt-4o-mini'
param openAiModelName string = 'gpt-4o-mini'
param openAiModelVersion string = '2024-07-18'
param openAiDeploymentCapacity int = 10

@description('Azure OpenAI data-plane api-version clients send (OPENAI_API_VERSION).')
param openAiApiVersion string = '2024-10-21'

// ------------------------------------------------------------------------------------------------ secret + rotation

@description('Name of the Key Vault secret holding the APIM subscription key (APIMVAULT_SECRET_NAME).')
param secretName string = 'apim-subscription-key'

@description('Validity of each secret version in days (tag ValidityPeriodDays). SecretNearExpiry fires 30 days before expiry, so this must exceed 30; 60 rotates about every 30 days.')
@minValue(31)
@maxValue(365)
param secretValidityDays int = 60

@description('Seed time of the secret expiry. Leave the default: utcNow() is only allowed as a parameter default.')
param seedTime string = utcNow()

@description('Second deployment (phase 2): create the Event Grid subscription to the rotation function and assign the rotator\'s two custom roles. Event Grid validates the function endpoint, so set true after the function code is published; the role definitions, created in phase 1, have replicated by then.')
param enableRotationEventSubscription bool = false

@description('Write the first version of the secret (the APIM primary key, fresh expiry). True on the first deployment only: every other deployment must leave the secret\'s versions and expiry to the rotation.')
param seedSecret bool = false

@description('Tokens one APIM subscription may use per minute (azure-openai-token-limit); excess requests get 429 with Retry-After.')
@minValue(1000)
param tokensPerMinute int = 10000

@description('Resource id of an existing action group the alerts notify in addition to the one created with alertEmailAddresses. Empty: only that one.')
param alertActionGroupId string = ''

@description('E-mail addresses paged by the alerts (receivers of the action group created here). Required, at least one: an alert that reaches nobody is worse than none.')
@minLength(1)
param alertEmailAddresses array

@description('Percentage of gateway requests answered 401 in 15 minutes above which the 401-rate alert fires.')
@minValue(1)
@maxValue(100)
param unauthorizedPercentThreshold int = 5

@description('Hours after Key Vault\'s near-expiry notification without a new secret version before the overdue-rotation alert fires (25-47).')
@minValue(25)
@maxValue(47)
param rotationOverdueHours int = 26

@description('Changes the vault\'s name (and only its name). The vault is purge-protected: after the resource group is deleted its name stays reserved for the 90-day retention, so a redeploy with the same name fails with a conflict. Set any new value (e.g. "2") for a fresh vault name, or recover the old vault instead (infra/README.md "Teardown and redeploy"). Empty keeps the original name.')
@maxLength(20)
param keyVaultNameSeed string = ''

@description('Put a CanNotDelete lock on the vault.')
param lockKeyVault bool = true

@description('Log Analytics retention in days.')
param logRetentionInDays int = 90

// ------------------------------------------------------------------------------------------------ names

var suffix = take(uniqueString(resourceGroup().id, namePrefix), 8)
// Same length as suffix, so the vault name stays within 24 characters (3 + 11 + 1 + 8 = 23).
var keyVaultSuffix = empty(keyVaultNameSeed) ? suffix : take(uniqueString(resourceGroup().id, namePrefix, keyVaultNameSeed), 8)
var names = {
  workspace: 'log-${namePrefix}-${suffix}'
  appInsights: 'appi-${namePrefix}-${suffix}'
  vnet: 'vnet-${namePrefix}-${suffix}'
  keyVault: 'kv-${namePrefix}-${keyVaultSuffix}'
  openAi: 'oai-${namePrefix}-${suffix}'
  apim: 'apim-${namePrefix}-${suffix}'
  appIdentity: 'id-${namePrefix}-app'
  rotatorIdentity: 'id-${namePrefix}-rotator'
  functionHostIdentity: 'id-${namePrefix}-funchost'
  storage: 'st${namePrefix}${suffix}'
  functionPlan: 'plan-${namePrefix}-rotation-${suffix}'
  functionApp: 'func-${namePrefix}-rotation-${suffix}'
  systemTopic: 'evgt-${namePrefix}-kv-${suffix}'
  actionGroup: 'ag-${namePrefix}-rotation'
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    workspaceName: names.workspace
    appInsightsName: names.appInsights
    location: location
    tags: tags
    retentionInDays: logRetentionInDays
  }
}

module network 'modules/network.bicep' = {
  name: 'network'
  params: {
    vnetName: names.vnet
    location: location
    tags: tags
    addressPrefix: vnetAddressPrefix
    privateEndpointSubnetPrefix: privateEndpointSubnetPrefix
    apimSubnetPrefix: apimSubnetPrefix
    functionSubnetPrefix: functionSubnetPrefix
  }
}

module identities 'modules/identities.bicep' = {
  name: 'identities'
  params: {
    appIdentityName: names.appIdentity
    rotatorIdentityName: names.rotatorIdentity
    functionHostIdentityName: names.functionHostIdentity
    location: location
    tags: tags
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    name: names.keyVault
    location: location
    tags: tags
    networkMode: keyVaultNetworkMode
    allowedIpAddresses: allowedIpAddresses
    privateEndpointSubnetId: network.outputs.privateEndpointSubnetId
    privateDnsZoneId: network.outputs.keyVaultDnsZoneId
    logAnalyticsWorkspaceId: monitoring.outputs.workspaceId
    lockVault: lockKeyVault
  }
}

module openAi 'modules/openai.bicep' = {
  name: 'openai'
  params: {
    name: names.openAi
    location: location
    tags: tags
    deploymentName: openAiDeploymentName
    modelName: openAiModelName
    modelVersion: openAiModelVersion
    deploymentCapacity: openAiDeploymentCapacity
    privateEndpointSubnetId: network.outputs.privateEndpointSubnetId
    privateDnsZoneId: network.outputs.openAiDnsZoneId
    logAnalyticsWorkspaceId: monitoring.outputs.workspaceId
  }
}

module apim 'modules/apim.bicep' = {
  name: 'apim'
  params: {
    name: names.apim
    location: location
    tags: tags
    publisherEmail: publisherEmail
    publisherName: publisherName
    skuName: apimSkuName
    skuCapacity: apimSkuCapacity
    integrationSubnetId: network.outputs.apimSubnetId
    logAnalyticsWorkspaceId: monitoring.outputs.workspaceId
    openAiAccountName: openAi.outputs.name
    openAiEndpoint: openAi.outputs.endpoint
    rotatorPrincipalId: identities.outputs.rotatorPrincipalId
    assignRotatorRole: enableRotationEventSubscription
    tokensPerMinute: tokensPerMinute
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

// First deployment only (seedSecret): a redeploy leaves the secret's versions, tags and expiry alone.
module secretSeed 'modules/secretSeed.bicep' = if (seedSecret) {
  name: 'secret-seed'
  params: {
    keyVaultName: keyVault.outputs.name
    secretName: secretName
    apimName: apim.outputs.name
    apimSubscriptionName: apim.outputs.subscriptionName
    validityDays: secretValidityDays
    seedTime: seedTime
  }
}

module secret 'modules/secret.bicep' = {
  name: 'secret'
  params: {
    keyVaultName: keyVault.outputs.name
    secretName: secretName
    appPrincipalId: identities.outputs.appPrincipalId
    rotatorPrincipalId: identities.outputs.rotatorPrincipalId
    assignRotatorRole: enableRotationEventSubscription
  }
  dependsOn: [
    secretSeed
  ]
}

module rotation 'modules/rotation.bicep' = {
  name: 'rotation'
  params: {
    location: location
    tags: tags
    storageAccountName: names.storage
    functionAppName: names.functionApp
    functionPlanName: names.functionPlan
    systemTopicName: names.systemTopic
    keyVaultName: keyVault.outputs.name
    keyVaultUri: keyVault.outputs.vaultUri
    secretName: secret.outputs.secretName
    apimSubscriptionResourceId: apim.outputs.apimSubscriptionId
    // One gateway: the template deploys no additional locations and no self-hosted gateway. Add their URLs here.
    apimGatewayUrls: [
      apim.outputs.gatewayUrl
    ]
    rotatorIdentityId: identities.outputs.rotatorId
    rotatorClientId: identities.outputs.rotatorClientId
    functionHostIdentityId: identities.outputs.functionHostId
    functionHostPrincipalId: identities.outputs.functionHostPrincipalId
    functionHostClientId: identities.outputs.functionHostClientId
    functionSubnetId: network.outputs.functionSubnetId
    privateEndpointSubnetId: network.outputs.privateEndpointSubnetId
    blobDnsZoneId: network.outputs.blobDnsZoneId
    queueDnsZoneId: network.outputs.queueDnsZoneId
    logAnalyticsWorkspaceId: monitoring.outputs.workspaceId
    appInsightsName: monitoring.outputs.appInsightsName
    appInsightsConnectionString: monitoring.outputs.appInsightsConnectionString
    deployerIpAddresses: allowedIpAddresses
    enableEventSubscription: enableRotationEventSubscription
  }
}

module alerts 'modules/alerts.bicep' = {
  name: 'alerts'
  params: {
    location: location
    tags: tags
    additionalActionGroupId: alertActionGroupId
    actionGroupName: names.actionGroup
    emailAddresses: alertEmailAddresses
    functionAppName: rotation.outputs.functionAppName
    unauthorizedPercentThreshold: unauthorizedPercentThreshold
    systemTopicName: rotation.outputs.systemTopicName
    storageAccountName: rotation.outputs.storageAccountName
    poisonQueueName: rotation.outputs.poisonQueueName
    appInsightsName: monitoring.outputs.appInsightsName
    logAnalyticsWorkspaceId: monitoring.outputs.workspaceId
    keyVaultName: keyVault.outputs.name
    secretName: secretName
    rotationOverdueHours: rotationOverdueHours
  }
}

// ------------------------------------------------------------------------------------------------ outputs
// Names and endpoints only: the environment of a service using apimvault. No key, no listSecrets().

@description('AZURE_KEYVAULT_URL')
output AZURE_KEYVAULT_URL string = keyVault.outputs.vaultUri

@description('APIMVAULT_SECRET_NAME')
output APIMVAULT_SECRET_NAME string = secret.outputs.secretName

@description('AZURE_CLIENT_ID: client id of the app identity (attach appIdentityResourceId to your compute).')
output AZURE_CLIENT_ID string = identities.outputs.appClientId

@description('AZURE_OPENAI_ENDPOINT: the APIM gateway.')
output AZURE_OPENAI_ENDPOINT string = apim.outputs.gatewayUrl

@description('OPENAI_API_VERSION')
output OPENAI_API_VERSION string = openAiApiVersion

@description('APIMVAULT_DEPLOYMENT: the Azure OpenAI deployment name.')
output APIMVAULT_DEPLOYMENT string = openAiDeploymentName

@description('APIMVAULT_APIM_SUBSCRIPTION_ID: resource id of the APIM subscription whose key the secret holds.')
output APIMVAULT_APIM_SUBSCRIPTION_ID string = apim.outputs.apimSubscriptionId

@description('Resource id of the app identity, to attach to the compute that runs your service.')
output appIdentityResourceId string = identities.outputs.appId

@description('Function app hosting the rotation function (publish infra/rotation_function to it).')
output rotationFunctionAppName string = rotation.outputs.functionAppName

@description('The rotation function\'s only public egress address (NAT gateway on its subnet): allow-list it where the function must be let in.')
output rotationFunctionEgressIp string = network.outputs.natPublicIpAddress

@description('Client id of the rotator identity (for a drill run as the rotator).')
output rotatorClientId string = identities.outputs.rotatorClientId
