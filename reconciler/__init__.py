"""reconciler: multi-region disaster-recovery reconciliation for PostgreSQL + Kafka."""

__version__ = "0.1.0"
