"""Key Vault test helpers: the spec validator, static-token credentials, raw HTTPS requests, token forging.

Shared by ``tests/local/test_keyvault.py``, ``test_keyvault_aio.py`` and ``test_conformance_keyvault.py``.
Every response a client sees is validated against the Key Vault spec
(``tests/local/data/keyvault-secrets-2026-04-01.json``) by :meth:`SpecValidator.hook`.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema  # type: ignore[import-untyped]
import jwt
import requests
from azure.core.credentials import AccessToken
from azure.core.exceptions import (
    HttpResponseError,
)
from azure.core.pipeline import PipelineResponse
from azure.core.rest import AsyncHttpResponse, HttpResponse

from apimvault.local import TENANT_ID, Identity, LocalAzure

SPEC_PATH = Path(__file__).resolve().parents[1] / "local" / "data" / "keyvault-secrets-2026-04-01.json"
JSON_UTF8 = "application/json; charset=utf-8"
VERSION_RE = re.compile(r"^[0-9a-f]{32}$")
NOT_FOUND = (
    "A secret with (name/id) {name} was not found in this key vault. If you recently deleted this secret you "
    "may be able to recover it using the correct recovery command. For help resolving this issue, please see "
    "https://go.microsoft.com/fwlink/?linkid=2125182"
)


# ---------------------------------------------------------------------------------------- spec validation


def _to_json_schema(node: Any) -> Any:
    """Swagger 2.0 schema -> JSON Schema: honour ``x-nullable``, forbid properties the spec doesn't name."""
    if isinstance(node, list):
        return [_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items() if not k.startswith("x-") and k != "readOnly"}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if node.get("x-nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


class SpecValidator:
    """Validates Key Vault responses against the operation the request matched in the spec."""

    def __init__(self, spec_path: Path = SPEC_PATH) -> None:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        definitions = _to_json_schema(spec["definitions"])
        # The spec types nextLink as a string, but the service sends "nextLink": null on the last page
        # (the Key Vault REST spec's GetSecrets example and SDK recordings); allow exactly that.
        for listing in ("SecretListResult", "DeletedSecretListResult"):
            definitions[listing]["properties"]["nextLink"] = {"type": ["string", "null"]}
        self.definitions = definitions
        self.operations: list[tuple[str, re.Pattern[str], str, dict[str, Any]]] = []
        for template, methods in spec["paths"].items():
            pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "([^/]*)", template) + "/?$", re.IGNORECASE)
            for method, operation in methods.items():
                self.operations.append((method.upper(), pattern, template, operation))
        # Literal segments win over parameters (/secrets/restore over /secrets/{secret-name}).
        self.operations.sort(key=lambda o: o[2].count("{"))
        self.validated = 0
        self._lock = threading.Lock()
        self._validators: dict[str, Any] = {}

    def operation(self, method: str, path: str) -> dict[str, Any]:
        for verb, pattern, _, operation in self.operations:
            if verb == method and pattern.match(path):
                return operation
        if method in ("GET", "PATCH") and re.match(r"^/secrets/[^/]+$", path):
            # "/secrets/{name}" without the trailing slash: served as the latest version, as Key Vault does.
            return self.operation(method, path + "/")
        raise AssertionError(f"no spec operation for {method} {path}")

    def schema(self, name: str) -> dict[str, Any]:
        return {"definitions": self.definitions, "allOf": [{"$ref": f"#/definitions/{name}"}]}

    def validate(self, body: Any, name: str) -> None:
        """Validate ``body`` against definition ``name`` (validators are built once; checks are slow)."""
        with self._lock:
            validator = self._validators.get(name)
            if validator is None:
                schema = self.schema(name)
                jsonschema.Draft7Validator.check_schema(schema)
                validator = self._validators[name] = jsonschema.Draft7Validator(schema)
        validator.validate(body)

    def check(self, method: str, url: str, status: int, headers: Any, body: bytes) -> Any:
        """Assert the response matches the spec; returns the parsed body (None for 204)."""
        path = urlsplit(url).path
        operation = self.operation(method, path)
        response = operation["responses"].get(str(status)) or operation["responses"]["default"]
        with self._lock:
            self.validated += 1
        if "schema" not in response:
            assert status == 204 and body == b"", (status, body)
            return None
        assert headers.get("content-type") == JSON_UTF8, headers.get("content-type")
        parsed = json.loads(body)
        ref = response["schema"]["$ref"].rsplit("/", 1)[-1]
        self.validate(parsed, ref)
        if "id" in parsed:
            _check_id(parsed["id"], url)
        return parsed

    def hook(self, response: PipelineResponse[Any, Any]) -> None:
        """``raw_response_hook`` for SecretClient (sync and aio)."""
        request = response.http_request
        http = response.http_response
        self.check(request.method, request.url, http.status_code, http.headers, http.body() or b"")


