-- Dispatched tasks and their attempts. Times are ms since the Unix epoch; ids are UUIDv7
-- stored as 16-byte blobs; request, input and output are JSON text.
--
-- One kernel drives a task at a time: the one named in `owner` while `lease_until_ms` lies in
-- the future. Kernels renew the leases of the tasks they drive and take over unfinished tasks
-- whose lease ran out (their kernel stopped).
CREATE TABLE tasks (
    id                 BLOB    PRIMARY KEY NOT NULL,
    tenant             TEXT    NOT NULL,
    status             TEXT    NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    request            TEXT    NOT NULL,
    input              TEXT    NOT NULL,
    attempt_timeout_ms INTEGER NOT NULL,
    attempts_max       INTEGER NOT NULL,
    deadline_at_ms     INTEGER NOT NULL,
    attempt            INTEGER NOT NULL,
    output             TEXT,
    error              TEXT,
    created_at_ms      INTEGER NOT NULL,
    updated_at_ms      INTEGER NOT NULL,
    finished_at_ms     INTEGER,
    owner              TEXT,
    lease_until_ms     INTEGER NOT NULL
);
CREATE INDEX tasks_by_tenant ON tasks (tenant, id);
CREATE INDEX tasks_by_tenant_status ON tasks (tenant, status, id);
CREATE INDEX tasks_unfinished_by_lease ON tasks (lease_until_ms) WHERE status IN ('queued', 'running');
CREATE INDEX tasks_finished ON tasks (finished_at_ms) WHERE finished_at_ms IS NOT NULL;

-- One row per attempt. A pull attempt that is neither delivered nor finished is in its agent's
-- queue. `answered`: the outcome is the agent's own answer; `late`: an answer came after the
-- attempt had ended or been superseded, and was discarded.
CREATE TABLE task_attempts (
    task_id         BLOB    NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt         INTEGER NOT NULL,
    tenant          TEXT    NOT NULL,
    agent_id        BLOB    NOT NULL,
    mode            TEXT    NOT NULL CHECK (mode IN ('push', 'pull')),
    started_at_ms   INTEGER NOT NULL,
    timeout_at_ms   INTEGER NOT NULL,
    delivered_at_ms INTEGER,
    finished_at_ms  INTEGER,
    outcome         TEXT    CHECK (outcome IN ('success', 'failure', 'timeout')),
    answered        INTEGER NOT NULL DEFAULT 0,
    error           TEXT,
    late            INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, attempt)
);
CREATE INDEX task_attempts_pull_queue ON task_attempts (agent_id, started_at_ms)
    WHERE delivered_at_ms IS NULL AND finished_at_ms IS NULL;
