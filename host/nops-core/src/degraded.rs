//! Degraded modes: what the kernel does when a dependency (the database, the bus) goes away.
//!
//! Every kind of write the kernel makes has a **criticality** ([`Criticality`]), set by the
//! [`CriticalityMatrix`] (defaults below, overridable in `nops.toml`):
//!
//! | class | default | while the dependency is down |
//! |---|---|---|
//! | `task_result` (billing) | critical | written to the local on-disk spool, replayed in order when the store returns |
//! | `audit_event` (compliance) | critical | same |
//! | `heartbeat` (observability) | essential | kept in memory (latest per agent), flushed when the store returns |
//! | `key_usage` (last-used times) | best effort | dropped |
//! | `shadow_diff` | best effort | dropped |
//!
//! The spool ([`Spool`]) is a bounded local file (`spool_records_max`, `spool_bytes_max`):
//! when it is full a critical write is refused with `503 store_unavailable` instead of being
//! lost silently, so the caller (an agent posting a result) retries later. Every spooled
//! write carries a key that makes replaying it idempotent (a task result is keyed by task and
//! attempt), so a write replayed twice after a crash mid-replay changes nothing the second
//! time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::store::{OutboxEvent, PluginCommit, PluginEffects, Store, StoreError};
use crate::tenant::TenantId;

/// How much a kind of write matters when its dependency is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Criticality {
    /// Never lost: buffered on local disk and replayed (billing, compliance).
    Critical,
    /// Kept in memory and written when the dependency returns; a crash during the outage
    /// loses it (observability).
    Essential,
    /// Dropped while the dependency is down.
    BestEffort,
}

/// The kinds of writes the kernel makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WriteClass {
    /// The result of a task attempt (what is billed).
    TaskResult,
    /// An audit event (compliance).
    AuditEvent,
    /// An agent's latest heartbeat.
    Heartbeat,
    /// When an API key was last used.
    KeyUsage,
    /// A difference between a plugin's active and shadow versions.
    ShadowDiff,
}

impl WriteClass {
    /// Every class, in a fixed order.
    pub const ALL: [WriteClass; 5] =
        [Self::TaskResult, Self::AuditEvent, Self::Heartbeat, Self::KeyUsage, Self::ShadowDiff];

    /// The class's name in configuration and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TaskResult => "task_result",
            Self::AuditEvent => "audit_event",
            Self::Heartbeat => "heartbeat",
            Self::KeyUsage => "key_usage",
            Self::ShadowDiff => "shadow_diff",
        }
    }

    /// The criticality a class has unless the operator says otherwise.
    pub fn default_criticality(self) -> Criticality {
        match self {
            Self::TaskResult | Self::AuditEvent => Criticality::Critical,
            Self::Heartbeat => Criticality::Essential,
            Self::KeyUsage | Self::ShadowDiff => Criticality::BestEffort,
        }
    }
}

/// The criticality of every write class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CriticalityMatrix(pub BTreeMap<WriteClass, Criticality>);

impl Default for CriticalityMatrix {
    fn default() -> Self {
        Self(WriteClass::ALL.iter().map(|c| (*c, c.default_criticality())).collect())
    }
}

impl CriticalityMatrix {
    /// The defaults with `overrides` applied.
    pub fn with_overrides(overrides: &BTreeMap<WriteClass, Criticality>) -> Self {
        let mut matrix = Self::default();
        matrix.0.extend(overrides.iter().map(|(k, v)| (*k, *v)));
        matrix
    }

    /// The criticality of `class`.
    pub fn of(&self, class: WriteClass) -> Criticality {
        self.0.get(&class).copied().unwrap_or_else(|| class.default_criticality())
    }
}

/// A write waiting in the spool for its dependency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpooledWrite {
    /// What kind of write it is.
    pub class: WriteClass,
    /// Makes replay idempotent, e.g. `<task id>/<attempt>`.
    pub key: String,
    /// The write itself, in the class's own JSON shape.
    pub body: serde_json::Value,
    /// When it was spooled (ms since the Unix epoch).
    pub at_ms: i64,
}

/// Why the spool refused or failed a write.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// The spool holds `spool_records_max` records or `spool_bytes_max` bytes already.
    #[error("the local spool is full ({0})")]
    Full(String),
    /// The local file could not be read or written.
    #[error("spool I/O: {0}")]
    Io(String),
}

