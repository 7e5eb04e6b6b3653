//! EB01: the event bus measured for the edge. In one run on one machine it times
//!
//! 1. **durable ingest** in batches of 1,000 events of ~200 bytes: the embedded bus on SQLite
//!    and on PostgreSQL, the NATS JetStream bus, and as references raw async-nats JetStream
//!    publishing (acks pipelined, file storage, a dedupe window) and raw Redis Streams `XADD`
//!    (pipelined, `MAXLEN ~`); rounds alternate the backends so that load from elsewhere hits
//!    them alike, medians are reported;
//! 2. **publish-to-deliver latency** at a fixed rate (open loop: each event is due at
//!    `start + i / rate` and its latency runs from that instant to its receipt by a consumer
//!    group in the same process, so a publisher that falls behind is charged for it);
//! 3. **crash recovery**: a real `nops serve` (or, without the HTTP events API, a child
//!    process publishing through the bus) is killed with SIGKILL mid-stream and restarted on
//!    the same data; acknowledged events lost, events stored twice, events delivered again to
//!    a consumer group, and what re-publishing the unacknowledged batches gives are counted.
//!
//! Each part and backend runs alone when another's service is missing (`skipped: <why>`).
//! Streams, Redis keys, tenants and PostgreSQL databases are unique per run and removed after
//! it. Figures are printed as Markdown on standard output; progress goes to standard error.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::str::FromStr as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use async_trait::async_trait;
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::StreamExt as _;
use nops_core::bus::{
    AckKind, BATCH_EVENTS_MAX, Bus, BusConfig, ConsumerSpec, EventIn, Published, READ_EVENTS_MAX, ReadRange, StartAt,
};
use nops_core::clock::{Clock, SystemClock};
use nops_core::tenant::TenantId;
use redis::AsyncCommands as _;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::{Semaphore, mpsc};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Embedded durable ingest target, events per second (reported, never asserted).
const TARGET_EMBEDDED_EVENTS_PER_S: f64 = 50_000.0;
/// NATS backend / raw async-nats publish throughput target.
const TARGET_NATS_RATIO: f64 = 0.8;
/// Publish-to-deliver p99 target at 1,000 events/s, in milliseconds.
const TARGET_P99_MS: f64 = 5.0;
/// Bytes of each event's payload.
const PAYLOAD_BYTES: usize = 200;
/// Publishes outstanding at once in the latency part; past it the publisher waits (and the
/// wait shows in the latencies, which run from each event's due time).
const LATENCY_INFLIGHT_MAX: usize = 10_000;
/// Most deliveries one consumer fetch asks for.
const FETCH_MAX: u32 = 1_000;
/// How long one consumer fetch waits for the first event.
const FETCH_WAIT_MS: u64 = 200;
/// How long the latency consumer keeps reading after the last publish.
const DRAIN_WAIT_MS_MAX: u64 = 10_000;
/// How long a kernel may take to answer `/ready`.
const KERNEL_START_WAIT_MS_MAX: u64 = 30_000;
/// Longest an HTTP request of the crash part may take.
const HTTP_TIMEOUT_MS: u64 = 10_000;
/// Ack deadline of the crash part's consumer group: short, so that deliveries cut off by the
/// kill come back quickly after the restart.
const CRASH_ACK_WAIT_MS: u64 = 1_000;
/// Events per batch in the crash part.
const CRASH_BATCH_EVENTS: usize = 100;
/// Publishers running at once in the crash part (so that some batches are in flight at the kill).
const CRASH_PUBLISHERS: usize = 4;
/// Consecutive empty fetches after which the crash part's consumer counts itself drained.
const CRASH_EMPTY_FETCHES_MAX: u32 = 3;
/// Deliveries the crash part reads at most after the restart (a guard against a loop).
const CRASH_DELIVERIES_MAX: usize = 2_000_000;

#[derive(Debug, Parser)]
#[command(about = "EB01: event bus throughput, publish-to-deliver latency and crash recovery")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// A fast smoke check: few events, one round, short latency runs.
    #[arg(long)]
    quick: bool,
    /// Parts to run.
    #[arg(long, value_delimiter = ',', default_values = ["throughput", "latency", "crash"])]
    parts: Vec<Part>,
    /// Backends to run (the crash part uses the kernel's: embedded and nats).
    #[arg(long, value_delimiter = ',', default_values = ["embedded-sqlite", "embedded-pg", "nats", "raw-nats", "raw-redis"])]
    backends: Vec<Backend>,
    /// Events each backend publishes per throughput round (default 50,000; quick 5,000).
    #[arg(long)]
    events: Option<usize>,
    /// Throughput rounds (default 3; quick 1).
    #[arg(long)]
    rounds: Option<usize>,
    /// Latency part: events per second.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Latency part: seconds per backend (default 20; quick 3), the first `warmup_s` excluded.
    #[arg(long)]
    seconds: Option<u64>,
    /// Latency part: seconds of warm-up excluded from the figures.
    #[arg(long, default_value_t = 1)]
    warmup_s: u64,
    /// Crash part: milliseconds of publishing before the SIGKILL (default 3,000; quick 1,500).
    #[arg(long)]
    kill_after_ms: Option<u64>,
    /// PostgreSQL server (a fresh database is created for the run and dropped after it).
    #[arg(long, env = "EB01_PG_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pg_url: String,
    /// NATS server with JetStream.
    #[arg(long, env = "EB01_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Redis server.
    #[arg(long, env = "EB01_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// The kernel binary for the crash part.
    #[arg(long, default_value = "target/release/nops")]
    nops_bin: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Internal: publishes and consumes through the embedded bus until killed (crash part
    /// without the HTTP API). Prints `acked <batch>` and `consumed <id>` lines.
    CrashChild {
        /// `sqlite://…` of the store.
        #[arg(long)]
        database_url: String,
        /// Tenant to publish in.
        #[arg(long)]
        tenant: String,
        /// Prefix of the event ids.
        #[arg(long)]
        run: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Throughput,
    Latency,
    Crash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Backend {
    EmbeddedSqlite,
    EmbeddedPg,
    Nats,
    RawNats,
    RawRedis,
}

impl Backend {
    fn label(self) -> &'static str {
        match self {
            Backend::EmbeddedSqlite => "embedded bus, SQLite",
            Backend::EmbeddedPg => "embedded bus, PostgreSQL",
            Backend::Nats => "NATS JetStream bus",
            Backend::RawNats => "raw async-nats JetStream (reference)",
            Backend::RawRedis => "raw Redis Streams (reference)",
        }
    }
}

/// One run's unique names.
#[derive(Debug, Clone)]
struct Run {
    /// Lowercase letters and digits, unique per run.
    tag: String,
    quick: bool,
}

impl Run {
    fn tenant(&self, what: &str) -> anyhow::Result<TenantId> {
        TenantId::from_str(&format!("eb01-{what}-{}", self.tag)).map_err(|e| anyhow!("tenant: {e}"))
    }
}

/// A payload of [`PAYLOAD_BYTES`] bytes whose first 16 bytes are `index` in decimal.
fn payload(index: u64) -> Vec<u8> {
    let mut p = format!("{index:016}").into_bytes();
    p.resize(PAYLOAD_BYTES, b'x');
    p
}

fn payload_index(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload.get(..16)?).ok()?.parse().ok()
}

