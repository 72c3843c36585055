"""A very small KQL interpreter: enough of the language to run infra/'s alert queries over sample rows.

No Kusto engine runs here, so the alert queries in ``infra/modules/alerts.bicep`` would otherwise only be
read, never run. This interprets the subset those queries use, on a list of dict rows, with an injected
``now`` (no clock):

- statements separated by ``;``: ``let name = <scalar or tabular expression>``, then one tabular expression;
- a tabular expression: a table name (a given row list), a ``let``-bound table or ``union a, b, ...`` (the
  rows of each in turn; a column a leg lacks reads as null), then ``| where <expr>``,
  ``| extend name = <expr>, ...``, ``| summarize name = agg(<expr>), ...`` (no ``by``; on no rows it yields
  one row of nulls, as Kusto does) with ``count()``, ``countif(<expr>)``, ``max(<expr>)``, ``min(<expr>)``;
- ``toscalar(<tabular expression>)``: the first column of the first row;
- scalar expressions: ``and``, ``or``, ``==``, ``!=``, ``=~`` (case-insensitive equals), ``contains``
  (case-insensitive substring), ``<``, ``>``,
  ``<=``, ``>=``, ``+ - * /``, string literals ("..." and verbatim @"..."), numbers, timespans (``26h``,
  ``15m``, ``2d``; a timespan divided by a timespan is a real number), ``dynamic["key"]`` (a property of a
  dict value, null when absent), and the functions ``ago``, ``now``, ``extract``, ``iff``, ``isnotempty``,
  ``isempty``, ``isnull``, ``isnotnull``, ``strcat``, ``unixtime_seconds_todatetime``, ``datetime_diff``
  (``"day"``), ``round``, ``tostring``, ``column_ifexists`` (the column where the table has it, else the
  default).

Anything else raises ``KqlUnsupported``: a query that grows past this subset fails its test loudly instead
of being half-evaluated. A column a row lacks is an error too (``KqlUnknownColumn``), so a misspelt column
name (KQL column names are case-sensitive) is caught. Regular expressions are Python's ``re``, which agrees
with Kusto's RE2 on the simple patterns used here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

Row = dict[str, Any]


class KqlUnsupported(ValueError):
    """The query uses KQL this interpreter does not implement."""


class KqlUnknownColumn(KeyError):
    """A column the rows do not have."""


_TOKEN = re.compile(
    r"""\s*(?:
      (?P<comment>//[^\n]*)
    | (?P<verbatim>@"(?:[^"]|"")*")
    | (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<timespan>\d+(?:\.\d+)?(?:d|h|m|s|ms)\b)
    | (?P<number>\d+(?:\.\d+)?)
    | (?P<op>==|!=|=~|<=|>=|[|=<>(),;+\-*/\[\]])
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds", "ms": "milliseconds"}


def _tokenize(text: str) -> list[tuple[str, Any]]:
    tokens: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise KqlUnsupported(f"cannot read {text[pos : pos + 20]!r}")
        pos = match.end()
        kind = match.lastgroup or ""
        raw = match.group(kind)
        if kind == "comment":  # a token, so that "//" inside a string literal (a URL) stays in it
            continue
        if kind == "verbatim":
            tokens.append(("value", raw[2:-1].replace('""', '"')))
        elif kind == "string":
            tokens.append(("value", bytes(raw[1:-1], "utf-8").decode("unicode_escape")))
        elif kind == "timespan":
            number, unit = re.fullmatch(r"([\d.]+)([a-z]+)", raw).groups()  # type: ignore[union-attr]
            tokens.append(("value", timedelta(**{_UNITS[unit]: float(number)})))
        elif kind == "number":
            tokens.append(("value", float(raw) if "." in raw else int(raw)))
        else:
            tokens.append((kind, raw))
    tokens.append(("end", None))
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, Any]], env: dict[str, Any], now: datetime) -> None:
        self.tokens = tokens
        self.i = 0
        self.env = env
        self.now = now

    # ------------------------------------------------------------------------------------- helpers

    def peek(self, offset: int = 0) -> tuple[str, Any]:
        return self.tokens[self.i + offset]

    def take(self, value: str | None = None) -> tuple[str, Any]:
        token = self.tokens[self.i]
        if value is not None and token[1] != value:
            raise KqlUnsupported(f"expected {value!r}, found {token[1]!r}")
        self.i += 1
        return token

    def at(self, value: str) -> bool:
        return self.peek()[1] == value and self.peek()[0] in ("op", "ident")

    # ---------------------------------------------------------------------------------- statements

    def run(self) -> list[Row]:
        result: list[Row] | None = None
        while self.peek()[0] != "end":
            if self.at("let"):
                self.take("let")
                _, name = self.take()
                self.take("=")
                self.env[name] = self.tabular_or_scalar()
            else:
                result = self.tabular()
            if self.peek()[0] != "end":
                self.take(";")
        if result is None:
            raise KqlUnsupported("no tabular expression to run")
        return result

    def tabular_or_scalar(self) -> Any:
        kind, value = self.peek()
        if kind == "ident" and isinstance(self.env.get(value), list):
            return self.tabular()
        return self.expr({})

    # ------------------------------------------------------------------------------------- tabular

    def tabular(self) -> list[Row]:
        _, name = self.take()
        if name == "union":
            rows = self.union()
        else:
            source = self.env.get(name)
            if not isinstance(source, list):
                raise KqlUnsupported(f"unknown table {name!r}")
            rows = [dict(r) for r in source]
        while self.at("|"):
            self.take("|")
            _, op = self.take()
            if op == "where":
                start = self.i
                kept = []
                for row in rows:
                    self.i = start
                    if self.expr(row) is True:
                        kept.append(row)
                if not rows:
                    self.expr({}, evaluate=False)
                rows = kept
            elif op == "extend":
                rows = self.extend(rows)
            elif op == "summarize":
                rows = [self.summarize(rows)]
            else:
                raise KqlUnsupported(f"operator {op!r}")
        return rows

    def union(self) -> list[Row]:
        """``union a, b, ...`` of table names: every row of each, over the union of their columns."""
        legs: list[list[Row]] = []
        while True:
            _, name = self.take()
            source = self.env.get(name)
            if not isinstance(source, list):
                raise KqlUnsupported(f"union leg {name!r} is not a table name")
            legs.append(source)
            if not self.at(","):
                break
            self.take(",")
        columns: list[str] = []
        for leg in legs:
            columns += [c for row in leg for c in row if c not in columns]
        return [{c: row.get(c) for c in columns} for leg in legs for row in leg]

    def _assignments(self) -> list[tuple[str, int]]:
        """``name = <expr>, ...``: each name with the token index of its expression (expressions skipped)."""
        found = []
        while True:
            if self.peek(1)[1] == "=":
                _, name = self.take()
                self.take("=")
            else:  # an unnamed aggregation: Kusto names it <function>_<column>
                column = self.peek(2)[1] if self.peek(2)[0] == "ident" and self.peek(3)[1] == ")" else ""
                name = f"{self.peek()[1]}_{column}"
            found.append((name, self.i))
            self.expr({}, evaluate=False)
            if not self.at(","):
                return found
            self.take(",")

    def extend(self, rows: list[Row]) -> list[Row]:
        assignments = self._assignments()
        end = self.i
        for row in rows:
            for name, start in assignments:
                self.i = start
                row[name] = self.expr(row)
        self.i = end
        return rows

    def summarize(self, rows: list[Row]) -> Row:
        assignments = self._assignments()
        end = self.i
        out: Row = {}
        for name, start in assignments:
            self.i = start
            _, fn = self.take()
            self.take("(")
            if fn == "count":
                self.take(")")
                out[name] = len(rows)
                continue
            arg_start = self.i
            values = []
            for row in rows:
                self.i = arg_start
                values.append(self.expr(row))
            if not rows:
                self.expr({}, evaluate=False)
            self.take(")")
            if fn == "countif":
                out[name] = sum(1 for v in values if v is True)
            elif fn in ("max", "min"):
                present = [v for v in values if v is not None]
                out[name] = (max if fn == "max" else min)(present) if present else None
            else:
                raise KqlUnsupported(f"aggregation {fn!r}")
        self.i = end
        return out

    # -------------------------------------------------------------------------------------- scalars

    def expr(self, row: Mapping[str, Any], *, evaluate: bool = True) -> Any:
        return self.binary(row, 0, evaluate)

    _LEVELS: Sequence[tuple[str, ...]] = (
        ("or",),
        ("and",),
        ("==", "!=", "=~", "contains", "<", ">", "<=", ">="),
        ("+", "-"),
        ("*", "/"),
    )

    def binary(self, row: Mapping[str, Any], level: int, evaluate: bool) -> Any:
        if level == len(self._LEVELS):
            return self.primary(row, evaluate)
        left = self.binary(row, level + 1, evaluate)
        while self.peek()[1] in self._LEVELS[level] and self.peek()[0] in ("op", "ident"):
            _, op = self.take()
            right = self.binary(row, level + 1, evaluate)
            if evaluate:
                left = _apply(op, left, right)
        return left

    def primary(self, row: Mapping[str, Any], evaluate: bool) -> Any:
        kind, value = self.take()
        if kind == "value":
            return value
        if value == "(":
            inner = self.expr(row, evaluate=evaluate)
            self.take(")")
            return inner
        if kind != "ident":
            raise KqlUnsupported(f"unexpected {value!r}")
        if self.at("("):
            return self.call(value, row, evaluate)
        found = self.name(value, row) if evaluate else None
        if self.at("["):  # a property of a dynamic (dict) value
            self.take("[")
            key = self.expr(row, evaluate=evaluate)
            self.take("]")
            if not evaluate:
                return None
            return found.get(key) if isinstance(found, dict) else None
        return found

    def name(self, value: str, row: Mapping[str, Any]) -> Any:
        if value in ("true", "false"):
            return value == "true"
        if value in row:
            return row[value]
        if value in self.env and not isinstance(self.env[value], list):
            return self.env[value]
        raise KqlUnknownColumn(value)

    def call(self, name: str, row: Mapping[str, Any], evaluate: bool) -> Any:
        self.take("(")
        if name == "toscalar":
            table = self.tabular()
            self.take(")")
            return next(iter(table[0].values())) if table and table[0] else None
        if name == "column_ifexists":  # the named column where the table has it, else the default
            _, column = self.take()
            self.take(",")
            default = self.expr(row, evaluate=evaluate)
            self.take(")")
            if not evaluate:
                return None
            if not isinstance(column, str):
                raise KqlUnsupported("column_ifexists needs a string literal column name")
            return row.get(column, default)
        args = []
        while not self.at(")"):
            args.append(self.expr(row, evaluate=evaluate))
            if self.at(","):
                self.take(",")
        self.take(")")
        if not evaluate:
            return None
        function = _FUNCTIONS.get(name)
        if function is None:
            raise KqlUnsupported(f"function {name!r}")
        return function(self.now, *args)