/// How full the spool is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SpoolStats {
    /// Writes waiting.
    pub records: u64,
    /// Their size, in bytes.
    pub bytes: u64,
    /// Most writes it holds.
    pub records_max: u64,
    /// Most bytes it holds.
    pub bytes_max: u64,
}

/// A bounded, durable, local FIFO of writes waiting for their dependency. A push returns only
/// once the write is on disk.
#[async_trait]
pub trait Spool: Send + Sync + 'static {
    /// Appends `write`; returns its sequence number.
    async fn push(&self, write: &SpooledWrite) -> Result<i64, SpoolError>;
    /// The oldest `limit` writes with their sequence numbers, oldest first.
    async fn peek(&self, limit: u32) -> Result<Vec<(i64, SpooledWrite)>, SpoolError>;
    /// Removes every write up to and including sequence `seq`.
    async fn ack(&self, seq: i64) -> Result<(), SpoolError>;
    /// How full the spool is.
    fn stats(&self) -> SpoolStats;
}

/// Whether a dependency is reachable, as the kernel last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DependencyState {
    /// `true` while the last check or operation failed.
    pub degraded: bool,
    /// Since when it is in its current state (ms since the Unix epoch), 0 if never changed.
    pub since_ms: i64,
    /// The last failure, for operators (no secrets: driver messages only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Tracks one dependency's state from the outcomes of the kernel's own operations and probes.
#[derive(Debug, Default)]
pub struct Dependency {
    state: Mutex<DependencyState>,
}

impl Dependency {
    /// Records a failed operation or probe at `now_ms`; returns `true` if this changed the
    /// state (up → degraded).
    pub fn failed(&self, error: &str, now_ms: i64) -> bool {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = !state.degraded;
        if changed {
            state.degraded = true;
            state.since_ms = now_ms;
        }
        state.last_error = Some(error.chars().take(DEPENDENCY_ERROR_CHARS_MAX).collect());
        changed
    }

    /// Records a successful operation or probe at `now_ms`; returns `true` if this changed
    /// the state (degraded → up).
    pub fn succeeded(&self, now_ms: i64) -> bool {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = state.degraded;
        if changed {
            state.degraded = false;
            state.since_ms = now_ms;
            state.last_error = None;
        }
        changed
    }

    /// The current state.
    pub fn state(&self) -> DependencyState {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whether the dependency is degraded now.
    pub fn is_degraded(&self) -> bool {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).degraded
    }
}

/// Why a spooled write could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Its dependency is still unavailable: keep it and try again later.
    #[error("dependency unavailable: {0}")]
    Unavailable(String),
    /// It can never be applied (e.g. its task was deleted): drop it, loudly.
    #[error("rejected: {0}")]
    Rejected(String),
}

/// Applies spooled writes to their dependency once it is back.
#[async_trait]
pub trait SpoolSink: Send + Sync + 'static {
    /// Applies one write. Must be idempotent: after a crash mid-replay the same write is
    /// applied again.
    async fn apply(&self, write: &SpooledWrite) -> Result<(), ApplyError>;
}

/// Most writes replayed per round.
pub const REPLAY_BATCH_MAX: u32 = 256;

/// What one replay round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayRound {
    /// Writes applied.
    pub applied: u64,
    /// Writes dropped as never applicable.
    pub rejected: u64,
    /// Whether the round stopped because the dependency is still down.
    pub blocked: bool,
}

