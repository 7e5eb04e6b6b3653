//! The transactional outbox relay.
//!
//! Every state change of the kernel (agents, plugins and policies, API keys, chaos toggles,
//! events plugins publish) writes its event to the `outbox` table in the same transaction as
//! the change. The relay publishes pending rows to the bus with `outbox/<row id>` as the
//! deduplication id, then marks them published. So:
//! - a kernel killed after the commit and before the publish publishes the row when it (or
//!   another replica) runs the relay again: nothing is lost;
//! - a kernel killed after the publish and before the mark publishes the row again with the
//!   same id, which the bus answers as a duplicate within its dedupe window, and which a
//!   consumer deduplicating by event id sees once in any case.
//!
//! Several replicas may relay at once: each row is published under one id, so the worst case
//! is a duplicate publish, never a duplicate event.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::bus::{Bus, EventIn};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::store::{OutboxEvent, StoreError};

/// An outbox row waiting for the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// The row id, unique in the store; the event's id on the bus is `outbox/<id>` unless
    /// `event_id` names one.
    pub id: i64,
    /// The id a client gave the event (an event buffered while the bus was unreachable).
    pub event_id: Option<String>,
    /// The event.
    pub event: OutboxEvent,
    /// When the change committed (ms since the Unix epoch).
    pub created_at_ms: i64,
}

/// What the relay needs from the store.
#[async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    /// Rows not yet published, oldest first, at most `limit`.
    async fn pending_outbox(&self, limit: u32) -> Result<Vec<OutboxRow>, StoreError>;
    /// Marks rows published.
    async fn mark_outbox_published(&self, ids: &[i64], at_ms: i64) -> Result<(), StoreError>;
    /// Deletes up to `limit` rows published before `before_ms`; returns how many.
    async fn prune_outbox(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError>;
    /// Buffers published events in one transaction, for the relay to publish under their own
    /// ids once the bus is back.
    async fn buffer_events(&self, events: &[EventIn]) -> Result<(), StoreError>;
}

/// Settings of the relay (`[outbox]` in `nops.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxConfig {
    /// Most rows published per pass.
    pub batch_rows_max: u32,
    /// Pause between passes when nothing is pending, in ms.
    pub interval_ms: u64,
    /// How long published rows are kept (for audit), in ms.
    pub retention_ms: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self { batch_rows_max: 500, interval_ms: 100, retention_ms: 7 * 24 * 3_600_000 }
    }
}

impl OutboxConfig {
    /// Checks the settings at start.
    pub fn validate(&self) -> Result<(), String> {
        if self.batch_rows_max == 0 || self.batch_rows_max as usize > crate::bus::BATCH_EVENTS_MAX {
            return Err(format!("outbox.batch_rows_max must be 1 to {}", crate::bus::BATCH_EVENTS_MAX));
        }
        if self.interval_ms == 0 {
            return Err("outbox.interval_ms must be at least 1".into());
        }
        Ok(())
    }
}

/// Rows pruned per pass of the retention sweep.
const PRUNE_ROWS_MAX: u32 = 10_000;
/// Pause after a failed pass (the store or the bus unavailable), in ms.
const ERROR_PAUSE_MS: u64 = 1_000;
/// Passes between two retention sweeps.
const PASSES_PER_PRUNE: u64 = 600;

/// Publishes the outbox to the bus.
pub struct OutboxRelay {
    store: Arc<dyn OutboxStore>,
    bus: Arc<dyn Bus>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    config: OutboxConfig,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay").field("config", &self.config).finish_non_exhaustive()
    }
}

impl OutboxRelay {
    /// A relay from `store` to `bus`.
    pub fn new(
        store: Arc<dyn OutboxStore>,
        bus: Arc<dyn Bus>,
        clock: Arc<dyn Clock>,
        metrics: Metrics,
        config: OutboxConfig,
    ) -> Self {
        Self { store, bus, clock, metrics, config }
    }

    /// Publishes one batch of pending rows; returns how many were published.
    pub async fn pass(&self) -> Result<usize, String> {
        let rows = self.store.pending_outbox(self.config.batch_rows_max).await.map_err(|e| e.to_string())?;
        if rows.is_empty() {
            self.metrics.outbox_pending.set(0);
            return Ok(0);
        }
        let events: Vec<EventIn> = rows
            .iter()
            .map(|row| EventIn {
                id: row.event_id.clone().unwrap_or_else(|| format!("outbox/{}", row.id)),
                tenant: row.event.tenant.clone(),
                subject: row.event.subject.clone(),
                payload: row.event.payload.clone(),
                source: row.event.source.clone(),
                time_ms: row.created_at_ms,
            })
            .collect();
        self.bus.publish(&events).await.map_err(|e| e.to_string())?;
        // A crash here publishes these rows again on the next pass, under the same ids. Crash
        // tests stop here with `FAILPOINTS=outbox-after-publish=return`: every pass publishes
        // and nothing is ever marked, until the kernel is killed.
        fail::fail_point!("outbox-after-publish", |_| Err("stopped by the outbox-after-publish fail point".into()));
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        self.store.mark_outbox_published(&ids, self.clock.now_ms()).await.map_err(|e| e.to_string())?;
        self.metrics.outbox_relayed_total.inc_by(ids.len() as u64);
        self.metrics.outbox_pending.set(0);
        Ok(ids.len())
    }

    /// Relays until `shutdown` fires: a pass, then another at once while rows keep coming,
    /// else after `interval_ms`; published rows past their retention are pruned now and then.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let interval = Duration::from_millis(self.config.interval_ms);
        let mut passes: u64 = 0;
        let mut failing = false;
        loop {
            let (full, pause) = match self.pass().await {
                Ok(n) => {
                    if failing {
                        tracing::info!("outbox relay passes again");
                        failing = false;
                    }
                    (n == self.config.batch_rows_max as usize, interval)
                }
                Err(err) => {
                    self.metrics.outbox_relay_errors_total.inc();
                    if !failing {
                        tracing::warn!(error = %err, "outbox relay pass failed; retrying every second");
                        failing = true;
                    }
                    (false, Duration::from_millis(ERROR_PAUSE_MS))
                }
            };
            passes += 1;
            if passes.is_multiple_of(PASSES_PER_PRUNE) {
                let before = self.clock.now_ms().saturating_sub(self.config.retention_ms as i64);
                if let Err(err) = self.store.prune_outbox(before, PRUNE_ROWS_MAX).await {
                    tracing::warn!(error = %err, "pruning the outbox failed");
                }
            }
            if *shutdown.borrow() {
                return;
            }
            if !full {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}
