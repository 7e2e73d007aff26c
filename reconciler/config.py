"""Configuration: YAML parsed once, at the edge, into frozen validated objects.

Every error names the offending key (as a dotted path) and the file, so that a
typo at 3 am is found from the message alone. Secrets are never stored in these
objects in clear text beyond what the DSN already contains: a DSN or librdkafka
property may reference ``${ENV_VAR}`` or ``file:/path`` and is resolved here, and
``RegionConfig.redacted_dsn`` is what logs and metrics may show.

Every DSN is parsed here by libpq's own rules (psycopg's conninfo parser), so a
malformed one fails at load with the region and key named, and never at connect
time with a driver message that quotes it. Each secret resolved here (DSN
passwords, Kafka credentials) is registered with :mod:`reconciler.redact`,
which masks it in anything printed later.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from . import redact
from .errors import ConfigError

POLICIES = ("lww", "merge", "manual")
FIELD_RULES = ("lww", "counter", "set", "max", "min")
#: how a table's writes become events: triggers in the database capture every client's
#: writes (trigger), or the service writes its outbox rows itself (explicit)
CAPTURE_MODES = ("trigger", "explicit")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_REGION_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
SECRET_KAFKA_KEYS = ("sasl.password", "ssl.key.password", "ssl.keystore.password", "sasl.oauthbearer.client.secret")
#: libpq error messages that quote a connection option's name (not its value):
#: the name is shown when it looks like one
_NAMES_AN_OPTION = ("invalid connection option", "invalid URI query parameter")
# no "user:password@" in it: that shape is masked wherever it appears
_DSN_FORMS = "a postgresql:// URL or libpq key=value pairs"


@dataclass(frozen=True)
class TableConfig:
    name: str
    key: tuple[str, ...]
    policy: str
    fields: Mapping[str, str] = field(default_factory=dict)
    schema: str = "public"
    #: business invariants: {name: SQL boolean expression over one row}, checked after every apply
    invariants: Mapping[str, str] = field(default_factory=dict)
    capture: str = "trigger"


@dataclass(frozen=True)
class RegionConfig:
    name: str
    dsn: str
    metrics_address: str = "127.0.0.1:9400"
    kafka: Mapping[str, str] = field(default_factory=dict)

    @property
    def redacted_dsn(self) -> str:
        from .store.dsn import redact_dsn as redact_one_dsn  # pure string code, no driver

        return redact_one_dsn(self.dsn)


@dataclass(frozen=True)
class LifecycleConfig:
    #: in-flight events a live consumer is still applying; 0 would never pass under traffic
    max_lag_events: int = 500
    max_lag_seconds: float = 10.0
    #: a sidecar that was stopped longer than this re-enters CATCHING_UP when it starts
    absence_threshold_seconds: float = 30.0


@dataclass(frozen=True)
class HeartbeatConfig:
    interval_seconds: float = 1.0
    suspect_after_seconds: float = 5.0
    failed_after_seconds: float = 15.0


@dataclass(frozen=True)
class RetentionConfig:
    """How long this region keeps events it relayed (outbox) or applied (inbox).

    Kept events are the safety net for a peer restored from a stale backup and for a
    region whose Kafka retention ran out while it was down; pruning bounds the tables.
    ``keep_hours`` must therefore outlast the oldest backup one would restore and the
    longest outage one would replay; ``None`` keeps every event forever.
    """

    keep_hours: float | None = 168.0
    interval_seconds: float = 300.0
    #: events deleted per transaction: apply waits for each one, so keep it short
    batch: int = 10000


@dataclass(frozen=True)
class AntiEntropyConfig:
    """The sidecar's continuous comparison of this region with its peers.

    Every ``interval_seconds`` an ACTIVE region compares each replicated table's
    maintained Merkle leaves with each reachable peer's at the watermark (now minus
    ``lifecycle.max_lag_seconds``). Every ``full_scan_interval_seconds`` it hashes the
    rows themselves instead, and checks its own leaves against its rows (a write made
    with triggers disabled leaves them stale); a full scan is then put off so that it
    takes at most ``full_scan_max_share`` of the time. ``repair`` rewrites what the
    replication metadata explains (audited in the log and a counter).
    """

    enabled: bool = True
    interval_seconds: float = 60.0
    full_scan_interval_seconds: float = 3600.0
    full_scan_max_share: float = 0.05
    repair: bool = False
    #: divergent keys named in one log line per table and peer
    log_keys: int = 20


#: a relay step has fixed costs (two commits, a flush round trip): 5000 rows per step
#: relayed 1.4x the events per second of 1000 (benchmarks/bench_pipeline.py); under
#: a light load steps are small anyway, whatever the limit
DEFAULT_RELAY_BATCH: Final = 5000
DEFAULT_APPLY_BATCH: Final = 1000
MAX_APPLY_WORKERS: Final = 64


@dataclass(frozen=True)
class Config:
    path: Path
    regions: Mapping[str, RegionConfig]
    tables: Mapping[str, TableConfig]
    kafka: Mapping[str, str]
    topic_prefix: str = "reconciler"
    topic_partitions: int = 1
    hlc_max_offset_ms: int = 1000
    relay_batch_size: int = DEFAULT_RELAY_BATCH
    apply_batch_size: int = DEFAULT_APPLY_BATCH
    #: transactions applying one inbox batch at once, each on its own connection, keys routed by hash
    apply_workers: int = 1
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    #: overlaid on ``kafka`` for `migrate` only: the principal allowed to create topics
    kafka_admin: Mapping[str, str] = field(default_factory=dict)
    anti_entropy: AntiEntropyConfig = field(default_factory=AntiEntropyConfig)
    #: where compensation events for invariant violations are published (None: <topic_prefix>.compensation)
    compensation_topic_name: str | None = None

    @property
    def compensation_topic(self) -> str:
        return self.compensation_topic_name or f"{self.topic_prefix}.compensation"

    def region(self, name: str) -> RegionConfig:
        try:
            return self.regions[name]
        except KeyError:
            known = ", ".join(self.regions)
            raise ConfigError(f"unknown region {name!r}; known regions: {known}", file=self.path) from None

    def table(self, name: str) -> TableConfig:
        try:
            return self.tables[name]
        except KeyError:
            known = ", ".join(self.tables)
            raise ConfigError(f"unknown table {name!r}; replicated tables: {known}", file=self.path) from None

    def events_topic(self, origin: str) -> str:
        return f"{self.topic_prefix}.events.{origin}"

    @property
    def control_topic(self) -> str:
        return f"{self.topic_prefix}.control"

    def kafka_settings(self, region: str) -> dict[str, str]:
        """librdkafka properties for one region: shared ones overlaid by the region's own."""
        merged = dict(self.kafka)
        merged.update(self.region(region).kafka)
        return merged

    def admin_kafka_settings(self) -> dict[str, str]:
        """What `migrate` creates topics with: ``kafka`` overlaid by ``kafka_admin``,
        or, without that section, the first region's settings (its principal must
        then be allowed to create topics, or the topics must exist already)."""
        if not self.kafka_admin:
            return self.kafka_settings(next(iter(self.regions)))
        return {**self.kafka, **self.kafka_admin}

    def peers(self, region: str) -> list[str]:
        return [r for r in self.regions if r != region]


