"""StoreSessions for unit tests over in-memory databases: every session a service
opens on a region is on that region's one database, as every connection to a
server sees the same data."""

from __future__ import annotations

from collections.abc import Iterable

from reconciler.errors import StoreUnavailable
from reconciler.store.memory import MemoryRegionStore


class OneDatabase:
    def __init__(self, store: MemoryRegionStore) -> None:
        self.store = store

    def open(self, region: str, *, autocommit: bool = False, timeout: int = 5) -> MemoryRegionStore:
        assert region == self.store.region, f"a session on {region}, but this database is {self.store.region}"
        return self.store


class Databases:
    """One in-memory database per region; a region marked down refuses sessions, as an
    unreachable server does."""

    def __init__(self, stores: Iterable[MemoryRegionStore]) -> None:
        self.stores = {s.region: s for s in stores}
        self.down: set[str] = set()

    def __getitem__(self, region: str) -> MemoryRegionStore:
        return self.stores[region]

    def open(self, region: str, *, autocommit: bool = False, timeout: int = 5) -> MemoryRegionStore:
        if region in self.down:
            raise StoreUnavailable("PostgreSQL unreachable: connection refused", region=region)
        return self.stores[region]
