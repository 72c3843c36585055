"""The log-alert queries of infra/modules/alerts.bicep, run (infra/checks/kql_mini.py) over sample rows.

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

from infra.checks.bicep_policy import INFRA, Template, parse_bicep
from infra.checks.kql_mini import KqlUnknownColumn, KqlUnsupported, run_query

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


# ------------------------------------------------------------------------ 7 days and 1 day before expiry

CLIENT_DATA = Path(__file__).resolve().parent / "data" / "appmetrics_expires_in_rows.json"
CLIENT_SAMPLE = json.loads(CLIENT_DATA.read_text())
CLIENT_NOW = datetime.fromisoformat(CLIENT_SAMPLE["now"].replace("Z", "+00:00"))


def _client_rows(labels: list[str]) -> list[dict[str, Any]]:
    rows = []
    for row in CLIENT_SAMPLE["rows"]:
        if row["label"] in labels:
            row = {k: v for k, v in row.items() if k != "label"}
            row["TimeGenerated"] = datetime.fromisoformat(row["TimeGenerated"].replace("Z", "+00:00"))
            rows.append(row)
    return rows


def expiry_query(days: int) -> str:
    """The query of the expiry rule for ``days``, as the loop in alerts.bicep formats its template."""
    t = _alerts()
    assert days in [x["days"] for x in t.variables["expiryAlertThresholds"]["value"]]
    text: str = t.variables["expiryQueryTemplate"]["value"]
    for i, value in enumerate([SAMPLE["secret_name"], SAMPLE["vault_name"], days]):
        text = text.replace("{" + str(i) + "}", str(value))
    assert "{" not in text, text
    return text


def expiring(days: int, vault: list[str], clients: list[str], now: datetime) -> list[dict[str, Any]]:
    return run_query(
        expiry_query(days),
        {"AzureDiagnostics": _rows(vault), "AppMetrics": _client_rows(clients)},
        now=now,
        schemas={"AzureDiagnostics": COLUMNS},
    )


def test_sample_client_rows_name_their_source() -> None:
    assert "AppMetrics" in CLIENT_SAMPLE["source"] and "CONSTRUCTED" in CLIENT_SAMPLE["source"]
    labels = [r["label"] for r in CLIENT_SAMPLE["rows"]]
    assert len(labels) == len(set(labels))


@pytest.mark.parametrize(
    ("vault", "clients", "fires_7d", "fires_1d"),
    [
        pytest.param(["n30"], [], False, False, id="vault-30-days-quiet"),
        pytest.param(["n5"], [], True, False, id="vault-5-days"),
        pytest.param(["n20h"], [], True, True, id="vault-20-hours"),
        pytest.param(["n5", "n20h", "s3"], [], False, False, id="vault-new-version-written-quiet"),
        pytest.param(["n20h", "other-secret", "forbidden", "read"], [], True, True, id="vault-noise"),
        pytest.param([], ["c3d"], True, False, id="clients-3-days"),
        pytest.param([], ["c12h"], True, True, id="clients-12-hours"),
        pytest.param([], ["c-old"], False, False, id="clients-report-older-than-1h-quiet"),
        pytest.param(
            [], ["c-other-secret", "c-other-vault", "c-other-metric"], False, False, id="clients-other"
        ),
        pytest.param([], [], False, False, id="nothing"),
    ],
)
def test_expiry_alerts_fire_at_7_days_and_1_day(
    vault: list[str], clients: list[str], fires_7d: bool, fires_1d: bool
) -> None:
    now = CLIENT_NOW  # 2026-11-20 12:00, after every sample row
    for days, fires in ((7, fires_7d), (1, fires_1d)):
        result = expiring(days, vault, clients, now)
        assert bool(result) is fires, (days, result)
        for row in result:
            assert row["daysToExpiry"] <= days and row["source"] in ("vault", "clients")


def test_expiry_alert_rows_say_how_long_and_where_from() -> None:
    [row] = expiring(7, ["n5"], [], CLIENT_NOW)
    assert row["source"] == "vault"
    assert row["expiresAt"] == datetime(2026, 11, 25, tzinfo=UTC)
    assert row["daysToExpiry"] == pytest.approx(4.5)  # 2026-11-20 12:00 -> 2026-11-25 00:00
    rows = expiring(7, ["n20h"], ["c3d", "c12h"], CLIENT_NOW)
    assert sorted(r["source"] for r in rows) == ["clients", "vault"]
    [client] = [r for r in rows if r["source"] == "clients"]
    assert client["secondsLeft"] == 43200.0  # the smallest value any client reported
    assert client["daysToExpiry"] == pytest.approx(0.5)


def test_expiry_query_reads_the_documented_columns() -> None:
    query = expiry_query(7)
    assert named_columns(query) <= set(COLUMNS)
    assert named_columns(query) == named_columns(overdue_query())  # the overdue alert's vault filters
    client_columns = {c for row in CLIENT_SAMPLE["rows"] for c in row if c != "label"}
    for column in ("TimeGenerated", "Name", "Min", "Properties"):
        assert column in client_columns and column in query
    assert 'Properties["apimvault.secret"]' in query and '"apimvault.key.expires_in"' in query
