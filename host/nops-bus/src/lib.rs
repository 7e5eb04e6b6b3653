//! The NATS JetStream adapter of the kernel's [`Bus`] capability.
//!
//! Layout (see `docs/events-nats.md` for outside clients):
//! - `<prefix>_EVENTS` holds every event on `<prefix>.ev.<tenant>.<subject>`; JetStream
//!   deduplicates on `Nats-Msg-Id: <tenant>/<event id>` within the dedupe window.
//! - A consumer group is a durable pull consumer `<tenant>~<group>` on the events stream,
//!   filtered to `<prefix>.ev.<tenant>.<filter>`; its settings live in the consumer's
//!   description, so the group is one object on the server.
//! - `<prefix>_REDELIVER` (work queue) holds copies queued for one group only (replay,
//!   re-drive) on `<prefix>.rd.<tenant>.<group>`, read by a second durable consumer of the same
//!   name. Fetch takes from it first.
//! - `<prefix>_DLQ` holds dead letters on `<prefix>.dlq.<tenant>.<group>`; the dead-letter id
//!   is the stream sequence. Dead-lettering happens in the kernel, not through the server's
//!   max-deliveries advisory (which is lost while no kernel listens): NATS consumers deliver
//!   without limit and a delivery past `deliveries_max` is moved (idempotently, by message id)
//!   to the DLQ and acked when it is fetched.
//! - An ack token is the delivery's JetStream ack subject: stateless, valid on every replica.

mod layout;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{HeaderMap, Subject};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use nops_core::bus::{
    AckKind, Bus, BusConfig, BusError, ConsumerInfo, ConsumerSpec, DeadLetter, Delivery, EventIn, FETCH_EVENTS_MAX,
    Published, READ_EVENTS_MAX, ReadRange, StartAt, StoredEvent, ack_deadline_ms,
};
use nops_core::tenant::TenantId;
use tokio::sync::Semaphore;

pub use layout::PREFIX_BYTES_MAX;
use layout::{AckToken, Layout, StoredSpec};

/// Most publish acks awaited at once per bus (a batch takes its share up front, so concurrent
/// batches never wait on each other's permits).
pub const PUBLISH_ACKS_IN_FLIGHT_MAX: usize = 4_096;
/// Longest a JetStream API request or publish ack is awaited.
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Longest connecting to the server may take.
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// How far before a group's start time (by the events' own times) the server's receive times
/// are searched: events published with a time older than this before they reached the server
/// are not found by a time start.
pub const START_TIME_SKEW_MS: i64 = 3_600_000;
/// Most deliveries whose latest delivery number and outcome this process remembers, to tell
/// a stale token (acked, redelivered since) from a current one.
pub const DELIVERY_MEMORY_ENTRIES_MAX: usize = 65_536;
/// `max_deliver` of the NATS consumers: far past any `deliveries_max`, as the kernel
/// dead-letters itself (the server refuses "unlimited" together with a backoff schedule).
pub const NATS_DELIVERIES_MAX: i64 = 1_000_000;
/// How often a fetch waiting on a group with `pending_max` deliveries outstanding looks again.
pub const FULL_GROUP_POLL_MS: u64 = 50;
/// Most messages one pull request of a read or scan asks for.
pub const SCAN_BATCH_EVENTS_MAX: usize = 500;
/// How long the server keeps the ephemeral consumer of an abandoned read.
pub const SCAN_CONSUMER_IDLE_MS: u64 = 30_000;
/// How long the redeliver and dead-letter streams remember message ids (covers the longest
/// ack deadline, so a move retried after a crash is not stored twice).
pub const COPY_DEDUPE_WINDOW_MS: u64 = 24 * 3_600_000;

/// Where the NATS bus lives and how it names its streams.
#[derive(Debug, Clone)]
pub struct NatsBusConfig {
    /// `nats://host:port`.
    pub url: String,
    /// Prefix of the streams, consumers and subjects this kernel creates (`NOPS` by default;
    /// tests use a unique one each).
    pub prefix: String,
    /// Semantics shared with the embedded bus.
    pub bus: BusConfig,
}

/// The bus on NATS JetStream.
#[derive(Debug, Clone)]
pub struct NatsBus {
    config: NatsBusConfig,
    layout: Layout,
    client: async_nats::Client,
    js: jetstream::Context,
    publish_permits: Arc<Semaphore>,
    seen: Arc<Mutex<DeliveryMemory>>,
}

/// What this process last saw of deliveries: `(stream/consumer, stream seq)` to the latest
/// delivery number and whether that delivery was settled (acked, nacked, terminated).
type DeliveryMemory = HashMap<(String, u64), (u32, bool)>;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

fn backend(what: &str, err: impl std::fmt::Display) -> BusError {
    BusError::Backend(format!("{what}: {err}"))
}

fn stale(why: &str) -> BusError {
    BusError::StaleToken(why.to_owned())
}

