//! [`TaskService`]: submits tasks, drives their attempts, serves pull agents and records
//! results.
//!
//! Timeouts, backoff pauses and long polls run on tokio's monotonic timer; the stored times
//! (`started_at_ms`, leases, deadlines) come from the injected [`Clock`], which is the time base
//! shared by every kernel on one database.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use uuid::Uuid;

use super::{
    AttemptEnd, AttemptRecord, AttemptReport, Delivery, DeliveryMode, DispatchConfig, NewTask, PulledAttempt,
    RecordedEnd, Reported, ResultAck, StartVerdict, TASK_CAPABILITIES_MAX, TASK_HINT_BYTES_MAX, TASK_HINTS_MAX,
    TaskRecord, TaskResult, TaskStatus, TaskTransport, TaskView, Verdict, backoff, clip_error,
};
use crate::agent::{AgentId, validate_capability_name, validate_labels};
use crate::chaos::{Chaos, ChaosTarget, Injected};
use crate::clock::Clock;
use crate::degraded::{ApplyError, Criticality, DegradedModes, SpoolSink, SpooledWrite, WriteClass};
use crate::metrics::Metrics;
use crate::routing::{AttemptOutcome, Placement, RouteRequest, RoutedAgent};
use crate::store::{Store, StoreError};
use crate::tenant::TenantId;
use crate::{CoreError, CoreResult};

/// The dispatch service of one kernel.
pub struct TaskService {
    store: Arc<dyn Store>,
    placement: Arc<dyn Placement>,
    transport: Arc<dyn TaskTransport>,
    chaos: Arc<Chaos>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    config: DispatchConfig,
    /// This kernel's name in the `owner` column (unique per start).
    owner: String,
    /// Free driver slots (`drivers_max`).
    drivers: Arc<Semaphore>,
    /// Tasks driven here now, with their tenant when this kernel accepted them.
    driving: DashMap<Uuid, Option<TenantId>>,
    /// Pull agents waiting for work on this kernel, woken when work is queued here.
    agent_waiters: DashMap<AgentId, Arc<Notify>>,
    /// Drivers waiting for a pull result, woken when one is recorded here.
    result_waiters: DashMap<Uuid, Arc<Notify>>,
    /// Clients waiting for a task to finish, woken when its driver here ends.
    task_waiters: DashMap<Uuid, Arc<TaskWaiters>>,
    /// Where results go while the store is down (critical writes).
    degraded: Option<Arc<DegradedModes>>,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService").field("owner", &self.owner).field("config", &self.config).finish_non_exhaustive()
    }
}

/// The clients waiting for one task driven here.
#[derive(Default)]
struct TaskWaiters {
    /// Woken when the task's driver here ends.
    notify: Notify,
    /// The finished task as its driver's last write stored it, when the driver knew all of it
    /// (a success at the first attempt): the waiters answer with it instead of reading.
    finished: std::sync::OnceLock<TaskView>,
}

/// What a driver knows of a task this kernel has just stored, saving its first read.
struct Fresh {
    /// The task as submitted: queued, no attempt.
    task: TaskRecord,
    /// Its first attempt's agent and record, when it was stored started with the task.
    started: Option<(RoutedAgent, AttemptRecord)>,
}

/// How one attempt went, for the driver.
enum Step {
    /// The task succeeded (with the rows the store wrote, when it answered them).
    Done(Option<Box<RecordedEnd>>),
    /// The attempt failed or timed out; retry if allowed.
    Failed(String),
    /// The pull agent's queue was full: try another agent without counting an attempt.
    QueueFull,
    /// This kernel no longer drives the task.
    Lost,
}

/// How an attempt ended, as recorded.
enum Ended {
    /// With the rows the store wrote, when this kernel's write was the one accepted.
    Success(Option<Box<RecordedEnd>>),
    Failure(String),
    Timeout(String),
}

impl Ended {
    fn from_record(a: &AttemptRecord) -> Option<Self> {
        let error = || a.error.clone().unwrap_or_default();
        Some(match a.outcome? {
            AttemptEnd::Success => Self::Success(None),
            AttemptEnd::Failure => Self::Failure(error()),
            AttemptEnd::Timeout => Self::Timeout(error()),
        })
    }
}

/// Removes a task from the driving set and counts it off when its driver ends, however it ends.
struct DrivingGuard<'a> {
    service: &'a TaskService,
    id: Uuid,
}

impl Drop for DrivingGuard<'_> {
    fn drop(&mut self) {
        self.service.driving.remove(&self.id);
        self.service.metrics.tasks_driving.dec();
    }
}

impl TaskService {
    /// A service over `store` that places attempts with `placement`, pushes them with
    /// `transport` and applies the dispatch chaos toggles of `chaos`.
    pub fn new(
        store: Arc<dyn Store>,
        placement: Arc<dyn Placement>,
        transport: Arc<dyn TaskTransport>,
        chaos: Arc<Chaos>,
        clock: Arc<dyn Clock>,
        metrics: Metrics,
        config: DispatchConfig,
    ) -> CoreResult<Self> {
        config.validate()?;
        Ok(Self {
            store,
            placement,
            transport,
            chaos,
            clock,
            metrics,
            drivers: Arc::new(Semaphore::new(config.drivers_max as usize)),
            config,
            owner: format!("kernel-{}", Uuid::now_v7()),
            driving: DashMap::new(),
            agent_waiters: DashMap::new(),
            result_waiters: DashMap::new(),
            task_waiters: DashMap::new(),
            degraded: None,
        })
    }

