"""Key Vault's wire vocabulary: roles, limits, error strings (cited where public) and the error type."""

from __future__ import annotations

import re
from typing import Any

ROLE_USER = "Key Vault Secrets User"
"""Read secret values and metadata (``getSecret/action``, ``readMetadata/action``)."""
ROLE_OFFICER = "Key Vault Secrets Officer"
"""Every secrets data action (``Microsoft.KeyVault/vaults/secrets/*``)."""
ROLE_ADMINISTRATOR = "Key Vault Administrator"
"""All data actions; for secrets the same as :data:`ROLE_OFFICER`."""

# -------------------------------------------------------------------------------------------- constants

RECOVERY_LEVEL = "Recoverable+Purgeable"
RECOVERABLE_DAYS = 90
MAX_VALUE_BYTES = 25_600
"""Largest secret value accepted (Key Vault's documented 25k-byte limit)."""
MAX_BODY_BYTES = 256 * 1024
"""Request bodies above this are refused with 413 without being read in full."""
MAX_TAGS = 15  # Key Vault's per-object tag limit (inference from the service docs; not verified on the wire)
DEFAULT_PAGE = 25  # spec: "If not specified the service will return up to 25 results."
SERVICE_VERSION = "1.9.2658.1"  # any value of the recorded shape (recordings show e.g. "1.1.6.0")

# The ARM resource the 403 messages name. The values are fictitious but shaped like the real ones.
VAULT_NAME = "kv-apimvault-local"
VAULT_LOCATION = "local"
VAULT_RESOURCE = (
    "/subscriptions/00000000-0000-4000-8000-00000000a11e/resourcegroups/rg-apimvault-local"
    f"/providers/microsoft.keyvault/vaults/{VAULT_NAME}"
)

# Key Vault's first-party application id, which is also an accepted token audience.
KEYVAULT_APP_ID = "cfa8b339-82a2-471a-a3c9-0fc0be7a4093"

# Every version the secrets data plane has served (azure-keyvault-secrets' ApiVersion enum: 2016-10-01,
# 7.0-7.6, 2025-07-01, 2026-04-01), plus its preview versions (7.x-preview[.N], YYYY-MM-DD-preview).
API_VERSIONS = frozenset(
    {"2016-10-01", "7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01", "2026-04-01"}
)
LATEST_API_VERSION = "2026-04-01"
_PREVIEW_VERSION_RE = re.compile(
    r"^(?:7\.[0-6]-preview(?:\.[0-9]+)?|20[0-9]{2}-[01][0-9]-[0-3][0-9]-preview)$"
)


NAME_RE = re.compile(r"^[0-9a-zA-Z-]{1,127}$")  # spec pattern ^[0-9a-zA-Z-]+$ plus the documented 1..127
HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
CLIENT_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,256}$")

_ACTION_PREFIX = "Microsoft.KeyVault/vaults/secrets/"
# operationId -> the RBAC data action it needs. Source: the Key Vault access-policy-to-RBAC mapping
# ("Secret Get,Microsoft.KeyVault/vaults/secrets/getSecret/action", "Secret List,.../readMetadata/action",
# "Secret Set,.../setSecret/action;.../update/action", "Secret Delete,.../delete", ...). Reading deleted
# secrets as readMetadata is an inference.
ACTIONS: dict[str, str] = {
    "GetSecret": _ACTION_PREFIX + "getSecret/action",
    "GetSecrets": _ACTION_PREFIX + "readMetadata/action",
    "GetSecretVersions": _ACTION_PREFIX + "readMetadata/action",
    "GetDeletedSecrets": _ACTION_PREFIX + "readMetadata/action",
    "GetDeletedSecret": _ACTION_PREFIX + "readMetadata/action",
    "SetSecret": _ACTION_PREFIX + "setSecret/action",
    "UpdateSecret": _ACTION_PREFIX + "update/action",
    "DeleteSecret": _ACTION_PREFIX + "delete",
    "PurgeDeletedSecret": _ACTION_PREFIX + "purge/action",
    "RecoverDeletedSecret": _ACTION_PREFIX + "recover/action",
    "BackupSecret": _ACTION_PREFIX + "backup/action",
    "RestoreSecret": _ACTION_PREFIX + "restore/action",
}
_ROLE_ACTIONS: dict[str, frozenset[str]] = {
    ROLE_USER: frozenset({ACTIONS["GetSecret"], ACTIONS["GetSecrets"]}),
    ROLE_OFFICER: frozenset(ACTIONS.values()),
    ROLE_ADMINISTRATOR: frozenset(ACTIONS.values()),
}
VAULT_WIDE = frozenset({"GetSecrets", "GetDeletedSecrets", "RestoreSecret"})
WITH_BODY = frozenset({"SetSecret", "UpdateSecret", "RestoreSecret"})

# ---- error strings (real ones are cited; the rest are inference) -------------------------------------------

