//! The bus capability: a durable, at-least-once event log with named consumer groups, ack
//! deadlines, redelivery with backoff, a dead-letter queue and replay.
//!
//! Two adapters implement [`Bus`] with the same semantics and pass the same conformance tests:
//! the embedded log in the kernel's own store (`nops-store`, the default) and NATS JetStream
//! (`nops-bus`, when `NOPS_NATS_URL` is set). Callers validate input before it reaches an
//! adapter (see [`validate_event`] and [`validate_consumer`]); adapters trust it.
//!
//! Semantics every adapter keeps:
//! - **Tenants are isolated**: every operation names a tenant; events, consumer groups and
//!   dead letters of one tenant are invisible to another.
//! - **Deduplication**: an event whose `(tenant, id)` was accepted within the dedupe window is
//!   answered [`Published::Duplicate`] with the original's sequence and is not stored again.
//! - **Order**: sequences increase in commit order; a consumer group's first deliveries come
//!   in sequence order (so per subject in publish order). Redeliveries may interleave.
//! - **At least once**: a delivery not acked before its deadline is delivered again; the
//!   deadline of delivery `n` is `backoff_ms[n-1]` (the last entry repeats) or `ack_wait_ms`
//!   when `backoff_ms` is empty. A nack with a delay makes it deliverable after the delay.
//! - **Dead letters**: an event whose `deliveries_max`-th delivery ends without an ack (nack,
//!   deadline) moves to the group's dead-letter queue instead of being delivered again; a
//!   `Term` ack moves it there at once. Re-driving a dead letter delivers it again to the same
//!   group only (counting from zero); purging deletes it.
//! - **Replay**: [`Bus::requeue`] delivers stored events again to one group only.

use std::time::Duration;

use async_trait::async_trait;

use crate::CoreError;
use crate::tenant::TenantId;

/// Most events in one publish batch.
pub const BATCH_EVENTS_MAX: usize = 1_000;
/// Largest event payload, in bytes.
pub const PAYLOAD_BYTES_MAX: usize = 256 * 1024;
/// Longest event id, in bytes.
pub const EVENT_ID_BYTES_MAX: usize = 128;
/// Longest consumer group name, in bytes.
pub const CONSUMER_NAME_BYTES_MAX: usize = 64;
/// Most deliveries one fetch returns.
pub const FETCH_EVENTS_MAX: u32 = 1_000;
/// Longest a fetch may wait for events.
pub const FETCH_WAIT_MS_MAX: u64 = 30_000;
/// Most entries in a consumer's backoff schedule.
pub const BACKOFF_STEPS_MAX: usize = 16;
/// Longest ack deadline or backoff step.
pub const ACK_WAIT_MS_MAX: u64 = 12 * 3_600_000;
/// Most deliveries a consumer group may allow per event.
pub const DELIVERIES_MAX_MAX: u32 = 1_000;
/// Most events one read or requeue handles.
pub const READ_EVENTS_MAX: u32 = 10_000;

/// Settings every adapter honours (`[bus]` in `nops.toml`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// How long an event id is remembered for deduplication.
    pub dedupe_window_ms: u64,
    /// How long events are kept in the log.
    pub retention_ms: u64,
    /// Most events kept in the log (the oldest go first).
    pub events_max: u64,
    /// Most consumer groups per tenant.
    pub consumers_per_tenant_max: u32,
    /// Most dead letters per tenant; past it the oldest are dropped (and counted).
    pub dead_letters_per_tenant_max: u64,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            dedupe_window_ms: 10 * 60_000,
            retention_ms: 7 * 24 * 3_600_000,
            events_max: 10_000_000,
            consumers_per_tenant_max: 100,
            dead_letters_per_tenant_max: 100_000,
        }
    }
}

/// An event to publish. Validated by [`validate_event`] before it reaches an adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventIn {
    /// The deduplication id, unique per tenant within the dedupe window.
    pub id: String,
    /// The tenant the event belongs to.
    pub tenant: TenantId,
    /// Dot-separated subject, e.g. `billing.invoice.paid` (no wildcards).
    pub subject: String,
    /// The payload (JSON when it came through the HTTP API).
    pub payload: Vec<u8>,
    /// Who published: `api/<principal>`, `outbox`, `plugin/<name>@<version>`.
    pub source: String,
    /// When it was published (ms since the Unix epoch).
    pub time_ms: i64,
}

