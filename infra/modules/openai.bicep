// The Azure OpenAI account APIM fronts. Key (local) auth is disabled: the only way in is Entra ID, and the
// only principal granted a data-plane role is APIM's managed identity (see apim.bicep). Public network access
// is disabled; APIM reaches it through its VNet integration and this account's private endpoint.

param name string
param location string
param tags object = {}

param deploymentName string
param modelName string
param modelVersion string

@description('Deployment capacity in thousands of tokens per minute.')
param deploymentCapacity int = 10

param deploymentSkuName string = 'Standard'

param privateEndpointSubnetId string
param privateDnsZoneId string
param logAnalyticsWorkspaceId string

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' = {
  name: name
  location: location
  tags: tags
  kind: 'OpenAI'
  sku: {
    name: 'S0'
  }
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    customSubDomainName: name
    disableLocalAuth: true
    publicNetworkAccess: 'Disabled'
    networkAcls: {
      defaultAction: 'Deny'
      ipRules: []
      virtualNetworkRules: []
    }
    restrictOutboundNetworkAccess: true
    allowedFqdnList: []
  }
}

resource modelDeployment 'Microsoft.CognitiveServices/accounts/deployments@2024-10-01' = {
  parent: account
  name: deploymentName
  sku: {
    name: deploymentSkuName
    capacity: deploymentCapacity
  }
  properties: {
    model: {
      format: 'OpenAI'
      name: modelName
      version: modelVersion
    }
  }
}

resource accountDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: account
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'audit'
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

module accountPrivateEndpoint 'privateEndpoint.bicep' = {
  name: 'pe-${name}'
  params: {
    name: 'pe-${name}'
    location: location
    tags: tags
    subnetId: privateEndpointSubnetId
    targetResourceId: account.id
    groupId: 'account'
    privateDnsZoneId: privateDnsZoneId
  }
}

output id string = account.id
output name string = account.name
output endpoint string = account.properties.endpoint
