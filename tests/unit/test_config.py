"""Config: parsed once into frozen objects; every error names the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from reconciler.config import load_config, redact_dsn
from reconciler.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "kafka": {"bootstrap.servers": "127.0.0.1:1"},
    "regions": {
        "a": {"dsn": "postgresql://u:secret@127.0.0.1:1/db"},
        "b": {"dsn": "postgresql://u@127.0.0.1:2/db"},
    },
    "tables": {"orders": {"key": ["id"], "policy": "lww"}},
}


def write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "reconciler.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_example_config_documents_every_key_and_loads() -> None:
    env = {"US_EAST_DB_PASSWORD": "pw"}
    example = ROOT / "config" / "reconciler.example.yaml"
    text = example.read_text().replace("file:/run/secrets/ap-south-dsn", "postgresql://x@127.0.0.1:3/db")
    tmp = example.with_name("example-resolved.yaml")
    try:
        tmp.write_text(text)
        config = load_config(tmp, environ=env)
    finally:
        tmp.unlink()
    assert set(config.regions) == {"us-east", "eu-west", "ap-south"}
    assert config.tables["inventory"].fields == {"stock": "counter", "tags": "set"}
    assert config.regions["us-east"].dsn.startswith("postgresql://reconciler:pw@")
    assert "pw" not in config.regions["us-east"].redacted_dsn


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"regions": {"a": {"dsn": "x"}}}, "regions"),
        ({"tables": {"orders": {"key": ["id"], "policy": "newest"}}}, "tables.orders.policy"),
        ({"tables": {"orders": {"key": "id; drop table x"}}}, "tables.orders.key"),
        ({"tables": {"orders": {"key": ["id"], "policy": "lww", "fields": {"n": "counter"}}}}, "tables.orders.fields"),
        ({"hlc": {"max_offset_ms": -5}}, "hlc.max_offset_ms"),
        ({"hlc": {"max_ofset_ms": 5}}, "hlc.max_ofset_ms"),
        ({"heartbeat": {"suspect_after_seconds": 50}}, "heartbeat"),
        ({"retention": {"keep_hours": 0}}, "retention.keep_hours"),
        ({"retention": {"keep_hours": "7d"}}, "retention.keep_hours"),
        ({"retention": {"batch": 0}}, "retention"),
        ({"retention": {"keep_days": 7}}, "retention.keep_days"),
        ({"kafka": {}}, "kafka.bootstrap.servers"),
        ({"tables": {"orders": {"key": ["id"], "capture": "debezium"}}}, "tables.orders.capture"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path: Path, patch: dict[str, object], key: str) -> None:
    path = write(tmp_path, {**BASE, **patch})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.context["key"] == key
    assert str(path) in str(caught.value)


def test_capture_defaults_to_triggers_and_explicit_opts_out(tmp_path: Path) -> None:
    tables = {"orders": {"key": ["id"]}, "ledger": {"key": ["id"], "capture": "explicit"}}
    config = load_config(write(tmp_path, {**BASE, "tables": tables}))
    assert config.tables["orders"].capture == "trigger"
    assert config.tables["ledger"].capture == "explicit"


def test_retention_defaults_to_a_week_and_null_keeps_everything(tmp_path: Path) -> None:
    default = load_config(write(tmp_path, BASE)).retention
    assert (default.keep_hours, default.interval_seconds, default.batch) == (168.0, 300.0, 10000)
    forever = load_config(write(tmp_path, {**BASE, "retention": {"keep_hours": None, "batch": 50}})).retention
    assert forever.keep_hours is None and forever.batch == 50


def test_missing_file_and_bad_yaml_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("regions: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_secrets_from_environment_and_files(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    doc = {**BASE, "kafka": {"bootstrap.servers": "h:1", "sasl.password": f"file:{secret}"}}
    doc["regions"] = {"a": {"dsn": "postgresql://u:${PW}@h/db"}, "b": {"dsn": "postgresql://u@h/db"}}
    config = load_config(write(tmp_path, doc), environ={"PW": "envpw"})
    assert config.kafka["sasl.password"] == "s3cret"
    assert config.regions["a"].dsn == "postgresql://u:envpw@h/db"
    with pytest.raises(ConfigError, match="PW is not set"):
        load_config(write(tmp_path, doc), environ={})


def test_redact_dsn_forms() -> None:
    assert redact_dsn("postgresql://u:p@h:5/d") == "postgresql://u:***@h:5/d"
    assert redact_dsn("host=h password=p user=u") == "host=h password=*** user=u"
    assert redact_dsn("postgresql://u@h/d") == "postgresql://u@h/d"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    with pytest.raises(AttributeError):
        config.topic_prefix = "x"  # type: ignore[misc]
