"""The Helm chart, offline: lint, render every value set, validate each manifest against the Kubernetes schemas,
and check what a platform team relies on (refusals, probes, security context, shutdown timing, secrets, Ingress
settings for event streams, the Prometheus Operator objects). No cluster runs here."""

from __future__ import annotations

import base64
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from service.cli import SHUTDOWN_STREAMS_SECONDS
from service.config import Settings, env_name
from tests.deploy import dockerfile
from tests.deploy.chart import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    ROOT,
    VALUE_SETS,
    Manifest,
    find,
    find_all,
    helm,
    plain_env,
    render,
    render_error,
    server_container,
    values_file,
)

pytestmark = pytest.mark.deploy

MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}
SECRET_VARIABLES = ("OPENAI_API_KEY", "ALEX_JWT_SECRET", "ALEX_REDIS_URL")


def pod_spec(manifests: tuple[Manifest, ...]) -> dict[str, Any]:
    spec: dict[str, Any] = find(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


# --- lint and schemas ---------------------------------------------------------------------------------------------


def test_there_are_value_sets_for_defaults_scale_out_and_monitoring() -> None:
    assert {"default", "scaled", "monitoring"} <= set(VALUE_SETS)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_lint_passes_strictly(value_set: str) -> None:
    result = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, "-f", str(values_file(value_set)))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_manifest_is_valid_kubernetes(value_set: str, kube_version: str) -> None:
    manifests = render(value_set, kube_version=kube_version)
    assert manifests
    for manifest in manifests:
        if manifest["kind"] in MONITORING_KINDS:
            continue  # custom resources: test_monitoring_objects_have_what_their_crds_require
        try:
            kubernetes_validate.validate(manifest, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']} is not valid for Kubernetes "
                        f"{kube_version}: {exc.message} at {list(exc.absolute_path)}")


def test_kubernetes_older_than_the_supported_range_is_refused() -> None:
    assert "kubeVersion" in render_error("--kube-version", "1.29.0")


def test_values_schema_is_a_json_schema_the_defaults_meet() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8")), schema)


@pytest.mark.parametrize(("flags", "message"), [
    (("--set", "replicaCount=2"), "replicaCount=2 needs Redis"),
    (("--set", "autoscaling.enabled=true"), "autoscaling.enabled needs Redis"),
    (("--set", "replicaCount=3", "--set", "redis.url=redis://redis:6379/0"), "several replicas need one JWT key"),
    (("--set", "replicaCount=2", "--set", "redis.existingSecret=r", "--set", "auth.existingSecret=j",
      "--set", "persistence.enabled=true"), "one folder serves one process only"),
    (("--set", "auth.jwtSecret=too-short"), "auth.jwtSecret must be at least 32 bytes"),
    (("--set", "auth.jwksUrl=https://idp/keys", "--set", "auth.existingSecret=j"), "set one JWT key source"),
    (("--set", "redis.url=redis://r", "--set", "redis.existingSecret=r"), "redis.url or redis.existingSecret"),
    (("--set", "shutdown.terminationGracePeriodSeconds=20"), "terminationGracePeriodSeconds=20 is too short"),
    (("--set-string", "config.ALEX_REDIS_URL=redis://r"), "config.ALEX_REDIS_URL: the chart sets"),
    (("--set-string", "config.PORT=9000"), "use containerPort"),
    (("--set", "config.ALEX_MAX_ITERATIONS=5"), "want string"),
    (("--set", "redis.url=http://not-redis"), "/redis/url"),
    (("--set", "sandbox.bwrap=maybe"), "/sandbox/bwrap"),
    (("--set", "serviceMonitor.enabled=true", "--set", "nameOverride=agent"), "keep alex-server in the name"),
    (("--set", "serviceMonitor.enabled=true", "--set", "metrics.enabled=false"), "needs metrics.enabled"),
])
def test_contradictory_values_are_refused_with_a_clear_message(flags: tuple[str, ...], message: str) -> None:
    assert message in render_error(*flags)


def test_the_chart_needs_nothing_downloaded() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert "dependencies" not in chart
    assert not (CHART / "charts").exists()


