-- Rate limits shared by kernels on one database (GCRA): one theoretical arrival time per key
-- (`k:<credential>`, `t:<tenant>`, `r:<METHOD> <route>`). A row whose tat_ms lies in the past
-- means the same as no row; the kernels delete such rows periodically, so the table holds
-- only keys used within the last burst window.
--
-- UNLOGGED: every limited request updates a row, and this state is worth less than the WAL
-- it would write. After a crash or a failover the table starts empty, which only means every
-- client starts with a full burst. No index on tat_ms, so that updates can stay HOT (the
-- periodic purge scans a table bounded by the active keys); fillfactor leaves them room.
CREATE UNLOGGED TABLE rate_limits (
    key    TEXT   PRIMARY KEY,
    tat_ms BIGINT NOT NULL
) WITH (fillfactor = 70);
