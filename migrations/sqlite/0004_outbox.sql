-- Events written in the same transaction as the state change that produced them (plugin
-- publishes today), for the bus relay to publish with the row id as the deduplication id.
CREATE TABLE outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant        TEXT    NOT NULL,
    subject       TEXT    NOT NULL,
    payload       BLOB    NOT NULL,
    source        TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL
);