    /// Buffers results in `degraded`'s spool while the store is down, when results are
    /// critical there.
    #[must_use]
    pub fn with_degraded(mut self, degraded: Arc<DegradedModes>) -> Self {
        self.degraded = Some(degraded);
        self
    }

    /// Writes an attempt's result to the local spool because the store failed with `err`.
    /// `Ok(true)` when it is buffered; `Ok(false)` when results are not critical here (or
    /// the kernel has no spool) and the caller must report `err`.
    async fn spool_result(&self, report: &AttemptReport, err: &StoreError) -> CoreResult<bool> {
        let Some(degraded) = &self.degraded else { return Ok(false) };
        if !matches!(err, StoreError::Backend(_))
            || degraded.criticality(WriteClass::TaskResult) != Criticality::Critical
        {
            return Ok(false);
        }
        let key = format!("{}/{}", report.task_id, report.attempt);
        let body = serde_json::to_value(report).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        match degraded.spool(WriteClass::TaskResult, key, body).await {
            Ok(_) => {
                self.metrics.task_results_spooled_total.inc();
                tracing::warn!(task_id = %report.task_id, attempt = report.attempt, "store unavailable: result spooled");
                Ok(true)
            }
            Err(spool_err) => {
                tracing::error!(task_id = %report.task_id, error = %spool_err, "store unavailable and the spool refused the result");
                Ok(false)
            }
        }
    }

    /// The settings.
    pub fn config(&self) -> &DispatchConfig {
        &self.config
    }

    /// This kernel's owner name, as stored in the tasks it drives.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Validates and stores a task of `tenant`, then starts driving it. The task is stored
    /// before this returns.
    pub async fn submit(self: &Arc<Self>, tenant: &TenantId, new: NewTask) -> CoreResult<TaskView> {
        let cfg = &self.config;
        validate_request(&new)?;
        let input_bytes = serde_json::to_vec(&new.input).map(|v| v.len()).unwrap_or(usize::MAX);
        if input_bytes > cfg.input_bytes_max {
            return Err(CoreError::invalid(
                "input_too_large",
                format!("input is {input_bytes} bytes; at most {} allowed", cfg.input_bytes_max),
            ));
        }
        let attempt_timeout_ms = within(
            "attempt_timeout_ms",
            new.attempt_timeout_ms,
            cfg.attempt_timeout_ms_default,
            cfg.attempt_timeout_ms_max,
        )?;
        let attempts_max = within(
            "attempts_max",
            new.attempts_max.map(u64::from),
            u64::from(cfg.attempts_max_default),
            u64::from(cfg.attempts_max_ceiling),
        )?;
        let deadline_ms = within("deadline_ms", new.deadline_ms, cfg.deadline_ms_default, cfg.deadline_ms_max)?;
        let now = self.clock.now_ms();
        let permit = self.drivers.clone().try_acquire_owned().ok();
        let task = TaskRecord {
            id: Uuid::now_v7(),
            tenant: tenant.clone(),
            status: TaskStatus::Queued,
            request: RouteRequest { capabilities: new.capabilities, labels: new.labels, hints: new.hints, count: None },
            input: new.input,
            attempt_timeout_ms,
            attempts_max: u32::try_from(attempts_max).unwrap_or(u32::MAX),
            deadline_at_ms: now.saturating_add(i64::try_from(deadline_ms).unwrap_or(i64::MAX)),
            attempt: 0,
            output: None,
            error: None,
            created_at_ms: now,
            updated_at_ms: now,
            finished_at_ms: None,
            // Without a free driver slot the task waits, unowned, for a sweeper with one.
            owner: permit.as_ref().map(|_| self.owner.clone()),
            lease_until_ms: if permit.is_some() { self.lease_until(now) } else { 0 },
        };
        let limited = |err| match err {
            StoreError::LimitExceeded(message) => CoreError::LimitExceeded { message: message.into() },
            other => other.into(),
        };
        // With a driver slot and no chaos toggle on, the first attempt is placed now and
        // stored with the task in one write, a commit fewer per task. Otherwise (or when no
        // agent qualifies, or routing fails) the task is stored alone and its driver places it.
        let placed = match &permit {
            Some(_) if !self.chaos.any_on() => self.place_first(&task).await,
            _ => None,
        };
        let (view, started) = match placed {
            Some((agent, record)) => {
                let stored = TaskRecord {
                    status: TaskStatus::Running,
                    attempt: record.attempt,
                    updated_at_ms: record.started_at_ms,
                    ..task.clone()
                };
                let verdict = self
                    .store
                    .insert_task_started(&stored, &record, cfg.tenant_active_tasks_max, cfg.queue_depth_max)
                    .await
                    .map_err(limited)?;
                match verdict {
                    StartVerdict::Started => (TaskView::summary(stored), Some((agent, record))),
                    // Stored queued with no attempt: the driver places it elsewhere.
                    StartVerdict::QueueFull | StartVerdict::Lost => (TaskView::summary(task.clone()), None),
                }
            }
            None => {
                self.store.insert_task(&task, cfg.tenant_active_tasks_max).await.map_err(limited)?;
                (TaskView::summary(task.clone()), None)
            }
        };
        tracing::info!(task_id = %task.id, tenant = %tenant, "task submitted");
        if let Some(permit) = permit {
            // Just stored: the driver starts from this record, not a read.
            self.spawn_driver(task.id, permit, Some(Fresh { task, started }));
        }
        Ok(view)
    }

