//! Task dispatch: push to an agent's endpoint or queue for agents that pull, with per-attempt
//! timeouts, retries with exponential backoff and full jitter on another agent, and results
//! readable by task id.
//!
//! A task is stored before it is acknowledged. One kernel *drives* it at a time: the one named
//! in the task's `owner` column while its lease (`lease_until_ms`) runs; the driver renews the
//! lease, and every kernel's sweeper takes over tasks whose lease ran out (their kernel
//! stopped), so a task is never lost with its kernel. Results are at-least-once on the agent's
//! side and exactly-once on the kernel's: every delivery carries the task id and the attempt
//! number, the store accepts the first result of the current attempt, and any other result is
//! discarded (and counted as late).

pub mod backoff;
pub mod service;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::agent::AgentId;
use crate::routing::{CapabilityRequirement, RouteRequest};
use crate::tenant::TenantId;
use crate::{CoreError, CoreResult};

pub use service::TaskService;

/// Most capability requirements in one task.
pub const TASK_CAPABILITIES_MAX: usize = 16;
/// Most routing hints in one task.
pub const TASK_HINTS_MAX: usize = 16;
/// Longest hint key or value, in bytes.
pub const TASK_HINT_BYTES_MAX: usize = 256;
/// Longest error message kept for an attempt or a task, in bytes (longer ones are cut).
pub const TASK_ERROR_BYTES_MAX: usize = 2048;

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Stored, no attempt started yet.
    Queued,
    /// An attempt is under way or a retry is waiting.
    Running,
    /// An agent answered with a result (final).
    Succeeded,
    /// Every attempt failed, no agent qualified, or the deadline passed (final).
    Failed,
}

impl TaskStatus {
    /// The stored and shown name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    /// Whether nothing changes any more.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

impl FromStr for TaskStatus {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "queued" => Ok(Self::Queued),
            "running" => Ok(Self::Running),
            "succeeded" => Ok(Self::Succeeded),
            "failed" => Ok(Self::Failed),
            _ => Err(CoreError::invalid("invalid_query", "status is one of queued, running, succeeded, failed")),
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an attempt reaches its agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    /// The kernel POSTs it to the agent's endpoint.
    Push,
    /// The agent fetches it with a long poll.
    Pull,
}

impl DeliveryMode {
    /// The stored and shown name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Push => "push",
            Self::Pull => "pull",
        }
    }
}

impl FromStr for DeliveryMode {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "push" => Ok(Self::Push),
            "pull" => Ok(Self::Pull),
            _ => Err(CoreError::invalid("invalid_mode", "delivery mode is push or pull")),
        }
    }
}

/// How an attempt ended, as stored and shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptEnd {
    /// The agent answered with a result.
    Success,
    /// The agent answered with an error, refused, or could not be reached.
    Failure,
    /// The attempt's timeout passed without an answer.
    Timeout,
}

impl AttemptEnd {
    /// The stored and shown name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Timeout => "timeout",
        }
    }
}

impl FromStr for AttemptEnd {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "success" => Ok(Self::Success),
            "failure" => Ok(Self::Failure),
            "timeout" => Ok(Self::Timeout),
            _ => Err(CoreError::invalid("invalid_outcome", "outcome is success, failure or timeout")),
        }
    }
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    /// Its id (UUIDv7).
    pub id: Uuid,
    /// Its tenant.
    pub tenant: TenantId,
    /// Where it is.
    pub status: TaskStatus,
    /// What the agent must offer.
    pub request: RouteRequest,
    /// The input handed to the agent.
    pub input: serde_json::Value,
    /// Longest one attempt may take.
    pub attempt_timeout_ms: u64,
    /// Most attempts.
    pub attempts_max: u32,
    /// When the whole task gives up (ms since the Unix epoch).
    pub deadline_at_ms: i64,
    /// Number of the latest attempt (0 before the first).
    pub attempt: u32,
    /// The accepted result (succeeded tasks).
    pub output: Option<serde_json::Value>,
    /// Why it failed (failed tasks).
    pub error: Option<String>,
    /// When it was created (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// When it last changed.
    pub updated_at_ms: i64,
    /// When it reached a final status.
    pub finished_at_ms: Option<i64>,
    /// The kernel driving it (`None`: any kernel may take it).
    pub owner: Option<String>,
    /// Until when the owner's claim holds (ms since the Unix epoch).
    pub lease_until_ms: i64,
}

