//! Dispatched tasks and their attempts (`tasks`, `task_attempts`).
//!
//! Every decision that two kernels (or a kernel and a late agent) could race on is one
//! conditional statement whose row count says who won: starting an attempt updates the task
//! only while this kernel owns it and it has not moved on; finishing an attempt updates the
//! attempt only while it is unfinished and still the task's current one; claiming a pull
//! attempt or an orphaned task updates it only while it is still free. On PostgreSQL the
//! losing statement waits for the winner's row lock and then matches nothing; on SQLite the
//! single writer serialises them.

use async_trait::async_trait;
use nops_core::agent::AgentId;
use nops_core::dispatch::{
    AttemptRecord, AttemptReport, PulledAttempt, Reported, StartVerdict, TaskRecord, TaskStatus, Verdict,
};
use nops_core::routing::RouteRequest;
use nops_core::store::{StoreError, TaskStore};
use nops_core::tenant::TenantId;
use uuid::Uuid;

use crate::{Pools, SqlStore, parse_tenant};

/// Attempts to claim a pull attempt when other pollers take the candidates first.
const PULL_CLAIM_TRIES_MAX: usize = 4;

const TASK_COLUMNS: &str = "id, tenant, status, request, input, attempt_timeout_ms, attempts_max, deadline_at_ms, \
     attempt, output, error, created_at_ms, updated_at_ms, finished_at_ms, owner, lease_until_ms";

const ATTEMPT_COLUMNS: &str = "task_id, attempt, tenant, agent_id, mode, started_at_ms, timeout_at_ms, \
     delivered_at_ms, finished_at_ms, outcome, answered, error, late";

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

/// What [`TaskStore::finish_attempt`] found when its update matched nothing.
#[derive(sqlx::FromRow)]
struct FinishState {
    attempt_finished: Option<i64>,
    answered: bool,
    task_status: String,
    task_attempt: i64,
}

