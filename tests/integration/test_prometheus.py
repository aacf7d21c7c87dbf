"""The dashboards and alert rules against a real Prometheus scraping two real servers.

promtool checks and unit-tests the rule file and lints a real ``/metrics`` body. Then a Prometheus (the Debian
package's binary) scrapes two servers every second, as two pods of one namespace: one on the default mock model,
one on a mock script whose tool call fails and whose model call fails. After a short load over real HTTP (tasks
that complete, fail and are cancelled, streams, 401s, 404s and a 429), every panel query of both dashboards, with
the Grafana variables filled in, must parse and return data, and the alert rules must evaluate without error.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import promql
from tests.integration.calls import STREAM_TIMEOUT, open_stream, submit, wait_finished
from tests.integration.server import auth, free_port, running

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus and promtool are not installed (Debian package prometheus; make test installs it)",
)

JOB = "alex-server"
"""The scrape job's name: the alert rules select ``job=~".*alex-server.*"`` (dashboards/README.md)."""
NAMESPACE = "alex-test"
PODS = ("alex-server-0", "alex-server-1")
RATE_WINDOW = "30s"
"""What ``$__rate_interval`` becomes (Grafana makes it at least four scrape intervals): longer than the whole test,
so that every rate reaches back to the samples from before the load."""
SCRIPT = {"turns": [
    {"text": "Reading two things.", "tool_calls": [
        {"name": "file_read", "arguments": {"path": "no/such/file.txt"}},
        {"name": "list_files", "arguments": {"path": "."}},
    ]},
    {"text": "Thinking.", "error": {"kind": "rate_limit", "message": "the model server answered 429"}},
]}
"""The second pod's model: a tool call that fails, one that works, then a model error that fails the task."""


def fill(expr: str) -> str:
    """A panel query as Grafana sends it with both pods chosen."""
    return (expr.replace("$namespace", NAMESPACE)
            .replace("$pod", "(" + "|".join(PODS) + ")")
            .replace("$__rate_interval", RATE_WINDOW))