/// One attempt of a task, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    /// The task.
    pub task_id: Uuid,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The task's tenant.
    pub tenant: TenantId,
    /// The agent it went to.
    pub agent: AgentId,
    /// Push or pull.
    pub mode: DeliveryMode,
    /// When it started (ms since the Unix epoch).
    pub started_at_ms: i64,
    /// When it times out.
    pub timeout_at_ms: i64,
    /// When the agent received it (pull: when it was fetched; push: when it was sent). A pull
    /// attempt is in its agent's queue while this is `None` and it has not finished.
    pub delivered_at_ms: Option<i64>,
    /// When it ended.
    pub finished_at_ms: Option<i64>,
    /// How it ended.
    pub outcome: Option<AttemptEnd>,
    /// Whether the outcome is the agent's own answer (rather than a timeout or an unreachable
    /// agent decided by the kernel).
    pub answered: bool,
    /// The error of a failed or timed-out attempt.
    pub error: Option<String>,
    /// Whether an answer arrived after the attempt had ended or been superseded (discarded).
    pub late: bool,
}

/// What a result reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reported {
    /// A result.
    Output(serde_json::Value),
    /// An error.
    Error(String),
    /// No answer within the timeout (decided by the kernel).
    TimedOut(String),
}

/// The end of one attempt, reported to the store (and, while the store is down, to the
/// local spool, in this shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptReport {
    /// The task.
    pub task_id: Uuid,
    /// The attempt the result is for.
    pub attempt: u32,
    /// The tenant the reporter acts in; another tenant's task is not found.
    pub tenant: TenantId,
    /// The agent reporting (or the agent the attempt went to); another agent's attempt is not
    /// found.
    pub agent: AgentId,
    /// What happened.
    pub result: Reported,
    /// Whether the agent itself answered (`false`: the kernel decided, e.g. a timeout).
    pub answered: bool,
    /// When (ms since the Unix epoch).
    pub at_ms: i64,
}

/// What the store did with an [`AttemptReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It was the first result of the task's current attempt: recorded (a success also
    /// finished the task).
    Accepted,
    /// The agent had already answered this attempt: nothing changed.
    Duplicate,
    /// The attempt had ended (timed out) or a later attempt exists: discarded.
    Superseded,
    /// The task had already finished: discarded.
    TaskFinished,
    /// No such attempt of this agent in this tenant.
    NotFound,
}

/// An attempt's accepted end as the store recorded it: the task and the attempt, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEnd {
    /// The task after the write.
    pub task: TaskRecord,
    /// The attempt after the write.
    pub attempt: AttemptRecord,
}

/// Whether [`crate::store::TaskStore::start_attempt`] started the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartVerdict {
    /// Recorded; the task is running this attempt.
    Started,
    /// The pull agent's queue holds `queue_depth_max` attempts; nothing written.
    QueueFull,
    /// This kernel no longer drives the task (it finished, or another kernel took it).
    Lost,
}

/// A pull attempt handed to its agent.
#[derive(Debug, Clone, PartialEq)]
pub struct PulledAttempt {
    /// The task.
    pub task_id: Uuid,
    /// The attempt number to report with the result.
    pub attempt: u32,
    /// The task's input.
    pub input: serde_json::Value,
    /// When the attempt times out (ms since the Unix epoch).
    pub timeout_at_ms: i64,
    /// The attempt's timeout, in ms.
    pub timeout_ms: u64,
}

/// One attempt of work as an agent receives it, pushed or pulled: the wire format of the
/// agent protocol (`docs/dispatch.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Delivery {
    /// The task; the key an agent deduplicates by.
    #[schema(value_type = String, format = Uuid)]
    pub task_id: Uuid,
    /// The attempt number; report it with the result.
    pub attempt: u32,
    /// The task's tenant.
    #[schema(value_type = String)]
    pub tenant: TenantId,
    /// The task's input.
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    /// When the kernel stops waiting for this attempt (ms since the Unix epoch); a result
    /// after it is discarded.
    pub deadline_ms: i64,
    /// The attempt's timeout, in ms.
    pub timeout_ms: u64,
}

