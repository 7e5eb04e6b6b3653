//! A fleet of simulated agents and a task driver, in a process of its own, against a running
//! kernel: register → heartbeat → route → dispatch → complete, end to end over HTTP.
//!
//! Every agent is a path on one local HTTP server (`POST /agents/<i>`), registered with that
//! URL as its endpoint, so the kernel pushes attempts to it over real sockets. Some agents
//! can be made slow, failing or vanishing (they stop heartbeating and never answer again).
//! The driver submits tasks open-loop at a fixed rate (a late submission is not skipped, so
//! queueing shows in the figures rather than hiding them) and waits for each to finish: in
//! the submission itself (`POST /api/v1/tasks?wait_ms=…`), or with `--separate-wait` in a
//! second request (`GET /api/v1/tasks/{id}?wait_ms=…`). The latency of a task is from its
//! submission to the answer that shows it finished. `--baseline` runs the same driver against a bare echo
//! endpoint, so the report can give ratios measured in the same run.
//!
//! Prints one JSON object: counts by final status, throughput, latency quantiles.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use clap::Parser;
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// The kernel's base URL.
    #[arg(long, default_value = "http://127.0.0.1:7420")]
    kernel: String,
    /// An admin or operator API key.
    #[arg(long, env = "NOPS_KEY")]
    key: String,
    /// Agents in the fleet.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Tasks submitted per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Seconds of load before measuring (not counted).
    #[arg(long, default_value_t = 3)]
    warmup_seconds: u64,
    /// Interval between two heartbeats of one agent, in ms.
    #[arg(long, default_value_t = 5_000)]
    heartbeat_ms: u64,
    /// Share of agents that answer after `slow_ms`.
    #[arg(long, default_value_t = 0.0)]
    slow_ratio: f64,
    /// How long a slow agent takes, in ms.
    #[arg(long, default_value_t = 10_000)]
    slow_ms: u64,
    /// Share of agents that answer 500.
    #[arg(long, default_value_t = 0.0)]
    fail_ratio: f64,
    /// Share of agents that vanish (stop heartbeating and answering) `vanish_after_seconds`
    /// into the run.
    #[arg(long, default_value_t = 0.0)]
    vanish_ratio: f64,
    /// When the vanishing agents vanish.
    #[arg(long, default_value_t = 5)]
    vanish_after_seconds: u64,
    /// Attempt timeout asked for each task, in ms.
    #[arg(long, default_value_t = 2_000)]
    attempt_timeout_ms: u64,
    /// Attempts per task.
    #[arg(long, default_value_t = 3)]
    attempts_max: u32,
    /// Most tasks waited for at once (submissions past it wait: the figure then shows it).
    #[arg(long, default_value_t = 4_096)]
    in_flight_max: usize,
    /// Drive a bare echo endpoint instead of the kernel (the baseline).
    #[arg(long)]
    baseline: bool,
    /// A name for this run's agents (unique per kernel).
    #[arg(long, default_value = "fleet")]
    run: String,
    /// Submit, then wait with a second request (`GET /api/v1/tasks/{id}?wait_ms=…`), instead
    /// of submitting with `?wait_ms=…` (one request per task).
    #[arg(long)]
    separate_wait: bool,
    /// Tasks slower than this, in ms, are reported by when they were submitted (the busiest
    /// 100 ms windows), which tells a few stalls from a uniform tail.
    #[arg(long, default_value_t = 10)]
    slow_task_ms: u64,
}

/// Most windows listed in the report's `slow_windows`.
const SLOW_WINDOWS_MAX: usize = 8;
/// Width of one window of `slow_windows`, in ms.
const SLOW_WINDOW_MS: u64 = 100;

/// How one simulated agent behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Good,
    Slow,
    Failing,
    Vanishing,
}

struct Fleet {
    behaviours: Vec<Behaviour>,
    vanished: AtomicBool,
    slow: Duration,
    answered: AtomicU64,
}

impl Fleet {
    fn behaviour(&self, i: usize) -> Behaviour {
        self.behaviours.get(i).copied().unwrap_or(Behaviour::Good)
    }
}

async fn agent_endpoint(
    State(fleet): State<Arc<Fleet>>,
    Path(i): Path<usize>,
    body: axum::body::Bytes,
) -> impl IntoResponse {
    let behaviour = fleet.behaviour(i);
    if behaviour == Behaviour::Vanishing && fleet.vanished.load(Ordering::Acquire) {
        // Gone: never answers (the kernel's attempt timeout ends the wait).
        std::future::pending::<()>().await;
    }
    if behaviour == Behaviour::Slow {
        tokio::time::sleep(fleet.slow).await;
    }
    if behaviour == Behaviour::Failing {
        return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({ "error": "simulated failure" })));
    }
    fleet.answered.fetch_add(1, Ordering::Relaxed);
    let delivery: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (StatusCode::OK, axum::Json(json!({ "agent": i, "echo": delivery.get("input").cloned().unwrap_or(Value::Null) })))
}

