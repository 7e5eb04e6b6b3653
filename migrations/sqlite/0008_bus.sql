-- The embedded event bus: a durable log with consumer groups, pending deliveries and a
-- dead-letter queue. Times are ms since the Unix epoch.
--
-- `bus_meta` holds the last sequence handed out. A publish locks this row for its whole
-- transaction and takes a block of sequences from it, so sequences increase in commit order
-- (a group's cursor never passes an event that commits later) and are never reused after
-- the events at the head of the log are deleted.
CREATE TABLE bus_meta (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq INTEGER NOT NULL
);
INSERT INTO bus_meta (id, last_seq) VALUES (1, 0);

CREATE TABLE bus_events (
    seq      INTEGER PRIMARY KEY,
    tenant   TEXT    NOT NULL,
    subject  TEXT    NOT NULL,
    id       TEXT    NOT NULL,
    payload  BLOB    NOT NULL,
    source   TEXT    NOT NULL,
    time_ms  INTEGER NOT NULL
);
-- Fetches, reads and replays walk one tenant's log in sequence order.
CREATE INDEX bus_events_by_tenant ON bus_events (tenant, seq);
-- Retention by age, reads by time range and `StartAt::TimeMs`.
CREATE INDEX bus_events_by_time ON bus_events (time_ms);

-- Event ids accepted within the dedupe window, and the sequence they were stored under.
CREATE TABLE bus_dedupe (
    tenant TEXT    NOT NULL,
    id     TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    at_ms  INTEGER NOT NULL,
    PRIMARY KEY (tenant, id)
) WITHOUT ROWID;
CREATE INDEX bus_dedupe_by_age ON bus_dedupe (at_ms);

-- Durable consumer groups. `cursor_seq`: every event up to it has been handed out (or
-- skipped as not matching). `backoff_ms` is a JSON array.
CREATE TABLE bus_consumers (
    consumer_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant         TEXT    NOT NULL,
    name           TEXT    NOT NULL,
    filter         TEXT    NOT NULL,
    ack_wait_ms    INTEGER NOT NULL,
    deliveries_max INTEGER NOT NULL,
    backoff_ms     TEXT    NOT NULL,
    pending_max    INTEGER NOT NULL,
    start          TEXT    NOT NULL,
    cursor_seq     INTEGER NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    UNIQUE (tenant, name)
);

-- Events of a group that were delivered and not yet acked, or wait for (re)delivery.
-- `delivery`: deliveries made so far (0: queued by a requeue or redrive); `outstanding`: the
-- current delivery awaits its ack (false: nacked or queued); `due_ms`: when it may be
-- delivered again (its ack deadline, the end of a nack delay, or the time it was queued);
-- `nonce` makes every delivery's token unique.
CREATE TABLE bus_pending (
    consumer_id INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    delivery    INTEGER NOT NULL,
    outstanding INTEGER NOT NULL,
    due_ms      INTEGER NOT NULL,
    nonce       INTEGER NOT NULL,
    PRIMARY KEY (consumer_id, seq)
) WITHOUT ROWID;
CREATE INDEX bus_pending_by_due ON bus_pending (consumer_id, due_ms);

-- Per-tenant counters: the last dead-letter id handed out.
CREATE TABLE bus_tenants (
    tenant           TEXT    PRIMARY KEY NOT NULL,
    dead_letter_last INTEGER NOT NULL
) WITHOUT ROWID;

-- Dead letters, with a copy of the event so they outlive the log's retention.
CREATE TABLE bus_dead_letters (
    tenant      TEXT    NOT NULL,
    id          INTEGER NOT NULL,
    consumer_id INTEGER NOT NULL,
    consumer    TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    event_id    TEXT    NOT NULL,
    subject     TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    source      TEXT    NOT NULL,
    time_ms     INTEGER NOT NULL,
    deliveries  INTEGER NOT NULL,
    reason      TEXT    NOT NULL,
    at_ms       INTEGER NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX bus_dead_letters_by_consumer ON bus_dead_letters (consumer_id, id);
