-- reconciler schema, version 7: what a region accounts for of its own numbering,
-- and what a restore takes away.
--
-- Gap analysis used to count every own sequence up to the relay counter as held.
-- The counter says "never number at or below this again", not "these events are
-- here": recovery raises it past events it has not returned yet (they come back in
-- HLC order) and reserves numbers peers have seen, and a lost event hidden under
-- it was never reported. A region now holds exactly its outbox_sequence rows plus
-- the prefix retention pruned, recorded here (pruning always takes a prefix).
ALTER TABLE reconciler.relay_state ADD COLUMN pruned_through bigint NOT NULL DEFAULT 0;
UPDATE reconciler.relay_state r SET pruned_through = coalesce(
    (SELECT min(s.relay_sequence) - 1 FROM reconciler.outbox_sequence s WHERE s.origin = r.origin),
    r.published_through);
