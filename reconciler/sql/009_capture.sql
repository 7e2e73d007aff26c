-- reconciler schema, version 9: capture of writes in the database.
--
-- Triggers on each replicated table (installed per table by `reconciler
-- migrate`, see reconciler/store/capture.py) turn any INSERT, UPDATE or DELETE,
-- from any client, into what reconciler.outbox.write does from Python, in the
-- writer's own transaction: a stamp from reconciler.hlc_now(), the row's metadata
-- in reconciler.row_meta under the table's conflict policy, and an outbox row the
-- relay publishes. The functions here mirror reconciler/conflict.py for a local
-- write (the newest stamp of the region, so it always wins locally); the property
-- test tests/integration/test_capture.py holds the two to the same results.
--
-- Writes reconciler makes itself (apply, replay, repair, resolutions, the Python
-- helper) set the transaction-local setting reconciler.capture to 'off' around
-- their statement, so they are not captured a second time.
--
-- Locking. A captured write and the apply path must not both decide a key from
-- the same metadata, so both take the key's advisory lock before reading it. A
-- client's UPDATE or DELETE holds the business row's lock before any capture trigger
-- runs, so every reconciler path takes the business row lock first too
-- (reconciler.lock_keys), then the advisory lock: one order, no deadlock between
-- a single-row client transaction and apply. An INSERT of a new key has no row to
-- lock yet; its BEFORE trigger takes the advisory lock before the row exists.