impl NatsBus {
    /// Connects and creates (or updates) the streams.
    pub async fn connect(config: NatsBusConfig) -> Result<Self, BusError> {
        let layout = Layout::new(&config.prefix)?;
        let client = async_nats::ConnectOptions::new()
            .name("nops")
            .connection_timeout(ms(CONNECT_TIMEOUT_MS))
            .request_timeout(Some(ms(REQUEST_TIMEOUT_MS)))
            .connect(config.url.as_str())
            .await
            .map_err(|err| BusError::Unavailable(format!("connect to {}: {err}", config.url)))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(ms(REQUEST_TIMEOUT_MS))
            .max_ack_inflight(2 * PUBLISH_ACKS_IN_FLIGHT_MAX)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let bus = Self {
            config,
            layout,
            client,
            js,
            publish_permits: Arc::new(Semaphore::new(PUBLISH_ACKS_IN_FLIGHT_MAX)),
            seen: Arc::new(Mutex::new(HashMap::new())),
        };
        bus.ensure_streams().await?;
        Ok(bus)
    }

    /// Deletes every stream this bus created (tests clean up with it).
    pub async fn destroy(&self) -> Result<(), BusError> {
        for name in [&self.layout.events, &self.layout.redeliver, &self.layout.dlq] {
            if let Err(err) = self.js.delete_stream(name).await {
                let missing = matches!(
                    err.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref e)
                        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                );
                if !missing {
                    return Err(self.fail("delete stream", err));
                }
            }
        }
        Ok(())
    }

    /// The name of the events stream (`<prefix>_EVENTS`).
    pub fn events_stream(&self) -> &str {
        &self.layout.events
    }

    /// The subject filter of every event of `tenant`: `<prefix>.ev.<tenant>.>`.
    pub fn tenant_events_filter(&self, tenant: &TenantId) -> String {
        self.layout.event_subject(tenant, ">")
    }

    /// A failure, as unavailable when the connection is down.
    fn fail(&self, what: &str, err: impl std::fmt::Display) -> BusError {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            BusError::Unavailable(format!("{what}: {err}"))
        } else {
            backend(what, err)
        }
    }

    /// Remembers a delivery handed out (`settled`: or its outcome).
    fn remember(&self, stream: &str, consumer: &str, seq: u64, delivered: u32, settled: bool) {
        let Ok(mut seen) = self.seen.lock() else { return };
        if seen.len() >= DELIVERY_MEMORY_ENTRIES_MAX {
            // Forgetting only weakens stale-token detection; the server stays the authority.
            seen.clear();
        }
        seen.insert((format!("{stream}/{consumer}"), seq), (delivered, settled));
    }

    /// Whether this process knows the token's delivery is no longer current.
    fn known_stale(&self, token: &AckToken<'_>) -> bool {
        let Ok(seen) = self.seen.lock() else { return false };
        let key = (format!("{}/{}", token.stream, token.consumer), token.stream_seq);
        seen.get(&key).is_some_and(|(delivered, settled)| {
            *delivered > token.delivered || (*delivered == token.delivered && *settled)
        })
    }

    async fn ensure_streams(&self) -> Result<(), BusError> {
        let bus = &self.config.bus;
        let retention = ms(bus.retention_ms);
        let events = stream::Config {
            name: self.layout.events.clone(),
            description: Some("NOPS events".into()),
            subjects: vec![self.layout.events_all()],
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_messages: i64::try_from(bus.events_max).unwrap_or(i64::MAX),
            max_age: retention,
            duplicate_window: ms(bus.dedupe_window_ms.min(bus.retention_ms)),
            storage: stream::StorageType::File,
            num_replicas: 1,
            ..Default::default()
        };
        let redeliver = stream::Config {
            name: self.layout.redeliver.clone(),
            description: Some("NOPS events queued again for one consumer group".into()),
            subjects: vec![self.layout.redeliver_all()],
            retention: stream::RetentionPolicy::WorkQueue,
            discard: stream::DiscardPolicy::Old,
            max_age: retention,
            duplicate_window: ms(COPY_DEDUPE_WINDOW_MS.min(bus.retention_ms)),
            storage: stream::StorageType::File,
            num_replicas: 1,
            ..Default::default()
        };
        let dlq = stream::Config {
            name: self.layout.dlq.clone(),
            description: Some("NOPS dead letters".into()),
            subjects: vec![self.layout.dlq_all()],
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: ms(COPY_DEDUPE_WINDOW_MS),
            storage: stream::StorageType::File,
            num_replicas: 1,
            ..Default::default()
        };
        for config in [events, redeliver, dlq] {
            let name = config.name.clone();
            self.js.create_or_update_stream(config).await.map_err(|err| self.fail(&format!("stream {name}"), err))?;
        }
        Ok(())
    }

    async fn stream(&self, name: &str) -> Result<jetstream::stream::Stream<()>, BusError> {
        self.js.get_stream_no_info(name).await.map_err(|err| self.fail("stream", err))
    }

    /// The NATS consumer of a group on `stream`, `None` when absent.
    async fn consumer_info(&self, stream: &str, name: &str) -> Result<Option<consumer::Info>, BusError> {
        let stream = self.stream(stream).await?;
        match stream.consumer_info(name).await {
            Ok(info) => Ok(Some(info)),
            Err(err) => match err.kind() {
                jetstream::context::ConsumerInfoErrorKind::NotFound => Ok(None),
                jetstream::context::ConsumerInfoErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND =>
                {
                    Ok(None)
                }
                _ => Err(self.fail("consumer info", err)),
            },
        }
    }

    fn pull_config(
        name: &str,
        spec: &StoredSpec,
        filter: String,
        deliver: consumer::DeliverPolicy,
    ) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            description: Some(spec.to_description()),
            deliver_policy: deliver,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: ms(spec.ack_wait_ms),
            // The kernel dead-letters (see the module doc); the server does not give up first.
            max_deliver: NATS_DELIVERIES_MAX,
            filter_subject: filter,
            max_ack_pending: i64::from(spec.pending_max),
            backoff: spec.backoff_ms.iter().map(|v| ms(*v)).collect(),
            ..Default::default()
        }
    }

    async fn tenant_consumer_names(&self, tenant: &TenantId) -> Result<Vec<String>, BusError> {
        let prefix = layout::consumer_name_prefix(tenant);
        let stream = self.stream(&self.layout.events).await?;
        let mut names = stream.consumer_names();
        let mut out = Vec::new();
        while let Some(name) = names.next().await {
            let name = name.map_err(|err| self.fail("consumer names", err))?;
            if name.starts_with(&prefix) {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// How many dead letters are stored under `subject` (a DLQ subject or filter).
    async fn dlq_count(&self, subject: &str) -> Result<u64, BusError> {
        let stream = self.stream(&self.layout.dlq).await?;
        let mut subjects =
            stream.info_builder().subjects(subject).fetch().await.map_err(|err| self.fail("dlq info", err))?;
        let mut count = 0;
        while let Some(entry) = subjects.next().await {
            let (_, n) = entry.map_err(|err| self.fail("dlq info", err))?;
            count += n as u64;
        }
        Ok(count)
    }

    /// The group's state from its main consumer's info.
    async fn group_info(&self, tenant: &TenantId, group: &str, main: consumer::Info) -> Result<ConsumerInfo, BusError> {
        let spec = StoredSpec::from_description(main.config.description.as_deref())?.spec(tenant, group);
        let name = layout::consumer_name(tenant, group);
        let redeliver = self.consumer_info(&self.layout.redeliver, &name).await?;
        let (rd_pending, rd_backlog) =
            redeliver.map(|info| (info.num_ack_pending as u64, info.num_pending)).unwrap_or_default();
        let dead_letters = self.dlq_count(&self.layout.dlq_subject(tenant, Some(group))).await?;
        Ok(ConsumerInfo {
            spec,
            pending: main.num_ack_pending as u64 + rd_pending,
            backlog: main.num_pending + rd_backlog,
            dead_letters,
            created_at_ms: (main.created.unix_timestamp_nanos() / 1_000_000) as i64,
        })
    }

    /// The group's settings, or `NotFound`.
    async fn group_spec(&self, tenant: &TenantId, group: &str) -> Result<ConsumerSpec, BusError> {
        let name = layout::consumer_name(tenant, group);
        let info = self.consumer_info(&self.layout.events, &name).await?.ok_or(BusError::NotFound("consumer"))?;
        Ok(StoredSpec::from_description(info.config.description.as_deref())?.spec(tenant, group))
    }

    /// Publishes one message and waits for the server to store it.
    async fn publish_one(&self, subject: String, headers: HeaderMap, payload: Vec<u8>) -> Result<u64, BusError> {
        let ack = self
            .js
            .publish_with_headers(subject, headers, Bytes::from(payload))
            .await
            .map_err(|err| self.fail("publish", err))?
            .await
            .map_err(|err| self.fail("publish ack", err))?;
        Ok(ack.sequence)
    }

    /// Moves `event` (delivered `deliveries` times to `group`) to the group's dead-letter
    /// queue. `source` names the delivered message (`<stream>/<seq>`) so that a retry after a
    /// crash is deduplicated by the server.
    async fn dead_letter_event(
        &self,
        tenant: &TenantId,
        group: &str,
        event: &StoredEvent,
        source: &str,
        deliveries: u32,
        reason: &str,
    ) -> Result<(), BusError> {
        let mut headers = layout::copy_headers(event);
        let msg_id = format!("dlq/{}/{source}", layout::consumer_name(tenant, group));
        headers.insert(layout::HEADER_MSG_ID, msg_id.as_str());
        headers.insert(layout::HEADER_CONSUMER, group);
        headers.insert(layout::HEADER_DELIVERIES, deliveries.to_string().as_str());
        headers.insert(layout::HEADER_REASON, reason);
        headers.insert(layout::HEADER_AT_MS, now_ms().to_string().as_str());
        self.publish_one(self.layout.dlq_subject(tenant, Some(group)), headers, event.payload.clone()).await?;
        self.trim_dead_letters(tenant).await
    }

    /// Drops the tenant's oldest dead letters past `dead_letters_per_tenant_max`.
    async fn trim_dead_letters(&self, tenant: &TenantId) -> Result<(), BusError> {
        let filter = self.layout.dlq_subject(tenant, None);
        let count = self.dlq_count(&filter).await?;
        let excess = count.saturating_sub(self.config.bus.dead_letters_per_tenant_max);
        if excess == 0 {
            return Ok(());
        }
        let stream = self.stream(&self.layout.dlq).await?;
        for _ in 0..excess {
            match stream.get_first_raw_message_by_subject(&filter, 0).await {
                Ok(oldest) => {
                    stream.delete_message(oldest.sequence).await.map_err(|err| self.fail("dlq trim", err))?;
                }
                Err(_) => break,
            }
        }
        tracing::warn!(tenant = %tenant, dropped = excess, "bus.nats: oldest dead letters dropped past the tenant's limit");
        Ok(())
    }

    /// The event a delivery carries.
    fn delivered_event(
        &self,
        tenant: &TenantId,
        redelivered: bool,
        message: &jetstream::Message,
        seq: u64,
    ) -> Result<StoredEvent, BusError> {
        if redelivered {
            layout::event_from_copy(tenant, message.headers.as_ref(), &message.payload)
        } else {
            layout::event_from_stream(
                &self.layout,
                message.subject.as_str(),
                seq,
                message.headers.as_ref(),
                &message.payload,
            )
        }
    }

    /// Turns fetched messages into deliveries, dead-lettering those past `deliveries_max`.
    async fn deliveries(
        &self,
        spec: &ConsumerSpec,
        stream: &str,
        messages: Vec<jetstream::Message>,
        out: &mut Vec<Delivery>,
    ) -> Result<(), BusError> {
        let redelivered = stream == self.layout.redeliver;
        for message in messages {
            let (delivered, seq) = match message.info() {
                Ok(info) => (u32::try_from(info.delivered).unwrap_or(u32::MAX), info.stream_sequence),
                Err(err) => return Err(backend("delivery without ack subject", err)),
            };
            let event = self.delivered_event(&spec.tenant, redelivered, &message, seq)?;
            if delivered > spec.deliveries_max {
                let source = format!("{stream}/{seq}");
                self.dead_letter_event(
                    &spec.tenant,
                    &spec.name,
                    &event,
                    &source,
                    spec.deliveries_max,
                    "deliveries_max",
                )
                .await?;
                message.double_ack().await.map_err(|err| self.fail("ack dead letter", err))?;
                continue;
            }
            let token = message.reply.as_ref().map(|s| s.to_string()).unwrap_or_default();
            self.remember(stream, &layout::consumer_name(&spec.tenant, &spec.name), seq, delivered, false);
            out.push(Delivery {
                event,
                delivery: delivered,
                token,
                ack_deadline_ms: now_ms().saturating_add(ack_deadline_ms(spec, delivered) as i64),
            });
        }
        Ok(())
    }

    /// Messages available now (no wait) from a group's consumer on `stream`.
    async fn pull_now(&self, stream: &str, name: &str, max: usize) -> Result<Vec<jetstream::Message>, BusError> {
        let consumer: consumer::PullConsumer = match self.js.get_consumer_from_stream(name, stream).await {
            Ok(consumer) => consumer,
            Err(err) => match err.kind() {
                stream::ConsumerErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND =>
                {
                    return Ok(Vec::new());
                }
                _ => return Err(self.fail("consumer", err)),
            },
        };
        let max = max.min(room(&consumer));
        if max == 0 {
            return Ok(Vec::new());
        }
        let batch = consumer.fetch().max_messages(max).messages().await.map_err(|err| self.fail("fetch", err))?;
        Ok(collect(batch).await)
    }

    /// Waits up to `wait` for one message of the group's main consumer (`None`: the group
    /// has `pending_max` deliveries outstanding).
    async fn pull_wait(&self, name: &str, wait: Duration) -> Result<Option<Vec<jetstream::Message>>, BusError> {
        let consumer: consumer::PullConsumer = self
            .js
            .get_consumer_from_stream(name, &self.layout.events)
            .await
            .map_err(|err| self.fail("consumer", err))?;
        if room(&consumer) == 0 {
            return Ok(None);
        }
        let batch =
            consumer.batch().max_messages(1).expires(wait).messages().await.map_err(|err| self.fail("fetch", err))?;
        Ok(Some(collect(batch).await))
    }

    /// The sequence a group of `tenant` on `filter` starting at `at_ms` starts from: its
    /// first event published (by the event's own time) at or after `at_ms`, else the next
    /// sequence. Only the events the server received from [`START_TIME_SKEW_MS`] before
    /// `at_ms` on are looked at.
    async fn first_seq_at(&self, tenant: &TenantId, filter: &str, at_ms: i64) -> Result<u64, BusError> {
        let stream = self.stream(&self.layout.events).await?;
        let last = stream.get_info().await.map_err(|err| self.fail("stream info", err))?.state.last_sequence;
        let from_nanos = i128::from(at_ms.saturating_sub(START_TIME_SKEW_MS).max(0)) * 1_000_000;
        let start_time = async_nats::datetime::from_nanos(from_nanos).map_err(|err| backend("start time", err))?;
        let mut found = None;
        let mut seen = last;
        let mut failure = None;
        let deliver = consumer::DeliverPolicy::ByStartTime { start_time };
        self.scan(&self.layout.events, self.layout.event_subject(tenant, filter), deliver, |seq, message| {
            seen = seen.max(seq);
            match layout::header(message.headers.as_ref(), layout::HEADER_TIME_MS).map(str::parse::<i64>) {
                Some(Ok(time_ms)) if time_ms >= at_ms => {
                    found = Some(seq);
                    false
                }
                Some(Ok(_)) => true,
                _ => {
                    failure = Some(backend("stored event", format!("seq {seq} has no valid time")));
                    false
                }
            }
        })
        .await?;
        if let Some(err) = failure {
            return Err(err);
        }
        Ok(found.unwrap_or(seen + 1))
    }

    /// Stored messages of `stream` matching `filter` from `deliver` on, passed to `keep`
    /// in sequence order until it returns false, through an ephemeral consumer.
    async fn scan(
        &self,
        stream: &str,
        filter: String,
        deliver: consumer::DeliverPolicy,
        mut keep: impl FnMut(u64, &jetstream::Message) -> bool,
    ) -> Result<(), BusError> {
        let config = consumer::pull::Config {
            deliver_policy: deliver,
            ack_policy: consumer::AckPolicy::None,
            filter_subject: filter,
            inactive_threshold: ms(SCAN_CONSUMER_IDLE_MS),
            memory_storage: true,
            ..Default::default()
        };
        let consumer: consumer::PullConsumer =
            self.js.create_consumer_on_stream(config, stream).await.map_err(|err| self.fail("scan consumer", err))?;
        let name = consumer.cached_info().name.clone();
        let result = async {
            loop {
                let batch = consumer
                    .fetch()
                    .max_messages(SCAN_BATCH_EVENTS_MAX)
                    .messages()
                    .await
                    .map_err(|err| self.fail("scan", err))?;
                let messages = collect(batch).await;
                if messages.is_empty() {
                    return Ok(());
                }
                for message in &messages {
                    let info = message.info().map_err(|err| backend("scan", err))?;
                    if !keep(info.stream_sequence, message) || info.pending == 0 {
                        return Ok(());
                    }
                }
            }
        }
        .await;
        if let Ok(stream) = self.stream(stream).await {
            let _ = stream.delete_consumer(&name).await;
        }
        result
    }

    fn dead_letter_from(
        &self,
        tenant: &TenantId,
        message: &jetstream::message::StreamMessage,
    ) -> Result<Option<DeadLetter>, BusError> {
        match self.layout.split("dlq", message.subject.as_str()) {
            Some((t, _)) if t == tenant.as_str() => {}
            _ => return Ok(None),
        }
        let headers = Some(&message.headers);
        let event = layout::event_from_copy(tenant, headers, &message.payload)?;
        let num = |name: &str| layout::header(headers, name).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        Ok(Some(DeadLetter {
            id: message.sequence,
            consumer: layout::header(headers, layout::HEADER_CONSUMER).unwrap_or_default().to_owned(),
            event,
            deliveries: u32::try_from(num(layout::HEADER_DELIVERIES)).unwrap_or(0),
            reason: layout::header(headers, layout::HEADER_REASON).unwrap_or_default().to_owned(),
            at_ms: num(layout::HEADER_AT_MS),
        }))
    }

    /// A message of `stream` by sequence; `None` when there is none.
    async fn get_message(&self, stream: &str, seq: u64) -> Result<Option<jetstream::message::StreamMessage>, BusError> {
        let stream = self.stream(stream).await?;
        match stream.get_raw_message(seq).await {
            Ok(message) => Ok(Some(message)),
            Err(err) => match err.kind() {
                stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
                stream::LastRawMessageErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND =>
                {
                    Ok(None)
                }
                _ => Err(self.fail("get message", err)),
            },
        }
    }

    /// The original event a delivery token names, read back from its stream.
    async fn token_event(&self, tenant: &TenantId, token: &AckToken<'_>) -> Result<StoredEvent, BusError> {
        let message =
            self.get_message(token.stream, token.stream_seq).await?.ok_or_else(|| stale("the event is gone"))?;
        if token.stream == self.layout.redeliver {
            layout::event_from_copy(tenant, Some(&message.headers), &message.payload)
        } else {
            layout::event_from_stream(
                &self.layout,
                message.subject.as_str(),
                message.sequence,
                Some(&message.headers),
                &message.payload,
            )
        }
    }
}

/// How many more deliveries a consumer may have outstanding. Asking the server for more than
/// this makes some server versions redeliver outstanding messages at once.
fn room(consumer: &consumer::PullConsumer) -> usize {
    let info = consumer.cached_info();
    let max = info.config.max_ack_pending;
    if max <= 0 {
        return usize::MAX;
    }
    usize::try_from(max).unwrap_or(usize::MAX).saturating_sub(info.num_ack_pending)
}

/// Every message of a pull batch; a status that ends it early (no messages, max ack pending
/// reached, request expired) ends it like its last message.
async fn collect(mut batch: consumer::pull::Batch) -> Vec<jetstream::Message> {
    let mut out = Vec::new();
    while let Some(item) = batch.next().await {
        match item {
            Ok(message) => out.push(message),
            Err(err) => {
                tracing::debug!(error = %err, "bus.nats: pull ended");
                break;
            }
        }
    }
    out
}

#[async_trait]
impl Bus for NatsBus {
    fn backend(&self) -> &'static str {
        "nats"
    }

    async fn publish(&self, events: &[EventIn]) -> Result<Vec<Published>, BusError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        if events.len() > nops_core::bus::BATCH_EVENTS_MAX {
            return Err(BusError::LimitExceeded(format!(
                "a batch has at most {} events",
                nops_core::bus::BATCH_EVENTS_MAX
            )));
        }
        // The batch's whole share of in-flight acks, taken at once.
        let _permits = self
            .publish_permits
            .acquire_many(events.len() as u32)
            .await
            .map_err(|err| backend("publish permits", err))?;
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let headers = layout::event_headers(&event.tenant, &event.id, &event.source, event.time_ms);
            let subject = self.layout.event_subject(&event.tenant, &event.subject);
            let ack = self
                .js
                .publish_with_headers(subject, headers, Bytes::copy_from_slice(&event.payload))
                .await
                .map_err(|err| self.fail("publish", err))?;
            acks.push(ack);
        }
        let mut out = Vec::with_capacity(acks.len());
        for ack in acks {
            let ack = ack.await.map_err(|err| self.fail("publish ack", err))?;
            out.push(if ack.duplicate {
                Published::Duplicate { seq: ack.sequence }
            } else {
                Published::Accepted { seq: ack.sequence }
            });
        }
        Ok(out)
    }

    async fn put_consumer(&self, spec: &ConsumerSpec) -> Result<ConsumerInfo, BusError> {
        let name = layout::consumer_name(&spec.tenant, &spec.name);
        let mut stored = StoredSpec::of(spec);
        let existing = self.consumer_info(&self.layout.events, &name).await?;
        let deliver = match &existing {
            Some(info) => {
                let old = StoredSpec::from_description(info.config.description.as_deref())?;
                if old.filter != spec.filter {
                    return Err(BusError::Conflict(format!(
                        "consumer group {} filters {}; its filter cannot change",
                        spec.name, old.filter
                    )));
                }
                stored.start = old.start;
                info.config.deliver_policy
            }
            None => {
                let count = self.tenant_consumer_names(&spec.tenant).await?.len();
                if count >= self.config.bus.consumers_per_tenant_max as usize {
                    return Err(BusError::LimitExceeded(format!(
                        "a tenant has at most {} consumer groups",
                        self.config.bus.consumers_per_tenant_max
                    )));
                }
                match spec.start {
                    StartAt::New => consumer::DeliverPolicy::New,
                    StartAt::All => consumer::DeliverPolicy::All,
                    StartAt::Seq(seq) => consumer::DeliverPolicy::ByStartSequence { start_sequence: seq.max(1) },
                    StartAt::TimeMs(at) => consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: self.first_seq_at(&spec.tenant, &spec.filter, at).await?,
                    },
                }
            }
        };
        // The redeliver consumer first: the main one is what makes the group exist.
        let rd = Self::pull_config(
            &name,
            &stored,
            self.layout.redeliver_subject(&spec.tenant, &spec.name),
            consumer::DeliverPolicy::All,
        );
        self.js
            .create_consumer_on_stream(rd, &self.layout.redeliver)
            .await
            .map_err(|err| self.fail("create redeliver consumer", err))?;
        let main = Self::pull_config(&name, &stored, self.layout.event_subject(&spec.tenant, &spec.filter), deliver);
        let created: consumer::PullConsumer = self
            .js
            .create_consumer_on_stream(main, &self.layout.events)
            .await
            .map_err(|err| self.fail("create consumer", err))?;
        self.group_info(&spec.tenant, &spec.name, created.cached_info().clone()).await
    }

    async fn get_consumer(&self, tenant: &TenantId, name: &str) -> Result<Option<ConsumerInfo>, BusError> {
        let nats_name = layout::consumer_name(tenant, name);
        match self.consumer_info(&self.layout.events, &nats_name).await? {
            Some(info) => Ok(Some(self.group_info(tenant, name, info).await?)),
            None => Ok(None),
        }
    }

    async fn list_consumers(&self, tenant: &TenantId) -> Result<Vec<ConsumerInfo>, BusError> {
        let prefix = layout::consumer_name_prefix(tenant);
        let mut out = Vec::new();
        for nats_name in self.tenant_consumer_names(tenant).await? {
            let group = nats_name[prefix.len()..].to_owned();
            if let Some(info) = self.consumer_info(&self.layout.events, &nats_name).await? {
                out.push(self.group_info(tenant, &group, info).await?);
            }
        }
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(out)
    }

    async fn delete_consumer(&self, tenant: &TenantId, name: &str) -> Result<bool, BusError> {
        let nats_name = layout::consumer_name(tenant, name);
        if self.consumer_info(&self.layout.events, &nats_name).await?.is_none() {
            return Ok(false);
        }
        let events = self.stream(&self.layout.events).await?;
        events.delete_consumer(&nats_name).await.map_err(|err| self.fail("delete consumer", err))?;
        let redeliver = self.stream(&self.layout.redeliver).await?;
        if self.consumer_info(&self.layout.redeliver, &nats_name).await?.is_some() {
            redeliver.delete_consumer(&nats_name).await.map_err(|err| self.fail("delete consumer", err))?;
        }
        redeliver
            .purge()
            .filter(self.layout.redeliver_subject(tenant, name))
            .await
            .map_err(|err| self.fail("purge redeliveries", err))?;
        let dlq = self.stream(&self.layout.dlq).await?;
        dlq.purge()
            .filter(self.layout.dlq_subject(tenant, Some(name)))
            .await
            .map_err(|err| self.fail("purge dead letters", err))?;
        Ok(true)
    }

    async fn fetch(
        &self,
        tenant: &TenantId,
        consumer: &str,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BusError> {
        let spec = self.group_spec(tenant, consumer).await?;
        let name = layout::consumer_name(tenant, consumer);
        let max = max.clamp(1, FETCH_EVENTS_MAX) as usize;
        let mut out = Vec::new();
        // Redeliveries for this group first, then the events in sequence order.
        let redeliver = self.layout.redeliver.clone();
        let messages = self.pull_now(&redeliver, &name, max).await?;
        self.deliveries(&spec, &redeliver, messages, &mut out).await?;
        if out.len() < max {
            let events = self.layout.events.clone();
            let messages = self.pull_now(&events, &name, max - out.len()).await?;
            let got = !messages.is_empty();
            self.deliveries(&spec, &events, messages, &mut out).await?;
            if !got && out.is_empty() && !wait.is_zero() {
                let deadline = tokio::time::Instant::now() + wait;
                // Long-poll for one, then take whatever else is ready with it.
                while out.is_empty() {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left < Duration::from_millis(1) {
                        break;
                    }
                    let Some(first) = self.pull_wait(&name, left).await? else {
                        tokio::time::sleep(left.min(ms(FULL_GROUP_POLL_MS))).await;
                        continue;
                    };
                    if first.is_empty() {
                        break;
                    }
                    self.deliveries(&spec, &events, first, &mut out).await?;
                    if max > out.len() {
                        let more = self.pull_now(&events, &name, max - out.len()).await?;
                        self.deliveries(&spec, &events, more, &mut out).await?;
                    }
                }
            }
        }
        Ok(out)
    }

    async fn ack(&self, tenant: &TenantId, consumer: &str, token: &str, kind: AckKind) -> Result<(), BusError> {
        let parsed = layout::parse_token(token).ok_or_else(|| stale("malformed delivery token"))?;
        let name = layout::consumer_name(tenant, consumer);
        let of_group =
            parsed.consumer == name && (parsed.stream == self.layout.events || parsed.stream == self.layout.redeliver);
        if !of_group {
            return Err(stale("the token names another consumer group"));
        }
        if self.known_stale(&parsed) {
            return Err(stale("the delivery was settled or delivered again"));
        }
        let info = self.consumer_info(parsed.stream, &name).await?.ok_or(BusError::NotFound("consumer"))?;
        if parsed.stream_seq <= info.ack_floor.stream_sequence || info.num_ack_pending == 0 {
            return Err(stale("the delivery was already acked"));
        }
        if parsed.stream_seq > info.delivered.stream_sequence {
            return Err(stale("no such delivery"));
        }
        let spec = StoredSpec::from_description(info.config.description.as_deref())?.spec(tenant, consumer);
        let reply = async_nats::jetstream::message::Acker::new(self.js.clone(), Some(Subject::from(token)));
        let dead = match kind {
            AckKind::Term => Some("terminated"),
            AckKind::Nack { .. } if parsed.delivered >= spec.deliveries_max => Some("deliveries_max"),
            _ => None,
        };
        let nats_kind = match (kind, dead) {
            (_, Some(reason)) => {
                let event = self.token_event(tenant, &parsed).await?;
                let source = format!("{}/{}", parsed.stream, parsed.stream_seq);
                let deliveries = parsed.delivered.min(spec.deliveries_max);
                self.dead_letter_event(tenant, consumer, &event, &source, deliveries, reason).await?;
                jetstream::AckKind::Ack
            }
            (AckKind::Ack, None) => jetstream::AckKind::Ack,
            (AckKind::InProgress, None) => jetstream::AckKind::Progress,
            (AckKind::Nack { delay_ms: 0 }, None) => jetstream::AckKind::Nak(None),
            (AckKind::Nack { delay_ms }, None) => jetstream::AckKind::Nak(Some(ms(delay_ms))),
            (AckKind::Term, None) => jetstream::AckKind::Term,
        };
        reply.double_ack_with(nats_kind).await.map_err(|err| self.fail("ack", err))?;
        let settled = !matches!(kind, AckKind::InProgress);
        self.remember(parsed.stream, parsed.consumer, parsed.stream_seq, parsed.delivered, settled);
        Ok(())
    }

    async fn read(&self, tenant: &TenantId, range: &ReadRange) -> Result<Vec<StoredEvent>, BusError> {
        let limit = range.limit.min(READ_EVENTS_MAX) as usize;
        let mut out = Vec::new();
        if limit == 0 || range.to_seq.is_some_and(|to| to < range.from_seq.unwrap_or(0)) {
            return Ok(out);
        }
        let filter = self.layout.event_subject(tenant, range.filter.as_deref().unwrap_or(">"));
        let mut failure = None;
        let deliver = match range.from_seq {
            Some(seq) if seq > 1 => consumer::DeliverPolicy::ByStartSequence { start_sequence: seq },
            _ => consumer::DeliverPolicy::All,
        };
        self.scan(&self.layout.events, filter, deliver, |seq, message| {
            if range.to_seq.is_some_and(|to| seq > to) {
                return false;
            }
            match layout::event_from_stream(
                &self.layout,
                message.subject.as_str(),
                seq,
                message.headers.as_ref(),
                &message.payload,
            ) {
                Ok(event) => {
                    let after_from = range.from_ms.is_none_or(|from| event.time_ms >= from);
                    let before_to = range.to_ms.is_none_or(|to| event.time_ms <= to);
                    if after_from && before_to {
                        out.push(event);
                    }
                    out.len() < limit
                }
                Err(err) => {
                    failure = Some(err);
                    false
                }
            }
        })
        .await?;
        match failure {
            Some(err) => Err(err),
            None => Ok(out),
        }
    }

    async fn requeue(&self, tenant: &TenantId, consumer: &str, seqs: &[u64]) -> Result<u64, BusError> {
        if seqs.len() > READ_EVENTS_MAX as usize {
            return Err(BusError::LimitExceeded(format!("a requeue takes at most {READ_EVENTS_MAX} events")));
        }
        self.group_spec(tenant, consumer).await?;
        let subject = self.layout.redeliver_subject(tenant, consumer);
        let mut queued = 0;
        for seq in seqs {
            let Some(message) = self.get_message(&self.layout.events, *seq).await? else { continue };
            if self.layout.split("ev", message.subject.as_str()).is_none_or(|(t, _)| t != tenant.as_str()) {
                continue;
            }
            let event = layout::event_from_stream(
                &self.layout,
                message.subject.as_str(),
                message.sequence,
                Some(&message.headers),
                &message.payload,
            )?;
            self.publish_one(subject.clone(), layout::copy_headers(&event), event.payload).await?;
            queued += 1;
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
        let limit = limit.min(READ_EVENTS_MAX) as usize;
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let filter = self.layout.dlq_subject(tenant, consumer);
        let stream = self.stream(&self.layout.dlq).await?;
        let mut next = after.saturating_add(1);
        while out.len() < limit {
            let message = match stream.get_first_raw_message_by_subject(&filter, next).await {
                Ok(message) => message,
                Err(err) => match err.kind() {
                    stream::LastRawMessageErrorKind::NoMessageFound => break,
                    stream::LastRawMessageErrorKind::JetStream(e)
                        if e.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND =>
                    {
                        break;
                    }
                    _ => return Err(self.fail("dead letters", err)),
                },
            };
            next = message.sequence + 1;
            if let Some(letter) = self.dead_letter_from(tenant, &message)? {
                out.push(letter);
            }
        }
        Ok(out)
    }

    async fn dead_letter(&self, tenant: &TenantId, id: u64) -> Result<Option<DeadLetter>, BusError> {
        match self.get_message(&self.layout.dlq, id).await? {
            Some(message) => self.dead_letter_from(tenant, &message),
            None => Ok(None),
        }
    }

    async fn redrive(&self, tenant: &TenantId, ids: &[u64]) -> Result<u64, BusError> {
        if ids.len() > READ_EVENTS_MAX as usize {
            return Err(BusError::LimitExceeded(format!("a re-drive takes at most {READ_EVENTS_MAX} dead letters")));
        }
        let dlq = self.stream(&self.layout.dlq).await?;
        let mut redriven = 0;
        for id in ids {
            let Some(letter) = self.dead_letter(tenant, *id).await? else { continue };
            let mut headers = layout::copy_headers(&letter.event);
            headers.insert(layout::HEADER_MSG_ID, format!("redrive/{}/{id}", self.layout.dlq).as_str());
            let subject = self.layout.redeliver_subject(tenant, &letter.consumer);
            self.publish_one(subject, headers, letter.event.payload).await?;
            dlq.delete_message(*id).await.map_err(|err| self.fail("delete dead letter", err))?;
            redriven += 1;
        }
        Ok(redriven)
    }

    async fn purge_dead_letters(
        &self,
        tenant: &TenantId,
        consumer: Option<&str>,
        ids: Option<&[u64]>,
    ) -> Result<u64, BusError> {
        let dlq = self.stream(&self.layout.dlq).await?;
        match ids {
            Some(ids) => {
                if ids.len() > READ_EVENTS_MAX as usize {
                    return Err(BusError::LimitExceeded(format!(
                        "a purge takes at most {READ_EVENTS_MAX} dead letters"
                    )));
                }
                let mut purged = 0;
                for id in ids {
                    let Some(letter) = self.dead_letter(tenant, *id).await? else { continue };
                    if consumer.is_some_and(|c| c != letter.consumer) {
                        continue;
                    }
                    if dlq.delete_message(*id).await.map_err(|err| self.fail("delete dead letter", err))? {
                        purged += 1;
                    }
                }
                Ok(purged)
            }
            None => {
                let filter = match consumer {
                    Some(group) => self.layout.dlq_subject(tenant, Some(group)),
                    None => self.layout.dlq_subject(tenant, None),
                };
                let response = dlq.purge().filter(filter).await.map_err(|err| self.fail("purge dead letters", err))?;
                Ok(response.purged)
            }
        }
    }

    async fn ping(&self) -> Result<(), BusError> {
        // A JetStream round trip on the kernel's own stream (the account-info request's
        // answer from a 2.9 server does not decode in async-nats, so it cannot serve as probe).
        let mut stream = self
            .js
            .get_stream(&self.layout.events)
            .await
            .map_err(|err| BusError::Unavailable(format!("ping: {err}")))?;
        stream.info().await.map(|_| ()).map_err(|err| BusError::Unavailable(format!("ping: {err}")))
    }
}
