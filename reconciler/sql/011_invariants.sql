-- reconciler schema, version 11: business invariants and compensation events.
--
-- A merge can be right by its rules and wrong for the business (two partitioned
-- regions both sell the last units: the counter merges to -3). After every apply
-- the configured invariants are evaluated on the keys it changed, in the same
-- transaction; a failing one is recorded here once (one open row per table, key
-- and invariant) and closes itself when a later check finds it holds again.
--
-- violation_id is derived from (table, key, invariant, the contributing event ids),
-- so every region that detects the same violation over the same events names it
-- the same way; the compensation event published for it carries the same id.

CREATE TABLE reconciler.violations (
    violation_id       text        PRIMARY KEY,
    table_name         text        NOT NULL,
    row_key            text        NOT NULL,
    invariant          text        NOT NULL,
    expression         text        NOT NULL,
    row_values         jsonb       NOT NULL,
    -- [{event_id, origin, sequence, hlc, operation, type, payload}], newest first
    contributing       jsonb       NOT NULL,
    status             text        NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    detected_at        timestamptz NOT NULL DEFAULT now(),
    -- who closed it: an operator (`violations resolve`) or the checker when the invariant held again
    resolved_by        text,
    resolved_at        timestamptz,
    resolution_reason  text
);
CREATE UNIQUE INDEX violations_open_once ON reconciler.violations (table_name, row_key, invariant)
    WHERE status = 'open';

-- Compensation events wait here for the relay, which publishes them to the
-- compensation topic (not the events topics: those carry dense per-origin
-- sequence numbers that peers' gap detection relies on, and a compensation
-- event is for services, not for replication). Written in the transaction that
-- recorded the violation, so it is never lost; republished after a crash with
-- the same id, which consumers dedupe by.
CREATE TABLE reconciler.compensation_outbox (
    id            text        PRIMARY KEY,
    payload       jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX compensation_unpublished ON reconciler.compensation_outbox (created_at) WHERE published_at IS NULL;

-- The invariants as migrate last validated them, so that writers that read the
-- catalogue rather than the YAML (reconciler.outbox.write in a service) check the
-- same ones as the sidecar.
ALTER TABLE reconciler.replicated_table ADD COLUMN invariants jsonb NOT NULL DEFAULT '{}';
