//! Plugin runtime figures: a 100-candidate scoring call through the runtime (fresh store and
//! pooled instantiation per call, as the kernel does), against the same weighted-sum logic in
//! native Rust, in the same run. Needs `scripts/build-plugins.sh` first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use nops_runtime::{Candidate, Grants, PluginLimits, Runtime, RuntimeConfig, Task};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Calls per measurement.
    #[arg(long, default_value_t = 20_000)]
    calls: usize,
    /// Candidates per call.
    #[arg(long, default_value_t = 100)]
    candidates: u32,
    /// The scorer component.
    #[arg(long, default_value = "target/wasm/wasm32-wasip2/release/scorer_weighted.wasm")]
    wasm: std::path::PathBuf,
}

/// The reference scorer's logic, natively (default weights).
fn native_score(candidates: &[Candidate]) -> Vec<f32> {
    candidates
        .iter()
        .map(|c| {
            let load = 1.0 / (1.0 + c.in_flight as f32 / 4.0);
            let latency = 1.0 / (1.0 + c.latency_ms.max(0.0) / 100.0);
            let errors = 1.0 - c.error_rate.clamp(0.0, 1.0);
            0.4 * c.health.clamp(0.0, 1.0) + 0.3 * load + 0.2 * latency + 0.1 * errors
        })
        .collect()
}

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6;
    (at(0.50), at(0.99), samples.iter().map(Duration::as_secs_f64).sum::<f64>() / samples.len() as f64 * 1e6)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let store = nops_store::SqlStore::open(&nops_store::StoreConfig {
        database_url: format!("sqlite://{}", dir.path().join("bench.db").display()),
        ..Default::default()
    })
    .await?;
    let runtime = Runtime::new(&RuntimeConfig::default(), Arc::new(store)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let wasm = std::fs::read(&args.wasm)?;
    let started = Instant::now();
    let scorer = runtime.load_scorer("scorer-weighted", &wasm, PluginLimits::default(), Grants::default())?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let candidates: Vec<Candidate> = (0..args.candidates)
        .map(|i| Candidate {
            index: i,
            health: (i % 10) as f32 / 10.0,
            in_flight: i % 7,
            cpu_ratio: 0.5,
            latency_ms: (i % 13) as f32 * 10.0,
            error_rate: (i % 5) as f32 / 100.0,
            silence_ms: 1_000,
            version: (1, 4, 0),
        })
        .collect();
    let task = Task { capabilities: vec!["inference.llm".into()], hints: Vec::new() };
    // Same answer both ways.
    let wasm_scores = scorer.score("bench", &task, &candidates).await?;
    anyhow::ensure!(wasm_scores == native_score(&candidates), "the plugin and the native logic disagree");
    for _ in 0..1_000 {
        scorer.score("bench", &task, &candidates).await?;
    }
    let mut through_runtime = Vec::with_capacity(args.calls);
    for _ in 0..args.calls {
        let t = Instant::now();
        std::hint::black_box(scorer.score("bench", &task, &candidates).await?);
        through_runtime.push(t.elapsed());
    }
    let mut native = Vec::with_capacity(args.calls);
    for _ in 0..args.calls {
        let t = Instant::now();
        std::hint::black_box(native_score(std::hint::black_box(&candidates)));
        native.push(t.elapsed());
    }
    let (w50, w99, wmean) = percentiles(through_runtime);
    let (n50, n99, nmean) = percentiles(native);
    println!("load (compile + pre-instantiate): {load_ms:.1} ms");
    println!("| path | p50 | p99 | mean |");
    println!("|---|---:|---:|---:|");
    println!("| {}-candidate score through the runtime | {w50:.1} µs | {w99:.1} µs | {wmean:.1} µs |", args.candidates);
    println!("| same logic, native Rust | {n50:.2} µs | {n99:.2} µs | {nmean:.2} µs |");
    println!("ratio runtime/native (mean): {:.0}x", wmean / nmean);
    Ok(())
}