def test_the_packaged_chart_renders_like_the_folder(tmp_path: Path) -> None:
    result = helm("package", str(CHART), "--destination", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (package,) = tmp_path.glob("alex-server-*.tgz")
    with tarfile.open(package) as archive:
        names = set(archive.getnames())
    assert {"alex-server/files/alerts.yaml", "alex-server/files/dashboards/overview.json",
            "alex-server/files/dashboards/agent.json", "alex-server/values.schema.json"} <= names
    assert not any("/ci/" in name for name in names)
    packaged = helm("template", "alex", str(package), "--namespace", NAMESPACE, "-f", str(values_file("monitoring")))
    assert packaged.returncode == 0, packaged.stderr
    assert tuple(doc for doc in yaml.safe_load_all(packaged.stdout) if doc) == render("monitoring")


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_notes_render(value_set: str) -> None:
    result = helm("install", "alex", str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                  "-f", str(values_file(value_set)))
    assert result.returncode == 0, result.stderr
    notes = result.stdout.partition("NOTES:")[2]
    assert "helm test alex" in notes
    assert "alex-server token" in notes or "identity provider" in notes


# --- what runs, and how --------------------------------------------------------------------------------------------


def test_defaults_make_one_replica_and_nothing_optional() -> None:
    manifests = render()
    kinds = sorted(doc["kind"] for doc in manifests)
    assert kinds == ["Deployment", "Pod", "Service", "ServiceAccount"]
    deployment = find(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # Without Redis the data folder must never be shared by two processes, even for a moment.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_two_replicas_with_redis_roll_without_losing_capacity() -> None:
    manifests = render("scaled")
    deployment = find(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert find(manifests, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    env = {item["name"]: item for item in server_container(manifests)["env"]}
    assert env["ALEX_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "alex-redis", "key": "url"}
    assert env["ALEX_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_autoscaling_owns_the_replica_count() -> None:
    manifests = render("autoscaling")
    assert "replicas" not in find(manifests, "Deployment")["spec"]
    hpa = find(manifests, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["scaleTargetRef"]["name"] == find(manifests, "Deployment")["metadata"]["name"]
    assert find_all(manifests, "PodDisruptionBudget")


def test_probes_use_the_contract_paths_on_the_http_port() -> None:
    container = server_container(render())
    assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == int(plain_env(container)["PORT"])


def test_default_port_is_the_servers_and_the_images() -> None:
    image = dockerfile.image_config(dockerfile.parse(ROOT / "Dockerfile"), args={}, base_env={})
    default_port = Settings.model_fields["port"].default
    assert int(plain_env(server_container(render()))["PORT"]) == default_port
    assert image.exposed == [default_port]
    assert int(image.env["PORT"]) == default_port


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_the_pod_meets_the_restricted_security_standard(value_set: str) -> None:
    manifests = render(value_set)
    pod = pod_spec(manifests)
    container = server_container(manifests)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    # The image's user is the pod's, so that files on a volume keep one owner.
    image = dockerfile.image_config(dockerfile.parse(ROOT / "Dockerfile"), args={}, base_env={})
    assert image.user == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    # With a read-only root, the data folder and /tmp must be volumes.
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert {plain_env(container)["ALEX_DATA_DIR"], "/tmp"} <= mounts
    hook = find(manifests, "Pod")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert hook["spec"]["securityContext"]["runAsNonRoot"] is True
    (probe,) = hook["spec"]["containers"]
    assert probe["securityContext"]["readOnlyRootFilesystem"] is True
    assert probe["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_what_bubblewrap_needs_in_a_pod_can_be_given() -> None:
    """docs/deploy.md: a user namespace for the pod and an unmasked /proc; the test pod stays restricted."""
    flags = ("--set", "sandbox.bwrap=on", "--set", "hostUsers=false", "--set", "securityContext.procMount=Unmasked")
    manifests = render("default", *flags, kube_version=KUBE_VERSIONS[-1])
    for manifest in manifests:
        kubernetes_validate.validate(manifest, KUBE_VERSIONS[-1], strict=True)
    assert pod_spec(manifests)["hostUsers"] is False
    assert server_container(manifests)["securityContext"]["procMount"] == "Unmasked"
    assert plain_env(server_container(manifests))["ALEX_SANDBOX_BWRAP"] == "on"
    assert "procMount" not in find(manifests, "Pod")["spec"]["containers"][0]["securityContext"]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_the_kubelet_waits_longer_than_the_drain(value_set: str) -> None:
    manifests = render(value_set)
    container = server_container(manifests)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = float(plain_env(container)["ALEX_SHUTDOWN_GRACE_SECONDS"])
    # SIGTERM comes after the preStop sleep; the drain takes the longer of the tasks' grace and uvicorn's wait
    # for open connections, then the event queue is written and the database closed.
    drain = int(pre_stop[1]) + max(grace, SHUTDOWN_STREAMS_SECONDS)
    assert pod_spec(manifests)["terminationGracePeriodSeconds"] >= drain + 5


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_secrets_only_come_from_secrets(value_set: str) -> None:
    manifests = render(value_set)
    secrets = {doc["metadata"]["name"]: doc for doc in find_all(manifests, "Secret")}
    for item in server_container(manifests)["env"]:
        if item["name"] in SECRET_VARIABLES:
            assert "value" not in item, f"{item['name']} is in the pod spec in clear"
            reference = item["valueFrom"]["secretKeyRef"]
            if reference["name"] in secrets:
                assert reference["key"] in secrets[reference["name"]]["data"]


def test_secrets_given_as_values_land_in_the_charts_secret_and_roll_the_pods() -> None:
    manifests = render("persistence")
    given = yaml.safe_load(values_file("persistence").read_text(encoding="utf-8"))
    data = find(manifests, "Secret")["data"]
    assert base64.b64decode(data["jwt-secret"]).decode() == given["auth"]["jwtSecret"]
    assert base64.b64decode(data["openai-api-key"]).decode() == given["llm"]["apiKey"]
    annotations = find(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/secret"])
    claim = find(manifests, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_variable_the_chart_sets_is_one_the_server_reads(value_set: str) -> None:
    known = {env_name(name) for name in Settings.model_fields}
    for item in server_container(render(value_set))["env"]:
        name = item["name"]
        assert name in known or name.startswith("OTEL_"), f"the server reads no {name}"


def test_the_public_key_from_a_secret_is_mounted_where_the_server_reads_it() -> None:
    manifests = render("autoscaling")
    container = server_container(manifests)
    key_file = Path(plain_env(container)["ALEX_JWT_PUBLIC_KEY_FILE"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == "jwt-public-key")
    assert key_file.parent == Path(mount["mountPath"])
    volume = next(v for v in pod_spec(manifests)["volumes"] if v["name"] == "jwt-public-key")
    assert volume["secret"]["items"] == [{"key": key_file.name, "path": key_file.name}]


# --- the Ingress ---------------------------------------------------------------------------------------------------


def test_the_ingress_does_not_buffer_streams_and_the_operators_annotations_win() -> None:
    ingress = find(render("scaled"), "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "7200"  # ci/scaled-values.yaml's own
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"
    assert ingress["spec"]["tls"] == [{"secretName": "alex-example-com-tls", "hosts": ["alex.example.com"]}]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": find(render("scaled"), "Service")["metadata"]["name"], "port": {"name": "http"}}


def test_the_stream_defaults_can_be_turned_off_for_another_controller() -> None:
    ingress = find(render("default", "--set", "ingress.enabled=true", "--set", "ingress.sse.enabled=false"), "Ingress")
    assert "annotations" not in ingress["metadata"]
    assert ingress["spec"]["rules"] == [{"http": {"paths": [{
        "path": "/", "pathType": "Prefix",
        "backend": {"service": {"name": "alex-alex-server", "port": {"name": "http"}}}}]}}]


def test_metrics_are_never_behind_the_ingress() -> None:
    manifests = render("scaled")
    ports = {port["name"]: port for port in find(manifests, "Service")["spec"]["ports"]}
    assert set(ports) == {"http", "metrics"}
    for rule in find(manifests, "Ingress")["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["backend"]["service"]["port"] == {"name": "http"}
    assert plain_env(server_container(manifests))["ALEX_METRICS_PORT"] == str(ports["metrics"]["port"])


# --- Prometheus Operator objects -------------------------------------------------------------------------------


def test_monitoring_objects_have_what_their_crds_require() -> None:
    """The fields the monitoring.coreos.com/v1 CRDs mark required, and their types: a ServiceMonitor needs a
    selector and endpoints (each naming a port); a PrometheusRule's groups need a name and rules, each rule an
    expr and exactly one of alert or record."""
    manifests = render("monitoring")
    service = find(manifests, "Service")
    monitor = find(manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert isinstance(spec["selector"]["matchLabels"], dict)
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert spec["endpoints"]
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert endpoint["port"] in service_ports
        assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint["interval"])
    # The job label is taken from this Service label; the alert rules select job=~".*alex-server.*".
    assert re.fullmatch(r".*alex-server.*", service["metadata"]["labels"][spec["jobLabel"]])

    rule = find(manifests, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert isinstance(group["name"], str)
        assert group["name"]
        assert group["rules"]
        for entry in group["rules"]:
            assert isinstance(entry["expr"], str | int)
            assert ("alert" in entry) != ("record" in entry)
            assert set(entry) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def test_monitoring_is_off_by_default() -> None:
    kinds = {doc["kind"] for doc in render()}
    assert not kinds & MONITORING_KINDS
    assert "ConfigMap" not in kinds
