//! Route decisions over 1,000 candidates: `RoutingService::route` with the reference scorer
//! plugin (`scorer_weighted.wasm`, active as `default/scorer`) against the built-in
//! power-of-two-choices in the same run.
//!
//! The kernel's pieces are the real ones, in process: a SQLite store in a temporary
//! directory, the registry (agents registered through it, so its routing index and health
//! table are what a served kernel has), heartbeats with varied load, the wasm runtime and the
//! plugin service. Each timed decision filters every candidate (capability, version, labels,
//! freshness, breaker), builds 1,000 scorer candidates, calls the plugin, and picks the best.
//! Both figures are measured in interleaved rounds, so load from elsewhere hits them alike.
//!
//! Needs `scorer_weighted.wasm` from `scripts/build-plugins.sh`; run from the repository root.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, anyhow, ensure};
use clap::Parser;
use nops_core::agent::{Capability, Load, NewAgent};
use nops_core::clock::ManualClock;
use nops_core::health::{HealthConfig, HealthTable};
use nops_core::metrics::Metrics;
use nops_core::plugin::service::{PluginConfig, PluginService};
use nops_core::plugin::{Grants, Limits, Manifest, PluginKind, digest};
use nops_core::registry::{Registry, RegistryConfig};
use nops_core::routing::{CapabilityRequirement, RouteRequest, RoutingConfig, RoutingService};
use nops_core::store::Store;
use nops_core::tenant::TenantId;
use nops_runtime::{Runtime, RuntimeConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The target the plugin figure is read against (reported, never asserted).
const TARGET_PLUGIN_P99_US: f64 = 200.0;

#[derive(Debug, Parser)]
#[command(about = "Times route decisions through the scorer plugin against the built-in fallback")]
struct Args {
    /// Candidate agents registered.
    #[arg(long, default_value_t = 1_000)]
    agents: usize,
    /// Timed decisions per figure, spread over the rounds.
    #[arg(long, default_value_t = 20_000)]
    decisions: usize,
    /// Rounds the decisions are interleaved in.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Untimed decisions per figure before timing.
    #[arg(long, default_value_t = 1_000)]
    warmup: usize,
    /// Grant the scorer `storage` (it then reads its weights from the store on every call).
    #[arg(long)]
    storage: bool,
    /// Where the components are.
    #[arg(long, default_value = "target/wasm/wasm32-wasip2/release")]
    wasm_dir: PathBuf,
}

/// Latencies of one figure, in nanoseconds.
struct Figure(Vec<u64>);

impl Figure {
    fn quantile_us(&mut self, q: f64) -> f64 {
        self.0.sort_unstable();
        let last = self.0.len().saturating_sub(1);
        let i = ((last as f64) * q).round() as usize;
        self.0.get(i).copied().unwrap_or(0) as f64 / 1_000.0
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.rounds > 0 && args.decisions >= args.rounds, "too few decisions");
    let load_before = load_average();
    let dir = tempfile::tempdir()?;
    let sql = nops_store::SqlStore::open(&nops_store::StoreConfig {
        database_url: format!("sqlite://{}", dir.path().join("bench.db").display()),
        ..Default::default()
    })
    .await?;
    let store: Arc<dyn Store> = Arc::new(sql.clone());
    // A stopped clock: no agent goes stale while the bench runs.
    let clock = ManualClock::new(1_767_225_600_000);
    let metrics = Metrics::new();
    let registry_config = RegistryConfig::default();
    let health = Arc::new(HealthTable::new(
        HealthConfig { stale_after_ms: registry_config.ttl.stale_after_ms, ..HealthConfig::default() },
        Arc::new(clock.clone()),
        metrics.clone(),
    ));
    let registry = Arc::new(
        Registry::new(store.clone(), Arc::new(clock.clone()), metrics.clone(), registry_config)
            .map_err(|e| anyhow!("{e}"))?
            .with_health(health.clone()),
    );
    let tenant = TenantId::default_tenant();

    // --- agents: 1,000 with the capability, in two zones, with varied load ---------------
    let started = Instant::now();
    let mut ids = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        let agent = registry
            .create(
                &tenant,
                NewAgent {
                    name: format!("agent-{i:05}"),
                    endpoint: Some(format!("http://10.0.{}.{}:8080", i / 250, i % 250)),
                    labels: BTreeMap::from([("zone".to_string(), format!("zone-{}", i % 2))]),
                    capabilities: vec![Capability {
                        name: "inference.llm".into(),
                        version: semver::Version::new(1, (i % 5) as u64, 0),
                        params: serde_json::json!({}),
                    }],
                },
            )
            .await
            .map_err(|e| anyhow!("registering: {e}"))?;
        ids.push(agent.id);
    }
    for round in 0..2u64 {
        for (i, id) in ids.iter().enumerate() {
            let i = i as u64;
            let load = Load {
                in_flight_tasks: (i % 13) as u32,
                cpu_ratio: Some((i % 10) as f64 / 10.0),
                latency_ms: Some(5.0 + (i % 50) as f64 * 4.0),
                error_count: round * (i % 7),
                request_count: round * 100,
                ..Load::default()
            };
            registry.heartbeat(&tenant, *id, load).await.map_err(|e| anyhow!("heartbeat: {e}"))?;
        }
        clock.advance_ms(1_000);
    }
    registry.flush_heartbeats().await.map_err(|e| anyhow!("flush: {e}"))?;
    let setup_s = started.elapsed().as_secs_f64();

    // --- the scorer plugin, uploaded and activated as an operator would -------------------
    let runtime = Runtime::new(
        &RuntimeConfig { cache_dir: None, ..RuntimeConfig::default() },
        Arc::new(sql.clone()),
        Arc::new(sql.clone()),
    )
    .map_err(|e| anyhow!("starting the runtime: {e:#}"))?;
    let plugins = Arc::new(PluginService::new(
        store.clone(),
        Arc::new(runtime),
        Arc::new(clock.clone()),
        metrics.clone(),
        PluginConfig::default(),
    ));
    let path = args.wasm_dir.join("scorer_weighted.wasm");
    let wasm =
        std::fs::read(&path).with_context(|| format!("reading {} (run from the repository root)", path.display()))?;
    let manifest = Manifest {
        name: "scorer".into(),
        version: semver::Version::new(1, 0, 0),
        kind: PluginKind::Scorer,
        digest: digest(&wasm),
        config: None,
        config_digest: None,
        grants: Grants { storage: args.storage, ..Grants::default() },
        limits: Limits::default(),
        signature: None,
    };
    plugins.upload(&tenant, "bench", manifest, wasm, None).await.map_err(|e| anyhow!("upload: {e}"))?;
    plugins
        .activate(&tenant, "scorer", &semver::Version::new(1, 0, 0), "bench")
        .await
        .map_err(|e| anyhow!("activate: {e}"))?;

    let config = RoutingConfig::default();
    let with_plugin =
        RoutingService::new(registry.clone(), Some(plugins.clone()), health.clone(), metrics.clone(), config.clone());
    let builtin = RoutingService::new(registry.clone(), None, health.clone(), metrics.clone(), config);
    let request = RouteRequest {
        capabilities: vec![CapabilityRequirement { name: "inference.llm".into(), version: "^1".parse()? }],
        ..RouteRequest::default()
    };

    // Check once: every agent is a candidate, and the plugin answers.
    let decision = with_plugin.route(&tenant, &request).await.map_err(|e| anyhow!("route: {e}"))?;
    ensure!(!decision.fallback && decision.scorer.starts_with("plugin:"), "the plugin did not answer: {decision:?}");
    ensure!(decision.matched as usize == args.agents && decision.excluded == 0, "{decision:?}");
    let candidates = decision.matched;
    let decision = builtin.route(&tenant, &request).await.map_err(|e| anyhow!("route: {e}"))?;
    ensure!(decision.scorer == "builtin:p2c", "{decision:?}");

    for _ in 0..args.warmup {
        std::hint::black_box(with_plugin.route(&tenant, &request).await.map_err(|e| anyhow!("{e}"))?);
        std::hint::black_box(builtin.route(&tenant, &request).await.map_err(|e| anyhow!("{e}"))?);
    }
    let per_round = args.decisions / args.rounds;
    let mut plugin_ns = Figure(Vec::with_capacity(args.decisions));
    let mut builtin_ns = Figure(Vec::with_capacity(args.decisions));
    let wall = Instant::now();
    for _ in 0..args.rounds {
        for _ in 0..per_round {
            let t = Instant::now();
            let d = with_plugin.route(&tenant, &request).await.map_err(|e| anyhow!("{e}"))?;
            plugin_ns.0.push(t.elapsed().as_nanos() as u64);
            ensure!(!d.fallback && d.chosen.len() == 1, "{d:?}");
        }
        for _ in 0..per_round {
            let t = Instant::now();
            let d = builtin.route(&tenant, &request).await.map_err(|e| anyhow!("{e}"))?;
            builtin_ns.0.push(t.elapsed().as_nanos() as u64);
            ensure!(d.chosen.len() == 1, "{d:?}");
        }
    }
    let wall_s = wall.elapsed().as_secs_f64();
    let (pp50, pp95, pp99) = (plugin_ns.quantile_us(0.50), plugin_ns.quantile_us(0.95), plugin_ns.quantile_us(0.99));
    let (bp50, bp95, bp99) = (builtin_ns.quantile_us(0.50), builtin_ns.quantile_us(0.95), builtin_ns.quantile_us(0.99));
    println!(
        "route-bench: {candidates} candidates, {} timed decisions per figure in {} rounds",
        per_round * args.rounds,
        args.rounds
    );
    println!(
        "setup: {} agents registered and 2 heartbeats each in {setup_s:.1} s; timing took {wall_s:.1} s",
        args.agents
    );
    println!(
        "scorer grants: {}",
        if args.storage { "storage (weights read per call)" } else { "none (default weights)" }
    );
    println!("load average before: {load_before}, after: {}", load_average());
    println!();
    println!("| figure | p50 µs | p95 µs | p99 µs |");
    println!("|---|---:|---:|---:|");
    println!("| route via scorer plugin | {pp50:.1} | {pp95:.1} | {pp99:.1} |");
    println!("| route via built-in p2c | {bp50:.1} | {bp95:.1} | {bp99:.1} |");
    println!("| ratio plugin / p2c | {:.2} | {:.2} | {:.2} |", pp50 / bp50, pp95 / bp95, pp99 / bp99);
    println!();
    println!(
        "target: p99 ≤ {TARGET_PLUGIN_P99_US} µs through the plugin: {}",
        if pp99 <= TARGET_PLUGIN_P99_US { "met" } else { "NOT met" }
    );
    Ok(())
}
