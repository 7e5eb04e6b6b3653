//! Dispatched tasks and their attempts (`tasks`, `task_attempts`).
//!
//! Every decision that two kernels (or a kernel and a late agent) could race on is one
//! conditional statement whose row count says who won: starting an attempt updates the task
//! only while this kernel owns it and it has not moved on; finishing an attempt updates the
//! attempt only while it is unfinished and still the task's current one; claiming a pull
//! attempt or an orphaned task updates it only while it is still free. On PostgreSQL the
//! losing statement waits for the winner's row lock and then matches nothing; on SQLite the
//! single writer serialises them.
//!
//! On SQLite the writes of the dispatch path (a task's insert, alone or with its first
//! attempt started, an attempt's start and end, a task's failure) go through one group
//! committer: each is applied in the order queued, in one transaction with every other write
//! queued meanwhile, and its caller is answered after that transaction commits. A write is as durable when its caller hears back as it was in a
//! transaction of its own; only the number of commits drops with the load. While writes keep
//! arriving, the committer keeps its checkout of the write connection for up to
//! [`GROUP_COMMIT_HOLD_GROUPS_MAX`] groups.
//!
//! An attempt's end is written with `RETURNING`, so the caller gets the task and the attempt
//! as stored without reading them again ([`TaskStore::finish_attempt_recorded`]).

use async_trait::async_trait;
use nops_core::agent::AgentId;
use nops_core::dispatch::{
    AttemptRecord, AttemptReport, DeliveryMode, PulledAttempt, RecordedEnd, Reported, StartVerdict, TaskRecord,
    TaskStatus, Verdict,
};
use nops_core::routing::RouteRequest;
use nops_core::store::{StoreError, TaskStore};
use nops_core::tenant::TenantId;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::{Pools, SqlStore, is_transient, parse_tenant, retry_transient, store_error};

/// Attempts to claim a pull attempt when other pollers take the candidates first.
const PULL_CLAIM_TRIES_MAX: usize = 4;
/// Task writes waiting for the SQLite group committer at once; further writers wait for room.
const TASK_WRITE_QUEUE_MAX: usize = 4_096;
/// Most task writes one group commit applies (the rest open the next group).
const GROUP_COMMIT_WRITES_MAX: usize = 256;
/// Most back-to-back groups the committer writes on one checkout of the write connection
/// before handing it back to the pool, where other writers (heartbeat flushes, the bus,
/// registrations) may be waiting for it. The pool tests a connection each time it is handed
/// back (a round trip to its thread), so while writes keep arriving it is kept.
const GROUP_COMMIT_HOLD_GROUPS_MAX: u32 = 8;

const TASK_COLUMNS: &str = "id, tenant, status, request, input, attempt_timeout_ms, attempts_max, deadline_at_ms, \
     attempt, output, error, created_at_ms, updated_at_ms, finished_at_ms, owner, lease_until_ms";

const ATTEMPT_COLUMNS: &str = "task_id, attempt, tenant, agent_id, mode, started_at_ms, timeout_at_ms, \
     delivered_at_ms, finished_at_ms, outcome, answered, error, late";

/// A task and its attempts in one statement: the task's columns, then the attempt's prefixed
/// `a_` (NULL when it has none), one row per attempt in order.
static TASK_WITH_ATTEMPTS_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let task_columns: Vec<String> = TASK_COLUMNS.split(", ").map(|c| format!("t.{c}")).collect();
    let attempt_columns: Vec<String> =
        ATTEMPT_COLUMNS.split(", ").filter(|c| *c != "task_id").map(|c| format!("a.{c} AS a_{c}")).collect();
    format!(
        "SELECT {}, {} FROM tasks t LEFT JOIN task_attempts a ON a.task_id = t.id WHERE t.id = $1 ORDER BY a.attempt",
        task_columns.join(", "),
        attempt_columns.join(", ")
    )
});

/// Ends an attempt if it is the task's current, unfinished one; returns the attempt's row.
static FINISH_ATTEMPT_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE task_attempts SET finished_at_ms = $1, outcome = $2, answered = $3, error = $4 \
         WHERE task_id = $5 AND attempt = $6 AND agent_id = $7 AND tenant = $8 AND finished_at_ms IS NULL \
         AND EXISTS (SELECT 1 FROM tasks t WHERE t.id = $5 AND t.attempt = $6 AND t.status IN ('queued', 'running')) \
         RETURNING {ATTEMPT_COLUMNS}"
    )
});
/// Finishes a task with its output; returns its row.
static SUCCEED_TASK_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE tasks SET status = 'succeeded', output = $1, error = NULL, finished_at_ms = $2, updated_at_ms = $2, \
         owner = NULL WHERE id = $3 RETURNING {TASK_COLUMNS}"
    )
});
/// Marks a task changed (an attempt of it ended without success); returns its row.
static TOUCH_TASK_SQL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("UPDATE tasks SET updated_at_ms = $1 WHERE id = $2 RETURNING {TASK_COLUMNS}"));

/// A `tasks` row.
#[derive(sqlx::FromRow)]
struct TaskRow {
    id: Uuid,
    tenant: String,
    status: String,
    request: String,
    input: String,
    attempt_timeout_ms: i64,
    attempts_max: i64,
    deadline_at_ms: i64,
    attempt: i64,
    output: Option<String>,
    error: Option<String>,
    created_at_ms: i64,
    updated_at_ms: i64,
    finished_at_ms: Option<i64>,
    owner: Option<String>,
    lease_until_ms: i64,
}

fn corrupt(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {err}"))
}

fn json(what: &str, text: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt(what, e))
}

fn to_u32(what: &str, v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|e| corrupt(what, e))
}

impl TryFrom<TaskRow> for TaskRecord {
    type Error = StoreError;

