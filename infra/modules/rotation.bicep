// Automated dual-key rotation.
//   Key Vault --(SecretNearExpiry, 30 days before exp)--> Event Grid system topic --> event subscription
//   (filtered to the one secret; retries; dead-letter to a blob container) --> Storage queue
//   apimvault-rotation-events on the function's own storage account (delivered with the topic's managed
//   identity; answered as soon as the message is stored) --> Azure Function (Python, queue trigger) that
//   calls apimvault.rotation.rotate_from_event with the rotator identity. A run that fails is retried by the
//   queue (host.json); after 5 failed runs the message is in apimvault-rotation-events-poison, which pages
//   (alerts.bicep). See infra/README.md "Event delivery".
//
// Network: the function reaches Key Vault and its own storage through VNet integration and private endpoints,
// and the APIM gateway and ARM through the NAT gateway on its subnet (network.bicep: explicit egress);
// its inbound side accepts only the AzureEventGrid service tag (Event Grid push delivery cannot reach a
// private endpoint). Storage takes Entra ID only (shared keys off) and denies public traffic except trusted
// Azure services (Event Grid writes dead letters with the system topic's managed identity).

param location string
param tags object = {}

param storageAccountName string
param functionAppName string
param functionPlanName string
param systemTopicName string

@description('Name of the function inside the app (function_app.py @app.function_name).')
param functionName string = 'rotate_apim_key'

param keyVaultName string
param keyVaultUri string
param secretName string

@description('Resource id of the APIM subscription the secret holds a key of (passed to the function).')
param apimSubscriptionResourceId string

@description('Every APIM gateway URL that must accept a regenerated key before the rotation stores it: the service\'s gatewayUrl, plus each additional location\'s gatewayRegionalUrl and each self-hosted gateway. The function probes each one (GET <url>/openai/v1/models, no tokens), so it needs network reach to all of them.')
@minLength(1)
param apimGatewayUrls array

param rotatorIdentityId string
param rotatorClientId string
param functionHostIdentityId string
param functionHostPrincipalId string
param functionHostClientId string

param functionSubnetId string
param privateEndpointSubnetId string
param blobDnsZoneId string

@description('Private DNS zone privatelink.queue.<storage suffix>: the function reads its rotation queue through a queue private endpoint.')
param queueDnsZoneId string

param logAnalyticsWorkspaceId string
param appInsightsName string
param appInsightsConnectionString string

@description('Public IPs allowed to the function app\'s deployment (SCM) endpoint, for publishing the code.')
param deployerIpAddresses array = []

@description('Create the Event Grid subscription (phase 2, with the rotator\'s roles). It delivers to the rotation queue, so events that arrive before the function code is published wait there.')
param enableEventSubscription bool = false

@description('Most instances the Flex Consumption app may scale out to (functionAppConfig.scaleAndConcurrency.maximumInstanceCount). 40 is the lowest value every region accepts (Learn: Flex Consumption plan, "Instance scaling limits"; lower values only in some regions in preview, azure-functions-host#10523) and 1000 the highest. Not needed for correctness: overlapping runs for the same secret are serialised by the per-secret blob lease (apimvault.rotation), so a second instance waits or finds the rotation done.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

var deploymentContainerName = 'deploymentpackage'
var deadLetterContainerName = 'rotation-deadletter'
// The queue Event Grid delivers to: infra/rotation_function/rotation_handler.py ROTATION_QUEUE. The Functions
// host moves a message that failed maxDequeueCount (host.json) runs to <queue>-poison.
var rotationQueueName = 'apimvault-rotation-events'
var poisonQueueName = '${rotationQueueName}-poison'
var storageQueueDataContributorRoleId = '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
var storageQueueDataMessageSenderRoleId = 'c6a89b2d-59bc-44d0-9896-0f6e12d7b80a'
var storageBlobDataOwnerRoleId = 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
var storageBlobDataContributorRoleId = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
var monitoringMetricsPublisherRoleId = '3913510d-42f4-4e42-8a64-420c390055eb'

// ----------------------------------------------------------------------------------------------- storage

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_GZRS'
  }
  properties: {
    // checkov:skip=CKV_AZURE_59: Public network access stays "Enabled from selected networks" (default Deny, no IP rules) so the trusted-service exception lets Event Grid write dead letters with its managed identity; everything else goes through the blob private endpoint.
    // checkov:skip=CKV_AZURE_43: The name is computed ('st' + namePrefix + uniqueString), lowercase alphanumeric and at most 21 characters by main.bicep's parameter constraints; checkov cannot evaluate the expression.
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowCrossTenantReplication: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Deny'
      bypass: 'AzureServices'
      ipRules: []
      virtualNetworkRules: []
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
        }
        file: {
          enabled: true
        }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource deadLetterContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deadLetterContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource storageBlobDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: blobService
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
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

