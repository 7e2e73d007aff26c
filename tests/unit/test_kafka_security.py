"""Kafka security without a broker: TLS pass-through, secrets, access errors, the ACL model."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import KafkaError

from reconciler.config import SECRET_KAFKA_KEYS, load_config
from reconciler.devstack import DevStack
from reconciler.devstack import kafka_security as ks
from reconciler.errors import TransportError
from reconciler.transport import kafka

SSL = {
    "security.protocol": "SSL",
    "ssl.ca.location": "/etc/kafka/ca.pem",
    "ssl.certificate.location": "/etc/kafka/us-east.pem",
    "ssl.key.location": "/etc/kafka/us-east.key",
    "ssl.endpoint.identification.algorithm": "https",
    "ssl.cipher.suites": "ECDHE-RSA-AES256-GCM-SHA384",
}


def _config(tmp_path: Path, **extra: Any) -> Path:
    key_password = tmp_path / "key.password"
    key_password.write_text("K3y-Pa55\n")
    doc: dict[str, Any] = {
        "kafka": {"bootstrap.servers": "kafka:9093", **SSL, "ssl.key.password": f"file:{key_password}"},
        "regions": {
            "us-east": {"dsn": "postgresql://u@h/db", "kafka": {"ssl.certificate.location": "/etc/kafka/ue.pem"}},
            "eu-west": {"dsn": "postgresql://u@h/db"},
        },
        "tables": {"orders": {"key": "id"}},
        **extra,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class _Recorder:
    """Stands in for a librdkafka client class; remembers the conf it was built with."""

    confs: list[dict[str, Any]] = []

    def __init__(self, conf: dict[str, Any]) -> None:
        type(self).confs.append(dict(conf))

    def list_topics(self, timeout: float = 0) -> Any:
        return type("Meta", (), {"topics": {"t": None}})()


def test_ssl_settings_reach_producer_consumer_and_admin_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(_config(tmp_path))
    settings = config.kafka_settings("us-east")
    expected = {**SSL, "ssl.certificate.location": "/etc/kafka/ue.pem", "ssl.key.password": "K3y-Pa55"}
    assert {k: settings[k] for k in expected} == expected

    _Recorder.confs = []
    for name in ("Producer", "Consumer", "AdminClient"):
        monkeypatch.setattr(kafka, name, _Recorder)
    kafka.producer(settings)
    kafka.consumer(settings, "g")
    kafka.admin(settings)
    assert kafka.ensure_topics(settings, ["t"]) == []  # the topic "exists": only listed
    assert len(_Recorder.confs) == 4
    for conf in _Recorder.confs:
        assert {k: conf[k] for k in expected} == expected


def test_ssl_key_password_is_a_secret(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path))
    assert "ssl.key.password" in SECRET_KAFKA_KEYS
    shown = kafka.safe_settings(config.kafka_settings("us-east"))
    assert shown["ssl.key.password"] == "***"
    assert "K3y-Pa55" not in repr(shown)
    assert kafka.principal(config.kafka_settings("us-east")) == "the principal of the client certificate"


def test_access_errors_name_principal_and_resource_never_the_password() -> None:
    settings = {"sasl.username": "eu-west", "sasl.password": "s3cr3t-pw", "security.protocol": "SASL_SSL"}
    denied = kafka.translate(
        KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), settings=settings, region="eu-west",
        topic="reconciler.events.us-east",
    )
    assert isinstance(denied, TransportError) and not denied.retryable
    assert "User:eu-west" in str(denied) and "reconciler.events.us-east" in str(denied)
    login = kafka.translate(KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error"), settings=settings,
                            region="eu-west")
    assert not login.retryable
    assert "regions.eu-west.kafka.sasl.password" in str(login) and "eu-west" in str(login)
    for error in (denied, login):
        assert "s3cr3t-pw" not in str(error) and "s3cr3t-pw" not in repr(error.to_dict())
    # other errors keep their old shape and retry rule
    other = kafka.translate(KafkaError(KafkaError.NOT_COORDINATOR), settings=settings)
    assert other.retryable and "principal" not in other.context


def test_admin_settings_for_migrate(tmp_path: Path) -> None:
    plain = load_config(_config(tmp_path))
    assert plain.admin_kafka_settings() == plain.kafka_settings(next(iter(plain.regions)))  # as before
    admin_pw = tmp_path / "admin.password"
    admin_pw.write_text("adm1n\n")
    config = load_config(_config(tmp_path, kafka_admin={"sasl.username": "admin", "sasl.password": f"file:{admin_pw}"}))
    settings = config.admin_kafka_settings()
    assert settings["sasl.username"] == "admin" and settings["sasl.password"] == "adm1n"
    assert settings["ssl.ca.location"] == SSL["ssl.ca.location"]
    assert "sasl.username" not in config.kafka_settings("eu-west")


def test_region_acls_allow_writing_only_own_events_and_control() -> None:
    acls = ks.region_acls("rc", "us")
    writes = {(a.resource, a.pattern, a.name) for a in acls if a.operation == "WRITE"}
    assert writes == {
        ("TOPIC", "LITERAL", "rc.events.us"),
        ("TOPIC", "LITERAL", "rc.control"),
        ("TOPIC", "LITERAL", "rc.compensation"),
        ("TRANSACTIONAL_ID", "LITERAL", "reconciler-relay.rc.events.us"),
    }
    # nothing prefixed may be written: "us" must not cover "us-east"
    assert all(a.pattern == "LITERAL" for a in acls if a.operation == "WRITE")
    reads = {(a.resource, a.pattern, a.name) for a in acls if a.operation == "READ"}
    assert ("TOPIC", "PREFIXED", "rc.events.") in reads
    assert {("GROUP", "LITERAL", "rc.inbox.us"), ("GROUP", "LITERAL", "rc.heartbeat.us")} <= reads
    assert all(a.principal == "User:us" for a in acls)
    assert not any(a.operation in ("CREATE", "ALL", "ALTER") for a in acls)
    assert acls[0].kafka_acls_args() == (
        "--add --allow-principal User:us --operation Write --topic rc.events.us"
    )


def test_broker_denies_by_default() -> None:
    props = ks.server_properties(29000, 29001, "pw")
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["listeners"].startswith("SASL_PLAINTEXT://127.0.0.1:29000,")
    assert "PLAINTEXT://127.0.0.1:29000" not in props["listeners"].replace("SASL_PLAINTEXT", "")


def test_dev_config_names_passwords_by_file_never_inline(tmp_path: Path) -> None:
    stack = DevStack(tmp_path / "dev", ("us-east", "eu-west"), 40000, 40100, kafka_auth="scram")
    passwords = {u: stack.kafka.credentials.password(u) for u in ("admin", "us-east", "eu-west")}
    text = stack.config_text()
    for user, password in passwords.items():
        assert password not in text
        path = stack.kafka.credentials.path(user)
        assert f"file:{path}" in text
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stack.kafka.credentials.password(user) == password  # kept, not regenerated
    assert stat.S_IMODE(stack.kafka.credentials.secrets_dir.stat().st_mode) == 0o700
    (tmp_path / "dev").mkdir(exist_ok=True)
    stack.config_path.write_text(text)
    config = load_config(stack.config_path)
    assert config.kafka_settings("eu-west")["sasl.username"] == "eu-west"
    assert config.kafka_settings("eu-west")["sasl.password"] == passwords["eu-west"]
    assert config.admin_kafka_settings()["sasl.username"] == "admin"
    # the default stays PLAINTEXT, without users
    plain = DevStack(tmp_path / "plain", ("us-east", "eu-west"), 40000, 40100).config_text()
    assert "sasl" not in plain and "kafka_admin" not in plain


def test_security_doc_shows_every_binding_the_code_grants() -> None:
    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "security.md").read_text()
    for acl in ks.region_acls("reconciler", "us-east"):
        assert acl.kafka_acls_args() in doc, f"docs/security.md lacks: {acl.kafka_acls_args()}"
    assert "(docs/security.md)" in (root / "README.md").read_text()