/// One probe of a dependency: `Err` with a message when it fails or does not answer within
/// `timeout`.
async fn probe<E: std::fmt::Display>(
    timeout: Duration,
    check: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// Replays the oldest spooled writes in order, up to [`REPLAY_BATCH_MAX`], acknowledging each
/// applied (or rejected) prefix; stops at the first write whose dependency is unavailable, so
/// order is kept.
pub async fn replay_round(spool: &dyn Spool, sink: &dyn SpoolSink) -> Result<ReplayRound, SpoolError> {
    let mut round = ReplayRound::default();
    let batch = spool.peek(REPLAY_BATCH_MAX).await?;
    let mut done: Option<i64> = None;
    for (seq, write) in &batch {
        match sink.apply(write).await {
            Ok(()) => round.applied += 1,
            Err(ApplyError::Rejected(reason)) => {
                tracing::error!(
                    target: "nops::audit",
                    class = write.class.as_str(), key = %write.key, %reason,
                    "a spooled write can never be applied: dropped"
                );
                round.rejected += 1;
            }
            Err(ApplyError::Unavailable(_)) => {
                round.blocked = true;
                break;
            }
        }
        done = Some(*seq);
    }
    if let Some(seq) = done {
        spool.ack(seq).await?;
    }
    Ok(round)
}

/// Settings of the degraded modes.
#[derive(Debug, Clone, PartialEq)]
pub struct DegradedConfig {
    /// The criticality of each write class.
    pub matrix: CriticalityMatrix,
    /// How often the store is probed, in ms.
    pub probe_interval_ms: u64,
    /// Longest a probe waits for the store, in ms.
    pub probe_timeout_ms: u64,
}

impl Default for DegradedConfig {
    fn default() -> Self {
        Self { matrix: CriticalityMatrix::default(), probe_interval_ms: 1_000, probe_timeout_ms: 2_000 }
    }
}

/// What `/health/extended` shows of the degraded modes.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct DegradedReport {
    /// Whether any dependency is degraded or writes wait in the spool.
    pub degraded: bool,
    /// The database.
    pub store: DependencyState,
    /// The event bus, when it is a server of its own (NATS); the embedded bus lives in the
    /// database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bus: Option<DependencyState>,
    /// The local spool of critical writes (absent when the kernel has none: on SQLite the
    /// database is itself local).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool: Option<SpoolStats>,
    /// The criticality of each write class.
    pub criticality: CriticalityMatrix,
}

/// The kernel's degraded-mode state: which dependencies are down, the spool of critical
/// writes, and the sink that replays them.
pub struct DegradedModes {
    config: DegradedConfig,
    store: Dependency,
    bus: Dependency,
    /// Whether the bus is a dependency of its own (NATS), probed by [`Self::run_bus_probe`].
    bus_remote: std::sync::atomic::AtomicBool,
    spool: Option<Arc<dyn Spool>>,
    sinks: Mutex<BTreeMap<WriteClass, Arc<dyn SpoolSink>>>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    wake: tokio::sync::Notify,
    /// Whether store calls fail fast while the store is degraded (remote stores only).
    fail_fast: bool,
}

impl std::fmt::Debug for DegradedModes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DegradedModes").field("store", &self.store).finish_non_exhaustive()
    }
}

impl DegradedModes {
    /// Degraded modes with `spool` for critical writes (`None`: critical writes fail with
    /// their dependency, as on a local SQLite store).
    pub fn new(config: DegradedConfig, spool: Option<Arc<dyn Spool>>, clock: Arc<dyn Clock>, metrics: Metrics) -> Self {
        metrics.dependency_degraded.with_label_values(&["store"]).set(0);
        Self {
            config,
            store: Dependency::default(),
            bus: Dependency::default(),
            bus_remote: std::sync::atomic::AtomicBool::new(false),
            spool,
            sinks: Mutex::new(BTreeMap::new()),
            clock,
            metrics,
            wake: tokio::sync::Notify::new(),
            fail_fast: false,
        }
    }

    /// Makes store calls fail at once while the probe finds the store down, rather than each
    /// call waiting out connection timeouts (for a remote store: a local SQLite file that
    /// cannot answer a ping is not helped by it).
    #[must_use]
    pub fn failing_fast(mut self) -> Self {
        self.fail_fast = true;
        self
    }

    /// Whether store calls should fail at once now.
    pub fn fail_fast(&self) -> bool {
        self.fail_fast && self.store.is_degraded()
    }

    fn refresh_gauges(&self) {
        self.metrics.dependency_degraded.with_label_values(&["store"]).set(i64::from(self.store.is_degraded()));
        if let Some(spool) = &self.spool {
            let stats = spool.stats();
            self.metrics.spool_records.set(i64::try_from(stats.records).unwrap_or(i64::MAX));
            self.metrics.spool_bytes.set(i64::try_from(stats.bytes).unwrap_or(i64::MAX));
        }
    }

    /// Sets who replays spooled writes of `class` (at wiring).
    pub fn set_sink(&self, class: WriteClass, sink: Arc<dyn SpoolSink>) {
        self.sinks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(class, sink);
    }

    /// The criticality of `class`.
    pub fn criticality(&self, class: WriteClass) -> Criticality {
        self.config.matrix.of(class)
    }

    /// The database's state.
    pub fn store(&self) -> &Dependency {
        &self.store
    }

    /// The event bus's state (meaningful when it is remote).
    pub fn bus(&self) -> &Dependency {
        &self.bus
    }

