-- reconciler schema, version 1: region identity and lifecycle, the HLC, outbox,
-- inbox, relay lease, row metadata for conflict policies, conflicts, quarantine.
-- Applied by `reconciler migrate` inside one transaction, recorded in
-- reconciler.schema_version. Everything lives in the `reconciler` schema so a
-- service's own tables are never touched except the replicated ones.

CREATE SCHEMA IF NOT EXISTS reconciler;

-- Which region this database is, and where it stands in the recovery lifecycle.
CREATE TABLE reconciler.region (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    region_id      text        NOT NULL,
    state          text        NOT NULL DEFAULT 'ACTIVE'
                   CHECK (state IN ('ACTIVE', 'SUSPECT', 'FENCED', 'CATCHING_UP', 'VERIFYING')),
    epoch          bigint      NOT NULL DEFAULT 1,
    state_reason   text        NOT NULL DEFAULT 'created by migrate',
    state_since    timestamptz NOT NULL DEFAULT now(),
    max_offset_ms  integer     NOT NULL DEFAULT 1000,
    -- the sidecar's last sign of life: a long absence sends the region back to CATCHING_UP
    last_alive_at  timestamptz,
    clean_stop     boolean     NOT NULL DEFAULT true
);

CREATE TABLE reconciler.lifecycle_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    from_state  text        NOT NULL,
    to_state    text        NOT NULL,
    epoch       bigint      NOT NULL,
    reason      text        NOT NULL,
    actor       text        NOT NULL
);

-- Replicated tables and their conflict policy, copied from the YAML config by
-- migrate so that writers in any language and the apply path agree on them.
CREATE TABLE reconciler.replicated_table (
    table_name   text   PRIMARY KEY,
    schema_name  text   NOT NULL DEFAULT 'public',
    key_columns  text[] NOT NULL,
    policy       text   NOT NULL CHECK (policy IN ('lww', 'merge', 'manual')),
    field_rules  jsonb  NOT NULL DEFAULT '{}'
);

-- The hybrid logical clock of this region, packed as wall_ms << 16 | logical.
-- A sequence, not a row, so that stamping does not hold a row lock until commit
-- (which would serialise every writing transaction of the region).
CREATE SEQUENCE reconciler.hlc_clock MINVALUE 0 START 0;

CREATE FUNCTION reconciler.physical_hlc() RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) << 16
$$;

