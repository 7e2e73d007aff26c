"""docker-compose.yml and the Dockerfile hang together, checked without a Docker engine.

Our machines have the docker CLI but neither an engine nor the compose plugin, so
``docker compose config`` cannot run here. These checks cover what it would catch
that matters to us (references between services, files that must exist, the config
the sidecars mount) plus our own rules (loopback-only published ports, non-root image).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MOUNTED_CONFIG = ROOT / "config" / "docker" / "reconciler.yaml"
REGIONS = ("us-east", "eu-west", "ap-south")
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # resolves anchors and << merges
    return loaded


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return dict(deps)


def sidecar(region: str) -> dict[str, Any]:
    return services()[f"reconciler-{region}"]


def test_three_postgres_15_and_one_kraft_kafka() -> None:
    svc = services()
    for region in REGIONS:
        pg = svc[f"postgres-{region}"]
        assert pg["image"] == "postgres:15"
        assert "healthcheck" in pg
    kafka = svc["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in env
    assert not any("zookeeper" in name.lower() for name in svc)
    assert not any("ZOOKEEPER" in key for key in env)


@pytest.mark.parametrize("region", REGIONS)
def test_sidecar_per_region_built_from_the_dockerfile(region: str) -> None:
    service = sidecar(region)
    build = service["build"]
    assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert service["command"] == ["run", "--config", "/etc/reconciler/reconciler.yaml", "--region", region]
    mounts = [v.split(":") for v in service["volumes"]]
    assert ["./config/docker/reconciler.yaml", "/etc/reconciler/reconciler.yaml", "ro"] in mounts
    assert depends_on(service)["reconciler-migrate"]["condition"] == "service_completed_successfully"


def test_dependencies_name_existing_services_without_cycles() -> None:
    svc = services()
    for name, service in svc.items():
        for target, spec in depends_on(service).items():
            assert target in svc, f"{name} depends on unknown service {target}"
            assert target != name, f"{name} depends on itself"
            assert spec.get("condition", "service_started") in CONDITIONS
    # walk the graph: every service must reach a state with no dependency
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(node: str) -> None:
        assert node not in visiting, f"dependency cycle through {node}"
        if node in done:
            return
        visiting.add(node)
        for target in depends_on(svc[node]):
            visit(target)
        visiting.discard(node)
        done.add(node)

    for name in svc:
        visit(name)
    migrate = svc["reconciler-migrate"]
    assert migrate["command"][0] == "migrate"
    for needed in [f"postgres-{r}" for r in REGIONS] + ["kafka"]:
        assert depends_on(migrate)[needed]["condition"] == "service_healthy"


def test_bind_mounts_exist_and_named_volumes_are_declared() -> None:
    doc = compose()
    declared = set(doc.get("volumes") or {})
    for name, service in doc["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_published_ports_bind_loopback_only() -> None:
    for name, service in services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_mounted_config_is_valid_and_matches_the_services() -> None:
    svc = services()
    # the sidecar's own environment as compose gives it (the password default aside)
    sidecar_env = {k: str(v) for k, v in svc["reconciler-us-east"]["environment"].items()}
    config = load_config(MOUNTED_CONFIG, environ={**sidecar_env, "RECONCILER_DB_PASSWORD": "secret"})
    assert tuple(config.regions) == REGIONS
    for region in REGIONS:
        dsn = config.regions[region].dsn
        host = re.search(r"@([^:/]+)", dsn)
        assert host and host.group(1) == f"postgres-{region}"
        assert config.regions[region].metrics_address == sidecar_env["RECONCILER_METRICS_ADDRESS"]
        assert config.regions[region].metrics_address.endswith(":9400")
        assert "RECONCILER_DB_PASSWORD" in svc[f"reconciler-{region}"]["environment"]
    bootstrap_host = config.kafka["bootstrap.servers"].split(":")[0]
    assert bootstrap_host in svc


def test_monitoring_profile_uses_the_repo_rules_and_dashboard() -> None:
    svc = services()
    prom_mounts = [v.split(":")[0] for v in svc["prometheus"]["volumes"]]
    assert "./config/prometheus/alerts.yml" in prom_mounts
    grafana_mounts = [v.split(":")[0] for v in svc["grafana"]["volumes"]]
    assert "./config/grafana/reconciler.json" in grafana_mounts
    scrape = yaml.safe_load((ROOT / "config" / "docker" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"reconciler-{r}:9400" for r in REGIONS}


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_dockerfile_runs_the_cli_as_non_root() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = [json.loads(rest) for kw, rest in instructions if kw == "ENTRYPOINT"]
    assert entry[-1] == ["reconciler"]
    cmd = [json.loads(rest) for kw, rest in instructions if kw == "CMD"]
    assert cmd[-1] == ["run", "--config", "/etc/reconciler/reconciler.yaml", "--region", "us-east"]
    assert any(kw == "EXPOSE" and "9400" in rest for kw, rest in instructions)


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for keyword, rest in dockerfile_instructions():
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, _ = shlex.split(rest)
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
            assert source.rstrip("/") not in ignored, f".dockerignore excludes {source}, which the build copies"


# -- the faults a first `docker compose up` would have hit ------------------------------

DEMO_SQL = ROOT / "reconciler" / "sql" / "demo" / "demo_domain.sql"


def seconds(duration: str) -> float:
    """A compose duration ("90s", "1m30s", "2m") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    return sum(float(number) * scale[unit] for number, unit in parts)


