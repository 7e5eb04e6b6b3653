//! The events service: what the HTTP API (and the MCP server) do with the bus.
//!
//! Validates input before it reaches the [`Bus`] adapter (a batch with one bad event changes
//! nothing), clamps waits and sizes to their limits, counts what happens in metrics, and runs
//! the replay engine: stored events again to one consumer group, or through a candidate plugin
//! version to see how many decisions would differ from the active one.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::bus::{
    AckKind, Bus, ConsumerInfo, ConsumerSpec, DeadLetter, Delivery, EventIn, Published, READ_EVENTS_MAX, ReadRange,
    StartAt, StoredEvent, validate_consumer, validate_consumer_name, validate_event,
};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::plugin::PluginKind;
use crate::plugin::call::Invocation;
use crate::plugin::service::PluginService;
use crate::tenant::TenantId;
use crate::{CoreError, CoreResult};

/// Most acks in one request.
pub const ACKS_PER_REQUEST_MAX: usize = 1_000;
/// Most differing decisions a what-if replay shows (all are counted).
pub const WHAT_IF_SAMPLES_MAX: usize = 20;

/// Settings of the events service (`[events]` in `nops.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// A new consumer group's ack deadline when the request names none.
    pub ack_wait_ms_default: u64,
    /// A new consumer group's `deliveries_max` when the request names none.
    pub deliveries_max_default: u32,
    /// A new consumer group's `pending_max` when the request names none.
    pub pending_max_default: u32,
    /// Most events one replay (or what-if) takes.
    pub replay_events_max: u32,
    /// Longest a fetch waits (a request asking for more gets this).
    pub fetch_wait_ms_max: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            ack_wait_ms_default: 30_000,
            deliveries_max_default: 5,
            pending_max_default: 1_000,
            replay_events_max: READ_EVENTS_MAX,
            fetch_wait_ms_max: 20_000,
        }
    }
}

impl EventsConfig {
    /// Checks the settings at start.
    pub fn validate(&self) -> Result<(), String> {
        if self.replay_events_max == 0 || self.replay_events_max > READ_EVENTS_MAX {
            return Err(format!("events.replay_events_max must be 1 to {READ_EVENTS_MAX}"));
        }
        if self.fetch_wait_ms_max > crate::bus::FETCH_WAIT_MS_MAX {
            return Err(format!("events.fetch_wait_ms_max is at most {}", crate::bus::FETCH_WAIT_MS_MAX));
        }
        let probe = ConsumerSpec {
            tenant: TenantId::default_tenant(),
            name: "probe".into(),
            filter: ">".into(),
            ack_wait_ms: self.ack_wait_ms_default,
            deliveries_max: self.deliveries_max_default,
            backoff_ms: Vec::new(),
            start: StartAt::New,
            pending_max: self.pending_max_default,
        };
        validate_consumer(&probe).map_err(|e| format!("events defaults: {e}"))
    }
}

/// One event of a publish request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    /// Deduplication id: 1 to 128 of letters, digits, `-_.:/`; a retry with the same id within
    /// the dedupe window is answered `duplicate` and stored once.
    #[schema(example = "order-1042:paid")]
    pub id: String,
    /// Dot-separated subject, no wildcards.
    #[schema(example = "billing.invoice.paid")]
    pub subject: String,
    /// Any JSON value; stored and delivered byte for byte as sent.
    #[schema(value_type = Object)]
    pub payload: Box<serde_json::value::RawValue>,
}

/// What happened to one event of a batch.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PublishResult {
    /// The event's id.
    pub id: String,
    /// `accepted` (stored now), `duplicate` (stored earlier; not stored again) or `buffered`
    /// (the bus is unreachable: kept in the kernel's outbox and published, deduplicated by
    /// id, when it is back).
    pub status: &'static str,
    /// The event's sequence in the log (the original's for a duplicate; 0 when unknown).
    pub seq: u64,
}

