"""Provisioning: schema migrations in every region's database and the Kafka topics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from .config import Config
from .errors import ConfigError
from .store.postgres_store import RegionDatabases
from .transport import kafka


@dataclass
class MigrateReport:
    applied: dict[str, list[str]] = field(default_factory=dict)
    schema_versions: dict[str, int] = field(default_factory=dict)
    topics_created: list[str] = field(default_factory=list)
    #: per region, the tables whose Merkle leaves were counted again on request
    leaves_rebuilt: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    #: per region, what write capture installed or removed per table, and the lock it took
    capture: dict[str, list[dict[str, object]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "applied": self.applied,
            "schema_versions": self.schema_versions,
            "topics_created": self.topics_created,
            "leaves_rebuilt": self.leaves_rebuilt,
            "capture": self.capture,
        }


def migrate(
    config: Config, regions: list[str] | None = None, demo_tables: bool = False,
    rebuild_leaves: Sequence[str] = (), uninstall_capture_all: bool = False,
) -> MigrateReport:
    """Migrate every region (or ``regions``); ``rebuild_leaves`` names tables whose
    Merkle leaves are counted again from their rows: for writes the leaf triggers
    could not see (made with ``session_replication_role = replica``, or while a
    trigger was disabled), which nothing else can detect.

    Tables with ``capture: trigger`` get their capture triggers (installed or
    refreshed), tables with ``capture: explicit`` lose them; ``uninstall_capture_all``
    removes capture from every table. Each table is its own transaction, holding the
    table ``SHARE ROW EXCLUSIVE`` (writers wait, readers do not) while it changes."""
    unknown = [t for t in rebuild_leaves if t not in config.tables]
    if unknown:
        raise ConfigError(f"not a replicated table: {', '.join(unknown)}", file=str(config.path),
                          key="tables")
    report = MigrateReport()
    for region in regions or list(config.regions):
        with RegionDatabases(config).session(region) as store:
            if demo_tables:
                store.create_demo_tables()
            report.applied[region] = store.migrate(config.hlc_max_offset_ms, config.tables.values())
            report.schema_versions[region] = store.schema_version()
            store.commit()
            for spec in config.tables.values():
                if spec.capture == "trigger" and not uninstall_capture_all:
                    done = store.install_capture(spec)
                else:
                    done = store.uninstall_capture(spec)
                store.commit()
                report.capture.setdefault(region, []).append(done.to_dict())
            for table in rebuild_leaves:
                # its own transaction: the table is locked against writes only while it is counted
                result = store.rebuild_leaves(config.tables[table])
                store.commit()
                report.leaves_rebuilt.setdefault(region, []).append(asdict(result))
    settings = config.admin_kafka_settings()
    topics = [config.events_topic(r) for r in config.regions] + [config.control_topic, config.compensation_topic]
    report.topics_created = kafka.ensure_topics(settings, topics, config.topic_partitions)
    return report