/// What happened to one published event, in the order of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Stored under this sequence.
    Accepted {
        /// The event's sequence.
        seq: u64,
    },
    /// Its id was already accepted within the dedupe window; nothing was stored.
    Duplicate {
        /// The sequence of the original (0 when the adapter cannot tell).
        seq: u64,
    },
}

/// An event as stored, with its sequence in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Position in the log; increases in commit order.
    pub seq: u64,
    /// The deduplication id.
    pub id: String,
    /// The tenant.
    pub tenant: TenantId,
    /// The subject.
    pub subject: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Who published it.
    pub source: String,
    /// When it was published (ms since the Unix epoch).
    pub time_ms: i64,
}

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "from", content = "at")]
pub enum StartAt {
    /// Only events published after the group is created.
    #[default]
    New,
    /// Every stored event.
    All,
    /// Events from this sequence on.
    Seq(u64),
    /// Events published at or after this time (ms since the Unix epoch).
    TimeMs(i64),
}

/// A durable consumer group's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    /// The tenant.
    pub tenant: TenantId,
    /// Name, unique within the tenant: 1 to 64 of `[A-Za-z0-9_-]`.
    pub name: String,
    /// Subject filter (`*` one token, final `>` the rest).
    pub filter: String,
    /// How long a delivery may stay unacked before it is delivered again.
    pub ack_wait_ms: u64,
    /// Deliveries per event before it moves to the dead-letter queue.
    pub deliveries_max: u32,
    /// Ack deadline of delivery `n` is `backoff_ms[n-1]` (last repeats); empty: `ack_wait_ms`.
    pub backoff_ms: Vec<u64>,
    /// Where the group starts (only used when it is created).
    pub start: StartAt,
    /// Most deliveries outstanding (unacked) at once; fetches return nothing beyond it.
    pub pending_max: u32,
}

/// A consumer group and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerInfo {
    /// Its settings.
    pub spec: ConsumerSpec,
    /// Deliveries outstanding (delivered, not yet acked, not dead-lettered).
    pub pending: u64,
    /// Matching events not yet delivered (0 when the adapter cannot tell cheaply).
    pub backlog: u64,
    /// Events in its dead-letter queue.
    pub dead_letters: u64,
    /// When it was created (ms since the Unix epoch).
    pub created_at_ms: i64,
}

/// One delivery of an event to a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The event.
    pub event: StoredEvent,
    /// Which delivery this is, from 1.
    pub delivery: u32,
    /// Opaque token naming this delivery, passed back to [`Bus::ack`].
    pub token: String,
    /// When the delivery is redelivered unless acked (ms since the Unix epoch).
    pub ack_deadline_ms: i64,
}

/// What a consumer says about a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// Done: never deliver it again to this group.
    Ack,
    /// Failed: deliver again after `delay_ms` (0: as soon as possible), or dead-letter it
    /// when this was the last allowed delivery.
    Nack {
        /// Delay before the next delivery.
        delay_ms: u64,
    },
    /// Still working: the ack deadline starts again.
    InProgress,
    /// Never deliver again: move it to the dead-letter queue now.
    Term,
}

/// An event in a consumer group's dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Position in the tenant's dead-letter queue (unique per tenant, increasing).
    pub id: u64,
    /// The consumer group that gave up on it.
    pub consumer: String,
    /// The event.
    pub event: StoredEvent,
    /// How many times it was delivered.
    pub deliveries: u32,
    /// Why: `deliveries_max`, `terminated`.
    pub reason: String,
    /// When it moved here (ms since the Unix epoch).
    pub at_ms: i64,
}

/// Which stored events a read or a replay takes: all bounds inclusive and optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadRange {
    /// Subject filter; `None` is every subject.
    pub filter: Option<String>,
    /// First sequence.
    pub from_seq: Option<u64>,
    /// Last sequence.
    pub to_seq: Option<u64>,
    /// Earliest publish time (ms since the Unix epoch).
    pub from_ms: Option<i64>,
    /// Latest publish time (ms since the Unix epoch).
    pub to_ms: Option<i64>,
    /// Most events returned (at most [`READ_EVENTS_MAX`]).
    pub limit: u32,
}

/// A bus failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// The consumer group, dead letter or delivery does not exist in this tenant.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The ack token is malformed, of another group, or its delivery is no longer current
    /// (acked, redelivered, dead-lettered).
    #[error("stale or unknown delivery: {0}")]
    StaleToken(String),
    /// A limit was reached; nothing was changed.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// The request conflicts with the current state (e.g. changing a group's filter).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The backend cannot be reached; the detail is for logs.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The backend failed; the detail is for logs.
    #[error("bus failure: {0}")]
    Backend(String),
}