    /// The first attempt of a new `task` (queued, no attempt yet): its agent and the
    /// attempt's record. `None` when no agent qualifies or routing failed: the driver then
    /// tries, and reports, as for any later attempt.
    async fn place_first(&self, task: &TaskRecord) -> Option<(RoutedAgent, AttemptRecord)> {
        let agent = match self.placement.place(&task.tenant, &task.request, &|_| false).await {
            Ok(agent) => agent?,
            Err(err) => {
                tracing::debug!(task_id = %task.id, error = %err, "placing at submission failed; the driver retries");
                return None;
            }
        };
        let now = self.clock.now_ms();
        let left_ms = u64::try_from(task.deadline_at_ms.saturating_sub(now)).unwrap_or(0);
        let timeout = Duration::from_millis(task.attempt_timeout_ms.min(left_ms));
        let record = self.attempt_record(task, &agent, 1, timeout, None);
        Some((agent, record))
    }

    /// The task with its attempts, if it belongs to `tenant`.
    pub async fn get(&self, tenant: &TenantId, id: Uuid) -> CoreResult<TaskView> {
        let (task, attempts) =
            self.store.get_task_with_attempts(Some(tenant), id).await?.ok_or(CoreError::NotFound { what: "task" })?;
        Ok(TaskView::full(task, attempts))
    }

