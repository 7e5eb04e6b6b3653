//! The embedded event bus: a durable log in the kernel's own store (SQLite or PostgreSQL)
//! implementing [`Bus`], with in-process wake-ups for long-polling fetches.
//!
//! Tables (migration `0008_bus`): `bus_events` (the log), `bus_dedupe` (event ids accepted
//! within the dedupe window), `bus_consumers` (groups and their cursors), `bus_pending`
//! (deliveries awaiting an ack or a redelivery), `bus_dead_letters` (with a copy of the event,
//! so a dead letter outlives the log's retention), `bus_tenants` (per-tenant dead-letter ids)
//! and `bus_meta` (the last sequence handed out).
//!
//! **Sequences in commit order.** A publish locks the single `bus_meta` row first
//! (`SELECT … FOR UPDATE` on PostgreSQL; SQLite has one writer) and takes a block of sequences
//! from it; a second publish waits for that lock until the first commits. So sequences
//! increase in commit order and a group's cursor never passes an event that commits later.
//! The row lock does what a `pg_advisory_xact_lock` would, and also hands out the block in
//! the same round trip and never reuses a sequence after the head of the log is deleted,
//! which a `MAX(seq) + 1` or an advisory lock beside a database sequence would not give.
//! Readers take the committed `last_seq` first and scan no further, so they never see a
//! sequence whose neighbours below are still uncommitted.
//!
//! **Group commit.** Because publishes serialise on that row, one transaction per publish call
//! caps the bus at one commit's round trips per call: concurrent single-event publishes queue
//! behind each other (on PostgreSQL, several round trips each). So a publish call does not
//! run its own transaction: it hands its batch to the bus's committer task through a bounded
//! queue (`PUBLISH_QUEUE_BATCHES_MAX`, callers wait for room when it is full) and waits for
//! its answer. The committer takes every batch waiting (up to `GROUP_COMMIT_EVENTS_MAX`
//! events and `GROUP_COMMIT_PAYLOAD_BYTES_MAX` payload bytes) and commits them as one
//! transaction, in queue order, exactly as one publish of their concatenation: duplicates
//! across callers are answered with the first one's sequence, sequences follow commit order,
//! a failed commit fails every caller in it, and nobody is answered before the commit. It
//! never waits to fill a group: what arrives while a commit runs forms the next one. A caller
//! that stops waiting before its group's commit starts is left out of it. The task starts at
//! the first publish and ends when the last clone of the bus is dropped.
//!
//! **Fetching.** One transaction per fetch, holding the group's row (`FOR UPDATE` on
//! PostgreSQL, so two kernels fetching one group never hand out one delivery twice):
//! deliveries whose last allowed delivery ended move to the dead-letter queue; due
//! redeliveries go out in sequence order; then new events after the cursor, filtered in SQL
//! by a `LIKE` superset of the subject pattern and exactly in Rust, scanning a bounded window
//! of sequences per round. When nothing is ready the fetch waits on a [`Notify`] that
//! publishes, nacks, requeues and re-drives of this process wake (something may be ready), and
//! polls at a bounded interval for other kernels' publishes (PostgreSQL) and for ack
//! deadlines. Acks free pending slots: they wake only fetches that found their group full, on
//! a second [`Notify`], so a steady ack stream does not make every waiting fetch look again
//! for nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nops_core::bus::EventIn;
use nops_core::bus::{
    AckKind, BATCH_EVENTS_MAX, Bus, BusConfig, BusError, ConsumerInfo, ConsumerSpec, DeadLetter, Delivery,
    FETCH_EVENTS_MAX, FETCH_WAIT_MS_MAX, Published, READ_EVENTS_MAX, ReadRange, StartAt, StoredEvent, ack_deadline_ms,
};
use nops_core::clock::Clock;
use nops_core::plugin::subject_matches;
use nops_core::tenant::TenantId;
use sqlx::QueryBuilder;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::{Pools, SqlStore, is_transient};

/// How often a waiting fetch looks at a PostgreSQL store again: other kernels' publishes do
/// not wake this process, so this bounds the extra latency they see.
const POLL_INTERVAL_MS_POSTGRES: u64 = 100;
/// How often a waiting fetch looks at a SQLite store again. Only this process writes it and
/// every write wakes waiting fetches; the poll is a safety net.
const POLL_INTERVAL_MS_SQLITE: u64 = 500;
/// Sequences one fetch round scans past the cursor (bounds the work of a sparse filter).
const FETCH_SCAN_SEQS_MAX: i64 = 100_000;
/// Scan rounds per fetch attempt.
const FETCH_SCAN_ROUNDS_MAX: usize = 4;
/// Rounds a read takes when the exact subject check drops rows the SQL prefilter let through.
const READ_SCAN_ROUNDS_MAX: usize = 8;
/// Deliveries moved to the dead-letter queue per statement (fetch and sweep).
const DEAD_LETTER_MOVES_MAX: i64 = 1_000;
/// Rows one sweep statement deletes (each in its own transaction, so writers are not held up).
const SWEEP_ROWS_MAX: i64 = 10_000;
/// Statements per sweep step; what is left waits for the next sweep.
const SWEEP_ROUNDS_MAX: usize = 100;
/// Groups whose expired last deliveries one sweep moves to the dead-letter queue.
const SWEEP_GROUPS_MAX: i64 = 1_000;
/// Backlog counts stop here (the count scans the log past the cursor).
const BACKLOG_COUNT_MAX: i64 = 100_000;
/// Rows per multi-row statement on SQLite (bind-parameter budget and statement-cache reuse).
const SQLITE_ROWS_PER_STATEMENT_MAX: usize = 500;
/// Publish calls queued for the committer at once; further callers wait for room.
const PUBLISH_QUEUE_BATCHES_MAX: usize = 1_024;
/// Most events one group commit takes from the queue (a single batch always fits).
const GROUP_COMMIT_EVENTS_MAX: usize = 5_000;
/// Most payload bytes one group commit takes from the queue (its first batch is always taken).
const GROUP_COMMIT_PAYLOAD_BYTES_MAX: usize = 64 * 1024 * 1024;

/// What one [`EmbeddedBus::sweep`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Events deleted for `retention_ms` or `events_max`.
    pub events_deleted: u64,
    /// Event ids forgotten because they left the dedupe window.
    pub dedupe_forgotten: u64,
    /// Deliveries whose last allowed delivery expired, moved to the dead-letter queue.
    pub dead_lettered: u64,
    /// Oldest dead letters dropped for `dead_letters_per_tenant_max`.
    pub dead_letters_dropped: u64,
}

/// The embedded [`Bus`] on the kernel's [`SqlStore`].
#[derive(Clone)]
pub struct EmbeddedBus {
    store: SqlStore,
    config: BusConfig,
    clock: Arc<dyn Clock>,
    /// Something may be ready: a publish, a nack, a requeue or a re-drive.
    wake: Arc<Notify>,
    /// A pending slot freed: an ack, a term or a dead letter.
    room: Arc<Notify>,
    poll_interval: Duration,
    /// The queue to the group committer, shared by every clone; `None` until the first publish.
    publish_queue: Arc<std::sync::Mutex<Option<mpsc::Sender<PublishJob>>>>,
}

/// One publish call waiting for its group commit.
struct PublishJob {
    events: Vec<EventIn>,
    answer: oneshot::Sender<Result<Vec<Published>, BusError>>,
}

/// What the committer task works with. It holds no sender of the publish queue, so the task
/// ends once the last [`EmbeddedBus`] clone (and with it the queue) is dropped.
#[derive(Clone)]
struct Committer {
    store: SqlStore,
    clock: Arc<dyn Clock>,
    dedupe_window_ms: i64,
    wake: Arc<Notify>,
}

impl std::fmt::Debug for EmbeddedBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBus").field("store", &self.store).field("config", &self.config).finish()
    }
}

/// A write transaction on whichever database the store runs.
enum Tx {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

/// Runs `$body` with `$c` bound to the concrete transaction (and `$lock` to the row-locking
/// suffix of a `SELECT`: `FOR UPDATE` on PostgreSQL, nothing on single-writer SQLite).
macro_rules! on_tx {
    ($tx:expr, |$c:ident| $body:expr) => {
        match $tx {
            Tx::Sqlite($c) => $body,
            Tx::Postgres($c) => $body,
        }
    };
    ($tx:expr, |$c:ident, $lock:ident| $body:expr) => {
        match $tx {
            Tx::Sqlite($c) => {
                let $lock = "";
                $body
            }
            Tx::Postgres($c) => {
                let $lock = " FOR UPDATE";
                $body
            }
        }
    };
}

/// Runs `$body` with `$pool` bound to the read pool of whichever database is open.
macro_rules! on_read {
    ($bus:expr, |$pool:ident| $body:expr) => {
        match &$bus.store.pools {
            Pools::Sqlite { read: $pool, .. } => $body,
            Pools::Postgres($pool) => $body,
        }
    };
}

/// Appends `AND <subject condition>` for `$filter` (a [`SubjectSql`]) to query builder `$q`.
macro_rules! push_subject {
    ($q:expr, $filter:expr, $column:expr) => {
        match $filter {
            SubjectSql::All => {}
            SubjectSql::Exact(subject) => {
                $q.push(concat!(" AND ", $column, " = ")).push_bind(subject.clone());
            }
            SubjectSql::Like(pattern) => {
                $q.push(concat!(" AND ", $column, " LIKE ")).push_bind(pattern.clone()).push(" ESCAPE '\\'");
            }
        }
    };
}

/// Appends `(v1, v2, …)` binding every value of `$values` to query builder `$q`.
macro_rules! push_list {
    ($q:expr, $values:expr) => {{
        $q.push("(");
        let mut list = $q.separated(", ");
        for value in $values {
            list.push_bind(*value);
        }
        list.push_unseparated(")");
    }};
}

/// The SQL prefilter of a subject pattern: exact for patterns without wildcards, otherwise a
/// `LIKE` pattern matching a superset (`*` becomes `%`, which also spans dots; SQLite's `LIKE`
/// ignores ASCII case). [`subject_matches`] makes it exact.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SubjectSql {
    All,
    Exact(String),
    Like(String),
}

