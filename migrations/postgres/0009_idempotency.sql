-- Idempotency keys (the IETF `Idempotency-Key` header): one row per (scope, key), where the
-- scope names the authenticated caller and the tenant it acted in. Times are ms since the
-- Unix epoch.
--
-- Inserting the row is the lock: the primary key lets exactly one request, on any kernel
-- sharing this database, claim a key. While `status` is NULL the request is in flight (owned
-- by the execution `token`); a row still in flight after `locked_until_ms` belonged to a
-- kernel that stopped and may be claimed again. Once complete, the row keeps the response
-- (status, replayed headers as a JSON array of [name, value] pairs, body) until
-- `expires_at_ms`; kernels delete expired rows periodically and ignore them meanwhile.
CREATE TABLE idempotency_keys (
    scope           TEXT     NOT NULL,
    key             TEXT     NOT NULL,
    fingerprint     BYTEA    NOT NULL,
    token           UUID     NOT NULL,
    status          INTEGER,
    headers         TEXT,
    body            BYTEA,
    created_at_ms   BIGINT   NOT NULL,
    locked_until_ms BIGINT   NOT NULL,
    expires_at_ms   BIGINT   NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at_ms);