/// Sends pushed attempts to agents: the HTTP client lives in the binary, behind this trait.
#[async_trait]
pub trait TaskTransport: Send + Sync + 'static {
    /// POSTs `delivery` to `endpoint` and waits at most `wait` for the answer. A 2xx JSON
    /// answer is the result (`Ok`); anything else is an error in words (`Err`).
    async fn push(&self, endpoint: &str, delivery: &Delivery, wait: Duration) -> Result<serde_json::Value, String>;
}

/// A task as submitted (`POST /api/v1/tasks`).
#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    /// Capabilities the agent must have, each in an accepted version.
    pub capabilities: Vec<CapabilityRequirement>,
    /// Labels the agent must carry.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Hints passed to the scorer.
    #[serde(default)]
    pub hints: std::collections::BTreeMap<String, String>,
    /// The input handed to the agent (any JSON, at most `input_bytes_max` bytes).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    /// Longest one attempt may take, in ms (default and maximum configured).
    pub attempt_timeout_ms: Option<u64>,
    /// Most attempts, each on another agent (default and maximum configured).
    pub attempts_max: Option<u32>,
    /// Longest the whole task may take, retries included, in ms (default and maximum configured).
    pub deadline_ms: Option<u64>,
}

/// One attempt as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AttemptView {
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The agent it went to.
    pub agent_id: AgentId,
    /// Push or pull.
    pub mode: DeliveryMode,
    /// When it started (ms since the Unix epoch).
    pub started_at_ms: i64,
    /// When it timed out or will time out.
    pub timeout_at_ms: i64,
    /// When the agent received it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_at_ms: Option<i64>,
    /// When it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    /// How it ended; absent while under way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<AttemptEnd>,
    /// Why it failed or timed out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether an answer came after the attempt had ended (it was discarded).
    pub late: bool,
}

impl From<AttemptRecord> for AttemptView {
    fn from(a: AttemptRecord) -> Self {
        Self {
            attempt: a.attempt,
            agent_id: a.agent,
            mode: a.mode,
            started_at_ms: a.started_at_ms,
            timeout_at_ms: a.timeout_at_ms,
            delivered_at_ms: a.delivered_at_ms,
            finished_at_ms: a.finished_at_ms,
            outcome: a.outcome,
            error: a.error,
            late: a.late,
        }
    }
}

/// A task as the API shows it. Listings leave out `input`, `output` and `attempts`.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TaskView {
    /// Its id.
    #[schema(value_type = String, format = Uuid)]
    pub id: Uuid,
    /// Its tenant.
    #[schema(value_type = String)]
    pub tenant: TenantId,
    /// `queued`, `running`, `succeeded` or `failed`.
    pub status: TaskStatus,
    /// What the agent must offer.
    pub request: RouteRequest,
    /// The input.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub input: Option<serde_json::Value>,
    /// The result, once succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub output: Option<serde_json::Value>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Attempts made so far.
    pub attempt: u32,
    /// Most attempts.
    pub attempts_max: u32,
    /// Longest one attempt may take, in ms.
    pub attempt_timeout_ms: u64,
    /// When the task gives up (ms since the Unix epoch).
    pub deadline_at_ms: i64,
    /// When it was created.
    pub created_at_ms: i64,
    /// When it last changed.
    pub updated_at_ms: i64,
    /// When it finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    /// Its attempts, oldest first (absent in listings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<AttemptView>>,
}

impl TaskView {
    /// The full view of a task and its attempts.
    pub fn full(task: TaskRecord, attempts: Vec<AttemptRecord>) -> Self {
        let mut view = Self::summary(task.clone());
        view.input = Some(task.input);
        view.output = task.output;
        view.attempts = Some(attempts.into_iter().map(AttemptView::from).collect());
        view
    }

    /// The listing view (no input, output or attempts).
    pub fn summary(task: TaskRecord) -> Self {
        Self {
            id: task.id,
            tenant: task.tenant,
            status: task.status,
            request: task.request,
            input: None,
            output: None,
            error: task.error,
            attempt: task.attempt,
            attempts_max: task.attempts_max,
            attempt_timeout_ms: task.attempt_timeout_ms,
            deadline_at_ms: task.deadline_at_ms,
            created_at_ms: task.created_at_ms,
            updated_at_ms: task.updated_at_ms,
            finished_at_ms: task.finished_at_ms,
            attempts: None,
        }
    }
}

