"""The local stack itself: every other integration test stands on these guarantees."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psycopg
import pytest
import yaml
from click.testing import CliRunner
from confluent_kafka.admin import AdminClient

from reconciler.cli import main
from reconciler.devstack import DevStack, kafka, postgres
from reconciler.errors import DevStackError


def server_port(dsn: str) -> int:
    with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
        row = conn.execute("SELECT inet_server_port(), current_database()").fetchone()
    assert row is not None
    assert row[1] == "reconciler"
    return int(row[0])


def kafka_brokers(bootstrap: str) -> int:
    metadata = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=10)
    return len(metadata.brokers)


def test_each_region_is_its_own_server(stack: DevStack) -> None:
    ports = {region: server_port(stack.dsn(region)) for region in stack.regions}
    assert len(set(ports.values())) == len(stack.regions), ports
    assert ports == {region: stack.pg_port(region) for region in stack.regions}


def test_postgres_allows_base_backups(stack: DevStack) -> None:
    """Stale-backup drills take pg_basebackup copies; that needs WAL senders."""
    with psycopg.connect(stack.dsn(stack.regions[0]), autocommit=True) as conn:
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('wal_level', 'max_wal_senders', 'listen_addresses', 'shared_buffers')"
            ).fetchall()
        )
    assert settings["wal_level"] == "replica"
    assert int(settings["max_wal_senders"]) >= 1
    assert settings["listen_addresses"] == "127.0.0.1"
    assert int(settings["shared_buffers"]) * 8192 == 32 * 1024 * 1024


def test_kafka_answers_metadata(stack: DevStack) -> None:
    assert kafka_brokers(stack.bootstrap_servers) == 1


def test_written_config_matches_the_stack(stack: DevStack, config_path: Path) -> None:
    doc = yaml.safe_load(config_path.read_text())
    assert doc["topic_prefix"] == "reconciler"
    assert doc["kafka"] == {"bootstrap.servers": stack.bootstrap_servers}
    assert list(doc["regions"]) == list(stack.regions)
    for region in stack.regions:
        assert doc["regions"][region]["dsn"] == stack.dsn(region)
    assert doc["tables"]["inventory"]["fields"] == {"stock": "counter", "tags": "set"}


def test_state_round_trips(stack: DevStack) -> None:
    again = DevStack.from_state(stack.root)
    assert (again.regions, again.pg_base_port, again.kafka_port) == (
        stack.regions,
        stack.pg_base_port,
        stack.kafka_port,
    )


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_one_region_stops_while_others_answer(stack: DevStack, mode: str) -> None:
    victim, *others = stack.regions
    stack.stop_postgres(victim, mode=mode)
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(stack.dsn(victim), connect_timeout=2).close()
        for region in others:
            assert server_port(stack.dsn(region)) == stack.pg_port(region)
        assert stack.status()["postgres"][victim]["running"] is False
    finally:
        stack.start_postgres(victim)
    assert server_port(stack.dsn(victim)) == stack.pg_port(victim)


def test_restart_kafka_comes_back_healthy(stack: DevStack) -> None:
    before = stack.status(probe=False)["kafka"]["pid"]
    stack.restart_kafka()
    after = stack.status()["kafka"]
    assert after["ready"] is True
    assert after["pid"] != before
    assert kafka_brokers(stack.bootstrap_servers) == 1


def test_up_again_keeps_the_same_servers(stack: DevStack) -> None:
    before = stack.status(probe=False)
    timings = stack.up()
    after = stack.status(probe=False)
    assert {r: e["pid"] for r, e in after["postgres"].items()} == {r: e["pid"] for r, e in before["postgres"].items()}
    assert after["kafka"]["pid"] == before["kafka"]["pid"]
    assert timings["kafka_libs"] == 0.0
    assert timings["total"] < 10, timings


def test_restore_from_backup_loses_later_writes(stack: DevStack) -> None:
    """The stale-backup drill's building block: rows written after the backup vanish."""
    region = stack.regions[-1]
    dsn = stack.dsn(region)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS devstack_restore_probe")
        conn.execute("CREATE TABLE devstack_restore_probe (n int)")
        conn.execute("INSERT INTO devstack_restore_probe VALUES (1)")
    backup = stack.backup_postgres(region, "probe")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO devstack_restore_probe VALUES (2)")
        stack.restore_postgres(region, backup)
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT n FROM devstack_restore_probe ORDER BY n").fetchall()
            conn.execute("DROP TABLE devstack_restore_probe")
        assert rows == [(1,)]
    finally:
        shutil.rmtree(backup, ignore_errors=True)


def test_cli_status_json_is_one_document(stack: DevStack) -> None:
    result = CliRunner().invoke(main, ["dev", "status", "--dir", str(stack.root), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["healthy"] is True
    assert set(doc["postgres"]) == set(stack.regions)


def test_cli_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["dev", "up", "--dir", str(tmp_path), "--regions", "Not A Region"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "invalid region name" in result.stderr


def test_missing_binaries_say_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(postgres, "PG_LIB_DIR", tmp_path)
    with pytest.raises(DevStackError, match="apt-get install -y postgresql"):
        postgres.find_bindir()
    with pytest.raises(DevStackError, match="apt-get install -y openjdk-17"):
        kafka.find_java()
    with pytest.raises(DevStackError, match="apt-get install -y maven"):
        kafka.find_maven()


def test_storage_formats_with_a_cluster_id_that_starts_with_a_dash(stack: DevStack, tmp_path: Path) -> None:
    """A kept id starting with "-" (earlier versions generated one in 64) is a value, not an option."""
    broker = kafka.KafkaBroker(tmp_path / "kafka", tmp_path / "logs", 1, stack.libs)
    broker.write_config()
    broker.cluster_id_file.write_text("-AECAwQFBgcICQoLDA0ODw\n")
    broker.format(kafka.find_java())
    assert broker.formatted
    assert "cluster.id=-AECAwQFBgcICQoLDA0ODw" in (broker.data_dir / "meta.properties").read_text()
