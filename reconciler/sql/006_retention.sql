-- reconciler schema, version 6: retention.
--
-- The inbox keeps one row per applied event and the outbox one per written event,
-- forever until now. Pruning deletes, per origin, the oldest gap-free run of inbox
-- rows older than the retention horizon, and this region's relayed outbox rows
-- older than it. What the deleted inbox rows proved is kept as one number per
-- origin: every sequence up to `through` was applied here. The inbox treats an
-- event at or below it as a duplicate, and gap analysis counts it as applied (but
-- no longer as something this region can hand to a peer).
--
-- A floor only ever covers sequences whose rows were all present: a hole stays a
-- hole, and the rows above it stay until it is filled.

CREATE TABLE reconciler.inbox_floor (
    origin          text        PRIMARY KEY,
    through         bigint      NOT NULL CHECK (through > 0),
    -- the latest applied_at among the pruned rows, for "last applied" figures
    last_applied_at timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- One row: every event this region pruned (inbox or outbox) has an HLC stamp below
-- horizon_hlc, and every event at or above it is still here. Verification compares
-- two regions' per-key event sets only above both horizons.
CREATE TABLE reconciler.retention_state (
    singleton       boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    horizon_hlc     bigint      NOT NULL DEFAULT 0,
    inbox_pruned    bigint      NOT NULL DEFAULT 0,
    outbox_pruned   bigint      NOT NULL DEFAULT 0,
    last_pruned_at  timestamptz
);
INSERT INTO reconciler.retention_state DEFAULT VALUES;
