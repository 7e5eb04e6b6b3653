-- The bus relay marks each outbox row when it has published it; pending rows are found by a
-- partial index, so the relay's scan stays small however long the published history grows.
ALTER TABLE outbox ADD COLUMN published_at_ms BIGINT;
-- Events a client published while the bus was unreachable wait here too, under their own id.
ALTER TABLE outbox ADD COLUMN event_id TEXT;
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at_ms IS NULL;
CREATE INDEX outbox_published ON outbox (published_at_ms) WHERE published_at_ms IS NOT NULL;