/// A pull agent's answer to one attempt (`POST /api/v1/agents/{id}/tasks/{task_id}/result`).
#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskResult {
    /// The attempt number the work came with.
    pub attempt: u32,
    /// Whether the work succeeded.
    pub ok: bool,
    /// The result (with `ok: true`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub output: Option<serde_json::Value>,
    /// Why it failed (with `ok: false`).
    #[serde(default)]
    pub error: Option<String>,
}

/// What the kernel did with a pull agent's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ResultAck {
    /// The task.
    #[schema(value_type = String, format = Uuid)]
    pub task_id: Uuid,
    /// The attempt.
    pub attempt: u32,
    /// True when this attempt's result had already been recorded (nothing changed).
    pub duplicate: bool,
    /// True when the store was unavailable and the result was written to the kernel's local
    /// spool instead: it is recorded when the store returns (answered 202).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub buffered: bool,
    /// The task's status now.
    pub status: TaskStatus,
}

/// Settings of dispatch (`[dispatch]` in `nops.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// Attempt timeout of a task that names none, in ms.
    pub attempt_timeout_ms_default: u64,
    /// Longest attempt timeout a task may ask for, in ms.
    pub attempt_timeout_ms_max: u64,
    /// Attempts of a task that names none.
    pub attempts_max_default: u32,
    /// Most attempts a task may ask for.
    pub attempts_max_ceiling: u32,
    /// Deadline of a task that names none, in ms from its creation.
    pub deadline_ms_default: u64,
    /// Longest deadline a task may ask for, in ms.
    pub deadline_ms_max: u64,
    /// Largest task input (serialized JSON), in bytes.
    pub input_bytes_max: usize,
    /// Largest result (serialized JSON), in bytes; a larger pushed answer is a failure.
    pub output_bytes_max: usize,
    /// First retry backoff ceiling, in ms (doubles per retry).
    pub backoff_base_ms: u64,
    /// Largest retry backoff ceiling, in ms.
    pub backoff_cap_ms: u64,
    /// Most attempts waiting in one pull agent's queue; a full queue sends work elsewhere.
    pub queue_depth_max: u32,
    /// Longest long poll of a pull agent, in ms.
    pub wait_ms_max: u64,
    /// How often waiting pull agents and drivers look at the store for work or results of
    /// other kernels, in ms (local work wakes them at once).
    pub poll_interval_ms: u64,
    /// How long a kernel's claim on a task lasts without renewal, in ms; a task of a kernel
    /// that stopped is taken over this long after its last renewal.
    pub lease_ms: u64,
    /// How often the sweeper renews leases, takes over orphaned tasks and purges old ones, in ms.
    pub sweep_interval_ms: u64,
    /// Most tasks one kernel drives at once; more wait in the store for a free slot.
    pub drivers_max: u32,
    /// Most unfinished (queued or running) tasks per tenant.
    pub tenant_active_tasks_max: u32,
    /// Tasks taken over per sweep.
    pub takeover_batch_max: u32,
    /// How long a pushed attempt's HTTP request may outlive its timeout, so that a late answer
    /// is seen (and discarded and counted) rather than cut off, in ms.
    pub late_wait_ms_max: u64,
    /// How long finished tasks are kept, in ms.
    pub finished_retention_ms: u64,
    /// Finished tasks purged per sweep.
    pub purge_batch_max: u32,
    /// Largest page of a task listing.
    pub list_limit_max: u32,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            attempt_timeout_ms_default: 30_000,
            attempt_timeout_ms_max: 600_000,
            attempts_max_default: 3,
            attempts_max_ceiling: 10,
            deadline_ms_default: 300_000,
            deadline_ms_max: 86_400_000,
            input_bytes_max: 256 * 1024,
            output_bytes_max: 1024 * 1024,
            backoff_base_ms: 100,
            backoff_cap_ms: 10_000,
            queue_depth_max: 1_000,
            wait_ms_max: 20_000,
            poll_interval_ms: 500,
            lease_ms: 15_000,
            sweep_interval_ms: 2_000,
            drivers_max: 10_000,
            tenant_active_tasks_max: 100_000,
            takeover_batch_max: 256,
            late_wait_ms_max: 30_000,
            finished_retention_ms: 7 * 86_400_000,
            purge_batch_max: 1_000,
            list_limit_max: 500,
        }
    }
}