impl From<BusError> for CoreError {
    fn from(err: BusError) -> Self {
        match err {
            BusError::NotFound(what) => CoreError::NotFound { what },
            BusError::StaleToken(message) => CoreError::Conflict { code: "stale_delivery", message: message.into() },
            BusError::LimitExceeded(message) => CoreError::LimitExceeded { message: message.into() },
            BusError::Conflict(message) => CoreError::Conflict { code: "consumer_conflict", message: message.into() },
            BusError::Unavailable(detail) | BusError::Backend(detail) => CoreError::BusUnavailable(detail),
        }
    }
}

/// The event bus, as the kernel and its adapters see it.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// `embedded` or `nats`.
    fn backend(&self) -> &'static str;

    /// Publishes a batch (at most [`BATCH_EVENTS_MAX`]); the answer has one entry per event,
    /// in order. The batch is durable when this returns `Ok`.
    async fn publish(&self, events: &[EventIn]) -> Result<Vec<Published>, BusError>;

    /// Creates a consumer group, or updates the settings of an existing one (`ack_wait_ms`,
    /// `deliveries_max`, `backoff_ms`, `pending_max`); changing its filter is a
    /// [`BusError::Conflict`].
    async fn put_consumer(&self, spec: &ConsumerSpec) -> Result<ConsumerInfo, BusError>;
    /// A consumer group of `tenant`.
    async fn get_consumer(&self, tenant: &TenantId, name: &str) -> Result<Option<ConsumerInfo>, BusError>;
    /// The consumer groups of `tenant`, by name.
    async fn list_consumers(&self, tenant: &TenantId) -> Result<Vec<ConsumerInfo>, BusError>;
    /// Deletes a consumer group with its pending deliveries and dead letters; false if absent.
    async fn delete_consumer(&self, tenant: &TenantId, name: &str) -> Result<bool, BusError>;

    /// Up to `max` deliveries for the group, waiting up to `wait` for the first when none is
    /// ready. Redeliveries due come first, then new events in sequence order.
    async fn fetch(
        &self,
        tenant: &TenantId,
        consumer: &str,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BusError>;
    /// Acks, nacks, extends or terminates one delivery of the group.
    async fn ack(&self, tenant: &TenantId, consumer: &str, token: &str, kind: AckKind) -> Result<(), BusError>;

    /// Stored events of `tenant` in `range`, in sequence order.
    async fn read(&self, tenant: &TenantId, range: &ReadRange) -> Result<Vec<StoredEvent>, BusError>;
    /// Delivers these stored events again to one group only (a replay); returns how many
    /// were queued.
    async fn requeue(&self, tenant: &TenantId, consumer: &str, seqs: &[u64]) -> Result<u64, BusError>;

    /// Dead letters of `tenant` (of one group when named), with `id > after`, by id.
    async fn dead_letters(
        &self,
        tenant: &TenantId,
        consumer: Option<&str>,
        after: u64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, BusError>;
    /// One dead letter.
    async fn dead_letter(&self, tenant: &TenantId, id: u64) -> Result<Option<DeadLetter>, BusError>;
    /// Delivers these dead letters again to their groups and removes them from the queue;
    /// returns how many were re-driven (unknown ids are skipped).
    async fn redrive(&self, tenant: &TenantId, ids: &[u64]) -> Result<u64, BusError>;
    /// Deletes these dead letters (`None`: every dead letter of the group, or of the tenant
    /// when no group is named); returns how many.
    async fn purge_dead_letters(
        &self,
        tenant: &TenantId,
        consumer: Option<&str>,
        ids: Option<&[u64]>,
    ) -> Result<u64, BusError>;

    /// Ok when the backend answers.
    async fn ping(&self) -> Result<(), BusError>;
}

/// Checks an event before it is published.
pub fn validate_event(event: &EventIn) -> Result<(), CoreError> {
    let id_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/');
    if event.id.is_empty() || event.id.len() > EVENT_ID_BYTES_MAX || !event.id.chars().all(id_ok) {
        return Err(CoreError::invalid(
            "invalid_event_id",
            format!("an event id is 1 to {EVENT_ID_BYTES_MAX} of letters, digits, '-', '_', '.', ':' or '/'"),
        ));
    }
    crate::plugin::validate_subject(&event.subject, false)?;
    if event.payload.len() > PAYLOAD_BYTES_MAX {
        return Err(CoreError::invalid(
            "payload_too_large",
            format!("an event payload is at most {PAYLOAD_BYTES_MAX} bytes"),
        ));
    }
    Ok(())
}

/// Checks a consumer group name.
pub fn validate_consumer_name(name: &str) -> Result<(), CoreError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if name.is_empty() || name.len() > CONSUMER_NAME_BYTES_MAX || !name.chars().all(ok) {
        return Err(CoreError::invalid(
            "invalid_consumer",
            format!("a consumer group name is 1 to {CONSUMER_NAME_BYTES_MAX} of letters, digits, '-' or '_'"),
        ));
    }
    Ok(())
}

