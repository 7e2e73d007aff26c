"""The Helm chart (deploy/helm/reconciler) lints, renders, and renders what the sidecar needs.

helm is not a Python package: `make helm-bin` (a prerequisite of `make test`) builds it
from source with the Go toolchain into ~/.cache/reconciler and exports its path as
RECONCILER_HELM. Where it cannot be had, every test here is skipped with the reason;
nothing is downloaded from anywhere else.

The rendered objects are checked against the code they must fit, not against copies
of it: the config loader reads the rendered config, the probe paths are the ones
metrics.serve answers, the grace period is measured against sidecar.DRAIN_SECONDS,
the rules against config/prometheus/alerts.yml, the user against the Dockerfile.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.config import SECRET_KAFKA_KEYS, load_config
from reconciler.metrics import parse_address
from reconciler.sidecar import DRAIN_SECONDS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "reconciler"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
DOCKERFILE = ROOT / "Dockerfile"
REGIONS = ("us-east", "eu-west", "ap-south")
SECRET_DIR = "/etc/reconciler/secrets"
MONITORING_API = "monitoring.coreos.com/v1"

# Exercises every kind of secret reference the chart takes.
VALUES: dict[str, Any] = {
    "regions": [
        {"name": "us-east", "dsnSecret": {"name": "db-us-east", "key": "dsn"},
         "kafka": {"properties": {"sasl.username": "us-east"},
                   "secretProperties": {"sasl.password": {"name": "kafka-us-east", "key": "password"}}}},
        {"name": "eu-west", "dsnSecret": {"name": "db-eu-west", "key": "url"}},
        {"name": "ap-south", "dsnSecret": {"name": "db-ap-south", "key": "dsn"}},
    ],
    "kafka": {
        "properties": {"bootstrap.servers": "kafka:9093", "security.protocol": "SASL_SSL"},
        "secretProperties": {"ssl.key.password": {"name": "kafka-tls", "key": "key-password"}},
    },
}


def find_helm() -> str | None:
    candidates = [os.environ.get("RECONCILER_HELM", ""), shutil.which("helm") or ""]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reconciler"
    candidates += sorted(glob.glob(str(cache / "helm-*" / "helm")), reverse=True)
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


HELM = find_helm()
pytestmark = pytest.mark.skipif(
    HELM is None,
    reason="HELM CHART NOT CHECKED: no helm binary (not in $RECONCILER_HELM, not on PATH, not in "
           "~/.cache/reconciler/helm-*/). `make helm-bin` builds it with the Go toolchain from the Go "
           "module proxy; that needs `go` on PATH and the proxy reachable.",
)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    result = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def render(tmp: Path, values: dict[str, Any] | None = None, *extra: str) -> list[dict[str, Any]]:
    values_file = tmp / "values.yaml"
    values_file.write_text(yaml.safe_dump(values if values is not None else VALUES))
    out = helm("template", "rel", str(CHART), "--namespace", "dr", "-f", str(values_file), *extra).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(tmp_path_factory.mktemp("helm"), VALUES, "--api-versions", MONITORING_API)


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def deployment(objects: list[dict[str, Any]], region: str) -> dict[str, Any]:
    found = [d for d in of_kind(objects, "Deployment")
             if d["spec"]["template"]["metadata"]["labels"].get("reconciler.io/region") == region]
    assert len(found) == 1, f"{len(found)} Deployments for {region}"
    return found[0]


def container(objects: list[dict[str, Any]], region: str) -> dict[str, Any]:
    containers = deployment(objects, region)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def env(objects: list[dict[str, Any]], region: str) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(objects, region)["env"] if "value" in e}


def config_text(objects: list[dict[str, Any]], region: str) -> str:
    volumes = deployment(objects, region)["spec"]["template"]["spec"]["volumes"]
    name = next(v["configMap"]["name"] for v in volumes if "configMap" in v)
    config_map = next(c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == name)
    text: str = config_map["data"]["reconciler.yaml"]
    return text


def mounted_secret_files(objects: list[dict[str, Any]], region: str) -> dict[str, tuple[str, str]]:
    """Path inside the pod -> (Secret name, key), from the pod's projected volume."""
    spec = deployment(objects, region)["spec"]["template"]["spec"]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == SECRET_DIR)
    assert mount.get("readOnly") is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    files = {}
    for source in volume["projected"]["sources"]:
        for item in source["secret"]["items"]:
            files[f"{SECRET_DIR}/{item['path']}"] = (source["secret"]["name"], item["key"])
    return files


