-- reconciler schema, version 3: maintained Merkle leaves.
--
-- Comparing two copies of a large table by full scan hashes every row on both
-- sides; maintained leaves keep, per replicated table, the digest (sum of row
-- hashes mod 2^64, row count) of every leaf bucket up to date as rows change, so
-- a comparison reads a few thousand leaf rows instead of hashing the table.
--
-- The leaves are kept as an INSERT-ONLY log of per-bucket deltas, written by
-- statement-level triggers (installed per table by `reconciler migrate`, see
-- reconciler/store/merkle_leaves.py) in the same transaction as the write. A
-- leaf is the sum of its deltas. Insert-only because a leaf row updated in place
-- would be a hot row: every writer touching a bucket would wait for the last one
-- to commit, and two transactions touching two buckets in opposite orders would
-- deadlock. Appending never waits; compaction folds the log back to one row per
-- bucket, atomically, so readers see the same sums before and after.
--
-- Row and key hashes are exactly those of the full-scan comparison
-- (reconciler/store/merkle_scan.py), so a leaf equals what a full scan computes
-- for its bucket and the two modes can check each other.

-- One row per table with maintained leaves: what its trigger hashes, so that a
-- comparison can tell leaves that still describe the table from stale ones (a
-- column added, dropped or retyped since they were built).
CREATE TABLE reconciler.merkle_leaf_table (
    table_id     serial  PRIMARY KEY,
    table_name   text    NOT NULL UNIQUE,
    schema_name  text    NOT NULL,
    key_columns  text[]  NOT NULL,
    -- the hashed columns, in hash order (code-point order of their names)
    columns      text[]  NOT NULL,
    -- 'name type-oid typmod' per column: the trigger stops maintaining the leaves
    -- as soon as the live table no longer matches this, instead of failing writes
    signature    text[]  NOT NULL,
    bits         integer NOT NULL CHECK (bits BETWEEN 1 AND 24),
    -- hash function, seeds and canonical settings the digests were computed with
    hash_version text    NOT NULL,
    -- expression index on the leaf bucket of the business table; NULL when the
    -- key's text is not immutable (e.g. a composite key), then leaf fetches scan
    index_name   text,
    built_at     timestamptz NOT NULL DEFAULT now()
);

-- The delta log, one partition per table (created by the installer), so that a
-- table's leaves are read and compacted without touching another table's.
CREATE TABLE reconciler.merkle_leaf_delta (
    table_id     integer NOT NULL,
    bucket       integer NOT NULL,
    -- sum of added minus removed row hashes, reduced mod 2^64 into bigint's range
    digest_delta bigint  NOT NULL,
    count_delta  bigint  NOT NULL
) PARTITION BY LIST (table_id);

-- A sum of hashes (numeric, unbounded) as the signed bigint with the same residue
-- mod 2^64. One expression, so the planner inlines it.
CREATE FUNCTION reconciler.merkle_wrap64(total numeric) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (mod(mod(total + 9223372036854775808, 18446744073709551616) + 18446744073709551616,
                18446744073709551616) - 9223372036854775808)::bigint
$$;

-- The leaves of every table as they stand (a bucket absent here is empty).
CREATE VIEW reconciler.merkle_leaves AS
SELECT t.table_name, d.bucket,
       reconciler.merkle_wrap64(sum(d.digest_delta)) AS digest,
       sum(d.count_delta)::bigint AS row_count,
       count(*) AS delta_rows
FROM reconciler.merkle_leaf_delta d
JOIN reconciler.merkle_leaf_table t USING (table_id)
GROUP BY t.table_name, d.bucket
HAVING sum(d.count_delta) <> 0 OR reconciler.merkle_wrap64(sum(d.digest_delta)) <> 0;

-- Fold a table's delta log into one row per bucket. Returns how many rows the log
-- shrank by (0 when it was skipped). Safe under concurrent writers: rows committed
-- after this statement's snapshot are not deleted and stay as they are, and the
-- fold commits atomically, so every reader sees the same sums before and after.
-- With min_rows > 0 it does nothing while the log holds fewer rows than that (the
-- check reads at most min_rows rows), which makes it cheap to call periodically.
-- A second compaction of the same table running at the same time returns 0 at
-- once instead of waiting to redo the same work.
CREATE FUNCTION reconciler.compact_merkle_leaves(p_table text, min_rows bigint DEFAULT 0) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    tid    integer;
    shrunk bigint;
BEGIN
    SELECT table_id INTO tid FROM reconciler.merkle_leaf_table WHERE table_name = p_table;
    IF tid IS NULL THEN
        RAISE EXCEPTION 'table % has no maintained Merkle leaves', p_table
            USING ERRCODE = 'undefined_object', HINT = 'run `reconciler migrate`';
    END IF;
    IF min_rows > 0 AND (SELECT count(*) FROM (SELECT 1 FROM reconciler.merkle_leaf_delta
                                               WHERE table_id = tid LIMIT min_rows) s) < min_rows THEN
        RETURN 0;
    END IF;
    IF NOT pg_try_advisory_xact_lock(71651087, tid) THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM reconciler.merkle_leaf_delta WHERE table_id = tid
        RETURNING bucket, digest_delta, count_delta
    ), kept AS (
        INSERT INTO reconciler.merkle_leaf_delta (table_id, bucket, digest_delta, count_delta)
        SELECT tid, bucket, reconciler.merkle_wrap64(sum(digest_delta)), sum(count_delta)
        FROM gone GROUP BY bucket
        HAVING sum(count_delta) <> 0 OR reconciler.merkle_wrap64(sum(digest_delta)) <> 0
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone) - (SELECT count(*) FROM kept) INTO shrunk;
    RETURN shrunk;
END
$$;
