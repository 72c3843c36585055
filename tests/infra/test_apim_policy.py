"""APIM policy XML in infra/: well-formed, known policies per section, expressions that parse
(infra/checks/apim_policy.py says what is and is not checked). Each check is also shown to fail on a planted
error."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from infra.checks.apim_policy import check_expression, check_policy_document, policy_files
from infra.checks.bicep_policy import INFRA

OPENAI_POLICY = INFRA / "modules" / "policies" / "openai-api.xml"


def test_every_policy_file_passes() -> None:
    files = policy_files(INFRA)
    assert OPENAI_POLICY in files
    for path in files:
        assert check_policy_document(path.read_text(), path.name) == [], path


def test_openai_policy_limits_tokens_per_subscription_and_emits_token_metrics() -> None:
    inbound = ET.fromstring(OPENAI_POLICY.read_text()).find("inbound")  # noqa: S314 - our own file
    assert inbound is not None
    tags = [child.tag for child in inbound]
    limit = inbound.find("azure-openai-token-limit")
    assert limit is not None
    assert limit.get("counter-key") == "@(context.Subscription.Id)"
    assert limit.get("tokens-per-minute") == "{{apimvault-tokens-per-minute}}"
    # Issue 20 item 5: the API is hand-defined (no prompt schema to estimate from), so the limit counts the
    # usage reported in responses instead of promising an estimate (infra.checks.apim.check_token_limits).
    assert limit.get("estimate-prompt-tokens") == "false"
    metric = inbound.find("azure-openai-emit-token-metric")
    assert metric is not None
    dimensions = {d.get("name") for d in metric.findall("dimension")}
    assert {"Subscription ID", "Deployment"} <= dimensions
    assert not {"Client IP", "IP Address"} & dimensions, "no client IP as a metric dimension"
    # The limit and the metric run before the request is authenticated to and sent to the backend.
    assert tags.index("azure-openai-token-limit") < tags.index("authentication-managed-identity")
    assert tags.index("azure-openai-emit-token-metric") < tags.index("set-backend-service")


VALID = """<policies><inbound><base /></inbound><backend><base /></backend>
<outbound><base /></outbound><on-error><base /></on-error></policies>"""


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        pytest.param("<policies><inbound>", "not well-formed XML", id="malformed"),
        pytest.param("<policy><inbound /></policy>", "root element is <policy>", id="root"),
        pytest.param(
            "<policies><inbound /><outbound /><backend /></policies>", "sections out of order", id="order"
        ),
        pytest.param("<policies><inbound /><inbound /></policies>", "more than once", id="duplicate"),
        pytest.param("<policies><prebound /></policies>", "unknown sections ['prebound']", id="section"),
        pytest.param(
            "<policies><inbound><set-heder name='x' /></inbound></policies>",
            "inbound/set-heder: unknown policy",
            id="unknown-policy",
        ),
        pytest.param(
            "<policies><outbound><azure-openai-token-limit counter-key='x' /></outbound></policies>",
            "outbound/azure-openai-token-limit: not allowed in outbound",
            id="wrong-section",
        ),
        pytest.param(
            "<policies><backend><choose><when condition='@(true)'><rewrite-uri template='/' />"
            "</when></choose></backend></policies>",
            "backend/choose/when/rewrite-uri: not allowed in backend",
            id="wrong-section-nested",
        ),
        pytest.param(
            "<policies><inbound><return-response><rewrite-uri template='/' /></return-response>"
            "</inbound></policies>",
            "return-response/rewrite-uri: not a child element",
            id="wrong-child",
        ),
        pytest.param(
            "<policies><inbound><set-header exists-action='delete' /></inbound></policies>",
            "set-header: missing attribute(s) ['name']",
            id="missing-attribute",
        ),
        pytest.param(
            "<policies><inbound><set-variable name='a' value='@(context.Request.Url.Path' /></inbound>"
            "</policies>",
            "set-variable @value: missing ')'",
            id="expression-attribute",
        ),
        pytest.param(
            '<policies><inbound><return-response><set-body>@(Environment.GetEnvironmentVariable("X"))'
            "</set-body></return-response></inbound></policies>",
            "unknown identifier 'Environment'",
            id="expression-text",
        ),
    ],
)
def test_planted_policy_errors_are_flagged(document: str, expected: str) -> None:
    problems = "\n".join(check_policy_document(document))
    assert expected in problems, problems


def test_valid_skeleton_passes() -> None:
    assert check_policy_document(VALID) == []


@pytest.mark.parametrize(
    "expression",
    [
        "@(context.Subscription.Id)",
        '@(context.Request.Headers.GetValueOrDefault("x", "").Split(\',\').First())',
        '@{ var path = context.Request.Url.Path; return path.Length > 0 ? path : "/"; }',
        '@(context.Request.Url.Query.Any(q => q.Key == "subscription-key"))',
        '@(((string)context.Variables["a"]).Length)',
        '@($"{context.Deployment.Region}-{context.Api.Id}")',
        '@(@"C:\\path")',
        '@(new JObject(new JProperty("a", 1)).ToString())',
    ],
)
def test_valid_expressions_parse(expression: str) -> None:
    assert check_expression(expression) == []


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("@(context.Request.Url.Path", "missing ')'"),
        ("@(context.Request).Length", "text after the expression's closing ')'"),
        ("@(1; 2)", "';' in a single-statement expression"),
        ("@{ var a = 1; }", "must return a value"),
        ("@(foo.Bar)", "unknown identifier 'foo'"),
        ("@(`x`)", "unexpected"),
        ('@("unterminated)', "unexpected"),
        ("@()", "empty expression"),
        ("context.Subscription.Id", "not a policy expression"),
        ("@(context.Request.Url.Path])", "unbalanced ']'"),
    ],
)
def test_bad_expressions_are_flagged(expression: str, expected: str) -> None:
    problems = "\n".join(check_expression(expression))
    assert expected in problems, problems
