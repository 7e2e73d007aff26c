-- reconciler schema, version 2: what this region's sidecar last heard from each peer.
-- Written by the sidecar's heartbeat loop once per heartbeat interval, read by
-- `reconciler status`, so an operator sees the peers' view of a region even when
-- that region itself cannot be asked (its database is down).
--
-- One row per peer, overwritten in place: this is a view, not a history (the
-- history of decisions lives in lifecycle_log). `updated_at` says when this
-- region's sidecar last wrote its view: a stale `updated_at` means the observer
-- itself is gone and its opinion is old news.

CREATE TABLE reconciler.peer_heartbeat (
    peer          text PRIMARY KEY,
    -- local time the last heartbeat of `peer` arrived; NULL: never heard since start
    last_seen_at  timestamptz,
    -- the peer's wall clock and packed HLC stamp as it sent them
    peer_wall_ms  bigint,
    peer_hlc      bigint,
    -- smoothed (peer wall clock - local wall clock) in ms; positive: the peer is ahead
    skew_ms       double precision,
    -- the lifecycle state and epoch the peer reported about itself
    peer_state    text,
    peer_epoch    bigint,
    -- this region's verdict from silence: ACTIVE, SUSPECT or FAILED
    view_state    text CHECK (view_state IN ('ACTIVE', 'SUSPECT', 'FAILED')),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