-- Advance the clock to at least `floor` and return a stamp strictly greater than
-- every stamp this region issued or observed before. setval() is not transactional,
-- so the critical section is guarded by a session advisory lock held for
-- microseconds (released on error too) instead of a row lock held to commit.
CREATE FUNCTION reconciler.hlc_advance(floor bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    stamp bigint;
BEGIN
    PERFORM pg_advisory_lock(7165108711);
    BEGIN
        stamp := nextval('reconciler.hlc_clock');
        IF stamp < floor THEN
            stamp := floor;
            PERFORM setval('reconciler.hlc_clock', stamp);
        END IF;
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        PERFORM pg_advisory_unlock(7165108711);
        RAISE;
    END;
    PERFORM pg_advisory_unlock(7165108711);
    RETURN stamp;
END
$$;

-- Stamp a local event: never behind physical time.
CREATE FUNCTION reconciler.hlc_now() RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT reconciler.hlc_advance(reconciler.physical_hlc())
$$;

-- Observe a remote stamp (Kulkarni et al. receive rule, on packed values:
-- new = max(physical, local + 1, remote + 1)). A remote stamp more than the
-- configured offset ahead of physical time is refused (SQLSTATE RC001) and the
-- clock is left unchanged.
CREATE FUNCTION reconciler.hlc_observe(remote bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    physical   bigint := reconciler.physical_hlc();
    max_offset integer;
BEGIN
    SELECT max_offset_ms INTO max_offset FROM reconciler.region;
    IF (remote >> 16) - (physical >> 16) > coalesce(max_offset, 1000) THEN
        RAISE EXCEPTION 'remote HLC stamp % is % ms ahead of local time (max offset % ms)',
            remote, (remote >> 16) - (physical >> 16), max_offset
            USING ERRCODE = 'RC001';
    END IF;
    RETURN reconciler.hlc_advance(greatest(remote + 1, physical));
END
$$;

-- The transactional outbox. The first five columns are Debezium's outbox-router
-- columns, so a team already relaying with Debezium can point it here.
-- `position` is insertion order, which is NOT commit order: the relay never
-- uses it as a high-water mark, it picks rows whose relay_sequence is still null.
CREATE TABLE reconciler.outbox (
    id              uuid        PRIMARY KEY,
    aggregatetype   text        NOT NULL,
    aggregateid     text        NOT NULL,
    type            text        NOT NULL,
    payload         jsonb       NOT NULL,
    origin          text        NOT NULL,
    hlc             bigint      NOT NULL,
    prior_hlc       bigint,
    operation       text        NOT NULL CHECK (operation IN ('insert', 'update', 'delete', 'resolve')),
    position        bigserial   NOT NULL,
    relay_sequence  bigint,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX outbox_origin_sequence ON reconciler.outbox (origin, relay_sequence)
    WHERE relay_sequence IS NOT NULL;
CREATE INDEX outbox_unrelayed ON reconciler.outbox (position) WHERE relay_sequence IS NULL;

-- One row per origin whose events this database relays: the fencing epoch of the
-- relay that holds the lease, the last sequence assigned and the last published.
CREATE TABLE reconciler.relay_state (
    origin              text        PRIMARY KEY,
    epoch               bigint      NOT NULL DEFAULT 0,
    holder              text,
    last_sequence       bigint      NOT NULL DEFAULT 0,
    published_through   bigint      NOT NULL DEFAULT 0,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- Every remote event applied here, once: (origin, sequence) is the dedup key.
-- The payload is kept so that this region can hand an event back to a peer that
-- lost it (a peer restored from a stale backup).
CREATE TABLE reconciler.inbox (
    origin      text        NOT NULL,
    sequence    bigint      NOT NULL,
    event_id    uuid        NOT NULL,
    hlc         bigint      NOT NULL,
    prior_hlc   bigint,
    table_name  text        NOT NULL,
    row_key     text        NOT NULL,
    operation   text        NOT NULL,
    type        text        NOT NULL DEFAULT '',
    payload     jsonb       NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin, sequence)
);

-- What conflict policies need beyond the visible row: the winning stamp, the
-- tombstone of a deleted row, per-field stamps (merge) and the visible values.
CREATE TABLE reconciler.row_meta (
    table_name  text    NOT NULL,
    row_key     text    NOT NULL,
    hlc         bigint  NOT NULL,
    origin      text    NOT NULL,
    deleted     boolean NOT NULL DEFAULT false,
    meta        jsonb   NOT NULL DEFAULT '{}',
    row_values  jsonb   NOT NULL DEFAULT '{}',
    PRIMARY KEY (table_name, row_key)
);

-- Every conflict detected, whatever the policy decided (audit trail), and the
-- manual queue (status 'open' until an operator resolves it).
CREATE TABLE reconciler.conflicts (
    conflict_id       text        PRIMARY KEY,
    table_name        text        NOT NULL,
    row_key           text        NOT NULL,
    kind              text        NOT NULL,
    policy            text        NOT NULL,
    outcome           text        NOT NULL,
    status            text        NOT NULL CHECK (status IN ('auto', 'open', 'resolved')),
    local_version     jsonb       NOT NULL,
    remote_version    jsonb       NOT NULL,
    event_id          uuid,
    detected_at       timestamptz NOT NULL DEFAULT now(),
    resolved_by       text,
    resolved_at       timestamptz,
    resolution_reason text,
    resolution        jsonb,
    resolution_event  uuid
);
CREATE INDEX conflicts_open ON reconciler.conflicts (table_name, row_key) WHERE status = 'open';

-- Events that could not be decoded or applied. Nothing is dropped: the raw
-- message is kept with its reason and where it came from.
CREATE TABLE reconciler.quarantine (
    id           bigserial   PRIMARY KEY,
    origin       text,
    sequence     bigint,
    topic        text,
    kafka_partition integer,
    kafka_offset bigint,
    reason       text        NOT NULL,
    detail       text        NOT NULL,
    raw          bytea,
    received_at  timestamptz NOT NULL DEFAULT now(),
    retried_at   timestamptz
);