fn event(tenant: &TenantId, id: String, subject: &str, index: u64) -> EventIn {
    EventIn {
        id,
        tenant: tenant.clone(),
        subject: subject.to_string(),
        payload: payload(index),
        source: "bench/eb01".into(),
        time_ms: SystemClock.now_ms(),
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Nearest-rank quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}

fn progress(message: impl std::fmt::Display) {
    eprintln!("eb01: {message}");
}

// --- backends --------------------------------------------------------------------------------

/// A PostgreSQL database made for this run and dropped after it.
struct PgDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl PgDatabase {
    async fn create(admin_url: &str, tag: &str) -> anyhow::Result<Self> {
        use sqlx::Connection as _;
        let name = format!("eb01_{tag}");
        let mut conn = tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(admin_url))
            .await
            .context("PostgreSQL did not answer within 5 s")?
            .context("connecting to PostgreSQL")?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.context("CREATE DATABASE")?;
        let base = admin_url.rsplit_once('/').map_or(admin_url, |(base, _)| base);
        Ok(Self { admin_url: admin_url.to_string(), url: format!("{base}/{name}"), name })
    }

    async fn drop_database(&self) {
        use sqlx::Connection as _;
        let result = async {
            let mut conn = sqlx::PgConnection::connect(&self.admin_url).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&mut conn).await?;
            Ok::<_, sqlx::Error>(())
        }
        .await;
        if let Err(e) = result {
            progress(format!("could not drop database {}: {e}", self.name));
        }
    }
}

/// A bus under test with what must be cleaned up after it.
struct OpenBus {
    bus: Arc<dyn Bus>,
    store: Option<nops_store::SqlStore>,
    nats: Option<nops_bus::NatsBus>,
    pg: Option<PgDatabase>,
    _dir: Option<tempfile::TempDir>,
}

impl OpenBus {
    async fn close(self) {
        drop(self.bus);
        if let Some(nats) = &self.nats
            && let Err(e) = nats.destroy().await
        {
            progress(format!("could not delete the NATS bus's streams: {e}"));
        }
        if let Some(store) = &self.store {
            store.close().await;
        }
        if let Some(pg) = &self.pg {
            pg.drop_database().await;
        }
    }
}

async fn open_store(url: &str) -> anyhow::Result<nops_store::SqlStore> {
    nops_store::SqlStore::open(&nops_store::StoreConfig {
        database_url: url.to_string(),
        connect_attempts_max: 2,
        ..nops_store::StoreConfig::default()
    })
    .await
    .with_context(|| format!("opening the store at {}", nops_store::redact_url(url)))
}

async fn embedded_bus(store: &nops_store::SqlStore) -> anyhow::Result<Arc<dyn Bus>> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let bus = nops_store::bus::EmbeddedBus::new(store, BusConfig::default(), clock);
    Ok(Arc::new(bus))
}

async fn open_bus(args: &Args, run: &Run, backend: Backend, what: &str) -> anyhow::Result<OpenBus> {
    match backend {
        Backend::EmbeddedSqlite => {
            let dir = tempfile::tempdir()?;
            let url = format!("sqlite://{}", dir.path().join("nops.db").display());
            let store = open_store(&url).await?;
            let bus = embedded_bus(&store).await?;
            Ok(OpenBus { bus, store: Some(store), nats: None, pg: None, _dir: Some(dir) })
        }
        Backend::EmbeddedPg => {
            let pg = PgDatabase::create(&args.pg_url, &format!("{}_{what}", run.tag)).await?;
            let store = match open_store(&pg.url).await {
                Ok(store) => store,
                Err(e) => {
                    pg.drop_database().await;
                    return Err(e);
                }
            };
            let bus = embedded_bus(&store).await?;
            Ok(OpenBus { bus, store: Some(store), nats: None, pg: Some(pg), _dir: None })
        }
        Backend::Nats => {
            let config = nops_bus::NatsBusConfig {
                url: args.nats_url.clone(),
                prefix: format!("EB01{}{}", what.to_uppercase(), run.tag.to_uppercase()),
                bus: BusConfig::default(),
            };
            let nats = tokio::time::timeout(Duration::from_secs(10), nops_bus::NatsBus::connect(config))
                .await
                .context("NATS did not answer within 10 s")?
                .map_err(|e| anyhow!("{e}"))?;
            Ok(OpenBus { bus: Arc::new(nats.clone()), store: None, nats: Some(nats), pg: None, _dir: None })
        }
        Backend::RawNats | Backend::RawRedis => bail!("not a kernel bus"),
    }
}

/// Raw JetStream: a file-storage stream with the bus's dedupe window.
struct RawNats {
    js: async_nats::jetstream::Context,
    stream: String,
    subject_prefix: String,
}

impl RawNats {
    async fn open(url: &str, name: &str) -> anyhow::Result<Self> {
        use async_nats::jetstream::stream;
        let client = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url))
            .await
            .context("NATS did not answer within 5 s")?
            .context("connecting to NATS")?;
        let js = async_nats::jetstream::new(client);
        let subject_prefix = format!("eb01.{}", name.to_lowercase());
        js.create_stream(stream::Config {
            name: name.to_string(),
            subjects: vec![format!("{subject_prefix}.>")],
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_millis(BusConfig::default().dedupe_window_ms),
            max_messages: i64::try_from(BusConfig::default().events_max).unwrap_or(i64::MAX),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("creating stream {name}: {e}"))?;
        Ok(Self { js, stream: name.to_string(), subject_prefix })
    }

    async fn close(&self) {
        if let Err(e) = self.js.delete_stream(&self.stream).await {
            progress(format!("could not delete stream {}: {e}", self.stream));
        }
    }
}

/// Raw Redis Streams: one stream key and its consumer group.
struct RawRedis {
    client: redis::Client,
    conn: redis::aio::MultiplexedConnection,
    key: String,
}

impl RawRedis {
    async fn open(url: &str, key: String) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).context("Redis URL")?;
        let conn = tokio::time::timeout(Duration::from_secs(5), client.get_multiplexed_async_connection())
            .await
            .context("Redis did not answer within 5 s")?
            .context("connecting to Redis")?;
        Ok(Self { client, conn, key })
    }

    async fn persistence(&self) -> String {
        let mut conn = self.conn.clone();
        let get = |name: &'static str| redis::cmd("CONFIG").arg("GET").arg(name).clone();
        let aof: Vec<String> = get("appendonly").query_async(&mut conn).await.unwrap_or_default();
        let fsync: Vec<String> = get("appendfsync").query_async(&mut conn).await.unwrap_or_default();
        format!("appendonly {}, appendfsync {}", aof.get(1).map_or("?", |s| s), fsync.get(1).map_or("?", |s| s))
    }

    async fn close(&self) {
        let mut conn = self.conn.clone();
        let deleted: redis::RedisResult<usize> = conn.del(&self.key).await;
        if let Err(e) = deleted {
            progress(format!("could not delete Redis key {}: {e}", self.key));
        }
    }
}

// --- 1. throughput ---------------------------------------------------------------------------

