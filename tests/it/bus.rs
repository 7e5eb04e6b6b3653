//! The bus conformance suite: every backend passes the same trait-level tests.
//!
//! Backends: the embedded bus on SQLite (always), on PostgreSQL (`NOPS_TEST_DATABASE_URL`) and
//! NATS JetStream (`NOPS_TEST_NATS_URL`, required under `CI=true`). Each test builds its buses
//! with [`buses`] and runs the same steps on each; every case has its own database or stream
//! prefix, so tests run in parallel. Times are real (JetStream keeps real time), so ack
//! deadlines are short and assertions about waiting say "at least", never "at most".

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nops_core::bus::{
    AckKind, Bus, BusConfig, BusError, ConsumerSpec, Delivery, EventIn, Published, ReadRange, StartAt, StoredEvent,
};
use nops_core::clock::{Clock, SystemClock};
use nops_core::tenant::TenantId;
use nops_store::bus::EmbeddedBus;
use nops_store::{SqlStore, StoreConfig};

use crate::support::{Backend, TestDb, backends, nats_url};

/// What a case must tear down when the test ends.
enum Cleanup {
    Store(SqlStore, TestDb),
    Nats(Box<nops_bus::NatsBus>),
}

/// One backend under test.
struct Case {
    name: String,
    bus: Arc<dyn Bus>,
    cleanup: Cleanup,
}

impl Case {
    async fn finish(self) {
        match self.cleanup {
            Cleanup::Store(store, db) => {
                store.close().await;
                drop(db);
            }
            Cleanup::Nats(bus) => bus.destroy().await.expect("destroy the test streams"),
        }
    }
}

async fn open_store(url: &str) -> SqlStore {
    SqlStore::open(&StoreConfig { database_url: url.to_string(), ..StoreConfig::default() }).await.expect("store opens")
}

/// A fresh embedded bus on `backend`, with its store (to open a second kernel on it).
async fn embedded(backend: Backend, config: BusConfig) -> (EmbeddedBus, SqlStore, TestDb) {
    let db = TestDb::new(backend).await;
    let store = open_store(&db.url).await;
    let bus = EmbeddedBus::new(&store, config, Arc::new(SystemClock));
    (bus, store, db)
}

/// Every bus backend this run can test, each fresh.
async fn buses(config: BusConfig) -> Vec<Case> {
    let mut cases = Vec::new();
    for backend in backends() {
        let (bus, store, db) = embedded(backend, config.clone()).await;
        let name = format!("embedded/{backend:?}");
        cases.push(Case { name, bus: Arc::new(bus), cleanup: Cleanup::Store(store, db) });
    }
    if let Some(url) = nats_url() {
        let prefix = format!("T{:016X}", rand::random::<u64>());
        let bus = nops_bus::NatsBus::connect(nops_bus::NatsBusConfig { url, prefix, bus: config })
            .await
            .expect("connect to the test NATS server");
        cases.push(Case { name: "nats".into(), bus: Arc::new(bus.clone()), cleanup: Cleanup::Nats(Box::new(bus)) });
    }
    cases
}

fn tenant(name: &str) -> TenantId {
    name.parse().expect("tenant id")
}

fn now_ms() -> i64 {
    SystemClock.now_ms()
}

fn event(tenant_id: &TenantId, id: &str, subject: &str) -> EventIn {
    EventIn {
        id: id.to_string(),
        tenant: tenant_id.clone(),
        subject: subject.to_string(),
        payload: format!("{{\"id\":\"{id}\"}}").into_bytes(),
        source: "test".into(),
        time_ms: now_ms(),
    }
}

fn spec(tenant_id: &TenantId, name: &str, filter: &str) -> ConsumerSpec {
    ConsumerSpec {
        tenant: tenant_id.clone(),
        name: name.to_string(),
        filter: filter.to_string(),
        ack_wait_ms: 30_000,
        deliveries_max: 5,
        backoff_ms: vec![],
        start: StartAt::All,
        pending_max: 1_000,
    }
}

async fn publish(case: &Case, events: &[EventIn]) -> Vec<Published> {
    case.bus.publish(events).await.unwrap_or_else(|e| panic!("{}: publish: {e}", case.name))
}

fn seqs(published: &[Published]) -> Vec<u64> {
    published
        .iter()
        .map(|p| match p {
            Published::Accepted { seq } => *seq,
            Published::Duplicate { seq } => panic!("unexpected duplicate of {seq}"),
        })
        .collect()
}

async fn put(case: &Case, spec: &ConsumerSpec) {
    case.bus.put_consumer(spec).await.unwrap_or_else(|e| panic!("{}: put_consumer: {e}", case.name));
}

/// Fetches until `n` deliveries came or `within` passed.
async fn fetch_n(case: &Case, tenant_id: &TenantId, group: &str, n: usize, within: Duration) -> Vec<Delivery> {
    let until = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let max = u32::try_from(n - out.len()).expect("small");
        let got = case
            .bus
            .fetch(tenant_id, group, max, left)
            .await
            .unwrap_or_else(|e| panic!("{}: fetch {group}: {e}", case.name));
        out.extend(got);
    }
    out
}

/// Fetches what is ready now (a short wait so an asynchronous backend can answer).
async fn fetch_ready(case: &Case, tenant_id: &TenantId, group: &str, max: u32) -> Vec<Delivery> {
    case.bus
        .fetch(tenant_id, group, max, Duration::from_millis(250))
        .await
        .unwrap_or_else(|e| panic!("{}: fetch {group}: {e}", case.name))
}

