// One private endpoint for one sub-resource (groupId) of a target resource, registered in a private DNS zone.

param name string
param location string
param tags object = {}

@description('Subnet the endpoint NIC lives in.')
param subnetId string

@description('Resource id of the target (vault, Cognitive Services account, storage account).')
param targetResourceId string

@description('Sub-resource: vault, account, blob.')
param groupId string

@description('Private DNS zone the endpoint registers its A record in.')
param privateDnsZoneId string

resource endpoint 'Microsoft.Network/privateEndpoints@2024-05-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    subnet: {
      id: subnetId
    }
    privateLinkServiceConnections: [
      {
        name: name
        properties: {
          privateLinkServiceId: targetResourceId
          groupIds: [
            groupId
          ]
        }
      }
    ]
  }
}

resource zoneGroup 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2024-05-01' = {
  parent: endpoint
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [
      {
        name: groupId
        properties: {
          privateDnsZoneId: privateDnsZoneId
        }
      }
    ]
  }
}

output id string = endpoint.id