/// Publishes `events` events in batches of 1,000 through a kernel bus; events per second.
async fn bus_throughput(bus: &dyn Bus, tenant: &TenantId, events: usize, round: usize) -> anyhow::Result<f64> {
    let batches: Vec<Vec<EventIn>> = (0..events)
        .collect::<Vec<_>>()
        .chunks(BATCH_EVENTS_MAX)
        .map(|chunk| chunk.iter().map(|i| event(tenant, format!("r{round}-{i}"), "eb01.ingest", *i as u64)).collect())
        .collect();
    let start = Instant::now();
    for batch in &batches {
        let answers = bus.publish(batch).await.map_err(|e| anyhow!("publish: {e}"))?;
        ensure!(answers.iter().all(|a| matches!(a, Published::Accepted { .. })), "a fresh event was not accepted");
    }
    Ok(events as f64 / start.elapsed().as_secs_f64())
}

async fn raw_nats_throughput(raw: &RawNats, events: usize, round: usize) -> anyhow::Result<f64> {
    use async_nats::jetstream::message::PublishMessage as Publish;
    let subject = format!("{}.ingest", raw.subject_prefix);
    let batches: Vec<Vec<(String, Vec<u8>)>> = (0..events)
        .collect::<Vec<_>>()
        .chunks(BATCH_EVENTS_MAX)
        .map(|chunk| chunk.iter().map(|i| (format!("r{round}-{i}"), payload(*i as u64))).collect())
        .collect();
    let start = Instant::now();
    for batch in batches {
        let mut acks = Vec::with_capacity(batch.len());
        for (id, body) in batch {
            let ack = raw
                .js
                .send_publish(subject.clone(), Publish::build().payload(body.into()).message_id(id))
                .await
                .map_err(|e| anyhow!("publish: {e}"))?;
            acks.push(ack);
        }
        for ack in acks {
            let ack = ack.await.map_err(|e| anyhow!("publish ack: {e}"))?;
            ensure!(!ack.duplicate, "a fresh event was a duplicate");
        }
    }
    Ok(events as f64 / start.elapsed().as_secs_f64())
}