    /// The task as [`TaskService::get`] shows it, once it has finished or `wait` (capped at
    /// `wait_ms_max`) has passed. A task driven here wakes the waiter at once; one driven by
    /// another kernel is seen within `poll_interval_ms`.
    pub async fn get_finished(&self, tenant: &TenantId, id: Uuid, wait: Duration) -> CoreResult<TaskView> {
        let until = Instant::now() + wait.min(Duration::from_millis(self.config.wait_ms_max));
        let waiters = self.task_waiters.entry(id).or_default().clone();
        let notify = &waiters.notify;
        let mut first = true;
        let result = loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // A task of this tenant driven here is unfinished (its driver leaves the set before
            // it wakes the waiters): no read until it wakes us.
            let unfinished = first
                && Instant::now() < until
                && self.driving.get(&id).is_some_and(|driven| driven.value().as_ref() == Some(tenant));
            first = false;
            if unfinished {
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(until) => {}
                }
                if let Some(view) = waiters.finished.get().filter(|view| &view.tenant == tenant) {
                    break Ok(view.clone());
                }
                continue;
            }
            let view = match self.get(tenant, id).await {
                Ok(view) => view,
                Err(err) => break Err(err),
            };
            let now = Instant::now();
            if view.status.is_final() || now >= until {
                break Ok(view);
            }
            let wake = until.min(now + Duration::from_millis(self.config.poll_interval_ms));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        };
        drop(waiters);
        self.task_waiters.remove_if(&id, |_, n| Arc::strong_count(n) == 1);
        result
    }

    /// A page of the tenant's tasks, by id.
    pub async fn list(
        &self,
        tenant: &TenantId,
        status: Option<TaskStatus>,
        after: Option<Uuid>,
        limit: u32,
    ) -> CoreResult<Vec<TaskView>> {
        let tasks = self.store.list_tasks(tenant, status, after, limit).await?;
        Ok(tasks.into_iter().map(TaskView::summary).collect())
    }

    /// Waits up to `wait` (capped at `wait_ms_max`) for an attempt queued for `agent` of
    /// `tenant` and hands it over; `None` when none came.
    pub async fn pull_next(&self, tenant: &TenantId, agent: AgentId, wait: Duration) -> CoreResult<Option<Delivery>> {
        let until = Instant::now() + wait.min(Duration::from_millis(self.config.wait_ms_max));
        let notify = self.agent_waiters.entry(agent).or_default().clone();
        let result = loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.store.claim_next_pull(tenant, agent, self.clock.now_ms()).await {
                Ok(Some(pulled)) => break Ok(Some(self.delivery(tenant, pulled))),
                Ok(None) => {}
                Err(err) => break Err(err.into()),
            }
            let now = Instant::now();
            if now >= until {
                break Ok(None);
            }
            let wake = until.min(now + Duration::from_millis(self.config.poll_interval_ms));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        };
        drop(notify);
        // The map holds one reference; with no other waiter left, forget the agent.
        self.agent_waiters.remove_if(&agent, |_, n| Arc::strong_count(n) == 1);
        result
    }

    /// Records a pull agent's result for one attempt of a task of `tenant`.
    pub async fn complete(
        &self,
        tenant: &TenantId,
        agent: AgentId,
        task_id: Uuid,
        result: TaskResult,
    ) -> CoreResult<ResultAck> {
        let reported = if result.ok {
            if result.error.is_some() {
                return Err(CoreError::invalid("invalid_result", "a successful result has no `error`"));
            }
            let output = result.output.unwrap_or(serde_json::Value::Null);
            let bytes = serde_json::to_vec(&output).map(|v| v.len()).unwrap_or(usize::MAX);
            if bytes > self.config.output_bytes_max {
                return Err(CoreError::invalid(
                    "output_too_large",
                    format!("output is {bytes} bytes; at most {} allowed", self.config.output_bytes_max),
                ));
            }
            Reported::Output(output)
        } else {
            if result.output.is_some() {
                return Err(CoreError::invalid("invalid_result", "a failed result has no `output`"));
            }
            let error = result.error.filter(|e| !e.trim().is_empty()).ok_or_else(|| {
                CoreError::invalid("invalid_result", "a failed result (`ok: false`) needs an `error` message")
            })?;
            Reported::Error(clip_error(&error))
        };
        let report = AttemptReport {
            task_id,
            attempt: result.attempt,
            tenant: tenant.clone(),
            agent,
            result: reported,
            answered: true,
            at_ms: self.clock.now_ms(),
        };
        let verdict = match self.store.finish_attempt(&report).await {
            Ok(verdict) => verdict,
            Err(err) => {
                if self.spool_result(&report, &err).await? {
                    return Ok(ResultAck {
                        task_id,
                        attempt: result.attempt,
                        duplicate: false,
                        buffered: true,
                        status: TaskStatus::Running,
                    });
                }
                return Err(err.into());
            }
        };
        match verdict {
            Verdict::Accepted | Verdict::Duplicate => {
                if verdict == Verdict::Accepted
                    && let Some(waiter) = self.result_waiters.get(&task_id)
                {
                    waiter.notify_waiters();
                }
                let status =
                    self.store.get_task(Some(tenant), task_id).await?.map_or(TaskStatus::Running, |t| t.status);
                Ok(ResultAck {
                    task_id,
                    attempt: result.attempt,
                    duplicate: verdict == Verdict::Duplicate,
                    buffered: false,
                    status,
                })
            }
            Verdict::Superseded => {
                self.metrics.task_late_results_total.with_label_values(&["pull"]).inc();
                tracing::info!(%task_id, attempt = result.attempt, agent_id = %agent, "late result discarded: attempt superseded");
                Err(CoreError::Conflict {
                    code: "attempt_superseded",
                    message: "this attempt has ended (timed out or superseded); its result was discarded".into(),
                })
            }
            Verdict::TaskFinished => {
                self.metrics.task_late_results_total.with_label_values(&["pull"]).inc();
                tracing::info!(%task_id, attempt = result.attempt, agent_id = %agent, "late result discarded: task finished");
                Err(CoreError::Conflict {
                    code: "task_finished",
                    message: "the task has finished; this result was discarded".into(),
                })
            }
            Verdict::NotFound => Err(CoreError::NotFound { what: "task attempt" }),
        }
    }

    /// Renews this kernel's leases, takes over orphaned tasks, purges old finished ones and
    /// refreshes the queue-depth gauge, every `sweep_interval_ms`, until `shutdown` turns true.
    pub async fn run_background(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.sweep_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(err) = self.sweep().await {
                        tracing::warn!(error = %err, "task sweep failed; will retry");
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
    }

    /// One sweep (see [`TaskService::run_background`]); returns the tasks taken over.
    pub async fn sweep(self: &Arc<Self>) -> CoreResult<usize> {
        let now = self.clock.now_ms();
        self.store.renew_task_leases(&self.owner, self.lease_until(now)).await?;
        let free = u32::try_from(self.drivers.available_permits()).unwrap_or(u32::MAX);
        let batch = free.min(self.config.takeover_batch_max);
        let mut taken = 0;
        if batch > 0 {
            for id in self.store.claim_orphaned_tasks(&self.owner, now, self.lease_until(now), batch).await? {
                if self.driving.contains_key(&id) {
                    continue;
                }
                let Ok(permit) = self.drivers.clone().try_acquire_owned() else { break };
                tracing::info!(task_id = %id, "taking over a task whose lease ran out");
                self.spawn_driver(id, permit, None);
                taken += 1;
            }
        }
        let retention = i64::try_from(self.config.finished_retention_ms).unwrap_or(i64::MAX);
        self.store.purge_finished_tasks(now.saturating_sub(retention), self.config.purge_batch_max).await?;
        let depth = self.store.pull_queue_depth().await?;
        self.metrics.task_queue_depth.set(i64::try_from(depth).unwrap_or(i64::MAX));
        Ok(taken)
    }

    fn lease_until(&self, now_ms: i64) -> i64 {
        now_ms.saturating_add(i64::try_from(self.config.lease_ms).unwrap_or(i64::MAX))
    }

    fn delivery(&self, tenant: &TenantId, pulled: PulledAttempt) -> Delivery {
        Delivery {
            task_id: pulled.task_id,
            attempt: pulled.attempt,
            tenant: tenant.clone(),
            input: pulled.input,
            deadline_ms: pulled.timeout_at_ms,
            timeout_ms: pulled.timeout_ms,
        }
    }

    /// Drives task `id` here; `fresh` is what this kernel just stored of it (the task, and
    /// its first attempt when that was stored with it), saving the first read.
    fn spawn_driver(self: &Arc<Self>, id: Uuid, permit: OwnedSemaphorePermit, fresh: Option<Fresh>) {
        let tenant = fresh.as_ref().map(|fresh| fresh.task.tenant.clone());
        if self.driving.insert(id, tenant).is_some() {
            return;
        }
        self.metrics.tasks_driving.inc();
        let this = self.clone();
        tokio::spawn(async move {
            let guard = DrivingGuard { service: &this, id };
            let mut fresh = fresh;
            // This kernel keeps renewing the leases of the tasks it owns, so a driver that
            // stops on an error (the store unreachable, say) must resume the task itself: it
            // starts over from the stored state after a backoff, until the task finishes, its
            // deadline passes (checked from the stored state) or another kernel owns it.
            let mut failures = 0u32;
            let recorded = loop {
                match this.drive(id, fresh.take()).await {
                    Ok(recorded) => break recorded,
                    Err(err) => {
                        tracing::warn!(task_id = %id, error = %err, "driving a task failed; resuming after a pause");
                        let pause =
                            backoff::full_jitter(this.config.backoff_base_ms, this.config.backoff_cap_ms, failures);
                        failures = failures.saturating_add(1);
                        tokio::time::sleep(pause).await;
                    }
                }
            };
            // Out of the driving set before the waiters wake (see `get_finished`).
            drop(guard);
            if let Some(waiters) = this.task_waiters.get(&id) {
                if let Some(recorded) = recorded {
                    let RecordedEnd { task, attempt } = *recorded;
                    let _ = waiters.finished.set(TaskView::full(task, vec![attempt]));
                }
                waiters.notify.notify_waiters();
            }
            drop(permit);
        });
    }

    /// Runs a task's attempts until it succeeds, fails, or is no longer ours. `fresh`: the
    /// task as this kernel just stored it (with its first attempt, when that was stored with
    /// it); otherwise it is read from the store. Returns the task's and its only attempt's
    /// rows as stored when it succeeded at its first attempt here (the whole task, known
    /// without a read).
    async fn drive(self: &Arc<Self>, id: Uuid, fresh: Option<Fresh>) -> CoreResult<Option<Box<RecordedEnd>>> {
        let (task, attempts, mut started) = match fresh {
            Some(Fresh { task, started }) => (task, Vec::new(), started),
            None => {
                let Some((task, attempts)) = self.store.get_task_with_attempts(None, id).await? else {
                    return Ok(None);
                };
                (task, attempts, None)
            }
        };
        if task.status.is_final() || task.owner.as_deref() != Some(self.owner.as_str()) {
            return Ok(None);
        }
        let left_ms = u64::try_from(task.deadline_at_ms.saturating_sub(self.clock.now_ms())).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_millis(left_ms);
        let mut tried: HashSet<AgentId> = attempts.iter().map(|a| a.agent).collect();
        let mut made = task.attempt;
        let mut last_error = attempts.last().and_then(|a| a.error.clone());
        if let Some(open) = attempts.last().filter(|a| a.finished_at_ms.is_none()) {
            // Resumed after another kernel stopped: a queued pull attempt can still be answered
            // until its timeout; a pushed one died with the kernel that sent it.
            match self.resume(&task, open).await? {
                Step::Done(_) | Step::QueueFull | Step::Lost => return Ok(None),
                Step::Failed(error) => last_error = Some(error),
            }
        }
        let mut retries = 0u32;
        loop {
            if made >= task.attempts_max {
                let error = format!(
                    "all {made} attempts failed; last error: {}",
                    last_error.as_deref().unwrap_or("none recorded")
                );
                return self.fail(&task, &error).await.map(|()| None);
            }
            if Instant::now() >= deadline {
                let error = format!(
                    "deadline passed after {made} attempts; last error: {}",
                    last_error.as_deref().unwrap_or("none")
                );
                return self.fail(&task, &error).await.map(|()| None);
            }
            if made > 0 {
                let pause = backoff::full_jitter(self.config.backoff_base_ms, self.config.backoff_cap_ms, retries);
                retries = retries.saturating_add(1);
                tokio::time::sleep_until(deadline.min(Instant::now() + pause)).await;
                if Instant::now() >= deadline {
                    continue;
                }
            }
            let (agent, step) = if let Some((agent, record)) = started.take() {
                // Placed and started at submission, stored with the task.
                let timeout = Duration::from_millis(
                    u64::try_from(record.timeout_at_ms.saturating_sub(record.started_at_ms)).unwrap_or(0),
                );
                let step = self.run_attempt(&task, &agent, &record, timeout, None).await?;
                (agent, step)
            } else {
                let skip = |agent: AgentId| tried.contains(&agent);
                let Some(agent) = self.placement.place(&task.tenant, &task.request, &skip).await? else {
                    let error = if tried.is_empty() {
                        "no agent qualifies for the task (capabilities, labels, health)".to_string()
                    } else {
                        format!(
                            "no other agent qualifies after {made} attempts on {} agents; last error: {}",
                            tried.len(),
                            last_error.as_deref().unwrap_or("none")
                        )
                    };
                    return self.fail(&task, &error).await.map(|()| None);
                };
                let step = self.attempt(&task, &agent, made + 1, deadline).await?;
                (agent, step)
            };
            tried.insert(agent.id);
            match step {
                // The first attempt: its rows are the task's whole stored state.
                Step::Done(recorded) => return Ok(recorded.filter(|_| made == 0)),
                Step::Failed(error) => {
                    made += 1;
                    last_error = Some(error);
                }
                Step::QueueFull => {
                    tracing::info!(task_id = %task.id, agent_id = %agent.id, "pull queue full; placing elsewhere");
                    if last_error.is_none() {
                        last_error = Some(format!("the queue of agent {} is full", agent.id));
                    }
                }
                Step::Lost => return Ok(None),
            }
        }
    }

    async fn fail(&self, task: &TaskRecord, error: &str) -> CoreResult<()> {
        let error = clip_error(error);
        if self.store.fail_task(task.id, &self.owner, &error, self.clock.now_ms()).await? {
            self.metrics.tasks_total.with_label_values(&["failed"]).inc();
            tracing::info!(task_id = %task.id, error, "task failed");
        }
        Ok(())
    }

    /// Finishes an attempt left open by a kernel that stopped.
    async fn resume(&self, task: &TaskRecord, open: &AttemptRecord) -> CoreResult<Step> {
        self.placement.attempt_started(open.agent);
        let started = Instant::now();
        let ended = match open.mode {
            DeliveryMode::Pull => {
                let left = u64::try_from(open.timeout_at_ms.saturating_sub(self.clock.now_ms())).unwrap_or(0);
                self.await_pull(open, started + Duration::from_millis(left)).await?
            }
            DeliveryMode::Push => {
                let error = "the kernel that sent this attempt stopped before it was answered".to_string();
                self.settle(open, Reported::TimedOut(error)).await?
            }
        };
        Ok(self.account(task, open, started, ended))
    }

    /// Makes attempt `number` of `task` on `agent`.
    async fn attempt(
        self: &Arc<Self>,
        task: &TaskRecord,
        agent: &RoutedAgent,
        number: u32,
        deadline: Instant,
    ) -> CoreResult<Step> {
        let timeout =
            Duration::from_millis(task.attempt_timeout_ms).min(deadline.saturating_duration_since(Instant::now()));
        let injected = self.chaos.inject(ChaosTarget::Dispatch, &task.tenant).await;
        let record = self.attempt_record(task, agent, number, timeout, injected);
        let lease_until_ms = self.lease_until(record.started_at_ms);
        match self.store.start_attempt(&record, &self.owner, lease_until_ms, self.config.queue_depth_max).await? {
            StartVerdict::Started => {}
            StartVerdict::QueueFull => return Ok(Step::QueueFull),
            StartVerdict::Lost => return Ok(Step::Lost),
        }
        self.run_attempt(task, agent, &record, timeout, injected).await
    }

    /// The record of attempt `number` of `task` on `agent`, starting now.
    fn attempt_record(
        &self,
        task: &TaskRecord,
        agent: &RoutedAgent,
        number: u32,
        timeout: Duration,
        injected: Option<Injected>,
    ) -> AttemptRecord {
        let mode = if agent.endpoint.is_some() { DeliveryMode::Push } else { DeliveryMode::Pull };
        let now = self.clock.now_ms();
        // A dropped attempt is never handed to anyone: marking it delivered keeps it out of
        // the pull queue.
        let delivered = (mode == DeliveryMode::Push || injected == Some(Injected::Drop)).then_some(now);
        AttemptRecord {
            task_id: task.id,
            attempt: number,
            tenant: task.tenant.clone(),
            agent: agent.id,
            mode,
            started_at_ms: now,
            timeout_at_ms: now.saturating_add(i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)),
            delivered_at_ms: delivered,
            finished_at_ms: None,
            outcome: None,
            answered: false,
            error: None,
            late: false,
        }
    }

    /// Runs an attempt the store has started: delivers it (or applies the chaos fault drawn
    /// for it) and waits for its end until `timeout`.
    async fn run_attempt(
        self: &Arc<Self>,
        task: &TaskRecord,
        agent: &RoutedAgent,
        record: &AttemptRecord,
        timeout: Duration,
        injected: Option<Injected>,
    ) -> CoreResult<Step> {
        let (number, mode) = (record.attempt, record.mode);
        self.placement.attempt_started(agent.id);
        if number > 1 {
            self.metrics.task_retries_total.inc();
        }
        let started = Instant::now();
        let until = started + timeout;
        let ended = match (injected, mode) {
            (Some(Injected::Error), _) => {
                self.settle(record, Reported::Error("fault injected by a chaos toggle".into())).await?
            }
            (Some(Injected::Drop), _) => {
                tokio::time::sleep_until(until).await;
                self.settle(record, Reported::TimedOut(timeout_message(agent, timeout))).await?
            }
            (None, DeliveryMode::Push) => self.push(task, agent, record, timeout).await?,
            (None, DeliveryMode::Pull) => {
                if let Some(waiter) = self.agent_waiters.get(&agent.id) {
                    waiter.notify_waiters();
                }
                let ended = self.await_pull(record, until).await?;
                if let Ended::Timeout(_) = ended {
                    tracing::info!(task_id = %task.id, attempt = number, agent_id = %agent.id, "pull attempt timed out");
                }
                ended
            }
        };
        Ok(self.account(task, record, started, ended))
    }

    /// Metrics, placement feedback and the driver's next step for an ended attempt.
    fn account(&self, task: &TaskRecord, record: &AttemptRecord, started: Instant, ended: Ended) -> Step {
        let elapsed = started.elapsed();
        let (outcome, step) = match ended {
            Ended::Success(recorded) => (AttemptOutcome::Success, Step::Done(recorded)),
            Ended::Failure(error) => (AttemptOutcome::Failure, Step::Failed(error)),
            Ended::Timeout(error) => (AttemptOutcome::Timeout, Step::Failed(error)),
        };
        self.placement.attempt_finished(record.agent, elapsed, outcome);
        let label = match outcome {
            AttemptOutcome::Success => "success",
            AttemptOutcome::Failure => "failure",
            AttemptOutcome::Timeout => "timeout",
        };
        self.metrics.task_attempts_total.with_label_values(&[label]).inc();
        self.metrics
            .task_attempt_duration_seconds
            .with_label_values(&[record.mode.as_str()])
            .observe(elapsed.as_secs_f64());
        if let Step::Done(_) = step {
            self.metrics.tasks_total.with_label_values(&["succeeded"]).inc();
            tracing::info!(task_id = %task.id, attempt = record.attempt, agent_id = %record.agent, "task succeeded");
        }
        step
    }

    /// Pushes an attempt and waits for its answer until its timeout. The request itself may
    /// run up to `late_wait_ms_max` longer, so that a straggler's late answer is seen,
    /// discarded and counted instead of cut off.
    async fn push(
        self: &Arc<Self>,
        task: &TaskRecord,
        agent: &RoutedAgent,
        record: &AttemptRecord,
        timeout: Duration,
    ) -> CoreResult<Ended> {
        let endpoint = agent.endpoint.clone().unwrap_or_default();
        let delivery = Delivery {
            task_id: task.id,
            attempt: record.attempt,
            tenant: task.tenant.clone(),
            input: task.input.clone(),
            deadline_ms: record.timeout_at_ms,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        let answered = record.clone();
        let wait = timeout + Duration::from_millis(self.config.late_wait_ms_max);
        tokio::spawn(async move {
            let reported = match this.transport.push(&endpoint, &delivery, wait).await {
                Ok(output) => {
                    let bytes = serde_json::to_vec(&output).map(|v| v.len()).unwrap_or(usize::MAX);
                    if bytes > this.config.output_bytes_max {
                        Reported::Error(format!(
                            "the agent's result is {bytes} bytes; at most {} allowed",
                            this.config.output_bytes_max
                        ))
                    } else {
                        Reported::Output(output)
                    }
                }
                Err(error) => Reported::Error(clip_error(&error)),
            };
            let report = AttemptReport {
                task_id: answered.task_id,
                attempt: answered.attempt,
                tenant: answered.tenant.clone(),
                agent: answered.agent,
                result: reported,
                answered: true,
                at_ms: this.clock.now_ms(),
            };
            let (verdict, recorded) = match this.store.finish_attempt_recorded(&report).await {
                Ok((verdict, recorded)) => (Ok(verdict), recorded),
                Err(err) => {
                    // The agent did the work: keep its answer for when the store returns.
                    let _ = this.spool_result(&report, &err).await;
                    (Err(err), None)
                }
            };
            let ended = match &report.result {
                Reported::Output(_) => Ended::Success(recorded),
                Reported::Error(e) => Ended::Failure(e.clone()),
                Reported::TimedOut(e) => Ended::Timeout(e.clone()),
            };
            if let Ok(Verdict::Superseded | Verdict::TaskFinished) = verdict {
                this.metrics.task_late_results_total.with_label_values(&["push"]).inc();
                tracing::info!(
                    task_id = %answered.task_id, attempt = answered.attempt, agent_id = %answered.agent,
                    "late pushed answer discarded"
                );
            }
            let _ = tx.send(verdict.map(|verdict| (verdict, ended)));
        });
        match tokio::time::timeout(timeout, rx).await {
            // This answer is the attempt's recorded end.
            Ok(Ok(Ok((Verdict::Accepted, ended)))) => Ok(ended),
            Ok(Ok(Ok(_))) => self.recorded(record).await,
            Ok(Ok(Err(err))) => Err(err.into()),
            // The sender vanished (the runtime is stopping) or the timeout passed.
            Ok(Err(_)) | Err(_) => self.settle(record, Reported::TimedOut(timeout_message(agent, timeout))).await,
        }
    }

    /// Waits for a pull agent's result (recorded by [`TaskService::complete`] on any kernel)
    /// until `until`, then records a timeout.
    async fn await_pull(&self, record: &AttemptRecord, until: Instant) -> CoreResult<Ended> {
        let notify = self.result_waiters.entry(record.task_id).or_default().clone();
        let outcome = loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.store.get_attempt(record.task_id, record.attempt).await {
                Ok(Some(row)) => {
                    if let Some(ended) = Ended::from_record(&row) {
                        break Ok(Some(ended));
                    }
                }
                Ok(None) => break Ok(Some(Ended::Failure("the attempt disappeared".into()))),
                Err(err) => break Err(err),
            }
            let now = Instant::now();
            if now >= until {
                break Ok(None);
            }
            let wake = until.min(now + Duration::from_millis(self.config.poll_interval_ms));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        };
        drop(notify);
        self.result_waiters.remove_if(&record.task_id, |_, n| Arc::strong_count(n) == 1);
        match outcome? {
            Some(ended) => Ok(ended),
            None => {
                let message = format!(
                    "no result from agent {} within {} ms",
                    record.agent,
                    record.timeout_at_ms.saturating_sub(record.started_at_ms)
                );
                self.settle(record, Reported::TimedOut(message)).await
            }
        }
    }

    /// Records a kernel-decided end of an attempt; if the agent's answer got there first,
    /// returns that instead.
    async fn settle(&self, record: &AttemptRecord, reported: Reported) -> CoreResult<Ended> {
        let ended = match &reported {
            Reported::Output(_) => Ended::Success(None),
            Reported::Error(e) => Ended::Failure(e.clone()),
            Reported::TimedOut(e) => Ended::Timeout(e.clone()),
        };
        let report = AttemptReport {
            task_id: record.task_id,
            attempt: record.attempt,
            tenant: record.tenant.clone(),
            agent: record.agent,
            result: reported,
            answered: false,
            at_ms: self.clock.now_ms(),
        };
        match self.store.finish_attempt(&report).await? {
            Verdict::Accepted => Ok(ended),
            _ => self.recorded(record).await,
        }
    }

    /// How the store says an attempt ended.
    async fn recorded(&self, record: &AttemptRecord) -> CoreResult<Ended> {
        let row = self.store.get_attempt(record.task_id, record.attempt).await?;
        Ok(row
            .as_ref()
            .and_then(Ended::from_record)
            .unwrap_or_else(|| Ended::Failure("the attempt ended without a recorded outcome".into())))
    }
}