async fn ack(case: &Case, tenant_id: &TenantId, group: &str, delivery: &Delivery, kind: AckKind) {
    case.bus
        .ack(tenant_id, group, &delivery.token, kind)
        .await
        .unwrap_or_else(|e| panic!("{}: ack {kind:?} of seq {}: {e}", case.name, delivery.event.seq));
}

fn ids(deliveries: &[Delivery]) -> Vec<&str> {
    deliveries.iter().map(|d| d.event.id.as_str()).collect()
}

const SECOND: Duration = Duration::from_secs(1);
const LONG: Duration = Duration::from_secs(5);

#[tokio::test]
async fn each_subject_is_delivered_in_publish_order() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await {
        put(&case, &spec(&t, "all", "orders.>")).await;
        let mut batch = Vec::new();
        for i in 0..20 {
            let subject = if i % 2 == 0 { "orders.created" } else { "orders.paid" };
            batch.push(event(&t, &format!("e{i}"), subject));
        }
        let published = seqs(&publish(&case, &batch[..10]).await);
        let more = seqs(&publish(&case, &batch[10..]).await);
        let all: Vec<u64> = published.into_iter().chain(more).collect();
        assert!(all.windows(2).all(|w| w[0] < w[1]), "{}: sequences increase: {all:?}", case.name);
        let got = fetch_n(&case, &t, "all", 20, LONG).await;
        assert_eq!(got.len(), 20, "{}", case.name);
        for subject in ["orders.created", "orders.paid"] {
            let order: Vec<&str> =
                got.iter().filter(|d| d.event.subject == subject).map(|d| d.event.id.as_str()).collect();
            let expect: Vec<&str> = batch.iter().filter(|e| e.subject == subject).map(|e| e.id.as_str()).collect();
            assert_eq!(order, expect, "{}: {subject} in publish order", case.name);
        }
        assert!(got.iter().all(|d| d.delivery == 1), "{}: first deliveries", case.name);
        assert_eq!(got[0].event.payload, b"{\"id\":\"e0\"}".to_vec(), "{}: payload intact", case.name);
        case.finish().await;
    }
}

#[tokio::test]
async fn duplicates_within_the_window_are_answered_with_the_original_and_not_delivered_again() {
    let t = tenant("acme");
    let config = BusConfig { dedupe_window_ms: 1_000, ..BusConfig::default() };
    for case in buses(config).await {
        put(&case, &spec(&t, "g", "a.>")).await;
        let first = publish(&case, &[event(&t, "x", "a.b"), event(&t, "y", "a.b"), event(&t, "x", "a.b")]).await;
        let Published::Accepted { seq: x } = first[0] else { panic!("{}: {first:?}", case.name) };
        assert!(matches!(first[1], Published::Accepted { .. }), "{}: {first:?}", case.name);
        assert_eq!(first[2], Published::Duplicate { seq: x }, "{}: in-batch duplicate", case.name);
        let again = publish(&case, &[event(&t, "x", "a.b")]).await;
        assert!(matches!(again[0], Published::Duplicate { seq } if seq == x || seq == 0), "{}: {again:?}", case.name);
        // Another tenant's id space is its own.
        let other = publish(&case, &[event(&tenant("other"), "x", "a.b")]).await;
        assert!(matches!(other[0], Published::Accepted { .. }), "{}: {other:?}", case.name);

        let got = fetch_n(&case, &t, "g", 2, LONG).await;
        assert_eq!(ids(&got), vec!["x", "y"], "{}: each accepted once", case.name);
        assert!(fetch_ready(&case, &t, "g", 10).await.is_empty(), "{}: not delivered twice", case.name);

        tokio::time::sleep(Duration::from_millis(1_300)).await;
        let later = publish(&case, &[event(&t, "x", "a.b")]).await;
        let Published::Accepted { seq } = later[0] else { panic!("{}: past the window: {later:?}", case.name) };
        assert!(seq > x, "{}", case.name);
        case.finish().await;
    }
}

#[tokio::test]
async fn concurrent_publishers_each_get_their_own_answers_and_every_id_is_accepted_once() {
    let t = tenant("acme");
    for backend in backends() {
        let (bus, store, db) = embedded(backend, BusConfig::default()).await;
        let bus = Arc::new(bus);
        // 50 publishers, 20 events each in calls of two; every fifth event id is shared by all.
        let mut publishers = Vec::new();
        for p in 0..50 {
            let (bus, t) = (bus.clone(), t.clone());
            publishers.push(tokio::spawn(async move {
                let batch: Vec<EventIn> = (0..20)
                    .map(|i| {
                        let id = if i % 5 == 0 { format!("shared-{i}") } else { format!("p{p}-{i}") };
                        event(&t, &id, "a.b")
                    })
                    .collect();
                let mut answers = Vec::new();
                for call in batch.chunks(2) {
                    let published = bus.publish(call).await.expect("publish");
                    assert_eq!(published.len(), call.len(), "one answer per event");
                    answers.extend(call.iter().map(|e| e.id.clone()).zip(published));
                }
                answers
            }));
        }
        let mut accepted: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        let mut duplicates: Vec<(String, u64)> = Vec::new();
        for publisher in publishers {
            for (id, published) in publisher.await.expect("publisher") {
                match published {
                    Published::Accepted { seq } => {
                        assert!(accepted.insert(id.clone(), seq).is_none(), "{backend:?}: {id} accepted twice");
                    }
                    Published::Duplicate { seq } => duplicates.push((id, seq)),
                }
            }
        }
        assert_eq!(accepted.len(), 50 * 16 + 4, "{backend:?}: every distinct id accepted");
        assert_eq!(duplicates.len(), 49 * 4, "{backend:?}: every repeat answered as a duplicate");
        for (id, seq) in &duplicates {
            assert_eq!(accepted.get(id), Some(seq), "{backend:?}: {id} duplicate names the original");
        }
        let stored = bus.read(&t, &ReadRange { limit: 10_000, ..ReadRange::default() }).await.expect("read");
        assert_eq!(stored.len(), accepted.len(), "{backend:?}: each accepted event stored once");
        assert!(stored.windows(2).all(|w| w[0].seq < w[1].seq), "{backend:?}: read in sequence order");
        for e in &stored {
            assert_eq!(accepted.get(&e.id), Some(&e.seq), "{backend:?}: {} stored under its answer", e.id);
        }
        drop(bus);
        store.close().await;
        drop(db);
    }
}