def redact_dsn(dsn: str) -> str:
    """Free text (a log line, an error message) with URL and keyword passwords masked.

    The last line of defence for text that may quote a DSN (see
    :func:`reconciler.redact.scrub`); a DSN known to be one goes through
    ``store.dsn.redact_dsn``, which parses both libpq forms exactly."""
    return redact.scrub(dsn)


def _conninfo_problem(exc: Exception) -> str:
    """libpq's complaint about a connection string, without the parts of it that it quotes.

    libpq quotes the offending text ("missing "=" after "postgresql:/u:pw@h""), and
    that text is often the password: quoted parts are dropped, except an option
    name in the messages that quote one."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    keep_name = message.startswith(_NAMES_AN_OPTION)

    def hide(match: re.Match[str]) -> str:
        quoted = match.group(1)
        if len(quoted) == 1 and not quoted.isalnum():  # missing "=": punctuation, not a secret
            return match.group(0)
        return match.group(0) if keep_name and _IDENTIFIER.match(quoted) else '"…"'

    return redact.scrub(re.sub(r'"([^"]*)"', hide, message))


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file. ``environ`` resolves ``${VAR}`` references."""
    config_path = Path(path)
    env = os.environ if environ is None else environ
    try:
        text = config_path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", file=config_path) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file is not valid YAML: {exc}", file=config_path) from exc
    return _Parser(config_path, env).parse(raw)