    fn try_from(row: TaskRow) -> Result<Self, StoreError> {
        Ok(TaskRecord {
            id: row.id,
            tenant: parse_tenant(&row.tenant)?,
            status: row.status.parse().map_err(|e| corrupt("tasks.status", e))?,
            request: serde_json::from_str::<RouteRequest>(&row.request).map_err(|e| corrupt("tasks.request", e))?,
            input: json("tasks.input", &row.input)?,
            attempt_timeout_ms: u64::try_from(row.attempt_timeout_ms).map_err(|e| corrupt("tasks.timeout", e))?,
            attempts_max: to_u32("tasks.attempts_max", row.attempts_max)?,
            deadline_at_ms: row.deadline_at_ms,
            attempt: to_u32("tasks.attempt", row.attempt)?,
            output: row.output.as_deref().map(|o| json("tasks.output", o)).transpose()?,
            error: row.error,
            created_at_ms: row.created_at_ms,
            updated_at_ms: row.updated_at_ms,
            finished_at_ms: row.finished_at_ms,
            owner: row.owner,
            lease_until_ms: row.lease_until_ms,
        })
    }
}

/// A `task_attempts` row.
#[derive(sqlx::FromRow)]
struct AttemptRow {
    task_id: Uuid,
    attempt: i64,
    tenant: String,
    agent_id: Uuid,
    mode: String,
    started_at_ms: i64,
    timeout_at_ms: i64,
    delivered_at_ms: Option<i64>,
    finished_at_ms: Option<i64>,
    outcome: Option<String>,
    answered: bool,
    error: Option<String>,
    late: bool,
}

impl TryFrom<AttemptRow> for AttemptRecord {
    type Error = StoreError;

    fn try_from(row: AttemptRow) -> Result<Self, StoreError> {
        Ok(AttemptRecord {
            task_id: row.task_id,
            attempt: to_u32("task_attempts.attempt", row.attempt)?,
            tenant: parse_tenant(&row.tenant)?,
            agent: AgentId(row.agent_id),
            mode: row.mode.parse().map_err(|e| corrupt("task_attempts.mode", e))?,
            started_at_ms: row.started_at_ms,
            timeout_at_ms: row.timeout_at_ms,
            delivered_at_ms: row.delivered_at_ms,
            finished_at_ms: row.finished_at_ms,
            outcome: row
                .outcome
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|e| corrupt("task_attempts.outcome", e))?,
            answered: row.answered,
            error: row.error,
            late: row.late,
        })
    }
}

/// A task's row joined with one of its attempts (none: the attempt's columns are NULL).
#[derive(sqlx::FromRow)]
struct TaskAttemptRow {
    #[sqlx(flatten)]
    task: TaskRow,
    a_attempt: Option<i64>,
    a_tenant: Option<String>,
    a_agent_id: Option<Uuid>,
    a_mode: Option<String>,
    a_started_at_ms: Option<i64>,
    a_timeout_at_ms: Option<i64>,
    a_delivered_at_ms: Option<i64>,
    a_finished_at_ms: Option<i64>,
    a_outcome: Option<String>,
    a_answered: Option<bool>,
    a_error: Option<String>,
    a_late: Option<bool>,
}

impl TaskAttemptRow {
    /// The attempt's half, when the join found one.
    fn attempt(&mut self) -> Option<AttemptRow> {
        Some(AttemptRow {
            task_id: self.task.id,
            attempt: self.a_attempt?,
            tenant: self.a_tenant.take()?,
            agent_id: self.a_agent_id?,
            mode: self.a_mode.take()?,
            started_at_ms: self.a_started_at_ms?,
            timeout_at_ms: self.a_timeout_at_ms?,
            delivered_at_ms: self.a_delivered_at_ms,
            finished_at_ms: self.a_finished_at_ms,
            outcome: self.a_outcome.take(),
            answered: self.a_answered?,
            error: self.a_error.take(),
            late: self.a_late?,
        })
    }
}

/// What [`TaskStore::finish_attempt`] found when its update matched nothing.
#[derive(sqlx::FromRow)]
struct FinishState {
    attempt_finished: Option<i64>,
    answered: bool,
    task_status: String,
}

/// A new `tasks` row, its values ready to bind.
#[derive(Clone)]
struct NewTaskRow {
    id: Uuid,
    tenant: String,
    status: &'static str,
    request: String,
    input: String,
    attempt_timeout_ms: i64,
    attempts_max: i64,
    deadline_at_ms: i64,
    attempt: i64,
    created_at_ms: i64,
    updated_at_ms: i64,
    owner: Option<String>,
    lease_until_ms: i64,
    active_max: i64,
}

/// An attempt to start, with the claim it needs.
struct StartRow {
    attempt: AttemptRecord,
    owner: String,
    lease_until_ms: i64,
    queue_depth_max: i64,
}

/// An attempt's end, its output serialized.
struct FinishRow {
    report: AttemptReport,
    outcome: &'static str,
    output: Option<String>,
}

/// One write of the dispatch path. Each is a conditional change whose row counts give its
/// verdict, and each writes nothing it does not keep, so several commit as one transaction.
enum TaskWrite {
    Insert(Box<NewTaskRow>),
    /// A new task (running on its first attempt) and that attempt.
    InsertStarted(Box<(NewTaskRow, StartRow)>),
    Start(Box<StartRow>),
    Finish(Box<FinishRow>),
    Fail {
        id: Uuid,
        owner: String,
        error: String,
        at_ms: i64,
    },
}

/// What a [`TaskWrite`] did.
enum TaskWritten {
    /// `false`: the tenant is at its limit of unfinished tasks.
    Inserted(bool),
    /// `None`: the tenant is at its limit of unfinished tasks (nothing written).
    InsertedStarted(Option<StartVerdict>),
    Started(StartVerdict),
    /// With the task's and the attempt's rows as written, when accepted.
    Finished(Verdict, Option<Box<(TaskRow, AttemptRow)>>),
    /// `false`: the task was not this kernel's or had finished.
    Failed(bool),
}

/// A task write waiting for its group commit.
struct TaskJob {
    what: &'static str,
    write: TaskWrite,
    answer: oneshot::Sender<Result<TaskWritten, StoreError>>,
}

/// The queue to the SQLite group committer of task writes, shared by every clone of the store
/// (`None` until the first write). SQLite has one writer: rather than each write taking the
/// write connection for a transaction of its own, the committer applies every write queued
/// meanwhile in one transaction, so under load one commit serves many tasks, and an idle
/// kernel commits each write at once (nothing waits for a timer).
#[derive(Default)]
pub(crate) struct TaskWriteQueue(std::sync::Mutex<Option<mpsc::Sender<TaskJob>>>);

