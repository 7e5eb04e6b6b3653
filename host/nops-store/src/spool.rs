//! The local spool: critical writes waiting for the main database, in a SQLite file of their
//! own beside the kernel's data (`$NOPS_DATA_DIR/spool.db`).
//!
//! SQLite rather than a bespoke log file: it is already linked, its journal makes every push
//! atomic and durable on ordinary file systems (`synchronous = FULL`: a push returns after
//! the write reached the disk), and a torn write after a power cut is rolled back instead of
//! leaving garbage a reader must detect.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use nops_core::degraded::{Spool, SpoolError, SpoolStats, SpooledWrite};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

/// Limits of the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Most writes held.
    pub records_max: u64,
    /// Most bytes held (sum of the writes' JSON sizes).
    pub bytes_max: u64,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        Self { records_max: 100_000, bytes_max: 256 * 1024 * 1024 }
    }
}

/// A [`Spool`] in a local SQLite file.
#[derive(Debug)]
pub struct SqliteSpool {
    pool: SqlitePool,
    limits: SpoolLimits,
    records: AtomicU64,
    bytes: AtomicU64,
    /// Serialises pushes so the limit check and the insert agree.
    push_lock: tokio::sync::Mutex<()>,
}

fn io(err: impl std::fmt::Display) -> SpoolError {
    SpoolError::Io(err.to_string())
}

impl SqliteSpool {
    /// Opens (or creates) the spool file at `path`.
    pub async fn open(path: &Path, limits: SpoolLimits) -> Result<Self, SpoolError> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(io)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full);
        // One connection: pushes, peeks and acks are serialised anyway, and a single
        // connection sees its own writes without WAL checkpoint subtleties.
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.map_err(io)?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS spool (\
                seq INTEGER PRIMARY KEY AUTOINCREMENT, \
                class TEXT NOT NULL, \
                key TEXT NOT NULL, \
                body TEXT NOT NULL, \
                at_ms INTEGER NOT NULL, \
                bytes INTEGER NOT NULL)",
        )
        .execute(&pool)
        .await
        .map_err(io)?;
        let (records, bytes): (i64, i64) =
            sqlx::query_as("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM spool").fetch_one(&pool).await.map_err(io)?;
        Ok(Self {
            pool,
            limits,
            records: AtomicU64::new(u64::try_from(records).unwrap_or(0)),
            bytes: AtomicU64::new(u64::try_from(bytes).unwrap_or(0)),
            push_lock: tokio::sync::Mutex::new(()),
        })
    }
}