# ---------------------------------------------------------------- lint and shape


def test_helm_lint_passes_strictly() -> None:
    helm("lint", "--strict", str(CHART))


def test_one_single_replica_recreated_deployment_per_region(objects: list[dict[str, Any]]) -> None:
    assert len(of_kind(objects, "Deployment")) == len(REGIONS)
    for region in REGIONS:
        spec = deployment(objects, region)["spec"]
        assert spec["replicas"] == 1, "two sidecars of one region must never run"
        assert spec["strategy"] == {"type": "Recreate"}, "a rolling update overlaps old and new pod"
        assert env(objects, region)["RECONCILER_REGION"] == region
        args = container(objects, region)["args"]
        assert args[:1] == ["run"]
        assert args[args.index("--region") + 1] == "$(RECONCILER_REGION)"


def test_no_region_is_selected_by_another_regions_deployment_or_service(objects: list[dict[str, Any]]) -> None:
    pods = {r: deployment(objects, r)["spec"]["template"]["metadata"]["labels"] for r in REGIONS}
    for region in REGIONS:
        selector = deployment(objects, region)["spec"]["selector"]["matchLabels"]
        services = [s for s in of_kind(objects, "Service")
                    if s["spec"]["selector"].get("reconciler.io/region") == region]
        assert len(services) == 1, f"one Service routes to {region}"
        for other, labels in pods.items():
            for match in (selector, services[0]["spec"]["selector"]):
                selected = all(labels.get(k) == v for k, v in match.items())
                assert selected == (other == region), f"{region}'s selector {match} vs {other}'s pod"


# ---------------------------------------------------------------- probes and the metrics address


def test_probes_use_the_sidecars_endpoints_on_its_metrics_port(objects: list[dict[str, Any]]) -> None:
    for region in REGIONS:
        c = container(objects, region)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", "a Service must route to ACTIVE regions only"
        for probe in ("livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"]["port"] in ports, f"{probe} names no container port"
        # the address the sidecar binds (through ${RECONCILER_METRICS_ADDRESS}) is that port,
        # on an address the kubelet's probes can reach
        host, port = parse_address(env(objects, region)["RECONCILER_METRICS_ADDRESS"])
        assert port == ports[c["livenessProbe"]["httpGet"]["port"]]
        # the pod's own address (downward API), which probes reach; never a wildcard
        assert host == "$(POD_IP)"
        pod_ip = next(e for e in c["env"] if e["name"] == "POD_IP")
        assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        names = [e["name"] for e in c["env"]]
        assert names.index("POD_IP") < names.index("RECONCILER_METRICS_ADDRESS"), \
            "$(POD_IP) expands only when it is defined before"


def test_probe_paths_are_the_ones_the_sidecar_serves() -> None:
    from reconciler.metrics import Metrics, serve

    with serve("127.0.0.1:0", Metrics.create("us-east", process_metrics=False), lambda: True, lambda: False) as s:
        import urllib.error
        import urllib.request

        assert urllib.request.urlopen(f"{s.url}/healthz", timeout=5).status == 200
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"{s.url}/readyz", timeout=5)
        assert not_ready.value.code == 503


def test_termination_grace_period_outlasts_the_drain(objects: list[dict[str, Any]]) -> None:
    for region in REGIONS:
        grace = deployment(objects, region)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        # the relay drains for DRAIN_SECONDS and is given 15 s more to join, then the
        # clean stop is written; SIGKILL before that sends the region through catch-up
        assert grace > DRAIN_SECONDS + 15, f"{region}: grace {grace}s does not cover the drain"


# ---------------------------------------------------------------- config and secrets