#[tokio::test]
async fn an_unacked_delivery_comes_again_after_its_deadline() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await {
        put(&case, &ConsumerSpec { ack_wait_ms: 300, ..spec(&t, "g", "a.b") }).await;
        publish(&case, &[event(&t, "e1", "a.b")]).await;
        let before = now_ms();
        let first = fetch_n(&case, &t, "g", 1, LONG).await;
        assert_eq!(first.len(), 1, "{}", case.name);
        assert_eq!(first[0].delivery, 1, "{}", case.name);
        assert!(first[0].ack_deadline_ms >= before + 300, "{}: deadline after ack_wait", case.name);
        assert!(fetch_ready(&case, &t, "g", 10).await.is_empty(), "{}: not before the deadline", case.name);

        let second = fetch_n(&case, &t, "g", 1, LONG).await;
        assert_eq!(ids(&second), vec!["e1"], "{}", case.name);
        assert_eq!(second[0].delivery, 2, "{}", case.name);
        assert!(now_ms() >= before + 300, "{}: at least ack_wait later", case.name);
        // The first delivery is no longer current.
        let stale = case.bus.ack(&t, "g", &first[0].token, AckKind::Ack).await;
        assert!(matches!(stale, Err(BusError::StaleToken(_))), "{}: {stale:?}", case.name);
        ack(&case, &t, "g", &second[0], AckKind::Ack).await;
        let twice = case.bus.ack(&t, "g", &second[0].token, AckKind::Ack).await;
        assert!(matches!(twice, Err(BusError::StaleToken(_))), "{}: acked twice: {twice:?}", case.name);
        let junk = case.bus.ack(&t, "g", "not-a-token", AckKind::Ack).await;
        assert!(matches!(junk, Err(BusError::StaleToken(_))), "{}: {junk:?}", case.name);
        assert!(fetch_ready(&case, &t, "g", 10).await.is_empty(), "{}: acked for good", case.name);
        case.finish().await;
    }
}

#[tokio::test]
async fn deadlines_follow_the_backoff_schedule() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await {
        put(&case, &ConsumerSpec { backoff_ms: vec![200, 700], ..spec(&t, "g", "a.b") }).await;
        publish(&case, &[event(&t, "e1", "a.b")]).await;
        let mut deliveries = Vec::new();
        for n in 1..=3_u32 {
            let before = now_ms();
            let got = fetch_n(&case, &t, "g", 1, LONG).await;
            let after = now_ms();
            assert_eq!(got.len(), 1, "{}: delivery {n}", case.name);
            let d = &got[0];
            assert_eq!(d.delivery, n, "{}", case.name);
            let step = if n == 1 { 200 } else { 700 };
            assert!(
                d.ack_deadline_ms >= before + step - 50 && d.ack_deadline_ms <= after + step + 50,
                "{}: delivery {n} deadline {} not {step} ms after [{before}, {after}]",
                case.name,
                d.ack_deadline_ms
            );
            deliveries.push(after);
        }
        assert!(deliveries[2] - deliveries[1] >= 650, "{}: the last step repeats", case.name);
        case.finish().await;
    }
}

#[tokio::test]
async fn a_nack_with_a_delay_comes_back_after_the_delay() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await {
        put(&case, &spec(&t, "g", "a.b")).await;
        publish(&case, &[event(&t, "e1", "a.b"), event(&t, "e2", "a.b")]).await;
        let got = fetch_n(&case, &t, "g", 2, LONG).await;
        assert_eq!(ids(&got), vec!["e1", "e2"], "{}", case.name);
        let nacked_at = Instant::now();
        ack(&case, &t, "g", &got[0], AckKind::Nack { delay_ms: 600 }).await;
        ack(&case, &t, "g", &got[1], AckKind::Nack { delay_ms: 0 }).await;
        let soon = fetch_n(&case, &t, "g", 1, SECOND).await;
        assert_eq!(ids(&soon), vec!["e2"], "{}: no delay: at once", case.name);
        assert_eq!(soon[0].delivery, 2, "{}", case.name);
        let later = fetch_n(&case, &t, "g", 1, LONG).await;
        assert_eq!(ids(&later), vec!["e1"], "{}", case.name);
        assert_eq!(later[0].delivery, 2, "{}", case.name);
        assert!(nacked_at.elapsed() >= Duration::from_millis(550), "{}: after the delay", case.name);
        case.finish().await;
    }
}