impl TaskWriteQueue {
    /// The queue, starting the committer when there is none or it stopped (its runtime shut
    /// down).
    fn sender(&self, pool: &SqlitePool) -> mpsc::Sender<TaskJob> {
        let mut slot = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(queue) = slot.as_ref().filter(|q| !q.is_closed()) {
            return queue.clone();
        }
        let (queue, jobs) = mpsc::channel(TASK_WRITE_QUEUE_MAX);
        tokio::spawn(serve_task_writes(pool.clone(), jobs));
        *slot = Some(queue.clone());
        queue
    }
}

/// A task refused because its tenant has `active_max` unfinished tasks.
fn limit_exceeded(active_max: u32) -> StoreError {
    StoreError::LimitExceeded(format!("the tenant already has {active_max} unfinished tasks"))
}

impl NewTaskRow {
    /// `task`'s row, under the tenant limit `active_max`.
    fn new(task: &TaskRecord, active_max: u32) -> Result<Self, StoreError> {
        Ok(Self {
            id: task.id,
            tenant: task.tenant.as_str().to_string(),
            status: task.status.as_str(),
            request: serde_json::to_string(&task.request).map_err(|e| corrupt("task request", e))?,
            input: serde_json::to_string(&task.input).map_err(|e| corrupt("task input", e))?,
            attempt_timeout_ms: i64::try_from(task.attempt_timeout_ms).unwrap_or(i64::MAX),
            attempts_max: i64::from(task.attempts_max),
            deadline_at_ms: task.deadline_at_ms,
            attempt: i64::from(task.attempt),
            created_at_ms: task.created_at_ms,
            updated_at_ms: task.updated_at_ms,
            owner: task.owner.clone(),
            lease_until_ms: task.lease_until_ms,
            active_max: i64::from(active_max),
        })
    }
}

/// A write answered with another write's verdict: a bug, reported rather than unwrapped.
fn mismatched(what: &str) -> StoreError {
    StoreError::Corrupt(format!("{what}: the store answered another kind of write"))
}

/// Inserts the task `$t` (a [`NewTaskRow`]) unless its tenant is at `active_max` unfinished
/// tasks; whether it did.
macro_rules! insert_task_row {
    ($conn:expr, $t:expr) => {
        async {
            let (conn, t) = ($conn, $t);
            let inserted = sqlx::query(
                "INSERT INTO tasks (id, tenant, status, request, input, attempt_timeout_ms, attempts_max, \
                 deadline_at_ms, attempt, created_at_ms, updated_at_ms, owner, lease_until_ms) \
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13 \
                 WHERE (SELECT COUNT(*) FROM tasks WHERE tenant = $2 AND status IN ('queued', 'running')) < $14",
            )
            .bind(t.id)
            .bind(t.tenant.as_str())
            .bind(t.status)
            .bind(t.request.as_str())
            .bind(t.input.as_str())
            .bind(t.attempt_timeout_ms)
            .bind(t.attempts_max)
            .bind(t.deadline_at_ms)
            .bind(t.attempt)
            .bind(t.created_at_ms)
            .bind(t.updated_at_ms)
            .bind(t.owner.as_deref())
            .bind(t.lease_until_ms)
            .bind(t.active_max)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok::<bool, sqlx::Error>(inserted == 1)
        }
    };
}

/// Whether the attempt of `$s` (a [`StartRow`]) is a pull attempt to queue and its agent's
/// queue is full.
macro_rules! pull_queue_full {
    ($conn:expr, $s:expr) => {
        async {
            let (conn, s) = ($conn, $s);
            let a = &s.attempt;
            if a.mode != DeliveryMode::Pull || a.delivered_at_ms.is_some() {
                return Ok::<bool, sqlx::Error>(false);
            }
            let depth: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM task_attempts \
                 WHERE agent_id = $1 AND delivered_at_ms IS NULL AND finished_at_ms IS NULL",
            )
            .bind(a.agent.0)
            .fetch_one(&mut *conn)
            .await?;
            Ok(depth >= s.queue_depth_max)
        }
    };
}

/// Inserts the attempt `$a` (an [`AttemptRecord`]), unfinished.
macro_rules! insert_attempt_row {
    ($conn:expr, $a:expr) => {
        async {
            let (conn, a) = ($conn, $a);
            sqlx::query(
                "INSERT INTO task_attempts (task_id, attempt, tenant, agent_id, mode, started_at_ms, \
                 timeout_at_ms, delivered_at_ms, finished_at_ms, outcome, answered, error, late) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, NULL, $9, NULL, $9)",
            )
            .bind(a.task_id)
            .bind(i64::from(a.attempt))
            .bind(a.tenant.as_str())
            .bind(a.agent.0)
            .bind(a.mode.as_str())
            .bind(a.started_at_ms)
            .bind(a.timeout_at_ms)
            .bind(a.delivered_at_ms)
            .bind(false)
            .execute(&mut *conn)
            .await?;
            Ok::<(), sqlx::Error>(())
        }
    };
}