def test_kafka_writes_its_log_into_its_volume() -> None:
    kafka = services()["kafka"]
    log_dirs = kafka["environment"].get("KAFKA_LOG_DIRS")
    assert log_dirs, "KAFKA_LOG_DIRS unset: the broker logs to the image's /tmp default, not the volume"
    declared = set(compose().get("volumes") or {})
    mounts = {}
    for volume in kafka["volumes"]:
        source, target = volume.split(":")[:2]
        if source in declared:
            mounts[target.rstrip("/")] = source
    for log_dir in log_dirs.split(","):
        assert any(log_dir == target or log_dir.startswith(target + "/") for target in mounts), (
            f"Kafka log dir {log_dir} is not on a named volume (mounted: {sorted(mounts)})"
        )
    assert kafka["environment"].get("CLUSTER_ID"), "a kept log dir needs the same cluster id on every start"


def test_migrate_creates_the_tables_the_config_replicates() -> None:
    from reconciler.cli import main

    command = services()["reconciler-migrate"]["command"]
    config = load_config(MOUNTED_CONFIG, environ={"RECONCILER_DB_PASSWORD": "x", "RECONCILER_METRICS_ADDRESS": "0:1"})
    created = set(re.findall(r"CREATE TABLE IF NOT EXISTS public\.(\w+)", DEMO_SQL.read_text()))
    assert "--demo-tables" in command, (
        f"migrate installs triggers on {sorted(config.tables)}, which an empty database lacks; "
        "--demo-tables creates them"
    )
    assert set(config.tables) <= created, f"the config replicates tables no migration creates: " \
        f"{sorted(set(config.tables) - created)}"
    assert all(t.schema == "public" for t in config.tables.values())
    # click itself accepts the command line (a renamed flag would fail the one-shot service)
    parent = main.make_context("reconciler", list(command), resilient_parsing=False)
    main.commands[command[0]].make_context(command[0], list(command[1:]), parent=parent)


@pytest.mark.parametrize("region", REGIONS)
def test_sidecars_get_time_to_drain_before_docker_kills_them(region: str) -> None:
    from reconciler.sidecar import DRAIN_SECONDS

    grace = sidecar(region).get("stop_grace_period")
    assert grace, "no stop_grace_period: Docker's 10 s default SIGKILLs the sidecar mid-drain"
    # the relay drains for up to DRAIN_SECONDS and is given 15 s more to join; then the
    # clean stop is recorded in the database
    assert seconds(grace) > DRAIN_SECONDS + 15, f"{grace} is not above the drain time"