#[tokio::test]
async fn in_progress_restarts_the_ack_deadline() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await {
        put(&case, &ConsumerSpec { ack_wait_ms: 800, ..spec(&t, "g", "a.b") }).await;
        publish(&case, &[event(&t, "e1", "a.b")]).await;
        let got = fetch_n(&case, &t, "g", 1, LONG).await;
        assert_eq!(got.len(), 1, "{}", case.name);
        tokio::time::sleep(Duration::from_millis(500)).await;
        ack(&case, &t, "g", &got[0], AckKind::InProgress).await;
        // Past the first deadline, inside the renewed one.
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert!(fetch_ready(&case, &t, "g", 10).await.is_empty(), "{}: still in progress", case.name);
        ack(&case, &t, "g", &got[0], AckKind::Ack).await;
        case.finish().await;
    }
}

#[tokio::test]
async fn deliveries_max_and_term_move_events_to_the_dead_letter_queue() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await {
        put(&case, &ConsumerSpec { ack_wait_ms: 200, deliveries_max: 2, ..spec(&t, "g", "a.*") }).await;
        publish(&case, &[event(&t, "late", "a.x"), event(&t, "nacked", "a.y"), event(&t, "bad", "a.z")]).await;
        let first = fetch_n(&case, &t, "g", 3, LONG).await;
        assert_eq!(ids(&first), vec!["late", "nacked", "bad"], "{}", case.name);
        ack(&case, &t, "g", &first[2], AckKind::Term).await;
        ack(&case, &t, "g", &first[1], AckKind::Nack { delay_ms: 0 }).await;
        let nacked = fetch_n(&case, &t, "g", 1, LONG).await;
        assert_eq!(ids(&nacked), vec!["nacked"], "{}", case.name);
        assert_eq!(nacked[0].delivery, 2, "{}", case.name);
        // A nack of the last allowed delivery dead-letters it.
        ack(&case, &t, "g", &nacked[0], AckKind::Nack { delay_ms: 0 }).await;
        let late = fetch_n(&case, &t, "g", 1, LONG).await;
        assert_eq!(ids(&late), vec!["late"], "{}", case.name);
        assert_eq!(late[0].delivery, 2, "{}", case.name);
        // `late` runs out its last deadline; nothing is delivered a third time.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(fetch_ready(&case, &t, "g", 10).await.is_empty(), "{}: no third delivery", case.name);

        let until = Instant::now() + LONG;
        let letters = loop {
            let letters = case.bus.dead_letters(&t, Some("g"), 0, 100).await.expect("dead letters");
            if letters.len() >= 3 || Instant::now() > until {
                break letters;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(letters.len(), 3, "{}: {letters:?}", case.name);
        assert!(letters.windows(2).all(|w| w[0].id < w[1].id), "{}: by id", case.name);
        let by_event = |id: &str| letters.iter().find(|l| l.event.id == id).expect("dead letter");
        assert_eq!((by_event("bad").reason.as_str(), by_event("bad").deliveries), ("terminated", 1), "{}", case.name);
        assert_eq!(by_event("nacked").reason, "deliveries_max", "{}", case.name);
        assert_eq!(by_event("late").reason, "deliveries_max", "{}", case.name);
        assert_eq!(by_event("late").deliveries, 2, "{}", case.name);
        assert_eq!(by_event("bad").consumer, "g", "{}", case.name);
        assert_eq!(by_event("bad").event.subject, "a.z", "{}", case.name);
        assert_eq!(by_event("bad").event.payload, b"{\"id\":\"bad\"}".to_vec(), "{}", case.name);

        let one = case.bus.dead_letter(&t, by_event("bad").id).await.expect("get").expect("present");
        assert_eq!(&one, by_event("bad"), "{}", case.name);
        let after = case.bus.dead_letters(&t, None, letters[0].id, 100).await.expect("after");
        assert_eq!(after.len(), 2, "{}: `after` pages", case.name);
        let info = case.bus.get_consumer(&t, "g").await.expect("info").expect("present");
        assert_eq!((info.dead_letters, info.pending), (3, 0), "{}", case.name);
        case.finish().await;
    }
}

/// Publishes one event, lets both groups read it, and dead-letters it in `dead` (Term) while
/// `live` acks it. Returns the dead letter's id.
async fn dead_letter_one(case: &Case, t: &TenantId, id: &str, dead: &str, live: &str) -> u64 {
    publish(case, &[event(t, id, "a.b")]).await;
    for (group, kind) in [(dead, AckKind::Term), (live, AckKind::Ack)] {
        let got = fetch_n(case, t, group, 1, LONG).await;
        assert_eq!(ids(&got), vec![id], "{}: {group}", case.name);
        ack(case, t, group, &got[0], kind).await;
    }
    let letters = case.bus.dead_letters(t, Some(dead), 0, 100).await.expect("dead letters");
    letters.iter().find(|l| l.event.id == id).unwrap_or_else(|| panic!("{}: {id} dead-lettered", case.name)).id
}

#[tokio::test]
async fn redrive_delivers_again_to_that_group_only() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await {
        put(&case, &spec(&t, "dead", "a.>")).await;
        put(&case, &spec(&t, "live", "a.>")).await;
        let id = dead_letter_one(&case, &t, "e1", "dead", "live").await;
        assert_eq!(case.bus.redrive(&t, &[id, id + 1_000]).await.expect("redrive"), 1, "{}", case.name);
        let again = fetch_n(&case, &t, "dead", 1, LONG).await;
        assert_eq!(ids(&again), vec!["e1"], "{}", case.name);
        assert_eq!(again[0].delivery, 1, "{}: counting from zero", case.name);
        ack(&case, &t, "dead", &again[0], AckKind::Ack).await;
        assert!(fetch_ready(&case, &t, "live", 10).await.is_empty(), "{}: the other group is untouched", case.name);
        assert!(case.bus.dead_letter(&t, id).await.expect("get").is_none(), "{}: left the queue", case.name);
        assert_eq!(case.bus.redrive(&t, &[id]).await.expect("redrive"), 0, "{}: gone", case.name);
        case.finish().await;
    }
}