    /// Records that a bus operation failed: the bus counts as down at once (publishes are
    /// buffered in the store's outbox until the probe finds it back).
    pub fn bus_failed(&self, error: &str) {
        if self.bus.failed(error, self.clock.now_ms()) {
            tracing::warn!(error, "the event bus is unavailable: publishes are buffered in the outbox");
            self.metrics.dependency_degraded.with_label_values(&["bus"]).set(1);
        }
    }

    /// Probes a remote bus every `probe_interval_ms` until `shutdown`; it counts as down
    /// after [`PROBE_FAILURES_TO_DEGRADE`] failed probes in a row (or one failed operation,
    /// see [`Self::bus_failed`]) and up again after one good probe.
    pub async fn run_bus_probe(self: Arc<Self>, bus: Arc<dyn crate::bus::Bus>, mut shutdown: watch::Receiver<bool>) {
        self.bus_remote.store(true, std::sync::atomic::Ordering::Relaxed);
        self.metrics.dependency_degraded.with_label_values(&["bus"]).set(0);
        let interval = Duration::from_millis(self.config.probe_interval_ms.max(1));
        let timeout = Duration::from_millis(self.config.probe_timeout_ms.max(1));
        let mut failures = 0u32;
        loop {
            let probe = probe(timeout, bus.ping()).await;
            match probe {
                Ok(()) => {
                    failures = 0;
                    if self.bus.succeeded(self.clock.now_ms()) {
                        tracing::info!("the event bus is back: the outbox relay publishes what waited");
                    }
                    self.metrics.dependency_degraded.with_label_values(&["bus"]).set(0);
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    if failures >= PROBE_FAILURES_TO_DEGRADE {
                        self.bus_failed(&error);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Records that a store operation failed (marks the store degraded at once, without
    /// waiting for the next probe).
    pub fn store_failed(&self, error: &str) {
        if self.store.failed(error, self.clock.now_ms()) {
            tracing::warn!(error, "the store is unavailable: degraded mode");
            self.refresh_gauges();
        }
    }

    /// Buffers a critical write while its dependency is down. `Err` when the kernel has no
    /// spool or it is full: the caller must then refuse the write (503), never drop it.
    pub async fn spool(&self, class: WriteClass, key: String, body: serde_json::Value) -> Result<i64, SpoolError> {
        let Some(spool) = &self.spool else {
            return Err(SpoolError::Full("this kernel has no spool (its store is local)".into()));
        };
        let seq = spool.push(&SpooledWrite { class, key, body, at_ms: self.clock.now_ms() }).await?;
        self.refresh_gauges();
        self.wake.notify_one();
        Ok(seq)
    }

    /// The state for `/health/extended`.
    pub fn report(&self) -> DegradedReport {
        let spool = self.spool.as_ref().map(|s| s.stats());
        let store = self.store.state();
        let bus = self.bus_remote.load(std::sync::atomic::Ordering::Relaxed).then(|| self.bus.state());
        DegradedReport {
            degraded: store.degraded
                || bus.as_ref().is_some_and(|b| b.degraded)
                || spool.is_some_and(|s| s.records > 0),
            store,
            bus,
            spool,
            criticality: self.config.matrix.clone(),
        }
    }

    /// Probes the store every `probe_interval_ms` (it counts as down after
    /// [`PROBE_FAILURES_TO_DEGRADE`] failures in a row) and, while it answers, replays the
    /// spool; until `shutdown`.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>, mut shutdown: watch::Receiver<bool>) {
        let interval = Duration::from_millis(self.config.probe_interval_ms.max(1));
        let timeout = Duration::from_millis(self.config.probe_timeout_ms.max(1));
        let mut failures = 0u32;
        loop {
            let probe = probe(timeout, store.ping()).await;
            match probe {
                Ok(()) => {
                    failures = 0;
                    if self.store.succeeded(self.clock.now_ms()) {
                        tracing::info!("the store is back: leaving degraded mode");
                    }
                    self.drain().await;
                }
                Err(error) => {
                    // One slow probe (a saturated pool, a pause) is not an outage: store calls
                    // fail fast only after PROBE_FAILURES_TO_DEGRADE failures in a row.
                    failures = failures.saturating_add(1);
                    if failures >= PROBE_FAILURES_TO_DEGRADE {
                        self.store_failed(&error);
                    } else {
                        tracing::debug!(%error, failures, "store probe failed");
                    }
                }
            }
            self.refresh_gauges();
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                () = self.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Replays spooled writes until the spool is empty or the dependency fails again.
    async fn drain(&self) {
        let Some(spool) = &self.spool else { return };
        let sink = BySink(self.sinks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone());
        let sink = &sink;
        while spool.stats().records > 0 {
            match replay_round(spool.as_ref(), sink).await {
                Ok(round) if round.blocked => {
                    self.store_failed("replaying the spool: the store is unavailable");
                    return;
                }
                Ok(round) if round.applied + round.rejected == 0 => return,
                Ok(round) => {
                    self.metrics.spool_replayed_total.with_label_values(&["applied"]).inc_by(round.applied);
                    self.metrics.spool_replayed_total.with_label_values(&["rejected"]).inc_by(round.rejected);
                    tracing::info!(applied = round.applied, rejected = round.rejected, "replayed spooled writes");
                }
                Err(err) => {
                    tracing::error!(error = %err, "reading the spool failed");
                    return;
                }
            }
        }
    }
}

/// Hands each spooled write to the sink of its class.
struct BySink(BTreeMap<WriteClass, Arc<dyn SpoolSink>>);

#[async_trait]
impl SpoolSink for BySink {
    async fn apply(&self, write: &SpooledWrite) -> Result<(), ApplyError> {
        match self.0.get(&write.class) {
            Some(sink) => sink.apply(write).await,
            None => Err(ApplyError::Rejected(format!("no sink replays {} writes", write.class.as_str()))),
        }
    }
}

/// An outbox event as it waits in the spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpooledEvent {
    /// The event's tenant.
    pub tenant: TenantId,
    /// Its subject.
    pub subject: String,
    /// Its payload (JSON).
    pub payload: serde_json::Value,
    /// Who published it, e.g. `kernel/chaos`.
    pub source: String,
}

/// Replays spooled audit events into the outbox. Each event's payload carries its own
/// identity (e.g. a chaos toggle's id and what happened to it), which is what a consumer
/// deduplicates by if a crash mid-replay writes one twice.
pub struct OutboxSink(pub Arc<dyn PluginCommit>);

#[async_trait]
impl SpoolSink for OutboxSink {
    async fn apply(&self, write: &SpooledWrite) -> Result<(), ApplyError> {
        let event: SpooledEvent =
            serde_json::from_value(write.body.clone()).map_err(|e| ApplyError::Rejected(e.to_string()))?;
        let payload = serde_json::to_vec(&event.payload).map_err(|e| ApplyError::Rejected(e.to_string()))?;
        let effects = PluginEffects {
            writes: Vec::new(),
            events: vec![OutboxEvent {
                tenant: event.tenant,
                subject: event.subject,
                payload,
                source: event.source.clone(),
            }],
        };
        match self.0.commit_plugin_effects(&event.source, &effects, 0, write.at_ms).await {
            Ok(()) => Ok(()),
            Err(StoreError::Backend(message)) => Err(ApplyError::Unavailable(message)),
            Err(err) => Err(ApplyError::Rejected(err.to_string())),
        }
    }
}

/// Probe failures in a row before the store counts as down.
pub const PROBE_FAILURES_TO_DEGRADE: u32 = 2;

/// Longest failure message kept for `/health/extended`.
const DEPENDENCY_ERROR_CHARS_MAX: usize = 300;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_documented_matrix() {
        let matrix = CriticalityMatrix::default();
        assert_eq!(matrix.of(WriteClass::TaskResult), Criticality::Critical);
        assert_eq!(matrix.of(WriteClass::AuditEvent), Criticality::Critical);
        assert_eq!(matrix.of(WriteClass::Heartbeat), Criticality::Essential);
        assert_eq!(matrix.of(WriteClass::KeyUsage), Criticality::BestEffort);
        let overridden =
            CriticalityMatrix::with_overrides(&BTreeMap::from([(WriteClass::ShadowDiff, Criticality::Critical)]));
        assert_eq!(overridden.of(WriteClass::ShadowDiff), Criticality::Critical);
        assert_eq!(overridden.of(WriteClass::TaskResult), Criticality::Critical);
    }

    #[test]
    fn dependency_reports_transitions_once() {
        let dep = Dependency::default();
        assert!(!dep.is_degraded());
        assert!(dep.failed("connection refused", 10));
        assert!(!dep.failed("connection refused again", 20));
        let state = dep.state();
        assert!(state.degraded);
        assert_eq!(state.since_ms, 10);
        assert_eq!(state.last_error.as_deref(), Some("connection refused again"));
        assert!(dep.succeeded(30));
        assert!(!dep.succeeded(40));
        assert_eq!(dep.state(), DependencyState { degraded: false, since_ms: 30, last_error: None });
    }
}