def _check_id(ident: str, request_url: str) -> None:
    """Ids are absolute URLs on exactly the scheme://host:port the client used."""
    parts, asked = urlsplit(ident), urlsplit(request_url)
    assert (parts.scheme, parts.netloc) == (asked.scheme, asked.netloc), (ident, request_url)
    segments = parts.path.strip("/").split("/")
    assert segments[0] in ("secrets", "deletedsecrets") and 2 <= len(segments) <= 3, ident
    if len(segments) == 3:
        assert VERSION_RE.match(segments[2]), ident


class StaticToken:
    """A ``TokenCredential`` that hands out one fixed token (for tokens no real credential would produce)."""

    def __init__(self, token: str, expires_on: int | None = None) -> None:
        self.token = token
        self.expires_on = expires_on if expires_on is not None else int(time.time()) + 3600

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self.token, self.expires_on)


class AsyncStaticToken(StaticToken):
    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:  # type: ignore[override]
        return AccessToken(self.token, self.expires_on)

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> AsyncStaticToken:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def text_of(error: HttpResponseError) -> str:
    assert error.response is not None
    return error.response.text()


def header_of(error: HttpResponseError, name: str) -> str | None:
    assert isinstance(error.response, HttpResponse | AsyncHttpResponse)
    return error.response.headers.get(name)


def challenge_resource(azure: LocalAzure) -> str:
    return f"https://0.0.1:{azure.keyvault.port}"


def forged_token(azure: LocalAzure, identity: Identity, **claims: Any) -> str:
    """A token with the right claims but signed by another key."""
    now = int(time.time())
    body = {
        "aud": challenge_resource(azure),
        "iss": azure.tokens.issuer,
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "tid": TENANT_ID,
        "oid": identity.object_id,
        "appid": identity.client_id,
    }
    body.update(claims)
    return jwt.encode(body, b"k" * 32, algorithm="HS256")


def unique(prefix: str = "kv") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Raw:
    """Plain HTTPS requests to the vault (TLS verified by the stack CA), bodies checked against the spec."""

    def __init__(self, azure: LocalAzure, spec: SpecValidator) -> None:
        self.azure = azure
        self.spec = spec
        self.session = requests.Session()
        self.session.verify = str(azure.ca_path)
        self.officer_token = azure.tokens.issue(azure.officer_identity, challenge_resource(azure))[0]

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = "officer",  # noqa: S107 - selects the officer's token
        api_version: str | None = "2026-04-01",
        validate: bool = True,
        **kwargs: Any,
    ) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token == "officer":
            token = self.officer_token
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        params = dict(kwargs.pop("params", {}))
        if api_version is not None:
            params["api-version"] = api_version
        url = self.azure.vault_url + path
        response = self.session.request(method, url, headers=headers, params=params, timeout=10, **kwargs)
        if validate:
            self.spec.check(method, response.url, response.status_code, response.headers, response.content)
        return response


def error_of(response: requests.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    return error