def test_rendered_config_loads_and_takes_every_secret_from_a_mounted_file(
    objects: list[dict[str, Any]], tmp_path: Path,
) -> None:
    for region in REGIONS:
        text = config_text(objects, region)
        files = mounted_secret_files(objects, region)
        # plant a value per mounted file where the config will look for it
        planted = {}
        for path, (secret, key) in files.items():
            local = tmp_path / region / path.removeprefix(SECRET_DIR + "/")
            local.parent.mkdir(parents=True, exist_ok=True)
            # a DSN must parse when the config loads: each file holds a valid one naming its Secret
            planted[path] = (f"postgresql://app:pw@{secret}/{key}" if "/dsn/" in path
                             else f"{secret}/{key}")
            local.write_text(planted[path] + "\n")
        config_file = tmp_path / region / "reconciler.yaml"
        config_file.write_text(text.replace(f"file:{SECRET_DIR}/", f"file:{tmp_path / region}/"))
        config = load_config(config_file, environ=env(objects, region))
        assert set(config.regions) == set(REGIONS)
        by_region = {r["name"]: r for r in VALUES["regions"]}
        for name, spec in config.regions.items():
            ref = by_region[name]["dsnSecret"]
            assert spec.dsn == f"postgresql://app:pw@{ref['name']}/{ref['key']}", \
                f"{region}: {name}'s DSN is not its Secret"
            assert spec.metrics_address == env(objects, region)["RECONCILER_METRICS_ADDRESS"]
        settings = config.kafka_settings(region)
        assert settings["ssl.key.password"] == "kafka-tls/key-password"
        assert settings["bootstrap.servers"] == "kafka:9093"
        if region == "us-east":
            assert settings["sasl.password"] == "kafka-us-east/password"
            assert settings["sasl.username"] == "us-east"


def test_no_secret_is_inlined_and_a_regions_kafka_credentials_reach_only_its_pod(
    objects: list[dict[str, Any]],
) -> None:
    assert of_kind(objects, "Secret") == [], "the chart references Secrets; it must not make them"
    for region in REGIONS:
        raw = yaml.safe_load(config_text(objects, region))
        for name, spec in raw["regions"].items():
            assert spec["dsn"].startswith(f"file:{SECRET_DIR}/"), f"{region}: {name}'s dsn is inlined"
        kafka = {**raw["kafka"], **raw["regions"][region].get("kafka", {})}
        for key in SECRET_KAFKA_KEYS:
            if key in kafka:
                assert kafka[key].startswith(f"file:{SECRET_DIR}/"), f"{region}: kafka {key} inlined"
        files = mounted_secret_files(objects, region)
        for value in re.findall(rf"file:({SECRET_DIR}/\S+)", config_text(objects, region)):
            assert value in files, f"{region}: the config reads {value}, which no Secret is mounted at"
        has_us_east_kafka = any(secret == "kafka-us-east" for secret, _ in files.values())
        assert has_us_east_kafka == (region == "us-east")


def test_a_secret_given_as_a_plain_kafka_property_is_refused(tmp_path: Path) -> None:
    values = {**VALUES, "kafka": {"properties": {"bootstrap.servers": "k:9092", "sasl.password": "hunter2"}}}
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    result = helm("template", "rel", str(CHART), "-f", str(tmp_path / "values.yaml"), check=False)
    assert result.returncode != 0
    assert "kafka.properties.sasl.password" in result.stderr and "secretProperties" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


# ---------------------------------------------------------------- security context and image


def dockerfile_user() -> int:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    return int(users[-1].split(":")[0])


def test_runs_as_the_images_non_root_user_with_a_read_only_root_and_no_capabilities(
    objects: list[dict[str, Any]],
) -> None:
    for region in REGIONS:
        pod = deployment(objects, region)["spec"]["template"]["spec"]
        c = container(objects, region)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == dockerfile_user() != 0
        assert pod["automountServiceAccountToken"] is False
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "add" not in sc["capabilities"]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert c["resources"]["limits"]["memory"]
        # the config and secrets are mounted beside the image's /etc/reconciler, not over it
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        config_path = c["args"][c["args"].index("--config") + 1]
        assert str(Path(config_path).parent) in mounts


def test_image_entrypoint_is_the_cli_the_args_are_given_to() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r'^ENTRYPOINT \["reconciler"\]', text, flags=re.MULTILINE)
    assert re.search(r"^RUN .*mkdir -p /etc/reconciler", text.replace("\\\n", " "), flags=re.MULTILINE)