/// An event as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventView {
    /// Position in the log.
    pub seq: u64,
    /// The deduplication id.
    pub id: String,
    /// The subject.
    pub subject: String,
    /// The payload: the JSON published, byte for byte, or for a non-JSON payload (published
    /// by a plugin) `{"base64": "..."}`.
    #[schema(value_type = Object)]
    pub payload: Box<serde_json::value::RawValue>,
    /// Who published it: `api/<principal>`, `outbox`, `plugin/<name>@<version>`.
    pub source: String,
    /// When it was published (ms since the Unix epoch).
    pub time_ms: i64,
}

impl From<StoredEvent> for EventView {
    fn from(e: StoredEvent) -> Self {
        let payload = raw_json(e.payload);
        Self { seq: e.seq, id: e.id, subject: e.subject, payload, source: e.source, time_ms: e.time_ms }
    }
}

/// `bytes` as a JSON value as they are, or `{"base64": ...}` when they are not JSON.
fn raw_json(bytes: Vec<u8>) -> Box<serde_json::value::RawValue> {
    use serde_json::value::{RawValue, to_raw_value};
    let bytes = match String::from_utf8(bytes) {
        Ok(text) if serde_json::from_str::<&RawValue>(&text).is_ok() => {
            // Checked just above: the text is one JSON value.
            return RawValue::from_string(text)
                .unwrap_or_else(|_| to_raw_value(&serde_json::Value::Null).unwrap_or_default());
        }
        Ok(text) => text.into_bytes(),
        Err(err) => err.into_bytes(),
    };
    use base64::Engine as _;
    let wrapped = serde_json::json!({ "base64": base64::engine::general_purpose::STANDARD.encode(&bytes) });
    to_raw_value(&wrapped).unwrap_or_default()
}

/// One delivery as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeliveryView {
    /// Pass back to ack, nack, extend or terminate this delivery.
    pub token: String,
    /// Which delivery of this event to the group this is, from 1.
    pub delivery: u32,
    /// When it is delivered again unless acked (ms since the Unix epoch).
    pub ack_deadline_ms: i64,
    /// The event.
    pub event: EventView,
}

impl From<Delivery> for DeliveryView {
    fn from(d: Delivery) -> Self {
        Self { token: d.token, delivery: d.delivery, ack_deadline_ms: d.ack_deadline_ms, event: d.event.into() }
    }
}

/// A consumer group's settings as a request gives them; absent fields keep their current
/// value (or the default for a new group).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerRequest {
    /// Subject filter: `*` matches one token, a final `>` the rest. Fixed once created.
    #[schema(example = "billing.>")]
    pub filter: String,
    /// How long a delivery may stay unacked before it is delivered again, in ms.
    pub ack_wait_ms: Option<u64>,
    /// Deliveries per event before it moves to the dead-letter queue.
    pub deliveries_max: Option<u32>,
    /// Ack deadlines of successive deliveries, in ms (the last repeats); replaces
    /// `ack_wait_ms` when given.
    pub backoff_ms: Option<Vec<u64>>,
    /// Where a new group starts: `{"from": "new"}` (default), `{"from": "all"}`,
    /// `{"from": "seq", "at": 42}`, `{"from": "time_ms", "at": 1767225600000}`.
    #[schema(value_type = Option<Object>)]
    pub start: Option<StartAt>,
    /// Most unacked deliveries at once.
    pub pending_max: Option<u32>,
}

/// A consumer group as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConsumerView {
    /// Its name.
    pub name: String,
    /// Its subject filter.
    pub filter: String,
    /// Ack deadline, in ms.
    pub ack_wait_ms: u64,
    /// Deliveries per event before the dead-letter queue.
    pub deliveries_max: u32,
    /// Ack deadlines of successive deliveries, in ms.
    pub backoff_ms: Vec<u64>,
    /// Most unacked deliveries at once.
    pub pending_max: u32,
    /// Deliveries outstanding.
    pub pending: u64,
    /// Matching events not yet delivered (approximate on some backends).
    pub backlog: u64,
    /// Events in its dead-letter queue.
    pub dead_letters: u64,
    /// When it was created (ms since the Unix epoch).
    pub created_at_ms: i64,
}