module storagePrivateEndpoint 'privateEndpoint.bicep' = {
  name: 'pe-${storageAccountName}-blob'
  params: {
    name: 'pe-${storageAccountName}-blob'
    location: location
    tags: tags
    subnetId: privateEndpointSubnetId
    targetResourceId: storage.id
    groupId: 'blob'
    privateDnsZoneId: blobDnsZoneId
  }
}

// The Functions host (not the rotation code) reads its deployment package and keeps its leases in this account.
resource hostBlobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, functionHostPrincipalId, storageBlobDataOwnerRoleId)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataOwnerRoleId)
    principalId: functionHostPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// ------------------------------------------------------------------------------------ delivery queue

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource rotationQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: rotationQueueName
}

// Created here (not by the host on first use) so its role assignment and the poison alert exist up front.
resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: poisonQueueName
}

// StorageWrite holds the PutMessage on the poison queue that the poison alert (alerts.bicep) looks for.
resource storageQueueDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: queueService
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        category: 'StorageWrite'
        enabled: true
      }
      {
        category: 'StorageDelete'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

module queuePrivateEndpoint 'privateEndpoint.bicep' = {
  name: 'pe-${storageAccountName}-queue'
  params: {
    name: 'pe-${storageAccountName}-queue'
    location: location
    tags: tags
    subnetId: privateEndpointSubnetId
    targetResourceId: storage.id
    groupId: 'queue'
    privateDnsZoneId: queueDnsZoneId
  }
}

// The queue trigger (connection AzureWebJobsStorage, the host identity) reads, updates and deletes messages
// of the rotation queue and writes failed ones to the poison queue: Contributor on those two queues only.
resource hostRotationQueueContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(rotationQueue.id, functionHostPrincipalId, storageQueueDataContributorRoleId)
  scope: rotationQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributorRoleId)
    principalId: functionHostPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource hostPoisonQueueContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(poisonQueue.id, functionHostPrincipalId, storageQueueDataContributorRoleId)
  scope: poisonQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributorRoleId)
    principalId: functionHostPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// Entra-authenticated telemetry (App Insights local auth is off).
resource hostMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, functionHostPrincipalId, monitoringMetricsPublisherRoleId)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisherRoleId)
    principalId: functionHostPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// ----------------------------------------------------------------------------------------------- function

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: functionPlanName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    // checkov:skip=CKV_AZURE_225: Zone redundancy is not offered for Flex Consumption in every region; the function runs about once a month and Event Grid retries delivery for 24 hours, then dead-letters.
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: functionAppName
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${rotatorIdentityId}': {}
      '${functionHostIdentityId}': {}
    }
  }
  properties: {
    // checkov:skip=CKV_AZURE_222: Event Grid push delivery cannot reach a private endpoint; inbound is limited to the AzureEventGrid service tag (ipSecurityRestrictions, default Deny) plus the function's system key.
    // checkov:skip=CKV_AZURE_17: Event Grid cannot present a client certificate; callers are limited by service tag and function key instead.
    // checkov:skip=CKV_AZURE_212: Flex Consumption scales from zero; a missed delivery is retried by Event Grid for 24 hours and then dead-lettered, so no standby instance is kept.
    // checkov:skip=CKV_AZURE_213: The app serves only the Event Grid trigger (no HTTP route to probe); Flex Consumption manages instance health itself.
    serverFarmId: plan.id
    httpsOnly: true
    publicNetworkAccess: 'Enabled'
    clientCertEnabled: false
    virtualNetworkSubnetId: functionSubnetId
    keyVaultReferenceIdentity: rotatorIdentityId
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      remoteDebuggingEnabled: false
      // No cors block: Flex Consumption does not support it (and nothing calls the function from a browser).
      ipSecurityRestrictionsDefaultAction: 'Deny'
      ipSecurityRestrictions: [
        {
          name: 'AllowEventGrid'
          description: 'Event Grid push delivery of SecretNearExpiry events'
          action: 'Allow'
          priority: 100
          tag: 'ServiceTag'
          ipAddress: 'AzureEventGrid'
        }
      ]
      scmIpSecurityRestrictionsUseMain: false
      scmIpSecurityRestrictionsDefaultAction: 'Deny'
      scmIpSecurityRestrictions: [for (ip, i) in deployerIpAddresses: {
        name: 'AllowDeployer${i}'
        action: 'Allow'
        priority: 100 + i
        ipAddress: contains(ip, '/') ? ip : '${ip}/32'
      }]
      appSettings: [
        {
          name: 'AzureWebJobsStorage__accountName'
          value: storage.name
        }
        {
          name: 'AzureWebJobsStorage__credential'
          value: 'managedidentity'
        }
        {
          name: 'AzureWebJobsStorage__clientId'
          value: functionHostClientId
        }
        {
          name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
          value: appInsightsConnectionString
        }
        {
          name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
          value: 'ClientId=${functionHostClientId};Authorization=AAD'
        }
        {
          // DefaultAzureCredential in the rotation code picks the rotator identity.
          name: 'AZURE_CLIENT_ID'
          value: rotatorClientId
        }
        {
          name: 'AZURE_KEYVAULT_URL'
          value: keyVaultUri
        }
        {
          name: 'APIMVAULT_SECRET_NAME'
          value: secretName
        }
        {
          // The only APIM subscription the function may rotate; a ProviderAddress tag naming another is refused.
          name: 'APIMVAULT_APIM_SUBSCRIPTION_ID'
          value: apimSubscriptionResourceId
        }
        {
          // Make-before-break: the rotation writes the vault only once every gateway here accepts the new key.
          name: 'APIMVAULT_GATEWAY_URLS'
          value: join(apimGatewayUrls, ',')
        }
        {
          // One invocation at a time per instance: the (synchronous) Python function runs on this thread pool.
          name: 'PYTHON_THREADPOOL_THREAD_COUNT'
          value: '1'
        }
      ]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: functionHostIdentityId
          }
        }
      }
      // One invocation per instance. The instance cap is the lowest every region accepts (40), not a
      // correctness guard: overlapping deliveries of one event (Event Grid is at-least-once) are serialised by
      // the per-secret blob lease, whatever the number of instances.
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: 2048
        triggers: {
          http: {
            perInstanceConcurrency: 1
          }
        }
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
  // The host reaches its storage only through the blob private endpoint (public access is Deny): the app must
  // not start before the endpoint and its DNS record exist.
  dependsOn: [
    deploymentContainer
    hostBlobOwner
    storagePrivateEndpoint
    queuePrivateEndpoint
    hostRotationQueueContributor
  ]
}

