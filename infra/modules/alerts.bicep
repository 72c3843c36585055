// Alerts that page someone when rotation stops silently or breaks clients. All go to the action group created
// here, whose receivers are a required, non-empty parameter (a deployment without one fails validation), and
// also to an existing action group when additionalActionGroupId is set.
//  1. A rotation event was dead-lettered (Event Grid gave up after its retries: the key was NOT rotated).
//  2. Event Grid failed to deliver to the function (each failed attempt; retries may still succeed).
//  3. The rotation function failed: failed requests in Application Insights whose cloud_RoleName is the
//     function app (the component also receives APIM's allErrors entries, which must not page here).
//  4. The secret is near expiry and no new version was written: Key Vault logged its SecretNearExpiry
//     notification for the secret more than rotationOverdueHours ago (by then Event Grid's 24-hour retry
//     window is over) and no successful SecretSet on the secret followed. The secret is then within
//     30 days - rotationOverdueHours of expiry (about 29 days with the default) and nothing is rotating it.
//     A scheduled query on the vault's audit logs (AzureDiagnostics), not on the function's own telemetry, so
//     it also fires when the function, its identity or the Event Grid subscription is gone. It stays fired
//     (autoMitigate false) until someone closes it.
//  5. The gateway's 401 rate: more than unauthorizedPercentThreshold percent of at least
//     unauthorizedMinRequests requests in 15 minutes answered 401, the first symptom of a rotation that
//     stored a key the gateway does not accept (or of clients holding a revoked key).
//  6. A rotation event landed in the poison queue (its run failed host.json's maxDequeueCount times): a
//     scheduled query on the storage account's queue logs. Stays fired until closed.
//  7. The key expires within 7 days (sev 1), then within 1 day (sev 0): the overdue alert (4, sev 2) escalated.
//     One query template, one rule per entry of expiryAlertThresholds (a loop).

param location string
param tags object = {}

@description('Resource id of an existing action group notified in addition to the one created here. Empty: only the created one.')
param additionalActionGroupId string = ''

@description('Name of the action group created here.')
param actionGroupName string

@description('E-mail receivers of the created action group: at least one (required, no default), so every alert reaches someone.')
@minLength(1)
param emailAddresses array

param systemTopicName string

@description('The rotation function\'s storage account and the poison queue of its rotation queue (rotation.bicep).')
param storageAccountName string
param poisonQueueName string
param appInsightsName string
param logAnalyticsWorkspaceId string
param keyVaultName string
param secretName string

@description('Name of the rotation function app: its telemetry carries this cloud_RoleName (cloud/roleName dimension).')
param functionAppName string

@description('Hours after Key Vault\'s SecretNearExpiry notification without a new secret version before the overdue-rotation alert fires. At least 25 (Event Grid retries for 24 hours), at most 47 (the query looks back 2 days).')
@minValue(25)
@maxValue(47)
param rotationOverdueHours int = 26

@description('Percentage of gateway requests answered 401 within 15 minutes above which the 401-rate alert fires.')
@minValue(1)
@maxValue(100)
param unauthorizedPercentThreshold int = 5

@description('Fewest gateway requests in the 15-minute window before the 401 rate is judged (a handful of stray calls without a key must not page).')
@minValue(1)
param unauthorizedMinRequests int = 20

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: actionGroupName
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'apimvault'
    enabled: true
    emailReceivers: [for (address, i) in emailAddresses: {
      name: 'email-${i}'
      emailAddress: address
      useCommonAlertSchema: true
    }]
  }
}

var extraActionGroups = empty(additionalActionGroupId) ? [] : [
  additionalActionGroupId
]
var queryAlertActionGroups = concat([
  actionGroup.id
], extraActionGroups)
var metricAlertActions = [for group in queryAlertActionGroups: {
  actionGroupId: group
}]

resource systemTopic 'Microsoft.EventGrid/systemTopics@2025-02-15' existing = {
  name: systemTopicName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource deadLettered 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'apimvault-rotation-dead-lettered'
  location: 'global'
  tags: tags
  properties: {
    description: 'A SecretNearExpiry event for the APIM key was dead-lettered: the key was NOT rotated. See the rotation-deadletter container and the function logs; rotate with apimvault rotate.'
    severity: 1
    enabled: true
    scopes: [
      systemTopic.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: false
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'DeadLettered'
          metricNamespace: 'Microsoft.EventGrid/systemTopics'
          metricName: 'DeadLetteredCount'
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Total'
        }
      ]
    }
    actions: metricAlertActions
  }
}