@contextmanager
def prometheus(folder: Path, targets: dict[str, str]) -> Iterator[str]:
    """A Prometheus scraping ``targets`` (pod label to host:port) every second, with the alert rules loaded;
    yields its base URL."""
    assert PROMETHEUS is not None
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(promql.ALERTS)],
        "scrape_configs": [{
            "job_name": JOB,
            "static_configs": [
                {"targets": [address], "labels": {"namespace": NAMESPACE, "pod": pod}}
                for pod, address in targets.items()
            ],
        }],
    }
    # JSON is YAML: the config needs no YAML writer.
    (folder / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    log = (folder / "prometheus.log").open("w")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=folder,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, (folder / "prometheus.log").read_text()
            try:
                if httpx.get(url + "/-/ready", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "prometheus never became ready"
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


async def query(prom: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    """An instant query; asserts Prometheus parsed and ran it, returns the samples."""
    response = await prom.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert body["status"] == "success", f"{expr}\n{body}"
    assert body["data"]["resultType"] == "vector", expr
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def eventually(prom: httpx.AsyncClient, expr: str, predicate: Callable[[list[dict[str, Any]]], bool],
                     what: str) -> list[dict[str, Any]]:
    """Query ``expr`` until ``predicate`` holds for its samples."""
    result: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(STREAM_TIMEOUT):
            while True:
                result = await query(prom, expr)
                if predicate(result):
                    return result
                await asyncio.sleep(0.25)
    except TimeoutError:
        raise AssertionError(f"{what}: {expr} gives {result}") from None


async def load(plain: httpx.AsyncClient, scripted: httpx.AsyncClient) -> int:
    """The scripted traffic; returns how many tasks finished."""
    # A task that completes, watched by a stream that then goes away (client_gone).
    async with open_stream(plain, "watched") as stream:
        completed = await submit(plain, "$ echo dashboards", "watched")
        async with asyncio.timeout(STREAM_TIMEOUT):
            async for message in stream:
                if message.event == "task_complete":
                    break
    assert (await wait_finished(plain, completed))["status"] == "completed"

    # A task cancelled while its command runs.
    async with open_stream(plain, "slow") as stream:
        cancelled = await submit(plain, "$ sleep 20", "slow")
        async with asyncio.timeout(STREAM_TIMEOUT):
            async for message in stream:
                if message.event == "tool_call_start":
                    break
        assert (await plain.post(f"/api/tasks/{cancelled}/cancel")).status_code == 202
    assert (await wait_finished(plain, cancelled))["status"] == "cancelled"

    # A task whose tool call and model call fail.
    failed = await submit(scripted, "read it", "scripted")
    assert (await wait_finished(scripted, failed))["status"] == "failed"

    # Refusals: no token, a malformed token, an unknown task, and a third task in a minute over a limit of two.
    async with httpx.AsyncClient(base_url=plain.base_url, timeout=10.0) as anonymous:
        assert (await anonymous.get("/api/tasks/t_0")).status_code == 401
        assert (await anonymous.get("/api/tasks/t_0", headers={"Authorization": "Bearer x"})).status_code == 401
    assert (await plain.get("/api/tasks/t_0000000000000000")).status_code == 404
    async with httpx.AsyncClient(base_url=plain.base_url, headers=auth("mallory"), timeout=10.0) as mallory:
        answers = [await mallory.post("/api/tasks", json={"task": "hello", "session_id": f"limited-{n}"})
                   for n in range(3)]
        assert [a.status_code for a in answers] == [202, 202, 429], [a.text for a in answers]
        accepted = [answer.json()["task_id"] for answer in answers[:2]]
        for task_id in accepted:
            await wait_finished(mallory, task_id)
    return len([completed, cancelled, failed, *accepted])


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60,
                          cwd=promql.DASHBOARDS, check=False)


@needs_prometheus
def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    checked = promtool("check", "rules", promql.ALERTS.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout
    tested = promtool("test", "rules", promql.ALERT_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


@needs_prometheus
async def test_every_panel_shows_data_from_live_servers(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    with running(ALEX_RATE_LIMIT_TASKS="2/minute") as plain_server, \
            running(ALEX_MOCK_SCRIPT=str(script)) as scripted_server, \
            prometheus(tmp_path, {PODS[0]: f"127.0.0.1:{plain_server.port}",
                                  PODS[1]: f"127.0.0.1:{scripted_server.port}"}) as prom_url:
        async with httpx.AsyncClient(base_url=plain_server.base_url, headers=auth("alice"), timeout=10.0) as plain, \
                httpx.AsyncClient(base_url=scripted_server.base_url, headers=auth("alice"), timeout=10.0) as scripted, \
                httpx.AsyncClient(base_url=prom_url, timeout=10.0) as prom:
            # A real scrape of each server passes promtool's exposition-format lint.
            for server in (plain_server, scripted_server):
                async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as anonymous:
                    scrape = await anonymous.get("/metrics")
                assert scrape.status_code == 200
                linted = await asyncio.to_thread(promtool, "check", "metrics", stdin=scrape.text)
                assert linted.returncode == 0, linted.stdout + linted.stderr

            # Both pods are scraped before the load, so that rates see it begin.
            await eventually(prom, f'up{{job="{JOB}"}} == 1', lambda r: len(r) == len(PODS), "targets never up")
            finished = await load(plain, scripted)

            # One stream stays open while the panels are read.
            async with open_stream(plain, "idle"):
                await eventually(
                    prom, f'sum(alex_tasks_finished_total{{job="{JOB}"}}) == {finished}'
                          f' and sum(alex_sse_connections_active{{job="{JOB}"}}) == 1',
                    lambda r: len(r) == 1, "prometheus never scraped the end of the load")
                # One scrape more: a series born during the load has two samples, enough for a rate.
                scraped = time.time()
                await eventually(prom, f'timestamp(up{{job="{JOB}"}}) > {scraped}', lambda r: len(r) == len(PODS),
                                 "prometheus stopped scraping")
                await check_variables(prom)
                results: dict[str, list[dict[str, Any]]] = {}
                for name in ("overview.json", "agent.json"):
                    for where, expr in promql.expressions(promql.load(promql.DASHBOARDS / name)):
                        result = await query(prom, fill(expr))
                        assert result, f"{name}: {where} returns no data:\n{fill(expr)}"
                        results[where] = result
                check_load_shows(results)
                await check_alert_rules(prom)
                await check_every_metric_is_scraped(prom)


async def check_variables(prom: httpx.AsyncClient) -> None:
    """The namespace and pod variables list what the scrape config labels the targets with."""
    board = promql.load(promql.DASHBOARDS / "overview.json")
    for name, expected in (("namespace", [NAMESPACE]), ("pod", list(PODS))):
        selector, label = promql.label_values(promql.variable(board, name)["query"])
        response = await prom.get("/api/v1/series", params={"match[]": fill(selector)})
        assert response.json()["status"] == "success", response.text
        assert sorted({series[label] for series in response.json()["data"]}) == expected, name


def check_load_shows(results: dict[str, list[dict[str, Any]]]) -> None:
    """A few panels whose values the load decides (on series the service creates at zero, so rates see them rise)."""

    def by(where: str, label: str) -> dict[str, float]:
        return {sample["metric"].get(label, ""): float(sample["value"][1]) for sample in results[where]}

    outcomes = by("Tasks submitted and finished/s by outcome [B]", "outcome")
    assert all(outcomes[outcome] > 0 for outcome in ("completed", "failed", "cancelled")), outcomes
    assert outcomes["interrupted"] == 0, outcomes
    errors = by("Tool error ratio by tool [A]", "tool")
    assert errors["file_read"] > 0, errors
    assert errors["bash"] == 0, errors
    reasons = by("Auth failures/s by reason [A]", "reason")
    assert reasons["missing_token"] > 0, reasons
    assert reasons["malformed_token"] > 0, reasons
    closed = by("Streams closed/s by reason [A]", "reason")
    assert closed["client_gone"] > 0, closed
    assert by("Streams open vs limit [A]", "pod") == {PODS[0]: 1.0, PODS[1]: 0.0}


async def check_alert_rules(prom: httpx.AsyncClient) -> None:
    """Prometheus evaluated every rule on the live series without an error."""
    async with asyncio.timeout(STREAM_TIMEOUT):
        while True:
            groups = (await prom.get("/api/v1/rules")).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            # Not yet evaluated: Go's zero time.
            if rules and not any(rule["lastEvaluation"].startswith("0001") for rule in rules):
                break
            await asyncio.sleep(0.25)
    assert [group["name"] for group in groups] == ["alex-server"]
    assert len(rules) == 6
    for rule in rules:
        assert (rule["health"], rule.get("lastError", "")) == ("ok", ""), rule


async def check_every_metric_is_scraped(prom: httpx.AsyncClient) -> None:
    """Every metric the dashboards and the alert rules read exists on the scraped servers, under the alert rules'
    job convention: a query that falls back to ``vector(0)`` cannot hide a misspelt name."""
    names: set[str] = set()
    for path in promql.dashboard_files():
        names.update(s.metric for _, expr in promql.expressions(promql.load(path)) for s in promql.selectors(expr))
    rules = await prom.get("/api/v1/rules")
    for group in rules.json()["data"]["groups"]:
        for rule in group["rules"]:
            names.update(s.metric for s in promql.selectors(rule["query"]))
    for name in sorted(names):
        found = await query(prom, f'count({name}{{job=~".*alex-server.*"}})')
        assert found, f"no series {name} on the alex-server job"
