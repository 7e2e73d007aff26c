"""Statements of the checkout demo domain (orders, inventory, payments) that its
compensation saga (:mod:`reconciler.saga`) and the drills read, beside the region
store port: they name the demo's business tables, which the port knows nothing of."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .postgres_store import PostgresRegionStore, as_region_store

__all__ = ["DemoDomain"]

_SAGA_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS public.saga_compensations ("
    " id text PRIMARY KEY, sku text NOT NULL, cancelled jsonb NOT NULL DEFAULT '[]',"
    " handled_at timestamptz NOT NULL DEFAULT now())"
)


class DemoDomain:
    """The demo's tables in one region, on that region's store (its session and transaction)."""

    def __init__(self, target: PostgresRegionStore | Any) -> None:
        store = as_region_store(target)
        if not isinstance(store, PostgresRegionStore):
            raise TypeError(f"the demo domain lives in PostgreSQL, not in {type(store).__name__}")
        self.store = store

    def _one(self, step: str, query: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self.store.translating(step):
            row: tuple[Any, ...] | None = self.store.connection.execute(query, params).fetchone()
        return row

    def prepare_saga(self) -> None:
        with self.store.transaction(), self.store.translating("create saga table"):
            self.store.connection.execute(_SAGA_SCHEMA)

    def claim_compensation(self, ident: str, sku: str) -> bool:
        """Record that the saga handles compensation event ``ident``; False: it already did."""
        return self._one("claim compensation", "INSERT INTO public.saga_compensations (id, sku) VALUES (%s, %s)"
                         " ON CONFLICT (id) DO NOTHING RETURNING id", (ident, sku)) is not None

    def record_cancelled(self, ident: str, cancelled: Sequence[str]) -> None:
        self._one("record compensation", "UPDATE public.saga_compensations SET cancelled = %s::jsonb WHERE id = %s"
                  " RETURNING id", (json.dumps(list(cancelled)), ident))

    def stock(self, sku: str) -> int | None:
        row = self._one("read stock", "SELECT stock FROM public.inventory WHERE sku = %s", (sku,))
        return int(row[0]) if row is not None and row[0] is not None else None

    def paid_order(self, note: str) -> tuple[Any, int] | None:
        """(order id, total in cents) of the paid order whose note is ``note`` (the sale's event id)."""
        row = self._one("read paid order", "SELECT id, total_cents FROM public.orders WHERE note = %s"
                        " AND status = 'paid'", (note,))
        return (row[0], int(row[1])) if row is not None else None

    def order_exists(self, key: str) -> bool:
        return self._one("read order", "SELECT 1 FROM public.orders WHERE id = %s", (key,)) is not None