resource deliveryFailures 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'apimvault-rotation-delivery-failures'
  location: 'global'
  tags: tags
  properties: {
    description: 'Event Grid could not deliver a rotation event to the function (it retries for 24 hours, then dead-letters). Check the function app, its inbound restrictions and the AegDeliveryFailureLogs table.'
    severity: 2
    enabled: true
    scopes: [
      systemTopic.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'DeliveryFailed'
          metricNamespace: 'Microsoft.EventGrid/systemTopics'
          metricName: 'DeliveryAttemptFailCount'
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Total'
        }
      ]
    }
    actions: metricAlertActions
  }
}

resource functionErrors 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'apimvault-rotation-function-errors'
  location: 'global'
  tags: tags
  properties: {
    description: 'The rotation function failed (failed invocations with its cloud_RoleName in Application Insights). Event Grid retries; the function logs (FunctionAppLogs, AppExceptions) name the error, never the key.'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'FailedInvocations'
          metricNamespace: 'microsoft.insights/components'
          metricName: 'requests/failed'
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Count'
          // Only the function's own invocations, not APIM's failed requests in the same component.
          dimensions: [
            {
              name: 'cloud/roleName'
              operator: 'Include'
              values: [
                functionAppName
              ]
            }
          ]
        }
      ]
    }
    actions: metricAlertActions
  }
}

// Key Vault audit logs land in AzureDiagnostics (the vault's diagnostic setting sets no destination type), one
// row per operation with the record's properties flattened into typed columns (id -> id_s, requestUri ->
// requestUri_s, httpStatusCode -> httpStatusCode_d). Microsoft documents that a SecretSet record carries the
// request URI (PUT {vault}/secrets/{name}?api-version=...) and the secret URI of the object returned as `id`
// ({vault}/secrets/{name}/{version}); the secret name is taken from whichever of the two is present, so the
// filter matches with or without a version segment and never a secret whose name merely starts the same.
// SecretNearExpiryEventGridNotification is logged whether or not an Event Grid subscription exists.
// AzureDiagnostics gains a typed column only when a row first carries it, so on a fresh workspace these
// columns do not exist yet: column_ifexists() keeps the query valid then (and skipQueryValidation lets the
// rule be created before any vault log has arrived). Sample
// rows and a test: tests/infra/data/keyvault_azurediagnostics_rows.json, tests/infra/test_alert_queries.py.
var overdueQuery = format('''
let secretName = "{0}";
let vaultName = "{1}";
let overdue = {2}h;
let vaultLogs = AzureDiagnostics
  | where ResourceProvider == "MICROSOFT.KEYVAULT" and Resource =~ vaultName;
let lastWrite = toscalar(vaultLogs
  | where OperationName == "SecretSet" and column_ifexists("httpStatusCode_d", 0.0) == 200
  | extend idUri = column_ifexists("id_s", ""), requestUri = column_ifexists("requestUri_s", "")
  | extend objectName = extract(@"/secrets/([^/?]+)", 1, iff(isnotempty(idUri), idUri, requestUri))
  | where objectName =~ secretName
  | summarize max(TimeGenerated));
vaultLogs
  | where OperationName == "SecretNearExpiryEventGridNotification"
  | where column_ifexists("eventGridEventProperties_data_ObjectName_s", "") =~ secretName
  | extend expSeconds = column_ifexists("eventGridEventProperties_data_EXP_d", 0.0)
  | summarize notifiedAt = max(TimeGenerated), expiresAt = max(unixtime_seconds_todatetime(expSeconds))
  | where isnotnull(notifiedAt) and notifiedAt < ago(overdue)
  | where isnull(lastWrite) or lastWrite < notifiedAt
  | extend daysToExpiry = datetime_diff("day", expiresAt, now())
''', secretName, keyVaultName, rotationOverdueHours)