# ---------------------------------------------------------------- monitoring


def test_prometheus_rule_is_config_prometheus_alerts_yml(objects: list[dict[str, Any]]) -> None:
    rules = of_kind(objects, "PrometheusRule")
    assert len(rules) == 1
    assert rules[0]["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_the_chart_reads_the_rules_through_a_link_that_packaging_resolves(tmp_path: Path) -> None:
    link = CHART / "files" / "alerts.yml"
    assert link.is_symlink(), "files/alerts.yml must stay a link: a copy would drift from alerts.yml"
    assert link.resolve() == ALERTS.resolve()
    helm("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("reconciler-*.tgz")
    with tarfile.open(archive) as tar:
        member = tar.getmember("reconciler/files/alerts.yml")
        assert member.isfile(), "the packaged chart must hold the rules, not a link"
        packaged = tar.extractfile(member)
        assert packaged is not None and packaged.read() == ALERTS.read_bytes()


def test_service_monitor_scrapes_every_region_ready_or_not_as_job_reconciler(objects: list[dict[str, Any]]) -> None:
    (monitor,) = of_kind(objects, "ServiceMonitor")
    selected = [s for s in of_kind(objects, "Service")
                if all(s["metadata"]["labels"].get(k) == v
                       for k, v in monitor["spec"]["selector"]["matchLabels"].items())]
    assert len(selected) == 1, "the ServiceMonitor must select exactly the metrics Service"
    service = selected[0]
    # a CATCHING_UP region fails /readyz, and is exactly the one whose metrics matter
    assert service["spec"]["publishNotReadyAddresses"] is True
    for region in REGIONS:
        labels = deployment(objects, region)["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items()), region
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    # alerts.yml's liveness alerts select job="reconciler"
    assert 'job="reconciler"' in ALERTS.read_text()
    assert {"action": "replace", "targetLabel": "job", "replacement": "reconciler"} in endpoint["relabelings"]
    # `up` gets the region from the pod label; the samples keep the one the sidecar stamps
    pod_label = "reconciler.io/region"
    assert pod_label in deployment(objects, REGIONS[0])["spec"]["template"]["metadata"]["labels"]
    meta = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", pod_label)
    assert {"action": "replace", "sourceLabels": [meta], "targetLabel": "region"} in endpoint["relabelings"]
    assert endpoint["honorLabels"] is True


def test_monitoring_objects_only_where_the_operator_api_exists(tmp_path: Path) -> None:
    kinds = {o["kind"] for o in render(tmp_path)}
    assert "Deployment" in kinds
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}


# ---------------------------------------------------------------- migrations


def test_migrate_runs_as_a_hook_before_the_sidecars_with_a_config_that_loads(
    objects: list[dict[str, Any]], tmp_path: Path,
) -> None:
    (job,) = of_kind(objects, "Job")
    hooks = set(job["metadata"]["annotations"]["helm.sh/hook"].split(","))
    assert hooks == {"pre-install", "pre-upgrade"}
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][0] == "migrate"
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["readOnlyRootFilesystem"]
    # its ConfigMap is a hook too (pre-install hooks run before the release's objects)
    # and is created first
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_name = volumes["config"]["configMap"]["name"]
    (config_map,) = [m for m in of_kind(objects, "ConfigMap") if m["metadata"]["name"] == config_name]
    annotations = config_map["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == hooks
    assert int(annotations["helm.sh/hook-weight"]) < int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    # every file: value resolves to a mounted Secret, and the config loads
    files = {f"{SECRET_DIR}/{item['path']}" for source in volumes["secrets"]["projected"]["sources"]
             for item in source["secret"]["items"]}
    text = config_map["data"]["reconciler.yaml"]
    for path in re.findall(rf"file:({SECRET_DIR}/\S+)", text):
        assert path in files, f"migrate's config reads {path}, which no Secret is mounted at"
        local = tmp_path / path.removeprefix(SECRET_DIR + "/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("postgresql://app@db/app\n")
    config_file = tmp_path / "reconciler.yaml"
    config_file.write_text(text.replace(f"file:{SECRET_DIR}/", f"file:{tmp_path}/"))
    environ = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    config = load_config(config_file, environ=environ)
    assert set(config.regions) == set(REGIONS)