fn assign_behaviours(args: &Args) -> Vec<Behaviour> {
    let n = args.agents;
    let count = |ratio: f64| ((n as f64) * ratio.clamp(0.0, 1.0)).round() as usize;
    let (slow, failing, vanishing) = (count(args.slow_ratio), count(args.fail_ratio), count(args.vanish_ratio));
    let mut out = Vec::with_capacity(n);
    out.extend(std::iter::repeat_n(Behaviour::Slow, slow));
    out.extend(std::iter::repeat_n(Behaviour::Failing, failing));
    out.extend(std::iter::repeat_n(Behaviour::Vanishing, vanishing));
    out.resize(n, Behaviour::Good);
    // Spread the kinds over the index range so they are not clustered in registration order.
    let mut spread = vec![Behaviour::Good; n];
    let stride = 7919 % n.max(1);
    let stride = if stride == 0 || gcd(stride, n) != 1 { 1 } else { stride };
    for (k, b) in out.into_iter().enumerate() {
        spread[(k * stride) % n.max(1)] = b;
    }
    spread
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

async fn check(response: reqwest::Response, what: &str) -> anyhow::Result<Value> {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{what}: {status} {body}");
    }
    Ok(body)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fleet = Arc::new(Fleet {
        behaviours: assign_behaviours(&args),
        vanished: AtomicBool::new(false),
        slow: Duration::from_millis(args.slow_ms),
        answered: AtomicU64::new(0),
    });
    let app = axum::Router::new().route("/agents/{i}", axum::routing::post(agent_endpoint)).with_state(fleet.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let agents_addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let http = reqwest::Client::builder().pool_max_idle_per_host(1024).build()?;
    let auth = format!("Bearer {}", args.key);
    let started = Instant::now();

    // Register the fleet (skipped for the baseline).
    let mut ids: Vec<String> = Vec::with_capacity(args.agents);
    if !args.baseline {
        let registered = Arc::new(Mutex::new(vec![String::new(); args.agents]));
        let next = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for _ in 0..32 {
            let (http, auth, registered, next) = (http.clone(), auth.clone(), registered.clone(), next.clone());
            let (kernel, run, n) = (args.kernel.clone(), args.run.clone(), args.agents as u64);
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::AcqRel);
                    if i >= n {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let body = json!({
                        "name": format!("{run}-{i}"),
                        "endpoint": format!("http://{agents_addr}/agents/{i}"),
                        "capabilities": [{ "name": "fleet.echo", "version": "1.0.0" }],
                        "labels": { "fleet": run },
                    });
                    let response = http
                        .post(format!("{kernel}/api/v1/agents"))
                        .header("authorization", &auth)
                        .json(&body)
                        .send()
                        .await?;
                    let agent = check(response, "registering an agent").await?;
                    let id = agent["id"].as_str().context("agent id")?.to_string();
                    registered.lock().await[i as usize] = id;
                }
            }));
        }
        for worker in workers {
            worker.await??;
        }
        ids = std::mem::take(&mut *registered.lock().await);
    }
    let registered_in = started.elapsed();

    // Heartbeats, spread evenly over the interval; vanished agents stop.
    let stop = Arc::new(AtomicBool::new(false));
    if !args.baseline {
        let (http, auth, ids, beating, stop) = (http.clone(), auth.clone(), ids.clone(), fleet.clone(), stop.clone());
        let (kernel, interval) = (args.kernel.clone(), Duration::from_millis(args.heartbeat_ms.max(1)));
        tokio::spawn(async move {
            let per_tick = ids.len().div_ceil(100).max(1);
            let mut tick = tokio::time::interval(interval / 100);
            let mut cursor = 0;
            while !stop.load(Ordering::Acquire) {
                tick.tick().await;
                for _ in 0..per_tick {
                    let i = cursor % ids.len();
                    cursor += 1;
                    if beating.behaviour(i) == Behaviour::Vanishing && beating.vanished.load(Ordering::Acquire) {
                        continue;
                    }
                    let request = http
                        .post(format!("{kernel}/api/v1/agents/{}/heartbeat", ids[i]))
                        .header("authorization", &auth)
                        .json(&json!({ "in_flight_tasks": 0 }));
                    tokio::spawn(async move {
                        let _ = request.send().await;
                    });
                }
            }
        });
        let fleet = fleet.clone();
        let vanish_after = Duration::from_secs(args.vanish_after_seconds);
        tokio::spawn(async move {
            tokio::time::sleep(vanish_after).await;
            fleet.vanished.store(true, Ordering::Release);
        });
    }

    // The driver: open loop at `rate`, latencies of the measured window only.
    let total = args.rate * (args.warmup_seconds + args.seconds);
    let warmup = args.rate * args.warmup_seconds;
    let period = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let permits = Arc::new(tokio::sync::Semaphore::new(args.in_flight_max));
    let latencies = Arc::new(Mutex::new(Vec::<u64>::with_capacity(usize::try_from(total).unwrap_or(0))));
    // How long the submission alone took (its answer), per measured task: separates the
    // write path's tail from dispatch's and the wait's.
    let submits = Arc::new(Mutex::new(Vec::<u64>::with_capacity(usize::try_from(total).unwrap_or(0))));
    let outcomes = Arc::new(Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    // Measured tasks slower than `slow_ms`: when they were submitted (ms into the load) and
    // how long they took (µs).
    let slow = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let slow_us = args.slow_task_ms.saturating_mul(1000);
    let load_started = Instant::now();
    let mut measured_started = load_started;
    let mut handles = Vec::new();
    for n in 0..total {
        let due = load_started + period * u32::try_from(n).unwrap_or(u32::MAX);
        tokio::time::sleep_until(due.into()).await;
        if n == warmup {
            measured_started = Instant::now();
        }
        let permit = permits.clone().acquire_owned().await?;
        let (http, auth, latencies, outcomes) = (http.clone(), auth.clone(), latencies.clone(), outcomes.clone());
        let (submits, slow) = (submits.clone(), slow.clone());
        let (kernel, baseline, measured, run) = (args.kernel.clone(), args.baseline, n >= warmup, args.run.clone());
        let separate_wait = args.separate_wait;
        let (timeout, attempts) = (args.attempt_timeout_ms, args.attempts_max);
        handles.push(tokio::spawn(async move {
            let _permit = permit;
            let submitted = Instant::now();
            let mut submit_us = None;
            let outcome = if baseline {
                let url = format!("http://{agents_addr}/agents/0");
                match http.post(url).json(&json!({ "input": { "n": n } })).send().await {
                    Ok(r) if r.status().is_success() => "succeeded".to_string(),
                    Ok(r) => format!("http_{}", r.status().as_u16()),
                    Err(_) => "transport_error".to_string(),
                }
            } else {
                let task = TaskSpec { run: &run, n, timeout_ms: timeout, attempts, separate_wait };
                run_task(&http, &kernel, &auth, &task, &mut submit_us).await
            };
            let elapsed = u64::try_from(submitted.elapsed().as_micros()).unwrap_or(u64::MAX);
            if measured {
                if elapsed > slow_us {
                    let at_ms = u64::try_from(submitted.duration_since(load_started).as_millis()).unwrap_or(u64::MAX);
                    slow.lock().await.push((at_ms, elapsed));
                }
                latencies.lock().await.push(elapsed);
                if let Some(us) = submit_us {
                    submits.lock().await.push(us);
                }
                *outcomes.lock().await.entry(outcome).or_default() += 1;
            }
        }));
    }
    for handle in handles {
        let _ = handle.await;
    }
    let measured_for = measured_started.elapsed();
    stop.store(true, Ordering::Release);
    // Deregister the fleet, so that a later run on this kernel routes over its own agents only.
    deregister(&http, &args.kernel, &auth, &ids).await;

    let mut latencies = std::mem::take(&mut *latencies.lock().await);
    latencies.sort_unstable();
    let mut submits = std::mem::take(&mut *submits.lock().await);
    submits.sort_unstable();
    let quantile_of = |sorted: &[u64], q: f64| -> f64 {
        if sorted.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1] as f64 / 1000.0
    };
    let quantile = |q: f64| quantile_of(&latencies, q);
    let slow = std::mem::take(&mut *slow.lock().await);
    let warmup_ms = u64::try_from(measured_started.duration_since(load_started).as_millis()).unwrap_or(0);
    let mut windows = std::collections::BTreeMap::<u64, (u64, u64)>::new();
    for &(at_ms, us) in &slow {
        let window = windows.entry(at_ms.saturating_sub(warmup_ms) / SLOW_WINDOW_MS).or_default();
        window.0 += 1;
        window.1 = window.1.max(us);
    }
    let mut busiest: Vec<(u64, (u64, u64))> = windows.into_iter().collect();
    busiest.sort_by_key(|(window, (tasks, _))| (std::cmp::Reverse(*tasks), *window));
    busiest.truncate(SLOW_WINDOWS_MAX);
    busiest.sort_by_key(|(window, _)| *window);
    let slow_windows: Vec<Value> = busiest
        .iter()
        .map(|(window, (tasks, max_us))| {
            json!({ "at_s": (window * SLOW_WINDOW_MS) as f64 / 1000.0, "tasks": tasks, "max_ms": *max_us as f64 / 1000.0 })
        })
        .collect();
    let outcomes = outcomes.lock().await.clone();
    let succeeded = outcomes.get("succeeded").copied().unwrap_or(0);
    let report = json!({
        "mode": if args.baseline { "baseline" } else { "kernel" },
        "agents": args.agents,
        "rate_per_s": args.rate,
        "registered_in_s": registered_in.as_secs_f64(),
        "measured_s": measured_for.as_secs_f64(),
        "tasks": latencies.len(),
        "submitted": total,
        "outcomes": outcomes,
        "succeeded_per_s": succeeded as f64 / measured_for.as_secs_f64().max(1e-9),
        "p50_ms": quantile(0.50),
        "p95_ms": quantile(0.95),
        "p99_ms": quantile(0.99),
        "max_ms": quantile(1.0),
        "submit_p50_ms": quantile_of(&submits, 0.50),
        "submit_p99_ms": quantile_of(&submits, 0.99),
        "agent_answers": fleet.answered.load(Ordering::Relaxed),
        "slow_task_ms": args.slow_task_ms,
        "slow_tasks": slow.len(),
        "slow_windows": slow_windows,
    });
    println!("{report}");
    Ok(())
}

