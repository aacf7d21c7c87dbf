"""The Grafana dashboards and the Prometheus alert rules of ``dashboards/``, linted: provisioning-ready JSON, one
data source variable, namespace and pod filters, units, rate windows, and only metrics the service declares; alerts
with their labels, annotations, runbooks and promtool tests. Prometheus itself runs them in
``tests/integration/test_prometheus.py``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.observability.metrics import Metrics
from tests import promql
from tests.promql import DATASOURCE_REF, RATE_WINDOW, ROOT

BOARDS = {path.name: promql.load(path) for path in promql.dashboard_files()}
BOARD_IDS = sorted(BOARDS)
FILTERS = ('namespace=~"$namespace"', 'pod=~"$pod"')
ALERT_NAMES = (
    "AlexServerTargetDown", "AlexServerHigh5xxRatio", "AlexServerSseDropsSustained", "AlexServerLlmErrorRatio",
    "AlexServerTaskFailureRatio", "AlexServerConnectionsNearCap",
)
JOB_CONVENTION = 'job=~".*alex-server.*"'
RUNBOOK = re.compile(r"^https://github\.com/alex-server/alex-server/blob/main/(?P<path>[^#]+)#(?P<anchor>[\w-]+)$")
DURATION = re.compile(r"^\d+[smhd]$")


def board(name: str) -> dict[str, Any]:
    return BOARDS[name]


def alert_rules() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(promql.ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path) -> set[str]:
    return {
        github_anchor(line.lstrip("#"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if re.match(r"^#{1,6} ", line)
    }


# --- the dashboards ---------------------------------------------------------------------------------------------


def test_both_dashboards_are_there() -> None:
    assert BOARD_IDS == ["agent.json", "overview.json"]


@pytest.mark.parametrize("name", BOARD_IDS)
def test_a_dashboard_is_ready_for_file_provisioning(name: str) -> None:
    dash = board(name)
    assert "__inputs" not in dash
    assert "__requires" not in dash
    assert dash["id"] is None
    assert dash["uid"] == "alex-" + Path(name).stem, "uids are fixed, so links and bookmarks survive a re-import"
    assert dash["schemaVersion"] >= 36
    assert "alex-server" in dash["tags"]
    assert dash["title"].startswith("alex-server / ")
    assert re.fullmatch(r"\d+[smh]", dash["refresh"])
    assert dash["time"]["from"].startswith("now-")


def test_uids_and_titles_are_unique_across_dashboards() -> None:
    assert len({b["uid"] for b in BOARDS.values()}) == len(BOARDS)
    assert len({b["title"] for b in BOARDS.values()}) == len(BOARDS)


@pytest.mark.parametrize("name", BOARD_IDS)
def test_panel_ids_are_unique(name: str) -> None:
    ids = [panel["id"] for panel in promql.panels(board(name))]
    assert len(ids) == len(set(ids)), ids


@pytest.mark.parametrize("name", BOARD_IDS)
def test_the_datasource_variable_picks_a_prometheus(name: str) -> None:
    var = promql.variable(board(name), "datasource")
    assert (var["type"], var["query"]) == ("datasource", "prometheus")


@pytest.mark.parametrize("name", BOARD_IDS)
def test_every_other_variable_queries_through_the_datasource_variable(name: str) -> None:
    others = [v for v in board(name)["templating"]["list"] if v["type"] != "datasource"]
    assert others
    for var in others:
        assert var["datasource"] == DATASOURCE_REF, var["name"]


@pytest.mark.parametrize("name", BOARD_IDS)
def test_namespace_and_pod_variables_come_from_build_info(name: str) -> None:
    dash = board(name)
    namespace = promql.variable(dash, "namespace")
    pod = promql.variable(dash, "pod")
    for var in (namespace, pod):
        assert var["type"] == "query"
        assert (var["multi"], var["includeAll"], var["allValue"]) == (True, True, ".*"), var["name"]
        assert var["refresh"] in (1, 2), "the values must be loaded from Prometheus, not frozen in the file"
    assert promql.label_values(namespace["query"]) == ("alex_build_info", "namespace")
    assert promql.label_values(pod["query"]) == ('alex_build_info{namespace=~"$namespace"}', "pod"), (
        "the pod list depends on the namespaces chosen")


@pytest.mark.parametrize("name", BOARD_IDS)
def test_every_panel_and_target_uses_the_datasource_variable(name: str) -> None:
    for panel in promql.query_panels(board(name)):
        assert panel.get("datasource") == DATASOURCE_REF, panel["title"]
        assert panel.get("targets"), f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE_REF, panel["title"]


@pytest.mark.parametrize("name", BOARD_IDS)
def test_every_panel_has_a_unit(name: str) -> None:
    for panel in promql.query_panels(board(name)):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert isinstance(unit, str), f"{panel['title']} has no unit"
        assert unit, f"{panel['title']} has no unit"


@pytest.mark.parametrize("name", BOARD_IDS)
def test_rates_use_the_rate_interval(name: str) -> None:
    for where, expr in promql.expressions(board(name)):
        for argument in promql.calls(expr, "rate", "irate", "increase"):
            assert argument.rstrip().endswith(f"[{RATE_WINDOW}]"), f"{where}: {argument}"
        for window in promql.ranges(expr):
            assert window == RATE_WINDOW, f"{where}: hard-coded range [{window}]"


@pytest.mark.parametrize("name", BOARD_IDS)
def test_every_selector_filters_namespace_and_pod(name: str) -> None:
    for where, expr in promql.expressions(board(name)):
        found = promql.selectors(expr)
        assert found, f"{where}: a query over no series (a constant) shows nothing about the service"
        for selector in found:
            for matcher in FILTERS:
                assert matcher in selector.matchers, f"{where}: {selector.metric} lacks {matcher}"


@pytest.mark.parametrize("name", BOARD_IDS)
def test_every_metric_is_one_the_service_declares(name: str) -> None:
    contract = promql.contract()
    dash = board(name)
    queries = [*promql.expressions(dash)]
    for var in ("namespace", "pod"):
        source, _ = promql.label_values(promql.variable(dash, var)["query"])
        queries.append((f"variable {var}", source))
    for where, expr in queries:
        for selector in promql.selectors(expr):
            assert contract.kind_of(selector.metric) is not None, f"{where}: {selector.metric} is not exposed"


@pytest.mark.parametrize("name", BOARD_IDS)
def test_functions_fit_the_metric_types(name: str) -> None:
    contract = promql.contract()
    for where, expr in promql.expressions(board(name)):
        for argument in promql.calls(expr, "rate", "irate", "increase"):
            for selector in promql.selectors(argument):
                assert contract.rateable(selector.metric), f"{where}: rate over the gauge {selector.metric}"
        for argument in promql.calls(expr, "histogram_quantile"):
            assert any("le" in labels for labels in promql.grouping_labels(argument)), f"{where}: not by le"
            for selector in promql.selectors(argument):
                assert contract.kind_of(selector.metric) == "bucket", f"{where}: {selector.metric} has no buckets"


# --- the checks themselves ----------------------------------------------------------------------------------------


def test_the_promql_reader_finds_selectors_calls_and_windows() -> None:
    expr = ('histogram_quantile(0.9, sum by (le, tool) (rate(a_bucket{x="}[5m]"}[1m]))) '
            'or on() vector(0) / sum(b) by (pod) + increase(c_total[$__rate_interval])')
    assert promql.selectors(expr) == [
        promql.Selector("a_bucket", 'x="}[5m]"'), promql.Selector("b", ""), promql.Selector("c_total", "")]
    assert promql.calls(expr, "rate", "increase") == ['a_bucket{x="}[5m]"}[1m]', "c_total[$__rate_interval]"]
    assert promql.ranges(expr) == ["1m", RATE_WINDOW]
    assert promql.grouping_labels(expr) == [{"le", "tool"}, {"pod"}]


def test_the_contract_is_what_the_service_registers() -> None:
    # Guards the docstring parse: a parse that found nothing, or a docstring out of step with the code, would let a
    # dashboard query a metric that does not exist.
    contract = promql.contract()
    registered: dict[str, str] = {}
    for family in Metrics(process=False).registry.collect():
        exposed = family.name + "_total" if family.type == "counter" else family.name
        registered[exposed] = family.type
    assert contract.kinds == registered
    assert contract.prefixes == ("process_", "python_")
    assert contract.kind_of("alex_build_info") == "gauge"
    assert contract.kind_of("gen_ai_client_token_usage_sum") == "histogram"
    assert contract.kind_of("alex_tasks_finished") is None
    assert not contract.rateable("alex_sse_connections_active")


# --- the alert rules ----------------------------------------------------------------------------------------------


def test_the_rule_file_has_one_group_with_the_alerts() -> None:
    groups = yaml.safe_load(promql.ALERTS.read_text(encoding="utf-8"))["groups"]
    assert [group["name"] for group in groups] == ["alex-server"]
    assert sorted(rule["alert"] for rule in alert_rules()) == sorted(ALERT_NAMES)


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_an_alert_says_how_long_how_bad_and_what_to_do(rule: dict[str, Any]) -> None:
    assert DURATION.match(str(rule.get("for", ""))), "an alert without for: pages on one bad scrape"
    assert rule["labels"]["severity"] in ("critical", "warning")
    annotations = rule["annotations"]
    for key in ("summary", "description", "runbook_url"):
        assert str(annotations.get(key, "")).strip(), f"no {key}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_a_runbook_url_points_at_its_section_of_the_docs(rule: dict[str, Any]) -> None:
    match = RUNBOOK.match(rule["annotations"]["runbook_url"])
    assert match is not None, rule["annotations"]["runbook_url"]
    assert match["anchor"] == github_anchor("Alert: " + rule["alert"])
    document = ROOT / match["path"]
    assert document.is_file(), match["path"]
    assert match["anchor"] in headings(document), f"{match['path']} has no heading '### Alert: {rule['alert']}'"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_an_alert_reads_only_declared_metrics_of_the_alex_server_job(rule: dict[str, Any]) -> None:
    contract = promql.contract()
    found = promql.selectors(rule["expr"])
    assert found
    for selector in found:
        assert contract.kind_of(selector.metric) is not None, f"{selector.metric} is not exposed"
        assert JOB_CONVENTION in selector.matchers, f"{selector.metric} is not limited to the alex-server job"
    for argument in promql.calls(rule["expr"], "rate", "irate", "increase"):
        for selector in promql.selectors(argument):
            assert contract.rateable(selector.metric), f"rate over the gauge {selector.metric}"


def test_every_alert_has_a_firing_and_a_quiet_promtool_case() -> None:
    suite = yaml.safe_load(promql.ALERT_TESTS.read_text(encoding="utf-8"))
    assert suite["rule_files"] == [promql.ALERTS.name]
    cases = [case for test in suite["tests"] for case in test.get("alert_rule_test", [])]
    for name in ALERT_NAMES:
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"no promtool case where {name} fires"
        assert any(not case.get("exp_alerts") for case in mine), f"no promtool case where {name} stays quiet"


def test_github_anchors_are_made_like_githubs() -> None:
    assert github_anchor("Alert: AlexServerHigh5xxRatio") == "alert-alexserverhigh5xxratio"
    assert github_anchor("Metrics, traces and alerts") == "metrics-traces-and-alerts"
    assert "the-mock-model" in headings(ROOT / "docs" / "operations.md")
