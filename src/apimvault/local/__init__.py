"""apimvault.local: an embedded local Azure (Key Vault, identity, APIM, Azure OpenAI) on loopback TLS.

Install with the ``local`` extra. The core package never imports this module.

A process that uses the async SDKs (aiohttp) against a stack trusts its CA first::

    from apimvault.local import LocalAzure, prepare_ca

    ca = prepare_ca()  # before openai / azure aio are imported: sets SSL_CERT_FILE, REQUESTS_CA_BUNDLE
    with LocalAzure(ca=ca) as azure, azure.env():
        ...

Only the names below are public; the modules starting with ``_`` are not.
"""

from .._key import fingerprint
from ._env import temporary_environ
from ._faults import Counters, Fault, Faults
from ._server import ServerThread, Service
from ._tls import LocalCA, prepare_ca
from ._tokens import TENANT_ID, Identity, TokenError, TokenIssuer
from .keyvault import ROLE_OFFICER, ROLE_USER
from .rbac import Assignment, Rbac, RoleDefinition, RoleError, load_infra_roles
from .stack import API_VERSION, DEPLOYMENT, SECRET_NAME, LocalAzure

__all__ = [
    "API_VERSION",
    "DEPLOYMENT",
    "ROLE_OFFICER",
    "ROLE_USER",
    "SECRET_NAME",
    "TENANT_ID",
    "Assignment",
    "Counters",
    "Fault",
    "Faults",
    "Identity",
    "LocalAzure",
    "LocalCA",
    "Rbac",
    "RoleDefinition",
    "RoleError",
    "ServerThread",
    "Service",
    "TokenError",
    "TokenIssuer",
    "fingerprint",
    "load_infra_roles",
    "prepare_ca",
    "temporary_environ",
]
