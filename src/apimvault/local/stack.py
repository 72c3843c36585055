"""The local Azure stack: Key Vault, managed identity, APIM (gateway, ARM), Azure OpenAI on loopback TLS."""

from __future__ import annotations

import contextlib
import os
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ..rotation import ApimSubscriptionRef
from ._env import temporary_environ
from ._server import ServerThread, Service
from ._tls import LocalCA
from ._tokens import TENANT_ID, Clock, Identity, TokenIssuer
from .admin import AdminService
from .apim import DEFAULT_UNITS, ApimGateway, ApimState, ArmService, DelaySpec
from .identity import IdentityService, write_az_stub
from .keyvault import ROLE_OFFICER, ROLE_USER, KeyVaultService
from .oidc import OidcService
from .openai_backend import OpenAIBackend
from .policies import ApiPolicies

SECRET_NAME = "apim-subscription-key"  # noqa: S105 - a secret name, not a value
DEPLOYMENT = "gpt-4o-mini"
API_VERSION = "2024-10-21"
ARM_SUBSCRIPTION = "00000000-0000-4000-8000-00000000a11e"
RESOURCE_GROUP = "rg-apimvault-local"
APIM_SERVICE = "apim-apimvault-local"
APIM_SUBSCRIPTION = "apimvault-app"
VALIDITY_DAYS = 60

# Variables that would send DefaultAzureCredential (or anything else) off this machine; unset in env().
_FOREIGN_IDENTITY_VARS = (
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_USERNAME",
    "AZURE_PASSWORD",
    "AZURE_FEDERATED_TOKEN_FILE",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "AZURE_CLIENT_ID",
    "AZURE_OPENAI_API_KEY",
    "AZURE_OPENAI_AD_TOKEN",
)


