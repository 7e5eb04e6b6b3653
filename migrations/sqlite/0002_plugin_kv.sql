-- Key-value storage of plugins, one namespace per plugin and tenant.
CREATE TABLE plugin_kv (
    namespace     TEXT    NOT NULL,
    key           TEXT    NOT NULL,
    value         BLOB    NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (namespace, key)
);