# azure-sdk-for-js Key Vault recordings (sdk/keyvault/keyvault-secrets/recordings/).
MSG_MISSING_TOKEN = "Request is missing a Bearer or PoP token."  # noqa: S105
# Real strings: AKV10032 in MicrosoftDocs/azure-docs#75410; AKV10022 in MicrosoftDocs/azure-docs#109562 and
# public write-ups ("AKV10022: Invalid audience. Expected https://vault.azure.net, found: https://management...");
# AKV10046 in Azure-Samples/azuresandbox#362. The expired-token text is an inference.
MSG_INVALID_ISSUER = (
    "AKV10032: Invalid issuer. Expected one of https://sts.windows.net/{tenant}/, found {found}."
)
MSG_INVALID_AUDIENCE = "AKV10022: Invalid audience. Expected https://vault.azure.net, found: {found}."
MSG_BAD_SIGNATURE = "AKV10046: Unable to resolve the key used for signature validation."
MSG_EXPIRED = "Token validation failed: the token is expired."  # (inference)
# azure-sdk-for-js Key Vault recordings; an azure-sdk-for-net test fixture.
MSG_NOT_FOUND = (
    "A secret with (name/id) {name} was not found in this key vault. If you recently deleted this secret "
    "you may be able to recover it using the correct recovery command. For help resolving this issue, "
    "please see https://go.microsoft.com/fwlink/?linkid=2125182"
)
MSG_DELETED_NOT_FOUND = "Deleted Secret not found: {name}"
MSG_DELETED_BUT_RECOVERABLE = (
    "Secret {name} is currently in a deleted but recoverable state, and its name cannot be reused; "
    "in this state, the secret can only be recovered or purged."
)
# Azure/azure-sdk-for-js#24756 and ansible-collections/azure#1989 (code Forbidden, innererror SecretDisabled).
MSG_DISABLED = "Operation get is not allowed on a disabled secret."
MSG_SECRET_EXPIRED = "Operation get is not allowed on an expired secret."  # noqa: S105 - (inference; SecretStore)
# Observed: "(BadParameter) Secret is beyond the maximum permitted length of 25600 characters. Inner error:
# { "code": "SecretTooLarge" }" (quoted in a public PQC-on-Key-Vault write-up; also Azure/azure-cli#5639).
MSG_TOO_LARGE = "Secret is beyond the maximum permitted length of 25600 characters."
# The ForbiddenByRbac message as the real service formats it (hashicorp/terraform-provider-azurerm#27817,
# piyushsachdeva/Terraform_AKS#2): CRLF-separated lines, a space before the last CRLF of DecisionReason.
MSG_FORBIDDEN_RBAC = (
    "Caller is not authorized to perform action on resource.\r\n"
    "If role assignments, deny assignments or role definitions were changed recently, please observe "
    "propagation time.\r\n"
    "Caller: appid={appid};oid={oid};iss={iss}\r\n"
    "Action: '{action}'\r\n"
    "Resource: '{resource}'\r\n"
    "Assignment: (not found)\r\n"
    "DenyAssignmentId: null\r\n"
    "DecisionReason: 'DeniedWithNoValidRBAC' \r\n"
    "Vault: {vault};location={location}\r\n"
)
# Real text seen for an invalid request body: "Property  has invalid value" (Azure/azure-sdk-for-node#2198).
MSG_PROPERTY_INVALID = "Property {name} has invalid value"
# The following are inference (shapes follow the real BadParameter errors above).
MSG_API_VERSION = "The api-version query parameter (?api-version=) is required for all requests."
# Real text (Azure/azure-sdk-for-python#28595, Azure/azure-sdk-for-net#14789): 400 BadParameter "The specified
# version (7.3) is not recognized. Consider using the latest supported version (7.1)."
MSG_UNKNOWN_API_VERSION = (
    "The specified version ({version}) is not recognized."
    + " Consider using the latest supported version ({latest})."
)
MSG_BAD_NAME = "The request URI contains an invalid name: {name}"
MSG_MAXRESULTS = "The value of maxresults is invalid: it must be an integer between 1 and 25."
MSG_SKIPTOKEN = "The $skiptoken value is invalid."
MSG_NOT_JSON = "The request body is not valid JSON."
MSG_NOT_OBJECT = "The request body must be a JSON object."
MSG_CONTENT_TYPE = "The request content type must be application/json."
MSG_VALUE_REQUIRED = "Property value is required."
MSG_TOO_MANY_TAGS = "The number of tags exceeds the maximum of 15."
MSG_BAD_BACKUP = "Backup blob contains invalid or corrupt version."
MSG_EXISTS = "Secret {name} already exists."
MSG_BODY_TOO_LARGE = "The request body is too large."
MSG_NO_ROUTE = "The requested resource does not exist: {method} {path}"

STATUS_CODES = {
    400: "BadParameter",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "RequestEntityTooLarge",
    429: "Throttled",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


class KeyVaultError(Exception):
    """An error answer: HTTP status, Key Vault error code, message and optional inner error code."""

    def __init__(self, status: int, code: str, message: str, inner: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.inner = inner

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner is not None:
            error["innererror"] = {"code": self.inner}
        return {"error": error}


def bad_parameter(message: str, inner: str | None = None) -> KeyVaultError:
    return KeyVaultError(400, "BadParameter", message, inner)


def check_api_version(version: str) -> None:
    """Refuse an ``api-version`` the secrets data plane does not serve, as Key Vault does (400)."""
    if version not in API_VERSIONS and not _PREVIEW_VERSION_RE.match(version):
        raise bad_parameter(MSG_UNKNOWN_API_VERSION.format(version=version, latest=LATEST_API_VERSION))