class LocalAzure:
    """An embedded local Azure for tests, demos and drills.

    Use it as a context manager::

        with LocalAzure() as azure, azure.env():
            ...  # DefaultAzureCredential(), SecretClient(azure.vault_url, ...), AzureOpenAI(...) all work

    ``seed=True`` (the default) creates the APIM subscription ``apimvault-app`` and the vault secret
    ``apim-subscription-key`` holding its primary key (tags ``CredentialId=primary``,
    ``ValidityPeriodDays=60``, ``ProviderAddress=<subscription id>``, an expiry), grants the default
    identity ``Key Vault Secrets User`` on that secret only, and the named identity ``officer``
    ``Key Vault Secrets Officer`` on the whole vault.

    ``gateway_header_name`` renames the header the gateway reads the key from (APIM's
    ``subscriptionKeyParameterNames.header``, e.g. ``api-key``).

    Gateway propagation (see :mod:`apimvault.local.apim`):
    ``gateway_units`` names the gateway units (the first answers at
    ``gateway_url``, every unit also at ``gateway_url + "/<unit>"``, see :attr:`gateway_unit_urls`);
    ``propagation_delay`` (seconds, a ``(low, high)`` range drawn per regeneration, or ``{unit: either}``)
    is how long a unit keeps accepting a regenerated key's old value and refusing its new one; default 0.
    ``propagation_clock`` is that delay's time source (default ``time.monotonic``; tests inject one),
    ``propagation_seed`` makes drawn delays reproducible. Change it later with
    ``apim_state.set_propagation`` or the admin API (``PUT /gateway/propagation``).

    ``policies`` sets the gateway's per-API policies (quota, rate limit, token limit, Entra token check;
    :class:`apimvault.local.policies.ApiPolicies` or its dict form); change them later with
    ``azure.gateway.policies.set("/openai", ...)`` or the admin API.

    ``ca`` reuses a CA made earlier. aiohttp (azure-core's async transport) reads ``SSL_CERT_FILE``
    once, when it is imported: a process that imports it before the stack exists must create the CA
    first, point ``SSL_CERT_FILE`` at ``ca.ca_path`` and hand the CA in (the tests' conftest does this).
    """

    def __init__(
        self,
        *,
        directory: str | Path | None = None,
        clock: Clock = time.time,
        seed: bool = True,
        rate_limit_per_minute: int | None = None,
        ca: LocalCA | None = None,
        gateway_header_name: str = "Ocp-Apim-Subscription-Key",
        gateway_units: Sequence[str] = DEFAULT_UNITS,
        propagation_delay: DelaySpec | Mapping[str, DelaySpec] = 0.0,
        propagation_clock: Callable[[], float] | None = None,
        propagation_seed: int | None = None,
        policies: ApiPolicies | Mapping[str, Any] | None = None,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="apimvault-local-")
            directory = self._tmp.name
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.ca = ca if ca is not None else LocalCA(self.directory)
        self.tokens = TokenIssuer(clock=clock)
        self.identity = IdentityService(self.tokens)
        self.default_identity: Identity = self.identity.default
        self.officer_identity: Identity = self.identity.add("officer")
        self.keyvault = KeyVaultService(self.tokens, clock=clock)
        self.apim_state = ApimState(
            units=gateway_units,
            propagation_delay=propagation_delay,
            clock=propagation_clock or time.monotonic,
            seed=propagation_seed,
        )
        self.openai = OpenAIBackend()
        self.gateway = ApimGateway(
            self.apim_state,
            self.openai,
            rate_limit_per_minute=rate_limit_per_minute,
            header_name=gateway_header_name,
        )
        self.arm = ArmService(self.apim_state, self.tokens)
        self.oidc = OidcService(self.tokens)  # OpenID configuration + JWKS of the token issuer
        self.gateway.policies.bind(clock=clock, jwks=self.tokens.jwks, issuer=self.tokens.issuer)
        if policies is not None:
            self.gateway.policies.set(self.gateway.api_path, policies)
        self.admin = AdminService({})
        self.services: dict[str, Service] = {
            "keyvault": self.keyvault,
            "identity": self.identity,
            "gateway": self.gateway,
            "arm": self.arm,
            "openai": self.openai,
            "oidc": self.oidc,
        }
        self.admin.services.update(self.services)
        self._thread = ServerThread([*self.services.values(), self.admin], self.ca)
        self._seed = seed
        self._started = False

    # ------------------------------------------------------------------------------------- lifecycle

    def start(self) -> LocalAzure:
        self._thread.start()
        self._started = True
        if self._seed:
            self.seed()
        return self

    def stop(self) -> None:
        if self._started:
            self._thread.stop()
            self._started = False
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalAzure:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------- seeding

    @property
    def apim_subscription_id(self) -> str:
        """The ARM resource id of the seeded APIM subscription."""
        return ApimSubscriptionRef(
            ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE, APIM_SUBSCRIPTION
        ).resource_id

    def seed(self) -> None:
        sub = self.apim_state.create_subscription(
            ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE, APIM_SUBSCRIPTION, display_name="apimvault app"
        )
        self.keyvault.put_secret(
            SECRET_NAME,
            sub.primary_key,
            content_type="text/plain",
            tags={
                "CredentialId": "primary",
                "ValidityPeriodDays": str(VALIDITY_DAYS),
                "ProviderAddress": self.apim_subscription_id,
            },
            expires=int(self.clock()) + VALIDITY_DAYS * 86400,
        )
        self.keyvault.grant(self.default_identity, ROLE_USER, secret=SECRET_NAME)
        self.keyvault.grant(self.officer_identity, ROLE_OFFICER)

    # ------------------------------------------------------------------------------------- endpoints

    @property
    def vault_url(self) -> str:
        return self.keyvault.url

    @property
    def gateway_url(self) -> str:
        return self.gateway.url

    @property
    def gateway_unit_urls(self) -> dict[str, str]:
        """Each gateway unit's endpoint (the first is :attr:`gateway_url`)."""
        return self.gateway.unit_urls()

    @property
    def arm_url(self) -> str:
        return self.arm.url

    @property
    def admin_token(self) -> str:
        """The bearer token the admin API requires (only the stack's owner and its env file have it)."""
        return self.admin.token

    @property
    def ca_path(self) -> Path:
        return self.ca.ca_path

    def environ(self) -> dict[str, str]:
        """The variables that make unmodified SDK clients with default arguments use this stack."""
        return {
            "AZURE_KEYVAULT_URL": self.vault_url,
            "APIMVAULT_SECRET_NAME": SECRET_NAME,
            "AZURE_OPENAI_ENDPOINT": self.gateway_url,
            "OPENAI_API_VERSION": API_VERSION,
            "APIMVAULT_DEPLOYMENT": DEPLOYMENT,
            "IDENTITY_ENDPOINT": self.identity.endpoint,
            "IDENTITY_HEADER": self.identity.header_secret,
            "AZURE_TOKEN_CREDENTIALS": "managedidentitycredential",
            "AZURE_TENANT_ID": TENANT_ID,
            "SSL_CERT_FILE": str(self.ca_path),
            "REQUESTS_CA_BUNDLE": str(self.ca_path),
            "APIMVAULT_ARM_ENDPOINT": self.arm_url,
            "APIMVAULT_APIM_SUBSCRIPTION_ID": self.apim_subscription_id,
            "APIMVAULT_OFFICER_CLIENT_ID": self.officer_identity.client_id,
            "APIMVAULT_ADMIN_URL": self.admin.url,
            "APIMVAULT_ADMIN_TOKEN": self.admin_token,
            "APIMVAULT_GATEWAY_URLS": ",".join(self.gateway_unit_urls.values()),
        }

    @contextlib.contextmanager
    def env(self, **overrides: str | None) -> Iterator[dict[str, str]]:
        """Set :meth:`environ` (plus overrides; ``None`` unsets) in ``os.environ`` for the block.

        Variables that would lead a credential off this machine (client secrets, federated token files,
        other managed-identity endpoints) are unset for the block.
        """
        values: dict[str, str | None] = {k: None for k in _FOREIGN_IDENTITY_VARS}
        values.update(self.environ())
        values.update(overrides)
        with temporary_environ(values):
            yield {k: v for k, v in values.items() if v is not None}

    def write_env_file(self, path: str | Path) -> Path:
        """Write :meth:`environ` as a dotenv file, safely: mode 0600, replaced atomically.

        It holds endpoints, the CA path, ``APIMVAULT_ADMIN_TOKEN`` (the admin API's bearer token) and
        ``IDENTITY_HEADER`` (the local identity endpoint's header secret: whoever reads the file can get
        tokens from this stack and inject its faults while it runs), never the APIM key.
        The file is written next to ``path`` and renamed over it, so an existing symlink at ``path`` is
        replaced, not followed, and a reader never sees half a file.
        """
        path = Path(path)
        # Shell-quoted where needed, so `set -a; . file` and dotenv loaders both read every value whole.
        lines = [f"{k}={shlex.quote(v)}" for k, v in self.environ().items()]
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:  # mkstemp: O_EXCL, mode 0600
                fh.write("\n".join(lines) + "\n")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    def az_stub_dir(self) -> Path:
        """A directory holding a stand-in ``az`` that answers ``az account get-access-token`` locally.

        Put it first on ``PATH`` (only where a test or command asks for the laptop path) and set
        ``AZURE_TOKEN_CREDENTIALS=dev`` so ``DefaultAzureCredential`` uses the real ``AzureCliCredential``.
        """
        target = self.directory / "az-bin"
        if not (target / "az").exists():
            write_az_stub(target, self.identity, subscription=ARM_SUBSCRIPTION, ca_path=self.ca_path)
        return target