CREATE TABLE reconciler.capture_table (
    table_name   text        PRIMARY KEY,
    schema_name  text        NOT NULL,
    key_columns  text[]      NOT NULL,
    policy       text        NOT NULL,
    field_rules  jsonb       NOT NULL DEFAULT '{}',
    -- locks the business rows of a text[] of row keys ($1), in key order
    lock_sql     text        NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- The per-key advisory lock id shared by every writer (reconciler.store.postgres.key_lock_id
-- computes the same number). Table names are plain identifiers, so '/' cannot be part of one.
CREATE FUNCTION reconciler.key_lock_id(p_table text, p_key text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ('x' || substr(md5(p_table || '/' || p_key), 1, 16))::bit(64)::bigint
$$;

-- Reserve n consecutive stamps, returning the first: after every stamp issued or
-- observed before, never behind physical time. One clock step for a whole captured
-- statement instead of one per row (hlc_advance's lock and subtransaction).
CREATE FUNCTION reconciler.hlc_reserve(n integer) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    first bigint := reconciler.hlc_advance(reconciler.physical_hlc());
BEGIN
    IF n > 1 THEN
        PERFORM reconciler.hlc_advance(first + n - 1);
    END IF;
    RETURN first;
END
$$;

-- Lock the business rows (captured tables) and then the advisory locks of a set of keys.
CREATE FUNCTION reconciler.lock_keys(p_tables text[], p_keys text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT c.lock_sql, array_agg(DISTINCT u.k) AS keys
        FROM unnest(p_tables, p_keys) AS u(t, k)
        JOIN reconciler.capture_table c ON c.table_name = u.t
        GROUP BY c.table_name, c.lock_sql ORDER BY c.table_name
    LOOP
        EXECUTE r.lock_sql USING r.keys;
    END LOOP;
    PERFORM pg_advisory_xact_lock(s.x) FROM (
        SELECT DISTINCT reconciler.key_lock_id(u.t, u.k) AS x FROM unnest(p_tables, p_keys) AS u(t, k) ORDER BY 1
    ) s;
END
$$;

-- JSON text as Python's json.dumps writes it (ASCII only): PostgreSQL escapes the
-- same control characters the same way but leaves other characters raw.
CREATE FUNCTION reconciler.json_ascii(p text) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    out text := '';
    ch text;
    cp integer;
BEGIN
    IF p !~ '[^ -~]' THEN
        RETURN p;
    END IF;
    FOREACH ch IN ARRAY regexp_split_to_array(p, '') LOOP
        cp := ascii(ch);
        IF cp BETWEEN 32 AND 126 THEN
            out := out || ch;
        ELSIF cp > 65535 THEN
            cp := cp - 65536;
            out := out || '\u' || lpad(to_hex(55296 + (cp >> 10)), 4, '0')
                       || '\u' || lpad(to_hex(56320 + (cp & 1023)), 4, '0');
        ELSE
            out := out || '\u' || lpad(to_hex(cp), 4, '0');
        END IF;
    END LOOP;
    RETURN out;
END
$$;

-- The canonical key text (outbox aggregateid, row_meta.row_key) of a row, as
-- reconciler.model.encode_key writes it: one column, its text; several, a compact
-- JSON array whose strings are jsonb's own text (non-ASCII kept, control characters
-- escaped, as Python's json.dumps with ensure_ascii=False). Capture accepts only key
-- types whose jsonb text is already canonical (text, integers, uuid).
CREATE FUNCTION reconciler.capture_key_text(p_row jsonb, p_cols text[]) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN cardinality(p_cols) = 1 THEN p_row ->> p_cols[1]
           ELSE '[' || (SELECT string_agg((p_row -> c)::text, ',' ORDER BY o)
                        FROM unnest(p_cols) WITH ORDINALITY AS u(c, o)) || ']' END
$$;

-- Stamps are [packed hlc, origin], ordered by hlc then origin (code-point order,
-- as Python compares strings). -1, 0, 1; NULL (or JSON null) sorts first.
CREATE FUNCTION reconciler.capture_cmp(a jsonb, b jsonb) RETURNS integer
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    ah bigint;
    bh bigint;
BEGIN
    IF a IS NULL OR jsonb_typeof(a) = 'null' THEN
        RETURN CASE WHEN b IS NULL OR jsonb_typeof(b) = 'null' THEN 0 ELSE -1 END;
    END IF;
    IF b IS NULL OR jsonb_typeof(b) = 'null' THEN
        RETURN 1;
    END IF;
    ah := (a ->> 0)::bigint;
    bh := (b ->> 0)::bigint;
    IF ah <> bh THEN
        RETURN CASE WHEN ah < bh THEN -1 ELSE 1 END;
    END IF;
    IF (a ->> 1) COLLATE "C" < (b ->> 1) COLLATE "C" THEN
        RETURN -1;
    ELSIF (a ->> 1) COLLATE "C" > (b ->> 1) COLLATE "C" THEN
        RETURN 1;
    END IF;
    RETURN 0;
END
$$;

-- Set element text as conflict._elem_key writes it (JSON object key in the metadata).
CREATE FUNCTION reconciler.capture_elem_key(e jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT reconciler.json_ascii(e::text)
$$;

-- conflict._order_key: numbers before strings, numbers by value, strings by code point.
CREATE FUNCTION reconciler.capture_order_cmp(a jsonb, b jsonb) RETURNS integer
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF jsonb_typeof(a) <> jsonb_typeof(b) THEN
        RETURN CASE WHEN jsonb_typeof(a) = 'number' THEN -1 ELSE 1 END;
    END IF;
    IF jsonb_typeof(a) = 'number' THEN
        RETURN sign((a #>> '{}')::numeric - (b #>> '{}')::numeric)::integer;
    END IF;
    IF (a #>> '{}') COLLATE "C" < (b #>> '{}') COLLATE "C" THEN
        RETURN -1;
    ELSIF (a #>> '{}') COLLATE "C" > (b #>> '{}') COLLATE "C" THEN
        RETURN 1;
    END IF;
    RETURN 0;
END
$$;

-- conflict._add_numbers: an exact sum, an integer when integral, else decimal text.
CREATE FUNCTION reconciler.capture_add(total jsonb, delta numeric) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    s numeric := coalesce((total #>> '{}')::numeric, 0) + delta;
BEGIN
    IF s = trunc(s) THEN
        RETURN to_jsonb(trunc(s));
    END IF;
    RETURN to_jsonb(trim_scale(s)::text);
END
$$;

CREATE FUNCTION reconciler.capture_scalar(p_table text, p_column text, e jsonb, what text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF jsonb_typeof(e) NOT IN ('string', 'number') THEN
        RAISE EXCEPTION 'reconciler capture: % of column %.% must be strings or finite numbers, got %',
            what, p_table, p_column, e::text
            USING ERRCODE = 'RC003', HINT = 'the merge policy keeps set elements and max/min values as JSON scalars';
    END IF;
END
$$;

-- An empty per-column merge state (conflict._fresh_field), or the stored one,
-- refused when it was built under another rule.
CREATE FUNCTION reconciler.capture_slot(p_table text, p_column text, entry jsonb, rule text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF entry IS NULL THEN
        RETURN CASE rule
            WHEN 'lww' THEN '{"rule": "lww", "at": null, "value": null}'::jsonb
            WHEN 'counter' THEN '{"rule": "counter", "by_origin": {}}'::jsonb
            WHEN 'set' THEN '{"rule": "set", "add": {}, "remove": {}}'::jsonb
            ELSE jsonb_build_object('rule', rule, 'value', NULL) END;
    END IF;
    IF entry ->> 'rule' IS DISTINCT FROM rule THEN
        RAISE EXCEPTION 'reconciler capture: column %.% has merge rule % but its stored state was built as %',
            p_table, p_column, rule, entry ->> 'rule' USING ERRCODE = 'RC003';
    END IF;
    RETURN entry;
END
$$;

CREATE FUNCTION reconciler.capture_stamp_element(stamps jsonb, e jsonb, stamp jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    k text := reconciler.capture_elem_key(e);
BEGIN
    IF reconciler.capture_cmp(stamps -> k, stamp) < 0 THEN
        RETURN jsonb_set(stamps, ARRAY[k], stamp);
    END IF;
    RETURN stamps;
END
$$;

-- conflict._adopt: metadata for a row that has none (registered when capture was
-- installed, or written under another policy): its values become one write at its stamp.
CREATE FUNCTION reconciler.capture_adopt(
    p_table text, cur_hlc bigint, cur_origin text, cur_deleted boolean, cur_values jsonb,
    p_rules jsonb, p_keys text[], p_key jsonb
) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    at jsonb := jsonb_build_array(cur_hlc, cur_origin);
    meta jsonb := jsonb_build_object('key', p_key, 'write', NULL, 'delete', NULL, 'fields', '{}'::jsonb);
    col text;
    val jsonb;
    rule text;
    entry jsonb;
    e jsonb;
BEGIN
    IF cur_deleted THEN
        RETURN jsonb_set(meta, '{delete}', at);
    END IF;
    meta := jsonb_set(meta, '{write}', at);
    FOR col, val IN SELECT key, value FROM jsonb_each(cur_values) LOOP
        CONTINUE WHEN col = ANY(p_keys);
        rule := coalesce(p_rules ->> col, 'lww');
        entry := reconciler.capture_slot(p_table, col, NULL, rule);
        IF rule = 'lww' THEN
            entry := entry || jsonb_build_object('at', at, 'value', val);
        ELSIF rule = 'counter' THEN
            IF jsonb_typeof(val) <> 'null' THEN
                IF jsonb_typeof(val) <> 'number' THEN
                    RAISE EXCEPTION 'reconciler capture: existing counter value of %.% is not a number', p_table, col
                        USING ERRCODE = 'RC003';
                END IF;
                entry := jsonb_set(entry, ARRAY['by_origin', cur_origin],
                                   reconciler.capture_add(NULL, (val #>> '{}')::numeric));
            END IF;
        ELSIF rule = 'set' THEN
            IF jsonb_typeof(val) <> 'null' THEN
                IF jsonb_typeof(val) <> 'array' THEN
                    RAISE EXCEPTION 'reconciler capture: existing set value of %.% is not a JSON array', p_table, col
                        USING ERRCODE = 'RC003';
                END IF;
                FOR e IN SELECT value FROM jsonb_array_elements(val) LOOP
                    PERFORM reconciler.capture_scalar(p_table, col, e, 'set elements');
                    entry := jsonb_set(entry, '{add}', reconciler.capture_stamp_element(entry -> 'add', e, at));
                END LOOP;
            END IF;
        ELSE
            entry := jsonb_set(entry, '{value}', val);
        END IF;
        meta := jsonb_set(meta, ARRAY['fields', col], entry);
    END LOOP;
    RETURN meta;
END
$$;

-- conflict._merge_meta for one event (payload as outbox.write writes it).
CREATE FUNCTION reconciler.capture_merge_meta(
    p_table text, cur_found boolean, cur_hlc bigint, cur_origin text, cur_deleted boolean, cur_meta jsonb,
    cur_values jsonb, p_rules jsonb, p_keys text[], p_op text, p_payload jsonb, p_hlc bigint, p_origin text
) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    old jsonb := CASE WHEN cur_found THEN cur_meta ELSE '{}'::jsonb END;
    meta jsonb;
    fields jsonb;
    stamp jsonb := jsonb_build_array(p_hlc, p_origin);
    top jsonb;
    col text;
    val jsonb;
    rule text;
    entry jsonb;
    e jsonb;
    member text;
BEGIN
    IF cur_found AND NOT (old ? 'write') AND NOT (old ? 'delete') THEN
        old := reconciler.capture_adopt(p_table, cur_hlc, cur_origin, cur_deleted, cur_values, p_rules, p_keys,
                                        p_payload -> 'key');
    END IF;
    meta := jsonb_build_object('key', coalesce(old -> 'key', 'null'), 'write', coalesce(old -> 'write', 'null'),
                               'delete', coalesce(old -> 'delete', 'null'), 'fields', coalesce(old -> 'fields', '{}'));
    top := CASE WHEN reconciler.capture_cmp(meta -> 'write', meta -> 'delete') >= 0
                THEN meta -> 'write' ELSE meta -> 'delete' END;
    IF reconciler.capture_cmp(top, stamp) < 0 THEN
        meta := jsonb_set(meta, '{key}', p_payload -> 'key');
    END IF;
    IF p_op = 'delete' THEN
        IF reconciler.capture_cmp(meta -> 'delete', stamp) < 0 THEN
            meta := jsonb_set(meta, '{delete}', stamp);
        END IF;
        RETURN meta;
    END IF;
    IF reconciler.capture_cmp(meta -> 'write', stamp) < 0 THEN
        meta := jsonb_set(meta, '{write}', stamp);
    END IF;
    fields := meta -> 'fields';
    FOR col, val IN SELECT key, value FROM jsonb_each(coalesce(p_payload -> 'values', '{}')) LOOP
        CONTINUE WHEN col = ANY(p_keys);
        rule := coalesce(p_rules ->> col, 'lww');
        entry := reconciler.capture_slot(p_table, col, fields -> col, rule);
        IF rule = 'lww' THEN
            IF reconciler.capture_cmp(entry -> 'at', stamp) < 0 THEN
                entry := entry || jsonb_build_object('at', stamp, 'value', val);
            END IF;
        ELSIF rule = 'counter' THEN
            IF jsonb_typeof(val) <> 'null' THEN
                IF jsonb_typeof(val) <> 'number' THEN
                    RAISE EXCEPTION 'reconciler capture: counter column %.% holds %, not a number', p_table, col, val
                        USING ERRCODE = 'RC003';
                END IF;
                entry := jsonb_set(entry, ARRAY['by_origin', p_origin],
                                   reconciler.capture_add(entry -> 'by_origin' -> p_origin, (val #>> '{}')::numeric));
            END IF;
        ELSIF rule = 'set' THEN
            IF jsonb_typeof(val) <> 'null' THEN
                IF jsonb_typeof(val) <> 'array' THEN
                    RAISE EXCEPTION 'reconciler capture: set column %.% holds %, not a JSON array', p_table, col, val
                        USING ERRCODE = 'RC003';
                END IF;
                FOR e IN SELECT value FROM jsonb_array_elements(val) LOOP
                    PERFORM reconciler.capture_scalar(p_table, col, e, 'set elements');
                    entry := jsonb_set(entry, '{add}', reconciler.capture_stamp_element(entry -> 'add', e, stamp));
                END LOOP;
            END IF;
        ELSIF jsonb_typeof(val) <> 'null' THEN
            PERFORM reconciler.capture_scalar(p_table, col, val, rule || ' values');
            IF jsonb_typeof(entry -> 'value') = 'null'
               OR (rule = 'max' AND reconciler.capture_order_cmp(val, entry -> 'value') > 0)
               OR (rule = 'min' AND reconciler.capture_order_cmp(val, entry -> 'value') < 0) THEN
                entry := jsonb_set(entry, '{value}', val);
            END IF;
        END IF;
        fields := jsonb_set(fields, ARRAY[col], entry);
    END LOOP;
    FOR col, val IN SELECT key, value FROM jsonb_each(coalesce(p_payload -> 'deltas', '{}')) LOOP
        entry := reconciler.capture_slot(p_table, col, fields -> col, 'counter');
        entry := jsonb_set(entry, ARRAY['by_origin', p_origin],
                           reconciler.capture_add(entry -> 'by_origin' -> p_origin, (val #>> '{}')::numeric));
        fields := jsonb_set(fields, ARRAY[col], entry);
    END LOOP;
    FOREACH member IN ARRAY ARRAY['add', 'remove'] LOOP
        FOR col, val IN SELECT key, value FROM jsonb_each(coalesce(p_payload -> ('set_' || member), '{}')) LOOP
            entry := reconciler.capture_slot(p_table, col, fields -> col, 'set');
            FOR e IN SELECT value FROM jsonb_array_elements(val) LOOP
                entry := jsonb_set(entry, ARRAY[member], reconciler.capture_stamp_element(entry -> member, e, stamp));
            END LOOP;
            fields := jsonb_set(fields, ARRAY[col], entry);
        END LOOP;
    END LOOP;
    RETURN jsonb_set(meta, '{fields}', fields);
END
$$;

-- conflict._render: the visible row and its stamp, a function of the metadata.
CREATE FUNCTION reconciler.capture_render(
    meta jsonb, OUT row_values jsonb, OUT hlc bigint, OUT origin text, OUT deleted boolean
) LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    w jsonb := meta -> 'write';
    d jsonb := meta -> 'delete';
    top jsonb;
    col text;
    entry jsonb;
    v jsonb;
    total numeric;
BEGIN
    top := CASE WHEN reconciler.capture_cmp(w, d) >= 0 THEN w ELSE d END;
    hlc := (top ->> 0)::bigint;
    origin := top ->> 1;
    deleted := NOT coalesce(jsonb_typeof(w) = 'array' AND reconciler.capture_cmp(w, d) > 0, false);
    row_values := '{}';
    IF deleted THEN
        RETURN;
    END IF;
    IF jsonb_typeof(d) <> 'array' THEN
        d := NULL;
    END IF;
    FOR col, entry IN SELECT key, value FROM jsonb_each(meta -> 'fields') LOOP
        IF entry ->> 'rule' = 'lww' THEN
            v := CASE WHEN jsonb_typeof(entry -> 'at') = 'array' AND (d IS NULL OR reconciler.capture_cmp(entry -> 'at', d) > 0)
                      THEN entry -> 'value' ELSE 'null' END;
        ELSIF entry ->> 'rule' = 'counter' THEN
            SELECT coalesce(sum((p.value #>> '{}')::numeric), 0) INTO total FROM jsonb_each(entry -> 'by_origin') p;
            v := CASE WHEN total = trunc(total) THEN to_jsonb(trunc(total)) ELSE to_jsonb(total::float8) END;
        ELSIF entry ->> 'rule' = 'set' THEN
            SELECT coalesce(jsonb_agg(x.e ORDER BY jsonb_typeof(x.e),
                                      CASE WHEN jsonb_typeof(x.e) = 'number' THEN (x.e #>> '{}')::numeric END,
                                      (x.e #>> '{}') COLLATE "C"), '[]')
            INTO v
            FROM (SELECT a.key::jsonb AS e FROM jsonb_each(entry -> 'add') a
                  WHERE (d IS NULL OR reconciler.capture_cmp(a.value, d) > 0)
                    AND (NOT (entry -> 'remove') ? a.key
                         OR reconciler.capture_cmp(a.value, entry -> 'remove' -> a.key) >= 0)) x;
        ELSE
            v := entry -> 'value';
        END IF;
        row_values := row_values || jsonb_build_object(col, v);
    END LOOP;
    row_values := row_values || (meta -> 'key');
END
$$;

-- One captured change of one row: what reconciler.outbox.write does for it. Called
-- by capture_statement, whose owner's rights and pinned search_path it runs with (no
-- SET clause of its own: each one costs a save and restore of settings per row).
CREATE FUNCTION reconciler.capture_write(
    p_table text, p_policy text, p_keys text[], p_rules jsonb, p_op text, p_old jsonb, p_new jsonb,
    p_schema text, p_relname text
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    row_j jsonb := coalesce(p_new, p_old);
    key_obj jsonb;
    key_text text;
    cur record;
    found_cur boolean;
    region text;
    stamp bigint;
    prior bigint;
    payload jsonb;
    changed jsonb := '{}';
    deltas jsonb := '{}';
    adds jsonb := '{}';
    removes jsonb := '{}';
    col text;
    rule text;
    o jsonb;
    n jsonb;
    delta numeric;
    meta jsonb := '{}';
    vals jsonb;
    st_hlc bigint;
    st_origin text;
    del boolean;
    r record;
    agg jsonb;
    flag text;
BEGIN
    SELECT jsonb_object_agg(c, row_j -> c) INTO key_obj FROM unnest(p_keys) AS c;
    key_text := reconciler.capture_key_text(row_j, p_keys);
    PERFORM pg_advisory_xact_lock(reconciler.key_lock_id(p_table, key_text));
    SELECT m.hlc, m.origin, m.deleted, m.meta, m.row_values INTO cur
        FROM reconciler.row_meta m WHERE m.table_name = p_table AND m.row_key = key_text;
    found_cur := FOUND;
    SELECT region_id INTO region FROM reconciler.region;
    stamp := reconciler.hlc_now();
    prior := CASE WHEN found_cur THEN cur.hlc END;

    payload := jsonb_build_object('key', key_obj);
    IF p_op <> 'delete' THEN
        IF p_policy <> 'merge' OR p_op = 'insert' THEN
            payload := payload || jsonb_build_object('values', p_new);
        ELSE
            -- a merge table records what changed: lww/max/min columns whose value
            -- changed, counters as the delta NEW - OLD, sets as elements added/removed
            FOR col IN SELECT jsonb_object_keys(p_new) LOOP
                CONTINUE WHEN col = ANY(p_keys);
                rule := coalesce(p_rules ->> col, 'lww');
                o := p_old -> col;
                n := p_new -> col;
                CONTINUE WHEN n IS NOT DISTINCT FROM o;
                IF rule = 'counter' THEN
                    delta := coalesce((n #>> '{}')::numeric, 0) - coalesce((o #>> '{}')::numeric, 0);
                    IF delta <> 0 THEN
                        deltas := deltas || jsonb_build_object(col, delta);
                    END IF;
                ELSIF rule = 'set' THEN
                    IF jsonb_typeof(coalesce(n, 'null')) NOT IN ('array', 'null') THEN
                        RAISE EXCEPTION 'reconciler capture: set column %.% must hold a JSON array, got %',
                            p_table, col, n USING ERRCODE = 'RC003';
                    END IF;
                    SELECT jsonb_agg(x.e ORDER BY jsonb_typeof(x.e),
                                     CASE WHEN jsonb_typeof(x.e) = 'number' THEN (x.e #>> '{}')::numeric END,
                                     (x.e #>> '{}') COLLATE "C") INTO agg
                        FROM (SELECT DISTINCT ON (reconciler.capture_elem_key(a.value)) a.value AS e
                              FROM jsonb_array_elements(CASE WHEN jsonb_typeof(n) = 'array' THEN n ELSE '[]' END) a
                              WHERE reconciler.capture_elem_key(a.value) NOT IN (
                                  SELECT reconciler.capture_elem_key(b.value) FROM jsonb_array_elements(
                                      CASE WHEN jsonb_typeof(o) = 'array' THEN o ELSE '[]' END) b)) x;
                    IF agg IS NOT NULL THEN
                        adds := adds || jsonb_build_object(col, agg);
                    END IF;
                    SELECT jsonb_agg(x.e ORDER BY jsonb_typeof(x.e),
                                     CASE WHEN jsonb_typeof(x.e) = 'number' THEN (x.e #>> '{}')::numeric END,
                                     (x.e #>> '{}') COLLATE "C") INTO agg
                        FROM (SELECT DISTINCT ON (reconciler.capture_elem_key(a.value)) a.value AS e
                              FROM jsonb_array_elements(CASE WHEN jsonb_typeof(o) = 'array' THEN o ELSE '[]' END) a
                              WHERE reconciler.capture_elem_key(a.value) NOT IN (
                                  SELECT reconciler.capture_elem_key(b.value) FROM jsonb_array_elements(
                                      CASE WHEN jsonb_typeof(n) = 'array' THEN n ELSE '[]' END) b)) x;
                    IF agg IS NOT NULL THEN
                        removes := removes || jsonb_build_object(col, agg);
                    END IF;
                ELSE
                    changed := changed || jsonb_build_object(col, n);
                END IF;
            END LOOP;
            payload := payload || jsonb_build_object('values', changed || key_obj);
            IF deltas <> '{}' THEN
                payload := payload || jsonb_build_object('deltas', deltas);
            END IF;
            IF adds <> '{}' THEN
                payload := payload || jsonb_build_object('set_add', adds);
            END IF;
            IF removes <> '{}' THEN
                payload := payload || jsonb_build_object('set_remove', removes);
            END IF;
        END IF;
    END IF;

    IF p_policy = 'merge' THEN
        meta := reconciler.capture_merge_meta(p_table, found_cur, cur.hlc, cur.origin, cur.deleted, cur.meta,
                                              cur.row_values, p_rules, p_keys, p_op, payload, stamp, region);
        SELECT * INTO r FROM reconciler.capture_render(meta);
        vals := r.row_values;
        st_hlc := r.hlc;
        st_origin := r.origin;
        del := r.deleted;
    ELSE
        IF p_policy = 'manual' THEN
            -- conflict.ManualPolicy: the operator's last decision stays, and the stamp
            -- this writer saw tells a late-arriving ancestor from a concurrent write
            IF found_cur AND jsonb_typeof(cur.meta -> 'resolution') = 'object' THEN
                meta := jsonb_build_object('resolution', cur.meta -> 'resolution');
            END IF;
            IF prior IS NOT NULL THEN
                meta := meta || jsonb_build_object('prior', prior);
            END IF;
        END IF;
        st_hlc := stamp;
        st_origin := region;
        del := p_op = 'delete';
        vals := CASE WHEN del THEN '{}'::jsonb ELSE p_new END;
    END IF;

    INSERT INTO reconciler.row_meta AS m (table_name, row_key, hlc, origin, deleted, meta, row_values)
    VALUES (p_table, key_text, st_hlc, st_origin, del, meta, vals)
    ON CONFLICT (table_name, row_key) DO UPDATE SET hlc = EXCLUDED.hlc, origin = EXCLUDED.origin,
        deleted = EXCLUDED.deleted, meta = EXCLUDED.meta, row_values = EXCLUDED.row_values;
    INSERT INTO reconciler.outbox (id, aggregatetype, aggregateid, type, payload, origin, hlc, prior_hlc, operation)
    VALUES (gen_random_uuid(), p_table, key_text, p_table || '.' || p_op, payload, region, stamp, prior, p_op);

    -- merge rules can make the row differ from what the client wrote (a max that
    -- did not rise, a set in canonical order, a counter re-created after a delete):
    -- the row becomes what the metadata says, as the Python helper writes it
    IF p_policy = 'merge' AND NOT del
       AND EXISTS (SELECT 1 FROM jsonb_each(vals) v WHERE p_new -> v.key IS DISTINCT FROM v.value) THEN
        flag := current_setting('reconciler.capture', true);
        PERFORM set_config('reconciler.capture', 'off', true);
        EXECUTE format('UPDATE %I.%I AS t SET %s FROM jsonb_populate_record(NULL::%I.%I, $1) AS r WHERE %s',
                       p_schema, p_relname,
                       (SELECT string_agg(format('%I = r.%I', k, k), ', ') FROM jsonb_object_keys(vals) k
                        WHERE NOT k = ANY(p_keys)),
                       p_schema, p_relname,
                       (SELECT string_agg(format('t.%I = r.%I', k, k), ' AND ') FROM unnest(p_keys) k))
            USING p_new || vals;
        PERFORM set_config('reconciler.capture', coalesce(flag, ''), true);
    END IF;
END
$$;

-- BEFORE INSERT: a new key has no row to lock, so its advisory lock is taken
-- before the row (and its unique index entry) exists, in the order apply takes it.
-- A key the metadata says is live is an upsert's update path or a duplicate: the
-- row lock comes first there, and the AFTER trigger takes the advisory lock.
CREATE FUNCTION reconciler.capture_lock_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    key_text text;
BEGIN
    IF current_setting('reconciler.capture', true) = 'off' THEN
        RETURN NEW;
    END IF;
    key_text := reconciler.capture_key_text(to_jsonb(NEW), TG_ARGV[2]::text[]);
    IF NOT EXISTS (SELECT 1 FROM reconciler.row_meta
                   WHERE table_name = TG_ARGV[0] AND row_key = key_text AND NOT deleted) THEN
        PERFORM pg_advisory_xact_lock(reconciler.key_lock_id(TG_ARGV[0], key_text));
    END IF;
    RETURN NEW;
END
$$;

-- TRUNCATE cannot be captured row by row: refused unless capture is off on purpose.
CREATE FUNCTION reconciler.capture_refuse_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('reconciler.capture', true) = 'off' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'TRUNCATE of replicated table %.% would not reach the other regions', TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'RC003',
              HINT = 'DELETE the rows instead, or SET LOCAL reconciler.capture = off to empty this region''s copy only';
END
$$;

-- The capture triggers proper: AFTER INSERT / UPDATE / DELETE, once per statement,
-- with the statement's rows in transition tables. A multi-row statement (or COPY)
-- is captured in a handful of set-based statements on lww and manual tables: the
-- key locks in one sorted pass, the current metadata in one join, the metadata and
-- the outbox rows in one insert each. Merge tables decide row by row
-- (capture_write), since their metadata is built column by column.
-- An UPDATE's old and new rows are paired by key: a row whose key changed is a
-- delete of the old key and an insert of the new one.
CREATE FUNCTION reconciler.capture_statement() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
    changes jsonb;
    chg record;
    region text;
    base bigint;
BEGIN
    IF current_setting('reconciler.capture', true) = 'off' THEN
        RETURN NULL;
    END IF;
    -- [key text, operation, old row, new row] per change, deletes first, then by key
    IF TG_OP = 'INSERT' THEN
        SELECT jsonb_agg(jsonb_build_array(c.k, 'insert', NULL, c.j) ORDER BY c.k) INTO changes
        FROM (SELECT CASE WHEN single THEN x.j ->> keys[1] ELSE reconciler.capture_key_text(x.j, keys) END AS k, x.j FROM (SELECT to_jsonb(r) AS j FROM new_rows r) x) c;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT jsonb_agg(jsonb_build_array(c.k, 'delete', c.j, NULL) ORDER BY c.k) INTO changes
        FROM (SELECT CASE WHEN single THEN x.j ->> keys[1] ELSE reconciler.capture_key_text(x.j, keys) END AS k, x.j FROM (SELECT to_jsonb(r) AS j FROM old_rows r) x) c;
    ELSE
        SELECT jsonb_agg(jsonb_build_array(coalesce(n.k, o.k),
                                           CASE WHEN o.k IS NULL THEN 'insert' WHEN n.k IS NULL THEN 'delete'
                                                ELSE 'update' END, o.j, n.j)
                         ORDER BY (n.k IS NOT NULL), (o.k IS NULL), coalesce(n.k, o.k)) INTO changes
        FROM (SELECT CASE WHEN single THEN x.j ->> keys[1] ELSE reconciler.capture_key_text(x.j, keys) END AS k, x.j FROM (SELECT to_jsonb(r) AS j FROM old_rows r) x) o
        FULL JOIN (SELECT CASE WHEN single THEN x.j ->> keys[1] ELSE reconciler.capture_key_text(x.j, keys) END AS k, x.j FROM (SELECT to_jsonb(r) AS j FROM new_rows r) x) n
            ON n.k = o.k;
    END IF;
    IF changes IS NULL THEN
        RETURN NULL;
    END IF;
    -- merge tables decide column by column, row by row; a statement of a few rows
    -- costs less row by row too (the set-based statements below are planned per call)
    IF policy = 'merge' OR jsonb_array_length(changes) < 8 THEN
        FOR chg IN SELECT e ->> 0 AS k, e ->> 1 AS op, e -> 2 AS old_j, e -> 3 AS new_j
                  FROM jsonb_array_elements(changes) AS e LOOP
            PERFORM reconciler.capture_write(tname, policy, keys, rules, chg.op,
                                             CASE WHEN jsonb_typeof(chg.old_j) = 'object' THEN chg.old_j END,
                                             CASE WHEN jsonb_typeof(chg.new_j) = 'object' THEN chg.new_j END,
                                             rel_schema, rel_name);
        END LOOP;
        RETURN NULL;
    END IF;

    PERFORM pg_advisory_xact_lock(s.x) FROM (
        SELECT DISTINCT reconciler.key_lock_id(tname, e ->> 0) AS x FROM jsonb_array_elements(changes) AS e ORDER BY 1
    ) s;
    SELECT region_id INTO region FROM reconciler.region;
    base := reconciler.hlc_reserve(jsonb_array_length(changes));
    WITH ch AS MATERIALIZED (
        SELECT e.ordinality AS n, e.value ->> 0 AS k, e.value ->> 1 AS op, e.value -> 3 AS new_j,
               (SELECT jsonb_object_agg(c, coalesce(nullif(e.value -> 3, 'null'), e.value -> 2) -> c)
                FROM unnest(keys) AS c) AS key_obj
        FROM jsonb_array_elements(changes) WITH ORDINALITY AS e
    ), ev AS MATERIALIZED (
        SELECT ch.n, ch.k, ch.op, ch.new_j, ch.key_obj, m.hlc AS prior, m.meta AS cur_meta,
               base + ch.n - 1 AS stamp
        -- one primary-key probe per change (OFFSET 0 keeps the planner from hashing all of row_meta)
        FROM ch LEFT JOIN LATERAL (SELECT x.hlc, x.meta FROM reconciler.row_meta x
                                   WHERE x.table_name = tname AND x.row_key = ch.k OFFSET 0) m ON true
        ORDER BY ch.n
    ), meta_written AS (
        INSERT INTO reconciler.row_meta AS m (table_name, row_key, hlc, origin, deleted, meta, row_values)
        SELECT tname, ev.k, ev.stamp, region, ev.op = 'delete',
               CASE WHEN policy = 'manual' THEN
                   CASE WHEN jsonb_typeof(ev.cur_meta -> 'resolution') = 'object'
                        THEN jsonb_build_object('resolution', ev.cur_meta -> 'resolution') ELSE '{}'::jsonb END
                   || CASE WHEN ev.prior IS NOT NULL THEN jsonb_build_object('prior', ev.prior) ELSE '{}'::jsonb END
               ELSE '{}'::jsonb END,
               CASE WHEN ev.op = 'delete' THEN '{}'::jsonb ELSE ev.new_j END
        FROM ev
        ON CONFLICT (table_name, row_key) DO UPDATE SET hlc = EXCLUDED.hlc, origin = EXCLUDED.origin,
            deleted = EXCLUDED.deleted, meta = EXCLUDED.meta, row_values = EXCLUDED.row_values
    )
    INSERT INTO reconciler.outbox (id, aggregatetype, aggregateid, type, payload, origin, hlc, prior_hlc, operation)
    SELECT gen_random_uuid(), tname, ev.k, tname || '.' || ev.op,
           jsonb_build_object('key', ev.key_obj)
           || CASE WHEN ev.op = 'delete' THEN '{}'::jsonb ELSE jsonb_build_object('values', ev.new_j) END,
           region, ev.stamp, ev.prior, ev.op
    FROM ev ORDER BY ev.n;
    RETURN NULL;
END
$$;