class _Parser:
    def __init__(self, path: Path, env: Mapping[str, str]) -> None:
        self.path = path
        self.env = env

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{key}: {problem}", key=key, file=self.path)

    def mapping(self, value: Any, key: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        return value

    def only_keys(self, value: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
        for k in value:
            if k not in allowed:
                prefix = f"{key}." if key else ""
                raise self.fail(f"{prefix}{k}", f"unknown key; expected one of {', '.join(allowed)}")

    def positive_number(self, value: Any, key: str, integer: bool = False) -> Any:
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
            kind = "integer" if integer else "number"
            raise self.fail(key, f"expected a non-negative {kind}, got {value!r}")
        return value

    def identifier(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not _IDENTIFIER.match(value):
            raise self.fail(key, f"{value!r} is not a plain SQL identifier (letters, digits, underscore)")
        return value

    def secret_text(self, value: Any, key: str) -> str:
        """Resolve ``${VAR}`` and ``file:/path`` references, so secrets need not sit in the file."""
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise self.fail(key, f"expected a string, got {type(value).__name__}")
        text = str(value)
        if text.startswith("file:"):
            secret_path = Path(text[5:])
            try:
                return secret_path.read_text().strip()
            except OSError as exc:
                raise self.fail(key, f"cannot read secret file {secret_path}: {exc.strerror}") from exc

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.env:
                raise self.fail(key, f"environment variable {name} is not set")
            return self.env[name]

        return _ENV_REF.sub(substitute, text)

    def kafka_properties(self, value: Any, key: str) -> dict[str, str]:
        props = self.mapping(value, key)
        resolved = {str(k): self.secret_text(v, f"{key}.{k}") for k, v in props.items()}
        redact.register(v for k, v in resolved.items() if redact.is_secret_kafka_key(k))
        return resolved

    def dsn(self, value: Any, key: str) -> str:
        """A libpq connection string, checked by libpq's own parser; its secrets registered."""
        from .store.conninfo import ConninfoError, parse_conninfo
        from .store.dsn import secret_forms

        text = self.secret_text(value, key)
        if not text.strip():
            raise self.fail(key, f"is empty; expected {_DSN_FORMS}")
        # registered before parsing: the parse may fail, and the error must not show them
        redact.register(secret_forms(text))
        try:
            params = parse_conninfo(text)
        except ConninfoError as exc:
            hint = ""
            if re.match(r"^\s*postgres(ql)?:(?!//)", text, re.IGNORECASE):
                hint = " (a URL starts postgresql:// or postgres://)"
            raise self.fail(
                key, f"not a valid PostgreSQL connection string: {_conninfo_problem(exc)}{hint}; expected {_DSN_FORMS}",
            ) from None  # the driver's exception quotes the string
        redact.register(str(params[k]) for k in ("password", "sslpassword") if params.get(k))
        port = str(params.get("port", ""))
        if port and not all(p.strip().isdigit() for p in port.split(",")):
            raise self.fail(key, "the port is not a number")
        return text

    def parse(self, raw: Any) -> Config:
        top = self.mapping(raw, "(top level)")
        self.only_keys(
            top,
            "",
            ("topic_prefix", "topic_partitions", "hlc", "kafka", "regions", "tables", "batch", "lifecycle",
             "heartbeat", "retention", "kafka_admin", "anti_entropy", "compensation", "apply"),
        )
        regions_raw = self.mapping(top.get("regions"), "regions")
        if len(regions_raw) < 2:
            raise self.fail("regions", "at least two regions are required")
        regions = {name: self.region(name, spec) for name, spec in regions_raw.items()}
        tables_raw = self.mapping(top.get("tables"), "tables")
        tables = {name: self.table(name, spec) for name, spec in tables_raw.items()}
        hlc = self.mapping(top.get("hlc"), "hlc")
        self.only_keys(hlc, "hlc", ("max_offset_ms",))
        batch = self.mapping(top.get("batch"), "batch")
        self.only_keys(batch, "batch", ("relay", "apply"))
        apply = self.mapping(top.get("apply"), "apply")
        self.only_keys(apply, "apply", ("workers",))
        workers = self.positive_number(apply.get("workers", 1), "apply.workers", True)
        if workers == 0:
            raise self.fail("apply.workers", "is 0; at least 1 worker applies the inbox")
        if workers > MAX_APPLY_WORKERS:
            raise self.fail("apply.workers",
                            f"is {workers}; at most {MAX_APPLY_WORKERS} (each is a database connection)")
        prefix = top.get("topic_prefix", "reconciler")
        if not isinstance(prefix, str) or not re.match(r"^[A-Za-z0-9._-]{1,100}$", prefix):
            raise self.fail("topic_prefix", f"{prefix!r} is not a valid Kafka topic prefix")
        kafka = self.kafka_properties(top.get("kafka"), "kafka")
        if not kafka.get("bootstrap.servers") and not all(r.kafka.get("bootstrap.servers") for r in regions.values()):
            raise self.fail("kafka.bootstrap.servers", "is required (globally or for every region)")
        return Config(
            path=self.path,
            regions=regions,
            tables=tables,
            kafka=kafka,
            topic_prefix=prefix,
            topic_partitions=self.positive_number(top.get("topic_partitions", 1), "topic_partitions", True) or 1,
            hlc_max_offset_ms=self.positive_number(hlc.get("max_offset_ms", 1000), "hlc.max_offset_ms", True),
            relay_batch_size=self.positive_number(batch.get("relay", DEFAULT_RELAY_BATCH), "batch.relay", True) or 1,
            apply_batch_size=self.positive_number(batch.get("apply", DEFAULT_APPLY_BATCH), "batch.apply", True) or 1,
            apply_workers=workers,
            lifecycle=self.lifecycle(top.get("lifecycle")),
            heartbeat=self.heartbeat(top.get("heartbeat")),
            retention=self.retention(top.get("retention")),
            kafka_admin=self.kafka_properties(top.get("kafka_admin"), "kafka_admin"),
            anti_entropy=self.anti_entropy(top.get("anti_entropy")),
            compensation_topic_name=self.compensation(top.get("compensation")),
        )

    def region(self, name: Any, spec: Any) -> RegionConfig:
        key = f"regions.{name}"
        if not isinstance(name, str) or not _REGION_ID.match(name):
            raise self.fail(key, "region ids are lower-case letters, digits and dashes")
        body = self.mapping(spec, key)
        self.only_keys(body, key, ("dsn", "metrics_address", "kafka"))
        if "dsn" not in body:
            raise self.fail(f"{key}.dsn", "is required")
        # may come from the environment: a container binds differently from a host
        address = self.secret_text(body.get("metrics_address", "127.0.0.1:9400"), f"{key}.metrics_address")
        if ":" not in address:
            raise self.fail(f"{key}.metrics_address", f"expected HOST:PORT, got {address!r}")
        return RegionConfig(
            name=name,
            dsn=self.dsn(body["dsn"], f"{key}.dsn"),
            metrics_address=address,
            kafka=self.kafka_properties(body.get("kafka"), f"{key}.kafka"),
        )

    def table(self, name: Any, spec: Any) -> TableConfig:
        key = f"tables.{name}"
        self.identifier(name, key)
        body = self.mapping(spec, key)
        self.only_keys(body, key, ("key", "policy", "fields", "schema", "invariants", "capture"))
        key_cols = body.get("key")
        if isinstance(key_cols, str):
            key_cols = [key_cols]
        if not isinstance(key_cols, list) or not key_cols:
            raise self.fail(f"{key}.key", "expected a column name or a non-empty list of column names")
        columns = tuple(self.identifier(c, f"{key}.key") for c in key_cols)
        policy = body.get("policy", "lww")
        if policy not in POLICIES:
            raise self.fail(f"{key}.policy", f"{policy!r} is not one of {', '.join(POLICIES)}")
        fields_raw = self.mapping(body.get("fields"), f"{key}.fields")
        if fields_raw and policy != "merge":
            raise self.fail(f"{key}.fields", "per-field rules apply only to policy 'merge'")
        rules: dict[str, str] = {}
        for column, rule in fields_raw.items():
            self.identifier(column, f"{key}.fields")
            if rule not in FIELD_RULES:
                raise self.fail(f"{key}.fields.{column}", f"{rule!r} is not one of {', '.join(FIELD_RULES)}")
            if column in columns:
                raise self.fail(f"{key}.fields.{column}", "a key column cannot have a merge rule")
            rules[column] = rule
        schema = self.identifier(body.get("schema", "public"), f"{key}.schema")
        invariants = self.invariants(body.get("invariants"), f"{key}.invariants")
        capture = body.get("capture", "trigger")
        if capture not in CAPTURE_MODES:
            raise self.fail(f"{key}.capture", f"{capture!r} is not one of {', '.join(CAPTURE_MODES)}")
        return TableConfig(name=name, key=columns, policy=policy, fields=rules, schema=schema, invariants=invariants,
                           capture=capture)

    def invariants(self, raw: Any, key: str) -> dict[str, str]:
        """{name: boolean SQL expression}. Only the shape is checked here; ``migrate``
        checks each expression against the table (columns, boolean result)."""
        found: dict[str, str] = {}
        for name, expression in self.mapping(raw, key).items():
            self.identifier(name, key)
            where = f"{key}.{name}"
            if not isinstance(expression, str) or not expression.strip():
                raise self.fail(where, "expected a SQL boolean expression over the row, such as \"stock >= 0\"")
            # one expression, embedded in the checker's statement: nothing that could end it
            # or comment out the rest of it
            for token in (";", "--", "/*"):
                if token in expression:
                    raise self.fail(where, f"{token!r} is not allowed in an invariant expression")
            found[name] = expression.strip()
        return found

    def compensation(self, raw: Any) -> str | None:
        body = self.mapping(raw, "compensation")
        self.only_keys(body, "compensation", ("topic",))
        topic = body.get("topic")
        if topic is not None and (not isinstance(topic, str) or not re.match(r"^[A-Za-z0-9._-]{1,249}$", topic)):
            raise self.fail("compensation.topic", f"{topic!r} is not a valid Kafka topic name")
        return topic

    def lifecycle(self, raw: Any) -> LifecycleConfig:
        body = self.mapping(raw, "lifecycle")
        self.only_keys(body, "lifecycle", ("max_lag_events", "max_lag_seconds", "absence_threshold_seconds"))
        defaults = LifecycleConfig()
        return LifecycleConfig(
            max_lag_events=self.positive_number(
                body.get("max_lag_events", defaults.max_lag_events), "lifecycle.max_lag_events", True),
            max_lag_seconds=float(self.positive_number(
                body.get("max_lag_seconds", defaults.max_lag_seconds), "lifecycle.max_lag_seconds")),
            absence_threshold_seconds=float(self.positive_number(
                body.get("absence_threshold_seconds", defaults.absence_threshold_seconds),
                "lifecycle.absence_threshold_seconds")),
        )

    def heartbeat(self, raw: Any) -> HeartbeatConfig:
        body = self.mapping(raw, "heartbeat")
        allowed = ("interval_seconds", "suspect_after_seconds", "failed_after_seconds")
        self.only_keys(body, "heartbeat", allowed)
        defaults = HeartbeatConfig()
        values = {
            name: float(self.positive_number(body.get(name, getattr(defaults, name)), f"heartbeat.{name}"))
            for name in allowed
        }
        if not values["interval_seconds"] < values["suspect_after_seconds"] < values["failed_after_seconds"]:
            raise self.fail("heartbeat", "expected interval_seconds < suspect_after_seconds < failed_after_seconds")
        return HeartbeatConfig(**values)

    def retention(self, raw: Any) -> RetentionConfig:
        body = self.mapping(raw, "retention")
        self.only_keys(body, "retention", ("keep_hours", "interval_seconds", "batch"))
        defaults = RetentionConfig()
        keep = body.get("keep_hours", defaults.keep_hours)
        if keep is not None:
            keep = float(self.positive_number(keep, "retention.keep_hours"))
            if keep <= 0:
                raise self.fail("retention.keep_hours", "must be above 0 (null keeps every event)")
        interval = float(self.positive_number(
            body.get("interval_seconds", defaults.interval_seconds), "retention.interval_seconds"))
        batch = self.positive_number(body.get("batch", defaults.batch), "retention.batch", True)
        if interval <= 0 or batch <= 0:
            raise self.fail("retention", "interval_seconds and batch must be above 0")
        return RetentionConfig(keep_hours=keep, interval_seconds=interval, batch=batch)

    def anti_entropy(self, raw: Any) -> AntiEntropyConfig:
        body = self.mapping(raw, "anti_entropy")
        fields = ("enabled", "interval_seconds", "full_scan_interval_seconds", "full_scan_max_share", "repair",
                  "log_keys")
        self.only_keys(body, "anti_entropy", fields)
        defaults = AntiEntropyConfig()
        flags = {}
        for name in ("enabled", "repair"):
            value = body.get(name, getattr(defaults, name))
            if not isinstance(value, bool):
                raise self.fail(f"anti_entropy.{name}", f"expected true or false, got {value!r}")
            flags[name] = value
        interval = float(self.positive_number(body.get("interval_seconds", defaults.interval_seconds),
                                              "anti_entropy.interval_seconds"))
        full = float(self.positive_number(body.get("full_scan_interval_seconds", defaults.full_scan_interval_seconds),
                                          "anti_entropy.full_scan_interval_seconds"))
        share = float(self.positive_number(body.get("full_scan_max_share", defaults.full_scan_max_share),
                                           "anti_entropy.full_scan_max_share"))
        log_keys = self.positive_number(body.get("log_keys", defaults.log_keys), "anti_entropy.log_keys", True)
        if interval <= 0:
            raise self.fail("anti_entropy.interval_seconds", "must be above 0")
        if full < interval:
            raise self.fail("anti_entropy.full_scan_interval_seconds",
                            f"must be at least interval_seconds ({interval:g}): a full scan replaces one pass")
        if not 0 < share <= 1:
            raise self.fail("anti_entropy.full_scan_max_share", f"must be above 0 and at most 1, got {share:g}")
        return AntiEntropyConfig(enabled=flags["enabled"], interval_seconds=interval, full_scan_interval_seconds=full,
                                 full_scan_max_share=share, repair=flags["repair"], log_keys=log_keys)