/// One task the driver submits.
struct TaskSpec<'a> {
    run: &'a str,
    n: u64,
    timeout_ms: u64,
    attempts: u32,
    separate_wait: bool,
}

/// Submits one task and waits for it to finish; returns its final status (or what failed).
/// `submit_us` gets how long the submission's answer took.
async fn run_task(
    http: &reqwest::Client,
    kernel: &str,
    auth: &str,
    task: &TaskSpec<'_>,
    submit_us: &mut Option<u64>,
) -> String {
    // Only this run's agents.
    let body = json!({
        "capabilities": [{ "name": "fleet.echo", "version": "^1" }],
        "labels": { "fleet": task.run },
        "input": { "n": task.n },
        "attempt_timeout_ms": task.timeout_ms,
        "attempts_max": task.attempts,
    });
    let url = if task.separate_wait {
        format!("{kernel}/api/v1/tasks")
    } else {
        format!("{kernel}/api/v1/tasks?wait_ms=5000")
    };
    let started = Instant::now();
    let submitted = match http.post(url).header("authorization", auth).json(&body).send().await {
        Ok(r) => r,
        Err(_) => return "submit_transport_error".into(),
    };
    if !submitted.status().is_success() {
        return refused("submit", submitted).await;
    }
    let Ok(task) = submitted.json::<Value>().await else { return "submit_bad_json".into() };
    *submit_us = u64::try_from(started.elapsed().as_micros()).ok();
    let Some(id) = task["id"].as_str().map(str::to_string) else { return "submit_no_id".into() };
    if let Some(status) = final_status(&task) {
        return status;
    }
    // Long-poll until it finishes (bounded: the task's own deadline ends it).
    for _ in 0..120 {
        let response = match http
            .get(format!("{kernel}/api/v1/tasks/{id}?wait_ms=5000"))
            .header("authorization", auth)
            .send()
            .await
        {
            Ok(r) => r,
            Err(_) => return "wait_transport_error".into(),
        };
        if !response.status().is_success() {
            return refused("wait", response).await;
        }
        let Ok(view) = response.json::<Value>().await else { return "wait_bad_json".into() };
        if let Some(status) = final_status(&view) {
            return status;
        }
    }
    "never_finished".into()
}

