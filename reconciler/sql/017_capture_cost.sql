-- reconciler schema, version 17: write capture made cheaper (issue 12, item 4).
--
-- The same rows, metadata and outbox events as migration 009, in fewer statements
-- on lww and manual tables:
--
--   * a statement's rows are read once into arrays, not into one JSON document that
--     every following statement unpacked again; an UPDATE's old and new rows are
--     paired by key from those arrays;
--   * a single-row statement (the common OLTP case) goes straight to capture_one:
--     one key lock, one read of the region and the row's metadata, one clock step
--     and one statement for the metadata, the outbox row and its queue row, where
--     capture_write took about ten statements and the queue trigger four more;
--   * capture queues its own outbox rows (migration 005's outbox_pending) in the
--     statement that inserts them, and the queue trigger on reconciler.outbox skips
--     that statement: reconciler.outbox_queued is 'on' only around it. Every other
--     insert into reconciler.outbox (explicit capture, the Python helper, a
--     service) is checked and queued by the trigger as before;
--   * the trigger's statements keep their generic plans: a statement of a few rows
--     was planned again on every call because its custom plan looked cheaper.
--
-- Merge tables still decide row by row in capture_write (their metadata is built
-- column by column). The clock step is unchanged: its subtransaction costs well
-- under a microsecond, the advisory lock around it a few, and without that lock two
-- sessions could both move the clock to the same physical time.

-- One change of one row of an lww or manual table: what the set-based part of
-- capture_statement does for many rows. Called by capture_statement, with its
-- owner's rights and settings.
CREATE FUNCTION reconciler.capture_one(
    p_table text, p_policy text, p_keys text[], p_single boolean, p_key text, p_old jsonb, p_new jsonb
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    op text := CASE WHEN p_old IS NULL THEN 'insert' WHEN p_new IS NULL THEN 'delete' ELSE 'update' END;
    row_j jsonb := coalesce(p_new, p_old);
    region text;
    prior bigint;
    cur_meta jsonb;
    stamp bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(reconciler.key_lock_id(p_table, p_key));
    -- read after the key lock: a writer that held it has committed its metadata
    SELECT r.region_id, m.hlc, m.meta INTO region, prior, cur_meta
    FROM reconciler.region r
    LEFT JOIN reconciler.row_meta m ON m.table_name = p_table AND m.row_key = p_key;
    stamp := reconciler.hlc_now();
    PERFORM set_config('reconciler.outbox_queued', 'on', true);
    WITH meta_written AS (
        INSERT INTO reconciler.row_meta AS m (table_name, row_key, hlc, origin, deleted, meta, row_values)
        VALUES (p_table, p_key, stamp, region, op = 'delete',
                CASE WHEN p_policy = 'manual' THEN
                    CASE WHEN jsonb_typeof(cur_meta -> 'resolution') = 'object'
                         THEN jsonb_build_object('resolution', cur_meta -> 'resolution') ELSE '{}'::jsonb END
                    || CASE WHEN prior IS NOT NULL THEN jsonb_build_object('prior', prior) ELSE '{}'::jsonb END
                ELSE '{}'::jsonb END,
                CASE WHEN op = 'delete' THEN '{}'::jsonb ELSE p_new END)
        ON CONFLICT (table_name, row_key) DO UPDATE SET hlc = EXCLUDED.hlc, origin = EXCLUDED.origin,
            deleted = EXCLUDED.deleted, meta = EXCLUDED.meta, row_values = EXCLUDED.row_values
    ), written AS (
        INSERT INTO reconciler.outbox (id, aggregatetype, aggregateid, type, payload, origin, hlc, prior_hlc,
                                       operation)
        VALUES (gen_random_uuid(), p_table, p_key, p_table || '.' || op,
                jsonb_build_object('key', CASE WHEN p_single THEN jsonb_build_object(p_keys[1], row_j -> p_keys[1])
                                               ELSE (SELECT jsonb_object_agg(c, row_j -> c) FROM unnest(p_keys) AS c)
                                          END)
                || CASE WHEN op = 'delete' THEN '{}'::jsonb ELSE jsonb_build_object('values', p_new) END,
                region, stamp, prior, op)
        RETURNING position, origin
    )
    INSERT INTO reconciler.outbox_pending (position, origin) SELECT w.position, w.origin FROM written w;
    PERFORM set_config('reconciler.outbox_queued', '', true);
END
$$;

CREATE OR REPLACE FUNCTION reconciler.capture_statement() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    tname text := TG_ARGV[0];
    policy text := TG_ARGV[1];
    keys text[] := TG_ARGV[2]::text[];
    -- a one-column key's text is read inline (capture_key_text is a function call a row)
    single boolean := cardinality(TG_ARGV[2]::text[]) = 1;
    rules jsonb := TG_ARGV[3]::jsonb;
    -- TG_TABLE_* are of type name, whose collation is "C": passed as they are they
    -- would make "C" the collation of every text comparison in capture_write, and
    -- row_meta's primary key (default collation) could not serve its lookups
    rel_schema text := TG_TABLE_SCHEMA::text COLLATE "default";
    rel_name text := TG_TABLE_NAME::text COLLATE "default";
    olds jsonb[];
    news jsonb[];
    ks text[];
    total integer;
    k text;
    old_k text;
BEGIN
    IF current_setting('reconciler.capture', true) = 'off' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(to_jsonb(r)) INTO news FROM new_rows r;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(to_jsonb(r)) INTO olds FROM old_rows r;
    ELSE
        SELECT (SELECT array_agg(to_jsonb(r)) FROM old_rows r), (SELECT array_agg(to_jsonb(r)) FROM new_rows r)
        INTO olds, news;
    END IF;
    IF olds IS NULL AND news IS NULL THEN
        RETURN NULL;
    END IF;
    IF policy <> 'merge' AND coalesce(cardinality(olds), 0) <= 1 AND coalesce(cardinality(news), 0) <= 1 THEN
        k := CASE WHEN single THEN coalesce(news[1], olds[1]) ->> keys[1]
                  ELSE reconciler.capture_key_text(coalesce(news[1], olds[1]), keys) END;
        old_k := CASE WHEN single THEN olds[1] ->> keys[1] ELSE reconciler.capture_key_text(olds[1], keys) END;
        -- a one-row UPDATE that changed the key is a delete and an insert: the general path
        IF olds IS NULL OR news IS NULL OR k = old_k THEN
            PERFORM reconciler.capture_one(tname, policy, keys, single, k, olds[1], news[1]);
            RETURN NULL;
        END IF;
    END IF;

    -- per change its key text, old row and new row: deletes first, then updates, then
    -- inserts, each group by key (the order stamps are given in). Old and new rows are
    -- paired by key: a row whose key changed is a delete of the old key and an insert.
    SELECT array_agg(c.k ORDER BY c.o1, c.o2, c.k), array_agg(c.o ORDER BY c.o1, c.o2, c.k),
           array_agg(c.n ORDER BY c.o1, c.o2, c.k)
    INTO ks, olds, news
    FROM (SELECT coalesce(b.k, a.k) AS k, a.j AS o, b.j AS n, b.k IS NOT NULL AS o1, a.k IS NULL AS o2
          FROM (SELECT CASE WHEN single THEN u.j ->> keys[1] ELSE reconciler.capture_key_text(u.j, keys) END AS k,
                       u.j
                FROM unnest(olds) AS u(j)) a
          FULL JOIN (SELECT CASE WHEN single THEN u.j ->> keys[1] ELSE reconciler.capture_key_text(u.j, keys) END
                            AS k, u.j
                     FROM unnest(news) AS u(j)) b
              ON b.k = a.k) c;
    total := cardinality(ks);

    -- merge tables decide column by column, row by row
    IF policy = 'merge' THEN
        FOR i IN 1 .. total LOOP
            PERFORM reconciler.capture_write(tname, policy, keys, rules,
                                             CASE WHEN olds[i] IS NULL THEN 'insert'
                                                  WHEN news[i] IS NULL THEN 'delete' ELSE 'update' END,
                                             olds[i], news[i], rel_schema, rel_name);
        END LOOP;
        RETURN NULL;
    END IF;

    PERFORM pg_advisory_xact_lock(s.x) FROM (
        SELECT DISTINCT reconciler.key_lock_id(tname, u.k) AS x FROM unnest(ks) AS u(k) ORDER BY 1
    ) s;
    PERFORM set_config('reconciler.outbox_queued', 'on', true);
    -- the stamps are reserved inside this statement, after the key locks: no writer of
    -- these keys can commit between the metadata read here and the stamps over it
    WITH ch AS MATERIALIZED (
        SELECT u.n, u.k, CASE WHEN u.o IS NULL THEN 'insert' WHEN u.j IS NULL THEN 'delete' ELSE 'update' END AS op,
               u.j AS new_j,
               CASE WHEN single THEN jsonb_build_object(keys[1], coalesce(u.j, u.o) -> keys[1])
                    ELSE (SELECT jsonb_object_agg(c, coalesce(u.j, u.o) -> c) FROM unnest(keys) AS c) END AS key_obj
        FROM unnest(ks, olds, news) WITH ORDINALITY AS u(k, o, j, n)
    ), clock AS MATERIALIZED (
        SELECT reconciler.hlc_reserve(total) AS base, (SELECT region_id FROM reconciler.region) AS region
    ), ev AS MATERIALIZED (
        SELECT ch.n, ch.k, ch.op, ch.new_j, ch.key_obj, m.hlc AS prior, m.meta AS cur_meta,
               clock.base + ch.n - 1 AS stamp, clock.region
        -- one primary-key probe per change (OFFSET 0 keeps the planner from hashing all of row_meta)
        FROM ch CROSS JOIN clock
        LEFT JOIN LATERAL (SELECT x.hlc, x.meta FROM reconciler.row_meta x
                           WHERE x.table_name = tname AND x.row_key = ch.k OFFSET 0) m ON true
    ), meta_written AS (
        INSERT INTO reconciler.row_meta AS m (table_name, row_key, hlc, origin, deleted, meta, row_values)
        SELECT tname, ev.k, ev.stamp, ev.region, ev.op = 'delete',
               CASE WHEN policy = 'manual' THEN
                   CASE WHEN jsonb_typeof(ev.cur_meta -> 'resolution') = 'object'
                        THEN jsonb_build_object('resolution', ev.cur_meta -> 'resolution') ELSE '{}'::jsonb END
                   || CASE WHEN ev.prior IS NOT NULL THEN jsonb_build_object('prior', ev.prior) ELSE '{}'::jsonb END
               ELSE '{}'::jsonb END,
               CASE WHEN ev.op = 'delete' THEN '{}'::jsonb ELSE ev.new_j END
        FROM ev
        ON CONFLICT (table_name, row_key) DO UPDATE SET hlc = EXCLUDED.hlc, origin = EXCLUDED.origin,
            deleted = EXCLUDED.deleted, meta = EXCLUDED.meta, row_values = EXCLUDED.row_values
    ), written AS (
        INSERT INTO reconciler.outbox (id, aggregatetype, aggregateid, type, payload, origin, hlc, prior_hlc,
                                       operation)
        SELECT gen_random_uuid(), tname, ev.k, tname || '.' || ev.op,
               jsonb_build_object('key', ev.key_obj)
               || CASE WHEN ev.op = 'delete' THEN '{}'::jsonb ELSE jsonb_build_object('values', ev.new_j) END,
               ev.region, ev.stamp, ev.prior, ev.op
        FROM ev ORDER BY ev.n
        RETURNING position, origin
    )
    INSERT INTO reconciler.outbox_pending (position, origin) SELECT w.position, w.origin FROM written w;
    PERFORM set_config('reconciler.outbox_queued', '', true);
    RETURN NULL;
END
$$;

-- Statements capture queued itself are not queued (or checked) a second time.
DROP TRIGGER outbox_queue ON reconciler.outbox;
CREATE TRIGGER outbox_queue AFTER INSERT ON reconciler.outbox
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    WHEN (current_setting('reconciler.outbox_queued', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION reconciler.outbox_queue();