/// Checks a consumer group's settings.
pub fn validate_consumer(spec: &ConsumerSpec) -> Result<(), CoreError> {
    validate_consumer_name(&spec.name)?;
    crate::plugin::validate_subject(&spec.filter, true)?;
    let wait_ok = |ms: u64| (1..=ACK_WAIT_MS_MAX).contains(&ms);
    if !wait_ok(spec.ack_wait_ms) || !spec.backoff_ms.iter().all(|ms| wait_ok(*ms)) {
        return Err(CoreError::invalid(
            "invalid_consumer",
            format!("ack_wait_ms and backoff_ms steps are 1 to {ACK_WAIT_MS_MAX} ms"),
        ));
    }
    if spec.backoff_ms.len() > BACKOFF_STEPS_MAX {
        return Err(CoreError::invalid(
            "invalid_consumer",
            format!("backoff_ms has at most {BACKOFF_STEPS_MAX} steps"),
        ));
    }
    if !(1..=DELIVERIES_MAX_MAX).contains(&spec.deliveries_max) {
        return Err(CoreError::invalid("invalid_consumer", format!("deliveries_max is 1 to {DELIVERIES_MAX_MAX}")));
    }
    if spec.pending_max == 0 {
        return Err(CoreError::invalid("invalid_consumer", "pending_max is at least 1"));
    }
    Ok(())
}

/// The ack deadline of delivery number `delivery` (from 1) of a group with these settings.
pub fn ack_deadline_ms(spec: &ConsumerSpec, delivery: u32) -> u64 {
    match spec.backoff_ms.len() {
        0 => spec.ack_wait_ms,
        n => spec.backoff_ms[(delivery.max(1) as usize - 1).min(n - 1)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ConsumerSpec {
        ConsumerSpec {
            tenant: TenantId::default_tenant(),
            name: "billing".into(),
            filter: "billing.>".into(),
            ack_wait_ms: 30_000,
            deliveries_max: 5,
            backoff_ms: vec![],
            start: StartAt::New,
            pending_max: 1_000,
        }
    }

    #[test]
    fn deadline_follows_the_backoff_schedule_then_repeats_its_last_step() {
        let mut s = spec();
        assert_eq!(ack_deadline_ms(&s, 1), 30_000);
        s.backoff_ms = vec![1_000, 5_000];
        assert_eq!(ack_deadline_ms(&s, 1), 1_000);
        assert_eq!(ack_deadline_ms(&s, 2), 5_000);
        assert_eq!(ack_deadline_ms(&s, 9), 5_000);
    }

    #[test]
    fn consumer_settings_are_checked() {
        assert!(validate_consumer(&spec()).is_ok());
        for bad in [
            ConsumerSpec { name: "a b".into(), ..spec() },
            ConsumerSpec { filter: "a..b".into(), ..spec() },
            ConsumerSpec { ack_wait_ms: 0, ..spec() },
            ConsumerSpec { deliveries_max: 0, ..spec() },
            ConsumerSpec { backoff_ms: vec![1; BACKOFF_STEPS_MAX + 1], ..spec() },
            ConsumerSpec { pending_max: 0, ..spec() },
        ] {
            assert!(validate_consumer(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn events_are_checked() {
        let ok = EventIn {
            id: "order-1:created".into(),
            tenant: TenantId::default_tenant(),
            subject: "orders.created".into(),
            payload: b"{}".to_vec(),
            source: "test".into(),
            time_ms: 0,
        };
        assert!(validate_event(&ok).is_ok());
        assert!(validate_event(&EventIn { id: String::new(), ..ok.clone() }).is_err());
        assert!(validate_event(&EventIn { id: "x".repeat(EVENT_ID_BYTES_MAX + 1), ..ok.clone() }).is_err());
        assert!(validate_event(&EventIn { subject: "orders.*".into(), ..ok.clone() }).is_err());
        assert!(validate_event(&EventIn { payload: vec![0; PAYLOAD_BYTES_MAX + 1], ..ok.clone() }).is_err());
    }
}