impl From<ConsumerInfo> for ConsumerView {
    fn from(c: ConsumerInfo) -> Self {
        Self {
            name: c.spec.name,
            filter: c.spec.filter,
            ack_wait_ms: c.spec.ack_wait_ms,
            deliveries_max: c.spec.deliveries_max,
            backoff_ms: c.spec.backoff_ms,
            pending_max: c.spec.pending_max,
            pending: c.pending,
            backlog: c.backlog,
            dead_letters: c.dead_letters,
            created_at_ms: c.created_at_ms,
        }
    }
}

/// A dead letter as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeadLetterView {
    /// Its id in the tenant's dead-letter queue.
    pub id: u64,
    /// The consumer group that gave up on it.
    pub consumer: String,
    /// How many times it was delivered.
    pub deliveries: u32,
    /// `deliveries_max` or `terminated`.
    pub reason: String,
    /// When it moved to the queue (ms since the Unix epoch).
    pub at_ms: i64,
    /// The event.
    pub event: EventView,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(d: DeadLetter) -> Self {
        Self {
            id: d.id,
            consumer: d.consumer,
            deliveries: d.deliveries,
            reason: d.reason,
            at_ms: d.at_ms,
            event: d.event.into(),
        }
    }
}

/// One ack of an ack request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    /// The delivery's token.
    pub token: String,
    /// `ack`, `nack`, `in_progress` or `term`.
    #[schema(example = "ack")]
    pub kind: String,
    /// For `nack`: wait this long before delivering it again, in ms.
    #[serde(default)]
    pub delay_ms: u64,
}

/// What happened to one ack.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AckResult {
    /// The delivery's token.
    pub token: String,
    /// `ok`, or `stale` when the delivery is no longer current (already acked, redelivered or
    /// dead-lettered): the event's fate is decided elsewhere.
    pub status: &'static str,
}

/// Which events a replay takes (all bounds inclusive and optional).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Subject filter (wildcards allowed); absent: every subject.
    pub filter: Option<String>,
    /// First sequence.
    pub from_seq: Option<u64>,
    /// Last sequence.
    pub to_seq: Option<u64>,
    /// Earliest publish time (ms since the Unix epoch).
    pub from_ms: Option<i64>,
    /// Latest publish time (ms since the Unix epoch).
    pub to_ms: Option<i64>,
    /// Most events (default and maximum: `replay_events_max`).
    pub limit: Option<u32>,
    /// Deliver the events again to this consumer group only.
    pub consumer: Option<String>,
    /// What-if: run each event's payload through this plugin's active version and `candidate`.
    pub plugin: Option<String>,
    /// The candidate version of `plugin`.
    pub candidate: Option<String>,
}

/// What a replay did.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReplayReport {
    /// Events in the range.
    pub events: u64,
    /// Events queued again to the consumer group (a replay to a group).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requeued: Option<u64>,
    /// The what-if comparison (a replay through a plugin).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub what_if: Option<crate::plugin::service::WhatIf>,
}

/// The events service.
pub struct EventService {
    bus: Arc<dyn Bus>,
    /// Where publishes wait while a remote bus is down.
    buffer: Option<(Arc<dyn crate::outbox::OutboxStore>, Arc<crate::degraded::DegradedModes>)>,
    plugins: Option<Arc<PluginService>>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    config: EventsConfig,
}

impl std::fmt::Debug for EventService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventService").field("backend", &self.bus.backend()).finish_non_exhaustive()
    }
}

impl EventService {
    /// The service over `bus`; what-if replays need `plugins`.
    pub fn new(
        bus: Arc<dyn Bus>,
        plugins: Option<Arc<PluginService>>,
        clock: Arc<dyn Clock>,
        metrics: Metrics,
        config: EventsConfig,
    ) -> Self {
        Self { bus, buffer: None, plugins, clock, metrics, config }
    }