#[tokio::test]
async fn dead_letters_are_purged_by_id_by_group_and_by_tenant() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await {
        put(&case, &spec(&t, "one", "a.>")).await;
        put(&case, &spec(&t, "two", "a.>")).await;
        let mut letters = Vec::new();
        for i in 0..3 {
            letters.push(dead_letter_one(&case, &t, &format!("x{i}"), "one", "two").await);
        }
        let y = dead_letter_one(&case, &t, "y0", "two", "one").await;
        assert_eq!(
            case.bus.purge_dead_letters(&t, None, Some(&[letters[0]])).await.expect("purge"),
            1,
            "{}",
            case.name
        );
        assert!(case.bus.dead_letter(&t, letters[0]).await.expect("get").is_none(), "{}", case.name);
        assert_eq!(case.bus.purge_dead_letters(&t, Some("one"), None).await.expect("purge"), 2, "{}", case.name);
        let left = case.bus.dead_letters(&t, None, 0, 100).await.expect("list");
        assert_eq!(left.iter().map(|l| l.id).collect::<Vec<_>>(), vec![y], "{}: the other group's stays", case.name);
        assert_eq!(case.bus.purge_dead_letters(&t, None, None).await.expect("purge"), 1, "{}", case.name);
        assert!(case.bus.dead_letters(&t, None, 0, 100).await.expect("list").is_empty(), "{}", case.name);
        case.finish().await;
    }
}

#[tokio::test]
async fn requeue_replays_a_range_to_one_group_only() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await {
        put(&case, &spec(&t, "replay", "a.>")).await;
        put(&case, &spec(&t, "other", "a.>")).await;
        let batch: Vec<EventIn> = (0..5).map(|i| event(&t, &format!("e{i}"), "a.b")).collect();
        let published = seqs(&publish(&case, &batch).await);
        for group in ["replay", "other"] {
            for d in fetch_n(&case, &t, group, 5, LONG).await {
                ack(&case, &t, group, &d, AckKind::Ack).await;
            }
        }
        let queued = case.bus.requeue(&t, "replay", &published[1..4]).await.expect("requeue");
        assert_eq!(queued, 3, "{}", case.name);
        let again = fetch_n(&case, &t, "replay", 3, LONG).await;
        assert_eq!(ids(&again), vec!["e1", "e2", "e3"], "{}: in order", case.name);
        assert!(again.iter().all(|d| d.delivery == 1), "{}", case.name);
        assert!(fetch_ready(&case, &t, "other", 10).await.is_empty(), "{}: only that group", case.name);
        let missing = case.bus.requeue(&t, "nope", &published[..1]).await;
        assert!(matches!(missing, Err(BusError::NotFound(_))), "{}: {missing:?}", case.name);
        case.finish().await;
    }
}