fn subject_sql(pattern: &str) -> SubjectSql {
    if !pattern.split('.').any(|t| t == "*" || t == ">") {
        return SubjectSql::Exact(pattern.to_string());
    }
    let like = pattern
        .split('.')
        .map(|t| match t {
            "*" | ">" => "%".to_string(),
            literal => literal.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"),
        })
        .collect::<Vec<_>>()
        .join(".");
    if like == "%" { SubjectSql::All } else { SubjectSql::Like(like) }
}

/// What an ack token names: a group, an event, which delivery, and the fetch that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Token {
    consumer_id: i64,
    seq: i64,
    delivery: i64,
    nonce: i64,
}

impl Token {
    fn encode(&self) -> String {
        format!("{:x}-{:x}-{:x}-{:x}", self.consumer_id, self.seq, self.delivery, self.nonce)
    }

    fn parse(token: &str) -> Option<Self> {
        let mut parts = token.split('-').map(|p| {
            if p.is_empty() || p.len() > 16 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            u64::from_str_radix(p, 16).ok().and_then(|v| i64::try_from(v).ok())
        });
        let token =
            Self { consumer_id: parts.next()??, seq: parts.next()??, delivery: parts.next()??, nonce: parts.next()?? };
        if parts.next().is_some() { None } else { Some(token) }
    }
}

/// A fresh nonce for the deliveries of one fetch: 63 random bits of a UUIDv7.
fn nonce() -> i64 {
    let (_, low) = uuid::Uuid::now_v7().as_u64_pair();
    i64::try_from(low & (i64::MAX as u64)).unwrap_or(0)
}

