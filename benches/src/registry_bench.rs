//! Load generator for the registry benchmarks. Talks to a running kernel over HTTP from its
//! own process.
//!
//! - `seed`: registers N agents (with capabilities spread over a fixed set of names and
//!   versions) and writes their ids, one per line, for the heartbeat load script.
//! - `heartbeat-all`: sends one heartbeat per seeded agent.
//! - `query`: runs capability queries with a version requirement and prints the latency
//!   distribution.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
struct Cli {
    /// The kernel's base URL.
    #[arg(long, default_value = "http://127.0.0.1:7420")]
    base: String,
    /// An admin API key.
    #[arg(long, env = "NOPS_KEY")]
    key: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register agents and write their ids to a file.
    Seed {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Distinct capability names (each agent gets three of them).
        #[arg(long, default_value_t = 20)]
        capabilities: usize,
        #[arg(long)]
        ids_out: std::path::PathBuf,
    },
    /// Send one heartbeat per agent listed in a file.
    HeartbeatAll {
        #[arg(long)]
        ids: std::path::PathBuf,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Time capability queries.
    Query {
        #[arg(long, default_value_t = 2000)]
        queries: usize,
        #[arg(long, default_value_t = 20)]
        capabilities: usize,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

/// Versions handed out round-robin; `^1.2` matches half of them.
const VERSIONS: [&str; 4] = ["1.1.0", "1.2.3", "1.4.0", "2.0.1"];

/// Runs `task(i)` for every `i` in `0..count`, at most `concurrency` at a time; stops at the
/// first error.
async fn for_each_index<F, Fut>(count: usize, concurrency: usize, task: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (next, task) = (next.clone(), task.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                task(i).await?;
            }
        }));
    }
    for worker in workers {
        worker.await??;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    match cli.command {
        Command::Seed { agents, concurrency, capabilities, ids_out } => {
            let started = Instant::now();
            let ids = Arc::new(std::sync::Mutex::new(Vec::with_capacity(agents)));
            let (base, key, sink) = (cli.base.clone(), cli.key.clone(), ids.clone());
            for_each_index(agents, concurrency, move |i| {
                let (http, base, key, sink) = (http.clone(), base.clone(), key.clone(), sink.clone());
                async move {
                    let caps: Vec<Value> = (0..3)
                        .map(|j| {
                            json!({
                                "name": format!("cap.c{}", (i + j * 7) % capabilities),
                                "version": VERSIONS[(i / capabilities + j) % VERSIONS.len()],
                                "params": {"model": "m"}
                            })
                        })
                        .collect();
                    let body = json!({
                        "name": format!("agent-{i:06}"),
                        "endpoint": format!("http://10.{}.{}.{}:8080", i / 65536 % 256, i / 256 % 256, i % 256),
                        "labels": {"zone": format!("z{}", i % 8), "tier": if i % 2 == 0 { "gold" } else { "silver" }},
                        "capabilities": caps,
                    });
                    let response =
                        http.post(format!("{base}/api/v1/agents")).bearer_auth(&key).json(&body).send().await?;
                    if response.status() != 201 {
                        bail!("create returned {}: {}", response.status(), response.text().await.unwrap_or_default());
                    }
                    let agent: Value = response.json().await?;
                    let id = agent["id"].as_str().context("id")?.to_string();
                    sink.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push(id);
                    Ok(())
                }
            })
            .await?;
            let ids = ids.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            std::fs::write(&ids_out, ids.join("\n") + "\n")?;
            let secs = started.elapsed().as_secs_f64();
            println!("seeded {} agents in {secs:.1} s ({:.0}/s)", ids.len(), ids.len() as f64 / secs);
        }
        Command::HeartbeatAll { ids, concurrency } => {
            let ids: Arc<Vec<String>> =
                Arc::new(std::fs::read_to_string(ids)?.lines().filter(|l| !l.is_empty()).map(String::from).collect());
            let started = Instant::now();
            let (base, key, all) = (cli.base.clone(), cli.key.clone(), ids.clone());
            for_each_index(ids.len(), concurrency, move |i| {
                let (http, base, key, all) = (http.clone(), base.clone(), key.clone(), all.clone());
                async move {
                    let id = &all[i];
                    let body =
                        json!({"in_flight_tasks": i % 5, "cpu_ratio": 0.5, "latency_ms": 12.0, "request_count": 10});
                    let r = http
                        .post(format!("{base}/api/v1/agents/{id}/heartbeat"))
                        .bearer_auth(&key)
                        .json(&body)
                        .send()
                        .await?;
                    if r.status() != 200 {
                        bail!("heartbeat returned {}", r.status());
                    }
                    Ok(())
                }
            })
            .await?;
            println!("{} heartbeats in {:.1} s", ids.len(), started.elapsed().as_secs_f64());
        }
        Command::Query { queries, capabilities, limit } => {
            let mut latencies = Vec::with_capacity(queries);
            let mut matched = 0usize;
            for i in 0..queries {
                let url = format!(
                    "{}/api/v1/agents?capability=cap.c{}&version=%5E1.2&limit={limit}",
                    cli.base,
                    i % capabilities
                );
                let started = Instant::now();
                let response = http.get(url).bearer_auth(&cli.key).send().await?;
                let status = response.status();
                let page: Value = response.json().await?;
                latencies.push(started.elapsed());
                if status != 200 {
                    bail!("query returned {status}: {page}");
                }
                matched += page["items"].as_array().map_or(0, Vec::len);
            }
            latencies.sort();
            let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "capability queries: n={queries} p50={:.2}ms p95={:.2}ms p99={:.2}ms max={:.2}ms (avg {:.1} agents/page)",
                ms(pct(0.50)),
                ms(pct(0.95)),
                ms(pct(0.99)),
                ms(*latencies.last().context("no queries")?),
                matched as f64 / queries as f64
            );
        }
    }
    Ok(())
}
