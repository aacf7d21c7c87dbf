"""Where the metrics are served: the main port by default, another path, or a port of their own."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.server import free_port, running

pytestmark = pytest.mark.integration


def test_the_metrics_answer_without_a_token_on_the_main_port() -> None:
    with running() as server:
        response = httpx.get(server.base_url + "/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "\nalex_build_info{" in response.text
        openmetrics = httpx.get(server.base_url + "/metrics",
                                headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.endswith("# EOF\n")


def test_a_path_of_their_own() -> None:
    with running(ALEX_METRICS_PATH="/internal/metrics") as server:
        assert httpx.get(server.base_url + "/metrics").status_code == 404
        moved = httpx.get(server.base_url + "/internal/metrics")
        assert moved.status_code == 200
        assert "alex_sse_connections_active" in moved.text


def test_a_port_of_their_own_takes_them_off_the_main_port() -> None:
    port = free_port()
    with running(ALEX_METRICS_PORT=str(port)) as server:
        assert httpx.get(server.base_url + "/metrics").status_code == 404
        apart = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert apart.status_code == 200
        assert "alex_build_info{" in apart.text
        assert server.events_logged("metrics_listening")[0]["port"] == port


def test_metrics_can_be_turned_off() -> None:
    with running(ALEX_METRICS_ENABLED="false") as server:
        assert httpx.get(server.base_url + "/metrics").status_code == 404