#[async_trait]
impl Spool for SqliteSpool {
    async fn push(&self, write: &SpooledWrite) -> Result<i64, SpoolError> {
        let body = serde_json::to_string(&write.body).map_err(io)?;
        let size = u64::try_from(body.len() + write.key.len()).unwrap_or(u64::MAX);
        let _guard = self.push_lock.lock().await;
        let (records, bytes) = (self.records.load(Ordering::Acquire), self.bytes.load(Ordering::Acquire));
        if records >= self.limits.records_max {
            return Err(SpoolError::Full(format!("{records} writes, spool_records_max = {}", self.limits.records_max)));
        }
        if bytes.saturating_add(size) > self.limits.bytes_max {
            return Err(SpoolError::Full(format!("{bytes} bytes, spool_bytes_max = {}", self.limits.bytes_max)));
        }
        let class = serde_json::to_value(write.class).map_err(io)?;
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO spool (class, key, body, at_ms, bytes) VALUES (?, ?, ?, ?, ?) RETURNING seq",
        )
        .bind(class.as_str().unwrap_or_default())
        .bind(&write.key)
        .bind(&body)
        .bind(write.at_ms)
        .bind(i64::try_from(size).unwrap_or(i64::MAX))
        .fetch_one(&self.pool)
        .await
        .map_err(io)?;
        self.records.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(size, Ordering::AcqRel);
        Ok(seq)
    }

    async fn peek(&self, limit: u32) -> Result<Vec<(i64, SpooledWrite)>, SpoolError> {
        let rows: Vec<(i64, String, String, String, i64)> =
            sqlx::query_as("SELECT seq, class, key, body, at_ms FROM spool ORDER BY seq LIMIT ?")
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(io)?;
        rows.into_iter()
            .map(|(seq, class, key, body, at_ms)| {
                let class = serde_json::from_value(serde_json::Value::String(class)).map_err(io)?;
                let body = serde_json::from_str(&body).map_err(io)?;
                Ok((seq, SpooledWrite { class, key, body, at_ms }))
            })
            .collect()
    }

    async fn ack(&self, seq: i64) -> Result<(), SpoolError> {
        let _guard = self.push_lock.lock().await;
        let (records, bytes): (i64, i64) =
            sqlx::query_as("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM spool WHERE seq <= ?")
                .bind(seq)
                .fetch_one(&self.pool)
                .await
                .map_err(io)?;
        sqlx::query("DELETE FROM spool WHERE seq <= ?").bind(seq).execute(&self.pool).await.map_err(io)?;
        let sub = |counter: &AtomicU64, n: i64| {
            let n = u64::try_from(n).unwrap_or(0);
            let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(n)));
        };
        sub(&self.records, records);
        sub(&self.bytes, bytes);
        Ok(())
    }

    fn stats(&self) -> SpoolStats {
        SpoolStats {
            records: self.records.load(Ordering::Acquire),
            bytes: self.bytes.load(Ordering::Acquire),
            records_max: self.limits.records_max,
            bytes_max: self.limits.bytes_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use nops_core::degraded::{ApplyError, SpoolSink, WriteClass, replay_round};

    use super::*;

    fn write(n: i64) -> SpooledWrite {
        SpooledWrite {
            class: WriteClass::TaskResult,
            key: format!("task-{n}/1"),
            body: serde_json::json!({ "n": n }),
            at_ms: n,
        }
    }

    #[tokio::test]
    async fn keeps_order_survives_reopen_and_acks_prefixes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool.db");
        let spool = SqliteSpool::open(&path, SpoolLimits::default()).await.expect("open");
        for n in 0..5 {
            spool.push(&write(n)).await.expect("push");
        }
        let first = spool.peek(2).await.expect("peek");
        assert_eq!(first.iter().map(|(_, w)| w.at_ms).collect::<Vec<_>>(), vec![0, 1]);
        spool.ack(first[1].0).await.expect("ack");
        assert_eq!(spool.stats().records, 3);
        drop(spool);

        let reopened = SqliteSpool::open(&path, SpoolLimits::default()).await.expect("reopen");
        assert_eq!(reopened.stats().records, 3, "counts are rebuilt from the file");
        let rest = reopened.peek(10).await.expect("peek");
        assert_eq!(rest.iter().map(|(_, w)| w.clone()).collect::<Vec<_>>(), vec![write(2), write(3), write(4)]);
    }

    #[tokio::test]
    async fn refuses_writes_past_its_limits_and_accepts_after_ack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = SqliteSpool::open(&dir.path().join("spool.db"), SpoolLimits { records_max: 2, bytes_max: 1 << 20 })
            .await
            .expect("open");
        let a = spool.push(&write(1)).await.expect("push");
        spool.push(&write(2)).await.expect("push");
        assert!(matches!(spool.push(&write(3)).await, Err(SpoolError::Full(_))));
        assert_eq!(spool.stats().records, 2, "a refused write is not stored");
        spool.ack(a).await.expect("ack");
        spool.push(&write(3)).await.expect("room again after an ack");

        let tiny = SqliteSpool::open(&dir.path().join("tiny.db"), SpoolLimits { records_max: 10, bytes_max: 8 })
            .await
            .expect("open");
        assert!(matches!(tiny.push(&write(1)).await, Err(SpoolError::Full(_))), "bytes_max holds too");
    }

    /// A sink that is down until told otherwise and rejects one key.
    struct Sink {
        up: Mutex<bool>,
        applied: Mutex<Vec<i64>>,
    }

    #[async_trait]
    impl SpoolSink for Sink {
        async fn apply(&self, write: &SpooledWrite) -> Result<(), ApplyError> {
            if !*self.up.lock().expect("lock") {
                return Err(ApplyError::Unavailable("down".into()));
            }
            if write.key == "task-2/1" {
                return Err(ApplyError::Rejected("gone".into()));
            }
            self.applied.lock().expect("lock").push(write.at_ms);
            Ok(())
        }
    }

    #[tokio::test]
    async fn replay_keeps_order_waits_for_the_dependency_and_drops_rejected_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = SqliteSpool::open(&dir.path().join("spool.db"), SpoolLimits::default()).await.expect("open");
        for n in 0..4 {
            spool.push(&write(n)).await.expect("push");
        }
        let sink = Sink { up: Mutex::new(false), applied: Mutex::new(Vec::new()) };
        let round = replay_round(&spool, &sink).await.expect("round");
        assert!(round.blocked);
        assert_eq!((round.applied, spool.stats().records), (0, 4), "nothing leaves while the dependency is down");

        *sink.up.lock().expect("lock") = true;
        let round = replay_round(&spool, &sink).await.expect("round");
        assert_eq!((round.applied, round.rejected, round.blocked), (3, 1, false));
        assert_eq!(*sink.applied.lock().expect("lock"), vec![0, 1, 3], "in order; the rejected write is skipped");
        assert_eq!(spool.stats(), SpoolStats { records: 0, bytes: 0, ..spool.stats() });
    }
}
