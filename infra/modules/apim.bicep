// API Management in front of Azure OpenAI.
//  - Old protocols off: TLS 1.0/1.1 and SSL 3.0 disabled on the client (frontend) and backend side, 3DES off.
//  - Management API calls below apiVersionConstraint.minApiVersion are refused.
//  - The API requires a subscription, accepts its key only in the Ocp-Apim-Subscription-Key header, and reaches
//    Azure OpenAI with APIM's system-assigned managed identity (Cognitive Services OpenAI User on that account).
//  - One product and one product-scoped subscription (tracing off): that subscription's key is what Key Vault
//    holds and what the rotation function regenerates.
//  - The rotator identity gets a custom role, assigned on that one APIM subscription only: read it, list its
//    keys, regenerate either key. Nothing else in APIM.
//  - Diagnostic settings (gateway logs and metrics) to Log Analytics; gateway request logging never records
//    headers or bodies (the key is a header).

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

var cognitiveServicesOpenAiUserRoleId = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'

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
    customProperties: {
      'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Tls10': 'False'
      'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Tls11': 'False'
      'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Ssl30': 'False'
      'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Backend.Protocols.Tls10': 'False'
      'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Backend.Protocols.Tls11': 'False'
      'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Backend.Protocols.Ssl30': 'False'
      'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Ciphers.TripleDes168': 'False'
    }
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

// Gateway request logging to Azure Monitor: no headers, no bodies (the subscription key travels in a header).
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
      request: {
        headers: []
        body: {
          bytes: 0
        }
      }
      response: {
        headers: []
        body: {
          bytes: 0
        }
      }
    }
    backend: {
      request: {
        headers: []
        body: {
          bytes: 0
        }
      }
      response: {
        headers: []
        body: {
          bytes: 0
        }
      }
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

resource openAiApiPolicy 'Microsoft.ApiManagement/service/apis/policies@2024-05-01' = {
  parent: openAiApi
  name: 'policy'
  properties: {
    format: 'rawxml'
    value: loadTextContent('policies/openai-api.xml')
  }
  dependsOn: [
    openAiBackend
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

// Least-privilege custom role for the rotation function: the four actions it needs on an APIM subscription.
// Custom roles cannot list a single resource as assignable scope, so the definition is assignable in this
// resource group and the assignment below narrows it to the one subscription.
resource keyRotatorRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, apim.id, 'apimvault-apim-subscription-key-rotator')
  properties: {
    roleName: 'apimvault APIM subscription key rotator (${apim.name}, ${uniqueString(resourceGroup().id)})'
    description: 'Read an APIM subscription, list its keys and regenerate its primary or secondary key.'
    type: 'CustomRole'
    permissions: [
      {
        actions: [
          'Microsoft.ApiManagement/service/subscriptions/read'
          'Microsoft.ApiManagement/service/subscriptions/listSecrets/action'
          'Microsoft.ApiManagement/service/subscriptions/regeneratePrimaryKey/action'
          'Microsoft.ApiManagement/service/subscriptions/regenerateSecondaryKey/action'
        ]
        notActions: []
        dataActions: []
        notDataActions: []
      }
    ]
    assignableScopes: [
      resourceGroup().id
    ]
  }
}

resource rotatorOnSubscription 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
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