#[tokio::test]
async fn reads_select_by_sequence_time_and_filter() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await {
        let base = now_ms() - 10_000;
        let batch: Vec<EventIn> = (0..6)
            .map(|i| EventIn {
                time_ms: base + i64::from(i) * 1_000,
                ..event(&t, &format!("e{i}"), if i % 2 == 0 { "a.even.x" } else { "a.odd.x" })
            })
            .collect();
        let s = seqs(&publish(&case, &batch).await);
        publish(&case, &[event(&tenant("other"), "o1", "a.even.x")]).await;
        let read = |range: ReadRange| {
            let bus = case.bus.clone();
            let t = t.clone();
            async move {
                bus.read(&t, &ReadRange { limit: 100, ..range })
                    .await
                    .expect("read")
                    .into_iter()
                    .map(|e| e.id)
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(read(ReadRange::default()).await, vec!["e0", "e1", "e2", "e3", "e4", "e5"], "{}", case.name);
        assert_eq!(
            read(ReadRange { from_seq: Some(s[1]), to_seq: Some(s[3]), ..ReadRange::default() }).await,
            vec!["e1", "e2", "e3"],
            "{}: by sequence",
            case.name
        );
        assert_eq!(
            read(ReadRange { from_ms: Some(base + 2_000), to_ms: Some(base + 4_000), ..ReadRange::default() }).await,
            vec!["e2", "e3", "e4"],
            "{}: by time",
            case.name
        );
        assert_eq!(
            read(ReadRange { filter: Some("a.*.x".into()), from_seq: Some(s[1]), ..ReadRange::default() }).await,
            vec!["e1", "e2", "e3", "e4", "e5"],
            "{}: wildcard",
            case.name
        );
        assert_eq!(
            read(ReadRange { filter: Some("a.odd.>".into()), ..ReadRange::default() }).await,
            vec!["e1", "e3", "e5"],
            "{}: by filter",
            case.name
        );
        let limited = case.bus.read(&t, &ReadRange { limit: 2, ..ReadRange::default() }).await.expect("read");
        assert_eq!(limited.len(), 2, "{}: limit", case.name);
        assert_eq!(limited[0], stored(&batch[0], s[0]), "{}: stored as published", case.name);
        case.finish().await;
    }
}

/// The stored form of a published event.
fn stored(e: &EventIn, seq: u64) -> StoredEvent {
    StoredEvent {
        seq,
        id: e.id.clone(),
        tenant: e.tenant.clone(),
        subject: e.subject.clone(),
        payload: e.payload.clone(),
        source: e.source.clone(),
        time_ms: e.time_ms,
    }
}

#[tokio::test]
async fn a_waiting_fetch_returns_as_soon_as_an_event_arrives() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await {
        put(&case, &spec(&t, "g", "a.b")).await;
        let started = Instant::now();
        let none = case.bus.fetch(&t, "g", 10, Duration::from_millis(400)).await.expect("fetch");
        assert!(none.is_empty(), "{}", case.name);
        assert!(started.elapsed() >= Duration::from_millis(350), "{}: waited about `wait`", case.name);

        let bus = case.bus.clone();
        let t2 = t.clone();
        let waiter = tokio::spawn(async move { bus.fetch(&t2, "g", 10, Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        publish(&case, &[event(&t, "e1", "a.b")]).await;
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap_or_else(|_| panic!("{}: the waiting fetch did not wake", case.name))
            .expect("join")
            .expect("fetch");
        assert_eq!(ids(&got), vec!["e1"], "{}", case.name);
        case.finish().await;
    }
}

#[tokio::test]
async fn pending_max_bounds_outstanding_deliveries() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await {
        put(&case, &ConsumerSpec { pending_max: 2, ..spec(&t, "g", "a.b") }).await;
        let batch: Vec<EventIn> = (0..5).map(|i| event(&t, &format!("e{i}"), "a.b")).collect();
        publish(&case, &batch).await;
        let first = fetch_n(&case, &t, "g", 2, LONG).await;
        assert_eq!(ids(&first), vec!["e0", "e1"], "{}: at most pending_max", case.name);
        let full = fetch_ready(&case, &t, "g", 5).await;
        assert!(full.is_empty(), "{}: full: {full:?}", case.name);
        ack(&case, &t, "g", &first[0], AckKind::Ack).await;
        let next = fetch_n(&case, &t, "g", 1, LONG).await;
        assert_eq!(ids(&next), vec!["e2"], "{}: one slot freed", case.name);
        assert!(fetch_ready(&case, &t, "g", 5).await.is_empty(), "{}: full again", case.name);
        case.finish().await;
    }
}

/// A group whose every slot is held by a consumer that died still gets those events back
/// after their deadline: expired deliveries do not wait for free room. Embedded only: a NATS
/// 2.9 server answers a pull request at `max_ack_pending` by redelivering outstanding
/// messages before their deadline, so the NATS adapter does not ask while the group is full,
/// and its expired deliveries wait for a slot (a known limit, in `docs/events-nats.md`).
#[tokio::test]
async fn a_full_group_gets_its_expired_deliveries_back() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await.into_iter().filter(|c| c.name != "nats") {
        put(&case, &ConsumerSpec { pending_max: 2, ack_wait_ms: 300, ..spec(&t, "g", "a.b") }).await;
        let batch: Vec<EventIn> = (0..3).map(|i| event(&t, &format!("e{i}"), "a.b")).collect();
        publish(&case, &batch).await;
        let first = fetch_n(&case, &t, "g", 2, LONG).await;
        assert_eq!(ids(&first), vec!["e0", "e1"], "{}", case.name);
        // Nobody acks: the deliveries expire and come back, to whoever fetches next.
        let again = fetch_n(&case, &t, "g", 2, LONG).await;
        assert_eq!(ids(&again), vec!["e0", "e1"], "{}: the expired deliveries, not e2", case.name);
        assert!(again.iter().all(|d| d.delivery == 2), "{}: {again:?}", case.name);
        case.finish().await;
    }
}

#[tokio::test]
async fn tenants_see_nothing_of_each_other() {
    let a = tenant("alpha");
    let b = tenant("beta");
    for case in buses(BusConfig::default()).await {
        put(&case, &spec(&a, "g", "a.>")).await;
        publish(&case, &[event(&a, "e1", "a.b"), event(&a, "e2", "a.b")]).await;
        let got = fetch_n(&case, &a, "g", 2, LONG).await;
        ack(&case, &a, "g", &got[1], AckKind::Term).await;

        assert!(case.bus.get_consumer(&b, "g").await.expect("get").is_none(), "{}", case.name);
        assert!(case.bus.list_consumers(&b).await.expect("list").is_empty(), "{}", case.name);
        let fetched = case.bus.fetch(&b, "g", 10, Duration::ZERO).await;
        assert!(matches!(fetched, Err(BusError::NotFound(_))), "{}: {fetched:?}", case.name);
        let acked = case.bus.ack(&b, "g", &got[0].token, AckKind::Ack).await;
        assert!(matches!(acked, Err(BusError::NotFound(_) | BusError::StaleToken(_))), "{}: {acked:?}", case.name);
        assert!(case.bus.read(&b, &ReadRange { limit: 100, ..ReadRange::default() }).await.expect("read").is_empty());
        assert!(case.bus.dead_letters(&b, None, 0, 100).await.expect("dead letters").is_empty(), "{}", case.name);
        let id = case.bus.dead_letters(&a, None, 0, 100).await.expect("dead letters")[0].id;
        assert!(case.bus.dead_letter(&b, id).await.expect("get").is_none(), "{}", case.name);
        assert_eq!(case.bus.redrive(&b, &[id]).await.expect("redrive"), 0, "{}", case.name);
        assert_eq!(case.bus.purge_dead_letters(&b, None, None).await.expect("purge"), 0, "{}", case.name);

        // The same group name in the other tenant is a different group on different events.
        put(&case, &spec(&b, "g", "a.>")).await;
        publish(&case, &[event(&b, "b1", "a.b")]).await;
        assert_eq!(ids(&fetch_n(&case, &b, "g", 1, LONG).await), vec!["b1"], "{}", case.name);
        let acked = case.bus.ack(&b, "g", &got[0].token, AckKind::Ack).await;
        assert!(matches!(acked, Err(BusError::StaleToken(_))), "{}: {acked:?}", case.name);
        ack(&case, &a, "g", &got[0], AckKind::Ack).await;
        assert_eq!(case.bus.dead_letters(&a, None, 0, 100).await.expect("dead letters").len(), 1, "{}", case.name);
        case.finish().await;
    }
}

#[tokio::test]
async fn put_consumer_updates_settings_but_not_the_filter() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await {
        let created = case.bus.put_consumer(&spec(&t, "g", "a.>")).await.expect("create");
        assert_eq!(created.spec, spec(&t, "g", "a.>"), "{}", case.name);
        assert!(created.created_at_ms > 0, "{}", case.name);
        let changed = ConsumerSpec {
            ack_wait_ms: 5_000,
            deliveries_max: 9,
            backoff_ms: vec![100, 200],
            pending_max: 7,
            ..spec(&t, "g", "a.>")
        };
        let updated = case.bus.put_consumer(&changed).await.expect("update");
        assert_eq!(updated.spec, changed, "{}", case.name);
        let got = case.bus.get_consumer(&t, "g").await.expect("get").expect("present");
        assert_eq!(got.spec, changed, "{}", case.name);
        let conflict = case.bus.put_consumer(&spec(&t, "g", "b.>")).await;
        assert!(matches!(conflict, Err(BusError::Conflict(_))), "{}: {conflict:?}", case.name);
        put(&case, &spec(&t, "f", "c.>")).await;
        let names: Vec<String> =
            case.bus.list_consumers(&t).await.expect("list").into_iter().map(|c| c.spec.name).collect();
        assert_eq!(names, vec!["f", "g"], "{}: by name", case.name);

        publish(&case, &[event(&t, "e1", "a.b"), event(&t, "e2", "a.c")]).await;
        let info = case.bus.get_consumer(&t, "g").await.expect("get").expect("present");
        assert_eq!((info.pending, info.backlog), (0, 2), "{}", case.name);
        let d = fetch_n(&case, &t, "g", 1, LONG).await;
        assert_eq!(d.len(), 1, "{}", case.name);
        let info = case.bus.get_consumer(&t, "g").await.expect("get").expect("present");
        assert_eq!((info.pending, info.backlog), (1, 1), "{}", case.name);
        case.finish().await;
    }
}

