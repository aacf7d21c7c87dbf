"""Reading ``dashboards/`` for the tests: the panels of the Grafana dashboards, the selectors and function calls of a
PromQL expression, and the metric contract written in the docstring of ``service/observability/metrics.py``.

The PromQL reading is deliberately small: it knows strings, label matchers, range brackets, grouping clauses and
function calls, which is all the dashboards and alert rules use. Prometheus itself parses every expression in the
integration tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.observability import metrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
ALERTS = DASHBOARDS / "alerts.yaml"
ALERT_TESTS = DASHBOARDS / "alerts.test.yaml"

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
"""How every panel, target and query variable names its data source: the ``datasource`` variable."""

RATE_WINDOW = "$__rate_interval"
STANDARD_SERIES = frozenset({"up"})
"""Series Prometheus makes itself for every target."""

_KEYWORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "inf", "nan",
})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACKETED = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_AGGREGATION_CLAUSE = re.compile(r"(?:by|without)\s*\(")
"""What follows an aggregation operator written ``sum by (labels) (...)``."""
_IDENTIFIER = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*")
_RANGE = re.compile(r"\[([^\[\]]*)\]")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return board


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels inside collapsed rows included."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def query_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels that show data: every panel but the rows."""
    return [panel for panel in panels(board) if panel.get("type") != "row"]


def expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """``(panel title and refId, expression)`` of every panel target."""
    return [
        (f"{panel.get('title')} [{target.get('refId')}]", target["expr"])
        for panel in query_panels(board)
        for target in panel.get("targets", [])
    ]


def variable(board: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [v for v in board["templating"]["list"] if v.get("name") == name]
    assert len(found) == 1, f"{board.get('uid')}: {len(found)} variables named {name!r}"
    return found[0]


def label_values(query: str) -> tuple[str, str]:
    """``(selector, label)`` of a Grafana ``label_values(selector, label)`` variable query."""
    match = _LABEL_VALUES.match(query.strip())
    assert match is not None, f"not a label_values query: {query!r}"
    return match["selector"], match["label"]


def _blank(text: str, start: int, end: int) -> str:
    return text[:start] + " " * (end - start) + text[end:]


def _without_strings(expr: str) -> str:
    unquoted = expr
    for match in _STRING.finditer(expr):
        unquoted = _blank(unquoted, match.start(), match.end())
    return unquoted


def _masked(expr: str) -> str:
    """``expr`` with the same length, its strings, matcher and range contents and grouping labels blanked, so that
    what remains visible is names, operators, numbers and the brackets themselves."""
    masked = _without_strings(expr)
    for match in _BRACKETED.finditer(masked):
        masked = _blank(masked, match.start() + 1, match.end() - 1)
    for match in _GROUPING.finditer(masked):
        masked = _blank(masked, match.start(1), match.end(1))
    return masked


@dataclass(frozen=True, slots=True)
class Selector:
    metric: str
    matchers: str
    """The text between the braces, empty when the selector has none."""


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of ``expr``, in order."""
    masked = _masked(expr)
    found: list[Selector] = []
    for match in _IDENTIFIER.finditer(masked):
        name = match.group()
        rest = masked[match.end():]
        after = rest.lstrip()
        if after.startswith("(") or _AGGREGATION_CLAUSE.match(after) or name.lower() in _KEYWORDS:
            continue
        matchers = ""
        if after.startswith("{"):
            opening = match.end() + len(rest) - len(after)
            closing = masked.index("}", opening)
            matchers = expr[opening + 1:closing]
        found.append(Selector(name, matchers))
    return found


def calls(expr: str, *functions: str) -> list[str]:
    """The argument text of every call of one of ``functions`` in ``expr``."""
    masked = _masked(expr)
    pattern = re.compile(r"(?<![\w:])(?:" + "|".join(map(re.escape, functions)) + r")\s*\(")
    found: list[str] = []
    for match in pattern.finditer(masked):
        depth = 0
        for index in range(match.end() - 1, len(masked)):
            depth += {"(": 1, ")": -1}.get(masked[index], 0)
            if depth == 0:
                found.append(expr[match.end():index])
                break
        else:
            raise AssertionError(f"unbalanced parentheses in {expr!r}")
    return found


def ranges(expr: str) -> list[str]:
    """The content of every range (and subquery) bracket of ``expr``."""
    unquoted = _without_strings(expr)
    return [expr[match.start(1):match.end(1)] for match in _RANGE.finditer(unquoted)]


def grouping_labels(expr: str) -> list[set[str]]:
    """The labels of every ``by (...)`` clause of ``expr``."""
    return [
        {label.strip() for label in match.group(1).split(",") if label.strip()}
        for match in re.finditer(r"\bby\s*\(([^()]*)\)", _without_strings(expr))
    ]


@dataclass(frozen=True, slots=True)
class Contract:
    """The metrics the service declares: their exposed names and kinds, and the prefixes of runtime collectors."""

    kinds: dict[str, str]
    """Name as listed (counters with ``_total``, histograms by their base name) to ``counter``, ``gauge`` or
    ``histogram``."""
    prefixes: tuple[str, ...]

    def kind_of(self, series: str) -> str | None:
        """``counter``, ``gauge``, ``bucket`` (of a histogram), ``histogram`` (its ``_sum`` or ``_count``),
        ``runtime`` or ``standard``; None when the service does not expose ``series``."""
        if series in self.kinds and self.kinds[series] != "histogram":
            return self.kinds[series]
        for suffix, kind in (("_bucket", "bucket"), ("_sum", "histogram"), ("_count", "histogram")):
            base = series.removesuffix(suffix)
            if series.endswith(suffix) and self.kinds.get(base) == "histogram":
                return kind
        if series.startswith(self.prefixes):
            return "runtime"
        if series in STANDARD_SERIES:
            return "standard"
        return None

    def rateable(self, series: str) -> bool:
        """Whether ``rate`` makes sense over ``series``: a counter, a histogram's parts, a runtime counter."""
        kind = self.kind_of(series)
        return kind in {"counter", "bucket", "histogram"} or (kind == "runtime" and series.endswith("_total"))


_ENTRY = re.compile(r"^\s*``(?P<name>[a-z_:][a-z0-9_:]*)``\s+(?P<kind>counter|gauge|histogram)\b", re.MULTILINE)
_FAMILY = re.compile(r"``(?P<prefix>[a-z_]+_)\*``")


def contract() -> Contract:
    """The metric list of the docstring of :mod:`service.observability.metrics`."""
    text = metrics.__doc__ or ""
    return Contract(
        kinds={match["name"]: match["kind"] for match in _ENTRY.finditer(text)},
        prefixes=tuple(match["prefix"] for match in _FAMILY.finditer(text)),
    )
