"""The log-alert queries of infra/modules/alerts.bicep, run (tests/infra/kql_mini.py) over sample rows.

- Overdue rotation (issue 20): the SecretSet row format is Microsoft's documented AuditEvent record as
  AzureDiagnostics stores it; tests/infra/data/keyvault_azurediagnostics_rows.json holds the rows and says
  where each field comes from. Both documented shapes of a successful SecretSet for the secret (versioned
  secret URI in id_s, or only the request URI) count as a rotation; another secret, another vault, a refused
  write and a read do not.
- Gateway 401 rate: rows of ApiManagementGatewayLogs (columns as Learn's table reference lists them:
  TimeGenerated, ResponseCode, ApiId).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pycep", reason="pycep-parser is in the dev extra")

from .bicep_policy import INFRA, Template, parse_bicep
from .kql_mini import KqlUnknownColumn, KqlUnsupported, run_query

DATA = Path(__file__).resolve().parent / "data" / "keyvault_azurediagnostics_rows.json"


def _alerts() -> Template:
    return Template("modules/alerts.bicep", parse_bicep((INFRA / "modules" / "alerts.bicep").read_text()))


def bicep_format(t: Template, variable: str, values: dict[str, Any]) -> str:
    """The query text of ``format('''...''', a, b, ...)`` with each argument's value from ``values`` (by
    the parameter name passed), else the parameter's default; as Bicep's format() fills {0}, {1}, ..."""
    fn = t.variables[variable]["value"]["function"]
    assert fn["type"] == "format"
    params = fn["parameters"]
    text: str = params["format_string"]
    args = [params[k] for k in sorted(k for k in params if k.startswith("arg_"))]
    for i, name in enumerate(args):
        value = values.get(name, t.parameters.get(name, {}).get("default"))
        assert value is not None, f"no value for {name}"
        text = text.replace("{" + str(i) + "}", str(value))
    assert "{" not in text.replace("{{", ""), text
    return text


def _rows(labels: list[str] | None = None) -> list[dict[str, Any]]:
    data = json.loads(DATA.read_text())
    rows = []
    for row in data["rows"]:
        if labels is not None and row["label"] not in labels:
            continue
        row = dict(row)
        row["TimeGenerated"] = datetime.fromisoformat(row["TimeGenerated"].replace("Z", "+00:00"))
        rows.append(row)
    return rows


SAMPLE = json.loads(DATA.read_text())
NOTIFIED = datetime(2026, 11, 1, 0, 0, 5, tzinfo=UTC)


def overdue_query(**values: Any) -> str:
    return bicep_format(
        _alerts(),
        "overdueQuery",
        {"secretName": SAMPLE["secret_name"], "keyVaultName": SAMPLE["vault_name"], **values},
    )


# AzureDiagnostics is one sparse table: every column any Key Vault row has exists for every row.
COLUMNS = sorted({c for row in SAMPLE["rows"] for c in row if c != "label"})


def fired(query: str, rows: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    return run_query(query, {"AzureDiagnostics": rows}, now=now, schemas={"AzureDiagnostics": COLUMNS})


def test_sample_rows_name_their_source() -> None:
    assert "logging.md" in SAMPLE["source"] and "CONSTRUCTED" in SAMPLE["source"]
    labels = [r["label"] for r in SAMPLE["rows"]]
    assert len(labels) == len(set(labels))


@pytest.mark.parametrize(
    "noise",
    [
        pytest.param([], id="nothing-written"),
        pytest.param(["other-secret"], id="other-secret-written"),
        pytest.param(["forbidden"], id="write-refused"),
        pytest.param(["read"], id="only-read"),
        pytest.param(["other-vault"], id="other-vault-written"),
    ],
)
def test_overdue_alert_fires_when_no_new_version_follows_the_notification(noise: list[str]) -> None:
    now = NOTIFIED + timedelta(hours=27)
    result = fired(overdue_query(), _rows(["n1", *noise]), now)
    assert len(result) == 1, result
    assert result[0]["notifiedAt"] == NOTIFIED
    assert result[0]["expiresAt"] == datetime(2025, 12, 1, tzinfo=UTC)  # EXP 1764547200 in the sample


@pytest.mark.parametrize("write", ["s1", "s2"], ids=["id_s-versioned-secret-uri", "request-uri-only"])
def test_overdue_alert_stays_quiet_after_a_successful_secret_set(write: str) -> None:
    now = NOTIFIED + timedelta(hours=27)
    assert fired(overdue_query(), _rows(["n1", write, "other-secret", "forbidden"]), now) == []


def test_overdue_alert_waits_for_the_grace_period() -> None:
    query = overdue_query(rotationOverdueHours=26)
    assert fired(query, _rows(["n1"]), NOTIFIED + timedelta(hours=25)) == []
    assert len(fired(query, _rows(["n1"]), NOTIFIED + timedelta(hours=26, minutes=1))) == 1


def test_overdue_alert_is_quiet_without_a_notification() -> None:
    assert fired(overdue_query(), _rows(["s1", "other-secret"]), NOTIFIED + timedelta(days=1)) == []


def test_the_old_id_s_filter_would_have_paged_after_a_rotation() -> None:
    """Why the filter changed: a SecretSet row without a versioned id_s (sample s2) was invisible to
    ``id_s contains "/secrets/<name>/"``, so a completed rotation still paged as overdue."""
    query = overdue_query()
    new_filter = (
        '| extend objectName = extract(@"/secrets/([^/?]+)", 1, iff(isnotempty(idUri), idUri, requestUri))\n'
        "  | where objectName =~ secretName"
    )
    assert new_filter in query
    old = query.replace(new_filter, '| where id_s contains strcat("/secrets/", secretName, "/")')
    now = NOTIFIED + timedelta(hours=27)
    assert len(fired(old, _rows(["n1", "s2"]), now)) == 1
    assert fired(query, _rows(["n1", "s2"]), now) == []


def named_columns(query: str) -> set[str]:
    """Columns the query reads through column_ifexists("<name>", ...)."""
    return set(re.findall(r'column_ifexists\("([^"]+)"', query))


def test_every_column_the_query_reads_is_in_the_documented_rows() -> None:
    """column_ifexists() keeps the query valid on a fresh workspace, but it would also turn a misspelt column
    (KQL names are case-sensitive) into a silent default: each name must be a column of the sample rows."""
    names = named_columns(overdue_query())
    assert names == {
        "httpStatusCode_d",
        "id_s",
        "requestUri_s",
        "eventGridEventProperties_data_ObjectName_s",
        "eventGridEventProperties_data_EXP_d",
    }
    assert names <= set(COLUMNS)


def test_a_misspelt_column_silences_the_alert_and_is_caught() -> None:
    query = overdue_query().replace(
        "eventGridEventProperties_data_ObjectName_s", "eventGridEventProperties_data_objectName_s"
    )
    assert not named_columns(query) <= set(COLUMNS)
    assert fired(query, _rows(["n1"]), NOTIFIED + timedelta(hours=27)) == []  # what the check above prevents
    with pytest.raises(KqlUnknownColumn):
        run_query(
            "T | where eventGridEventProperties_data_objectName_s == 1",
            {"T": _rows(["n1"])},
            now=NOTIFIED,
            schemas={"T": COLUMNS},
        )


def test_interpreter_refuses_what_it_does_not_implement() -> None:
    with pytest.raises(KqlUnsupported):
        run_query("T | project a", {"T": [{"a": 1}]}, now=NOTIFIED)
    with pytest.raises(KqlUnsupported):
        run_query("T | where parse_json(a) == 1", {"T": [{"a": 1}]}, now=NOTIFIED)


# ------------------------------------------------------------------------------------------ 401 rate


def _gateway_rows(total: int, unauthorized: int) -> list[dict[str, Any]]:
    start = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    return [
        {
            "TimeGenerated": start + timedelta(seconds=i),
            "ApiId": "azure-openai",
            "ResponseCode": 401 if i < unauthorized else 200,
        }
        for i in range(total)
    ]


def unauthorized_query(**values: Any) -> str:
    return bicep_format(_alerts(), "unauthorizedQuery", values)


@pytest.mark.parametrize(
    ("total", "unauthorized", "fires"),
    [
        pytest.param(100, 6, True, id="6-percent"),
        pytest.param(100, 5, False, id="5-percent-is-not-above"),
        pytest.param(19, 19, False, id="below-minimum-requests"),
        pytest.param(20, 20, True, id="all-refused"),
        pytest.param(0, 0, False, id="no-traffic"),
    ],
)
def test_gateway_401_rate_alert(total: int, unauthorized: int, fires: bool) -> None:
    t = _alerts()
    assert t.parameters["unauthorizedPercentThreshold"]["default"] == 5
    assert t.parameters["unauthorizedMinRequests"]["default"] == 20
    result = run_query(
        unauthorized_query(),
        {"ApiManagementGatewayLogs": _gateway_rows(total, unauthorized)},
        now=datetime(2026, 11, 1, 12, 15, tzinfo=UTC),
    )
    assert bool(result) is fires, result
    if fires:
        assert result[0]["unauthorized"] == unauthorized