def _apply(op: str, left: Any, right: Any) -> Any:
    if op == "and":
        return left is True and right is True
    if op == "or":
        return left is True or right is True
    if op == "=~":
        return isinstance(left, str) and isinstance(right, str) and left.lower() == right.lower()
    if op == "contains":
        return isinstance(left, str) and isinstance(right, str) and right.lower() in left.lower()
    if left is None or right is None:
        return None if op in "+-*/" else False
    if op == "/" and right == 0:  # Kusto: real division by zero is NaN/inf, integer division by zero null
        return float("nan") if isinstance(left, float) or isinstance(right, float) else None
    operations: dict[str, Callable[[Any, Any], Any]] = {
        "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
        "<": lambda a, b: a < b,
        ">": lambda a, b: a > b,
        "<=": lambda a, b: a <= b,
        ">=": lambda a, b: a >= b,
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "*": lambda a, b: a * b,
        "/": lambda a, b: a / b,
    }
    return operations[op](left, right)


def _extract(_now: datetime, pattern: str, group: int, text: Any) -> str:
    match = re.search(pattern, text) if isinstance(text, str) else None
    return match.group(group) if match else ""


def _datetime_diff(_now: datetime, part: str, a: datetime | None, b: datetime | None) -> int | None:
    if part.lower() != "day":
        raise KqlUnsupported(f"datetime_diff part {part!r}")
    if a is None or b is None:
        return None
    return (a.date() - b.date()).days


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "ago": lambda now, span: now - span,
    "now": lambda now: now,
    "extract": _extract,
    "iff": lambda _now, cond, a, b: a if cond is True else b,
    "isnotempty": lambda _now, v: v is not None and v != "",
    "isempty": lambda _now, v: v is None or v == "",
    "isnull": lambda _now, v: v is None,
    "isnotnull": lambda _now, v: v is not None,
    "strcat": lambda _now, *parts: "".join("" if p is None else str(p) for p in parts),
    "tostring": lambda _now, v: "" if v is None else str(v),
    "round": lambda _now, v, digits=0: None if v is None else round(v, digits),
    "unixtime_seconds_todatetime": lambda _now, v: (
        None if v is None else datetime.fromtimestamp(v, tz=_now.tzinfo)
    ),
    "datetime_diff": _datetime_diff,
}


def run_query(
    query: str,
    tables: Mapping[str, list[Row]],
    *,
    now: datetime,
    schemas: Mapping[str, Sequence[str]] | None = None,
) -> list[Row]:
    """Run ``query`` over ``tables`` (name -> rows; datetimes as aware ``datetime``) at time ``now``.

    ``schemas`` (table -> column names) gives a table's columns where rows are sparse, as AzureDiagnostics'
    are: a column of the schema that a row lacks reads as empty (``""`` for a string column, whose name ends
    in ``_s``, else null), as in Kusto. Without a schema a table's columns are those of its rows."""
    env: dict[str, Any] = {}
    for name, rows in tables.items():
        columns = list(schemas.get(name, ())) if schemas else []
        columns += [c for row in rows for c in row if c not in columns]
        env[name] = [{c: row.get(c, "" if c.endswith("_s") else None) for c in columns} for row in rows]
    return _Parser(_tokenize(query), env, now).run()