/// Applies one [`TaskWrite`] inside the open transaction `$conn` (`&mut` a SQLite or
/// PostgreSQL connection). Compiled once per backend, like `with_pool!`, so both run the same
/// SQL.
macro_rules! apply_task_write {
    ($conn:expr, $write:expr) => {
        async {
            let conn = $conn;
            let written = match $write {
                TaskWrite::Insert(t) => TaskWritten::Inserted(insert_task_row!(&mut *conn, &**t).await?),
                TaskWrite::InsertStarted(both) => {
                    let (t, s) = &**both;
                    if pull_queue_full!(&mut *conn, s).await? {
                        // Stored as it was submitted: queued, no attempt.
                        let queued =
                            NewTaskRow { status: "queued", attempt: 0, updated_at_ms: t.created_at_ms, ..t.clone() };
                        let inserted = insert_task_row!(&mut *conn, &queued).await?;
                        TaskWritten::InsertedStarted(inserted.then_some(StartVerdict::QueueFull))
                    } else if insert_task_row!(&mut *conn, t).await? {
                        insert_attempt_row!(&mut *conn, &s.attempt).await?;
                        TaskWritten::InsertedStarted(Some(StartVerdict::Started))
                    } else {
                        TaskWritten::InsertedStarted(None)
                    }
                }
                TaskWrite::Start(s) => {
                    let a = &s.attempt;
                    if pull_queue_full!(&mut *conn, &**s).await? {
                        // Nothing is written; the verdict says whether the task is still ours.
                        let ours: Option<i64> = sqlx::query_scalar(
                            "SELECT attempt FROM tasks WHERE id = $1 AND owner = $2 AND attempt < $3 \
                             AND status IN ('queued', 'running')",
                        )
                        .bind(a.task_id)
                        .bind(s.owner.as_str())
                        .bind(i64::from(a.attempt))
                        .fetch_optional(&mut *conn)
                        .await?;
                        TaskWritten::Started(if ours.is_some() { StartVerdict::QueueFull } else { StartVerdict::Lost })
                    } else {
                        // Taking the task row first also serialises concurrent starts on PostgreSQL.
                        let moved = sqlx::query(
                            "UPDATE tasks SET status = 'running', attempt = $1, updated_at_ms = $2, \
                             lease_until_ms = $3 \
                             WHERE id = $4 AND owner = $5 AND attempt < $1 AND status IN ('queued', 'running')",
                        )
                        .bind(i64::from(a.attempt))
                        .bind(a.started_at_ms)
                        .bind(s.lease_until_ms)
                        .bind(a.task_id)
                        .bind(s.owner.as_str())
                        .execute(&mut *conn)
                        .await?
                        .rows_affected();
                        if moved == 1 {
                            insert_attempt_row!(&mut *conn, a).await?;
                            TaskWritten::Started(StartVerdict::Started)
                        } else {
                            TaskWritten::Started(StartVerdict::Lost)
                        }
                    }
                }
                TaskWrite::Finish(f) => {
                    let r = &f.report;
                    let error = match &r.result {
                        Reported::Output(_) => None,
                        Reported::Error(message) | Reported::TimedOut(message) => Some(message.as_str()),
                    };
                    let attempt = i64::from(r.attempt);
                    // Both updates return the rows they leave, so the caller learns what was
                    // stored without reading it again.
                    let done: Option<AttemptRow> = sqlx::query_as(&FINISH_ATTEMPT_SQL)
                        .bind(r.at_ms)
                        .bind(f.outcome)
                        .bind(r.answered)
                        .bind(error)
                        .bind(r.task_id)
                        .bind(attempt)
                        .bind(r.agent.0)
                        .bind(r.tenant.as_str())
                        .fetch_optional(&mut *conn)
                        .await?;
                    if let Some(attempt_row) = done {
                        let task_row: TaskRow = if let Some(output) = &f.output {
                            sqlx::query_as(&SUCCEED_TASK_SQL)
                                .bind(output.as_str())
                                .bind(r.at_ms)
                                .bind(r.task_id)
                                .fetch_one(&mut *conn)
                                .await?
                        } else {
                            sqlx::query_as(&TOUCH_TASK_SQL).bind(r.at_ms).bind(r.task_id).fetch_one(&mut *conn).await?
                        };
                        TaskWritten::Finished(Verdict::Accepted, Some(Box::new((task_row, attempt_row))))
                    } else {
                        let state: Option<FinishState> = sqlx::query_as(
                            "SELECT a.finished_at_ms AS attempt_finished, a.answered, t.status AS task_status \
                             FROM task_attempts a JOIN tasks t ON t.id = a.task_id \
                             WHERE a.task_id = $1 AND a.attempt = $2 AND a.agent_id = $3 AND a.tenant = $4",
                        )
                        .bind(r.task_id)
                        .bind(attempt)
                        .bind(r.agent.0)
                        .bind(r.tenant.as_str())
                        .fetch_optional(&mut *conn)
                        .await?;
                        let verdict = match state {
                            None => Verdict::NotFound,
                            Some(state) if state.attempt_finished.is_some() && state.answered => Verdict::Duplicate,
                            Some(state) if matches!(state.task_status.as_str(), "succeeded" | "failed") => {
                                Verdict::TaskFinished
                            }
                            Some(_) => Verdict::Superseded,
                        };
                        if r.answered && matches!(verdict, Verdict::TaskFinished | Verdict::Superseded) {
                            sqlx::query("UPDATE task_attempts SET late = $1 WHERE task_id = $2 AND attempt = $3")
                                .bind(true)
                                .bind(r.task_id)
                                .bind(attempt)
                                .execute(&mut *conn)
                                .await?;
                        }
                        TaskWritten::Finished(verdict, None)
                    }
                }
                TaskWrite::Fail { id, owner, error, at_ms } => {
                    let failed = sqlx::query(
                        "UPDATE tasks SET status = 'failed', error = $1, finished_at_ms = $2, updated_at_ms = $2, \
                         owner = NULL WHERE id = $3 AND owner = $4 AND status IN ('queued', 'running')",
                    )
                    .bind(error.as_str())
                    .bind(*at_ms)
                    .bind(*id)
                    .bind(owner.as_str())
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    if failed == 1 {
                        // An attempt still open (say, queued for a pull agent) ends with the task.
                        sqlx::query(
                            "UPDATE task_attempts SET finished_at_ms = $1, outcome = 'timeout', error = $2 \
                             WHERE task_id = $3 AND finished_at_ms IS NULL",
                        )
                        .bind(*at_ms)
                        .bind("the task ended")
                        .bind(*id)
                        .execute(&mut *conn)
                        .await?;
                    }
                    TaskWritten::Failed(failed == 1)
                }
            };
            Ok::<TaskWritten, sqlx::Error>(written)
        }
    };
}

impl SqlStore {
    /// Applies `write`: on SQLite through the group committer, on PostgreSQL (many writers) in
    /// a transaction of its own.
    async fn write_task(&self, what: &'static str, write: TaskWrite) -> Result<TaskWritten, StoreError> {
        match &self.pools {
            Pools::Sqlite { write: pool, .. } => {
                let stopped = || StoreError::Backend(format!("{what}: the task writer stopped"));
                let (answer, answered) = oneshot::channel();
                let job = TaskJob { what, write, answer };
                self.task_writes.sender(pool).send(job).await.map_err(|_| stopped())?;
                answered.await.map_err(|_| stopped())?
            }
            Pools::Postgres(pool) => {
                self.retrying(what, || async {
                    let mut tx = pool.begin().await?;
                    let written = apply_task_write!(&mut *tx, &write).await?;
                    tx.commit().await?;
                    Ok(written)
                })
                .await
            }
        }
    }
}

