// Log Analytics workspace (sink for every diagnostic setting) and a workspace-based Application Insights
// component for the rotation function. Local (instrumentation-key) auth is disabled on App Insights: the
// function host sends telemetry with its managed identity.

@description('Log Analytics workspace name.')
param workspaceName string

@description('Application Insights component name.')
param appInsightsName string

param location string
param tags object = {}

@description('Log retention in days (audit logs of secret reads live here).')
@minValue(30)
@maxValue(730)
param retentionInDays int = 90

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: workspaceName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
    features: {
      disableLocalAuth: true
    }
    publicNetworkAccessForIngestion: 'Enabled'
    publicNetworkAccessForQuery: 'Enabled'
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    DisableLocalAuth: true
    IngestionMode: 'LogAnalytics'
    // Custom metrics keep their dimensions (the portal's "Custom metrics: With dimensions"): APIM's token
    // metrics (azure-openai-emit-token-metric) are split by subscription, product and deployment. Not in the
    // published API definitions, accepted by ARM (Azure/bicep#6595); tests/infra/type_check.py lists it.
    CustomMetricsOptedInType: 'WithDimensions'
  }
}

output workspaceId string = workspace.id
output appInsightsName string = appInsights.name
output appInsightsConnectionString string = appInsights.properties.ConnectionString
