"""Offline checks of API Management policy XML (``infra/modules/policies/*.xml``).

What is checked:
- the file is well-formed XML whose root is ``<policies>`` with the sections ``inbound``, ``backend``,
  ``outbound``, ``on-error``, each at most once and in that order;
- every element is a known policy that Microsoft documents for that section (``POLICIES`` below, from the
  API Management policy reference), and a policy's child elements are the ones it takes (``choose`` takes
  ``when``/``otherwise``, which take policies of the same section; ``return-response`` takes
  ``set-status``/``set-header``/``set-body``; and so on); policy attributes named in ``REQUIRED_ATTRIBUTES``
  are present;
- every policy expression (an attribute value or element text starting with ``@(`` or ``@{``) passes a
  syntactic check of the C# subset APIM accepts: the lexer knows C# string, verbatim-string, interpolated-
  string and char literals, numbers, identifiers and operators; brackets balance and close where the
  expression ends; ``@( )`` holds one expression (no ``;``), ``@{ }`` a statement block with a ``return``;
  the root of each member-access chain is ``context``, a local (``var x``, a lambda parameter), a C# keyword,
  or one of the .NET types APIM allows in expressions (``ALLOWED_ROOTS``).

What is not checked: C# typing and overload resolution (``context.Request.Foo`` passes), the full list of
members APIM allows on each type, named values (``{{name}}``) and whether they exist, attribute value
formats (durations, numbers), and policies that only the self-hosted or workspace gateways support.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

SECTIONS = ("inbound", "backend", "outbound", "on-error")
ALL = frozenset(SECTIONS)
IN = frozenset({"inbound"})
OUT = frozenset({"outbound"})
IN_OUT_ERR = frozenset({"inbound", "outbound", "on-error"})
OUT_ERR = frozenset({"outbound", "on-error"})

# policy -> sections it is documented for (API Management policy reference, "Policy sections").
POLICIES: dict[str, frozenset[str]] = {
    "base": ALL,
    # access restriction
    "check-header": IN,
    "ip-filter": IN,
    "quota": IN,
    "quota-by-key": IN,
    "rate-limit": IN,
    "rate-limit-by-key": IN,
    "validate-azure-ad-token": IN,
    "validate-client-certificate": IN,
    "validate-jwt": IN,
    "get-authorization-context": IN,
    # authentication
    "authentication-basic": IN,
    "authentication-certificate": IN,
    "authentication-managed-identity": IN,
    # AI gateway
    "azure-openai-token-limit": IN,
    "llm-token-limit": IN,
    "azure-openai-emit-token-metric": IN,
    "llm-emit-token-metric": IN,
    "llm-content-safety": IN,
    "azure-openai-semantic-cache-lookup": IN,
    "llm-semantic-cache-lookup": IN,
    "azure-openai-semantic-cache-store": OUT,
    "llm-semantic-cache-store": OUT,
    # caching
    "cache-lookup": IN,
    "cache-store": OUT,
    "cache-lookup-value": ALL,
    "cache-store-value": ALL,
    "cache-remove-value": ALL,
    # cross-domain
    "cors": IN,
    "cross-domain": IN,
    "jsonp": OUT,
    # validation
    "validate-content": IN_OUT_ERR,
    "validate-parameters": IN,
    "validate-headers": OUT_ERR,
    "validate-status-code": OUT_ERR,
    "validate-odata-request": IN,
    # routing
    "forward-request": frozenset({"backend"}),
    "set-backend-service": frozenset({"inbound", "backend"}),
    "proxy": frozenset({"inbound"}),
    # transformation and control flow
    "choose": ALL,
    "set-header": ALL,
    "set-query-parameter": frozenset({"inbound", "backend"}),
    "set-body": ALL,
    "set-method": frozenset({"inbound", "on-error"}),
    "set-status": ALL,
    "set-variable": ALL,
    "rewrite-uri": IN,
    "find-and-replace": ALL,
    "json-to-xml": ALL,
    "xml-to-json": ALL,
    "mock-response": IN_OUT_ERR,
    "return-response": ALL,
    "send-request": ALL,
    "send-one-way-request": ALL,
    "retry": ALL,
    "wait": ALL,
    "limit-concurrency": ALL,
    "include-fragment": ALL,
    "trace": ALL,
    "log-to-eventhub": ALL,
    "emit-metric": ALL,
}

# Child elements that are not policies. "*" means: policies of the enclosing section.
CHILDREN: dict[str, set[str]] = {
    "choose": {"when", "otherwise"},
    "when": {"*"},
    "otherwise": {"*"},
    "retry": {"*"},
    "wait": {"*"},
    "limit-concurrency": {"*"},
    "return-response": {"set-status", "set-header", "set-body"},
    "send-request": {
        "set-url",
        "set-method",
        "set-header",
        "set-body",
        "authentication-certificate",
        "authentication-managed-identity",
        "proxy",
    },
    "send-one-way-request": {
        "set-url",
        "set-method",
        "set-header",
        "set-body",
        "authentication-certificate",
        "authentication-managed-identity",
    },
    "set-header": {"value"},
    "set-query-parameter": {"value"},
    "azure-openai-emit-token-metric": {"dimension"},
    "llm-emit-token-metric": {"dimension"},
    "emit-metric": {"dimension"},
    "validate-jwt": {
        "openid-config",
        "issuer-signing-keys",
        "decryption-keys",
        "audiences",
        "issuers",
        "required-claims",
    },
    "audiences": {"audience"},
    "issuers": {"issuer"},
    "required-claims": {"claim"},
    "claim": {"value"},
    "openid-config": set(),
    "cors": {"allowed-origins", "allowed-methods", "allowed-headers", "expose-headers"},
    "allowed-origins": {"origin"},
    "allowed-methods": {"method"},
    "allowed-headers": {"header"},
    "expose-headers": {"header"},
    "ip-filter": {"address", "address-range"},
    "check-header": {"value"},
    "mock-response": set(),
}
LEAVES = {
    "value",
    "set-url",
    "dimension",
    "audience",
    "issuer",
    "origin",
    "method",
    "header",
    "address",
    "address-range",
    "set-status",
    "set-body",
    "set-method",
}

REQUIRED_ATTRIBUTES: dict[str, set[str]] = {
    "set-header": {"name"},
    "set-query-parameter": {"name"},
    "set-variable": {"name", "value"},
    "set-status": {"code"},
    "set-backend-service": set(),
    "when": {"condition"},
    "authentication-managed-identity": {"resource"},
    "azure-openai-token-limit": {"counter-key"},
    "llm-token-limit": {"counter-key"},
    "rate-limit-by-key": {"calls", "renewal-period", "counter-key"},
    "quota-by-key": {"renewal-period", "counter-key"},
    "dimension": {"name"},
    "include-fragment": {"fragment-id"},
    "send-request": {"response-variable-name"},
    "retry": {"condition", "count", "interval"},
}

# .NET types APIM allows in policy expressions (policy-expressions reference, "CLR type"), plus keywords.
ALLOWED_ROOTS = {
    "context",
    "Newtonsoft",
    "System",
    "String",
    "string",
    "DateTime",
    "DateTimeOffset",
    "TimeSpan",
    "Math",
    "Convert",
    "Guid",
    "Int16",
    "Int32",
    "Int64",
    "int",
    "long",
    "Double",
    "double",
    "Decimal",
    "decimal",
    "Single",
    "float",
    "Boolean",
    "bool",
    "Byte",
    "byte",
    "Char",
    "char",
    "Object",
    "object",
    "Array",
    "Enumerable",
    "Regex",
    "Encoding",
    "Uri",
    "UriBuilder",
    "JObject",
    "JArray",
    "JToken",
    "JValue",
    "JProperty",
    "JsonConvert",
    "XDocument",
    "XElement",
    "XAttribute",
    "XNode",
    "Jwt",
    "Tuple",
    "Enum",
    "StringComparison",
    "Dictionary",
    "List",
    "HashSet",
    "KeyValuePair",
    "IEnumerable",
    "Nullable",
    "BitConverter",
    "Random",
    "StringBuilder",
    "HttpUtility",
    "WebUtility",
    "SHA256",
    "HMACSHA256",
    "Exception",
    "CultureInfo",
    "DateTimeStyles",
    "NumberStyles",
    "Buffer",
    "Formatting",
    "Linq",
    "true",
    "false",
    "null",
    "new",
    "return",
    "var",
    "if",
    "else",
    "foreach",
    "in",
    "for",
    "while",
    "typeof",
    "is",
    "as",
    "out",
    "ref",
    "default",
    "this",
    "throw",
    "break",
    "continue",
    "switch",
    "case",
    "nameof",
    "checked",
    "unchecked",
    "await",
    "async",
    "const",
}

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>//[^\n]*|/\*.*?\*/)
  | (?P<verbatim>\$?@"(?:[^"]|"")*"|@\$"(?:[^"]|"")*")
  | (?P<string>\$?"(?:[^"\\\n]|\\.)*")
  | (?P<char>'(?:[^'\\\n]|\\.[^']*)')
  | (?P<number>(?:0[xX][0-9a-fA-F_]+|\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?)[uUlLfFdDmM]*)
  | (?P<ident>@?[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>=>|\?\?=|\?\?|\?\.|\?\[|==|!=|<=|>=|&&|\|\||\+\+|--|\+=|-=|\*=|/=|%=|&=|\|=|\^=|<<|::
          |[-+*/%&|^!~<>=?:.,;()\[\]{}])
    """,
    re.VERBOSE | re.DOTALL,
)
_PAIRS = {"(": ")", "[": "]", "{": "}"}


