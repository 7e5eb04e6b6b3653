-- Rate limits shared by kernels on one database (GCRA): one theoretical arrival time per key
-- (`k:<credential>`, `t:<tenant>`, `r:<METHOD> <route>`). A row whose tat_ms lies in the past
-- means the same as no row; the kernels delete such rows periodically, so the table holds
-- only keys used within the last burst window. (Kernels refuse shared limits on SQLite; the
-- table exists so that both backends keep the same schema.)
CREATE TABLE rate_limits (
    key    TEXT    PRIMARY KEY NOT NULL,
    tat_ms INTEGER NOT NULL
) WITHOUT ROWID;
