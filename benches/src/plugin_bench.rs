//! Plugin runtime figures, each beside a baseline measured in the same run:
//!
//! 1. **instantiation**: a trivial scorer call (one candidate) on a runtime that instantiates
//!    for every call (`warm_per_tenant_max: 0`, pooling allocator) against the same call on a
//!    warm store;
//! 2. **scoring**: a 100-candidate score through the runtime on a warm store, with the
//!    `storage` grant (the scorer reads its weights from the SQLite store on every call) and
//!    without it, against the same weighted sum in native Rust;
//! 3. **policy**: a decision through the runtime (`policy_abac.wasm`, warm store) with
//!    `policies/tenant-isolation.json` and with `policies/bench-100-rules.json` as the
//!    plugin's configuration, against the same decision by `abac-engine` natively;
//! 4. **Cedar**: the same decisions with the `cedar-policy` crate, on the policy sets
//!    translated from the rule documents by [`cedar_abac`].
//!
//! Before timing, generated access requests are decided by the native engine, the plugin and
//! Cedar, and the run stops unless all three agree on every one (decision and deciding rules).
//! The timed calls cycle over the same requests. Measurements are interleaved in rounds, so
//! that a burst of load from elsewhere on the machine hits every figure alike.
//!
//! Needs the components of `scripts/build-plugins.sh`; run from the repository root.

mod cedar_abac;

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use clap::Parser;
use nops_core::plugin::call::{
    AccessRequest, Attribute, CallContext, Candidate, Invocation, LoadSpec, LoadedPlugin, Output, ScoreTask, Value,
};
use nops_core::plugin::{Grants, Limits, PluginKind};
use nops_core::tenant::TenantId;
use nops_runtime::{Runtime, RuntimeConfig, WasmPlugin};

use crate::cedar_abac::CedarAbac;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Targets the figures are read against (reported, never asserted).
const TARGET_POLICY_P50_US: f64 = 5.0;
const TARGET_POLICY_P99_US: f64 = 25.0;
const TARGET_SCORE_P50_US: f64 = 20.0;

#[derive(Debug, Parser)]
#[command(about = "Times plugin calls through the wasm runtime against native and Cedar baselines")]
struct Args {
    /// Timed calls per figure, spread over the rounds.
    #[arg(long, default_value_t = 20_000)]
    calls: usize,
    /// Timed calls per figure that instantiates on every call.
    #[arg(long, default_value_t = 2_000)]
    cold_calls: usize,
    /// Rounds the calls are interleaved in.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Candidates per scoring call.
    #[arg(long, default_value_t = 100)]
    candidates: u32,
    /// Generated access requests: all are checked for agreement, and the timed decisions
    /// cycle over them.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Seed of the request generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the components are.
    #[arg(long, default_value = "target/wasm/wasm32-wasip2/release")]
    wasm_dir: PathBuf,
    /// Where the rule documents are.
    #[arg(long, default_value = "policies")]
    policies_dir: PathBuf,
    /// Instance slots of the pooling allocator (each runtime).
    #[arg(long, default_value_t = nops_runtime::INSTANCES_MAX_DEFAULT)]
    instances_max: u32,
    /// Also write the Cedar translation of `bench-100-rules.json` to this file.
    #[arg(long)]
    cedar_out: Option<PathBuf>,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,
}

// ------------------------------------------------------------------------------------------
// Baselines
// ------------------------------------------------------------------------------------------

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

/// A request's attributes as `abac-engine` reads them, without copying (as the plugin does).
struct Attrs<'a>(&'a [Attribute]);

impl abac_engine::Attributes for Attrs<'_> {
    fn lookup(&self, name: &str) -> Option<abac_engine::ValueRef<'_>> {
        use abac_engine::ValueRef;
        self.0.iter().find(|a| a.name == name).map(|a| match &a.value {
            Value::Text(s) => ValueRef::Text(s),
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Number(n) => ValueRef::Number(*n),
            Value::Boolean(b) => ValueRef::Boolean(*b),
            Value::Texts(list) => ValueRef::Texts(list),
        })
    }
}

