"""Provisioning: schema migrations in every region's database and the Kafka topics."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Config
from .store import postgres as pg
from .transport import kafka


@dataclass
class MigrateReport:
    applied: dict[str, list[str]] = field(default_factory=dict)
    schema_versions: dict[str, int] = field(default_factory=dict)
    topics_created: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "applied": self.applied,
            "schema_versions": self.schema_versions,
            "topics_created": self.topics_created,
        }


def migrate(config: Config, regions: list[str] | None = None, demo_tables: bool = False) -> MigrateReport:
    report = MigrateReport()
    for region in regions or list(config.regions):
        with pg.connect(config.region(region).dsn, region=region) as conn:
            if demo_tables:
                pg.create_demo_tables(conn)
            report.applied[region] = pg.migrate(conn, region, config.hlc_max_offset_ms, config.tables.values())
            report.schema_versions[region] = pg.schema_version(conn)
    settings = config.kafka_settings(next(iter(config.regions)))
    topics = [config.events_topic(r) for r in config.regions] + [config.control_topic]
    report.topics_created = kafka.ensure_topics(settings, topics, config.topic_partitions)
    return report
