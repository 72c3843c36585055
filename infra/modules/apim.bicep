// API Management in front of Azure OpenAI.
//  - Old protocols off: TLS 1.0/1.1 and SSL 3.0 disabled on the client (frontend) and backend side. The 3DES
//    cipher setting (TripleDes168) is only sent to classic tiers: Microsoft documents that v2 tiers do not
//    support changes to the default cipher configuration (their defaults exclude 3DES already).
//  - Management API calls below apiVersionConstraint.minApiVersion are refused.
//  - The API requires a subscription, accepts its key only in the Ocp-Apim-Subscription-Key header, and reaches
//    Azure OpenAI with APIM's system-assigned managed identity (Cognitive Services OpenAI User on that account).
//  - One product and one product-scoped subscription (tracing off): that subscription's key is what Key Vault
//    holds and what the rotation function regenerates.
//  - The rotator identity gets a custom role, assigned on that one APIM subscription only: read it, list its
//    keys, regenerate either key. Nothing else in APIM. The definition is created on every deployment; the
//    assignment only when assignRotatorRole is true (the second deployment, see infra/README.md), so it never
//    races the replication of a role definition created moments before.
//  - Token limit per APIM subscription and token metrics (policies/openai-api.xml): the limit comes from the
//    named value apimvault-tokens-per-minute (parameter tokensPerMinute); metrics go to Application Insights
//    through an APIM logger that authenticates with APIM's managed identity (the component has local auth off).
//  - Diagnostic settings (gateway logs and metrics) to Log Analytics; gateway request logging never records
//    headers or bodies, and every APIM diagnostic (each logger's) masks the subscription key header and the
//    subscription-key query parameter (dataMasking, mode Hide).

param name string
param location string
param tags object = {}

param publisherEmail string
param publisherName string

@allowed([
  'StandardV2'
  'PremiumV2'
])
param skuName string = 'StandardV2'

@minValue(1)
param skuCapacity int = 1

@description('Subnet delegated to Microsoft.Web/serverFarms for outbound VNet integration.')
param integrationSubnetId string

param logAnalyticsWorkspaceId string

@description('Name of the Azure OpenAI account (same resource group) the API fronts.')
param openAiAccountName string

@description('Endpoint of the Azure OpenAI account, e.g. https://<name>.openai.azure.com/.')
param openAiEndpoint string

param productName string = 'apimvault'
param subscriptionName string = 'apimvault-app'

@description('Principal id of the rotator identity (gets the key-rotator custom role on the APIM subscription).')
param rotatorPrincipalId string

@description('Assign the key-rotator custom role to the rotator identity. False on the first deployment (the role definition is created then); true from the second one on, once the definition has replicated.')
param assignRotatorRole bool = false

@description('Tokens (prompt + completion) one APIM subscription may use per minute across all deployments (azure-openai-token-limit). Excess requests get 429 with Retry-After.')
@minValue(1000)
param tokensPerMinute int = 10000

@description('Name of the workspace-based Application Insights component that receives the token metrics (same resource group).')
param appInsightsName string

var cognitiveServicesOpenAiUserRoleId = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'
var monitoringMetricsPublisherRoleId = '3913510d-42f4-4e42-8a64-420c390055eb'

// Protocol settings every tier accepts.
var protocolSettings = {
  'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Tls10': 'False'
  'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Tls11': 'False'
  'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Ssl30': 'False'
  'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Backend.Protocols.Tls10': 'False'
  'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Backend.Protocols.Tls11': 'False'
  'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Backend.Protocols.Ssl30': 'False'
}
// Cipher settings: classic tiers only ("v2 tiers don't support changes to the default cipher configuration").
var cipherSettings = {
  'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Ciphers.TripleDes168': 'False'
}
var supportsCipherSettings = !contains([
  'BasicV2'
  'StandardV2'
  'PremiumV2'
], skuName)

resource apim 'Microsoft.ApiManagement/service@2024-05-01' = {
  name: name
  location: location
  tags: tags
  sku: {
    name: skuName
    capacity: skuCapacity
  }
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    // checkov:skip=CKV_AZURE_174: The gateway is the public entry point the client services call (key-protected). APIM refuses publicNetworkAccess Disabled at creation time and v2 private endpoints cover the gateway only; see infra/README.md "Accepted findings".
    publisherEmail: publisherEmail
    publisherName: publisherName
    publicNetworkAccess: 'Enabled'
    virtualNetworkType: 'External'
    virtualNetworkConfiguration: {
      subnetResourceId: integrationSubnetId
    }
    apiVersionConstraint: {
      minApiVersion: '2021-08-01'
    }
    developerPortalStatus: 'Disabled'
    customProperties: supportsCipherSettings ? union(protocolSettings, cipherSettings) : protocolSettings
  }
}