fn decide_native<'p>(policy: &'p abac_engine::Policy, request: &AccessRequest) -> abac_engine::Decision<'p> {
    let (principal, resource, context) = (Attrs(&request.principal), Attrs(&request.resource), Attrs(&request.context));
    policy.evaluate(&abac_engine::Request {
        principal: &principal,
        action: &request.action,
        resource: &resource,
        context: &context,
    })
}

// ------------------------------------------------------------------------------------------
// Generated access requests
// ------------------------------------------------------------------------------------------

/// SplitMix64: a small deterministic generator, so that every run decides the same requests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

const KINDS: &[&str] =
    &["agents", "plugins", "keys", "tasks", "events", "contracts", "tools", "policies", "metrics", "tenants"];
const VERBS: &[&str] = &["read", "list", "write", "delete", "execute", "approve"];
/// Verbs that only the tenant-isolation document names.
const OTHER_VERBS: &[&str] = &["heartbeat", "create", "revoke"];
const ROLES: &[&str] = &[
    "admin",
    "operator",
    "viewer",
    "agent",
    "auditor",
    "billing",
    "deployer",
    "sre",
    "support",
    "developer",
    "analyst",
];
const TEAMS: &[&str] = &["payments", "search", "edge", "ml", "platform", "identity", "storage", "video"];
const ENVS: &[&str] = &["dev", "staging", "prod", "sandbox"];
const REGIONS: &[&str] = &["eu-west-1", "eu-central-1", "us-east-2", "us-west-1", "ap-south-1", "sa-east-1"];
const NETWORKS: &[&str] = &["corp:hq", "corp:lab", "vpn:eu", "public:cafe"];