resource rotationOverdue 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'apimvault-rotation-overdue'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'apimvault: APIM key near expiry and not rotated'
    description: 'Key Vault announced SecretNearExpiry for the APIM key more than ${rotationOverdueHours} hours ago and no new version was written. Clients keep working until the expiry (daysToExpiry in the result); rotate now with apimvault rotate and find out why the function did not.'
    // The first of three escalating alerts: this one about 29 days before the expiry, then 7 days (sev 1)
    // and 1 day (sev 0) before it (expiringAlerts below).
    severity: 2
    enabled: true
    scopes: [
      logAnalyticsWorkspaceId
    ]
    evaluationFrequency: 'PT1H'
    windowSize: 'P2D'
    autoMitigate: false
    // The workspace has no Key Vault columns until the vault has logged: validate at run time, not creation.
    skipQueryValidation: true
    criteria: {
      allOf: [
        {
          query: overdueQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: queryAlertActionGroups
    }
  }
}

// The overdue alert (above) escalated: the key expires within `days` days and is still the one in use. A log
// alert scans at most the last two days whatever its query says (Learn, "Create a log search alert rule":
// "the alert time range is limited to a maximum of two days"), and Key Vault logs SecretNearExpiry 30 days
// before the expiry (whether it repeats is undocumented, azure-docs#56992), so 7 or 1 day before the expiry
// that row is usually out of reach. The query therefore reads two sources and fires on either:
//  - vault: a SecretNearExpiryEventGridNotification for the secret within the window with no successful
//    SecretSet after it, whose EXP is within `days` (a version written with a short expiry, or a repeated
//    notification): the same shape and filters as the overdue query;
//  - clients: the providers' OpenTelemetry gauge apimvault.key.expires_in (seconds until the served key's
//    expires_on, reported only from 7 days before it; attribute apimvault.secret = <vault URL>/secrets/<name>)
//    as the Azure Monitor exporter stores it in the workspace's AppMetrics table (Name, Min, Properties),
//    within the last hour, so a key rotated since then no longer counts. Needs clients that export their
//    metrics to this Application Insights component (README "Observability").
// Both legs yield daysToExpiry as a real number (union keeps one column only when the types agree).
// Sample rows and tests: tests/infra/data/, tests/infra/test_alert_queries.py.
var expiryQueryTemplate = '''
let secretName = "{0}";
let vaultName = "{1}";
let days = {2};
let clientWindow = 1h;
let vaultLogs = AzureDiagnostics
  | where ResourceProvider == "MICROSOFT.KEYVAULT" and Resource =~ vaultName;
let lastWrite = toscalar(vaultLogs
  | where OperationName == "SecretSet" and column_ifexists("httpStatusCode_d", 0.0) == 200
  | extend idUri = column_ifexists("id_s", ""), requestUri = column_ifexists("requestUri_s", "")
  | extend objectName = extract(@"/secrets/([^/?]+)", 1, iff(isnotempty(idUri), idUri, requestUri))
  | where objectName =~ secretName
  | summarize max(TimeGenerated));
let announced = vaultLogs
  | where OperationName == "SecretNearExpiryEventGridNotification"
  | where column_ifexists("eventGridEventProperties_data_ObjectName_s", "") =~ secretName
  | extend expSeconds = column_ifexists("eventGridEventProperties_data_EXP_d", 0.0)
  | summarize notifiedAt = max(TimeGenerated), expiresAt = max(unixtime_seconds_todatetime(expSeconds))
  | where isnotnull(notifiedAt)
  | where isnull(lastWrite) or lastWrite < notifiedAt
  | extend daysToExpiry = (expiresAt - now()) / 1d, source = "vault";
let reported = AppMetrics
  | where TimeGenerated > ago(clientWindow) and Name == "apimvault.key.expires_in"
  | extend secretUri = tostring(Properties["apimvault.secret"])
  | where extract(@"^https://([^./]+)\.", 1, secretUri) =~ vaultName
  | where extract(@"/secrets/([^/?]+)", 1, secretUri) =~ secretName
  | summarize secondsLeft = min(Min)
  | where isnotnull(secondsLeft)
  | extend daysToExpiry = secondsLeft / 86400.0, source = "clients";
union announced, reported
  | where daysToExpiry <= days
'''