#[tokio::test]
async fn delete_consumer_forgets_its_deliveries_and_dead_letters() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await {
        put(&case, &spec(&t, "g", "a.>")).await;
        put(&case, &spec(&t, "keep", "a.>")).await;
        let id = dead_letter_one(&case, &t, "e1", "g", "keep").await;
        publish(&case, &[event(&t, "e2", "a.b")]).await;
        let pending = fetch_n(&case, &t, "g", 1, LONG).await;
        assert_eq!(pending.len(), 1, "{}", case.name);
        assert!(case.bus.delete_consumer(&t, "g").await.expect("delete"), "{}", case.name);
        assert!(!case.bus.delete_consumer(&t, "g").await.expect("delete"), "{}: already gone", case.name);
        assert!(case.bus.get_consumer(&t, "g").await.expect("get").is_none(), "{}", case.name);
        assert!(case.bus.dead_letter(&t, id).await.expect("get").is_none(), "{}", case.name);
        let fetched = case.bus.fetch(&t, "g", 1, Duration::ZERO).await;
        assert!(matches!(fetched, Err(BusError::NotFound(_))), "{}: {fetched:?}", case.name);
        // A group re-created under the same name starts afresh; old tokens are stale.
        put(&case, &ConsumerSpec { start: StartAt::New, ..spec(&t, "g", "a.>") }).await;
        let acked = case.bus.ack(&t, "g", &pending[0].token, AckKind::Ack).await;
        assert!(matches!(acked, Err(BusError::StaleToken(_))), "{}: {acked:?}", case.name);
        let info = case.bus.get_consumer(&t, "keep").await.expect("get").expect("present");
        assert_eq!(info.spec.name, "keep", "{}: the other group stays", case.name);
        case.finish().await;
    }
}

#[tokio::test]
async fn groups_start_where_they_are_told() {
    let t = tenant("acme");
    for case in buses(BusConfig::default()).await {
        let base = now_ms() - 10_000;
        let batch: Vec<EventIn> = (0..4)
            .map(|i| EventIn { time_ms: base + i64::from(i) * 1_000, ..event(&t, &format!("e{i}"), "a.b") })
            .collect();
        let s = seqs(&publish(&case, &batch).await);
        put(&case, &ConsumerSpec { start: StartAt::New, ..spec(&t, "new", "a.b") }).await;
        put(&case, &ConsumerSpec { start: StartAt::All, ..spec(&t, "all", "a.b") }).await;
        put(&case, &ConsumerSpec { start: StartAt::Seq(s[2]), ..spec(&t, "seq", "a.b") }).await;
        put(&case, &ConsumerSpec { start: StartAt::TimeMs(base + 1_000), ..spec(&t, "time", "a.b") }).await;
        publish(&case, &[event(&t, "e4", "a.b")]).await;
        let expect = [
            ("new", vec!["e4"]),
            ("all", vec!["e0", "e1", "e2", "e3", "e4"]),
            ("seq", vec!["e2", "e3", "e4"]),
            ("time", vec!["e1", "e2", "e3", "e4"]),
        ];
        for (group, want) in expect {
            let got = fetch_n(&case, &t, group, want.len(), LONG).await;
            assert_eq!(ids(&got), want, "{}: {group}", case.name);
            assert!(fetch_ready(&case, &t, group, 10).await.is_empty(), "{}: {group}: nothing more", case.name);
        }
        case.finish().await;
    }
}