impl DispatchConfig {
    /// Checks that every limit is positive and that defaults lie within their maxima.
    pub fn validate(&self) -> CoreResult<()> {
        let bad = |message: String| Err(CoreError::invalid("invalid_config", message));
        let positive = [
            ("attempt_timeout_ms_default", self.attempt_timeout_ms_default),
            ("deadline_ms_default", self.deadline_ms_default),
            ("input_bytes_max", self.input_bytes_max as u64),
            ("output_bytes_max", self.output_bytes_max as u64),
            ("backoff_base_ms", self.backoff_base_ms),
            ("queue_depth_max", u64::from(self.queue_depth_max)),
            ("wait_ms_max", self.wait_ms_max),
            ("poll_interval_ms", self.poll_interval_ms),
            ("lease_ms", self.lease_ms),
            ("sweep_interval_ms", self.sweep_interval_ms),
            ("drivers_max", u64::from(self.drivers_max)),
            ("tenant_active_tasks_max", u64::from(self.tenant_active_tasks_max)),
            ("takeover_batch_max", u64::from(self.takeover_batch_max)),
            ("purge_batch_max", u64::from(self.purge_batch_max)),
            ("list_limit_max", u64::from(self.list_limit_max)),
            ("attempts_max_default", u64::from(self.attempts_max_default)),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return bad(format!("[dispatch] {name} must be positive"));
        }
        if self.attempt_timeout_ms_default > self.attempt_timeout_ms_max {
            return bad("[dispatch] attempt_timeout_ms_default exceeds attempt_timeout_ms_max".into());
        }
        if self.attempts_max_default > self.attempts_max_ceiling {
            return bad("[dispatch] attempts_max_default exceeds attempts_max_ceiling".into());
        }
        if self.deadline_ms_default > self.deadline_ms_max {
            return bad("[dispatch] deadline_ms_default exceeds deadline_ms_max".into());
        }
        if self.backoff_base_ms > self.backoff_cap_ms {
            return bad("[dispatch] backoff_base_ms exceeds backoff_cap_ms".into());
        }
        if self.sweep_interval_ms.saturating_mul(2) > self.lease_ms {
            return bad(
                "[dispatch] lease_ms must be at least twice sweep_interval_ms (the sweeper renews leases)".into()
            );
        }
        Ok(())
    }
}

/// `message` cut to at most [`TASK_ERROR_BYTES_MAX`] bytes on a character boundary.
pub fn clip_error(message: &str) -> String {
    if message.len() <= TASK_ERROR_BYTES_MAX {
        return message.to_string();
    }
    let mut end = TASK_ERROR_BYTES_MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_config_is_valid_and_bad_ones_are_refused() {
        DispatchConfig::default().validate().expect("defaults are valid");
        let zero = DispatchConfig { queue_depth_max: 0, ..DispatchConfig::default() };
        assert!(zero.validate().is_err());
        let inverted = DispatchConfig { backoff_base_ms: 20_000, ..DispatchConfig::default() };
        assert!(inverted.validate().is_err());
        let short_lease = DispatchConfig { lease_ms: 1_000, ..DispatchConfig::default() };
        assert!(short_lease.validate().is_err());
    }

    #[test]
    fn errors_are_clipped_on_a_character_boundary() {
        let long = "é".repeat(TASK_ERROR_BYTES_MAX);
        let clipped = clip_error(&long);
        assert!(clipped.len() <= TASK_ERROR_BYTES_MAX + '…'.len_utf8());
        assert_eq!(clip_error("short"), "short");
    }

    #[test]
    fn statuses_round_trip() {
        for s in [TaskStatus::Queued, TaskStatus::Running, TaskStatus::Succeeded, TaskStatus::Failed] {
            assert_eq!(s.as_str().parse::<TaskStatus>().expect("parses"), s);
        }
        assert!("done".parse::<TaskStatus>().is_err());
    }
}