    /// Buffers publishes in `store`'s outbox while the (remote) bus is down, as `degraded`
    /// tracks it; the outbox relay publishes them, under their own ids, when it is back.
    #[must_use]
    pub fn with_buffer(
        mut self,
        store: Arc<dyn crate::outbox::OutboxStore>,
        degraded: Arc<crate::degraded::DegradedModes>,
    ) -> Self {
        self.buffer = Some((store, degraded));
        self
    }

    /// The bus underneath.
    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    /// Publishes a batch for `tenant`. Every event is checked first: one bad event fails the
    /// whole batch (naming its index) and nothing is stored.
    pub async fn publish(
        &self,
        tenant: &TenantId,
        source: &str,
        batch: Vec<NewEvent>,
    ) -> CoreResult<Vec<PublishResult>> {
        if batch.is_empty() || batch.len() > crate::bus::BATCH_EVENTS_MAX {
            return Err(CoreError::invalid(
                "invalid_batch",
                format!("a batch holds 1 to {} events", crate::bus::BATCH_EVENTS_MAX),
            ));
        }
        let now = self.clock.now_ms();
        let mut events = Vec::with_capacity(batch.len());
        for (i, e) in batch.into_iter().enumerate() {
            let payload = e.payload.get().as_bytes().to_vec();
            let event = EventIn {
                id: e.id,
                tenant: tenant.clone(),
                subject: e.subject,
                payload,
                source: source.into(),
                time_ms: now,
            };
            validate_event(&event).map_err(|err| match err {
                CoreError::Invalid { code, message } => CoreError::invalid(code, format!("events[{i}]: {message}")),
                other => other,
            })?;
            events.push(event);
        }
        let outcomes = match &self.buffer {
            None => self.bus.publish(&events).await?,
            Some((store, degraded)) => {
                let published = if degraded.bus().is_degraded() {
                    Err(crate::bus::BusError::Unavailable("the bus is degraded".into()))
                } else {
                    self.bus.publish(&events).await
                };
                match published {
                    Ok(outcomes) => outcomes,
                    Err(crate::bus::BusError::Unavailable(error) | crate::bus::BusError::Backend(error)) => {
                        degraded.bus_failed(&error);
                        store.buffer_events(&events).await?;
                        self.metrics.bus_events_total.with_label_values(&["buffered"]).inc_by(events.len() as u64);
                        return Ok(events
                            .into_iter()
                            .map(|e| PublishResult { id: e.id, status: "buffered", seq: 0 })
                            .collect());
                    }
                    Err(other) => return Err(other.into()),
                }
            }
        };
        let mut results = Vec::with_capacity(events.len());
        let (mut accepted, mut duplicates) = (0u64, 0u64);
        for (event, outcome) in events.into_iter().zip(outcomes) {
            let (status, seq) = match outcome {
                Published::Accepted { seq } => {
                    accepted += 1;
                    ("accepted", seq)
                }
                Published::Duplicate { seq } => {
                    duplicates += 1;
                    ("duplicate", seq)
                }
            };
            results.push(PublishResult { id: event.id, status, seq });
        }
        self.metrics.bus_events_total.with_label_values(&["accepted"]).inc_by(accepted);
        self.metrics.bus_events_total.with_label_values(&["duplicate"]).inc_by(duplicates);
        Ok(results)
    }

    /// Stored events of `tenant` in a range, oldest first.
    pub async fn read(&self, tenant: &TenantId, range: ReadRange) -> CoreResult<Vec<EventView>> {
        let range = checked_range(range, READ_EVENTS_MAX)?;
        Ok(self.bus.read(tenant, &range).await?.into_iter().map(EventView::from).collect())
    }