fn attr(name: &str, value: Value) -> Attribute {
    Attribute { name: name.into(), value }
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

/// Requests shaped like the kernel's: the attributes `policies/README.md` lists, with mostly
/// realistic values and, often enough to exercise every rule, missing attributes, other
/// tenants, suspended principals, quarantined or protected resources, night hours and risky
/// contexts. Numbers have at most two decimals, so that Cedar's decimals carry them exactly.
fn generate_requests(count: usize, seed: u64) -> Vec<AccessRequest> {
    let mut rng = Rng(seed);
    (0..count)
        .map(|_| {
            let subject = format!("k-{}", rng.below(40));
            let mut principal = vec![attr("subject", text(&subject))];
            match rng.below(100) {
                0..=93 => principal.push(attr("tenant", text("acme"))),
                94..=96 => principal.push(attr("tenant", text("globex"))),
                _ => {}
            }
            let role = if rng.chance(6) { "admin" } else { rng.pick(&ROLES[1..]) };
            principal.push(attr("role", text(role)));
            let team = rng.pick(TEAMS);
            if rng.chance(85) {
                principal.push(attr("team", text(team)));
            }
            if rng.chance(80) {
                principal.push(attr("level", Value::Integer(1 + rng.below(5) as i64)));
            }
            match rng.below(10) {
                0..=6 => principal.push(attr("mfa", Value::Boolean(true))),
                7 | 8 => principal.push(attr("mfa", Value::Boolean(false))),
                _ => {}
            }
            match rng.below(100) {
                0..=2 => principal.push(attr("suspended", Value::Boolean(true))),
                3..=29 => principal.push(attr("suspended", Value::Boolean(false))),
                _ => {}
            }

            let kind = if rng.chance(3) { "unknown" } else { rng.pick(KINDS) };
            let verb = if rng.chance(10) { rng.pick(OTHER_VERBS) } else { rng.pick(VERBS) };
            let action = if rng.chance(2) { "agents:labels:set".to_string() } else { format!("{kind}:{verb}") };

            let id = if rng.chance(10) { subject.clone() } else { format!("r-{}", rng.below(1_000)) };
            let mut resource = vec![attr("kind", text(kind.trim_end_matches('s'))), attr("id", text(&id))];
            match rng.below(100) {
                0..=92 => resource.push(attr("tenant", text("acme"))),
                93..=95 => resource.push(attr("tenant", text("globex"))),
                _ => {}
            }
            if rng.chance(85) {
                let owner_team = if rng.chance(50) { team } else { rng.pick(TEAMS) };
                resource.push(attr("team", text(owner_team)));
            }
            if rng.chance(90) {
                resource.push(attr("env", text(rng.pick(ENVS))));
            }
            if rng.chance(80) {
                resource.push(attr("region", text(rng.pick(REGIONS))));
            }
            if rng.chance(85) {
                let mut labels = vec![format!("team={}", rng.pick(TEAMS)), "zone=eu-1".to_string()];
                if rng.chance(5) {
                    labels.push("quarantine=true".into());
                }
                if rng.chance(5) {
                    labels.push("protected=true".into());
                }
                resource.push(attr("labels", Value::Texts(labels)));
            }
            match rng.below(10) {
                0 | 1 => resource.push(attr("owner", text(&subject))),
                2..=6 => resource.push(attr("owner", text(&format!("k-{}", rng.below(40))))),
                _ => {}
            }
            if rng.chance(70) {
                let in_flight = if rng.chance(60) { 0 } else { 1 + rng.below(4) as i64 };
                resource.push(attr("in_flight", Value::Integer(in_flight)));
            }
            if rng.chance(60) {
                resource.push(attr("budget", Value::Integer(rng.below(1_000) as i64)));
            }

            let mut context = Vec::new();
            if rng.chance(90) {
                // Mostly working hours, sometimes the night.
                let hour = if rng.chance(85) { 7 + rng.below(14) } else { rng.below(24) };
                context.push(attr("hour", Value::Integer(hour as i64)));
            }
            if rng.chance(80) {
                let risk = if rng.chance(90) { rng.below(60) } else { rng.below(101) };
                context.push(attr("risk_score", Value::Number(risk as f64 / 100.0)));
            }
            if rng.chance(80) {
                let network = if rng.chance(90) { rng.pick(&NETWORKS[..3]) } else { NETWORKS[3] };
                context.push(attr("network", text(network)));
            }
            if rng.chance(50) {
                context.push(attr("ticket", text(&format!("T-{}", rng.below(10_000)))));
            }
            if rng.chance(60) {
                context.push(attr("spend", Value::Integer(rng.below(1_000) as i64)));
            }
            match rng.below(100) {
                0..=4 => context.push(attr("maintenance", Value::Boolean(true))),
                5..=49 => context.push(attr("maintenance", Value::Boolean(false))),
                _ => {}
            }
            AccessRequest { principal, action, resource, context }
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// Measuring
// ------------------------------------------------------------------------------------------

/// A ratio with three significant digits: `15.8x`, `0.0112x`.
fn times(ratio: f64) -> String {
    let decimals = if ratio >= 100.0 { 0 } else { (2.0 - ratio.log10().floor()).max(0.0) as usize };
    format!("{ratio:.decimals$}x")
}

#[derive(Debug, Clone, Copy)]
struct Summary {
    p50: f64,
    p99: f64,
    mean: f64,
    samples: usize,
}

/// p50, p99 (nearest rank) and mean, in microseconds.
fn summarize(samples: &[Duration]) -> Summary {
    let mut sorted: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    sorted.sort_by(f64::total_cmp);
    let at = |p: f64| sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1];
    Summary {
        p50: at(0.50),
        p99: at(0.99),
        mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
        samples: sorted.len(),
    }
}

/// Times `$n` evaluations of `$body` (which may `.await`) into `$samples`; with a `$check`,
/// hands each result to it outside the timed region. Results are dropped after the timer stops.
macro_rules! timed {
    ($samples:expr, $n:expr, |$i:ident| $body:expr, |$out:ident| $check:expr) => {{
        let samples: &mut Vec<Duration> = $samples;
        for $i in 0..$n {
            let started = Instant::now();
            let $out = $body;
            samples.push(started.elapsed());
            $check;
            let _ = black_box($out);
        }
    }};
    ($samples:expr, $n:expr, |$i:ident| $body:expr) => {{
        let samples: &mut Vec<Duration> = $samples;
        for $i in 0..$n {
            let started = Instant::now();
            let out = $body;
            samples.push(started.elapsed());
            let _ = black_box(out);
        }
    }};
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn spec(name: &str, kind: PluginKind, grants: Grants, config: &[u8]) -> LoadSpec {
    LoadSpec {
        tenant: TenantId::default_tenant(),
        name: name.into(),
        version: semver::Version::new(1, 0, 0),
        kind,
        grants,
        limits: Limits::default(),
        config: Arc::from(config),
    }
}

/// Loads a component, returning it and the load time in milliseconds.
fn load(runtime: &Runtime, spec: LoadSpec, wasm: &[u8]) -> anyhow::Result<(WasmPlugin, f64)> {
    let started = Instant::now();
    let name = spec.name.clone();
    let plugin = runtime.load_plugin(spec, wasm).with_context(|| format!("loading {name}"))?;
    Ok((plugin, started.elapsed().as_secs_f64() * 1e3))
}

async fn call(plugin: &WasmPlugin, ctx: &CallContext, invocation: &Invocation) -> anyhow::Result<Output> {
    plugin.invoke(ctx, invocation).await.0.map_err(|e| anyhow!("plugin call failed: {e}"))
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {} (run from the repository root)", path.display()))
}

/// One rule document, loaded every way it is decided.
struct PolicyCase {
    /// `tenant-isolation` or `bench-100`.
    key: &'static str,
    file: &'static str,
    rules: usize,
    native: abac_engine::Policy,
    warm: WasmPlugin,
    cold: WasmPlugin,
    cedar: CedarAbac,
    /// The generated requests, as plugin calls and as prebuilt Cedar requests.
    invocations: Vec<Invocation>,
    cedar_requests: Vec<(cedar_policy::Request, cedar_policy::Entities)>,
    /// Load times, in milliseconds.
    wasm_load_ms: f64,
    native_parse_ms: f64,
    cedar_parse_ms: f64,
    /// Outcomes over the generated requests: allowed, denied by a forbid, denied by default.
    allowed: usize,
    forbidden: usize,
    default_denied: usize,
    /// Rules that decided at least one of the requests.
    deciding_rules: BTreeSet<String>,
}

/// Decides every request natively, through the plugin and with Cedar, and fails unless all
/// three agree on the decision and the deciding rules (and the plugin also on obligations).
async fn check_agreement(case: &mut PolicyCase, requests: &[AccessRequest], ctx: &CallContext) -> anyhow::Result<()> {
    for (i, request) in requests.iter().enumerate() {
        let native = decide_native(&case.native, request);
        let Output::Decision(wasm) = call(&case.warm, ctx, &case.invocations[i]).await? else {
            bail!("the policy plugin did not answer with a decision");
        };
        ensure!(
            wasm.allow == native.allow
                && wasm.reasons.iter().map(String::as_str).eq(native.reasons.iter().copied())
                && wasm
                    .obligations
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .eq(native.obligations.iter().copied()),
            "{}: request {i}: the plugin decided {wasm:?}, the native engine {native:?}",
            case.file
        );
        let (cedar_request, entities) = &case.cedar_requests[i];
        let cedar = case.cedar.outcome(&case.cedar.decide(cedar_request, entities));
        let mut expected: Vec<String> = if !native.allow && native.reasons == [abac_engine::DEFAULT_DENY_REASON] {
            Vec::new()
        } else {
            native.reasons.iter().map(|r| r.to_string()).collect()
        };
        expected.sort();
        ensure!(
            cedar.allow == native.allow && cedar.reasons == expected,
            "{}: request {i} ({request:?}): Cedar decided allow={} by {:?}, the native engine allow={} by {:?}",
            case.file,
            cedar.allow,
            cedar.reasons,
            native.allow,
            native.reasons
        );
        ensure!(cedar.errors == 0, "{}: request {i}: Cedar reported {} evaluation errors", case.file, cedar.errors);
        case.deciding_rules.extend(expected.iter().cloned());
        match (native.allow, expected.is_empty()) {
            (true, _) => case.allowed += 1,
            (false, false) => case.forbidden += 1,
            (false, true) => case.default_denied += 1,
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.rounds > 0 && args.calls >= args.rounds && args.cold_calls >= args.rounds, "too few calls");
    ensure!(args.requests > 0, "--requests must be positive");
    let load_before = load_average();

    // A real store: SQLite in a temporary directory, migrated by `open`.
    let dir = tempfile::tempdir()?;
    let store = nops_store::SqlStore::open(&nops_store::StoreConfig {
        database_url: format!("sqlite://{}", dir.path().join("bench.db").display()),
        ..Default::default()
    })
    .await?;
    let new_runtime = |warm_per_tenant_max: usize| {
        Runtime::new(
            &RuntimeConfig { cache_dir: None, instances_max: args.instances_max, warm_per_tenant_max },
            Arc::new(store.clone()),
            Arc::new(store.clone()),
        )
        .map_err(|e| anyhow!("starting the runtime: {e:#}"))
    };
    let warm_runtime = new_runtime(nops_runtime::WARM_PER_TENANT_MAX)?;
    let cold_runtime = new_runtime(0)?;
    let ctx = CallContext { tenant: TenantId::default_tenant(), caller: None };

    // --- scorers -------------------------------------------------------------------------
    let scorer_wasm = read(&args.wasm_dir.join("scorer_weighted.wasm"))?;
    let storage = Grants { storage: true, ..Grants::default() };
    let (scorer, scorer_load_ms) =
        load(&warm_runtime, spec("scorer-weighted", PluginKind::Scorer, storage, b""), &scorer_wasm)?;
    let (scorer_plain, _) =
        load(&warm_runtime, spec("scorer-plain", PluginKind::Scorer, Grants::default(), b""), &scorer_wasm)?;
    let (scorer_cold, _) =
        load(&cold_runtime, spec("scorer-plain", PluginKind::Scorer, Grants::default(), b""), &scorer_wasm)?;
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
    let task = ScoreTask { capabilities: vec!["inference.llm".into()], hints: Vec::new() };
    let score = Invocation::Score { task: task.clone(), candidates: candidates.clone() };
    let trivial = Invocation::Score { task, candidates: candidates[..1].to_vec() };
    let expected = native_score(&candidates);
    for plugin in [&scorer, &scorer_plain] {
        let Output::Scores(scores) = call(plugin, &ctx, &score).await? else { bail!("the scorer returned no scores") };
        ensure!(scores == expected, "the plugin and the native logic disagree on the scores");
    }
    let Output::Scores(scores) = call(&scorer_cold, &ctx, &trivial).await? else { bail!("no scores") };
    ensure!(scores == expected[..1], "the plugin and the native logic disagree on the scores");

    // --- policies ------------------------------------------------------------------------
    let policy_wasm = read(&args.wasm_dir.join("policy_abac.wasm"))?;
    let requests = generate_requests(args.requests, args.seed);
    let invocations: Vec<Invocation> = requests.iter().cloned().map(Invocation::Authorize).collect();
    let mut cases = Vec::new();
    for (key, file) in [("tenant-isolation", "tenant-isolation.json"), ("bench-100", "bench-100-rules.json")] {
        let document = read(&args.policies_dir.join(file))?;
        let started = Instant::now();
        let native = abac_engine::Policy::from_json(&document).map_err(|e| anyhow!("{file}: {e}"))?;
        let native_parse_ms = started.elapsed().as_secs_f64() * 1e3;
        let started = Instant::now();
        let cedar = CedarAbac::from_document(&document).with_context(|| format!("translating {file} to Cedar"))?;
        let cedar_parse_ms = started.elapsed().as_secs_f64() * 1e3;
        ensure!(
            cedar.len() == native.rule_count(),
            "{file}: {} policies for {} rules",
            cedar.len(),
            native.rule_count()
        );
        if key == "bench-100"
            && let Some(path) = &args.cedar_out
        {
            std::fs::write(path, cedar.text()).with_context(|| format!("writing {}", path.display()))?;
        }
        let (warm, wasm_load_ms) = load(
            &warm_runtime,
            spec(&format!("policy-{key}"), PluginKind::Policy, Grants::default(), &document),
            &policy_wasm,
        )?;
        let (cold, _) = load(
            &cold_runtime,
            spec(&format!("policy-{key}"), PluginKind::Policy, Grants::default(), &document),
            &policy_wasm,
        )?;
        let cedar_requests = requests.iter().map(|r| cedar.request(r)).collect::<anyhow::Result<Vec<_>>>()?;
        let mut case = PolicyCase {
            key,
            file,
            rules: native.rule_count(),
            native,
            warm,
            cold,
            cedar,
            invocations: invocations.clone(),
            cedar_requests,
            wasm_load_ms,
            native_parse_ms,
            cedar_parse_ms,
            allowed: 0,
            forbidden: 0,
            default_denied: 0,
            deciding_rules: BTreeSet::new(),
        };
        check_agreement(&mut case, &requests, &ctx).await?;
        cases.push(case);
    }

    // --- warm-up, then interleaved rounds ------------------------------------------------
    for _ in 0..1_000 {
        call(&scorer, &ctx, &score).await?;
        call(&scorer_plain, &ctx, &trivial).await?;
        call(&scorer_plain, &ctx, &score).await?;
    }
    for case in &cases {
        for (i, invocation) in case.invocations.iter().enumerate() {
            call(&case.warm, &ctx, invocation).await?;
            let (request, entities) = &case.cedar_requests[i];
            black_box(case.cedar.decide(request, entities));
        }
    }
    for _ in 0..100 {
        call(&scorer_cold, &ctx, &trivial).await?;
    }

    let mut collected: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let ok = |result: &Result<Output, nops_core::plugin::call::CallError>| -> anyhow::Result<()> {
        result.as_ref().map(|_| ()).map_err(|e| anyhow!("plugin call failed: {e}"))
    };
    let per_round = args.calls / args.rounds;
    let cold_per_round = args.cold_calls / args.rounds;
    let n_requests = requests.len();
    for round in 0..args.rounds {
        let mut put = |key: &str, s: Vec<Duration>| collected.entry(key.to_string()).or_default().extend(s);

        let mut s = Vec::new();
        timed!(&mut s, cold_per_round, |_i| scorer_cold.invoke(&ctx, &trivial).await.0, |out| ok(&out)?);
        put("trivial.cold", s);
        let mut s = Vec::new();
        timed!(&mut s, per_round, |_i| scorer_plain.invoke(&ctx, &trivial).await.0, |out| ok(&out)?);
        put("trivial.warm", s);

        let mut s = Vec::new();
        timed!(&mut s, per_round, |_i| scorer.invoke(&ctx, &score).await.0, |out| ok(&out)?);
        put("score.storage", s);
        let mut s = Vec::new();
        timed!(&mut s, per_round, |_i| scorer_plain.invoke(&ctx, &score).await.0, |out| ok(&out)?);
        put("score.plain", s);
        let mut s = Vec::new();
        timed!(&mut s, per_round, |_i| native_score(black_box(&candidates)));
        put("score.native", s);

        for case in &cases {
            let offset = round * per_round;
            let mut s = Vec::with_capacity(per_round);
            timed!(
                &mut s,
                per_round,
                |i| case.warm.invoke(&ctx, &case.invocations[(offset + i) % n_requests]).await.0,
                |out| ok(&out)?
            );
            put(&format!("{}.wasm", case.key), s);
            let mut s = Vec::with_capacity(per_round);
            timed!(&mut s, per_round, |i| decide_native(&case.native, black_box(&requests[(offset + i) % n_requests])));
            put(&format!("{}.native", case.key), s);
            let mut s = Vec::with_capacity(per_round);
            timed!(&mut s, per_round, |i| {
                let (request, entities) = &case.cedar_requests[(offset + i) % n_requests];
                case.cedar.decide(request, entities)
            });
            put(&format!("{}.cedar", case.key), s);
            let mut s = Vec::with_capacity(per_round);
            timed!(&mut s, per_round, |i| {
                let (request, entities) = case.cedar.request(&requests[(offset + i) % n_requests])?;
                case.cedar.decide(&request, &entities)
            });
            put(&format!("{}.cedar_build", case.key), s);
            let cold_offset = round * cold_per_round;
            let mut s = Vec::with_capacity(cold_per_round);
            timed!(
                &mut s,
                cold_per_round,
                |i| case.cold.invoke(&ctx, &case.invocations[(cold_offset + i) % n_requests]).await.0,
                |out| ok(&out)?
            );
            put(&format!("{}.wasm_cold", case.key), s);
        }
    }
    let load_after = load_average();
    let figures: BTreeMap<String, Summary> = collected.iter().map(|(k, v)| (k.clone(), summarize(v))).collect();
    let f = |key: &str| figures[key];

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    if args.json {
        let figure_json = |s: Summary| serde_json::json!({ "p50_us": s.p50, "p99_us": s.p99, "mean_us": s.mean, "samples": s.samples });
        let policies: serde_json::Map<String, serde_json::Value> = cases
            .iter()
            .map(|c| {
                (
                    c.key.to_string(),
                    serde_json::json!({
                        "file": format!("policies/{}", c.file),
                        "rules": c.rules,
                        "wasm_load_ms": c.wasm_load_ms,
                        "native_parse_ms": c.native_parse_ms,
                        "cedar_parse_ms": c.cedar_parse_ms,
                        "agreement": {
                            "requests": n_requests,
                            "allowed": c.allowed,
                            "forbidden": c.forbidden,
                            "default_denied": c.default_denied,
                            "rules_deciding": c.deciding_rules.len(),
                        },
                        "ratio_wasm_to_native_p50": f(&format!("{}.wasm", c.key)).p50 / f(&format!("{}.native", c.key)).p50,
                        "ratio_wasm_to_cedar_p50": f(&format!("{}.wasm", c.key)).p50 / f(&format!("{}.cedar", c.key)).p50,
                        "ratio_native_to_cedar_p50": f(&format!("{}.native", c.key)).p50 / f(&format!("{}.cedar", c.key)).p50,
                    }),
                )
            })
            .collect();
        let out = serde_json::json!({
            "cores": cores,
            "load_average": { "before": load_before, "after": load_after },
            "calls": args.calls,
            "cold_calls": args.cold_calls,
            "rounds": args.rounds,
            "candidates": args.candidates,
            "scorer_load_ms": scorer_load_ms,
            "figures": figures.iter().map(|(k, s)| (k.clone(), figure_json(*s))).collect::<serde_json::Map<_, _>>(),
            "instantiation_p50_us": f("trivial.cold").p50 - f("trivial.warm").p50,
            "ratio_score_runtime_to_native_p50": f("score.storage").p50 / f("score.native").p50,
            "policies": policies,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }

    let row = |label: &str, s: Summary, vs: &str| {
        println!("| {label} | {:.2} µs | {:.2} µs | {:.2} µs | {vs} |", s.p50, s.p99, s.mean);
    };
    let ratio = |a: Summary, b: Summary, name: &str| format!("{} {name} (p50)", times(a.p50 / b.p50));
    println!(
        "plugin-bench: {} calls per figure ({} when instantiating per call), {} rounds, {cores} cores, load average {load_before} before, {load_after} after",
        args.calls, args.cold_calls, args.rounds
    );
    println!();
    println!("| figure | p50 | p99 | mean | against |");
    println!("|---|---:|---:|---:|---|");
    let (cold, warm) = (f("trivial.cold"), f("trivial.warm"));
    row("trivial call, fresh pooled instance per call", cold, &ratio(cold, warm, "warm"));
    row("trivial call, warm store", warm, "baseline");
    println!(
        "| instantiation (fresh minus warm) | {:.2} µs | {:.2} µs | {:.2} µs | |",
        cold.p50 - warm.p50,
        cold.p99 - warm.p99,
        cold.mean - warm.mean
    );
    let native = f("score.native");
    let n = args.candidates;
    row(
        &format!("{n}-candidate score, runtime, warm, weights read from SQLite"),
        f("score.storage"),
        &ratio(f("score.storage"), native, "native"),
    );
    row(
        &format!("{n}-candidate score, runtime, warm, no storage grant"),
        f("score.plain"),
        &ratio(f("score.plain"), native, "native"),
    );
    row(&format!("{n}-candidate score, native Rust"), native, "baseline");
    for c in &cases {
        let k = c.key;
        let (wasm, native, cedar) = (f(&format!("{k}.wasm")), f(&format!("{k}.native")), f(&format!("{k}.cedar")));
        let label = format!("{} ({} rules)", c.file, c.rules);
        row(
            &format!("policy, runtime, warm — {label}"),
            wasm,
            &format!("{}, {}", ratio(wasm, native, "native"), ratio(wasm, cedar, "Cedar")),
        );
        row(
            &format!("policy, runtime, fresh instance per call — {label}"),
            f(&format!("{k}.wasm_cold")),
            &ratio(f(&format!("{k}.wasm_cold")), wasm, "warm"),
        );
        row(&format!("policy, abac-engine native — {label}"), native, &ratio(native, cedar, "Cedar"));
        row(&format!("policy, Cedar is_authorized — {label}"), cedar, "baseline");
        row(
            &format!("policy, Cedar incl. building request and entities — {label}"),
            f(&format!("{k}.cedar_build")),
            &ratio(f(&format!("{k}.cedar_build")), cedar, "Cedar"),
        );
    }
    println!();
    println!(
        "loads: scorer component {scorer_load_ms:.1} ms (compile + pre-instantiate, no cache); {}",
        cases
            .iter()
            .map(|c| format!(
                "{}: policy component {:.1} ms, abac-engine parse {:.3} ms, Cedar translate + parse {:.2} ms",
                c.file, c.wasm_load_ms, c.native_parse_ms, c.cedar_parse_ms
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    for c in &cases {
        println!(
            "agreement, {}: {} generated requests decided alike by abac-engine, the plugin and Cedar ({} allowed, {} forbidden, {} denied by default; {} of the {} rules decided at least one)",
            c.file,
            n_requests,
            c.allowed,
            c.forbidden,
            c.default_denied,
            c.deciding_rules.len(),
            c.rules
        );
    }
    let verdict = |value: f64, target: f64| if value <= target { "met" } else { "NOT met" };
    let bench = f("bench-100.wasm");
    let isolation = f("tenant-isolation.wasm");
    println!(
        "target policy decision p50 <= {TARGET_POLICY_P50_US} µs: bench-100 {:.2} µs {}, tenant-isolation {:.2} µs {}",
        bench.p50,
        verdict(bench.p50, TARGET_POLICY_P50_US),
        isolation.p50,
        verdict(isolation.p50, TARGET_POLICY_P50_US)
    );
    println!(
        "target policy decision p99 <= {TARGET_POLICY_P99_US} µs: bench-100 {:.2} µs {}, tenant-isolation {:.2} µs {}",
        bench.p99,
        verdict(bench.p99, TARGET_POLICY_P99_US),
        isolation.p99,
        verdict(isolation.p99, TARGET_POLICY_P99_US)
    );
    let storage_score = f("score.storage");
    println!(
        "target {n}-candidate score p50 <= {TARGET_SCORE_P50_US} µs: {:.2} µs {} (without the storage read: {:.2} µs {})",
        storage_score.p50,
        verdict(storage_score.p50, TARGET_SCORE_P50_US),
        f("score.plain").p50,
        verdict(f("score.plain").p50, TARGET_SCORE_P50_US)
    );
    Ok(())
}
