// Virtual network for the private path: private endpoints (Key Vault, Azure OpenAI, function storage),
// APIM v2 outbound VNet integration (reaches Azure OpenAI privately) and the function's VNet integration
// (reaches Key Vault and its storage privately). Each subnet has its own NSG.
//
// Function egress (issue 20 item 2): a NAT gateway with one static public IP on the function subnet, and the
// subnet's default outbound access off. The rotation function must reach two public endpoints besides its
// private ones: the APIM gateway (make-before-break probe) and Azure Resource Manager (regenerate/list the
// APIM key). A Flex Consumption app routes all its outbound traffic into the integration subnet; without a
// NAT gateway it relies on the subnet's implicit default outbound access, which Microsoft is retiring (subnets
// are private by default from network API 2025-07-01, and a redeploy at a newer API version would silently cut
// the function off). A private path instead would need APIM's inbound private endpoint plus an ARM Private
// Link (resource management private link) and DNS for both: more moving parts for a function that runs once
// a month. The NAT gateway also gives the function one known egress address (output natPublicIpAddress) to
// allow-list if the APIM gateway is ever IP-restricted.

param vnetName string
param location string
param tags object = {}

@description('Address space of the VNet.')
param addressPrefix string = '10.60.0.0/22'

@description('Subnet for private endpoints.')
param privateEndpointSubnetPrefix string = '10.60.0.0/26'

@description('Subnet for APIM v2 outbound VNet integration (at least /27).')
param apimSubnetPrefix string = '10.60.0.64/26'

@description('Subnet for the Flex Consumption function VNet integration.')
param functionSubnetPrefix string = '10.60.0.128/26'

// Private DNS zones the private endpoints register in. The vault and OpenAI zone names are fixed by the
// services; the blob zone follows the cloud's storage suffix.
var dnsZoneNames = [
  'privatelink.vaultcore.azure.net'
  'privatelink.openai.azure.com'
  'privatelink.blob.${environment().suffixes.storage}'
  'privatelink.queue.${environment().suffixes.storage}'
]

resource nsgPrivateEndpoints 'Microsoft.Network/networkSecurityGroups@2024-05-01' = {
  name: 'nsg-${vnetName}-pe'
  location: location
  tags: tags
  properties: {
    securityRules: []
  }
}

resource nsgApim 'Microsoft.Network/networkSecurityGroups@2024-05-01' = {
  name: 'nsg-${vnetName}-apim'
  location: location
  tags: tags
  properties: {
    securityRules: []
  }
}

resource nsgFunction 'Microsoft.Network/networkSecurityGroups@2024-05-01' = {
  name: 'nsg-${vnetName}-func'
  location: location
  tags: tags
  properties: {
    securityRules: []
  }
}

@description('Idle timeout in minutes of the function subnet\'s NAT gateway (4-120).')
@minValue(4)
@maxValue(120)
param natIdleTimeoutInMinutes int = 4

// Static egress address of the function subnet.
resource natPublicIp 'Microsoft.Network/publicIPAddresses@2024-05-01' = {
  name: 'pip-${vnetName}-nat'
  location: location
  tags: tags
  sku: {
    name: 'Standard'
    tier: 'Regional'
  }
  properties: {
    publicIPAddressVersion: 'IPv4'
    publicIPAllocationMethod: 'Static'
    idleTimeoutInMinutes: natIdleTimeoutInMinutes
  }
}

resource natGateway 'Microsoft.Network/natGateways@2024-05-01' = {
  name: 'ng-${vnetName}-func'
  location: location
  tags: tags
  sku: {
    name: 'Standard'
  }
  properties: {
    idleTimeoutInMinutes: natIdleTimeoutInMinutes
    publicIpAddresses: [
      {
        id: natPublicIp.id
      }
    ]
  }
}

resource vnet 'Microsoft.Network/virtualNetworks@2024-05-01' = {
  name: vnetName
  location: location
  tags: tags
  properties: {
    addressSpace: {
      addressPrefixes: [
        addressPrefix
      ]
    }
    subnets: [
      {
        name: 'snet-private-endpoints'
        properties: {
          addressPrefix: privateEndpointSubnetPrefix
          networkSecurityGroup: {
            id: nsgPrivateEndpoints.id
          }
          privateEndpointNetworkPolicies: 'Enabled'
          defaultOutboundAccess: false
        }
      }
      {
        // APIM StandardV2/PremiumV2 outbound VNet integration requires a subnet delegated to Microsoft.Web/serverFarms.
        name: 'snet-apim'
        properties: {
          addressPrefix: apimSubnetPrefix
          networkSecurityGroup: {
            id: nsgApim.id
          }
          delegations: [
            {
              name: 'Microsoft.Web.serverFarms'
              properties: {
                serviceName: 'Microsoft.Web/serverFarms'
              }
            }
          ]
        }
      }
      {
        // Flex Consumption VNet integration requires a subnet delegated to Microsoft.App/environments.
        // Egress to the APIM gateway and ARM goes through the NAT gateway only (no implicit outbound access).
        name: 'snet-function'
        properties: {
          addressPrefix: functionSubnetPrefix
          networkSecurityGroup: {
            id: nsgFunction.id
          }
          natGateway: {
            id: natGateway.id
          }
          defaultOutboundAccess: false
          delegations: [
            {
              name: 'Microsoft.App.environments'
              properties: {
                serviceName: 'Microsoft.App/environments'
              }
            }
          ]
        }
      }
    ]
  }
}

resource dnsZones 'Microsoft.Network/privateDnsZones@2024-06-01' = [for zone in dnsZoneNames: {
  name: zone
  location: 'global'
  tags: tags
}]

resource dnsZoneLinks 'Microsoft.Network/privateDnsZones/virtualNetworkLinks@2024-06-01' = [for (zone, i) in dnsZoneNames: {
  parent: dnsZones[i]
  name: 'link-${vnetName}'
  location: 'global'
  tags: tags
  properties: {
    registrationEnabled: false
    virtualNetwork: {
      id: vnet.id
    }
  }
}]

output vnetId string = vnet.id
output privateEndpointSubnetId string = vnet.properties.subnets[0].id
output apimSubnetId string = vnet.properties.subnets[1].id
output functionSubnetId string = vnet.properties.subnets[2].id
output keyVaultDnsZoneId string = dnsZones[0].id
output openAiDnsZoneId string = dnsZones[1].id
output blobDnsZoneId string = dnsZones[2].id
output queueDnsZoneId string = dnsZones[3].id
output natGatewayId string = natGateway.id
@description('The rotation function\'s only public egress address (NAT gateway).')
output natPublicIpAddress string = natPublicIp.properties.ipAddress