async fn raw_redis_throughput(raw: &RawRedis, events: usize, round: usize) -> anyhow::Result<f64> {
    let cap = BusConfig::default().events_max;
    let batches: Vec<redis::Pipeline> = (0..events)
        .collect::<Vec<_>>()
        .chunks(BATCH_EVENTS_MAX)
        .map(|chunk| {
            let mut pipe = redis::pipe();
            for i in chunk {
                pipe.cmd("XADD")
                    .arg(&raw.key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(cap)
                    .arg("*")
                    .arg("id")
                    .arg(format!("r{round}-{i}"))
                    .arg("p")
                    .arg(payload(*i as u64))
                    .ignore();
            }
            pipe
        })
        .collect();
    let mut conn = raw.conn.clone();
    let start = Instant::now();
    for pipe in batches {
        let () = pipe.query_async(&mut conn).await.context("XADD pipeline")?;
    }
    Ok(events as f64 / start.elapsed().as_secs_f64())
}

enum Target {
    Bus(Box<OpenBus>, TenantId),
    RawNats(Box<RawNats>),
    RawRedis(Box<RawRedis>),
}

impl Target {
    async fn open(args: &Args, run: &Run, backend: Backend, what: &str) -> anyhow::Result<Self> {
        Ok(match backend {
            Backend::RawNats => Target::RawNats(Box::new(
                RawNats::open(&args.nats_url, &format!("EB01{}{}", what.to_uppercase(), run.tag.to_uppercase()))
                    .await?,
            )),
            Backend::RawRedis => {
                Target::RawRedis(Box::new(RawRedis::open(&args.redis_url, format!("eb01:{what}:{}", run.tag)).await?))
            }
            _ => Target::Bus(Box::new(open_bus(args, run, backend, what).await?), run.tenant(what)?),
        })
    }

    async fn close(self) {
        match self {
            Target::Bus(bus, _) => bus.close().await,
            Target::RawNats(raw) => raw.close().await,
            Target::RawRedis(raw) => raw.close().await,
        }
    }
}

#[derive(Default)]
struct ThroughputRow {
    per_round: Vec<f64>,
    skipped: Option<String>,
}

async fn part_throughput(args: &Args, run: &Run, out: &mut String) -> anyhow::Result<()> {
    let events = args.events.unwrap_or(if run.quick { 5_000 } else { 50_000 });
    let rounds = args.rounds.unwrap_or(if run.quick { 1 } else { 3 });
    let mut targets: BTreeMap<Backend, Target> = BTreeMap::new();
    let mut rows: BTreeMap<Backend, ThroughputRow> = BTreeMap::new();
    let mut redis_persistence = None;
    for &backend in &args.backends {
        match Target::open(args, run, backend, "tp").await {
            Ok(target) => {
                if let Target::RawRedis(raw) = &target {
                    redis_persistence = Some(raw.persistence().await);
                }
                targets.insert(backend, target);
                rows.insert(backend, ThroughputRow::default());
            }
            Err(e) => {
                progress(format!("throughput, {}: skipped: {e:#}", backend.label()));
                rows.insert(backend, ThroughputRow { skipped: Some(format!("{e:#}")), ..Default::default() });
            }
        }
    }
    let load_before = load_average();
    for round in 0..rounds {
        for (backend, target) in &targets {
            let row = rows.entry(*backend).or_default();
            if row.skipped.is_some() {
                continue;
            }
            let result = match target {
                Target::Bus(open, tenant) => bus_throughput(open.bus.as_ref(), tenant, events, round).await,
                Target::RawNats(raw) => raw_nats_throughput(raw, events, round).await,
                Target::RawRedis(raw) => raw_redis_throughput(raw, events, round).await,
            };
            match result {
                Ok(rate) => {
                    progress(format!("throughput round {round}, {}: {rate:.0} events/s", backend.label()));
                    row.per_round.push(rate);
                }
                Err(e) => {
                    progress(format!("throughput, {}: skipped: {e:#}", backend.label()));
                    row.skipped = Some(format!("{e:#}"));
                }
            }
        }
    }
    let load_after = load_average();
    for (_, target) in targets {
        target.close().await;
    }
    out.push_str(&format!(
        "### 1. Durable ingest in batches of {BATCH_EVENTS_MAX} ({events} events of {PAYLOAD_BYTES} bytes per backend and round, {rounds} round(s), median)\n\n"
    ));
    out.push_str("| backend | events/s (median) | rounds |\n|---|---:|---|\n");
    let mut medians = BTreeMap::new();
    for (backend, row) in &mut rows {
        match &row.skipped {
            Some(why) => out.push_str(&format!("| {} | skipped: {why} | |\n", backend.label())),
            None => {
                let each = row.per_round.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ");
                let m = median(&mut row.per_round.clone());
                medians.insert(*backend, m);
                out.push_str(&format!("| {} | **{m:.0}** | {each} |\n", backend.label()));
            }
        }
    }
    out.push('\n');
    if let (Some(nats), Some(raw)) = (medians.get(&Backend::Nats), medians.get(&Backend::RawNats)) {
        let ratio = nats / raw;
        let met = if ratio >= TARGET_NATS_RATIO { "met" } else { "NOT met" };
        out.push_str(&format!(
            "- ratio NATS bus / raw async-nats: **{ratio:.2}** (target ≥ {TARGET_NATS_RATIO}: {met})\n"
        ));
    }
    if let Some(m) = medians.get(&Backend::EmbeddedSqlite) {
        let met = if *m >= TARGET_EMBEDDED_EVENTS_PER_S { "met" } else { "NOT met" };
        out.push_str(&format!(
            "- embedded bus on SQLite: {m:.0} events/s (target ≥ {TARGET_EMBEDDED_EVENTS_PER_S:.0}: {met})\n"
        ));
    }
    if let Some(p) = redis_persistence {
        out.push_str(&format!("- Redis persistence during the run: {p}\n"));
    }
    out.push_str(&format!("- load average before / after: {load_before} / {load_after}\n\n"));
    Ok(())
}

// --- 2. latency ------------------------------------------------------------------------------

/// Latencies in milliseconds of the events received, by index; what was lost or failed.
#[derive(Default)]
struct LatencyResult {
    latencies_ms: Vec<f64>,
    received: usize,
    expected: usize,
    publish_errors: usize,
    redelivered: usize,
}

/// Records a receipt of event `index` at `now`; returns whether it was new.
fn record(received: &Mutex<HashMap<u64, f64>>, start: Instant, period: Duration, index: u64, now: Instant) -> bool {
    let due = start + period * u32::try_from(index).unwrap_or(u32::MAX);
    let ms = now.saturating_duration_since(due).as_secs_f64() * 1_000.0;
    let mut map = received.lock().unwrap_or_else(|p| p.into_inner());
    map.insert(index, ms).is_none()
}

fn finish_latency(
    received: &Mutex<HashMap<u64, f64>>,
    total: u64,
    warmup: u64,
    publish_errors: usize,
    redelivered: usize,
) -> LatencyResult {
    let map = received.lock().unwrap_or_else(|p| p.into_inner());
    let mut latencies_ms: Vec<f64> = map.iter().filter(|(i, _)| **i >= warmup).map(|(_, ms)| *ms).collect();
    latencies_ms.sort_by(f64::total_cmp);
    LatencyResult {
        latencies_ms,
        received: map.len(),
        expected: usize::try_from(total).unwrap_or(usize::MAX),
        publish_errors,
        redelivered,
    }
}

/// Drives the open-loop schedule: `publish(index)` is spawned at `start + index * period`.
async fn open_loop<F, Fut>(start: Instant, period: Duration, total: u64, publish: F) -> usize
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let inflight = Arc::new(Semaphore::new(LATENCY_INFLIGHT_MAX));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..total {
        tokio::time::sleep_until((start + period * u32::try_from(index).unwrap_or(u32::MAX)).into()).await;
        let Ok(permit) = inflight.clone().acquire_owned().await else { break };
        let fut = publish(index);
        let errors = errors.clone();
        tasks.spawn(async move {
            if let Err(e) = fut.await
                && errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 3
            {
                progress(format!("latency publish failed: {e:#}"));
            }
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    errors.load(std::sync::atomic::Ordering::Relaxed)
}

async fn bus_latency(
    bus: Arc<dyn Bus>,
    tenant: TenantId,
    rate: u64,
    seconds: u64,
    warmup_s: u64,
) -> anyhow::Result<LatencyResult> {
    let spec = ConsumerSpec {
        tenant: tenant.clone(),
        name: "eb01-latency".into(),
        filter: "eb01.>".into(),
        ack_wait_ms: 30_000,
        deliveries_max: 5,
        backoff_ms: vec![],
        start: StartAt::New,
        pending_max: 10_000,
    };
    bus.put_consumer(&spec).await.map_err(|e| anyhow!("put_consumer: {e}"))?;
    let total = rate * seconds;
    let period = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let received = Arc::new(Mutex::new(HashMap::new()));
    let start = Instant::now() + Duration::from_millis(200);
    let redelivered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let consumer = {
        let (bus, tenant, received, redelivered) = (bus.clone(), tenant.clone(), received.clone(), redelivered.clone());
        tokio::spawn(async move {
            let deadline =
                start + period * u32::try_from(total).unwrap_or(u32::MAX) + Duration::from_millis(DRAIN_WAIT_MS_MAX);
            let mut count = 0u64;
            while count < total && Instant::now() < deadline {
                let deliveries =
                    match bus.fetch(&tenant, "eb01-latency", FETCH_MAX, Duration::from_millis(FETCH_WAIT_MS)).await {
                        Ok(d) => d,
                        Err(e) => {
                            progress(format!("latency fetch failed: {e}"));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                let now = Instant::now();
                let mut tokens = Vec::with_capacity(deliveries.len());
                for d in deliveries {
                    match payload_index(&d.event.payload) {
                        Some(i) if record(&received, start, period, i, now) => count += 1,
                        _ => {
                            redelivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    tokens.push(d.token);
                }
                let (bus, tenant) = (bus.clone(), tenant.clone());
                tokio::spawn(async move {
                    for token in tokens {
                        if let Err(e) = bus.ack(&tenant, "eb01-latency", &token, AckKind::Ack).await {
                            progress(format!("latency ack failed: {e}"));
                        }
                    }
                });
            }
        })
    };
    let errors = open_loop(start, period, total, |index| {
        let (bus, tenant) = (bus.clone(), tenant.clone());
        async move {
            let e = event(&tenant, format!("lat-{index}"), "eb01.latency", index);
            bus.publish(std::slice::from_ref(&e)).await.map_err(|e| anyhow!("{e}"))?;
            Ok(())
        }
    })
    .await;
    consumer.await.context("consumer task")?;
    Ok(finish_latency(
        &received,
        total,
        rate * warmup_s,
        errors,
        redelivered.load(std::sync::atomic::Ordering::Relaxed),
    ))
}

async fn raw_nats_latency(raw: &RawNats, rate: u64, seconds: u64, warmup_s: u64) -> anyhow::Result<LatencyResult> {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
    use async_nats::jetstream::message::PublishMessage as Publish;
    let stream = raw.js.get_stream(&raw.stream).await.map_err(|e| anyhow!("get_stream: {e}"))?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("eb01-latency".into()),
            filter_subject: format!("{}.latency", raw.subject_prefix),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::New,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("create_consumer: {e}"))?;
    let mut messages = consumer.messages().await.map_err(|e| anyhow!("messages: {e}"))?;
    let total = rate * seconds;
    let period = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let received = Arc::new(Mutex::new(HashMap::new()));
    let start = Instant::now() + Duration::from_millis(200);
    let redelivered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = {
        let (received, redelivered) = (received.clone(), redelivered.clone());
        tokio::spawn(async move {
            let deadline =
                start + period * u32::try_from(total).unwrap_or(u32::MAX) + Duration::from_millis(DRAIN_WAIT_MS_MAX);
            let mut count = 0u64;
            while count < total {
                let next = tokio::time::timeout_at(deadline.into(), messages.next()).await;
                let Ok(Some(message)) = next else { break };
                let Ok(message) = message else { continue };
                let now = Instant::now();
                match payload_index(&message.payload) {
                    Some(i) if record(&received, start, period, i, now) => count += 1,
                    _ => {
                        redelivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                tokio::spawn(async move {
                    if let Err(e) = message.ack().await {
                        progress(format!("raw NATS ack failed: {e}"));
                    }
                });
            }
        })
    };
    let subject = format!("{}.latency", raw.subject_prefix);
    let errors = open_loop(start, period, total, |index| {
        let (js, subject) = (raw.js.clone(), subject.clone());
        async move {
            let ack = js
                .send_publish(
                    subject,
                    Publish::build().payload(payload(index).into()).message_id(format!("lat-{index}")),
                )
                .await
                .map_err(|e| anyhow!("{e}"))?;
            ack.await.map_err(|e| anyhow!("{e}"))?;
            Ok(())
        }
    })
    .await;
    reader.await.context("reader task")?;
    Ok(finish_latency(
        &received,
        total,
        rate * warmup_s,
        errors,
        redelivered.load(std::sync::atomic::Ordering::Relaxed),
    ))
}

async fn raw_redis_latency(raw: &RawRedis, rate: u64, seconds: u64, warmup_s: u64) -> anyhow::Result<LatencyResult> {
    let mut conn = raw.conn.clone();
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&raw.key)
        .arg("eb01-latency")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .context("XGROUP CREATE")?;
    // XREADGROUP BLOCK holds its connection: the reader gets one of its own.
    let mut reader_conn = raw.client.get_multiplexed_async_connection().await.context("second Redis connection")?;
    let total = rate * seconds;
    let period = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let received = Arc::new(Mutex::new(HashMap::new()));
    let start = Instant::now() + Duration::from_millis(200);
    let redelivered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = {
        let (received, redelivered, key, ack_conn) =
            (received.clone(), redelivered.clone(), raw.key.clone(), raw.conn.clone());
        tokio::spawn(async move {
            let deadline =
                start + period * u32::try_from(total).unwrap_or(u32::MAX) + Duration::from_millis(DRAIN_WAIT_MS_MAX);
            let options = redis::streams::StreamReadOptions::default()
                .group("eb01-latency", "c1")
                .count(FETCH_MAX as usize)
                .block(FETCH_WAIT_MS as usize);
            let mut count = 0u64;
            while count < total && Instant::now() < deadline {
                let reply: redis::RedisResult<Option<redis::streams::StreamReadReply>> =
                    reader_conn.xread_options(&[&key], &[">"], &options).await;
                let reply = match reply {
                    Ok(Some(reply)) => reply,
                    Ok(None) => continue,
                    Err(e) => {
                        progress(format!("XREADGROUP failed: {e}"));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let now = Instant::now();
                let mut ids = Vec::new();
                for entry in reply.keys.into_iter().flat_map(|k| k.ids) {
                    let index = entry.get::<Vec<u8>>("p").and_then(|p| payload_index(&p));
                    match index {
                        Some(i) if record(&received, start, period, i, now) => count += 1,
                        _ => {
                            redelivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    ids.push(entry.id);
                }
                let (mut ack_conn, key) = (ack_conn.clone(), key.clone());
                tokio::spawn(async move {
                    let acked: redis::RedisResult<usize> = ack_conn.xack(&key, "eb01-latency", &ids).await;
                    if let Err(e) = acked {
                        progress(format!("XACK failed: {e}"));
                    }
                });
            }
        })
    };
    let errors = open_loop(start, period, total, |index| {
        let (mut conn, key) = (raw.conn.clone(), raw.key.clone());
        async move {
            let () = redis::cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(BusConfig::default().events_max)
                .arg("*")
                .arg("id")
                .arg(format!("lat-{index}"))
                .arg("p")
                .arg(payload(index))
                .query_async::<String>(&mut conn)
                .await
                .map(|_| ())
                .context("XADD")?;
            Ok(())
        }
    })
    .await;
    reader.await.context("reader task")?;
    Ok(finish_latency(
        &received,
        total,
        rate * warmup_s,
        errors,
        redelivered.load(std::sync::atomic::Ordering::Relaxed),
    ))
}

async fn part_latency(args: &Args, run: &Run, out: &mut String) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(if run.quick { 3 } else { 20 });
    let warmup_s = args.warmup_s.min(seconds.saturating_sub(1));
    let rate = args.rate.max(1);
    out.push_str(&format!(
        "### 2. Publish-to-deliver latency, open loop at {rate} events/s for {seconds} s per backend (first {warmup_s} s excluded)\n\n"
    ));
    out.push_str(
        "| backend | p50 ms | p95 ms | p99 ms | max ms | received / published | publish errors | extra deliveries |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---|---:|---:|\n");
    let load_before = load_average();
    for &backend in &args.backends {
        let target = match Target::open(args, run, backend, "lat").await {
            Ok(t) => t,
            Err(e) => {
                progress(format!("latency, {}: skipped: {e:#}", backend.label()));
                out.push_str(&format!("| {} | skipped: {e:#} | | | | | | |\n", backend.label()));
                continue;
            }
        };
        progress(format!("latency, {}", backend.label()));
        let result = match &target {
            Target::Bus(open, tenant) => bus_latency(open.bus.clone(), tenant.clone(), rate, seconds, warmup_s).await,
            Target::RawNats(raw) => raw_nats_latency(raw, rate, seconds, warmup_s).await,
            Target::RawRedis(raw) => raw_redis_latency(raw, rate, seconds, warmup_s).await,
        };
        target.close().await;
        match result {
            Ok(r) => {
                let l = &r.latencies_ms;
                let p99 = quantile(l, 0.99);
                let mark =
                    |v: f64| if v <= TARGET_P99_MS { format!("**{v:.2}**") } else { format!("**{v:.2}** (over)") };
                out.push_str(&format!(
                    "| {} | {:.2} | {:.2} | {} | {:.2} | {} / {} | {} | {} |\n",
                    backend.label(),
                    quantile(l, 0.50),
                    quantile(l, 0.95),
                    mark(p99),
                    l.last().copied().unwrap_or(f64::NAN),
                    r.received,
                    r.expected,
                    r.publish_errors,
                    r.redelivered
                ));
            }
            Err(e) => {
                progress(format!("latency, {}: failed: {e:#}", backend.label()));
                out.push_str(&format!("| {} | failed: {e:#} | | | | | | |\n", backend.label()));
            }
        }
    }
    out.push_str(&format!(
        "\nTarget p99 ≤ {TARGET_P99_MS} ms for the kernel's backends. Load average before / after: {load_before} / {}\n\n",
        load_average()
    ));
    Ok(())
}

// --- 3. crash recovery -----------------------------------------------------------------------

/// Where the crash part publishes and consumes: the kernel over HTTP, or a bus in process.
#[async_trait]
trait Endpoint: Send + Sync {
    /// Publishes a batch; per event, whether it was a duplicate.
    async fn publish(&self, batch: &[(String, u64)]) -> anyhow::Result<Vec<bool>>;
    /// Creates the consumer group (start: all).
    async fn put_consumer(&self) -> anyhow::Result<()>;
    /// Up to `max` deliveries: (token, event id, delivery number).
    async fn fetch(&self, max: u32, wait_ms: u64) -> anyhow::Result<Vec<(String, String, u32)>>;
    async fn ack(&self, tokens: &[String]) -> anyhow::Result<()>;
    /// Stored event ids from `from_seq` on, with the next `from_seq` (None at the end).
    async fn read(&self, from_seq: u64) -> anyhow::Result<(Vec<String>, Option<u64>)>;
}

const CRASH_CONSUMER: &str = "eb01-crash";
const CRASH_SUBJECT: &str = "eb01.crash";

struct BusEndpoint {
    bus: Arc<dyn Bus>,
    tenant: TenantId,
}

#[async_trait]
impl Endpoint for BusEndpoint {
    async fn publish(&self, batch: &[(String, u64)]) -> anyhow::Result<Vec<bool>> {
        let events: Vec<EventIn> =
            batch.iter().map(|(id, i)| event(&self.tenant, id.clone(), CRASH_SUBJECT, *i)).collect();
        let answers = self.bus.publish(&events).await.map_err(|e| anyhow!("{e}"))?;
        Ok(answers.iter().map(|a| matches!(a, Published::Duplicate { .. })).collect())
    }
    async fn put_consumer(&self) -> anyhow::Result<()> {
        let spec = ConsumerSpec {
            tenant: self.tenant.clone(),
            name: CRASH_CONSUMER.into(),
            filter: "eb01.>".into(),
            ack_wait_ms: CRASH_ACK_WAIT_MS,
            deliveries_max: 100,
            backoff_ms: vec![],
            start: StartAt::All,
            pending_max: 10_000,
        };
        self.bus.put_consumer(&spec).await.map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }
    async fn fetch(&self, max: u32, wait_ms: u64) -> anyhow::Result<Vec<(String, String, u32)>> {
        let got = self
            .bus
            .fetch(&self.tenant, CRASH_CONSUMER, max, Duration::from_millis(wait_ms))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        Ok(got.into_iter().map(|d| (d.token, d.event.id, d.delivery)).collect())
    }
    async fn ack(&self, tokens: &[String]) -> anyhow::Result<()> {
        for token in tokens {
            self.bus.ack(&self.tenant, CRASH_CONSUMER, token, AckKind::Ack).await.map_err(|e| anyhow!("{e}"))?;
        }
        Ok(())
    }
    async fn read(&self, from_seq: u64) -> anyhow::Result<(Vec<String>, Option<u64>)> {
        let range = ReadRange { from_seq: Some(from_seq), limit: READ_EVENTS_MAX, ..ReadRange::default() };
        let events = self.bus.read(&self.tenant, &range).await.map_err(|e| anyhow!("{e}"))?;
        let next = if events.len() < READ_EVENTS_MAX as usize { None } else { events.last().map(|e| e.seq + 1) };
        Ok((events.into_iter().map(|e| e.id).collect(), next))
    }
}

struct HttpEndpoint {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl HttpEndpoint {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut request = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        ensure!(status.is_success(), "{path}: {status}: {text}");
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

#[async_trait]
impl Endpoint for HttpEndpoint {
    async fn publish(&self, batch: &[(String, u64)]) -> anyhow::Result<Vec<bool>> {
        let events: Vec<Value> = batch
            .iter()
            .map(|(id, i)| json!({"id": id, "subject": CRASH_SUBJECT, "payload": {"i": i, "pad": "x".repeat(PAYLOAD_BYTES - 40)}}))
            .collect();
        let answer = self.call(reqwest::Method::POST, "/api/v1/events", Some(json!({ "events": events }))).await?;
        // `results`: one entry per event, in order, `status` accepted or duplicate.
        let entries =
            answer["results"].as_array().ok_or_else(|| anyhow!("publish answer without results: {answer}"))?;
        ensure!(
            entries.len() == batch.len(),
            "publish answer has {} entries for {} events",
            entries.len(),
            batch.len()
        );
        Ok(entries.iter().map(|e| e["status"] == "duplicate").collect())
    }
    async fn put_consumer(&self) -> anyhow::Result<()> {
        let body = json!({"filter": "eb01.>", "ack_wait_ms": CRASH_ACK_WAIT_MS, "deliveries_max": 100, "start": {"from": "all"}});
        self.call(reqwest::Method::PUT, &format!("/api/v1/consumers/{CRASH_CONSUMER}"), Some(body)).await?;
        Ok(())
    }
    async fn fetch(&self, max: u32, wait_ms: u64) -> anyhow::Result<Vec<(String, String, u32)>> {
        let answer = self
            .call(
                reqwest::Method::POST,
                &format!("/api/v1/consumers/{CRASH_CONSUMER}/fetch"),
                Some(json!({"max": max, "wait_ms": wait_ms})),
            )
            .await?;
        let list = answer["deliveries"].as_array().cloned().unwrap_or_default();
        Ok(list
            .iter()
            .filter_map(|d| {
                Some((
                    d["token"].as_str()?.to_string(),
                    d["event"]["id"].as_str()?.to_string(),
                    u32::try_from(d["delivery"].as_u64().unwrap_or(1)).unwrap_or(u32::MAX),
                ))
            })
            .collect())
    }
    async fn ack(&self, tokens: &[String]) -> anyhow::Result<()> {
        let acks: Vec<Value> = tokens.iter().map(|t| json!({"token": t, "kind": "ack"})).collect();
        self.call(
            reqwest::Method::POST,
            &format!("/api/v1/consumers/{CRASH_CONSUMER}/ack"),
            Some(json!({ "acks": acks })),
        )
        .await?;
        Ok(())
    }
    async fn read(&self, from_seq: u64) -> anyhow::Result<(Vec<String>, Option<u64>)> {
        let limit = 1_000u64;
        let answer =
            self.call(reqwest::Method::GET, &format!("/api/v1/events?from_seq={from_seq}&limit={limit}"), None).await?;
        let list = answer["items"].as_array().cloned().unwrap_or_default();
        let ids = list.iter().filter_map(|e| e["id"].as_str().map(String::from)).collect();
        let next = answer["next_from_seq"].as_u64();
        Ok((ids, next))
    }
}

/// What happened before the kill, as seen by the publishers and the consumer.
enum Record {
    Sent(u64),
    Acked(u64),
    Consumed(String),
}

fn batch_ids(run: &str, batch: u64) -> Vec<(String, u64)> {
    let n = CRASH_BATCH_EVENTS as u64;
    (0..n).map(|i| (format!("{run}-b{batch}-e{i}"), batch * n + i)).collect()
}

/// Publishes batches from [`CRASH_PUBLISHERS`] publishers and consumes them until stopped.
async fn crash_load(endpoint: Arc<dyn Endpoint>, run: String, records: mpsc::UnboundedSender<Record>) {
    let next_batch = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CRASH_PUBLISHERS {
        let (endpoint, run, records, next_batch) = (endpoint.clone(), run.clone(), records.clone(), next_batch.clone());
        tasks.spawn(async move {
            loop {
                let batch = next_batch.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if records.send(Record::Sent(batch)).is_err() {
                    return;
                }
                match endpoint.publish(&batch_ids(&run, batch)).await {
                    Ok(_) => {
                        if records.send(Record::Acked(batch)).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
    }
    let (endpoint, records) = (endpoint.clone(), records.clone());
    tasks.spawn(async move {
        loop {
            let Ok(deliveries) = endpoint.fetch(FETCH_MAX, FETCH_WAIT_MS).await else { return };
            let tokens: Vec<String> = deliveries.iter().map(|(token, _, _)| token.clone()).collect();
            if endpoint.ack(&tokens).await.is_err() {
                return;
            }
            for (_, id, _) in deliveries {
                if records.send(Record::Consumed(id)).is_err() {
                    return;
                }
            }
        }
    });
    while tasks.join_next().await.is_some() {}
}

/// The counts the crash part reports for one backend.
#[derive(Default, Debug)]
struct CrashResult {
    mode: String,
    batches_acked: usize,
    events_acked: usize,
    consumed_before: usize,
    stored: usize,
    acked_missing: usize,
    stored_twice: usize,
    republished_batches: usize,
    republished_duplicates: usize,
    republished_accepted: usize,
    delivered_after: usize,
    delivered_again_after_ack: usize,
    never_delivered: usize,
}

async fn crash_analyse(
    endpoint: Arc<dyn Endpoint>,
    run: &str,
    acked: &BTreeSet<u64>,
    sent: &BTreeSet<u64>,
    consumed: &BTreeSet<String>,
    mode: String,
) -> anyhow::Result<CrashResult> {
    let mut r = CrashResult { mode, batches_acked: acked.len(), consumed_before: consumed.len(), ..Default::default() };
    r.events_acked = acked.len() * CRASH_BATCH_EVENTS;
    // Re-publish every batch sent but not acknowledged (same ids).
    for batch in sent.difference(acked) {
        let dup = endpoint.publish(&batch_ids(run, *batch)).await.context("re-publishing after the restart")?;
        r.republished_batches += 1;
        r.republished_duplicates += dup.iter().filter(|d| **d).count();
        r.republished_accepted += dup.iter().filter(|d| !**d).count();
    }
    // What is stored, once or more.
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut from = 1u64;
    loop {
        let (ids, next) = endpoint.read(from).await.context("reading the log")?;
        // Only this run's events: a kernel on a shared NATS server may hold others.
        for id in ids.into_iter().filter(|id| id.starts_with(&format!("{run}-"))) {
            *counts.entry(id).or_default() += 1;
        }
        match next {
            Some(n) => from = n,
            None => break,
        }
    }
    r.stored = counts.len();
    r.stored_twice = counts.values().filter(|c| **c > 1).count();
    r.acked_missing = acked.iter().flat_map(|b| batch_ids(run, *b)).filter(|(id, _)| !counts.contains_key(id)).count();
    // Drain the consumer group.
    let mut delivered: BTreeSet<String> = consumed.clone();
    let mut empty = 0;
    let mut seen = 0usize;
    while empty < CRASH_EMPTY_FETCHES_MAX && seen < CRASH_DELIVERIES_MAX {
        let got = endpoint.fetch(FETCH_MAX, CRASH_ACK_WAIT_MS + 500).await.context("fetch after the restart")?;
        if got.is_empty() {
            empty += 1;
            continue;
        }
        empty = 0;
        let tokens: Vec<String> = got.iter().map(|(t, _, _)| t.clone()).collect();
        for (_, id, _) in got {
            seen += 1;
            r.delivered_after += 1;
            if consumed.contains(&id) {
                r.delivered_again_after_ack += 1;
            }
            delivered.insert(id);
        }
        endpoint.ack(&tokens).await.context("ack after the restart")?;
    }
    r.never_delivered = counts.keys().filter(|id| !delivered.contains(*id)).count();
    Ok(r)
}

/// Child side of the adapter-level crash test: runs until killed.
async fn crash_child(database_url: &str, tenant: &str, run: &str) -> anyhow::Result<()> {
    let store = open_store(database_url).await?;
    let bus = embedded_bus(&store).await?;
    let endpoint: Arc<dyn Endpoint> =
        Arc::new(BusEndpoint { bus, tenant: TenantId::from_str(tenant).map_err(|e| anyhow!("{e}"))? });
    endpoint.put_consumer().await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let load = tokio::spawn(crash_load(endpoint, run.to_string(), tx));
    println!("ready");
    let mut stdout = std::io::stdout().lock();
    while let Some(record) = rx.recv().await {
        let line = match record {
            Record::Sent(b) => format!("sent {b}"),
            Record::Acked(b) => format!("acked {b}"),
            Record::Consumed(id) => format!("consumed {id}"),
        };
        writeln!(stdout, "{line}")?;
        stdout.flush()?;
    }
    drop(stdout);
    load.await?;
    Ok(())
}

async fn crash_adapter(args: &Args, run: &Run, kill_after: Duration) -> anyhow::Result<CrashResult> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("nops.db").display());
    let tenant = run.tenant("crash")?;
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args(["crash-child", "--database-url", &url, "--tenant", tenant.as_str(), "--run", &run.tag])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the crash child")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.context("child not ready")??;
    ensure!(ready.as_deref() == Some("ready"), "child said {ready:?}");
    let collected = Arc::new(Mutex::new((BTreeSet::new(), BTreeSet::new(), BTreeSet::new())));
    let reader = {
        let collected = collected.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut c = collected.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(b) = line.strip_prefix("sent ").and_then(|b| b.parse::<u64>().ok()) {
                    c.2.insert(b);
                } else if let Some(b) = line.strip_prefix("acked ").and_then(|b| b.parse::<u64>().ok()) {
                    c.0.insert(b);
                } else if let Some(id) = line.strip_prefix("consumed ") {
                    c.1.insert(id.to_string());
                }
            }
        })
    };
    tokio::time::sleep(kill_after).await;
    child.start_kill().context("SIGKILL")?;
    child.wait().await?;
    reader.await?;
    let (acked, consumed, sent) = std::mem::take(&mut *collected.lock().unwrap_or_else(|p| p.into_inner()));
    let store = open_store(&url).await?;
    let bus = embedded_bus(&store).await?;
    let endpoint: Arc<dyn Endpoint> = Arc::new(BusEndpoint { bus, tenant });
    let result = crash_analyse(
        endpoint,
        &run.tag,
        &acked,
        &sent,
        &consumed,
        "child process publishing through `EmbeddedBus`, SQLite".into(),
    )
    .await;
    store.close().await;
    let _ = args;
    result
}

/// A `nops serve` process.
struct Kernel {
    child: tokio::process::Child,
}

async fn start_kernel(
    args: &Args,
    data_dir: &std::path::Path,
    port: u16,
    extra_env: &[(String, String)],
) -> anyhow::Result<(Kernel, String)> {
    let stderr_path = data_dir.join(format!("kernel-{}.err", Instant::now().elapsed().as_nanos() + u128::from(port)));
    let err_file = std::fs::File::create(&stderr_path)?;
    let mut cmd = tokio::process::Command::new(&args.nops_bin);
    cmd.arg("serve")
        .env_remove("NOPS_CONFIG")
        .env_remove("NOPS_DATABASE_URL")
        .env_remove("NOPS_NATS_URL")
        .env("NOPS_DATA_DIR", data_dir)
        .env("NOPS_LISTEN", format!("127.0.0.1:{port}"))
        .env("NOPS_LOG", "warn")
        .env("NOPS_RATE_LIMITS_ENABLED", "false")
        .stdout(Stdio::null())
        .stderr(err_file)
        .kill_on_drop(true);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {}", args.nops_bin.display()))?;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_millis(KERNEL_START_WAIT_MS_MAX);
    loop {
        if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/ready")).send().await
            && r.status().is_success()
        {
            break;
        }
        if let Some(status) = child.try_wait()? {
            bail!("kernel exited ({status}): {}", std::fs::read_to_string(&stderr_path).unwrap_or_default());
        }
        ensure!(Instant::now() < deadline, "kernel not ready after {KERNEL_START_WAIT_MS_MAX} ms");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let key = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .find(|w| w.starts_with("nops_") && nops_core::auth::is_well_formed_api_key(w))
        .map(String::from)
        .unwrap_or_default();
    Ok((Kernel { child }, key))
}

async fn crash_http(
    args: &Args,
    run: &Run,
    kill_after: Duration,
    nats: bool,
    port: u16,
) -> anyhow::Result<CrashResult> {
    let dir = tempfile::tempdir()?;
    let mut env = Vec::new();
    let mut nats_prefix = None;
    if nats {
        let prefix = format!("EB01C{}", run.tag.to_uppercase());
        env.push(("NOPS_NATS_URL".to_string(), args.nats_url.clone()));
        env.push(("NOPS_NATS_PREFIX".to_string(), prefix.clone()));
        nats_prefix = Some(prefix);
    }
    let (mut kernel, key) = start_kernel(args, dir.path(), port, &env).await?;
    ensure!(!key.is_empty(), "no bootstrap key on the kernel's stderr");
    let http = reqwest::Client::builder().timeout(Duration::from_millis(HTTP_TIMEOUT_MS)).build()?;
    let endpoint: Arc<dyn Endpoint> =
        Arc::new(HttpEndpoint { http, base: format!("http://127.0.0.1:{port}"), key: key.clone() });
    // Probe: the events API answers a batch.
    endpoint.publish(&[(format!("{}-probe", run.tag), 0)]).await.context("the kernel's events API")?;
    endpoint.put_consumer().await.context("the kernel's consumer API")?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let load = tokio::spawn(crash_load(endpoint.clone(), run.tag.clone(), tx));
    let mut sent = BTreeSet::new();
    let mut acked = BTreeSet::new();
    let mut consumed = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + kill_after;
    loop {
        tokio::select! {
            record = rx.recv() => match record {
                Some(Record::Sent(b)) => { sent.insert(b); }
                Some(Record::Acked(b)) => { acked.insert(b); }
                Some(Record::Consumed(id)) => { consumed.insert(id); }
                None => break,
            },
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    // SIGKILL with requests in flight; answers that arrive after this instant are not counted
    // as acknowledged (the kernel is gone, so none will).
    kernel.child.start_kill().context("SIGKILL")?;
    kernel.child.wait().await?;
    while let Ok(record) = rx.try_recv() {
        match record {
            Record::Sent(b) => {
                sent.insert(b);
            }
            Record::Acked(b) => {
                acked.insert(b);
            }
            Record::Consumed(id) => {
                consumed.insert(id);
            }
        }
    }
    load.abort();
    let (kernel2, _) = start_kernel(args, dir.path(), port, &env).await?;
    let mode = if nats {
        "`nops serve` with `NOPS_NATS_URL`, over HTTP"
    } else {
        "`nops serve`, embedded bus on SQLite, over HTTP"
    };
    let result = crash_analyse(endpoint, &run.tag, &acked, &sent, &consumed, mode.into()).await;
    drop(kernel2);
    if let Some(prefix) = nats_prefix
        && let Ok(client) = async_nats::connect(&args.nats_url).await
    {
        let js = async_nats::jetstream::new(client);
        let mut names = js.stream_names();
        let mut doomed = Vec::new();
        while let Some(Ok(name)) = names.next().await {
            if name.starts_with(&prefix) {
                doomed.push(name);
            }
        }
        for name in doomed {
            let _ = js.delete_stream(&name).await;
        }
    }
    result
}

async fn part_crash(args: &Args, run: &Run, out: &mut String) -> anyhow::Result<()> {
    let kill_after = Duration::from_millis(args.kill_after_ms.unwrap_or(if run.quick { 1_500 } else { 3_000 }));
    out.push_str(&format!(
        "### 3. Crash recovery: SIGKILL after {} ms of publishing ({CRASH_PUBLISHERS} publishers, batches of {CRASH_BATCH_EVENTS}, one consumer group acking), restart on the same data\n\n",
        kill_after.as_millis()
    ));
    out.push_str("| setup | batches acked | acked events lost | stored twice | re-published batches: duplicate / accepted events | consumed before kill | delivered after restart | of them already acked before | stored but never delivered |\n");
    out.push_str("|---|---:|---:|---:|---|---:|---:|---:|---:|\n");
    let mut results = Vec::new();
    let wants = |b: Backend| args.backends.contains(&b);
    let have_bin = args.nops_bin.exists();
    if wants(Backend::EmbeddedSqlite) {
        let http = if have_bin {
            crash_http(args, run, kill_after, false, 7461).await
        } else {
            Err(anyhow!("{} not built", args.nops_bin.display()))
        };
        match http {
            Ok(r) => results.push(r),
            Err(e) => {
                progress(format!(
                    "crash over HTTP, embedded: skipped: {e:#}; crashing a child process publishing through the bus instead"
                ));
                out.push_str(&format!("| `nops serve`, embedded, over HTTP | skipped: {e:#} | | | | | | | |\n"));
                match crash_adapter(args, run, kill_after).await {
                    Ok(r) => results.push(r),
                    Err(e) => out.push_str(&format!("| child process, embedded | failed: {e:#} | | | | | | | |\n")),
                }
            }
        }
    }
    if wants(Backend::Nats) {
        let http = if have_bin {
            crash_http(args, run, kill_after, true, 7462).await
        } else {
            Err(anyhow!("{} not built", args.nops_bin.display()))
        };
        match http {
            Ok(r) => results.push(r),
            Err(e) => {
                progress(format!("crash over HTTP, NATS: skipped: {e:#}"));
                out.push_str(&format!("| `nops serve` with NATS, over HTTP | skipped: {e:#} | | | | | | | |\n"));
            }
        }
    }
    for r in &results {
        out.push_str(&format!(
            "| {} | {} ({} events) | **{}** | **{}** | {} batches: {} / {} | {} | {} | {} | {} |\n",
            r.mode,
            r.batches_acked,
            r.events_acked,
            r.acked_missing,
            r.stored_twice,
            r.republished_batches,
            r.republished_duplicates,
            r.republished_accepted,
            r.consumed_before,
            r.delivered_after,
            r.delivered_again_after_ack,
            r.never_delivered
        ));
    }
    out.push_str(&format!(
        "\nStored after the restart and re-publishing: {}. Load average after: {}\n\n",
        results.iter().map(|r| format!("{} events ({})", r.stored, r.mode)).collect::<Vec<_>>().join("; "),
        load_average()
    ));
    Ok(())
}

// --- main ------------------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async_main(args))
}

async fn async_main(args: Args) -> anyhow::Result<()> {
    if let Some(Command::CrashChild { database_url, tenant, run }) = &args.command {
        return crash_child(database_url, tenant, run).await;
    }
    let tag = format!("{:x}", SystemClock.now_ms());
    let run = Run { tag, quick: args.quick };
    let mut out = String::new();
    out.push_str(&format!(
        "## EB01 run {} of {}, {} cores{}\n\nCommand: `{}`. Load average at start: {}.\n\n",
        run.tag,
        std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if run.quick { ", --quick" } else { "" },
        std::env::args().collect::<Vec<_>>().join(" "),
        load_average()
    ));
    if args.parts.contains(&Part::Throughput) {
        part_throughput(&args, &run, &mut out).await?;
    }
    if args.parts.contains(&Part::Latency) {
        part_latency(&args, &run, &mut out).await?;
    }
    if args.parts.contains(&Part::Crash) {
        part_crash(&args, &run, &mut out).await?;
    }
    print!("{out}");
    Ok(())
}
