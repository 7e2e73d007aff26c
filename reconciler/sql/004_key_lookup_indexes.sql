-- Recovery's verify step asks, for a few differing keys, which events each region
-- applied to them (inbox) or wrote itself (outbox). Without these indexes each such
-- question scans the whole inbox and outbox.
CREATE INDEX IF NOT EXISTS inbox_table_key ON reconciler.inbox (table_name, row_key);
CREATE INDEX IF NOT EXISTS outbox_aggregate ON reconciler.outbox (aggregatetype, aggregateid);
