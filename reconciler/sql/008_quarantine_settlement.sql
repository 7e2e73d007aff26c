-- reconciler schema, version 8: quarantined events are missing until settled.
--
-- A quarantined event (undecodable, refused by a policy or by the database, stamped
-- too far in the future, claiming another region's origin) is an event this region
-- has not applied. It stays "open" -- counted as missing by gaps, the metrics and
-- the lifecycle gate -- until it is settled: applied (by an operator's retry, or by
-- the inbox once a future stamp is no longer too far ahead) or discarded by an
-- operator with a reason. Settling keeps the row; quarantine_log keeps who did what.
--
-- An open entry whose (origin, sequence) this region applied anyway (the real event
-- arrived after a forged or corrupt copy) is not missing either: the counts join
-- the inbox to leave those out.

ALTER TABLE reconciler.quarantine
    ADD COLUMN event_id     uuid,
    -- the event's packed HLC stamp (held clock_skew entries are retried once it is near)
    ADD COLUMN hlc          bigint,
    ADD COLUMN settled_at   timestamptz,
    ADD COLUMN settled_by   text,
    ADD COLUMN settlement   text CHECK (settlement IN ('applied', 'discarded')),
    ADD COLUMN settle_reason text;

-- Entries from before this version that an operator already retried count as settled.
UPDATE reconciler.quarantine SET settled_at = retried_at, settled_by = 'migration 008', settlement = 'applied',
    settle_reason = 'retried before quarantine settlement existed'
    WHERE retried_at IS NOT NULL;

CREATE INDEX quarantine_open ON reconciler.quarantine (origin, sequence) WHERE settled_at IS NULL;

-- Every operator or automatic action on a quarantine entry.
CREATE TABLE reconciler.quarantine_log (
    id            bigserial   PRIMARY KEY,
    quarantine_id bigint      NOT NULL REFERENCES reconciler.quarantine (id),
    at            timestamptz NOT NULL DEFAULT now(),
    action        text        NOT NULL CHECK (action IN ('retry', 'discard', 'auto_retry')),
    outcome       text        NOT NULL,
    actor         text        NOT NULL,
    reason        text        NOT NULL
);

-- How far (ms) a packed HLC stamp is ahead of this database's clock: the one clock
-- every skew judgement uses (hlc_observe below, the apply path's check before it
-- writes, and the retry of held events).
CREATE FUNCTION reconciler.hlc_ahead_ms(remote bigint) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT (remote >> 16) - (reconciler.physical_hlc() >> 16)
$$;