fn ms(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn corrupt(what: &str, err: impl std::fmt::Display) -> sqlx::Error {
    sqlx::Error::Decode(format!("{what}: {err}").into())
}

fn bus_error(what: &str, err: sqlx::Error) -> BusError {
    if is_transient(&err) {
        BusError::Unavailable(format!("{what}: {err}"))
    } else {
        BusError::Backend(format!("{what}: {err}"))
    }
}

const GROUP_COLUMNS: &str = "consumer_id, tenant, name, filter, ack_wait_ms, deliveries_max, backoff_ms, \
     pending_max, start, cursor_seq, created_at_ms";

/// A `bus_consumers` row.
#[derive(sqlx::FromRow)]
struct GroupRow {
    consumer_id: i64,
    tenant: String,
    name: String,
    filter: String,
    ack_wait_ms: i64,
    deliveries_max: i64,
    backoff_ms: String,
    pending_max: i64,
    start: String,
    cursor_seq: i64,
    created_at_ms: i64,
}

/// A consumer group as stored.
#[derive(Debug, Clone)]
struct Group {
    id: i64,
    spec: ConsumerSpec,
    cursor: i64,
    created_at_ms: i64,
}

impl TryFrom<GroupRow> for Group {
    type Error = sqlx::Error;

    fn try_from(row: GroupRow) -> Result<Self, sqlx::Error> {
        let tenant = row.tenant.parse().map_err(|e| corrupt("bus_consumers.tenant", e))?;
        Ok(Group {
            id: row.consumer_id,
            spec: ConsumerSpec {
                tenant,
                name: row.name,
                filter: row.filter,
                ack_wait_ms: u64::try_from(row.ack_wait_ms).map_err(|e| corrupt("bus_consumers.ack_wait_ms", e))?,
                deliveries_max: u32::try_from(row.deliveries_max)
                    .map_err(|e| corrupt("bus_consumers.deliveries_max", e))?,
                backoff_ms: serde_json::from_str(&row.backoff_ms)
                    .map_err(|e| corrupt("bus_consumers.backoff_ms", e))?,
                start: serde_json::from_str(&row.start).map_err(|e| corrupt("bus_consumers.start", e))?,
                pending_max: u32::try_from(row.pending_max).map_err(|e| corrupt("bus_consumers.pending_max", e))?,
            },
            cursor: row.cursor_seq,
            created_at_ms: row.created_at_ms,
        })
    }
}

const EVENT_COLUMNS: &str = "e.seq, e.tenant, e.subject, e.id, e.payload, e.source, e.time_ms";

/// A `bus_events` row.
#[derive(sqlx::FromRow)]
struct EventRow {
    seq: i64,
    tenant: String,
    subject: String,
    id: String,
    payload: Vec<u8>,
    source: String,
    time_ms: i64,
}

impl TryFrom<EventRow> for StoredEvent {
    type Error = sqlx::Error;

    fn try_from(row: EventRow) -> Result<Self, sqlx::Error> {
        Ok(StoredEvent {
            seq: u64::try_from(row.seq).map_err(|e| corrupt("bus_events.seq", e))?,
            id: row.id,
            tenant: row.tenant.parse().map_err(|e| corrupt("bus_events.tenant", e))?,
            subject: row.subject,
            payload: row.payload,
            source: row.source,
            time_ms: row.time_ms,
        })
    }
}

/// A due redelivery with its event.
#[derive(sqlx::FromRow)]
struct DueRow {
    delivery: i64,
    #[sqlx(flatten)]
    event: EventRow,
}

const DEAD_LETTER_COLUMNS: &str =
    "id, consumer, seq, tenant, event_id, subject, payload, source, time_ms, deliveries, reason, at_ms";

/// A `bus_dead_letters` row.
#[derive(sqlx::FromRow)]
struct DeadLetterRow {
    id: i64,
    consumer: String,
    seq: i64,
    tenant: String,
    event_id: String,
    subject: String,
    payload: Vec<u8>,
    source: String,
    time_ms: i64,
    deliveries: i64,
    reason: String,
    at_ms: i64,
}

impl TryFrom<DeadLetterRow> for DeadLetter {
    type Error = sqlx::Error;

    fn try_from(row: DeadLetterRow) -> Result<Self, sqlx::Error> {
        Ok(DeadLetter {
            id: u64::try_from(row.id).map_err(|e| corrupt("bus_dead_letters.id", e))?,
            consumer: row.consumer,
            event: EventRow {
                seq: row.seq,
                tenant: row.tenant,
                subject: row.subject,
                id: row.event_id,
                payload: row.payload,
                source: row.source,
                time_ms: row.time_ms,
            }
            .try_into()?,
            deliveries: u32::try_from(row.deliveries).map_err(|e| corrupt("bus_dead_letters.deliveries", e))?,
            reason: row.reason,
            at_ms: row.at_ms,
        })
    }
}

/// What one fetch attempt found.
struct Fetched {
    deliveries: Vec<Delivery>,
    /// The earliest time a pending delivery of the group becomes due again.
    next_due_ms: Option<i64>,
    /// The group had no free pending slot (`pending_max` outstanding).
    full: bool,
}

impl EmbeddedBus {
    /// The bus on `store`'s database (whose migrations created its tables).
    pub fn new(store: &SqlStore, config: BusConfig, clock: Arc<dyn Clock>) -> EmbeddedBus {
        let poll_ms = match store.pools {
            Pools::Sqlite { .. } => POLL_INTERVAL_MS_SQLITE,
            Pools::Postgres(_) => POLL_INTERVAL_MS_POSTGRES,
        };
        EmbeddedBus {
            store: store.clone(),
            config,
            clock,
            wake: Arc::new(Notify::new()),
            room: Arc::new(Notify::new()),
            poll_interval: Duration::from_millis(poll_ms),
            publish_queue: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// The publish queue, starting the committer task when there is none or it stopped (its
    /// runtime shut down).
    fn publish_queue(&self) -> mpsc::Sender<PublishJob> {
        let mut slot = self.publish_queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(queue) = slot.as_ref().filter(|q| !q.is_closed()) {
            return queue.clone();
        }
        let (queue, jobs) = mpsc::channel(PUBLISH_QUEUE_BATCHES_MAX);
        let committer = Committer {
            store: self.store.clone(),
            clock: self.clock.clone(),
            dedupe_window_ms: ms(self.config.dedupe_window_ms),
            wake: self.wake.clone(),
        };
        tokio::spawn(committer.serve(jobs));
        *slot = Some(queue.clone());
        queue
    }

    /// Runs `op`, retrying transient failures (lost connections, lock timeouts, serialization
    /// failures) with exponential backoff and full jitter.
    async fn run<T, F, Fut>(&self, what: &'static str, op: F) -> Result<T, BusError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        retrying(what, op).await
    }

    async fn begin(&self) -> Result<Tx, sqlx::Error> {
        begin(&self.store).await
    }

    /// Enforces retention (`retention_ms`, `events_max`), forgets event ids older than the
    /// dedupe window, moves deliveries whose last allowed delivery expired to the dead-letter
    /// queue (so it is right even when nobody fetches), and drops the oldest dead letters of
    /// tenants past `dead_letters_per_tenant_max`. Each step works in bounded transactions;
    /// what is left past `SWEEP_ROUNDS_MAX` statements waits for the next sweep.
    pub async fn sweep(&self) -> Result<SweepReport, BusError> {
        let mut report = SweepReport::default();
        let now = self.clock.now_ms();

        // Expired last deliveries, group by group (each under its group's lock).
        let groups: Vec<(String, String)> = self
            .run("bus.sweep.expired", || async {
                on_read!(self, |pool| {
                    sqlx::query_as(
                        "SELECT c.tenant, c.name FROM bus_consumers c WHERE EXISTS (SELECT 1 FROM bus_pending p \
                         WHERE p.consumer_id = c.consumer_id AND p.due_ms <= $1 AND p.delivery >= c.deliveries_max) \
                         ORDER BY c.consumer_id LIMIT $2",
                    )
                    .bind(now)
                    .bind(SWEEP_GROUPS_MAX)
                    .fetch_all(pool)
                    .await
                })
            })
            .await?;
        for (tenant, name) in groups {
            let Ok(tenant) = tenant.parse::<TenantId>() else { continue };
            report.dead_lettered += self
                .run("bus.sweep.expired", || async {
                    let mut tx = self.begin().await?;
                    let Some(group) = lock_group(&mut tx, &tenant, &name).await? else {
                        return Ok(0);
                    };
                    let moved = dead_letter_expired(&mut tx, &group, now).await?;
                    commit(tx).await?;
                    Ok(moved)
                })
                .await?;
        }

        // Retention by age, then by count (sequences are dense: at most `events_max` rows
        // have a sequence above `last_seq - events_max`).
        let cutoff = now.saturating_sub(ms(self.config.retention_ms));
        let by_age = "DELETE FROM bus_events WHERE seq IN (SELECT seq FROM bus_events WHERE time_ms < $1 LIMIT $2)";
        report.events_deleted += self.sweep_rounds("bus.sweep.retention", by_age, cutoff).await?;
        let head = self.head().await?;
        let keep_from = head.saturating_sub(ms(self.config.events_max));
        if keep_from > 0 {
            let by_count = "DELETE FROM bus_events WHERE seq IN \
                 (SELECT seq FROM bus_events WHERE seq <= $1 ORDER BY seq LIMIT $2)";
            report.events_deleted += self.sweep_rounds("bus.sweep.events_max", by_count, keep_from).await?;
        }
        if report.events_deleted > 0 {
            // Pending deliveries of deleted events can never be delivered again.
            self.run("bus.sweep.orphans", || async {
                let mut tx = self.begin().await?;
                on_tx!(&mut tx, |c| {
                    sqlx::query(
                        "DELETE FROM bus_pending WHERE NOT EXISTS \
                         (SELECT 1 FROM bus_events e WHERE e.seq = bus_pending.seq)",
                    )
                    .execute(&mut **c)
                    .await?;
                });
                commit(tx).await
            })
            .await?;
        }

        let window_start = now.saturating_sub(ms(self.config.dedupe_window_ms));
        let dedupe = "DELETE FROM bus_dedupe WHERE (tenant, id) IN \
             (SELECT tenant, id FROM bus_dedupe WHERE at_ms < $1 LIMIT $2)";
        report.dedupe_forgotten += self.sweep_rounds("bus.sweep.dedupe", dedupe, window_start).await?;

        // Dead letters past the per-tenant cap: the oldest go.
        let cap = ms(self.config.dead_letters_per_tenant_max);
        let over: Vec<(String, i64)> = self
            .run("bus.sweep.dead_letters", || async {
                on_read!(self, |pool| {
                    sqlx::query_as("SELECT tenant, COUNT(*) FROM bus_dead_letters GROUP BY tenant HAVING COUNT(*) > $1")
                        .bind(cap)
                        .fetch_all(pool)
                        .await
                })
            })
            .await?;
        for (tenant, count) in over {
            let mut excess = count - cap;
            for _ in 0..SWEEP_ROUNDS_MAX {
                if excess <= 0 {
                    break;
                }
                let chunk = excess.min(SWEEP_ROWS_MAX);
                let dropped = self
                    .run("bus.sweep.dead_letters", || async {
                        let mut tx = self.begin().await?;
                        let dropped = on_tx!(&mut tx, |c| {
                            sqlx::query(
                                "DELETE FROM bus_dead_letters WHERE tenant = $1 AND id IN \
                                 (SELECT id FROM bus_dead_letters WHERE tenant = $1 ORDER BY id LIMIT $2)",
                            )
                            .bind(&tenant)
                            .bind(chunk)
                            .execute(&mut **c)
                            .await?
                            .rows_affected()
                        });
                        commit(tx).await?;
                        Ok(dropped)
                    })
                    .await?;
                report.dead_letters_dropped += dropped;
                excess -= chunk;
                if dropped == 0 {
                    break;
                }
            }
        }
        if report.dead_lettered > 0 {
            tracing::info!(moved = report.dead_lettered, "bus: expired last deliveries dead-lettered");
        }
        Ok(report)
    }

    /// Runs the bounded delete `sql` (`$1` the bound, `$2` the row limit) until it deletes
    /// fewer than [`SWEEP_ROWS_MAX`] rows or `SWEEP_ROUNDS_MAX` rounds ran.
    async fn sweep_rounds(&self, what: &'static str, sql: &str, bound: i64) -> Result<u64, BusError> {
        let mut total = 0;
        for _ in 0..SWEEP_ROUNDS_MAX {
            let deleted = self
                .run(what, || async {
                    let mut tx = self.begin().await?;
                    let deleted = on_tx!(&mut tx, |c| {
                        sqlx::query(sql).bind(bound).bind(SWEEP_ROWS_MAX).execute(&mut **c).await?.rows_affected()
                    });
                    commit(tx).await?;
                    Ok(deleted)
                })
                .await?;
            total += deleted;
            if deleted < SWEEP_ROWS_MAX as u64 {
                break;
            }
        }
        Ok(total)
    }

    /// The last sequence handed out by a committed publish.
    async fn head(&self) -> Result<i64, BusError> {
        self.run("bus.head", || async {
            on_read!(self, |pool| {
                sqlx::query_scalar::<_, i64>("SELECT last_seq FROM bus_meta WHERE id = 1").fetch_one(pool).await
            })
        })
        .await
    }

    /// A group and its counts, read from the read pool.
    async fn info(&self, group: Group) -> Result<ConsumerInfo, BusError> {
        let filter = subject_sql(&group.spec.filter);
        let (pending, queued, dead_letters, backlog): (i64, i64, i64, i64) = self
            .run("bus.consumer_info", || async {
                on_read!(self, |pool| {
                    let (pending, queued, dead_letters): (i64, i64, i64) = sqlx::query_as(
                        "SELECT (SELECT COUNT(*) FROM bus_pending WHERE consumer_id = $1 AND delivery > 0), \
                         (SELECT COUNT(*) FROM bus_pending WHERE consumer_id = $1 AND delivery = 0), \
                         (SELECT COUNT(*) FROM bus_dead_letters WHERE consumer_id = $1)",
                    )
                    .bind(group.id)
                    .fetch_one(pool)
                    .await?;
                    let mut q = QueryBuilder::new("SELECT COUNT(*) FROM (SELECT 1 FROM bus_events WHERE tenant = ");
                    q.push_bind(group.spec.tenant.as_str()).push(" AND seq > ").push_bind(group.cursor);
                    push_subject!(q, &filter, "subject");
                    q.push(" LIMIT ").push_bind(BACKLOG_COUNT_MAX).push(") AS b");
                    let backlog: i64 = q.build_query_scalar().fetch_one(pool).await?;
                    Ok((pending, queued, dead_letters, backlog))
                })
            })
            .await?;
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(ConsumerInfo {
            pending: count(pending),
            // Approximate: the SQL prefilter may count a few events the exact subject match
            // would skip (`*` spanning dots, ASCII case on SQLite), and the count stops at
            // BACKLOG_COUNT_MAX. Events queued again by a requeue or re-drive are added.
            backlog: count(backlog) + count(queued),
            dead_letters: count(dead_letters),
            created_at_ms: group.created_at_ms,
            spec: group.spec,
        })
    }

    /// A group, read from the read pool.
    async fn group(&self, tenant: &TenantId, name: &str) -> Result<Option<Group>, BusError> {
        let sql = format!("SELECT {GROUP_COLUMNS} FROM bus_consumers WHERE tenant = $1 AND name = $2");
        self.run("bus.get_consumer", || async {
            on_read!(self, |pool| {
                let row: Option<GroupRow> =
                    sqlx::query_as(&sql).bind(tenant.as_str()).bind(name).fetch_optional(pool).await?;
                row.map(Group::try_from).transpose()
            })
        })
        .await
    }

    /// One fetch attempt, in one transaction under the group's lock.
    async fn fetch_once(&self, tenant: &TenantId, consumer: &str, max: u32) -> Result<Fetched, BusError> {
        let outcome = self
            .run("bus.fetch", || async {
                let mut tx = self.begin().await?;
                let now = self.clock.now_ms();
                let Some((mut group, state)) = open_group(&mut tx, tenant, consumer, now).await? else {
                    return Ok(None);
                };
                // Nothing pending is due (the common case): no dead letters and no redeliveries
                // to look for.
                let due_now = state.due_ms_min.is_some_and(|due| due <= now);
                if due_now {
                    dead_letter_expired(&mut tx, &group, now).await?;
                }
                let (deliveries, full) = deliver(&mut tx, &mut group, max, now, &state, due_now).await?;
                let next_due_ms = if !deliveries.is_empty() {
                    None
                } else if !due_now {
                    state.due_ms_min
                } else {
                    on_tx!(&mut tx, |c| {
                        sqlx::query_scalar::<_, Option<i64>>(
                            "SELECT MIN(due_ms) FROM bus_pending WHERE consumer_id = $1",
                        )
                        .bind(group.id)
                        .fetch_one(&mut **c)
                        .await?
                    })
                };
                commit(tx).await?;
                Ok(Some(Fetched { deliveries, next_due_ms, full }))
            })
            .await?;
        outcome.ok_or(BusError::NotFound("consumer"))
    }
}

/// Runs `op`, retrying transient failures (lost connections, lock timeouts, serialization
/// failures) with exponential backoff and full jitter.
async fn retrying<T, F, Fut>(what: &'static str, op: F) -> Result<T, BusError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    crate::retry_transient(what, op).await.map_err(|err| bus_error(what, err))
}

/// A write transaction on `store`.
async fn begin(store: &SqlStore) -> Result<Tx, sqlx::Error> {
    Ok(match &store.pools {
        Pools::Sqlite { write, .. } => Tx::Sqlite(write.begin().await?),
        Pools::Postgres(pool) => Tx::Postgres(pool.begin().await?),
    })
}

async fn commit(tx: Tx) -> Result<(), sqlx::Error> {
    match tx {
        Tx::Sqlite(tx) => tx.commit().await,
        Tx::Postgres(tx) => tx.commit().await,
    }
}

/// The group `(tenant, name)`, its row locked for the transaction on PostgreSQL.
async fn lock_group(tx: &mut Tx, tenant: &TenantId, name: &str) -> Result<Option<Group>, sqlx::Error> {
    let row: Option<GroupRow> = on_tx!(tx, |c, lock| {
        let sql = format!("SELECT {GROUP_COLUMNS} FROM bus_consumers WHERE tenant = $1 AND name = $2{lock}");
        sqlx::query_as(&sql).bind(tenant.as_str()).bind(name).fetch_optional(&mut **c).await?
    });
    row.map(Group::try_from).transpose()
}

/// A select-list item that turns off `synchronous_commit` for the rest of the transaction
/// (PostgreSQL). Fetches and acks only change delivery state: the cursor, pending deliveries
/// and their removal. If a server crash loses such a commit (at most about three
/// `wal_writer_delay`s of them; PostgreSQL never applies half of one), the cursor and pending
/// rows roll back together and the events are delivered again: at-least-once holds, as after
/// a lost ack. Publishes, dead letters, re-drives and purges keep synchronous commit: losing
/// one of those would lose an event or bring a purged one back. Without it every delivered
/// event would wait for two WAL flushes, its fetch's and its ack's.
const DELIVERY_STATE_ASYNC_COMMIT: &str = "set_config('synchronous_commit', 'off', true) AS async_commit";

/// What a fetch needs to know about a group before handing anything out, read in one
/// statement (each statement is a round trip the publish-to-deliver latency pays).
#[derive(sqlx::FromRow)]
struct GroupState {
    /// Deliveries outstanding within their deadline: the pending slots in use.
    busy: i64,
    /// The earliest deadline or due time among the group's pending deliveries.
    due_ms_min: Option<i64>,
    /// The last committed sequence.
    head: i64,
}

/// A group's row with its [`GroupState`].
#[derive(sqlx::FromRow)]
struct GroupWithState {
    #[sqlx(flatten)]
    group: GroupRow,
    #[sqlx(flatten)]
    state: GroupState,
}

/// The group `(tenant, name)` and its [`GroupState`] at `now`, for a fetch. On SQLite (one
/// writer, nothing to lock) that is one statement; on PostgreSQL the group's row is locked
/// first and the state read after, and the transaction commits without waiting for its WAL
/// flush (see [`DELIVERY_STATE_ASYNC_COMMIT`]).
async fn open_group(
    tx: &mut Tx,
    tenant: &TenantId,
    name: &str,
    now: i64,
) -> Result<Option<(Group, GroupState)>, sqlx::Error> {
    if let Tx::Sqlite(c) = tx {
        let sql = format!(
            "SELECT {GROUP_COLUMNS}, \
                 (SELECT COALESCE(SUM(CASE WHEN p.outstanding AND p.due_ms > $3 THEN 1 ELSE 0 END), 0) \
                  FROM bus_pending p WHERE p.consumer_id = bus_consumers.consumer_id) AS busy, \
                 (SELECT MIN(p.due_ms) FROM bus_pending p WHERE p.consumer_id = bus_consumers.consumer_id) \
                  AS due_ms_min, \
                 (SELECT last_seq FROM bus_meta WHERE id = 1) AS head \
                 FROM bus_consumers WHERE tenant = $1 AND name = $2"
        );
        let row: Option<GroupWithState> =
            sqlx::query_as(&sql).bind(tenant.as_str()).bind(name).bind(now).fetch_optional(&mut **c).await?;
        return row.map(|row| Ok((Group::try_from(row.group)?, row.state))).transpose();
    }
    // PostgreSQL: lock first, so the state read after is the state this fetch works on.
    let Some(group) = lock_group(tx, tenant, name).await? else {
        return Ok(None);
    };
    let state = on_tx!(tx, |c| {
        sqlx::query_as(&format!(
            "SELECT COALESCE(SUM(CASE WHEN outstanding AND due_ms > $2 THEN 1 ELSE 0 END), 0) AS busy, \
                 MIN(due_ms) AS due_ms_min, (SELECT last_seq FROM bus_meta WHERE id = 1) AS head, \
                 {DELIVERY_STATE_ASYNC_COMMIT} FROM bus_pending WHERE consumer_id = $1"
        ))
        .bind(group.id)
        .bind(now)
        .fetch_one(&mut **c)
        .await?
    });
    Ok(Some((group, state)))
}

/// The last committed sequence (the publish lock holds it on PostgreSQL when `locked`).
async fn head_in(tx: &mut Tx, locked: bool) -> Result<i64, sqlx::Error> {
    Ok(on_tx!(tx, |c, lock| {
        let sql = format!("SELECT last_seq FROM bus_meta WHERE id = 1{}", if locked { lock } else { "" });
        sqlx::query_scalar::<_, i64>(&sql).fetch_one(&mut **c).await?
    }))
}

/// Moves the group's deliveries whose last allowed delivery ended (deadline passed or
/// nacked) to its dead-letter queue; returns how many.
async fn dead_letter_expired(tx: &mut Tx, group: &Group, now: i64) -> Result<u64, sqlx::Error> {
    let seqs: Vec<i64> = on_tx!(tx, |c| {
        sqlx::query_scalar(
            "SELECT seq FROM bus_pending WHERE consumer_id = $1 AND due_ms <= $2 AND delivery >= $3 \
             ORDER BY seq LIMIT $4",
        )
        .bind(group.id)
        .bind(now)
        .bind(i64::from(group.spec.deliveries_max))
        .bind(DEAD_LETTER_MOVES_MAX)
        .fetch_all(&mut **c)
        .await?
    });
    dead_letter(tx, group, &seqs, "deliveries_max", now).await
}

/// Moves these pending deliveries of `group` to its dead-letter queue with `reason`.
async fn dead_letter(tx: &mut Tx, group: &Group, seqs: &[i64], reason: &str, now: i64) -> Result<u64, sqlx::Error> {
    if seqs.is_empty() {
        return Ok(0);
    }
    let n = i64::try_from(seqs.len()).unwrap_or(i64::MAX);
    let tenant = group.spec.tenant.as_str();
    let moved = on_tx!(tx, |c| {
        // A block of per-tenant ids; holes (an event deleted meanwhile) are harmless.
        let last: i64 = sqlx::query_scalar(
            "INSERT INTO bus_tenants (tenant, dead_letter_last) VALUES ($1, $2) ON CONFLICT (tenant) \
             DO UPDATE SET dead_letter_last = bus_tenants.dead_letter_last + excluded.dead_letter_last \
             RETURNING dead_letter_last",
        )
        .bind(tenant)
        .bind(n)
        .fetch_one(&mut **c)
        .await?;
        let mut q = QueryBuilder::new(
            "INSERT INTO bus_dead_letters (tenant, id, consumer_id, consumer, seq, event_id, subject, payload, \
             source, time_ms, deliveries, reason, at_ms) SELECT e.tenant, ",
        );
        q.push_bind(last - n)
            .push(" + ROW_NUMBER() OVER (ORDER BY p.seq), p.consumer_id, ")
            .push_bind(group.spec.name.as_str())
            .push(", p.seq, e.id, e.subject, e.payload, e.source, e.time_ms, p.delivery, ")
            .push_bind(reason)
            .push(", ")
            .push_bind(now)
            .push(" FROM bus_pending p JOIN bus_events e ON e.seq = p.seq WHERE p.consumer_id = ")
            .push_bind(group.id)
            .push(" AND p.seq IN ");
        push_list!(q, seqs);
        let moved = q.build().execute(&mut **c).await?.rows_affected();
        let mut q = QueryBuilder::new("DELETE FROM bus_pending WHERE consumer_id = ");
        q.push_bind(group.id).push(" AND seq IN ");
        push_list!(q, seqs);
        q.build().execute(&mut **c).await?;
        moved
    });
    Ok(moved)
}

/// Hands out up to `max` deliveries of `group`: due redeliveries first, then new events after
/// the cursor, within `pending_max`. The flag says the group had no free pending slot.
async fn deliver(
    tx: &mut Tx,
    group: &mut Group,
    max: u32,
    now: i64,
    state: &GroupState,
    due_now: bool,
) -> Result<(Vec<Delivery>, bool), sqlx::Error> {
    let room = (i64::from(group.spec.pending_max) - state.busy).max(0);
    let mut slots = room.min(i64::from(max));
    if slots == 0 {
        return Ok((Vec::new(), room == 0));
    }
    let nonce = nonce();
    let mut out = Vec::new();
    let spec = &group.spec;
    let deadline = |delivery: i64| {
        let n = u32::try_from(delivery).unwrap_or(u32::MAX);
        now.saturating_add(ms(ack_deadline_ms(spec, n)))
    };
    let delivery_of = |event: StoredEvent, delivery: i64| Delivery {
        token: Token { consumer_id: group.id, seq: ms(event.seq), delivery, nonce }.encode(),
        event,
        delivery: u32::try_from(delivery).unwrap_or(u32::MAX),
        ack_deadline_ms: deadline(delivery),
    };

    // (1) Due redeliveries, in sequence order.
    let due: Vec<DueRow> = if !due_now {
        Vec::new()
    } else {
        on_tx!(tx, |c| {
            let sql = format!(
                "SELECT p.delivery, {EVENT_COLUMNS} FROM bus_pending p JOIN bus_events e ON e.seq = p.seq \
             WHERE p.consumer_id = $1 AND p.due_ms <= $2 AND p.delivery < $3 ORDER BY p.seq LIMIT $4"
            );
            sqlx::query_as(&sql)
                .bind(group.id)
                .bind(now)
                .bind(i64::from(spec.deliveries_max))
                .bind(slots)
                .fetch_all(&mut **c)
                .await?
        })
    };
    let mut by_delivery: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for row in due {
        let delivery = row.delivery + 1;
        by_delivery.entry(delivery).or_default().push(row.event.seq);
        out.push(delivery_of(StoredEvent::try_from(row.event)?, delivery));
    }
    for (delivery, seqs) in &by_delivery {
        on_tx!(tx, |c| {
            let mut q = QueryBuilder::new("UPDATE bus_pending SET delivery = ");
            q.push_bind(*delivery)
                .push(", outstanding = ")
                .push_bind(true)
                .push(", due_ms = ")
                .push_bind(deadline(*delivery))
                .push(", nonce = ")
                .push_bind(nonce)
                .push(" WHERE consumer_id = ")
                .push_bind(group.id)
                .push(" AND seq IN ");
            push_list!(q, seqs);
            q.build().execute(&mut **c).await?;
        });
    }
    slots -= i64::try_from(out.len()).unwrap_or(0);

    // (2) New events after the cursor, up to the committed head.
    let head = state.head;
    let filter = subject_sql(&spec.filter);
    let mut cursor = group.cursor;
    let mut fresh: Vec<i64> = Vec::new();
    for _ in 0..FETCH_SCAN_ROUNDS_MAX {
        if slots == 0 || cursor >= head {
            break;
        }
        let upper = head.min(cursor.saturating_add(FETCH_SCAN_SEQS_MAX));
        let rows: Vec<EventRow> = on_tx!(tx, |c| {
            let mut q = QueryBuilder::new(format!("SELECT {EVENT_COLUMNS} FROM bus_events e WHERE e.tenant = "));
            q.push_bind(spec.tenant.as_str())
                .push(" AND e.seq > ")
                .push_bind(cursor)
                .push(" AND e.seq <= ")
                .push_bind(upper);
            push_subject!(q, &filter, "e.subject");
            q.push(" ORDER BY e.seq LIMIT ").push_bind(slots);
            q.build_query_as().fetch_all(&mut **c).await?
        });
        let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= slots;
        cursor = if full { rows.last().map_or(upper, |r| r.seq) } else { upper };
        for row in rows {
            if subject_matches(&spec.filter, &row.subject) {
                fresh.push(row.seq);
                out.push(delivery_of(StoredEvent::try_from(row)?, 1));
                slots -= 1;
            }
        }
    }
    if !fresh.is_empty() {
        let due_ms = deadline(1);
        on_tx!(tx, |c| {
            for chunk in fresh.chunks(SQLITE_ROWS_PER_STATEMENT_MAX) {
                let mut q = QueryBuilder::new(
                    "INSERT INTO bus_pending (consumer_id, seq, delivery, outstanding, due_ms, nonce) ",
                );
                q.push_values(chunk, |mut row, seq| {
                    row.push_bind(group.id)
                        .push_bind(*seq)
                        .push_bind(1_i64)
                        .push_bind(true)
                        .push_bind(due_ms)
                        .push_bind(nonce);
                });
                q.build().execute(&mut **c).await?;
            }
        });
    }
    if cursor != group.cursor {
        on_tx!(tx, |c| {
            sqlx::query("UPDATE bus_consumers SET cursor_seq = $1 WHERE consumer_id = $2")
                .bind(cursor)
                .bind(group.id)
                .execute(&mut **c)
                .await?;
        });
        group.cursor = cursor;
    }
    Ok((out, false))
}

/// Queues these sequences of `consumer_id` for delivery again, counting from zero.
async fn queue_again(tx: &mut Tx, consumer_id: i64, seqs: &[i64], now: i64) -> Result<(), sqlx::Error> {
    on_tx!(tx, |c| {
        for chunk in seqs.chunks(SQLITE_ROWS_PER_STATEMENT_MAX) {
            let mut q =
                QueryBuilder::new("INSERT INTO bus_pending (consumer_id, seq, delivery, outstanding, due_ms, nonce) ");
            q.push_values(chunk, |mut row, seq| {
                row.push_bind(consumer_id)
                    .push_bind(*seq)
                    .push_bind(0_i64)
                    .push_bind(false)
                    .push_bind(now)
                    .push_bind(0_i64);
            });
            q.push(
                " ON CONFLICT (consumer_id, seq) DO UPDATE SET delivery = 0, outstanding = excluded.outstanding, \
                 due_ms = excluded.due_ms, nonce = 0",
            );
            q.build().execute(&mut **c).await?;
        }
    });
    Ok(())
}

impl Committer {
    /// Commits the queued publish calls, group by group, until every sender is gone.
    async fn serve(self, mut jobs: mpsc::Receiver<PublishJob>) {
        // A batch that did not fit the previous group opens the next one.
        let mut held: Option<PublishJob> = None;
        loop {
            let first = match held.take() {
                Some(job) => job,
                None => match jobs.recv().await {
                    Some(job) => job,
                    None => return,
                },
            };
            let mut events = first.events.len();
            let mut bytes = payload_bytes(&first.events);
            let mut group = vec![first];
            // Everything already waiting, without waiting for more.
            while let Ok(job) = jobs.try_recv() {
                let (more, more_bytes) = (job.events.len(), payload_bytes(&job.events));
                if events + more > GROUP_COMMIT_EVENTS_MAX || bytes + more_bytes > GROUP_COMMIT_PAYLOAD_BYTES_MAX {
                    held = Some(job);
                    break;
                }
                events += more;
                bytes += more_bytes;
                group.push(job);
            }
            self.commit_group(group).await;
        }
    }

    /// Commits these publish calls as one transaction and answers each with its own part.
    async fn commit_group(&self, group: Vec<PublishJob>) {
        let mut events: Vec<EventIn> = Vec::new();
        let mut callers = Vec::with_capacity(group.len());
        for job in group {
            // A caller that gave up before its commit started is not published for.
            if job.answer.is_closed() {
                continue;
            }
            callers.push((job.events.len(), job.answer));
            events.extend(job.events);
        }
        if callers.is_empty() {
            return;
        }
        match retrying("bus.publish", || self.transaction(&events)).await {
            Ok(answer) => {
                if answer.iter().any(|p| matches!(p, Published::Accepted { .. })) {
                    self.wake.notify_waiters();
                }
                let mut answer = answer.into_iter();
                for (n, caller) in callers {
                    // A caller that stopped waiting meanwhile misses nothing it could use.
                    let _ = caller.send(Ok(answer.by_ref().take(n).collect()));
                }
            }
            Err(err) => {
                for (_, caller) in callers {
                    let _ = caller.send(Err(copy_error(&err)));
                }
            }
        }
    }

    /// One transaction publishing `events` in order (the publish lock taken first).
    async fn transaction(&self, events: &[EventIn]) -> Result<Vec<Published>, sqlx::Error> {
        let mut tx = begin(&self.store).await?;
        // Taking the sequence row first serialises publishes: the dedupe lookup below
        // sees every earlier batch, and sequences follow commit order.
        let base = head_in(&mut tx, true).await?;
        let now = self.clock.now_ms();
        let window_start = now.saturating_sub(self.dedupe_window_ms);
        let mut known: HashMap<DedupeKey<'_>, i64> = HashMap::with_capacity(events.len());
        let found: Vec<(String, String, i64, i64)> = match &mut tx {
            Tx::Sqlite(c) => {
                let mut found = Vec::new();
                for chunk in events.chunks(SQLITE_ROWS_PER_STATEMENT_MAX) {
                    let mut q = QueryBuilder::<sqlx::Sqlite>::new("WITH v(tenant, id) AS (");
                    q.push_values(chunk, |mut row, e| {
                        row.push_bind(e.tenant.as_str()).push_bind(e.id.as_str());
                    });
                    q.push(
                        ") SELECT d.tenant, d.id, d.seq, d.at_ms FROM v \
                             JOIN bus_dedupe d ON d.tenant = v.tenant AND d.id = v.id",
                    );
                    found.extend(q.build_query_as().fetch_all(&mut **c).await?);
                }
                found
            }
            Tx::Postgres(c) => {
                let tenants: Vec<&str> = events.iter().map(|e| e.tenant.as_str()).collect();
                let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
                sqlx::query_as(
                    "SELECT d.tenant, d.id, d.seq, d.at_ms FROM bus_dedupe d \
                         JOIN UNNEST($1::text[], $2::text[]) AS v(tenant, id) \
                         ON d.tenant = v.tenant AND d.id = v.id",
                )
                .bind(&tenants)
                .bind(&ids)
                .fetch_all(&mut **c)
                .await?
            }
        };
        let found: HashMap<(String, String), i64> = found
            .into_iter()
            .filter(|(_, _, _, at_ms)| *at_ms >= window_start)
            .map(|(tenant, id, seq, _)| ((tenant, id), seq))
            .collect();
        let mut answer = Vec::with_capacity(events.len());
        let mut accepted: Vec<(i64, &EventIn)> = Vec::with_capacity(events.len());
        let mut next = base;
        for event in events {
            let key = (event.tenant.as_str(), event.id.as_str());
            let earlier =
                known.get(&key).copied().or_else(|| found.get(&(key.0.to_string(), key.1.to_string())).copied());
            if let Some(seq) = earlier {
                answer.push(Published::Duplicate { seq: u64::try_from(seq).unwrap_or(0) });
                continue;
            }
            next += 1;
            known.insert(key, next);
            accepted.push((next, event));
            answer.push(Published::Accepted { seq: u64::try_from(next).unwrap_or(0) });
        }
        if !accepted.is_empty() {
            match &mut tx {
                Tx::Sqlite(c) => {
                    for chunk in accepted.chunks(SQLITE_ROWS_PER_STATEMENT_MAX) {
                        let mut q = QueryBuilder::<sqlx::Sqlite>::new(
                            "INSERT INTO bus_events (seq, tenant, subject, id, payload, source, time_ms) ",
                        );
                        q.push_values(chunk, |mut row, (seq, e)| {
                            row.push_bind(*seq)
                                .push_bind(e.tenant.as_str())
                                .push_bind(e.subject.as_str())
                                .push_bind(e.id.as_str())
                                .push_bind(e.payload.as_slice())
                                .push_bind(e.source.as_str())
                                .push_bind(e.time_ms);
                        });
                        q.build().execute(&mut **c).await?;
                        let mut q =
                            QueryBuilder::<sqlx::Sqlite>::new("INSERT INTO bus_dedupe (tenant, id, seq, at_ms) ");
                        q.push_values(chunk, |mut row, (seq, e)| {
                            row.push_bind(e.tenant.as_str()).push_bind(e.id.as_str()).push_bind(*seq).push_bind(now);
                        });
                        q.push(" ON CONFLICT (tenant, id) DO UPDATE SET seq = excluded.seq, at_ms = excluded.at_ms");
                        q.build().execute(&mut **c).await?;
                    }
                    sqlx::query("UPDATE bus_meta SET last_seq = $1 WHERE id = 1").bind(next).execute(&mut **c).await?;
                }
                Tx::Postgres(c) => {
                    let seqs: Vec<i64> = accepted.iter().map(|(seq, _)| *seq).collect();
                    let tenants: Vec<&str> = accepted.iter().map(|(_, e)| e.tenant.as_str()).collect();
                    let subjects: Vec<&str> = accepted.iter().map(|(_, e)| e.subject.as_str()).collect();
                    let ids: Vec<&str> = accepted.iter().map(|(_, e)| e.id.as_str()).collect();
                    let payloads: Vec<&[u8]> = accepted.iter().map(|(_, e)| e.payload.as_slice()).collect();
                    let sources: Vec<&str> = accepted.iter().map(|(_, e)| e.source.as_str()).collect();
                    let times: Vec<i64> = accepted.iter().map(|(_, e)| e.time_ms).collect();
                    // One statement for the log, the dedupe ids and the head: fewer round trips
                    // while the publish lock is held.
                    sqlx::query(
                        "WITH logged AS (INSERT INTO bus_events (seq, tenant, subject, id, payload, source, time_ms) \
                         SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], \
                         $5::bytea[], $6::text[], $7::bigint[])), \
                         remembered AS (INSERT INTO bus_dedupe (tenant, id, seq, at_ms) \
                         SELECT v.tenant, v.id, v.seq, $8 FROM UNNEST($2::text[], $4::text[], $1::bigint[]) \
                         AS v(tenant, id, seq) \
                         ON CONFLICT (tenant, id) DO UPDATE SET seq = excluded.seq, at_ms = excluded.at_ms) \
                         UPDATE bus_meta SET last_seq = $9 WHERE id = 1",
                    )
                    .bind(&seqs)
                    .bind(&tenants)
                    .bind(&subjects)
                    .bind(&ids)
                    .bind(&payloads)
                    .bind(&sources)
                    .bind(&times)
                    .bind(now)
                    .bind(next)
                    .execute(&mut **c)
                    .await?;
                }
            }
        }
        commit(tx).await?;
        Ok(answer)
    }
}

/// Total payload bytes of a batch.
fn payload_bytes(events: &[EventIn]) -> usize {
    events.iter().map(|e| e.payload.len()).sum()
}

/// The same failure, for each caller of a failed group commit.
fn copy_error(err: &BusError) -> BusError {
    match err {
        BusError::Unavailable(detail) => BusError::Unavailable(detail.clone()),
        BusError::Backend(detail) => BusError::Backend(detail.clone()),
        other => BusError::Backend(other.to_string()),
    }
}

/// An event's dedupe key.
type DedupeKey<'a> = (&'a str, &'a str);

#[async_trait]
impl Bus for EmbeddedBus {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn publish(&self, events: &[EventIn]) -> Result<Vec<Published>, BusError> {
        if events.len() > BATCH_EVENTS_MAX {
            return Err(BusError::LimitExceeded(format!("a batch has at most {BATCH_EVENTS_MAX} events")));
        }
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // The committer commits this batch with whatever else is waiting (see the module doc).
        let (answer, answered) = oneshot::channel();
        let job = PublishJob { events: events.to_vec(), answer };
        let stopped = || BusError::Unavailable("bus.publish: the publish committer stopped".into());
        self.publish_queue().send(job).await.map_err(|_| stopped())?;
        answered.await.unwrap_or_else(|_| Err(stopped()))
    }

    async fn put_consumer(&self, spec: &ConsumerSpec) -> Result<ConsumerInfo, BusError> {
        let backoff = serde_json::to_string(&spec.backoff_ms).map_err(|e| BusError::Backend(e.to_string()))?;
        let start = serde_json::to_string(&spec.start).map_err(|e| BusError::Backend(e.to_string()))?;
        let tenant = spec.tenant.as_str();
        let limit = self.config.consumers_per_tenant_max;
        let group = self
            .run("bus.put_consumer", || async {
                let mut tx = self.begin().await?;
                // An existing group's row is taken first (fetches and acks take the group,
                // then the tenant's row: the same order, so no deadlock).
                let mut existing = lock_group(&mut tx, &spec.tenant, &spec.name).await?;
                if existing.is_none() {
                    // Taking the tenant's row serialises group creation per tenant on
                    // PostgreSQL, so two kernels cannot both pass the limit check; a group
                    // another kernel created meanwhile is visible after it.
                    on_tx!(&mut tx, |c| {
                        sqlx::query(
                            "INSERT INTO bus_tenants (tenant, dead_letter_last) VALUES ($1, 0) ON CONFLICT (tenant) \
                             DO UPDATE SET dead_letter_last = bus_tenants.dead_letter_last",
                        )
                        .bind(tenant)
                        .execute(&mut **c)
                        .await?;
                    });
                    existing = lock_group(&mut tx, &spec.tenant, &spec.name).await?;
                }
                if let Some(existing) = existing {
                    if existing.spec.filter != spec.filter {
                        return Ok(Err(BusError::Conflict(format!(
                            "consumer group {} reads {}; its filter cannot change (delete and re-create it)",
                            spec.name, existing.spec.filter
                        ))));
                    }
                    on_tx!(&mut tx, |c| {
                        sqlx::query(
                            "UPDATE bus_consumers SET ack_wait_ms = $1, deliveries_max = $2, backoff_ms = $3, \
                             pending_max = $4 WHERE consumer_id = $5",
                        )
                        .bind(ms(spec.ack_wait_ms))
                        .bind(i64::from(spec.deliveries_max))
                        .bind(&backoff)
                        .bind(i64::from(spec.pending_max))
                        .bind(existing.id)
                        .execute(&mut **c)
                        .await?;
                    });
                    commit(tx).await?;
                    let group = Group { spec: ConsumerSpec { start: existing.spec.start, ..spec.clone() }, ..existing };
                    return Ok(Ok(group));
                }
                let count: i64 = on_tx!(&mut tx, |c| {
                    sqlx::query_scalar("SELECT COUNT(*) FROM bus_consumers WHERE tenant = $1")
                        .bind(tenant)
                        .fetch_one(&mut **c)
                        .await?
                });
                if count >= i64::from(limit) {
                    return Ok(Err(BusError::LimitExceeded(format!(
                        "a tenant has at most {limit} consumer groups (consumers_per_tenant_max)"
                    ))));
                }
                let head = head_in(&mut tx, false).await?;
                let cursor = match spec.start {
                    StartAt::New => head,
                    StartAt::All => 0,
                    StartAt::Seq(seq) => ms(seq).saturating_sub(1).min(head),
                    StartAt::TimeMs(at) => {
                        let first: Option<i64> = on_tx!(&mut tx, |c| {
                            sqlx::query_scalar("SELECT MIN(seq) FROM bus_events WHERE tenant = $1 AND time_ms >= $2")
                                .bind(tenant)
                                .bind(at)
                                .fetch_one(&mut **c)
                                .await?
                        });
                        first.map_or(head, |seq| seq - 1)
                    }
                };
                let now = self.clock.now_ms();
                let sql = format!(
                    "INSERT INTO bus_consumers (tenant, name, filter, ack_wait_ms, deliveries_max, backoff_ms, \
                     pending_max, start, cursor_seq, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                     RETURNING {GROUP_COLUMNS}"
                );
                let row: GroupRow = on_tx!(&mut tx, |c| {
                    sqlx::query_as(&sql)
                        .bind(tenant)
                        .bind(&spec.name)
                        .bind(&spec.filter)
                        .bind(ms(spec.ack_wait_ms))
                        .bind(i64::from(spec.deliveries_max))
                        .bind(&backoff)
                        .bind(i64::from(spec.pending_max))
                        .bind(&start)
                        .bind(cursor)
                        .bind(now)
                        .fetch_one(&mut **c)
                        .await?
                });
                commit(tx).await?;
                Ok(Ok(Group::try_from(row)?))
            })
            .await??;
        self.info(group).await
    }

    async fn get_consumer(&self, tenant: &TenantId, name: &str) -> Result<Option<ConsumerInfo>, BusError> {
        match self.group(tenant, name).await? {
            Some(group) => Ok(Some(self.info(group).await?)),
            None => Ok(None),
        }
    }

    async fn list_consumers(&self, tenant: &TenantId) -> Result<Vec<ConsumerInfo>, BusError> {
        let sql = format!("SELECT {GROUP_COLUMNS} FROM bus_consumers WHERE tenant = $1 ORDER BY name LIMIT $2");
        let limit = i64::from(self.config.consumers_per_tenant_max);
        let groups: Vec<Group> = self
            .run("bus.list_consumers", || async {
                on_read!(self, |pool| {
                    let rows: Vec<GroupRow> =
                        sqlx::query_as(&sql).bind(tenant.as_str()).bind(limit).fetch_all(pool).await?;
                    rows.into_iter().map(Group::try_from).collect::<Result<Vec<_>, _>>()
                })
            })
            .await?;
        let mut out = Vec::with_capacity(groups.len());
        for group in groups {
            out.push(self.info(group).await?);
        }
        Ok(out)
    }

    async fn delete_consumer(&self, tenant: &TenantId, name: &str) -> Result<bool, BusError> {
        self.run("bus.delete_consumer", || async {
            let mut tx = self.begin().await?;
            let Some(group) = lock_group(&mut tx, tenant, name).await? else {
                return Ok(false);
            };
            on_tx!(&mut tx, |c| {
                for sql in [
                    "DELETE FROM bus_pending WHERE consumer_id = $1",
                    "DELETE FROM bus_dead_letters WHERE consumer_id = $1",
                    "DELETE FROM bus_consumers WHERE consumer_id = $1",
                ] {
                    sqlx::query(sql).bind(group.id).execute(&mut **c).await?;
                }
            });
            commit(tx).await?;
            Ok(true)
        })
        .await
    }

    async fn fetch(
        &self,
        tenant: &TenantId,
        consumer: &str,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BusError> {
        let max = max.min(FETCH_EVENTS_MAX);
        let wait = wait.min(Duration::from_millis(FETCH_WAIT_MS_MAX));
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a publish (or an ack, for a full group) between the
            // look and the wait wakes us.
            let woken = self.wake.notified();
            let freed = self.room.notified();
            tokio::pin!(woken, freed);
            woken.as_mut().enable();
            freed.as_mut().enable();
            let fetched = self.fetch_once(tenant, consumer, max).await?;
            if !fetched.deliveries.is_empty() || max == 0 {
                return Ok(fetched.deliveries);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let mut nap = (deadline - now).min(self.poll_interval);
            if let Some(due_ms) = fetched.next_due_ms {
                let until = u64::try_from(due_ms.saturating_sub(self.clock.now_ms())).unwrap_or(0).max(1);
                nap = nap.min(Duration::from_millis(until));
            }
            if fetched.full {
                tokio::select! {
                    () = &mut woken => {}
                    () = &mut freed => {}
                    () = tokio::time::sleep(nap) => {}
                }
            } else {
                tokio::select! {
                    () = &mut woken => {}
                    () = tokio::time::sleep(nap) => {}
                }
            }
        }
    }

    async fn ack(&self, tenant: &TenantId, consumer: &str, token: &str, kind: AckKind) -> Result<(), BusError> {
        let Some(parsed) = Token::parse(token) else {
            return Err(BusError::StaleToken("malformed token".into()));
        };
        if kind == AckKind::Ack {
            // The common case in one statement, without the group's lock: the conditions name
            // the current delivery exactly, and on PostgreSQL a concurrent redelivery holds the
            // row until it commits, after which they no longer match. When nothing matches, the
            // transaction below tells a missing group from a stale token.
            let done = self
                .run("bus.ack", || async {
                    const DELETE: &str = "DELETE FROM bus_pending WHERE consumer_id = $1 AND seq = $2 \
                         AND delivery = $3 AND nonce = $4 AND outstanding AND consumer_id = \
                         (SELECT consumer_id FROM bus_consumers WHERE tenant = $5 AND name = $6)";
                    macro_rules! delete {
                        ($pool:expr, $sql:expr) => {
                            sqlx::query($sql)
                                .bind(parsed.consumer_id)
                                .bind(parsed.seq)
                                .bind(parsed.delivery)
                                .bind(parsed.nonce)
                                .bind(tenant.as_str())
                                .bind(consumer)
                                .execute($pool)
                                .await
                                .map(|done| done.rows_affected())
                        };
                    }
                    match &self.store.pools {
                        Pools::Sqlite { write, .. } => delete!(write, DELETE),
                        Pools::Postgres(pool) => {
                            // The statement's own transaction commits asynchronously.
                            let sql = format!("{DELETE} AND (SELECT {DELIVERY_STATE_ASYNC_COMMIT}) IS NOT NULL");
                            delete!(pool, &sql)
                        }
                    }
                })
                .await?;
            if done == 1 {
                self.room.notify_waiters();
                return Ok(());
            }
        }
        let outcome = self
            .run("bus.ack", || async {
                let mut tx = self.begin().await?;
                let Some(group) = lock_group(&mut tx, tenant, consumer).await? else {
                    return Ok(Err(BusError::NotFound("consumer")));
                };
                let stale = || Ok(Err(BusError::StaleToken("the delivery is not current".into())));
                if parsed.consumer_id != group.id {
                    return stale();
                }
                let row: Option<(i64, bool, i64)> = on_tx!(&mut tx, |c| {
                    sqlx::query_as(
                        "SELECT delivery, outstanding, nonce FROM bus_pending WHERE consumer_id = $1 AND seq = $2",
                    )
                    .bind(group.id)
                    .bind(parsed.seq)
                    .fetch_optional(&mut **c)
                    .await?
                });
                match row {
                    Some((delivery, true, nonce)) if delivery == parsed.delivery && nonce == parsed.nonce => {}
                    _ => return stale(),
                }
                let now = self.clock.now_ms();
                let last = parsed.delivery >= i64::from(group.spec.deliveries_max);
                let reschedule = match kind {
                    AckKind::Ack => {
                        on_tx!(&mut tx, |c| {
                            sqlx::query("DELETE FROM bus_pending WHERE consumer_id = $1 AND seq = $2")
                                .bind(group.id)
                                .bind(parsed.seq)
                                .execute(&mut **c)
                                .await?;
                        });
                        None
                    }
                    AckKind::Term => {
                        dead_letter(&mut tx, &group, &[parsed.seq], "terminated", now).await?;
                        None
                    }
                    AckKind::Nack { .. } if last => {
                        dead_letter(&mut tx, &group, &[parsed.seq], "deliveries_max", now).await?;
                        None
                    }
                    AckKind::Nack { delay_ms } => Some((false, now.saturating_add(ms(delay_ms)))),
                    AckKind::InProgress => {
                        let n = u32::try_from(parsed.delivery).unwrap_or(u32::MAX);
                        Some((true, now.saturating_add(ms(ack_deadline_ms(&group.spec, n)))))
                    }
                };
                if let Some((outstanding, due_ms)) = reschedule {
                    on_tx!(&mut tx, |c| {
                        sqlx::query(
                            "UPDATE bus_pending SET outstanding = $1, due_ms = $2 WHERE consumer_id = $3 AND seq = $4",
                        )
                        .bind(outstanding)
                        .bind(due_ms)
                        .bind(group.id)
                        .bind(parsed.seq)
                        .execute(&mut **c)
                        .await?;
                    });
                }
                commit(tx).await?;
                Ok(Ok(()))
            })
            .await?;
        if outcome.is_ok() {
            match kind {
                // A nacked delivery becomes due: waiting fetches look again.
                AckKind::Nack { .. } => self.wake.notify_waiters(),
                // A freed pending slot lets a fetch that found its group full go on.
                AckKind::Ack | AckKind::Term => self.room.notify_waiters(),
                AckKind::InProgress => {}
            }
        }
        outcome
    }

    async fn read(&self, tenant: &TenantId, range: &ReadRange) -> Result<Vec<StoredEvent>, BusError> {
        let limit = range.limit.min(READ_EVENTS_MAX) as usize;
        let filter = range.filter.as_deref().map(subject_sql);
        let mut out: Vec<StoredEvent> = Vec::new();
        let mut after = range.from_seq.map_or(0, |s| ms(s).saturating_sub(1));
        for _ in 0..READ_SCAN_ROUNDS_MAX {
            if out.len() >= limit {
                break;
            }
            let want = i64::try_from(limit - out.len()).unwrap_or(i64::MAX);
            let rows: Vec<EventRow> = self
                .run("bus.read", || async {
                    on_read!(self, |pool| {
                        let mut q =
                            QueryBuilder::new(format!("SELECT {EVENT_COLUMNS} FROM bus_events e WHERE e.tenant = "));
                        q.push_bind(tenant.as_str()).push(" AND e.seq > ").push_bind(after);
                        if let Some(to) = range.to_seq {
                            q.push(" AND e.seq <= ").push_bind(ms(to));
                        }
                        if let Some(from) = range.from_ms {
                            q.push(" AND e.time_ms >= ").push_bind(from);
                        }
                        if let Some(to) = range.to_ms {
                            q.push(" AND e.time_ms <= ").push_bind(to);
                        }
                        if let Some(filter) = &filter {
                            push_subject!(q, filter, "e.subject");
                        }
                        q.push(" ORDER BY e.seq LIMIT ").push_bind(want);
                        q.build_query_as().fetch_all(pool).await
                    })
                })
                .await?;
            let got = rows.len();
            for row in rows {
                after = row.seq;
                if range.filter.as_deref().is_none_or(|p| subject_matches(p, &row.subject)) {
                    out.push(StoredEvent::try_from(row).map_err(|e| bus_error("bus.read", e))?);
                }
            }
            if i64::try_from(got).unwrap_or(0) < want {
                break;
            }
        }
        Ok(out)
    }

    async fn requeue(&self, tenant: &TenantId, consumer: &str, seqs: &[u64]) -> Result<u64, BusError> {
        if seqs.len() > READ_EVENTS_MAX as usize {
            return Err(BusError::LimitExceeded(format!("a requeue takes at most {READ_EVENTS_MAX} events")));
        }
        let mut wanted: Vec<i64> = seqs.iter().map(|s| ms(*s)).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let queued = self
            .run("bus.requeue", || async {
                let mut tx = self.begin().await?;
                let Some(group) = lock_group(&mut tx, tenant, consumer).await? else {
                    return Ok(None);
                };
                if wanted.is_empty() {
                    return Ok(Some(0));
                }
                // Events past the cursor are still to come: they are not queued twice.
                let mut found: Vec<(i64, String)> = Vec::new();
                for chunk in wanted.chunks(SQLITE_ROWS_PER_STATEMENT_MAX) {
                    let rows: Vec<(i64, String)> = on_tx!(&mut tx, |c| {
                        let mut q = QueryBuilder::new("SELECT seq, subject FROM bus_events WHERE tenant = ");
                        q.push_bind(tenant.as_str()).push(" AND seq <= ").push_bind(group.cursor).push(" AND seq IN ");
                        push_list!(q, chunk);
                        q.build_query_as().fetch_all(&mut **c).await?
                    });
                    found.extend(rows);
                }
                let take: Vec<i64> = found
                    .into_iter()
                    .filter(|(_, subject)| subject_matches(&group.spec.filter, subject))
                    .map(|(seq, _)| seq)
                    .collect();
                queue_again(&mut tx, group.id, &take, self.clock.now_ms()).await?;
                commit(tx).await?;
                Ok(Some(u64::try_from(take.len()).unwrap_or(0)))
            })
            .await?;
        let queued = queued.ok_or(BusError::NotFound("consumer"))?;
        if queued > 0 {
            self.wake.notify_waiters();
        }
        Ok(queued)
    }

    async fn dead_letters(
        &self,
        tenant: &TenantId,
        consumer: Option<&str>,
        after: u64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, BusError> {
        let consumer_id = match consumer {
            Some(name) => Some(self.group(tenant, name).await?.ok_or(BusError::NotFound("consumer"))?.id),
            None => None,
        };
        let limit = i64::from(limit.min(READ_EVENTS_MAX));
        let rows: Vec<DeadLetterRow> = self
            .run("bus.dead_letters", || async {
                on_read!(self, |pool| {
                    let mut q = QueryBuilder::new(format!(
                        "SELECT {DEAD_LETTER_COLUMNS} FROM bus_dead_letters WHERE tenant = "
                    ));
                    q.push_bind(tenant.as_str());
                    if let Some(id) = consumer_id {
                        q.push(" AND consumer_id = ").push_bind(id);
                    }
                    q.push(" AND id > ").push_bind(ms(after)).push(" ORDER BY id LIMIT ").push_bind(limit);
                    q.build_query_as().fetch_all(pool).await
                })
            })
            .await?;
        rows.into_iter().map(|r| DeadLetter::try_from(r).map_err(|e| bus_error("bus.dead_letters", e))).collect()
    }

    async fn dead_letter(&self, tenant: &TenantId, id: u64) -> Result<Option<DeadLetter>, BusError> {
        let sql = format!("SELECT {DEAD_LETTER_COLUMNS} FROM bus_dead_letters WHERE tenant = $1 AND id = $2");
        let row: Option<DeadLetterRow> = self
            .run("bus.dead_letter", || async {
                on_read!(self, |pool| {
                    sqlx::query_as(&sql).bind(tenant.as_str()).bind(ms(id)).fetch_optional(pool).await
                })
            })
            .await?;
        row.map(|r| DeadLetter::try_from(r).map_err(|e| bus_error("bus.dead_letter", e))).transpose()
    }

    async fn redrive(&self, tenant: &TenantId, ids: &[u64]) -> Result<u64, BusError> {
        if ids.len() > READ_EVENTS_MAX as usize {
            return Err(BusError::LimitExceeded(format!("a re-drive takes at most {READ_EVENTS_MAX} dead letters")));
        }
        let mut wanted: Vec<i64> = ids.iter().map(|s| ms(*s)).collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            return Ok(0);
        }
        let redriven = self
            .run("bus.redrive", || async {
                let mut tx = self.begin().await?;
                let mut found: Vec<(i64, i64, i64)> = Vec::new();
                for chunk in wanted.chunks(SQLITE_ROWS_PER_STATEMENT_MAX) {
                    // Only dead letters whose event is still in the log can be delivered again.
                    let rows: Vec<(i64, i64, i64)> = on_tx!(&mut tx, |c| {
                        let mut q = QueryBuilder::new(
                            "SELECT d.id, d.consumer_id, d.seq FROM bus_dead_letters d \
                             JOIN bus_events e ON e.seq = d.seq WHERE d.tenant = ",
                        );
                        q.push_bind(tenant.as_str()).push(" AND d.id IN ");
                        push_list!(q, chunk);
                        q.build_query_as().fetch_all(&mut **c).await?
                    });
                    found.extend(rows);
                }
                let mut by_group: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
                for (_, consumer_id, seq) in &found {
                    by_group.entry(*consumer_id).or_default().push(*seq);
                }
                let now = self.clock.now_ms();
                for (consumer_id, seqs) in &by_group {
                    queue_again(&mut tx, *consumer_id, seqs, now).await?;
                }
                let ids: Vec<i64> = found.iter().map(|(id, _, _)| *id).collect();
                for chunk in ids.chunks(SQLITE_ROWS_PER_STATEMENT_MAX) {
                    on_tx!(&mut tx, |c| {
                        let mut q = QueryBuilder::new("DELETE FROM bus_dead_letters WHERE tenant = ");
                        q.push_bind(tenant.as_str()).push(" AND id IN ");
                        push_list!(q, chunk);
                        q.build().execute(&mut **c).await?;
                    });
                }
                commit(tx).await?;
                Ok(u64::try_from(ids.len()).unwrap_or(0))
            })
            .await?;
        if redriven > 0 {
            self.wake.notify_waiters();
        }
        Ok(redriven)
    }

    async fn purge_dead_letters(
        &self,
        tenant: &TenantId,
        consumer: Option<&str>,
        ids: Option<&[u64]>,
    ) -> Result<u64, BusError> {
        let consumer_id = match consumer {
            Some(name) => Some(self.group(tenant, name).await?.ok_or(BusError::NotFound("consumer"))?.id),
            None => None,
        };
        if ids.is_some_and(|ids| ids.len() > READ_EVENTS_MAX as usize) {
            return Err(BusError::LimitExceeded(format!("a purge names at most {READ_EVENTS_MAX} dead letters")));
        }
        let ids: Option<Vec<i64>> = ids.map(|ids| ids.iter().map(|id| ms(*id)).collect());
        if ids.as_ref().is_some_and(Vec::is_empty) {
            return Ok(0);
        }
        self.run("bus.purge_dead_letters", || async {
            let mut tx = self.begin().await?;
            let mut purged = 0;
            let chunks: Vec<Option<&[i64]>> = match &ids {
                Some(ids) => ids.chunks(SQLITE_ROWS_PER_STATEMENT_MAX).map(Some).collect(),
                None => vec![None],
            };
            for chunk in chunks {
                purged += on_tx!(&mut tx, |c| {
                    let mut q = QueryBuilder::new("DELETE FROM bus_dead_letters WHERE tenant = ");
                    q.push_bind(tenant.as_str());
                    if let Some(id) = consumer_id {
                        q.push(" AND consumer_id = ").push_bind(id);
                    }
                    if let Some(chunk) = chunk {
                        q.push(" AND id IN ");
                        push_list!(q, chunk);
                    }
                    q.build().execute(&mut **c).await?.rows_affected()
                });
            }
            commit(tx).await?;
            Ok(purged)
        })
        .await
    }

    async fn ping(&self) -> Result<(), BusError> {
        self.head().await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_anything_else() {
        let token = Token { consumer_id: 7, seq: 123_456, delivery: 3, nonce: i64::MAX };
        assert_eq!(Token::parse(&token.encode()), Some(token));
        for bad in [
            "",
            "7-1e240-3",
            "7-1e240-3-1-9",
            "7--3-1",
            "x-1-1-1",
            "+7-1-1-1",
            "ffffffffffffffff-1-1-1",
            "11111111111111111-1-1-1",
            "7 -1-1-1",
        ] {
            assert_eq!(Token::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn subject_patterns_become_exact_or_superset_sql() {
        let check = |pattern: &str, expect: SubjectSql| assert_eq!(subject_sql(pattern), expect, "{pattern}");
        check("billing.invoice.paid", SubjectSql::Exact("billing.invoice.paid".into()));
        check(">", SubjectSql::All);
        check("*", SubjectSql::All);
        check("billing.>", SubjectSql::Like("billing.%".into()));
        check("billing.*.paid", SubjectSql::Like("billing.%.paid".into()));
        check("my_app.*", SubjectSql::Like("my\\_app.%".into()));
        check("*.a-b.>", SubjectSql::Like("%.a-b.%".into()));
    }

    #[test]
    fn the_sql_prefilter_never_drops_a_matching_subject() {
        // A LIKE evaluator for the patterns `subject_sql` makes: `%` any run, `\x` literal x.
        fn like(pattern: &[u8], text: &[u8]) -> bool {
            match pattern.split_first() {
                None => text.is_empty(),
                Some((b'%', rest)) => (0..=text.len()).any(|i| like(rest, &text[i..])),
                Some((b'\\', rest)) => {
                    rest.split_first().is_some_and(|(c, rest)| text.first() == Some(c) && like(rest, &text[1..]))
                }
                Some((c, rest)) => text.first() == Some(c) && like(rest, &text[1..]),
            }
        }
        let subjects = ["a", "a.b", "a.b.c", "a_b.c", "axb.c", "x.a.b", "a.b.c.d"];
        let patterns = ["a", "a.*", "a.>", "*.b", "a_b.*", "*.*.c", ">", "a.*.>", "x.>"];
        for pattern in patterns {
            for subject in subjects {
                let pre = match subject_sql(pattern) {
                    SubjectSql::All => true,
                    SubjectSql::Exact(s) => s == subject,
                    SubjectSql::Like(p) => like(p.as_bytes(), subject.as_bytes()),
                };
                if subject_matches(pattern, subject) {
                    assert!(pre, "{pattern} must let {subject} through");
                }
                if pattern == "a_b.*" && subject == "axb.c" {
                    assert!(!pre, "an underscore is escaped, not a wildcard");
                }
            }
        }
    }
}
