-- Agents, their capabilities and labels, their lifecycle events, and API keys.
-- Times are milliseconds since the Unix epoch; ids are UUIDv7.

CREATE TABLE agents (
    id                   UUID    PRIMARY KEY,
    tenant               TEXT    NOT NULL,
    name                 TEXT    NOT NULL,
    endpoint             TEXT,
    labels               JSONB   NOT NULL,
    capabilities         JSONB   NOT NULL,
    status               TEXT    NOT NULL CHECK (status IN ('healthy', 'stale', 'zombie')),
    created_at_ms        BIGINT  NOT NULL,
    updated_at_ms        BIGINT  NOT NULL,
    last_heartbeat_at_ms BIGINT,
    load                 JSONB,
    revision             BIGINT  NOT NULL,
    UNIQUE (tenant, name)
);
CREATE INDEX agents_by_tenant ON agents (tenant, id);
CREATE INDEX agents_by_status ON agents (tenant, status, id);

CREATE TABLE agent_capabilities (
    agent_id UUID NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    tenant   TEXT NOT NULL,
    name     TEXT NOT NULL,
    version  TEXT NOT NULL,
    PRIMARY KEY (agent_id, name)
);
CREATE INDEX agent_capabilities_by_name ON agent_capabilities (tenant, name, agent_id, version);

CREATE TABLE agent_labels (
    agent_id UUID NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    tenant   TEXT NOT NULL,
    key      TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (agent_id, key)
);
CREATE INDEX agent_labels_by_pair ON agent_labels (tenant, key, value, agent_id);

CREATE TABLE agent_events (
    seq         BIGSERIAL PRIMARY KEY,
    tenant      TEXT    NOT NULL,
    agent_id    UUID    NOT NULL,
    kind        TEXT    NOT NULL,
    from_status TEXT,
    to_status   TEXT,
    at_ms       BIGINT  NOT NULL
);
CREATE INDEX agent_events_by_tenant ON agent_events (tenant, seq);
CREATE INDEX agent_events_by_agent ON agent_events (agent_id, seq);

CREATE TABLE api_keys (
    id            UUID    PRIMARY KEY,
    name          TEXT    NOT NULL,
    hash          BYTEA   NOT NULL UNIQUE,
    tenant        TEXT,
    role          TEXT    NOT NULL,
    created_at_ms BIGINT  NOT NULL,
    expires_at_ms BIGINT,
    revoked_at_ms BIGINT
);

-- One row per fact about the kernel itself, e.g. that the bootstrap key was created.
CREATE TABLE kernel_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
