// The Key Vault that holds the APIM subscription key.
//  - RBAC authorization only (no access policies), so rights can be granted on the one secret.
//  - Soft delete set explicitly with 90 days' retention, purge protection on.
//  - Network: default Deny always. networkMode 'private' (the default): public network access Disabled,
//    reachable only through the private endpoint. networkMode 'ipAllowList' (dev): public endpoint enabled but
//    limited to allowedIpAddresses; the private endpoint stays so the rotation function keeps its private path.
//  - Not usable by VMs, ARM template parameter references or disk encryption.
//  - Diagnostic settings: audit logs (every secret read/write) and all metrics to Log Analytics.

param name string
param location string
param tags object = {}

@allowed([
  'private'
  'ipAllowList'
])
param networkMode string = 'private'

@description('Public IPv4 addresses or CIDR ranges allowed in ipAllowList mode (developer machines).')
param allowedIpAddresses array = []

param privateEndpointSubnetId string
param privateDnsZoneId string
param logAnalyticsWorkspaceId string

@description('Add a CanNotDelete lock on the vault.')
param lockVault bool = true

var devAllowList = networkMode == 'ipAllowList'
var publicAccess = devAllowList ? 'Enabled' : 'Disabled'
var ipRules = [for ip in (devAllowList ? allowedIpAddresses : []): {
  value: ip
}]

resource vault 'Microsoft.KeyVault/vaults@2024-11-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    accessPolicies: []
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForTemplateDeployment: false
    enabledForDiskEncryption: false
    publicNetworkAccess: publicAccess
    networkAcls: {
      defaultAction: 'Deny'
      bypass: 'AzureServices'
      ipRules: ipRules
      virtualNetworkRules: []
    }
  }
}

resource vaultDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: vault
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

resource vaultLock 'Microsoft.Authorization/locks@2020-05-01' = if (lockVault) {
  name: 'do-not-delete'
  scope: vault
  properties: {
    level: 'CanNotDelete'
    notes: 'Holds the APIM subscription key used by apimvault clients; purge protection is on as well.'
  }
}

module vaultPrivateEndpoint 'privateEndpoint.bicep' = {
  name: 'pe-${name}'
  params: {
    name: 'pe-${name}'
    location: location
    tags: tags
    subnetId: privateEndpointSubnetId
    targetResourceId: vault.id
    groupId: 'vault'
    privateDnsZoneId: privateDnsZoneId
  }
}

output id string = vault.id
output name string = vault.name
output vaultUri string = vault.properties.vaultUri
