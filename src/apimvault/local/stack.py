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
from typing import Any, Literal

from ._env import temporary_environ
from ._server import ServerThread, Service
from ._tls import LocalCA
from ._tokens import TENANT_ID, Clock, Identity, TokenIssuer
from .admin import AdminService
from .apim import (
    DEFAULT_API_SUFFIX,
    DEFAULT_OPERATIONS,
    DEFAULT_UNITS,
    ApimGateway,
    ApimState,
    ArmService,
    Balance,
    DelaySpec,
    Routing,
    normalize_operations,
    normalize_suffix,
    subscription_resource_id,
)
from .identity import IdentityService, write_az_stub
from .keyvault import ROLE_OFFICER, ROLE_USER, KeyVaultService
from .oidc import OidcService
from .openai_backend import OpenAIBackend
from .policies import ApiPolicies
from .rbac import (
    APIM_ROTATOR_KEY,
    APIM_SERVICE_CONTRIBUTOR,
    SECRET_ROTATOR_KEY,
    Assignment,
    Rbac,
    RoleDefinition,
    load_infra_roles,
)

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
    "APIMVAULT_ROTATOR_CLIENT_ID",
)
RotateAs = Literal["officer", "rotator"]


class LocalAzure:
    """An embedded local Azure for tests, demos and drills.

    Use it as a context manager::

        with LocalAzure() as azure, azure.env():
            ...  # DefaultAzureCredential(), SecretClient(azure.vault_url, ...), AzureOpenAI(...) all work

    ``seed=True`` (the default) creates the APIM subscription ``apimvault-app`` and the vault secret
    ``apim-subscription-key`` holding its primary key (tags ``CredentialId=primary``,
    ``ValidityPeriodDays=60``, ``ProviderAddress=<subscription id>``, an expiry), grants the default
    identity ``Key Vault Secrets User`` on that secret only, the named identity ``officer``
    ``Key Vault Secrets Officer`` on the whole vault, both of them ``API Management Service Contributor`` on
    the APIM service (the ARM plane enforces RBAC), and the named identity ``rotator``
    (:attr:`rotator_identity`) exactly the roles ``infra/`` gives the rotation: the custom roles of
    ``infra/roles/rotator.json`` on that secret and on that APIM subscription (:meth:`grant_rotator_roles`).

    Identities and roles (:mod:`apimvault.local.rbac`): :meth:`add_identity` registers a managed identity the
    identity endpoint mints tokens for (select it with ``client_id``); :meth:`assign_role` /
    :meth:`revoke_role` assign built-in roles (``Key Vault Secrets User``/``Officer``, ``API Management
    Service Contributor``) or infra's custom roles (:attr:`infra_roles`) at a scope
    (:meth:`secret_scope`, :meth:`apim_subscription_scope`, :meth:`vault_scope`). ``rotate_as="rotator"``
    puts ``APIMVAULT_ROTATOR_CLIENT_ID`` (the rotator identity) in :meth:`environ`, so the CLI's ``rotate``
    and ``drill`` run as infra's rotator; the default ``"officer"`` leaves it unset (the CLI then uses
    ``APIMVAULT_OFFICER_CLIENT_ID``, Secrets Officer). ``roles_file`` reads the custom roles from another
    file (default: ``infra/roles/rotator.json``).

    ``gateway_header_name`` renames the header the gateway reads the key from (APIM's
    ``subscriptionKeyParameterNames.header``, e.g. ``api-key``). ``api_suffix`` is the Azure OpenAI API's
    URL suffix on the gateway (default ``openai``; ``""`` serves it at the root, e.g.
    ``https://host/deployments/<dep>/chat/completions``); ``api_operations`` its ``(method, urlTemplate)``
    operations (default infra's ``POST /*`` and ``GET /*``): a request none routes gets APIM's 404 before
    any key check. Change both later with ``azure.gateway.configure_api`` or ``PUT /gateway/api``.

    Gateway units and propagation (see :mod:`apimvault.local.apim`): ``gateway_units`` is a number of
    units or their names (default ``region1``, ``region2``). With ``gateway_routing="balanced"`` (default)
    they all answer at the one :attr:`gateway_url` and each request goes to one of them
    (``gateway_balance``: ``"round-robin"`` or seeded ``"random"``), as the units of a region share a
    hostname; ``"per-unit"`` also serves each unit at ``gateway_url + "/<unit>"`` (the first at the root;
    see :attr:`gateway_unit_urls`). :attr:`gateway_urls` (and ``APIMVAULT_GATEWAY_URLS``) lists the
    distinct URLs. ``propagation_delay`` (seconds, a ``(low, high)`` range drawn per regeneration, or
    ``{unit: either}``) is how long a unit keeps accepting a regenerated key's old value and refusing its
    new one; default 0. ``propagation_clock`` is that delay's time source (default ``time.monotonic``;
    tests inject one), ``propagation_seed`` makes drawn delays (and random balancing) reproducible. Change
    delays later with ``apim_state.set_propagation`` or the admin API (``PUT /gateway/propagation``).

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
        gateway_units: int | Sequence[str] = DEFAULT_UNITS,
        gateway_routing: Routing = "balanced",
        gateway_balance: Balance = "round-robin",
        propagation_delay: DelaySpec | Mapping[str, DelaySpec] = 0.0,
        propagation_clock: Callable[[], float] | None = None,
        propagation_seed: int | None = None,
        policies: ApiPolicies | Mapping[str, Any] | None = None,
        api_suffix: str = DEFAULT_API_SUFFIX,
        api_operations: Sequence[Sequence[str]] = DEFAULT_OPERATIONS,
        rotate_as: RotateAs = "officer",
        roles_file: str | Path | None = None,
    ) -> None:
        # Settings checked before any port is bound or directory made.
        units = _checked_settings(rotate_as, gateway_routing, gateway_balance, gateway_units)
        api_suffix, api_operations = normalize_suffix(api_suffix), normalize_operations(api_operations)
        self.rotate_as: RotateAs = rotate_as
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
        self.rotator_identity: Identity = self.identity.add("rotator")
        """Holds exactly infra's rotator roles (after :meth:`seed`: on the seeded secret and subscription)."""
        self.infra_roles: dict[str, RoleDefinition] = load_infra_roles(roles_file)
        """infra's custom roles by their key in the roles file (``keyVaultSecretRotator``,
        ``apimSubscriptionKeyRotator``)."""
        self.rbac = Rbac(self.infra_roles.values())
        self.keyvault = KeyVaultService(self.tokens, clock=clock, rbac=self.rbac)
        self.apim_state = ApimState(
            units=units,
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
            api_suffix=api_suffix,
            operations=api_operations,
            routing=gateway_routing,
            balance=gateway_balance,
            seed=propagation_seed,
        )
        self.arm = ArmService(self.apim_state, self.tokens, rbac=self.rbac)
        self.oidc = OidcService(self.tokens)  # OpenID configuration + JWKS of the token issuer
        self.gateway.policies.bind(clock=clock, jwks=self.tokens.jwks, issuer=self.tokens.issuer)
        if policies is not None:
            self.gateway.policies.set(self.gateway.api_id, policies)
        self.admin = AdminService({}, stack=self)
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
        # Also when never started: the services' sockets are bound, and its loop made, at construction.
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
        return subscription_resource_id(ARM_SUBSCRIPTION, RESOURCE_GROUP, APIM_SERVICE, APIM_SUBSCRIPTION)

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
        service = self.apim_service_scope()
        self.rbac.assign(self.officer_identity, APIM_SERVICE_CONTRIBUTOR, service)
        self.rbac.assign(self.default_identity, APIM_SERVICE_CONTRIBUTOR, service)
        self.grant_rotator_roles(self.rotator_identity)

    # ------------------------------------------------------------------------------ identities, roles

    def add_identity(self, name: str) -> Identity:
        """A user-assigned managed identity (idempotent per name) the identity endpoint mints tokens for:
        ``DefaultAzureCredential(managed_identity_client_id=identity.client_id)``. It holds no role."""
        return self.identity.add(name)

    @staticmethod
    def vault_scope() -> str:
        """The vault's ARM resource id (a role scope)."""
        return KeyVaultService.scope()

    @staticmethod
    def secret_scope(secret: str = SECRET_NAME) -> str:
        """The ARM resource id of a vault secret (a role scope)."""
        return KeyVaultService.scope(secret)

    @staticmethod
    def apim_service_scope() -> str:
        """The APIM service's ARM resource id (a role scope)."""
        return (
            f"/subscriptions/{ARM_SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
            f"Microsoft.ApiManagement/service/{APIM_SERVICE}"
        )

    @classmethod
    def apim_subscription_scope(cls, sid: str = APIM_SUBSCRIPTION) -> str:
        """The ARM resource id of an APIM subscription (a role scope)."""
        return f"{cls.apim_service_scope()}/subscriptions/{sid}"

    def assign_role(self, identity: Identity, role: str, scope: str) -> Assignment:
        """Assign ``role`` (built-in or infra's custom role, by name) to ``identity`` at ``scope``."""
        return self.rbac.assign(identity, role, scope)

    def revoke_role(self, identity: Identity, role: str | None = None, scope: str | None = None) -> int:
        """Remove ``identity``'s assignments of ``role`` (any) at ``scope`` (any); returns how many."""
        return self.rbac.revoke(identity, role, scope)

    def grant_rotator_roles(
        self, identity: Identity, *, secret: str = SECRET_NAME, apim_subscription: str = APIM_SUBSCRIPTION
    ) -> list[Assignment]:
        """Give ``identity`` exactly what ``infra/`` gives the rotator for one secret and its APIM
        subscription: the roles file's secret-rotator role on the secret and its APIM key-rotator role on the
        subscription (infra/modules/secret.bicep and apim.bicep assign them at the same scopes)."""
        return [
            self.rbac.assign(identity, self.infra_roles[SECRET_ROTATOR_KEY].name, self.secret_scope(secret)),
            self.rbac.assign(
                identity,
                self.infra_roles[APIM_ROTATOR_KEY].name,
                self.apim_subscription_scope(apim_subscription),
            ),
        ]

    @property
    def app_identity(self) -> Identity:
        """The app's identity: the default one (what a request naming no identity gets), holding
        ``Key Vault Secrets User`` on the seeded secret as infra's app identity does."""
        return self.default_identity

    @property
    def rotation_identity(self) -> Identity:
        """The identity the CLI rotates as with this stack's environment (``rotate_as``)."""
        return self.rotator_identity if self.rotate_as == "rotator" else self.officer_identity

    # ------------------------------------------------------------------------------------- endpoints

    @property
    def vault_url(self) -> str:
        return self.keyvault.url

    @property
    def gateway_url(self) -> str:
        return self.gateway.url

    @property
    def gateway_unit_urls(self) -> dict[str, str]:
        """Where each gateway unit answers: :attr:`gateway_url` for every unit when balanced (the default);
        with ``gateway_routing="per-unit"`` the first at :attr:`gateway_url`, the others under ``/<unit>``."""
        return self.gateway.unit_urls()

    @property
    def gateway_urls(self) -> tuple[str, ...]:
        """The distinct gateway URLs a client or a rotation probe can use (``APIMVAULT_GATEWAY_URLS``)."""
        return self.gateway.urls

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
        values = {
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
            "APIMVAULT_GATEWAY_URLS": ",".join(self.gateway_urls),
            # The published openai-behind-APIM pattern's base_url: the API suffix and a deployment.
            "APIMVAULT_OPENAI_BASE_URL": (
                f"{self.gateway_url}{self.gateway.api_path}/deployments/{DEPLOYMENT}"
            ),
        }
        if self.rotate_as == "rotator":
            values["APIMVAULT_ROTATOR_CLIENT_ID"] = self.rotator_identity.client_id
        return values

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


def _checked_settings(
    rotate_as: str, gateway_routing: str, gateway_balance: str, gateway_units: int | Sequence[str]
) -> Sequence[str]:
    """ValueError for a bad setting of :class:`LocalAzure`; else the gateway units' names."""
    if rotate_as not in ("officer", "rotator"):
        raise ValueError(f"rotate_as must be 'officer' or 'rotator', not {rotate_as!r}")
    if gateway_routing not in ("balanced", "per-unit"):
        raise ValueError(f"gateway_routing must be 'balanced' or 'per-unit', not {gateway_routing!r}")
    if gateway_balance not in ("round-robin", "random"):
        raise ValueError(f"gateway_balance must be 'round-robin' or 'random', not {gateway_balance!r}")
    if not isinstance(gateway_units, int):
        return gateway_units
    if isinstance(gateway_units, bool) or not 1 <= gateway_units <= 64:
        raise ValueError(f"gateway_units must be 1 to 64 units or their names, not {gateway_units}")
    return tuple(f"unit{i}" for i in range(1, gateway_units + 1))