    /// Creates or updates a consumer group. Returns it and whether it was created.
    pub async fn put_consumer(
        &self,
        tenant: &TenantId,
        name: &str,
        req: ConsumerRequest,
    ) -> CoreResult<(ConsumerView, bool)> {
        validate_consumer_name(name)?;
        let existing = self.bus.get_consumer(tenant, name).await?;
        let base = existing.as_ref().map(|c| c.spec.clone());
        let spec = ConsumerSpec {
            tenant: tenant.clone(),
            name: name.to_string(),
            filter: req.filter,
            ack_wait_ms: req
                .ack_wait_ms
                .or(base.as_ref().map(|b| b.ack_wait_ms))
                .unwrap_or(self.config.ack_wait_ms_default),
            deliveries_max: req
                .deliveries_max
                .or(base.as_ref().map(|b| b.deliveries_max))
                .unwrap_or(self.config.deliveries_max_default),
            backoff_ms: req.backoff_ms.or(base.as_ref().map(|b| b.backoff_ms.clone())).unwrap_or_default(),
            start: req.start.or(base.as_ref().map(|b| b.start)).unwrap_or_default(),
            pending_max: req
                .pending_max
                .or(base.as_ref().map(|b| b.pending_max))
                .unwrap_or(self.config.pending_max_default),
        };
        validate_consumer(&spec)?;
        if let Some(base) = &base
            && base.filter != spec.filter
        {
            return Err(CoreError::Conflict {
                code: "consumer_conflict",
                message: format!("the group's filter is `{}`; delete the group to change it", base.filter).into(),
            });
        }
        let info = self.bus.put_consumer(&spec).await?;
        Ok((info.into(), existing.is_none()))
    }

    /// One consumer group.
    pub async fn get_consumer(&self, tenant: &TenantId, name: &str) -> CoreResult<ConsumerView> {
        validate_consumer_name(name)?;
        let info = self.bus.get_consumer(tenant, name).await?.ok_or(CoreError::NotFound { what: "consumer group" })?;
        Ok(info.into())
    }

    /// The tenant's consumer groups.
    pub async fn list_consumers(&self, tenant: &TenantId) -> CoreResult<Vec<ConsumerView>> {
        Ok(self.bus.list_consumers(tenant).await?.into_iter().map(ConsumerView::from).collect())
    }

    /// Deletes a consumer group with its pending deliveries and dead letters.
    pub async fn delete_consumer(&self, tenant: &TenantId, name: &str) -> CoreResult<()> {
        validate_consumer_name(name)?;
        if !self.bus.delete_consumer(tenant, name).await? {
            return Err(CoreError::NotFound { what: "consumer group" });
        }
        Ok(())
    }

    /// Up to `max` deliveries, waiting up to `wait_ms` (capped) for the first.
    pub async fn fetch(&self, tenant: &TenantId, name: &str, max: u32, wait_ms: u64) -> CoreResult<Vec<DeliveryView>> {
        validate_consumer_name(name)?;
        if max == 0 || max > crate::bus::FETCH_EVENTS_MAX {
            return Err(CoreError::invalid("invalid_fetch", format!("max is 1 to {}", crate::bus::FETCH_EVENTS_MAX)));
        }
        let wait = Duration::from_millis(wait_ms.min(self.config.fetch_wait_ms_max));
        let deliveries = self.bus.fetch(tenant, name, max, wait).await?;
        let redelivered = deliveries.iter().filter(|d| d.delivery > 1).count() as u64;
        self.metrics.bus_deliveries_total.with_label_values(&["first"]).inc_by(deliveries.len() as u64 - redelivered);
        self.metrics.bus_deliveries_total.with_label_values(&["redelivery"]).inc_by(redelivered);
        Ok(deliveries.into_iter().map(DeliveryView::from).collect())
    }

