-- Plugins: components and configuration documents by digest, the stored versions, each
-- plugin's state and hash chain, a kernel-wide change counter, and shadow differences.
-- Versions are semver strings; manifests and shadow payloads are JSON text, kept verbatim.

-- Components and configuration documents, shared by every version that names the digest.
CREATE TABLE plugin_blobs (
    digest TEXT    PRIMARY KEY NOT NULL,
    bytes  BLOB    NOT NULL,
    size   INTEGER NOT NULL
);

-- `chain_seq` is the seq of the chain entry that inserted the version: versions of one plugin
-- list by upload time, then in the order they were inserted.
CREATE TABLE plugin_versions (
    tenant         TEXT    NOT NULL,
    name           TEXT    NOT NULL,
    version        TEXT    NOT NULL,
    kind           TEXT    NOT NULL,
    digest         TEXT    NOT NULL,
    config_digest  TEXT,
    manifest       TEXT    NOT NULL,
    signed_by      TEXT,
    uploaded_at_ms INTEGER NOT NULL,
    uploaded_by    TEXT    NOT NULL,
    chain_seq      INTEGER NOT NULL,
    PRIMARY KEY (tenant, name, version)
);
CREATE INDEX plugin_versions_by_upload ON plugin_versions (tenant, name, uploaded_at_ms, chain_seq);

CREATE TABLE plugin_states (
    tenant        TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    kind          TEXT    NOT NULL,
    active        TEXT,
    shadow        TEXT,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);

-- Append-only: rows are never updated or deleted.
CREATE TABLE plugin_chain (
    tenant          TEXT    NOT NULL,
    name            TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    action          TEXT    NOT NULL,
    version         TEXT    NOT NULL,
    digest          TEXT    NOT NULL,
    manifest_digest TEXT    NOT NULL,
    at_ms           INTEGER NOT NULL,
    actor           TEXT    NOT NULL,
    prev_hash       TEXT    NOT NULL,
    hash            TEXT    NOT NULL,
    PRIMARY KEY (tenant, name, seq)
);

-- One row, advanced by every plugin change; replicas poll it to notice changes.
CREATE TABLE plugin_generation (
    id         INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    generation INTEGER NOT NULL
);
INSERT INTO plugin_generation (id, generation) VALUES (1, 0);

-- Bounded per plugin: the oldest rows (lowest ids) are dropped first.
CREATE TABLE plugin_shadow_diffs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant        TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    active        TEXT    NOT NULL,
    shadow        TEXT    NOT NULL,
    input         TEXT    NOT NULL,
    active_output TEXT    NOT NULL,
    shadow_output TEXT    NOT NULL,
    at_ms         INTEGER NOT NULL
);
CREATE INDEX plugin_shadow_diffs_by_plugin ON plugin_shadow_diffs (tenant, name, id);
