"""The chart ships copies of dashboards/ (helm can only read files inside the chart, and a symlink does not survive
``helm package``): the copies must stay identical to the originals, and what the chart renders from them must be
them. ``make chart-sync`` refreshes the copies."""

from __future__ import annotations

import pytest
import yaml

from tests.deploy.chart import CHART, ROOT, find, find_all, render

pytestmark = pytest.mark.deploy

DASHBOARDS = ROOT / "dashboards"
COPIES = CHART / "files"
SYNC_HINT = "the chart's copy differs from dashboards/: run `make chart-sync`"


def test_the_chart_has_every_dashboard_and_no_other() -> None:
    originals = sorted(path.name for path in DASHBOARDS.glob("*.json"))
    assert sorted(path.name for path in (COPIES / "dashboards").glob("*.json")) == originals, SYNC_HINT


@pytest.mark.parametrize("name", sorted(path.name for path in DASHBOARDS.glob("*.json")))
def test_dashboard_copies_are_byte_identical(name: str) -> None:
    assert (COPIES / "dashboards" / name).read_bytes() == (DASHBOARDS / name).read_bytes(), SYNC_HINT


def test_alert_rule_copy_is_byte_identical() -> None:
    assert (COPIES / "alerts.yaml").read_bytes() == (DASHBOARDS / "alerts.yaml").read_bytes(), SYNC_HINT


def test_dashboard_configmaps_hold_the_dashboards_exactly() -> None:
    config_maps = find_all(render("monitoring"), "ConfigMap")
    rendered = {key: value for config_map in config_maps for key, value in config_map["data"].items()}
    assert rendered == {path.name: path.read_text(encoding="utf-8") for path in DASHBOARDS.glob("*.json")}
    for config_map in config_maps:
        # kube-prometheus-stack's Grafana sidecar loads ConfigMaps with this label.
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["namespace"] == "monitoring"


def test_prometheus_rule_holds_the_same_rules() -> None:
    rule = find(render("monitoring"), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((DASHBOARDS / "alerts.yaml").read_text(encoding="utf-8"))