#[async_trait]
impl TaskStore for SqlStore {
    async fn insert_task(&self, task: &TaskRecord, active_max: u32) -> Result<(), StoreError> {
        let request = serde_json::to_string(&task.request).map_err(|e| corrupt("task request", e))?;
        let input = serde_json::to_string(&task.input).map_err(|e| corrupt("task input", e))?;
        let timeout = i64::try_from(task.attempt_timeout_ms).unwrap_or(i64::MAX);
        let sql = String::from(
            "INSERT INTO tasks (id, tenant, status, request, input, attempt_timeout_ms, attempts_max, \
             deadline_at_ms, attempt, created_at_ms, updated_at_ms, owner, lease_until_ms) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11, $12 \
             WHERE (SELECT COUNT(*) FROM tasks WHERE tenant = $2 AND status IN ('queued', 'running')) < $13",
        );
        let inserted = self
            .retrying("insert_task", || async {
                with_pool!(self, write, |pool| {
                    sqlx::query(&sql)
                        .bind(task.id)
                        .bind(task.tenant.as_str())
                        .bind(task.status.as_str())
                        .bind(&request)
                        .bind(&input)
                        .bind(timeout)
                        .bind(i64::from(task.attempts_max))
                        .bind(task.deadline_at_ms)
                        .bind(i64::from(task.attempt))
                        .bind(task.created_at_ms)
                        .bind(task.owner.as_deref())
                        .bind(task.lease_until_ms)
                        .bind(i64::from(active_max))
                        .execute(pool)
                        .await
                        .map(|done| done.rows_affected())
                })
            })
            .await?;
        if inserted == 1 {
            Ok(())
        } else {
            Err(StoreError::LimitExceeded(format!("the tenant already has {active_max} unfinished tasks")))
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

    async fn list_attempts(&self, task: Uuid) -> Result<Vec<AttemptRecord>, StoreError> {
        let sql = format!("SELECT {ATTEMPT_COLUMNS} FROM task_attempts WHERE task_id = $1 ORDER BY attempt");
        let rows: Vec<AttemptRow> = self
            .retrying("list_attempts", || async {
                with_pool!(self, read, |pool| sqlx::query_as::<_, AttemptRow>(&sql).bind(task).fetch_all(pool).await)
            })
            .await?;
        rows.into_iter().map(AttemptRecord::try_from).collect()
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
        let queued = a.mode == nops_core::dispatch::DeliveryMode::Pull && a.delivered_at_ms.is_none();
        let sql = format!(
            "INSERT INTO task_attempts ({ATTEMPT_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, NULL, $9, NULL, $9)"
        );
        self.retrying("start_attempt", || async {
            with_pool!(self, write, |pool| {
                let mut tx = pool.begin().await?;
                // Taking the task row first also serialises concurrent starts on PostgreSQL.
                let moved = sqlx::query(
                    "UPDATE tasks SET status = 'running', attempt = $1, updated_at_ms = $2, lease_until_ms = $3 \
                     WHERE id = $4 AND owner = $5 AND attempt < $1 AND status IN ('queued', 'running')",
                )
                .bind(i64::from(a.attempt))
                .bind(a.started_at_ms)
                .bind(lease_until_ms)
                .bind(a.task_id)
                .bind(owner)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if moved != 1 {
                    return Ok(StartVerdict::Lost);
                }
                if queued {
                    let depth: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM task_attempts \
                         WHERE agent_id = $1 AND delivered_at_ms IS NULL AND finished_at_ms IS NULL",
                    )
                    .bind(a.agent.0)
                    .fetch_one(&mut *tx)
                    .await?;
                    if depth >= i64::from(queue_depth_max) {
                        return Ok(StartVerdict::QueueFull);
                    }
                }
                sqlx::query(&sql)
                    .bind(a.task_id)
                    .bind(i64::from(a.attempt))
                    .bind(a.tenant.as_str())
                    .bind(a.agent.0)
                    .bind(a.mode.as_str())
                    .bind(a.started_at_ms)
                    .bind(a.timeout_at_ms)
                    .bind(a.delivered_at_ms)
                    .bind(false)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(StartVerdict::Started)
            })
        })
        .await
    }

    async fn finish_attempt(&self, r: &AttemptReport) -> Result<Verdict, StoreError> {
        let (outcome, output, error) = match &r.result {
            Reported::Output(value) => {
                ("success", Some(serde_json::to_string(value).map_err(|e| corrupt("task output", e))?), None)
            }
            Reported::Error(message) => ("failure", None, Some(message.as_str())),
            Reported::TimedOut(message) => ("timeout", None, Some(message.as_str())),
        };
        let attempt = i64::from(r.attempt);
        self.retrying("finish_attempt", || async {
            with_pool!(self, write, |pool| {
                let mut tx = pool.begin().await?;
                let done = sqlx::query(
                    "UPDATE task_attempts SET finished_at_ms = $1, outcome = $2, answered = $3, error = $4 \
                     WHERE task_id = $5 AND attempt = $6 AND agent_id = $7 AND tenant = $8 \
                     AND finished_at_ms IS NULL \
                     AND EXISTS (SELECT 1 FROM tasks t WHERE t.id = $5 AND t.attempt = $6 \
                                 AND t.status IN ('queued', 'running'))",
                )
                .bind(r.at_ms)
                .bind(outcome)
                .bind(r.answered)
                .bind(error)
                .bind(r.task_id)
                .bind(attempt)
                .bind(r.agent.0)
                .bind(r.tenant.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if done == 1 {
                    if let Some(output) = &output {
                        sqlx::query(
                            "UPDATE tasks SET status = 'succeeded', output = $1, error = NULL, finished_at_ms = $2, \
                             updated_at_ms = $2, owner = NULL WHERE id = $3",
                        )
                        .bind(output)
                        .bind(r.at_ms)
                        .bind(r.task_id)
                        .execute(&mut *tx)
                        .await?;
                    } else {
                        sqlx::query("UPDATE tasks SET updated_at_ms = $1 WHERE id = $2")
                            .bind(r.at_ms)
                            .bind(r.task_id)
                            .execute(&mut *tx)
                            .await?;
                    }
                    tx.commit().await?;
                    return Ok(Verdict::Accepted);
                }
                let state: Option<FinishState> = sqlx::query_as(
                    "SELECT a.finished_at_ms AS attempt_finished, a.answered, t.status AS task_status, \
                     t.attempt AS task_attempt \
                     FROM task_attempts a JOIN tasks t ON t.id = a.task_id \
                     WHERE a.task_id = $1 AND a.attempt = $2 AND a.agent_id = $3 AND a.tenant = $4",
                )
                .bind(r.task_id)
                .bind(attempt)
                .bind(r.agent.0)
                .bind(r.tenant.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                let Some(state) = state else {
                    return Ok(Verdict::NotFound);
                };
                let verdict = if state.attempt_finished.is_some() && state.answered {
                    Verdict::Duplicate
                } else if matches!(state.task_status.as_str(), "succeeded" | "failed") {
                    Verdict::TaskFinished
                } else {
                    let _ = state.task_attempt;
                    Verdict::Superseded
                };
                if r.answered && matches!(verdict, Verdict::TaskFinished | Verdict::Superseded) {
                    sqlx::query("UPDATE task_attempts SET late = $1 WHERE task_id = $2 AND attempt = $3")
                        .bind(true)
                        .bind(r.task_id)
                        .bind(attempt)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                }
                Ok(verdict)
            })
        })
        .await
    }

    async fn fail_task(&self, id: Uuid, owner: &str, error: &str, at_ms: i64) -> Result<bool, StoreError> {
        self.retrying("fail_task", || async {
            with_pool!(self, write, |pool| {
                let mut tx = pool.begin().await?;
                let failed = sqlx::query(
                    "UPDATE tasks SET status = 'failed', error = $1, finished_at_ms = $2, updated_at_ms = $2, \
                     owner = NULL WHERE id = $3 AND owner = $4 AND status IN ('queued', 'running')",
                )
                .bind(error)
                .bind(at_ms)
                .bind(id)
                .bind(owner)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if failed == 1 {
                    // An attempt still open (say, queued for a pull agent) ends with the task.
                    sqlx::query(
                        "UPDATE task_attempts SET finished_at_ms = $1, outcome = 'timeout', error = $2 \
                         WHERE task_id = $3 AND finished_at_ms IS NULL",
                    )
                    .bind(at_ms)
                    .bind("the task ended")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(failed == 1)
            })
        })
        .await
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
