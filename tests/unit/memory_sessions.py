"""StoreSessions for unit tests: every session a service opens is on the same
in-memory database, as every connection to a server sees the same data."""

from __future__ import annotations

from reconciler.store.memory import MemoryRegionStore


class OneDatabase:
    def __init__(self, store: MemoryRegionStore) -> None:
        self.store = store

    def open(self, region: str, *, autocommit: bool = False) -> MemoryRegionStore:
        assert region == self.store.region, f"a session on {region}, but this database is {self.store.region}"
        return self.store
