"""Local development stack: one PostgreSQL server per region and one KRaft Kafka broker.

Started from the machine's own binaries (PostgreSQL from the distribution, Kafka from
jars Maven resolves from ``pom.xml``, run by the machine's Java), on loopback ports,
because our machines have no Docker engine. See :class:`DevStack`.
"""

from .stack import DEFAULT_KAFKA_PORT, DEFAULT_PG_BASE_PORT, DEFAULT_REGIONS, DevStack

__all__ = ["DEFAULT_KAFKA_PORT", "DEFAULT_PG_BASE_PORT", "DEFAULT_REGIONS", "DevStack"]