    /// Applies acks; a stale token is reported per ack, not as an error of the request.
    pub async fn ack(&self, tenant: &TenantId, name: &str, acks: Vec<AckRequest>) -> CoreResult<Vec<AckResult>> {
        validate_consumer_name(name)?;
        if acks.is_empty() || acks.len() > ACKS_PER_REQUEST_MAX {
            return Err(CoreError::invalid(
                "invalid_ack",
                format!("an ack request holds 1 to {ACKS_PER_REQUEST_MAX} acks"),
            ));
        }
        let mut kinds = Vec::with_capacity(acks.len());
        for (i, a) in acks.iter().enumerate() {
            let kind = match a.kind.as_str() {
                "ack" => AckKind::Ack,
                "nack" => AckKind::Nack { delay_ms: a.delay_ms.min(crate::bus::ACK_WAIT_MS_MAX) },
                "in_progress" => AckKind::InProgress,
                "term" => AckKind::Term,
                other => {
                    return Err(CoreError::invalid(
                        "invalid_ack",
                        format!("acks[{i}]: kind `{other}` is not one of ack, nack, in_progress, term"),
                    ));
                }
            };
            if a.token.is_empty() || a.token.len() > 512 {
                return Err(CoreError::invalid("invalid_ack", format!("acks[{i}]: a token is 1 to 512 bytes")));
            }
            kinds.push(kind);
        }
        let mut results = Vec::with_capacity(acks.len());
        for (a, kind) in acks.into_iter().zip(kinds) {
            let status = match self.bus.ack(tenant, name, &a.token, kind).await {
                Ok(()) => "ok",
                Err(crate::bus::BusError::StaleToken(_)) => "stale",
                Err(crate::bus::BusError::NotFound(what)) => return Err(CoreError::NotFound { what }),
                Err(err) => return Err(err.into()),
            };
            let label = match kind {
                AckKind::Ack => "ack",
                AckKind::Nack { .. } => "nack",
                AckKind::InProgress => "in_progress",
                AckKind::Term => "term",
            };
            self.metrics.bus_acks_total.with_label_values(&[label, status]).inc();
            results.push(AckResult { token: a.token, status });
        }
        Ok(results)
    }

    /// Dead letters of the tenant (of one group when named), after `after`, by id.
    pub async fn dead_letters(
        &self,
        tenant: &TenantId,
        consumer: Option<&str>,
        after: u64,
        limit: u32,
    ) -> CoreResult<Vec<DeadLetterView>> {
        if let Some(name) = consumer {
            validate_consumer_name(name)?;
        }
        Ok(self.bus.dead_letters(tenant, consumer, after, limit).await?.into_iter().map(DeadLetterView::from).collect())
    }

    /// One dead letter.
    pub async fn dead_letter(&self, tenant: &TenantId, id: u64) -> CoreResult<DeadLetterView> {
        let letter = self.bus.dead_letter(tenant, id).await?.ok_or(CoreError::NotFound { what: "dead letter" })?;
        Ok(letter.into())
    }

    /// Delivers dead letters again to their groups.
    pub async fn redrive(&self, tenant: &TenantId, ids: &[u64]) -> CoreResult<u64> {
        check_ids(ids)?;
        let n = self.bus.redrive(tenant, ids).await?;
        self.metrics.bus_dead_letter_ops_total.with_label_values(&["redrive"]).inc_by(n);
        Ok(n)
    }

    /// Deletes dead letters: these ids, or every one of a group (or of the tenant).
    pub async fn purge(&self, tenant: &TenantId, consumer: Option<&str>, ids: Option<&[u64]>) -> CoreResult<u64> {
        if let Some(ids) = ids {
            check_ids(ids)?;
        }
        if let Some(name) = consumer {
            validate_consumer_name(name)?;
        }
        let n = self.bus.purge_dead_letters(tenant, consumer, ids).await?;
        self.metrics.bus_dead_letter_ops_total.with_label_values(&["purge"]).inc_by(n);
        Ok(n)
    }