resource functionDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: functionApp
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        category: 'FunctionAppLogs'
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

// ----------------------------------------------------------------------------------------------- event grid

resource vault 'Microsoft.KeyVault/vaults@2024-11-01' existing = {
  name: keyVaultName
}

resource systemTopic 'Microsoft.EventGrid/systemTopics@2025-02-15' = {
  name: systemTopicName
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: vault.id
    topicType: 'Microsoft.KeyVault.vaults'
  }
}

resource systemTopicDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: systemTopic
  properties: {
    workspaceId: logAnalyticsWorkspaceId
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

// The system topic's identity may put messages on the rotation queue (and nothing else on the account).
// Event Grid delivers to a storage account behind a firewall only with a system-assigned identity and the
// trusted-services exception (networkAcls.bypass AzureServices).
resource topicQueueSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(rotationQueue.id, systemTopic.id, storageQueueDataMessageSenderRoleId)
  scope: rotationQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataMessageSenderRoleId)
    principalId: systemTopic.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// The system topic's identity may write dead letters into the one container.
resource topicDeadLetterWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(deadLetterContainer.id, systemTopic.id, storageBlobDataContributorRoleId)
  scope: deadLetterContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributorRoleId)
    principalId: systemTopic.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource nearExpirySubscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2025-02-15' = if (enableEventSubscription) {
  parent: systemTopic
  name: 'apim-key-near-expiry'
  properties: {
    eventDeliverySchema: 'EventGridSchema'
    // To the queue, not to the function: Event Grid waits only 30 s for an answer and the Event Grid trigger
    // answers when the rotation ends (minutes), so every delivery would time out and be redelivered.
    deliveryWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      destination: {
        endpointType: 'StorageQueue'
        properties: {
          resourceId: storage.id
          queueName: rotationQueueName
          queueMessageTimeToLiveInSeconds: -1
        }
      }
    }
    filter: {
      includedEventTypes: [
        'Microsoft.KeyVault.SecretNearExpiry'
      ]
      subjectBeginsWith: secretName
      subjectEndsWith: secretName
      isSubjectCaseSensitive: true
      enableAdvancedFilteringOnArrays: true
      advancedFilters: [
        {
          operatorType: 'StringIn'
          key: 'data.ObjectName'
          values: [
            secretName
          ]
        }
      ]
    }
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
    deadLetterWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      deadLetterDestination: {
        endpointType: 'StorageBlob'
        properties: {
          resourceId: storage.id
          blobContainerName: deadLetterContainerName
        }
      }
    }
  }
  dependsOn: [
    topicDeadLetterWriter
    topicQueueSender
  ]
}

output functionAppName string = functionApp.name
output functionName string = functionName
output systemTopicName string = systemTopic.name
output deadLetterContainerName string = deadLetterContainerName
output storageAccountName string = storage.name
output rotationQueueName string = rotationQueueName
output poisonQueueName string = poisonQueueName
