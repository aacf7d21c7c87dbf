"""The chart and the application agree: render the chart, build the container's process from it as the kubelet would
(the image's entry point and environment from the Dockerfile, the pod's args, variables, secrets and volumes on
top), start the service here with exactly that, and ask it what the probes, the Service, the ServiceMonitor and the
`helm test` hook ask.

The container runs in bubblewrap with the root filesystem read-only, every capability dropped and only the data
volume and /tmp writable, as the pod's securityContext has it. (It runs as root, not as the pod's 10001: here the
interpreter lives in root's home, which another user cannot reach.)
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from tests.deploy import dockerfile
from tests.deploy.chart import ROOT, Manifest, find, find_all, render, server_container
from tests.deploy.image import DOCKERFILE, require_tini
from tests.integration.server import ServerProcess, data_folder, free_port

pytestmark = pytest.mark.deploy

POD_NAME = "alex-alex-server-7d9f8b6c5-x2x7q"


def resolve_env(container: dict[str, Any], manifests: tuple[Manifest, ...]) -> dict[str, str]:
    """The container's variables with their values: plain ones, the chart's own Secret, the downward API."""
    secrets = {doc["metadata"]["name"]: doc.get("data", {}) for doc in find_all(manifests, "Secret")}
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            reference = source["secretKeyRef"]
            assert reference["name"] in secrets, f"{item['name']} refers to a Secret this render does not hold"
            env[item["name"]] = base64.b64decode(secrets[reference["name"]][reference["key"]]).decode()
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = POD_NAME
        else:
            raise AssertionError(f"{item['name']}: no stand-in for {source}")
    return env


def confined(argv: list[str], writable: list[Path]) -> list[str]:
    """``argv`` with the pod's filesystem: everything read-only but ``writable`` and a fresh /tmp; no capabilities."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise RuntimeError("bwrap is not installed: run `make system-deps` (Debian package bubblewrap)")
    command = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    # The checkout (its .venv is the image's) stays visible when it lies under /tmp, as a CI clone may.
    command += ["--ro-bind", str(ROOT), str(ROOT)]
    for folder in writable:
        command += ["--bind", str(folder), str(folder)]
    return [*command, "--cap-drop", "ALL", "--die-with-parent", "--", *argv]


def container_pid1(outer: int, executable: str) -> int:
    """The process running ``executable`` below ``outer`` (bubblewrap): the container's first process."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # The command name, in parentheses, may hold spaces: the parent pid is the second field after it.
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
    pending = [outer]
    while pending:
        pid = pending.pop()
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode() == executable:
                return pid
        pending += [child for child, parent in parents.items() if parent == pid]
    raise AssertionError(f"no {executable} below process {outer}")


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == port)


def through_service(url: str, manifests: tuple[Manifest, ...], container: dict[str, Any], server_port: int) -> str:
    """A URL on the Service, as a pod would call it, turned into the container port it reaches, on loopback."""
    service = find(manifests, "Service")
    parts = urlsplit(url)
    assert parts.hostname == service["metadata"]["name"], f"{url} does not go to the Service"
    target = next(p["targetPort"] for p in service["spec"]["ports"] if p["port"] == parts.port)
    number = port_number(container, target)
    if number == port_number(container, "http"):
        assert number == server_port
    return urlunsplit((parts.scheme, f"127.0.0.1:{number}", parts.path, parts.query, parts.fragment))


@pytest.mark.parametrize("value_set", ["default", "persistence"])
def test_the_service_runs_as_the_chart_describes(value_set: str) -> None:
    require_tini()
    http_port, metrics_port = free_port(), free_port()
    manifests = render(value_set, "--set", f"containerPort={http_port}", "--set", f"metrics.port={metrics_port}")
    container = server_container(manifests)
    deployment = find(manifests, "Deployment")
    image = dockerfile.image_config(dockerfile.parse(DOCKERFILE), args={"VENV": str(ROOT / ".venv")},
                                    base_env={"PATH": dockerfile.interpreter_path()})
    # Kubernetes: the pod's command replaces the image's ENTRYPOINT (and drops its CMD); its args replace CMD.
    command = container.get("command", image.entrypoint)
    args = container.get("args", image.cmd if "command" not in container else [])
    pod_env = resolve_env(container, manifests)
    mount_path = pod_env["ALEX_DATA_DIR"]
    assert mount_path in {mount["mountPath"] for mount in container["volumeMounts"]}

    with data_folder() as data:
        data.mkdir()
        # The data volume is mounted where the chart says; here it is a folder of ours, so its path is rewritten.
        env = {**image.env, **pod_env, "ALEX_DATA_DIR": str(data), "TINI_SUBREAPER": "1"}
        server = ServerProcess(data, env, command=confined([*command, *args], [data.parent]), cwd=data,
                               secret=None)
        # Exactly the container's variables: none of the harness's test defaults (mock delay, rate limits, secret).
        server.env = {key: value for key, value in server.env.items() if key in env or key == "HOME"}
        server.start()
        try:
            assert server.port == http_port == int(pod_env["PORT"])
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                get = container[probe]["httpGet"]
                assert port_number(container, get["port"]) == server.port
                answer = httpx.get(f"http://127.0.0.1:{server.port}{get['path']}", timeout=5)
                assert answer.status_code == 200, f"{probe} {get['path']}: {answer.status_code}"
            assert (data / "alex.db").exists(), "the database is not in the chart's data volume"

            if any(port["name"] == "metrics" for port in container["ports"]):
                assert port_number(container, "metrics") == metrics_port == int(pod_env["ALEX_METRICS_PORT"])
                scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
                assert scraped.status_code == 200
                assert "alex_build_info" in scraped.text
                # Behind the Ingress (the http port) there are no metrics.
                assert httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).status_code == 404

            hook = find(manifests, "Pod")
            (probe_container,) = hook["spec"]["containers"]
            hook_env = {item["name"]: through_service(item["value"], manifests, container, server.port)
                        for item in probe_container["env"]}
            ran = subprocess.run(probe_container["command"], env={**image.env, **hook_env}, capture_output=True,
                                 text=True, check=False, timeout=60)
            assert ran.returncode == 0, ran.stdout + ran.stderr
            assert ran.stdout.count("ok http://") == len(hook_env) + 1

            # The kubelet signals the container's PID 1, which is tini (bubblewrap, around it here, passes nothing on).
            started = time.monotonic()
            os.kill(container_pid1(server.process.pid, command[0]), signal.SIGTERM)
            server.process.wait(30)
            seconds = time.monotonic() - started
        finally:
            server.kill()
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert server.events_logged("server_stopped")
    assert seconds < pod["terminationGracePeriodSeconds"] - pre_stop