/// Commits the queued task writes, group by group, until every sender is gone.
async fn serve_task_writes(pool: SqlitePool, mut jobs: mpsc::Receiver<TaskJob>) {
    let mut held = None;
    let mut held_groups = 0u32;
    while let Some(first) = jobs.recv().await {
        let mut group = vec![first];
        // Everything already waiting, without waiting for more.
        while group.len() < GROUP_COMMIT_WRITES_MAX {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        commit_task_writes(&pool, &mut held, group).await;
        held_groups += 1;
        if jobs.is_empty() || held_groups >= GROUP_COMMIT_HOLD_GROUPS_MAX {
            held = None;
            held_groups = 0;
        }
    }
}

/// Applies `group` in one transaction on `conn`.
async fn apply_group(conn: &mut SqliteConnection, group: &[TaskJob]) -> Result<Vec<TaskWritten>, sqlx::Error> {
    let mut tx = conn.begin().await?;
    let mut written = Vec::with_capacity(group.len());
    for job in group {
        written.push(apply_task_write!(&mut *tx, &job.write).await?);
    }
    tx.commit().await?;
    Ok(written)
}

/// Applies `group` on a connection checked out of `pool`, retrying transient failures;
/// returns the connection with the verdicts.
async fn checkout_and_apply(
    pool: &SqlitePool,
    group: &[TaskJob],
) -> Result<(Vec<TaskWritten>, PoolConnection<Sqlite>), sqlx::Error> {
    retry_transient("task_writes", || async {
        let mut conn = pool.acquire().await?;
        let written = apply_group(&mut conn, group).await?;
        Ok((written, conn))
    })
    .await
}

/// Applies `group` in one transaction and answers each writer with its own verdict. When a
/// write fails for itself (not the database), the group is rolled back and each write is
/// applied alone, so that one write's error is never another's.
///
/// `held` is the write connection kept from the previous group, if any; it is kept for the
/// next one when this group commits. After a failure it is handed back to the pool (every
/// retry and the write-by-write path check a connection out of the pool).
async fn commit_task_writes(pool: &SqlitePool, held: &mut Option<PoolConnection<Sqlite>>, group: Vec<TaskJob>) {
    // A writer that gave up before its commit started is not written for.
    let group: Vec<TaskJob> = group.into_iter().filter(|job| !job.answer.is_closed()).collect();
    if group.is_empty() {
        return;
    }
    let together = match held.take() {
        Some(mut conn) => match apply_group(&mut conn, &group).await {
            Ok(written) => Ok((written, conn)),
            Err(err) if is_transient(&err) => {
                drop(conn);
                checkout_and_apply(pool, &group).await
            }
            Err(err) => Err(err),
        },
        None => checkout_and_apply(pool, &group).await,
    };
    match together {
        Ok((written, conn)) => {
            *held = Some(conn);
            for (job, written) in group.into_iter().zip(written) {
                let _ = job.answer.send(Ok(written));
            }
        }
        Err(err) if group.len() == 1 => {
            if let Some(job) = group.into_iter().next() {
                let _ = job.answer.send(Err(store_error(job.what, err)));
            }
        }
        Err(err) if is_transient(&err) => {
            // The database failed, not a write: every writer gets the error.
            let detail = err.to_string();
            for job in group {
                let _ = job.answer.send(Err(StoreError::Backend(format!("{}: {detail}", job.what))));
            }
        }
        Err(_) => {
            for job in group {
                let written = retry_transient(job.what, || async {
                    let mut tx = pool.begin().await?;
                    let written = apply_task_write!(&mut *tx, &job.write).await?;
                    tx.commit().await?;
                    Ok(written)
                })
                .await
                .map_err(|err| store_error(job.what, err));
                let _ = job.answer.send(written);
            }
        }
    }
}

#[async_trait]
impl TaskStore for SqlStore {
    async fn insert_task(&self, task: &TaskRecord, active_max: u32) -> Result<(), StoreError> {
        let write = TaskWrite::Insert(Box::new(NewTaskRow::new(task, active_max)?));
        match self.write_task("insert_task", write).await? {
            TaskWritten::Inserted(true) => Ok(()),
            TaskWritten::Inserted(false) => Err(limit_exceeded(active_max)),
            _ => Err(mismatched("insert_task")),
        }
    }

    async fn insert_task_started(
        &self,
        task: &TaskRecord,
        attempt: &AttemptRecord,
        active_max: u32,
        queue_depth_max: u32,
    ) -> Result<StartVerdict, StoreError> {
        let start = StartRow {
            attempt: attempt.clone(),
            owner: task.owner.clone().unwrap_or_default(),
            lease_until_ms: task.lease_until_ms,
            queue_depth_max: i64::from(queue_depth_max),
        };
        let write = TaskWrite::InsertStarted(Box::new((NewTaskRow::new(task, active_max)?, start)));
        match self.write_task("insert_task_started", write).await? {
            TaskWritten::InsertedStarted(Some(verdict)) => Ok(verdict),
            TaskWritten::InsertedStarted(None) => Err(limit_exceeded(active_max)),
            _ => Err(mismatched("insert_task_started")),
        }
    }

    async fn get_task(&self, tenant: Option<&TenantId>, id: Uuid) -> Result<Option<TaskRecord>, StoreError> {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1");
        let row: Option<TaskRow> = self
            .retrying("get_task", || async {
                with_pool!(self, read, |pool| sqlx::query_as::<_, TaskRow>(&sql).bind(id).fetch_optional(pool).await)
            })
            .await?;
        let task = row.map(TaskRecord::try_from).transpose()?;
        Ok(task.filter(|t| tenant.is_none_or(|tenant| &t.tenant == tenant)))
    }

    async fn list_tasks(
        &self,
        tenant: &TenantId,
        status: Option<TaskStatus>,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let rows: Vec<TaskRow> = self
            .retrying("list_tasks", || async {
                with_pool!(self, read, |pool| {
                    let mut q = sqlx::QueryBuilder::new(format!("SELECT {TASK_COLUMNS} FROM tasks WHERE tenant = "));
                    q.push_bind(tenant.as_str());
                    if let Some(status) = status {
                        q.push(" AND status = ").push_bind(status.as_str());
                    }
                    if let Some(after) = after {
                        q.push(" AND id > ").push_bind(after);
                    }
                    q.push(" ORDER BY id LIMIT ").push_bind(i64::from(limit));
                    q.build_query_as::<TaskRow>().fetch_all(pool).await
                })
            })
            .await?;
        rows.into_iter().map(TaskRecord::try_from).collect()
    }

    async fn get_task_with_attempts(
        &self,
        tenant: Option<&TenantId>,
        id: Uuid,
    ) -> Result<Option<(TaskRecord, Vec<AttemptRecord>)>, StoreError> {
        let rows: Vec<TaskAttemptRow> = self
            .retrying("get_task_with_attempts", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_as::<_, TaskAttemptRow>(&TASK_WITH_ATTEMPTS_SQL).bind(id).fetch_all(pool).await
                })
            })
            .await?;
        let mut attempts = Vec::with_capacity(rows.len());
        let mut task = None;
        for mut row in rows {
            if let Some(attempt) = row.attempt() {
                attempts.push(AttemptRecord::try_from(attempt)?);
            }
            if task.is_none() {
                task = Some(TaskRecord::try_from(row.task)?);
            }
        }
        Ok(task.filter(|t| tenant.is_none_or(|tenant| &t.tenant == tenant)).map(|task| (task, attempts)))
    }

    async fn get_attempt(&self, task: Uuid, attempt: u32) -> Result<Option<AttemptRecord>, StoreError> {
        let sql = format!("SELECT {ATTEMPT_COLUMNS} FROM task_attempts WHERE task_id = $1 AND attempt = $2");
        let row: Option<AttemptRow> = self
            .retrying("get_attempt", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_as::<_, AttemptRow>(&sql).bind(task).bind(i64::from(attempt)).fetch_optional(pool).await
                })
            })
            .await?;
        row.map(AttemptRecord::try_from).transpose()
    }

    async fn start_attempt(
        &self,
        a: &AttemptRecord,
        owner: &str,
        lease_until_ms: i64,
        queue_depth_max: u32,
    ) -> Result<StartVerdict, StoreError> {
        let write = TaskWrite::Start(Box::new(StartRow {
            attempt: a.clone(),
            owner: owner.to_string(),
            lease_until_ms,
            queue_depth_max: i64::from(queue_depth_max),
        }));
        match self.write_task("start_attempt", write).await? {
            TaskWritten::Started(verdict) => Ok(verdict),
            _ => Err(mismatched("start_attempt")),
        }
    }

    async fn finish_attempt_recorded(
        &self,
        r: &AttemptReport,
    ) -> Result<(Verdict, Option<Box<RecordedEnd>>), StoreError> {
        let (outcome, output) = match &r.result {
            Reported::Output(value) => {
                ("success", Some(serde_json::to_string(value).map_err(|e| corrupt("task output", e))?))
            }
            Reported::Error(_) => ("failure", None),
            Reported::TimedOut(_) => ("timeout", None),
        };
        let write = TaskWrite::Finish(Box::new(FinishRow { report: r.clone(), outcome, output }));
        match self.write_task("finish_attempt", write).await? {
            TaskWritten::Finished(verdict, rows) => {
                let recorded = match rows {
                    Some(rows) => {
                        let (task, attempt) = *rows;
                        Some(Box::new(RecordedEnd {
                            task: TaskRecord::try_from(task)?,
                            attempt: AttemptRecord::try_from(attempt)?,
                        }))
                    }
                    None => None,
                };
                Ok((verdict, recorded))
            }
            _ => Err(mismatched("finish_attempt")),
        }
    }

    async fn fail_task(&self, id: Uuid, owner: &str, error: &str, at_ms: i64) -> Result<bool, StoreError> {
        let write = TaskWrite::Fail { id, owner: owner.to_string(), error: error.to_string(), at_ms };
        match self.write_task("fail_task", write).await? {
            TaskWritten::Failed(failed) => Ok(failed),
            _ => Err(mismatched("fail_task")),
        }
    }

    async fn claim_next_pull(
        &self,
        tenant: &TenantId,
        agent: AgentId,
        now_ms: i64,
    ) -> Result<Option<PulledAttempt>, StoreError> {
        for _ in 0..PULL_CLAIM_TRIES_MAX {
            let candidate: Option<(Uuid, i64)> = self
                .retrying("next_pull", || async {
                    with_pool!(self, read, |pool| {
                        sqlx::query_as(
                            "SELECT a.task_id, a.attempt FROM task_attempts a JOIN tasks t ON t.id = a.task_id \
                             WHERE a.agent_id = $1 AND a.tenant = $2 AND a.delivered_at_ms IS NULL \
                             AND a.finished_at_ms IS NULL AND t.attempt = a.attempt AND t.status = 'running' \
                             ORDER BY a.started_at_ms, a.task_id LIMIT 1",
                        )
                        .bind(agent.0)
                        .bind(tenant.as_str())
                        .fetch_optional(pool)
                        .await
                    })
                })
                .await?;
            let Some((task_id, attempt)) = candidate else {
                return Ok(None);
            };
            let claimed: Option<(String, i64, i64, i64)> = self
                .retrying("claim_pull", || async {
                    with_pool!(self, write, |pool| {
                        let mut tx = pool.begin().await?;
                        let taken = sqlx::query(
                            "UPDATE task_attempts SET delivered_at_ms = $1 WHERE task_id = $2 AND attempt = $3 \
                             AND delivered_at_ms IS NULL AND finished_at_ms IS NULL",
                        )
                        .bind(now_ms)
                        .bind(task_id)
                        .bind(attempt)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        if taken != 1 {
                            return Ok(None);
                        }
                        let row = sqlx::query_as(
                            "SELECT t.input, a.timeout_at_ms, a.started_at_ms, t.attempt_timeout_ms \
                             FROM task_attempts a JOIN tasks t ON t.id = a.task_id \
                             WHERE a.task_id = $1 AND a.attempt = $2",
                        )
                        .bind(task_id)
                        .bind(attempt)
                        .fetch_optional(&mut *tx)
                        .await?;
                        tx.commit().await?;
                        Ok(row)
                    })
                })
                .await?;
            if let Some((input, timeout_at_ms, started_at_ms, _)) = claimed {
                return Ok(Some(PulledAttempt {
                    task_id,
                    attempt: to_u32("task_attempts.attempt", attempt)?,
                    input: json("tasks.input", &input)?,
                    timeout_at_ms,
                    timeout_ms: u64::try_from(timeout_at_ms - started_at_ms).unwrap_or(0),
                }));
            }
        }
        Ok(None)
    }

    async fn renew_task_leases(&self, owner: &str, lease_until_ms: i64) -> Result<u64, StoreError> {
        self.retrying("renew_task_leases", || async {
            with_pool!(self, write, |pool| {
                sqlx::query(
                    "UPDATE tasks SET lease_until_ms = $1 WHERE owner = $2 AND status IN ('queued', 'running') \
                     AND lease_until_ms < $1",
                )
                .bind(lease_until_ms)
                .bind(owner)
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
            })
        })
        .await
    }

    async fn claim_orphaned_tasks(
        &self,
        owner: &str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: u32,
    ) -> Result<Vec<Uuid>, StoreError> {
        let candidates: Vec<Uuid> = self
            .retrying("orphaned_tasks", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_scalar(
                        "SELECT id FROM tasks WHERE status IN ('queued', 'running') AND lease_until_ms < $1 \
                         ORDER BY lease_until_ms LIMIT $2",
                    )
                    .bind(now_ms)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await
                })
            })
            .await?;
        let mut claimed = Vec::with_capacity(candidates.len());
        for id in candidates {
            let taken = self
                .retrying("claim_orphaned_task", || async {
                    with_pool!(self, write, |pool| {
                        sqlx::query(
                            "UPDATE tasks SET owner = $1, lease_until_ms = $2 WHERE id = $3 \
                             AND status IN ('queued', 'running') AND lease_until_ms < $4",
                        )
                        .bind(owner)
                        .bind(lease_until_ms)
                        .bind(id)
                        .bind(now_ms)
                        .execute(pool)
                        .await
                        .map(|done| done.rows_affected())
                    })
                })
                .await?;
            if taken == 1 {
                claimed.push(id);
            }
        }
        Ok(claimed)
    }

    async fn purge_finished_tasks(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        self.retrying("purge_finished_tasks", || async {
            with_pool!(self, write, |pool| {
                let mut tx = pool.begin().await?;
                let ids: Vec<Uuid> = sqlx::query_scalar(
                    "SELECT id FROM tasks WHERE finished_at_ms IS NOT NULL AND finished_at_ms < $1 \
                     ORDER BY finished_at_ms LIMIT $2",
                )
                .bind(before_ms)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
                let mut deleted = 0;
                for id in ids {
                    sqlx::query("DELETE FROM task_attempts WHERE task_id = $1").bind(id).execute(&mut *tx).await?;
                    deleted += sqlx::query("DELETE FROM tasks WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
                tx.commit().await?;
                Ok(deleted)
            })
        })
        .await
    }

    async fn pull_queue_depth(&self) -> Result<u64, StoreError> {
        let depth: i64 = self
            .retrying("pull_queue_depth", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_scalar(
                        "SELECT COUNT(*) FROM task_attempts WHERE delivered_at_ms IS NULL AND finished_at_ms IS NULL",
                    )
                    .fetch_one(pool)
                    .await
                })
            })
            .await?;
        Ok(u64::try_from(depth).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use nops_core::store::TaskStore;

    use super::*;
    use crate::StoreConfig;

    async fn sqlite() -> (tempfile::TempDir, SqlStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("tasks.db").display());
        let store = SqlStore::open(&StoreConfig { database_url: url, ..StoreConfig::default() }).await.expect("opens");
        (dir, store)
    }

    fn task(id: Uuid) -> TaskRecord {
        TaskRecord {
            id,
            tenant: TenantId::default_tenant(),
            status: TaskStatus::Queued,
            request: RouteRequest {
                capabilities: Vec::new(),
                labels: Default::default(),
                hints: Default::default(),
                count: None,
            },
            input: serde_json::json!({ "n": 1 }),
            attempt_timeout_ms: 1_000,
            attempts_max: 1,
            deadline_at_ms: i64::MAX,
            attempt: 0,
            output: None,
            error: None,
            created_at_ms: 1,
            updated_at_ms: 1,
            finished_at_ms: None,
            owner: Some("kernel-a".into()),
            lease_until_ms: i64::MAX,
        }
    }

    /// Inserts `count` tasks at once (the one at `duplicate` reusing `taken`'s id) under
    /// `active_max`; counts of stored, limited and duplicate, each stored task read back.
    async fn insert_at_once(
        store: &Arc<SqlStore>,
        count: usize,
        duplicate: Option<(usize, Uuid)>,
        active_max: u32,
    ) -> (usize, usize, usize) {
        let writers: Vec<_> = (0..count)
            .map(|i| {
                let store = store.clone();
                let id = duplicate.filter(|(at, _)| *at == i).map_or_else(Uuid::now_v7, |(_, id)| id);
                tokio::spawn(async move { (id, store.insert_task(&task(id), active_max).await) })
            })
            .collect();
        let (mut stored, mut limited, mut duplicates) = (0, 0, 0);
        for writer in writers {
            let (id, result) = writer.await.expect("writer");
            match result {
                Ok(()) => {
                    stored += 1;
                    assert!(store.get_task(None, id).await.expect("reads").is_some(), "a stored task is readable");
                }
                Err(StoreError::LimitExceeded(_)) => limited += 1,
                Err(StoreError::UniqueViolation(_)) => duplicates += 1,
                Err(other) => panic!("unexpected error: {other}"),
            }
        }
        (stored, limited, duplicates)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_commits_but_keep_their_own_verdicts() {
        let (_dir, store) = sqlite().await;
        let store = Arc::new(store);
        let taken = Uuid::now_v7();
        store.insert_task(&task(taken), 1_000).await.expect("first insert");
        // A write that fails for itself (a duplicate id) fails alone.
        assert_eq!(insert_at_once(&store, 200, Some((100, taken)), 1_000).await, (199, 0, 1));
        // The tenant limit counts every write committed before, in the same group or not.
        assert_eq!(insert_at_once(&store, 100, None, 250).await, (50, 50, 0));
    }

    /// Attempt 1 of `task` on a new agent, as a driver would start it.
    fn first_attempt(task: &TaskRecord, mode: DeliveryMode) -> AttemptRecord {
        AttemptRecord {
            task_id: task.id,
            attempt: 1,
            tenant: task.tenant.clone(),
            agent: AgentId(Uuid::now_v7()),
            mode,
            started_at_ms: 2,
            timeout_at_ms: 1_002,
            delivered_at_ms: (mode == DeliveryMode::Push).then_some(2),
            finished_at_ms: None,
            outcome: None,
            answered: false,
            error: None,
            late: false,
        }
    }

    /// `task`, as stored running on its first attempt.
    fn running(task: TaskRecord) -> TaskRecord {
        TaskRecord { status: TaskStatus::Running, attempt: 1, updated_at_ms: 2, ..task }
    }

    #[tokio::test]
    async fn a_task_stored_with_its_first_attempt_reads_back_running_on_it() {
        let (_dir, store) = sqlite().await;
        let task = running(task(Uuid::now_v7()));
        let attempt = first_attempt(&task, DeliveryMode::Push);
        let verdict = store.insert_task_started(&task, &attempt, 10, 10).await.expect("stores");
        assert_eq!(verdict, StartVerdict::Started);
        let (stored, attempts) = store.get_task_with_attempts(None, task.id).await.expect("reads").expect("exists");
        assert_eq!(stored, task, "the task is stored as given");
        assert_eq!(attempts, vec![attempt.clone()], "with its first attempt");
        // The attempt is the task's current one: its answer finishes the task, and a second
        // start of attempt 1 loses.
        assert_eq!(store.start_attempt(&attempt, "kernel-a", 10, 10).await.expect("start"), StartVerdict::Lost);
        let report = AttemptReport {
            task_id: task.id,
            attempt: 1,
            tenant: task.tenant.clone(),
            agent: attempt.agent,
            result: Reported::Output(serde_json::json!("done")),
            answered: true,
            at_ms: 3,
        };
        assert_eq!(store.finish_attempt(&report).await.expect("finish"), Verdict::Accepted);
        let done = store.get_task(None, task.id).await.expect("reads").expect("exists");
        assert_eq!((done.status, done.output), (TaskStatus::Succeeded, Some(serde_json::json!("done"))));
    }

    #[tokio::test]
    async fn a_task_with_its_first_attempt_over_the_tenant_limit_writes_nothing() {
        let (_dir, store) = sqlite().await;
        store.insert_task(&task(Uuid::now_v7()), 1).await.expect("first task");
        let task = running(task(Uuid::now_v7()));
        let attempt = first_attempt(&task, DeliveryMode::Push);
        let refused = store.insert_task_started(&task, &attempt, 1, 10).await;
        assert!(matches!(refused, Err(StoreError::LimitExceeded(_))), "{refused:?}");
        assert!(store.get_task_with_attempts(None, task.id).await.expect("reads").is_none(), "nothing stored");
        assert!(store.get_attempt(task.id, 1).await.expect("reads").is_none(), "no attempt stored");
    }

    #[tokio::test]
    async fn a_task_whose_pull_agent_is_full_is_stored_queued_without_an_attempt() {
        let (_dir, store) = sqlite().await;
        // The agent's queue holds one undelivered attempt: its limit of 1 is reached.
        let earlier = running(task(Uuid::now_v7()));
        let queued = first_attempt(&earlier, DeliveryMode::Pull);
        assert_eq!(store.insert_task_started(&earlier, &queued, 10, 1).await.expect("stores"), StartVerdict::Started);
        let submitted = task(Uuid::now_v7());
        let task = running(submitted.clone());
        let attempt = AttemptRecord { agent: queued.agent, ..first_attempt(&task, DeliveryMode::Pull) };
        let verdict = store.insert_task_started(&task, &attempt, 10, 1).await.expect("stores");
        assert_eq!(verdict, StartVerdict::QueueFull);
        let (stored, attempts) = store.get_task_with_attempts(None, task.id).await.expect("reads").expect("exists");
        assert_eq!(stored, submitted, "stored as submitted: queued, no attempt");
        assert!(attempts.is_empty(), "{attempts:?}");
    }

    #[tokio::test]
    async fn an_attempt_starts_and_finishes_once() {
        let (_dir, store) = sqlite().await;
        let id = Uuid::now_v7();
        store.insert_task(&task(id), 10).await.expect("insert");
        let attempt = AttemptRecord {
            task_id: id,
            attempt: 1,
            tenant: TenantId::default_tenant(),
            agent: AgentId(Uuid::now_v7()),
            mode: DeliveryMode::Push,
            started_at_ms: 2,
            timeout_at_ms: 1_002,
            delivered_at_ms: Some(2),
            finished_at_ms: None,
            outcome: None,
            answered: false,
            error: None,
            late: false,
        };
        assert_eq!(store.start_attempt(&attempt, "kernel-b", 10, 10).await.expect("start"), StartVerdict::Lost);
        let (first, again) = tokio::join!(
            store.start_attempt(&attempt, "kernel-a", 10, 10),
            store.start_attempt(&attempt, "kernel-a", 10, 10)
        );
        let mut verdicts = [first.expect("start"), again.expect("start")];
        verdicts.sort_by_key(|v| *v == StartVerdict::Lost);
        assert_eq!(verdicts, [StartVerdict::Started, StartVerdict::Lost]);
        let report = |output: i64| AttemptReport {
            task_id: id,
            attempt: 1,
            tenant: TenantId::default_tenant(),
            agent: attempt.agent,
            result: Reported::Output(serde_json::json!(output)),
            answered: true,
            at_ms: 3,
        };
        let (one, two) = (report(1), report(2));
        let (first, second) = tokio::join!(store.finish_attempt(&one), store.finish_attempt(&two));
        let mut verdicts = [first.expect("finish"), second.expect("finish")];
        verdicts.sort_by_key(|v| *v != Verdict::Accepted);
        assert_eq!(verdicts[0], Verdict::Accepted);
        assert!(matches!(verdicts[1], Verdict::Duplicate | Verdict::TaskFinished), "{:?}", verdicts[1]);
        let stored = store.get_task(None, id).await.expect("reads").expect("exists");
        assert_eq!(stored.status, TaskStatus::Succeeded);
        assert!(stored.output == Some(serde_json::json!(1)) || stored.output == Some(serde_json::json!(2)));
    }
}
