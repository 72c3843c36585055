"""Conformance: all twelve Key Vault secrets operations, success and error answers, against the spec.

Every answer here passes through ``SpecValidator`` (``tests/_support/keyvault.py``: the 2026-04-01 spec, with
properties the spec does not name refused); this module drives each ``operationId`` once with the real
HTTP shape and checks that none was left out, plus the fidelity fixes of issue 22: an unknown api-version
is Key Vault's 400 ``BadParameter`` (22.1), ``x-ms-request-id`` is on every answer (22.2), no
``previousVersion`` on plain secrets or list items (22.5), and an expired version is served with 200 as
real Key Vault does (22.6, evidence in ``apimvault.local.keyvault``'s docstring).
"""

from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from apimvault.local import LocalAzure
from tests._support.keyvault import Raw, SpecValidator

UUID_LEN = 36


class RecordingSpec(SpecValidator):
    """Also records which operationIds were validated, and the x-ms-request-id of every answer."""

    def __init__(self) -> None:
        super().__init__()
        self.operation_ids: set[str] = set()
        self.request_ids: list[str] = []

    def check(self, method: str, url: str, status: int, headers: Any, body: bytes) -> Any:
        self.operation_ids.add(self.operation(method, urlsplit(url).path)["operationId"])
        self.request_ids.append(headers.get("x-ms-request-id", ""))
        return super().check(method, url, status, headers, body)


@pytest.fixture
def rec(azure: LocalAzure) -> Any:
    spec = RecordingSpec()
    raw = Raw(azure, spec)
    yield raw, spec
    raw.session.close()


def ok(response: requests.Response, *status: int) -> requests.Response:
    assert response.status_code in (status or (200,)), response.text
    return response


def test_all_twelve_operations_and_their_errors_match_the_spec(rec: tuple[Raw, RecordingSpec]) -> None:
    raw, spec = rec
    name = f"conf-{uuid.uuid4().hex[:10]}"
    past = int(time.time()) - 86_400
    first = ok(
        raw.request("PUT", f"/secrets/{name}", json={"value": "v1", "attributes": {"exp": past}})
    ).json()
    ok(raw.request("PUT", f"/secrets/{name}", json={"value": "v2", "tags": {"a": "b"}}))
    version = first["id"].rsplit("/", 1)[1]
    # 22.6: an expired version is served (200) with its exp attribute; the caller applies the rule.
    expired = ok(raw.request("GET", f"/secrets/{name}/{version}")).json()
    assert expired["value"] == "v1" and expired["attributes"]["exp"] == past
    ok(raw.request("PATCH", f"/secrets/{name}/{version}", json={"contentType": "text/plain"}))
    listed = ok(raw.request("GET", "/secrets", params={"maxresults": "25"})).json()
    versions = ok(raw.request("GET", f"/secrets/{name}/versions")).json()
    # 22.5: previousVersion is for certificate-backed secrets only; list items never carry it.
    bodies = [first, expired, *listed["value"], *versions["value"]]
    assert all("previousVersion" not in body for body in bodies)
    blob = ok(raw.request("POST", f"/secrets/{name}/backup")).json()["value"]
    ok(raw.request("DELETE", f"/secrets/{name}"))
    ok(raw.request("GET", "/deletedsecrets"))
    ok(raw.request("GET", f"/deletedsecrets/{name}"))
    ok(raw.request("POST", f"/deletedsecrets/{name}/recover"))
    ok(raw.request("DELETE", f"/secrets/{name}"))
    ok(raw.request("DELETE", f"/deletedsecrets/{name}"), 204)
    ok(raw.request("POST", "/secrets/restore", json={"value": blob}))
    # Error answers, each validated against the operation's default (KeyVaultError) schema.
    ok(raw.request("GET", "/secrets/missing-secret/"), 404)
    ok(raw.request("GET", "/deletedsecrets/missing-secret"), 404)
    ok(raw.request("PUT", f"/secrets/{name}", json={}), 400)
    ok(raw.request("GET", f"/secrets/{name}/", api_version="1999-01-01"), 400)  # 22.1
    ok(raw.request("GET", f"/secrets/{name}/", token=None), 401)
    everything = {op["operationId"] for _, _, _, op in spec.operations}
    assert len(everything) == 12 and spec.operation_ids == everything
    # 22.2: a fresh x-ms-request-id on every answer, errors and 401 included.
    assert len(spec.request_ids) == 19 and all(len(i) == UUID_LEN for i in spec.request_ids)
    assert len(set(spec.request_ids)) == len(spec.request_ids)