def tokenize(source: str) -> list[tuple[str, str]]:
    """(kind, text) tokens of a C# expression; raises ValueError on a character C# does not allow."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(source):
        m = _TOKEN.match(source, pos)
        if m is None:
            raise ValueError(f"unexpected {source[pos : pos + 10]!r} at offset {pos}")
        kind = m.lastgroup or "?"
        if kind not in ("ws", "comment"):
            tokens.append((kind, m.group()))
        pos = m.end()
    return tokens


def check_expression(text: str) -> list[str]:
    """Problems with one APIM policy expression (``@(...)`` or ``@{...}``); [] if it passes."""
    if not (text.startswith("@(") or text.startswith("@{")):
        return ["not a policy expression (must start with @( or @{)"]
    try:
        tokens = tokenize(text[1:])
    except ValueError as exc:
        return [str(exc)]
    stack: list[str] = []
    for i, (kind, tok) in enumerate(tokens):
        if kind != "op":
            continue
        if tok in _PAIRS:
            stack.append(_PAIRS[tok])
        elif tok in _PAIRS.values():
            if not stack or stack.pop() != tok:
                return [f"unbalanced {tok!r}"]
            if not stack and i != len(tokens) - 1:
                return [f"text after the expression's closing {tok!r}"]
    if stack:
        return [f"missing {''.join(reversed(stack))!r}"]
    inner = tokens[1:-1]
    if not inner:
        return ["empty expression"]
    problems: list[str] = []
    single = text.startswith("@(")
    if single and any(tok == ";" for _, tok in inner):
        problems.append("';' in a single-statement expression @( ): use @{ ... return ...; }")
    if not single and not any(tok == "return" for _, tok in inner):
        problems.append("a multi-statement expression @{ } must return a value")
    problems += _roots(inner)
    return problems


def _roots(tokens: list[tuple[str, str]]) -> list[str]:
    """Identifiers that start a member-access chain but are neither a local, a keyword nor an allowed type."""
    locals_: set[str] = set()
    for i, (kind, tok) in enumerate(tokens):
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        prev = tokens[i - 1][1] if i > 0 else ""
        if kind == "ident" and (prev in ("var", "out", "foreach", "(") and nxt in ("=", "in", ")", ",")):
            locals_.add(tok)
        if kind == "ident" and nxt == "=>":
            locals_.add(tok)
        if kind == "ident" and prev in ALLOWED_ROOTS - {"return", "new", "in", "is", "as"} and nxt == "=":
            locals_.add(tok)  # typed declaration: string x = ...
    problems = []
    for i, (kind, tok) in enumerate(tokens):
        if kind != "ident":
            continue
        prev = tokens[i - 1][1] if i > 0 else ""
        if prev in (".", "?.", "::"):
            continue  # a member, not a root
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if prev == "new" or tok in locals_ or tok in ALLOWED_ROOTS:
            continue
        if nxt == "=>" or (nxt == ":" and prev in (",", "(")):
            continue  # lambda parameter, named argument
        problems.append(f"unknown identifier {tok!r} (not context, a local or a type APIM allows)")
    return problems


def _expressions(element: ET.Element) -> list[tuple[str, str]]:
    found = []
    for name, value in element.attrib.items():
        if value.startswith(("@(", "@{")):
            found.append((f"@{name}", value))
    text = (element.text or "").strip()
    if text.startswith(("@(", "@{")):
        found.append(("text", text))
    return found


def check_policy_document(xml_text: str, name: str = "<policy>") -> list[str]:
    """Every problem in one policy document; [] if it passes."""
    try:
        root = ET.fromstring(xml_text)  # noqa: S314 - the repository's own policy files
    except ET.ParseError as exc:
        return [f"{name}: not well-formed XML: {exc}"]
    if root.tag != "policies":
        return [f"{name}: root element is <{root.tag}>, not <policies>"]
    problems: list[str] = []
    order = [child.tag for child in root]
    unknown = [tag for tag in order if tag not in SECTIONS]
    if unknown:
        problems.append(f"{name}: unknown sections {unknown} (allowed: {list(SECTIONS)})")
    known = [tag for tag in order if tag in SECTIONS]
    if len(set(known)) != len(known):
        problems.append(f"{name}: a section appears more than once: {known}")
    if known != sorted(known, key=SECTIONS.index):
        problems.append(f"{name}: sections out of order: {known}")
    for section in root:
        if section.tag in SECTIONS:
            for child in section:
                problems += _check_policy(child, section.tag, f"{name}:{section.tag}")
    return problems


def _check_policy(element: ET.Element, section: str, where: str) -> list[str]:
    tag = element.tag
    path = f"{where}/{tag}"
    if tag not in POLICIES:
        return [f"{path}: unknown policy"]
    problems = []
    if section not in POLICIES[tag]:
        problems.append(f"{path}: not allowed in {section} (allowed in {sorted(POLICIES[tag])})")
    problems += _check_element(element, section, path)
    return problems


def _check_element(element: ET.Element, section: str, path: str) -> list[str]:
    problems = []
    missing = REQUIRED_ATTRIBUTES.get(element.tag, set()) - set(element.attrib)
    if missing:
        problems.append(f"{path}: missing attribute(s) {sorted(missing)}")
    for where, expr in _expressions(element):
        problems += [f"{path}{'' if where == 'text' else ' ' + where}: {p}" for p in check_expression(expr)]
    allowed = CHILDREN.get(element.tag, set())
    for child in element:
        if "*" in allowed:
            problems += _check_policy(child, section, path)
        elif child.tag in allowed:
            problems += _check_element(child, section, f"{path}/{child.tag}")
        else:
            problems.append(f"{path}/{child.tag}: not a child element <{element.tag}> takes")
    return problems


def policy_files(root: Path) -> list[Path]:
    return sorted(root.rglob("policies/*.xml"))
