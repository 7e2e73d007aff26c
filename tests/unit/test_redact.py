"""The secret registry, credential shapes in free text, and DSN validation at config load."""

from __future__ import annotations

import io
import json
from pathlib import Path
from urllib.parse import quote

import pytest

from reconciler import redact
from reconciler.config import load_config
from reconciler.errors import ConfigError, StoreError
from reconciler.store.dsn import redact_dsn


@pytest.fixture(autouse=True)
def empty_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets other tests registered (a DSN password "secret") would mask words here."""
    monkeypatch.setattr(redact, "_registered", set())
    monkeypatch.setattr(redact, "_forms", ())


def test_a_registered_secret_is_masked_in_every_quoted_form() -> None:
    secret = 'Reg"is/te@red 1'
    redact.register([secret])
    for form in (secret, quote(secret, safe=""), json.dumps(secret), repr(secret)):
        assert secret not in redact.scrub(f"before {form} after")
        assert quote(secret, safe="") not in redact.scrub(f"before {form} after")


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ('missing "=" after "postgresql:/app:TyPo-123@host/db"', "TyPo-123"),
        ("postgresql:app:NoSlash-99@host/db", "NoSlash-99"),
        ("postgresql://app:p@ss/w#rd@db/x", "ss/w#rd"),
        ("user:Bare-pw@host", "Bare-pw"),
        ("host=h password='Q uoted' port=5", "Q uoted"),
        ("host=h password='Unterminated secret", "Unterminated secret"),
        ('{"sasl.password": "Js0n-pw", "x": 1}', "Js0n-pw"),
        ("{'ssl.key.password': 'Repr-pw'}", "Repr-pw"),
        ("sasl.jaas.config=org.Plain username=u password=Jaas-pw;", "Jaas-pw"),
    ],
)
def test_credential_shapes_are_masked_unregistered(text: str, hidden: str) -> None:
    assert hidden not in redact.scrub(text)


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://postgres@127.0.0.1:54321/reconciler",
        "metrics on http://127.0.0.1:9400/metrics",
        "password authentication failed for user \"app\"",
        '{"ok":true,"count":3,"at":"2026-12-07T00:40:17.000Z"}',
    ],
)
def test_text_without_credentials_is_left_alone(text: str) -> None:
    assert redact.scrub(text) == text


def test_a_scrubbed_json_document_stays_json() -> None:
    doc = {"sasl.password": "x-secret-y", "dsn": "host=h password='a b'", "n": 1}
    assert json.loads(redact.scrub(json.dumps(doc)))["sasl.password"] == redact.MASK


def test_malformed_dsns_are_masked_rather_than_shown() -> None:
    assert "Typo-pw" not in redact_dsn("postgresql:/app:Typo-pw@h/db")
    assert redact_dsn("host=db password=Split pw port=5") == "host=db password=*** ***"
    assert "Scheme-pw" not in redact_dsn("postgresq://app:Scheme-pw@h/db")


def test_errors_are_scrubbed_when_made() -> None:
    redact.register(["Err0r-secret"])
    err = StoreError("driver said Err0r-secret", dsn="postgresql:/u:Other-pw@h", region="r")
    assert "Err0r-secret" not in str(err) and "Other-pw" not in str(err)
    assert "Other-pw" not in json.dumps(err.to_dict())


def test_the_stream_guard_scrubs_what_passes_through() -> None:
    redact.register(["Str3am-secret"])
    inner = io.StringIO()
    stream = redact.ScrubbingStream(inner)
    stream.write("leaked Str3am-secret?\n")
    assert inner.getvalue() == "leaked ***?\n"
    assert not hasattr(stream, "buffer")


def _config(tmp_path: Path, dsn: str, kafka: str = "") -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(
        f"kafka:\n  bootstrap.servers: h:1\n{kafka}regions:\n  us-east:\n    dsn: {json.dumps(dsn)}\n"
        "  eu-west:\n    dsn: postgresql://u@h/db\n"
    )
    return path


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql:/app:LoadTypo-1@127.0.0.1:5/db",
        "postgresq://app:LoadTypo-1@127.0.0.1:5/db",
        "postgresql://app:LoadTypo-1%zz@h/db",
        "host=h password='LoadTypo-1",
        "host=h pasword=LoadTypo-1",
        "postgresql://app:LoadTypo-1@h:port/db",
        "",
    ],
)
def test_a_malformed_dsn_fails_at_load_naming_region_and_key_only(tmp_path: Path, dsn: str) -> None:
    path = _config(tmp_path, dsn)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    err = caught.value
    assert err.context["key"] == "regions.us-east.dsn" and str(path) in str(err)
    assert "LoadTypo-1" not in str(err) and "LoadTypo-1" not in json.dumps(err.to_dict())


def test_config_secrets_in_every_form_are_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kpw").write_text("FileKafka-pw\n")
    dsn = "postgresql://app:V6%40Load-pw@[::1]:5432/db?sslpassword=SslLoad-pw"
    kafka = f"  sasl.password: ${{KPW}}\n  ssl.key.password: file:{tmp_path / 'kpw'}\n"
    config = load_config(_config(tmp_path, dsn, kafka), environ={"KPW": "EnvKafka-pw"})
    assert config.region("us-east").dsn == dsn
    for secret in ("V6@Load-pw", "V6%40Load-pw", "SslLoad-pw", "EnvKafka-pw", "FileKafka-pw"):
        assert secret not in redact.scrub(f"text with {secret} in it")
    assert redact.safe_kafka_settings(config.kafka_settings("us-east"))["sasl.password"] == redact.MASK


def test_json_literals_under_secret_looking_keys_stay_json() -> None:
    doc = {"password_rotations": 3, "secret_set": True, "sasl.password": "Lit-secret"}
    scrubbed = json.loads(redact.scrub(json.dumps(doc)))
    assert scrubbed == {"password_rotations": 3, "secret_set": True, "sasl.password": redact.MASK}


def test_the_config_modules_named_kafka_secrets_are_all_recognised() -> None:
    from reconciler.config import SECRET_KAFKA_KEYS

    for key in (*SECRET_KAFKA_KEYS, "sasl.oauthbearer.config", "sasl.jaas.config", "ssl.key.pem"):
        assert redact.is_secret_kafka_key(key), key
    for key in ("bootstrap.servers", "sasl.username", "security.protocol", "ssl.ca.location"):
        assert not redact.is_secret_kafka_key(key), key


@pytest.mark.parametrize("text", ["a:" * 20000, "a:b" * 20000, "=a:b" * 10000 + "@", "x" * 40000, "a.b-" * 20000])
def test_scrubbing_adversarial_text_takes_linear_time(text: str) -> None:
    # every error and log line is scrubbed, whatever a peer put in it: a quadratic
    # pattern took 40 s on the first of these and would stall the inbox
    import time

    started = time.perf_counter()
    redact.scrub(text)
    assert time.perf_counter() - started < 5