#[tokio::test]
async fn a_tenant_has_at_most_consumers_per_tenant_max_groups() {
    let t = tenant("acme");
    let config = BusConfig { consumers_per_tenant_max: 2, ..BusConfig::default() };
    for case in buses(config).await {
        put(&case, &spec(&t, "one", "a.>")).await;
        put(&case, &spec(&t, "two", "a.>")).await;
        let third = case.bus.put_consumer(&spec(&t, "three", "a.>")).await;
        assert!(matches!(third, Err(BusError::LimitExceeded(_))), "{}: {third:?}", case.name);
        assert!(case.bus.get_consumer(&t, "three").await.expect("get").is_none(), "{}: nothing created", case.name);
        put(&case, &ConsumerSpec { pending_max: 3, ..spec(&t, "two", "a.>") }).await;
        put(&case, &spec(&tenant("other"), "three", "a.>")).await;
        assert!(case.bus.delete_consumer(&t, "one").await.expect("delete"), "{}", case.name);
        put(&case, &spec(&t, "three", "a.>")).await;
        case.finish().await;
    }
}

#[tokio::test]
async fn two_kernels_on_one_postgres_never_hand_out_a_delivery_twice() {
    if !backends().contains(&Backend::Postgres) {
        eprintln!("NOPS_TEST_DATABASE_URL unset: skipping the two-kernel bus test");
        return;
    }
    let t = tenant("acme");
    let (one, store, db) = embedded(Backend::Postgres, BusConfig::default()).await;
    let store_two = open_store(&db.url).await;
    let two = EmbeddedBus::new(&store_two, BusConfig::default(), Arc::new(SystemClock));
    one.put_consumer(&spec(&t, "g", "a.>")).await.expect("put");
    let total = 400;
    for chunk in 0..4 {
        let batch: Vec<EventIn> = (0..100).map(|i| event(&t, &format!("e{chunk}-{i}"), "a.b")).collect();
        one.publish(&batch).await.expect("publish");
    }
    let kernels: Vec<Arc<EmbeddedBus>> = vec![Arc::new(one), Arc::new(two)];
    let mut workers = Vec::new();
    for w in 0..4 {
        let bus = kernels[w % 2].clone();
        let t = t.clone();
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let got = bus.fetch(&t, "g", 7, Duration::from_millis(300)).await.expect("fetch");
                if got.is_empty() {
                    return seen;
                }
                for d in got {
                    bus.ack(&t, "g", &d.token, AckKind::Ack).await.expect("ack");
                    seen.push(d.event.seq);
                }
            }
        }));
    }
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.expect("worker"));
    }
    let unique: HashSet<u64> = all.iter().copied().collect();
    assert_eq!(unique.len(), total, "every event delivered");
    assert_eq!(all.len(), total, "no event delivered twice");
    store_two.close().await;
    store.close().await;
    drop(db);
}

#[tokio::test]
async fn the_embedded_sweep_enforces_retention_dedupe_and_dead_letter_limits() {
    let t = tenant("acme");
    for backend in backends() {
        let config = BusConfig {
            dedupe_window_ms: 300,
            retention_ms: 60_000,
            events_max: 5,
            dead_letters_per_tenant_max: 2,
            ..BusConfig::default()
        };
        let (bus, store, db) = embedded(backend, config).await;
        bus.put_consumer(&ConsumerSpec { ack_wait_ms: 100, deliveries_max: 1, ..spec(&t, "g", "a.>") })
            .await
            .expect("put");
        let old = EventIn { time_ms: now_ms() - 120_000, ..event(&t, "old", "a.b") };
        bus.publish(&[old]).await.expect("publish");
        let batch: Vec<EventIn> = (0..7).map(|i| event(&t, &format!("e{i}"), "a.b")).collect();
        bus.publish(&batch).await.expect("publish");
        // Four deliveries expire on their last allowed delivery with nobody fetching again.
        let got = bus.fetch(&t, "g", 4, Duration::ZERO).await.expect("fetch");
        assert_eq!(got.len(), 4, "{backend:?}");
        tokio::time::sleep(Duration::from_millis(400)).await;

        let report = bus.sweep().await.expect("sweep");
        assert_eq!(report.dead_lettered, 4, "{backend:?}: {report:?}");
        assert_eq!(report.dead_letters_dropped, 2, "{backend:?}: {report:?}");
        assert_eq!(report.events_deleted, 3, "{backend:?}: the old one by age, two by count: {report:?}");
        assert_eq!(report.dedupe_forgotten, 8, "{backend:?}: {report:?}");
        let letters = bus.dead_letters(&t, None, 0, 100).await.expect("dead letters");
        assert_eq!(letters.iter().map(|l| l.event.id.as_str()).collect::<Vec<_>>(), vec!["e1", "e2"], "{backend:?}");
        let kept = bus.read(&t, &ReadRange { limit: 100, ..ReadRange::default() }).await.expect("read");
        assert_eq!(kept.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), vec!["e2", "e3", "e4", "e5", "e6"]);
        // Forgotten ids are accepted again.
        let again = bus.publish(&[event(&t, "e6", "a.b")]).await.expect("publish");
        assert!(matches!(again[0], Published::Accepted { .. }), "{backend:?}: {again:?}");
        assert_eq!(bus.sweep().await.expect("sweep").dead_lettered, 0, "{backend:?}: nothing left to move");
        store.close().await;
        drop(db);
    }
}