/// Deletes the fleet's agents, 32 at a time; failures are ignored (the kernel's TTL removes
/// what is left).
async fn deregister(http: &reqwest::Client, kernel: &str, auth: &str, ids: &[String]) {
    let next = Arc::new(AtomicU64::new(0));
    let ids: Arc<[String]> = ids.into();
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (http, auth, kernel, ids, next) =
            (http.clone(), auth.to_string(), kernel.to_string(), ids.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = usize::try_from(next.fetch_add(1, Ordering::AcqRel)).unwrap_or(usize::MAX);
                let Some(id) = ids.get(i) else { return };
                let _ = http.delete(format!("{kernel}/api/v1/agents/{id}")).header("authorization", &auth).send().await;
            }
        }));
    }
    for worker in workers {
        let _ = worker.await;
    }
}

/// `<step>_http_<status>_<code>`: which refusal answered (the `code` of the error envelope).
async fn refused(step: &str, response: reqwest::Response) -> String {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    match body["error"]["code"].as_str() {
        Some(code) => format!("{step}_http_{status}_{code}"),
        None => format!("{step}_http_{status}"),
    }
}

fn final_status(task: &Value) -> Option<String> {
    match task["status"].as_str() {
        Some(s @ ("succeeded" | "failed")) => Some(s.to_string()),
        _ => None,
    }
}