resource apimDiagnosticSettings 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: apim
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logAnalyticsDestinationType: 'Dedicated'
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

// Every logger's diagnostic masks the subscription key wherever a request may carry it: the
// Ocp-Apim-Subscription-Key header and the subscription-key query parameter (APIM accepts a key there too; the
// API's policy refuses such a request with 400, but the gateway logs the refused request's URL first).
// Mode Hide drops the value from the logged URL and headers (Learn: apim diagnostics DataMaskingEntity).
var keyMasking = {
  queryParams: [
    {
      value: 'subscription-key'
      mode: 'Hide'
    }
  ]
  headers: [
    {
      value: 'Ocp-Apim-Subscription-Key'
      mode: 'Hide'
    }
    {
      value: 'api-key'
      mode: 'Hide'
    }
  ]
}
// Log no headers and no bodies, and mask the key in what is logged (the URL).
var maskedMessage = {
  headers: []
  body: {
    bytes: 0
  }
  dataMasking: keyMasking
}

// Gateway request logging to Azure Monitor: no headers, no bodies, the key masked.
resource apimGatewayDiagnostics 'Microsoft.ApiManagement/service/diagnostics@2024-05-01' = {
  parent: apim
  name: 'azuremonitor'
  properties: {
    loggerId: resourceId('Microsoft.ApiManagement/service/loggers', apim.name, 'azuremonitor')
    alwaysLog: 'allErrors'
    logClientIp: false
    verbosity: 'information'
    sampling: {
      samplingType: 'fixed'
      percentage: 100
    }
    frontend: {
      request: maskedMessage
      response: maskedMessage
    }
    backend: {
      request: maskedMessage
      response: maskedMessage
    }
  }
}

resource openAiAccount 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = {
  name: openAiAccountName
}

// APIM's managed identity may call the Azure OpenAI data plane (and nothing else): scoped to the one account.
resource apimOpenAiUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(openAiAccount.id, apim.id, cognitiveServicesOpenAiUserRoleId)
  scope: openAiAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', cognitiveServicesOpenAiUserRoleId)
    principalId: apim.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource openAiBackend 'Microsoft.ApiManagement/service/backends@2024-05-01' = {
  parent: apim
  name: 'azure-openai'
  properties: {
    description: 'Azure OpenAI account (Entra ID auth with the APIM managed identity; local auth disabled).'
    url: '${openAiEndpoint}openai'
    protocol: 'http'
    tls: {
      validateCertificateChain: true
      validateCertificateName: true
    }
  }
}

resource openAiApi 'Microsoft.ApiManagement/service/apis@2024-05-01' = {
  parent: apim
  name: 'azure-openai'
  properties: {
    displayName: 'Azure OpenAI'
    description: 'Azure OpenAI inference API behind a product subscription key.'
    path: 'openai'
    protocols: [
      'https'
    ]
    apiType: 'http'
    subscriptionRequired: true
    subscriptionKeyParameterNames: {
      header: 'Ocp-Apim-Subscription-Key'
      query: 'subscription-key'
    }
  }
}

// Read by the azure-openai-token-limit policy as {{apimvault-tokens-per-minute}}.
resource tokensPerMinuteValue 'Microsoft.ApiManagement/service/namedValues@2024-05-01' = {
  parent: apim
  name: 'apimvault-tokens-per-minute'
  properties: {
    displayName: 'apimvault-tokens-per-minute'
    value: string(tokensPerMinute)
    secret: false
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// APIM's managed identity may publish metrics to the component (its local auth is off).
resource apimMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, apim.id, monitoringMetricsPublisherRoleId)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisherRoleId)
    principalId: apim.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource appInsightsLogger 'Microsoft.ApiManagement/service/loggers@2024-05-01' = {
  parent: apim
  name: 'appinsights'
  properties: {
    loggerType: 'applicationInsights'
    description: 'Token metrics (azure-openai-emit-token-metric); Entra ID auth with the APIM managed identity.'
    resourceId: appInsights.id
    credentials: {
      connectionString: appInsights.properties.ConnectionString
      identityClientId: 'SystemAssigned'
    }
  }
  dependsOn: [
    apimMetricsPublisher
  ]
}