fn timeout_message(agent: &RoutedAgent, timeout: Duration) -> String {
    format!("no answer from agent {} ({}) within {} ms", agent.name, agent.id, timeout.as_millis())
}

/// `requested` (or `default`) if within 1 and `max`.
fn within(name: &str, requested: Option<u64>, default: u64, max: u64) -> CoreResult<u64> {
    let value = requested.unwrap_or(default);
    if value == 0 || value > max {
        return Err(CoreError::invalid("invalid_task", format!("{name} must be between 1 and {max}")));
    }
    Ok(value)
}

/// The routing part of a new task: capability names, labels and hints within their limits.
fn validate_request(new: &NewTask) -> CoreResult<()> {
    if new.capabilities.is_empty() || new.capabilities.len() > TASK_CAPABILITIES_MAX {
        return Err(CoreError::invalid(
            "invalid_capability",
            format!("a task needs 1 to {TASK_CAPABILITIES_MAX} capabilities"),
        ));
    }
    for requirement in &new.capabilities {
        validate_capability_name(&requirement.name)?;
    }
    validate_labels(&new.labels)?;
    if new.hints.len() > TASK_HINTS_MAX
        || new.hints.iter().any(|(k, v)| k.is_empty() || k.len() > TASK_HINT_BYTES_MAX || v.len() > TASK_HINT_BYTES_MAX)
    {
        return Err(CoreError::invalid(
            "invalid_hint",
            format!(
                "at most {TASK_HINTS_MAX} hints, keys of 1 to {TASK_HINT_BYTES_MAX} bytes, values up to {TASK_HINT_BYTES_MAX}"
            ),
        ));
    }
    Ok(())
}

#[async_trait::async_trait]
impl SpoolSink for TaskService {
    /// Records a spooled result. Idempotent: the store accepts only the first result of an
    /// attempt, so a result replayed twice changes nothing the second time.
    async fn apply(&self, write: &SpooledWrite) -> Result<(), ApplyError> {
        if write.class != WriteClass::TaskResult {
            return Err(ApplyError::Rejected(format!("dispatch cannot apply a {} write", write.class.as_str())));
        }
        let report: AttemptReport =
            serde_json::from_value(write.body.clone()).map_err(|e| ApplyError::Rejected(e.to_string()))?;
        match self.store.finish_attempt(&report).await {
            Ok(verdict) => {
                if verdict == Verdict::Accepted {
                    if let Some(waiter) = self.result_waiters.get(&report.task_id) {
                        waiter.notify_waiters();
                    }
                } else if matches!(verdict, Verdict::Superseded | Verdict::TaskFinished) {
                    self.metrics.task_late_results_total.with_label_values(&["spool"]).inc();
                }
                Ok(())
            }
            Err(StoreError::Backend(message)) => Err(ApplyError::Unavailable(message)),
            Err(err) => Err(ApplyError::Rejected(err.to_string())),
        }
    }
}