    /// Replays a range of the tenant's events: again to one consumer group, or through a
    /// candidate plugin version (what-if), or both.
    pub async fn replay(&self, tenant: &TenantId, req: ReplayRequest) -> CoreResult<ReplayReport> {
        if req.consumer.is_none() && req.plugin.is_none() {
            return Err(CoreError::invalid(
                "invalid_replay",
                "name a `consumer` to replay to, or a `plugin` and `candidate`",
            ));
        }
        if let Some(name) = &req.consumer {
            validate_consumer_name(name)?;
            self.bus.get_consumer(tenant, name).await?.ok_or(CoreError::NotFound { what: "consumer group" })?;
        }
        let what_if_target = match (&req.plugin, &req.candidate) {
            (Some(plugin), Some(candidate)) => {
                let version = semver::Version::parse(candidate)
                    .map_err(|e| CoreError::invalid("invalid_version", format!("candidate: {e}")))?;
                Some((plugin.clone(), version))
            }
            (None, None) => None,
            _ => return Err(CoreError::invalid("invalid_replay", "`plugin` and `candidate` go together")),
        };
        let range = ReadRange {
            filter: req.filter,
            from_seq: req.from_seq,
            to_seq: req.to_seq,
            from_ms: req.from_ms,
            to_ms: req.to_ms,
            limit: req.limit.unwrap_or(self.config.replay_events_max),
        };
        let range = checked_range(range, self.config.replay_events_max)?;
        let events = self.bus.read(tenant, &range).await?;
        let mut report = ReplayReport { events: events.len() as u64, requeued: None, what_if: None };
        if let Some((plugin, candidate)) = what_if_target {
            let plugins = self
                .plugins
                .as_ref()
                .ok_or_else(|| CoreError::invalid("plugins_disabled", "the plugin runtime is off"))?;
            let kind = plugins
                .active(tenant, &plugin)
                .map(|a| a.current.kind)
                .ok_or(CoreError::NotFound { what: "active plugin" })?;
            let inputs: Vec<(u64, Option<Invocation>)> =
                events.iter().map(|e| (e.seq, invocation_of(kind, &e.payload))).collect();
            report.what_if = Some(plugins.what_if(tenant, &plugin, &candidate, inputs, WHAT_IF_SAMPLES_MAX).await?);
        }
        if let Some(name) = &req.consumer {
            let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
            let n = self.bus.requeue(tenant, name, &seqs).await?;
            self.metrics.bus_replayed_total.inc_by(n);
            report.requeued = Some(n);
        }
        Ok(report)
    }
}

/// The call a what-if replay makes for one event: its payload is the plugin's input (an
/// access request for a policy; `{"task", "candidates"}` for a scorer). Other kinds have side
/// effects or no input and are not replayed.
fn invocation_of(kind: PluginKind, payload: &[u8]) -> Option<Invocation> {
    match kind {
        PluginKind::Policy => serde_json::from_slice(payload).ok().map(Invocation::Authorize),
        PluginKind::Scorer => {
            #[derive(Deserialize)]
            struct ScoreInput {
                task: crate::plugin::call::ScoreTask,
                candidates: Vec<crate::plugin::call::Candidate>,
            }
            serde_json::from_slice::<ScoreInput>(payload)
                .ok()
                .map(|s| Invocation::Score { task: s.task, candidates: s.candidates })
        }
        _ => None,
    }
}

fn check_ids(ids: &[u64]) -> CoreResult<()> {
    if ids.is_empty() || ids.len() > READ_EVENTS_MAX as usize {
        return Err(CoreError::invalid("invalid_ids", format!("name 1 to {READ_EVENTS_MAX} ids")));
    }
    Ok(())
}

fn checked_range(range: ReadRange, limit_max: u32) -> CoreResult<ReadRange> {
    if let Some(filter) = &range.filter {
        crate::plugin::validate_subject(filter, true)?;
    }
    if range.limit == 0 || range.limit > limit_max {
        return Err(CoreError::invalid("invalid_range", format!("limit is 1 to {limit_max}")));
    }
    if let (Some(a), Some(b)) = (range.from_seq, range.to_seq)
        && a > b
    {
        return Err(CoreError::invalid("invalid_range", "from_seq is after to_seq"));
    }
    if let (Some(a), Some(b)) = (range.from_ms, range.to_ms)
        && a > b
    {
        return Err(CoreError::invalid("invalid_range", "from_ms is after to_ms"));
    }
    Ok(range)
}