// The escalating expiry alerts: days before the expiry at which each fires, and its severity (0 is the most
// severe). The overdue alert (sev 2) comes first, about 29 days before.
var expiryAlertThresholds = [
  {
    days: 7
    severity: 1
  }
  {
    days: 1
    severity: 0
  }
]

resource expiringAlerts 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = [for threshold in expiryAlertThresholds: {
  name: 'apimvault-key-expires-within-${threshold.days}d'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'apimvault: APIM key expires within ${threshold.days} day(s)'
    description: 'The APIM key in use expires within ${threshold.days} day(s) (daysToExpiry and source in the result: vault = Key Vault\'s near-expiry notification with no new version since, clients = the providers\' apimvault.key.expires_in gauge). At the expiry the providers stop serving it and every client fails: rotate now with apimvault rotate, then find out why the rotation did not run (overdue alert, poison queue, function logs).'
    severity: threshold.severity
    enabled: true
    scopes: [
      logAnalyticsWorkspaceId
    ]
    evaluationFrequency: 'PT1H'
    windowSize: 'P2D'
    autoMitigate: false
    // AzureDiagnostics has no Key Vault columns until the vault has logged: validate at run time.
    skipQueryValidation: true
    criteria: {
      allOf: [
        {
          query: format(expiryQueryTemplate, secretName, keyVaultName, threshold.days)
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: queryAlertActionGroups
    }
  }
}]

output actionGroupId string = actionGroup.id

// The gateway's 401 rate over all APIs (resource-specific table: APIM's diagnostic setting uses the Dedicated
// destination). A bad rotation shows here first: clients present a key the gateway no longer (or not yet)
// accepts. Noise from callers without any key is damped by the minimum request count and the percentage.
var unauthorizedQuery = format('''
let minRequests = {0};
let maxPercent = {1};
ApiManagementGatewayLogs
  | summarize total = count(), unauthorized = countif(ResponseCode == 401)
  | extend unauthorizedPercent = iff(total == 0, 0.0, round(100.0 * unauthorized / total, 1))
  | where total >= minRequests and unauthorizedPercent > maxPercent
''', unauthorizedMinRequests, unauthorizedPercentThreshold)

resource gatewayUnauthorized 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'apimvault-gateway-401-rate'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'apimvault: APIM gateway 401 rate'
    description: 'More than ${unauthorizedPercentThreshold}% of at least ${unauthorizedMinRequests} gateway requests in 15 minutes were refused with 401. After a rotation: the stored key is not (yet) accepted by the gateway or clients hold a revoked key; run apimvault check, see infra/README.md "Runbook: 401 spike".'
    severity: 1
    enabled: true
    scopes: [
      logAnalyticsWorkspaceId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    // ApiManagementGatewayLogs may hold no rows before the first request: validate at run time.
    skipQueryValidation: true
    criteria: {
      allOf: [
        {
          query: unauthorizedQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: queryAlertActionGroups
    }
  }
}

// A rotation event whose run failed maxDequeueCount times (host.json) was moved to the poison queue: the key was
// NOT rotated and nothing retries it. The storage account's queue logs (StorageQueueLogs, rotation.bicep's
// diagnostic setting) show the host's PutMessage on the poison queue.
var poisonQuery = format('''
StorageQueueLogs
  | where AccountName =~ "{0}" and OperationName == "PutMessage" and StatusCode == 201
  | where Uri contains "/{1}/messages"
''', storageAccountName, poisonQueueName)

resource rotationPoisoned 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'apimvault-rotation-poisoned'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'apimvault: rotation event moved to the poison queue'
    description: 'A SecretNearExpiry event failed its rotation 5 times and is in the ${poisonQueueName} queue: the APIM key was NOT rotated. The function logs (FunctionAppLogs) name the error, never the key; fix it, then rotate with apimvault rotate (or move the message back to the rotation queue).'
    severity: 1
    enabled: true
    scopes: [
      logAnalyticsWorkspaceId
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT1H'
    autoMitigate: false
    criteria: {
      allOf: [
        {
          query: poisonQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: queryAlertActionGroups
    }
  }
}