// Custom metrics on (the token metric policy needs it); no headers, no bodies, no client IP, errors only, the
// key masked in the logged URL.
resource openAiApiDiagnostics 'Microsoft.ApiManagement/service/apis/diagnostics@2024-05-01' = {
  parent: openAiApi
  name: 'applicationinsights'
  properties: {
    loggerId: appInsightsLogger.id
    metrics: true
    alwaysLog: 'allErrors'
    logClientIp: false
    verbosity: 'error'
    sampling: {
      samplingType: 'fixed'
      percentage: 0
    }
    frontend: {
      request: maskedMessage
      response: maskedMessage
    }
    backend: {
      request: maskedMessage
      response: maskedMessage
    }
  }
}

resource openAiApiPolicy 'Microsoft.ApiManagement/service/apis/policies@2024-05-01' = {
  parent: openAiApi
  name: 'policy'
  properties: {
    format: 'rawxml'
    value: loadTextContent('policies/openai-api.xml')
  }
  dependsOn: [
    openAiBackend
    tokensPerMinuteValue
    openAiApiDiagnostics
  ]
}

resource openAiPostOperation 'Microsoft.ApiManagement/service/apis/operations@2024-05-01' = {
  parent: openAiApi
  name: 'post'
  properties: {
    displayName: 'POST (all inference operations)'
    method: 'POST'
    urlTemplate: '/*'
  }
}

resource openAiGetOperation 'Microsoft.ApiManagement/service/apis/operations@2024-05-01' = {
  parent: openAiApi
  name: 'get'
  properties: {
    displayName: 'GET (all read operations)'
    method: 'GET'
    urlTemplate: '/*'
  }
}

resource product 'Microsoft.ApiManagement/service/products@2024-05-01' = {
  parent: apim
  name: productName
  properties: {
    displayName: 'apimvault'
    description: 'Azure OpenAI for services that read their key from Key Vault with apimvault.'
    subscriptionRequired: true
    approvalRequired: false
    subscriptionsLimit: 1
    state: 'published'
  }
}

resource productApi 'Microsoft.ApiManagement/service/products/apis@2024-05-01' = {
  parent: product
  name: openAiApi.name
}

resource appSubscription 'Microsoft.ApiManagement/service/subscriptions@2024-05-01' = {
  parent: apim
  name: subscriptionName
  properties: {
    displayName: 'apimvault app'
    scope: product.id
    state: 'active'
    allowTracing: false
  }
}

// Least-privilege custom role for the rotation function: the four actions it needs on an APIM subscription,
// read from infra/roles/rotator.json (apimSubscriptionKeyRotator), the file apimvault.local's ARM plane enforces.
// Its assignable scope is this one APIM service (a custom role may name a single resource), and the assignment
// below narrows it further to the one APIM subscription.
var keyRotatorRoleSpec = loadJsonContent('../roles/rotator.json', '$.apimSubscriptionKeyRotator')

resource keyRotatorRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, apim.id, 'apimvault-apim-subscription-key-rotator')
  properties: {
    roleName: '${keyRotatorRoleSpec.roleName} (${apim.name}, ${uniqueString(resourceGroup().id)})'
    description: keyRotatorRoleSpec.description
    type: 'CustomRole'
    permissions: [
      {
        actions: loadJsonContent('../roles/rotator.json', '$.apimSubscriptionKeyRotator.actions')
        notActions: []
        dataActions: []
        notDataActions: []
      }
    ]
    assignableScopes: [
      apim.id
    ]
  }
}

// Second deployment only (assignRotatorRole): a role definition created in the same deployment can still be
// replicating ("RoleDefinitionDoesNotExist"). A rerun of the same command is idempotent.
resource rotatorOnSubscription 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (assignRotatorRole) {
  name: guid(appSubscription.id, rotatorPrincipalId, keyRotatorRole.id)
  scope: appSubscription
  properties: {
    roleDefinitionId: keyRotatorRole.id
    principalId: rotatorPrincipalId
    principalType: 'ServicePrincipal'
  }
}

output name string = apim.name
output gatewayUrl string = apim.properties.gatewayUrl
output subscriptionName string = appSubscription.name
output apimSubscriptionId string = appSubscription.id
output id string = apim.id
