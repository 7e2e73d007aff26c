-- reconciler schema, version 5: relay numbering out of the outbox rows.
--
-- Until now the relay numbered an event by updating its outbox row. An outbox row
-- is wide (payload, uuid, aggregate) and indexed several times, and an update of
-- an indexed column rewrites the whole row and adds an entry to every index: that
-- one statement was two thirds of the relay's time. Now:
--
--   * every INSERT into reconciler.outbox also queues the new rows' positions in
--     outbox_pending (a statement trigger, so writers change nothing: services in
--     any language keep inserting into reconciler.outbox as before, and a bulk
--     insert queues all its rows in one statement);
--   * the relay numbers by taking the oldest pending positions off the queue and
--     recording (origin, relay_sequence, position) in outbox_sequence, in one
--     statement. Two narrow rows per event instead of a rewritten wide one.
--
-- A pending row becomes visible when the writer's transaction commits, so a row
-- committed late by a transaction that started early is numbered by the next
-- batch, never skipped. outbox_numbered shows every outbox row with its relay
-- sequence (NULL while pending), for people and ad hoc queries.
--
-- Upgrading copies one narrow row per existing outbox row, in the migration's
-- transaction: writers to the outbox wait until it commits.

CREATE TABLE reconciler.outbox_pending (
    position    bigint  PRIMARY KEY,
    origin      text    NOT NULL
);

CREATE TABLE reconciler.outbox_sequence (
    origin          text    NOT NULL,
    relay_sequence  bigint  NOT NULL,
    position        bigint  NOT NULL UNIQUE,
    PRIMARY KEY (origin, relay_sequence)
);

CREATE UNIQUE INDEX outbox_position ON reconciler.outbox (position);

INSERT INTO reconciler.outbox_sequence (origin, relay_sequence, position)
    SELECT origin, relay_sequence, position FROM reconciler.outbox WHERE relay_sequence IS NOT NULL;
INSERT INTO reconciler.outbox_pending (position, origin)
    SELECT position, origin FROM reconciler.outbox WHERE relay_sequence IS NULL;

DROP INDEX reconciler.outbox_unrelayed;
DROP INDEX reconciler.outbox_origin_sequence;
ALTER TABLE reconciler.outbox DROP COLUMN relay_sequence;

-- Also refuses, with the writer's transaction, a row that names another region as
-- its origin: the relay publishes only this region's events, so such a row would
-- wait forever unnoticed (a service configured with the wrong region id).
CREATE FUNCTION reconciler.outbox_queue() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    here text;
    stranger text;
BEGIN
    SELECT region_id INTO here FROM reconciler.region;
    SELECT origin INTO stranger FROM new_rows WHERE origin <> here LIMIT 1;
    IF stranger IS NOT NULL THEN
        RAISE EXCEPTION 'outbox row with origin % inserted in region %''s database', stranger, here
            USING ERRCODE = 'RC002',
                  HINT = 'an outbox holds only its own region''s events: set origin to reconciler.region.region_id';
    END IF;
    INSERT INTO reconciler.outbox_pending (position, origin) SELECT position, origin FROM new_rows;
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_queue AFTER INSERT ON reconciler.outbox
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION reconciler.outbox_queue();

CREATE VIEW reconciler.outbox_numbered AS
    SELECT o.*, s.relay_sequence
    FROM reconciler.outbox o LEFT JOIN reconciler.outbox_sequence s ON s.position = o.position;
