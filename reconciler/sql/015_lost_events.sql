-- reconciler schema, version 15: events accepted as lost are never applied.
--
-- `reconciler accept-loss` records each sequence no source held any more as a
-- settled quarantine entry with reason 'lost'. A repair then joins the peers' merge
-- state into the region's rows, counters included, so the effect of those events
-- arrives by repair; if one of them turned up after all (a topic restored from a
-- backup), applying it too would count it twice. The inbox refuses them like
-- events below its floor, through this index (empty unless a loss was accepted).
CREATE INDEX quarantine_lost ON reconciler.quarantine (origin, sequence) WHERE reason = 'lost';
