-- The last anti-entropy result per replicated table and peer, written by this
-- region's sidecar after every pass, so that `reconciler status` can say that a
-- region which looks ACTIVE holds rows its peers do not. `peer` is the compared
-- peer, or '' for this region's own leaves checked against its rows (full scan).
CREATE TABLE reconciler.anti_entropy (
    table_name        text        NOT NULL,
    peer              text        NOT NULL,
    mode              text        NOT NULL,
    watermark_hlc     bigint,
    divergent_keys    bigint      NOT NULL DEFAULT 0,
    divergent_buckets bigint      NOT NULL DEFAULT 0,
    sample_keys       jsonb       NOT NULL DEFAULT '[]',
    checked_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, peer)
);
