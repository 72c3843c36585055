"""apimvault.local: an embedded local Azure (Key Vault, identity, APIM, Azure OpenAI) on loopback TLS.

Install with the ``local`` extra. The core package never imports this module.
"""

from ._common import Fault, Faults, Identity, TokenError, TokenIssuer, fingerprint
from .keyvault import ROLE_OFFICER, ROLE_USER
from .stack import API_VERSION, DEPLOYMENT, SECRET_NAME, LocalAzure

__all__ = [
    "API_VERSION",
    "DEPLOYMENT",
    "ROLE_OFFICER",
    "ROLE_USER",
    "SECRET_NAME",
    "Fault",
    "Faults",
    "Identity",
    "LocalAzure",
    "TokenError",
    "TokenIssuer",
    "fingerprint",
]
