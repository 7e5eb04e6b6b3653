//! The plugin runtime with real components, built from `plugins/` and `tests/plugins/` by
//! `scripts/build-plugins.sh` (run by `make test`): every world, the limits that stop
//! misbehaving plugins, deny-by-default host interfaces, storage namespaces, and the effects
//! (a contract's storage writes, published events) that a call commits only when it succeeds.

use std::sync::Arc;
use std::time::Duration;

use nops_core::plugin::call::{
    AccessRequest, Attribute, CallContext, CallError, CallReport, Candidate, ContractEvent, Decision, Direction,
    Invocation, LoadError, LoadSpec, LoadedPlugin, Output, ScoreTask, ToolDescription, Value, Verdict,
};
use nops_core::plugin::{Grants, Limits, PluginKind};
use nops_core::store::PluginKv;
use nops_core::tenant::TenantId;
use nops_runtime::{Runtime, RuntimeConfig, WARM_PER_TENANT_MAX, WasmPlugin, namespace};
use serde_json::json;

use crate::support::{Backend, TestKernel, backends};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

fn component(name: &str) -> Vec<u8> {
    let path = format!("{}/../../target/wasm/wasm32-wasip2/release/{name}.wasm", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}; build the plugins with scripts/build-plugins.sh"))
}

fn tenant(name: &str) -> TenantId {
    name.parse().expect("tenant")
}

fn ctx(tenant_name: &str) -> CallContext {
    CallContext { tenant: tenant(tenant_name), caller: None }
}

/// A runtime whose plugin storage and effects go to the test kernel's real store. Tests need
/// few instance slots (each reserves address space), but enough for 50 concurrent calls.
fn runtime(k: &TestKernel) -> Runtime {
    let store = Arc::new(k.kernel.store.clone());
    let config = RuntimeConfig { instances_max: 64, ..RuntimeConfig::default() };
    Runtime::new(&config, store.clone(), store).expect("runtime")
}

/// What a plugin version is loaded with, before a test adjusts it.
fn spec(name: &str, kind: PluginKind) -> LoadSpec {
    LoadSpec {
        tenant: TenantId::default_tenant(),
        name: name.into(),
        version: semver::Version::new(1, 0, 0),
        kind,
        grants: Grants::default(),
        limits: Limits::default(),
        config: Arc::from(Vec::new()),
    }
}

fn load(rt: &Runtime, spec: LoadSpec, file: &str) -> WasmPlugin {
    let name = spec.name.clone();
    rt.load_plugin(spec, &component(file)).unwrap_or_else(|e| panic!("loading {file} as {name}: {e}"))
}

async fn invoke(plugin: &WasmPlugin, tenant_name: &str, call: &Invocation) -> (Result<Output, CallError>, CallReport) {
    plugin.invoke(&ctx(tenant_name), call).await
}

async fn call(plugin: &WasmPlugin, tenant_name: &str, call: &Invocation) -> Result<Output, CallError> {
    invoke(plugin, tenant_name, call).await.0
}

/// A row of the kernel's outbox: tenant, subject, payload, source.
type OutboxRow = (String, String, Vec<u8>, String);

/// The rows of the kernel's outbox, oldest first.
async fn outbox(k: &TestKernel) -> Vec<OutboxRow> {
    const SQL: &str = "SELECT tenant, subject, payload, source FROM outbox ORDER BY id";
    match k.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&k.db.url).await.expect("open the test database");
            let rows = sqlx::query_as(SQL).fetch_all(&pool).await.expect("read the outbox");
            pool.close().await;
            rows
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&k.db.url).await.expect("open the test database");
            let rows = sqlx::query_as(SQL).fetch_all(&pool).await.expect("read the outbox");
            pool.close().await;
            rows
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scorers
// ---------------------------------------------------------------------------------------------

/// The default weights of both reference scorers: health, spare capacity, latency, errors.
const DEFAULT_WEIGHTS: [f32; 4] = [0.4, 0.3, 0.2, 0.1];

fn candidate(index: u32, health: f32, in_flight: u32, latency_ms: f32, error_rate: f32) -> Candidate {
    Candidate {
        index,
        health,
        in_flight,
        cpu_ratio: 0.5,
        latency_ms,
        error_rate,
        silence_ms: 1_000,
        version: (1, 4, 0),
    }
}

fn score_call(candidates: &[Candidate]) -> Invocation {
    Invocation::Score {
        task: ScoreTask { capabilities: vec!["inference.llm".into()], hints: Vec::new() },
        candidates: candidates.to_vec(),
    }
}

async fn scores(plugin: &WasmPlugin, tenant_name: &str, candidates: &[Candidate]) -> Vec<f32> {
    match call(plugin, tenant_name, &score_call(candidates)).await {
        Ok(Output::Scores(scores)) => scores,
        other => panic!("expected scores, got {other:?}"),
    }
}

/// The weighted scorer's documented formula, evaluated natively in the same f32 operations.
fn expected_score(c: &Candidate, [w_health, w_load, w_latency, w_errors]: [f32; 4]) -> f32 {
    let load = 1.0 / (1.0 + c.in_flight as f32 / 4.0);
    let latency = 1.0 / (1.0 + c.latency_ms.max(0.0) / 100.0);
    let errors = 1.0 - c.error_rate.clamp(0.0, 1.0);
    w_health * c.health.clamp(0.0, 1.0) + w_load * load + w_latency * latency + w_errors * errors
}

fn bits(scores: &[f32]) -> Vec<u32> {
    scores.iter().map(|s| s.to_bits()).collect()
}

fn weights_bytes(w: [f32; 4]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Candidate indices, best first.
fn ranking(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order
}

#[tokio::test]
async fn the_weighted_scorer_ranks_healthy_idle_fast_agents_first() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let rt = runtime(&k);
    let scorer = load(&rt, spec("scorer-weighted", PluginKind::Scorer), "scorer_weighted");
    let candidates = [
        candidate(0, 0.2, 8, 400.0, 0.3), // sick, busy, slow, failing
        candidate(1, 1.0, 0, 10.0, 0.0),  // healthy, idle, fast
        candidate(2, 0.9, 2, 50.0, 0.01), // good
        candidate(3, 1.0, 12, 10.0, 0.0), // healthy and fast but loaded
        candidate(4, 1.0, 0, 900.0, 0.0), // healthy and idle but slow
    ];
    let (result, report) = invoke(&scorer, "default", &score_call(&candidates)).await;
    let Ok(Output::Scores(got)) = result else { panic!("expected scores, got {result:?}") };
    let want: Vec<f32> = candidates.iter().map(|c| expected_score(c, DEFAULT_WEIGHTS)).collect();
    assert_eq!(bits(&got), bits(&want), "the documented formula: got {got:?}, want {want:?}");
    assert!((got[1] - 0.981_818_2).abs() < 1e-6, "healthy, idle, fast: {}", got[1]);
    assert_eq!(ranking(&got), [1, 4, 2, 3, 0], "{got:?}");
    assert_eq!(report.fuel_used, None, "only contracts are metered");
    assert!(report.memory_bytes > 0, "the report carries the instance's memory: {report:?}");

    // No candidates, no scores.
    assert_eq!(scores(&scorer, "default", &[]).await, Vec::<f32>::new());
}

/// Candidates that reach every branch of the formula: clamped health and error rates,
/// negative and huge latencies, subnormals, and an in-flight count above `i32::MAX`.
fn tricky_candidates() -> Vec<Candidate> {
    vec![
        candidate(0, 0.2, 8, 400.0, 0.3),
        candidate(1, 1.0, 0, 10.0, 0.0),
        candidate(2, 0.9, 2, 50.0, 0.01),
        candidate(3, 1.5, 1, -20.0, -0.5),
        candidate(4, -0.25, 3, 1e30, 1.7),
        candidate(5, 0.333_333_34, 7, 123.456, 0.123_456_79),
        candidate(6, 1e-40, u32::MAX, 1e-40, 1e-40),
        candidate(7, 0.7, 2_147_483_648, 0.0, 1.0),
        candidate(8, 0.1, 5, f32::MAX, 0.999_999_9),
        candidate(9, 0.999_999_94, 4, 100.0, 0.5),
    ]
}

/// The Rust scorer exports the `scorer-columns` world and the JavaScript one the `scorer`
/// world (a list of records): the same scores bit for bit also shows the kernel passes the
/// same candidates through either interface.
#[tokio::test]
async fn the_javascript_scorer_returns_the_rust_scorers_scores_bit_for_bit() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let rt = runtime(&k);
    let granted = |name: &str| {
        let mut s = spec(name, PluginKind::Scorer);
        s.grants.storage = true;
        s
    };
    let rust = load(&rt, granted("scorer-weighted"), "scorer_weighted");
    let js = load(&rt, granted("scorer-weighted-js"), "scorer_weighted_js");
    let candidates = tricky_candidates();

    // Default weights (nothing stored for this tenant).
    let from_rust = scores(&rust, "initech", &candidates).await;
    let from_js = scores(&js, "initech", &candidates).await;
    let want: Vec<f32> = candidates.iter().map(|c| expected_score(c, DEFAULT_WEIGHTS)).collect();
    assert_eq!(bits(&from_rust), bits(&want), "rust: {from_rust:?} want {want:?}");
    assert_eq!(bits(&from_js), bits(&from_rust), "js {from_js:?} rust {from_rust:?}");

    // Weights stored for tenant acme, in each plugin's own namespace (written straight to the
    // store, as another kernel would; acme's weights were never read, so nothing is cached).
    let weights = [0.05, 0.15, 0.7, 0.1];
    for name in ["scorer-weighted", "scorer-weighted-js"] {
        k.kernel
            .store
            .kv_set(&namespace(name, "acme"), "weights", &weights_bytes(weights), 10, 0)
            .await
            .expect("seed weights");
    }
    let weighted_rust = scores(&rust, "acme", &candidates).await;
    let weighted_js = scores(&js, "acme", &candidates).await;
    let want: Vec<f32> = candidates.iter().map(|c| expected_score(c, weights)).collect();
    assert_eq!(bits(&weighted_rust), bits(&want), "rust: {weighted_rust:?} want {want:?}");
    assert_eq!(bits(&weighted_js), bits(&weighted_rust), "js {weighted_js:?} rust {weighted_rust:?}");
    assert_ne!(bits(&weighted_rust), bits(&from_rust), "the stored weights apply");

    // Latency-only weights: the fastest candidate wins despite poor health, in both.
    let fast_sick = [candidate(0, 1.0, 0, 300.0, 0.0), candidate(1, 0.1, 0, 5.0, 0.0)];
    for name in ["scorer-weighted", "scorer-weighted-js"] {
        k.kernel
            .store
            .kv_set(&namespace(name, "latency-only"), "weights", &weights_bytes([0.0, 0.0, 1.0, 0.0]), 10, 0)
            .await
            .expect("seed weights");
    }
    for plugin in [&rust, &js] {
        let got = scores(plugin, "latency-only", &fast_sick).await;
        assert_eq!(ranking(&got), [1, 0], "{got:?}");
        let defaults = scores(plugin, "another-tenant", &fast_sick).await;
        assert_eq!(ranking(&defaults), [0, 1], "another tenant keeps the defaults: {defaults:?}");
    }

    // Without the storage grant both fall back to the defaults, even for acme.
    let rust_denied = load(&rt, spec("scorer-weighted", PluginKind::Scorer), "scorer_weighted");
    let js_denied = load(&rt, spec("scorer-weighted-js", PluginKind::Scorer), "scorer_weighted_js");
    assert_eq!(bits(&scores(&rust_denied, "acme", &candidates).await), bits(&from_rust));
    assert_eq!(bits(&scores(&js_denied, "acme", &candidates).await), bits(&from_rust));

    // A score that is not a number is refused the same way for both.
    let nan = [candidate(0, f32::NAN, 0, 10.0, 0.0)];
    for plugin in [&rust, &js] {
        let result = call(plugin, "default", &score_call(&nan)).await;
        assert!(matches!(result, Err(CallError::BadOutput(_))), "{result:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Isolation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn misbehaving_plugins_are_stopped_and_the_runtime_keeps_serving() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let rt = runtime(&k);
    let limits = Limits { memory_bytes_max: 16 << 20, deadline_ms: 50, fuel_max: None };
    let scorer = |name: &str| LoadSpec { limits, ..spec(name, PluginKind::Scorer) };
    let candidates = [candidate(0, 1.0, 0, 10.0, 0.0)];

    // An endless loop that never calls the host is interrupted at its deadline.
    let spin = load(&rt, scorer("loop-forever"), "loop_forever");
    let (result, report) = invoke(&spin, "default", &score_call(&candidates)).await;
    assert_eq!(result, Err(CallError::Timeout(50)), "an endless loop is interrupted");
    assert!(
        report.elapsed >= Duration::from_millis(40) && report.elapsed < Duration::from_secs(5),
        "interrupted near its deadline: {:?}",
        report.elapsed
    );

    // A memory bomb traps at its cap, which it never exceeds.
    let bomb = load(&rt, scorer("memory-bomb"), "memory_bomb");
    let (result, report) = invoke(&bomb, "default", &score_call(&candidates)).await;
    assert!(matches!(result, Err(CallError::Trap(_))), "a memory bomb traps at the cap: {result:?}");
    assert!(
        report.memory_bytes > 1 << 20 && report.memory_bytes <= 16 << 20,
        "memory grew, up to the cap and no further: {}",
        report.memory_bytes
    );

    // A trap, twice: the second call gets a fresh instance (a trapped store is dropped, so
    // it fails the same way rather than with "cannot enter the instance").
    let trap = load(&rt, scorer("trap"), "trap");
    let Err(CallError::Trap(first)) = call(&trap, "default", &score_call(&candidates)).await else {
        panic!("the trap fixture traps")
    };
    let Err(CallError::Trap(second)) = call(&trap, "default", &score_call(&candidates)).await else {
        panic!("the trap fixture traps again")
    };
    assert_eq!(first, second, "the second call ran on a fresh instance");
    assert_eq!(rt.warm_stores(), 0, "no store that trapped or timed out is kept");

    // A tool returning 4 MiB is refused; the tool itself keeps working.
    let oversized = load(&rt, spec("oversized-output", PluginKind::McpTool), "oversized_output");
    let tool_call = Invocation::CallTool { arguments: json!({}) };
    for _ in 0..2 {
        let result = call(&oversized, "default", &tool_call).await;
        assert!(matches!(result, Err(CallError::BadOutput(_))), "4 MiB of output is refused: {result:?}");
    }
    assert_eq!(
        call(&oversized, "default", &Invocation::Describe).await,
        Ok(Output::Description(ToolDescription {
            name: "oversized".into(),
            description: "Returns 4 MiB of content.".into(),
            input_schema: r#"{"type":"object","additionalProperties":false}"#.into(),
        }))
    );

    // The same engine still serves a well-behaved plugin, with the same limits.
    let good = load(&rt, scorer("scorer-weighted"), "scorer_weighted");
    assert_eq!(
        bits(&scores(&good, "default", &candidates).await),
        bits(&[expected_score(&candidates[0], DEFAULT_WEIGHTS)])
    );
    // And the misbehaving ones fail the same way again.
    assert_eq!(call(&spin, "default", &score_call(&candidates)).await, Err(CallError::Timeout(50)));
    assert!(matches!(call(&bomb, "default", &score_call(&candidates)).await, Err(CallError::Trap(_))));
    assert_eq!(call(&trap, "default", &score_call(&candidates)).await, Err(CallError::Trap(first)));
}

/// A trap's detail is what an operator reads in the logs and the decision log: it names the
/// cause, not only the header of the backtrace wasmtime attaches to it.
#[tokio::test]
async fn a_trap_reports_its_cause() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let rt = runtime(&k);
    let limits = Limits { memory_bytes_max: 16 << 20, deadline_ms: 1_000, fuel_max: None };
    let candidates = [candidate(0, 1.0, 0, 10.0, 0.0)];

    let trap = load(&rt, LoadSpec { limits, ..spec("trap", PluginKind::Scorer) }, "trap");
    let result = call(&trap, "default", &score_call(&candidates)).await;
    assert!(
        matches!(&result, Err(CallError::Trap(detail)) if detail.contains("unreachable")),
        "an `unreachable` trap says so: {result:?}"
    );

    let bomb = load(&rt, LoadSpec { limits, ..spec("memory-bomb", PluginKind::Scorer) }, "memory_bomb");
    let result = call(&bomb, "default", &score_call(&candidates)).await;
    assert!(
        matches!(&result, Err(CallError::Trap(detail)) if detail.contains("memory")),
        "a refused memory growth says so: {result:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Worlds
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn components_that_do_not_match_their_kind_are_refused() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let rt = runtime(&k);

    let err = rt
        .load_plugin(spec("policy-as-scorer", PluginKind::Scorer), &component("policy_as_scorer"))
        .expect_err("a policy is not a scorer");
    assert!(matches!(err, LoadError::WorldMismatch { kind: PluginKind::Scorer, .. }), "{err}");

    let err = rt
        .load_plugin(spec("policy-abac", PluginKind::Contract), &component("policy_abac"))
        .expect_err("a policy is not a contract");
    assert!(matches!(err, LoadError::WorldMismatch { kind: PluginKind::Contract, .. }), "{err}");

    let err = rt
        .load_plugin(spec("tool-kv", PluginKind::Migration), &component("tool_kv"))
        .expect_err("a tool is not a migration");
    assert!(matches!(err, LoadError::WorldMismatch { kind: PluginKind::Migration, .. }), "{err}");

    for garbage in [&b"\0asm not really"[..], b"", b"hello"] {
        let err = rt.load_plugin(spec("garbage", PluginKind::Scorer), garbage).expect_err("garbage");
        assert!(matches!(err, LoadError::Invalid(_)), "{err}");
    }

    // The same component loads under its own kind.
    let policy = load(&rt, spec("policy-as-scorer", PluginKind::Policy), "policy_as_scorer");

    // A call of another kind is refused without running the guest.
    let scorer = load(&rt, spec("scorer-weighted", PluginKind::Scorer), "scorer_weighted");
    assert_eq!(
        call(&scorer, "default", &Invocation::Authorize(AccessRequest::default())).await,
        Err(CallError::WrongKind { plugin: PluginKind::Scorer, call: PluginKind::Policy })
    );
    assert_eq!(
        call(&scorer, "default", &Invocation::FromVersion).await,
        Err(CallError::WrongKind { plugin: PluginKind::Scorer, call: PluginKind::Migration })
    );
    assert_eq!(
        call(&policy, "default", &score_call(&[])).await,
        Err(CallError::WrongKind { plugin: PluginKind::Policy, call: PluginKind::Scorer })
    );
    assert_eq!(
        call(&policy, "default", &Invocation::Authorize(AccessRequest::default())).await,
        Ok(Output::Decision(Decision { allow: true, reasons: vec!["fixture".into()], obligations: Vec::new() }))
    );
}

// ---------------------------------------------------------------------------------------------
// Deny by default
// ---------------------------------------------------------------------------------------------

/// What `ungranted-call` reports: the outcome of its `storage::set("k", "v")` and of its
/// `bus::publish("anything", "payload")`.
async fn ungranted_outcomes(plugin: &WasmPlugin, tenant_name: &str) -> (String, String) {
    let result = call(plugin, tenant_name, &Invocation::CallTool { arguments: json!({}) }).await;
    let Ok(Output::ToolResult(Ok(content))) = result else { panic!("expected a tool result, got {result:?}") };
    let field = |name: &str| content[name].as_str().unwrap_or_else(|| panic!("{name} in {content}")).to_string();
    (field("storage"), field("bus"))
}

#[tokio::test]
async fn host_interfaces_are_denied_unless_granted() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let rt = runtime(&k);

    // Nothing granted: both calls answer `denied`, as values the guest can report.
    let bare = load(&rt, spec("ungranted-call", PluginKind::McpTool), "ungranted_call");
    let (storage, bus) = ungranted_outcomes(&bare, "acme").await;
    assert!(storage.starts_with("denied: ") && storage.contains("storage"), "{storage}");
    assert!(bus.starts_with("denied: ") && bus.contains("anything"), "{bus}");
    let ns = namespace("ungranted-call", "acme");
    assert_eq!(k.kernel.store.kv_get(&ns, "k").await.expect("kv"), None, "nothing was stored");

    // Storage granted and a bus pattern that does not cover `anything`: storage works, the
    // bus is still denied.
    let mut partial = spec("ungranted-call", PluginKind::McpTool);
    partial.grants = Grants { storage: true, bus: vec!["plugins.>".into()], ..Grants::default() };
    let partial = load(&rt, partial, "ungranted_call");
    let (storage, bus) = ungranted_outcomes(&partial, "acme").await;
    assert_eq!(storage, "ok");
    assert!(bus.starts_with("denied: ") && bus.contains("anything"), "{bus}");
    assert_eq!(k.kernel.store.kv_get(&ns, "k").await.expect("kv"), Some(b"v".to_vec()));
    assert!(outbox(&k).await.is_empty(), "a denied publish writes nothing");

    // A real tool without the grant returns the host's refusal as its error result.
    let kv = load(&rt, spec("tool-kv", PluginKind::McpTool), "tool_kv");
    let result = call(&kv, "acme", &Invocation::CallTool { arguments: json!({"op": "get", "key": "k"}) }).await;
    assert_eq!(result, Ok(Output::ToolResult(Err("storage is not granted to this plugin".into()))));
}

// ---------------------------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------------------------

async fn kv(plugin: &WasmPlugin, tenant_name: &str, arguments: serde_json::Value) -> serde_json::Value {
    match call(plugin, tenant_name, &Invocation::CallTool { arguments }).await {
        Ok(Output::ToolResult(Ok(content))) => content,
        other => panic!("expected a tool result, got {other:?}"),
    }
}

#[tokio::test]
async fn storage_is_namespaced_per_plugin_and_tenant() {
    for backend in backends() {
        let k = TestKernel::start(backend).await;
        let rt = runtime(&k);
        let granted = |name: &str| {
            let mut s = spec(name, PluginKind::McpTool);
            s.grants.storage = true;
            s
        };
        let tool = load(&rt, granted("tool-kv"), "tool_kv");
        let other_tool = load(&rt, granted("tool-kv-copy"), "tool_kv");

        assert_eq!(
            kv(&tool, "tenant-a", json!({"op": "set", "key": "note", "value": "hello"})).await,
            json!({"key": "note", "stored": true}),
            "{backend:?}"
        );
        assert_eq!(
            kv(&tool, "tenant-b", json!({"op": "get", "key": "note"})).await,
            json!({"key": "note", "value": null}),
            "{backend:?}: another tenant does not see the key"
        );
        assert_eq!(
            kv(&tool, "tenant-a", json!({"op": "get", "key": "note"})).await,
            json!({"key": "note", "value": "hello"}),
            "{backend:?}"
        );
        assert_eq!(
            kv(&other_tool, "tenant-a", json!({"op": "get", "key": "note"})).await,
            json!({"key": "note", "value": null}),
            "{backend:?}: another plugin does not see the key"
        );
        assert_eq!(
            kv(&tool, "tenant-b", json!({"op": "list"})).await,
            json!({"prefix": "", "keys": [], "truncated": false}),
            "{backend:?}"
        );
        assert_eq!(
            kv(&tool, "tenant-a", json!({"op": "list"})).await,
            json!({"prefix": "", "keys": ["note"], "truncated": false}),
            "{backend:?}"
        );

        // Tenant B writes the same key: each tenant keeps its own value.
        kv(&tool, "tenant-b", json!({"op": "set", "key": "note", "value": "bonjour"})).await;
        assert_eq!(kv(&tool, "tenant-a", json!({"op": "get", "key": "note"})).await["value"], "hello");
        assert_eq!(kv(&tool, "tenant-b", json!({"op": "get", "key": "note"})).await["value"], "bonjour");

        // The store holds them where the runtime says it does, and nowhere else.
        let store = &k.kernel.store;
        assert_eq!(store.kv_get(&namespace("tool-kv", "tenant-a"), "note").await.expect("kv"), Some(b"hello".to_vec()));
        assert_eq!(
            store.kv_get(&namespace("tool-kv", "tenant-b"), "note").await.expect("kv"),
            Some(b"bonjour".to_vec())
        );
        assert_eq!(store.kv_get(&namespace("tool-kv-copy", "tenant-a"), "note").await.expect("kv"), None);

        // Deleting in one namespace leaves the other.
        assert_eq!(
            kv(&tool, "tenant-a", json!({"op": "delete", "key": "note"})).await,
            json!({"key": "note", "deleted": true})
        );
        assert_eq!(kv(&tool, "tenant-a", json!({"op": "get", "key": "note"})).await["value"], json!(null));
        assert_eq!(kv(&tool, "tenant-b", json!({"op": "get", "key": "note"})).await["value"], "bonjour");
    }
}

// ---------------------------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------------------------

fn text(name: &str, value: &str) -> Attribute {
    Attribute { name: name.into(), value: Value::Text(value.into()) }
}

fn request(principal_tenant: &str, role: &str, action: &str, resource_tenant: &str) -> Invocation {
    Invocation::Authorize(AccessRequest {
        principal: vec![text("subject", "k-7"), text("tenant", principal_tenant), text("role", role)],
        action: action.into(),
        resource: vec![text("kind", "agent"), text("id", "a-1"), text("tenant", resource_tenant)],
        context: Vec::new(),
    })
}

fn decision(allow: bool, reasons: &[&str], obligations: &[(&str, &str)]) -> Result<Output, CallError> {
    Ok(Output::Decision(Decision {
        allow,
        reasons: reasons.iter().map(|r| r.to_string()).collect(),
        obligations: obligations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }))
}

fn policy_spec(config: &[u8]) -> LoadSpec {
    LoadSpec { config: Arc::from(config), ..spec("policy-abac", PluginKind::Policy) }
}

#[tokio::test]
async fn the_abac_policy_isolates_tenants_and_fails_closed() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let rt = runtime(&k);
    let document = std::fs::read(format!("{}/../../policies/tenant-isolation.json", env!("CARGO_MANIFEST_DIR")))
        .expect("policies/tenant-isolation.json");
    let policy = load(&rt, policy_spec(&document), "policy_abac");

    assert_eq!(
        call(&policy, "default", &request("acme", "admin", "agents:write", "acme")).await,
        decision(true, &["admins-everything"], &[]),
        "an admin acts within its tenant"
    );
    assert_eq!(
        call(&policy, "default", &request("acme", "admin", "agents:write", "globex")).await,
        decision(false, &["tenant-isolation"], &[]),
        "not across tenants, whatever the role"
    );
    assert_eq!(
        call(&policy, "default", &request("acme", "viewer", "agents:read", "acme")).await,
        decision(true, &["readers-read-agents"], &[("mask", "labels.secret")]),
        "a viewer reads, with the masking obligation"
    );
    assert_eq!(
        call(&policy, "default", &request("acme", "viewer", "agents:read", "globex")).await,
        decision(false, &["tenant-isolation"], &[])
    );
    assert_eq!(
        call(&policy, "default", &request("acme", "viewer", "agents:write", "acme")).await,
        decision(false, &["no permit rule matched"], &[]),
        "a viewer does not write"
    );

    // No document, or a broken one: every request is denied, with the reason.
    let empty = load(&rt, policy_spec(b""), "policy_abac");
    let broken = load(&rt, policy_spec(br#"{"version": 1, "rules": "#), "policy_abac");
    for (plugin, reason_start) in
        [(&empty, "no policy document is configured"), (&broken, "the policy document is invalid")]
    {
        for req in [request("acme", "admin", "agents:write", "acme"), request("acme", "viewer", "agents:read", "acme")]
        {
            let Ok(Output::Decision(d)) = call(plugin, "default", &req).await else { panic!("a decision") };
            assert!(!d.allow, "fails closed: {d:?}");
            assert_eq!(d.reasons.len(), 1, "{d:?}");
            assert!(d.reasons[0].starts_with(reason_start), "{d:?}");
            assert!(d.obligations.is_empty(), "{d:?}");
        }
    }

    // A policy that traps is an error (the kernel denies), and the runtime keeps serving.
    let trap = load(&rt, LoadSpec { name: "policy-trap".into(), ..policy_spec(b"") }, "policy_trap");
    for _ in 0..2 {
        let result = call(&trap, "default", &request("acme", "admin", "agents:write", "acme")).await;
        assert!(matches!(result, Err(CallError::Trap(_))), "{result:?}");
    }
    assert_eq!(
        call(&policy, "default", &request("acme", "admin", "agents:write", "acme")).await,
        decision(true, &["admins-everything"], &[])
    );
}

// ---------------------------------------------------------------------------------------------
// Migrations
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_label_migration_goes_up_and_back_down() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let rt = runtime(&k);
    let migration = load(&rt, spec("migration-agent-labels", PluginKind::Migration), "migration_agent_labels");

    assert_eq!(call(&migration, "default", &Invocation::FromVersion).await, Ok(Output::FromVersion(1)));

    let v1 = json!({"endpoint": "http://gpu-1:8080", "labels": {"gpu": "a100", "zone": "eu-1"}, "name": "gpu-1"});
    let v2 = json!({
        "endpoint": "http://gpu-1:8080",
        "labels": [{"key": "gpu", "value": "a100"}, {"key": "zone", "value": "eu-1"}],
        "name": "gpu-1",
        "schema": 2,
    });
    let up = Invocation::Migrate { direction: Direction::Up, data: v1.clone() };
    assert_eq!(call(&migration, "default", &up).await, Ok(Output::Migrated(v2.clone())));
    let down = Invocation::Migrate { direction: Direction::Down, data: v2 };
    assert_eq!(call(&migration, "default", &down).await, Ok(Output::Migrated(v1)), "down(up(r)) is r");

    // Records a direction cannot restore are guest errors, with the migration's message.
    for (direction, data, message) in [
        (Direction::Up, json!([1, 2]), "the record is not a JSON object with a string `name`"),
        (Direction::Up, json!({"name": "n"}), "the record has no `labels`"),
        (Direction::Up, json!({"name": "n", "labels": {}, "schema": 2}), "the record already has a `schema` field"),
        (Direction::Down, json!({"name": "n", "labels": {}}), "the record has no `schema` field"),
        (Direction::Down, json!({"name": "n", "labels": [], "schema": 3}), "`schema` must be 2"),
    ] {
        let result = call(&migration, "default", &Invocation::Migrate { direction, data: data.clone() }).await;
        match result {
            Err(CallError::Guest(got)) => assert!(got.starts_with(message), "{data}: {got}"),
            other => panic!("{direction:?} {data}: expected a guest error, got {other:?}"),
        }
    }
    // A guest error leaves the instance usable.
    assert_eq!(call(&migration, "default", &Invocation::FromVersion).await, Ok(Output::FromVersion(1)));
}

// ---------------------------------------------------------------------------------------------
// Contracts
// ---------------------------------------------------------------------------------------------

const SPEND_LIMIT: &str = "contract-spend-limit";

fn spend(amount: i64) -> Invocation {
    Invocation::Govern(ContractEvent {
        kind: "spend".into(),
        attributes: vec![Attribute { name: "amount".into(), value: Value::Integer(amount) }],
    })
}

fn contract_spec(name: &str, fuel_max: u64, bus: &[&str]) -> LoadSpec {
    let mut s = spec(name, PluginKind::Contract);
    s.grants = Grants { storage: true, bus: bus.iter().map(|b| b.to_string()).collect(), ..Grants::default() };
    s.limits = Limits { deadline_ms: 2_000, fuel_max: Some(fuel_max), ..Limits::default() };
    s.config = Arc::from(&br#"{"limit": 100}"#[..]);
    s
}

fn verdict(accept: bool, reason: &str) -> Result<Output, CallError> {
    Ok(Output::Verdict(Verdict { accept, reason: reason.into() }))
}

async fn stored_total(k: &TestKernel, tenant_name: &str) -> Option<String> {
    let value = k.kernel.store.kv_get(&namespace(SPEND_LIMIT, tenant_name), "total").await.expect("kv");
    value.map(|v| String::from_utf8(v).expect("text"))
}

#[tokio::test]
async fn the_spend_limit_contract_is_metered_and_deterministic() {
    for backend in backends() {
        let k = TestKernel::start(backend).await;
        let rt = runtime(&k);
        let contract = load(&rt, contract_spec(SPEND_LIMIT, 50_000_000, &[]), "contract_spend_limit");

        let (result, first) = invoke(&contract, "acme", &spend(60)).await;
        assert_eq!(result, verdict(true, "spent 60: total 60 of 100"), "{backend:?}");
        assert_eq!(
            call(&contract, "acme", &spend(30)).await,
            verdict(true, "spent 30: total 90 of 100"),
            "{backend:?}"
        );
        assert_eq!(
            call(&contract, "acme", &spend(20)).await,
            verdict(false, "spending 20 would bring the total from 90 over the limit of 100"),
            "{backend:?}"
        );
        assert_eq!(stored_total(&k, "acme").await.as_deref(), Some("90"), "{backend:?}: a rejection changes nothing");

        // Fuel is reported, and two identical calls on identical state burn the same fuel.
        let fuel = first.fuel_used.expect("contracts report fuel");
        assert!(fuel > 0 && fuel < 50_000_000, "{backend:?}: {fuel}");
        let (again, second) = invoke(&contract, "globex", &spend(60)).await;
        assert_eq!(again, verdict(true, "spent 60: total 60 of 100"), "{backend:?}");
        assert_eq!(second.fuel_used, Some(fuel), "{backend:?}: fuel metering is deterministic");

        // Other tenants' totals are their own.
        assert_eq!(stored_total(&k, "globex").await.as_deref(), Some("60"), "{backend:?}");
        assert_eq!(stored_total(&k, "initech").await, None, "{backend:?}");

        // A contract that computes forever is stopped when its fuel runs out. (The fixture
        // writes nothing; that a failed call's writes and events are dropped is tested with
        // the spend contract in `published_events_reach_the_outbox_only_when_the_call_succeeds`.)
        let mut burner_spec = contract_spec("fuel-burner", 5_000_000, &["contract.>"]);
        burner_spec.config = Arc::from(Vec::new());
        let burner = load(&rt, burner_spec, "fuel_burner");
        let (result, report) = invoke(&burner, "acme", &spend(1)).await;
        assert_eq!(result, Err(CallError::OutOfFuel(5_000_000)), "{backend:?}");
        assert_eq!(report.fuel_used, Some(5_000_000), "{backend:?}: it burnt all of it");
        assert!(report.elapsed < Duration::from_secs(2), "{backend:?}: fuel, not the deadline, stopped it");

        // The contract still works afterwards, on its committed state.
        assert_eq!(
            call(&contract, "acme", &spend(10)).await,
            verdict(true, "spent 10: total 100 of 100"),
            "{backend:?}"
        );
        assert_eq!(stored_total(&k, "acme").await.as_deref(), Some("100"), "{backend:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Bus
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn published_events_reach_the_outbox_only_when_the_call_succeeds() {
    for backend in backends() {
        let k = TestKernel::start(backend).await;
        let rt = runtime(&k);

        // A tool granted the subject it publishes to.
        let mut tool_spec = spec("ungranted-call", PluginKind::McpTool);
        tool_spec.grants.bus = vec!["anything".into()];
        let tool = load(&rt, tool_spec, "ungranted_call");
        let (storage, bus) = ungranted_outcomes(&tool, "acme").await;
        assert!(storage.starts_with("denied: "), "{backend:?}: {storage}");
        assert_eq!(bus, "ok", "{backend:?}");
        assert_eq!(
            outbox(&k).await,
            [(
                "acme".to_string(),
                "anything".to_string(),
                b"payload".to_vec(),
                "plugin/ungranted-call@1.0.0".to_string()
            )],
            "{backend:?}"
        );

        // The spend contract announces accepted spends, not rejected ones.
        let contract = load(&rt, contract_spec(SPEND_LIMIT, 50_000_000, &["contract.spend"]), "contract_spend_limit");
        let (result, report) = invoke(&contract, "globex", &spend(60)).await;
        assert_eq!(result, verdict(true, "spent 60: total 60 of 100"), "{backend:?}");
        assert_eq!(
            call(&contract, "globex", &spend(30)).await,
            verdict(true, "spent 30: total 90 of 100"),
            "{backend:?}"
        );
        let rejected = call(&contract, "globex", &spend(20)).await;
        assert!(matches!(&rejected, Ok(Output::Verdict(v)) if !v.accept), "{backend:?}: {rejected:?}");
        let source = "plugin/contract-spend-limit@1.0.0".to_string();
        let notice = |amount: i64, total: i64| {
            (
                "globex".to_string(),
                "contract.spend".to_string(),
                format!(r#"{{"amount":{amount},"total":{total},"limit":100}}"#).into_bytes(),
                source.clone(),
            )
        };
        let rows = outbox(&k).await;
        assert_eq!(rows[1..], [notice(60, 60), notice(30, 90)], "{backend:?}");

        // A call that runs out of fuel after it stored its total and published its notice
        // commits neither. Fuel is checked at loop headers and function entries, so the least
        // fuel a call succeeds with is found by search; with one unit less, the call fails
        // after the last check, past the publication (the verdict's reason is formatted after
        // it, in loops).
        let fuel = report.fuel_used.expect("fuel");
        let least = least_fuel(&rt, fuel.saturating_sub(FUEL_SEARCH_SPAN), fuel).await;
        let short = load(&rt, contract_spec(SPEND_LIMIT, least - 1, &["contract.spend"]), "contract_spend_limit");
        assert_eq!(call(&short, "initech", &spend(60)).await, Err(CallError::OutOfFuel(least - 1)), "{backend:?}");
        assert_eq!(stored_total(&k, "initech").await, None, "{backend:?}: the buffered write was dropped");
        let initech_rows = |rows: Vec<OutboxRow>| rows.iter().filter(|r| r.0 == "initech").count();
        assert_eq!(initech_rows(outbox(&k).await), 0, "{backend:?}: the published event was dropped");
        // With the fuel it needs, the same call on the same state succeeds and commits both.
        let enough = load(&rt, contract_spec(SPEND_LIMIT, least, &["contract.spend"]), "contract_spend_limit");
        let result = call(&enough, "initech", &spend(60)).await;
        assert_eq!(result, verdict(true, "spent 60: total 60 of 100"), "{backend:?}");
        assert_eq!(stored_total(&k, "initech").await.as_deref(), Some("60"), "{backend:?}");
        assert_eq!(initech_rows(outbox(&k).await), 1, "{backend:?}");
    }
}

/// The search for the least fuel a call needs starts this far below the fuel it reports.
const FUEL_SEARCH_SPAN: u64 = 512;

/// The least `fuel_max` with which a first spend of 60 succeeds, between `fails` (checked to
/// run out of fuel) and `succeeds`. Each probe runs for a tenant of its own, on fresh state.
async fn least_fuel(rt: &Runtime, mut fails: u64, mut succeeds: u64) -> u64 {
    let probe = |fuel: u64| async move {
        let plugin = load(rt, contract_spec(SPEND_LIMIT, fuel, &["contract.spend"]), "contract_spend_limit");
        match call(&plugin, &format!("probe-{fuel}"), &spend(60)).await {
            Ok(_) => true,
            Err(CallError::OutOfFuel(_)) => false,
            other => panic!("fuel {fuel}: {other:?}"),
        }
    };
    assert!(!probe(fails).await, "{fails} units of fuel are not enough");
    assert!(probe(succeeds).await, "{succeeds} units of fuel are enough");
    while succeeds - fails > 1 {
        let mid = fails + (succeeds - fails) / 2;
        if probe(mid).await {
            succeeds = mid;
        } else {
            fails = mid;
        }
    }
    succeeds
}

// ---------------------------------------------------------------------------------------------
// Warm stores
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_stores_are_reused_and_bounded_per_tenant() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let rt = runtime(&k);
    let mut scorer_spec = spec("scorer-weighted", PluginKind::Scorer);
    // Storage makes every call wait on the store, so concurrent calls overlap.
    scorer_spec.grants.storage = true;
    let scorer = Arc::new(load(&rt, scorer_spec, "scorer_weighted"));
    let candidates = tricky_candidates();
    let want = bits(&candidates.iter().map(|c| expected_score(c, DEFAULT_WEIGHTS)).collect::<Vec<_>>());

    for i in 0..50 {
        assert_eq!(bits(&scores(&scorer, "acme", &candidates).await), want, "call {i}");
    }
    assert_eq!(rt.warm_stores(), 1, "sequential calls reuse one store");

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (scorer, candidates) = (scorer.clone(), candidates.clone());
        calls.spawn(async move { scores(&scorer, "acme", &candidates).await });
    }
    while let Some(got) = calls.join_next().await {
        assert_eq!(bits(&got.expect("task")), want);
    }
    let warm = rt.warm_stores();
    assert!((1..=WARM_PER_TENANT_MAX).contains(&warm), "at most {WARM_PER_TENANT_MAX} per tenant: {warm}");

    // Another tenant has its own stores, within the same bound.
    for _ in 0..5 {
        assert_eq!(bits(&scores(&scorer, "globex", &candidates).await), want);
    }
    assert_eq!(rt.warm_stores(), warm + 1);

    // Dropping the plugin releases its warm stores.
    drop(scorer);
    assert_eq!(rt.warm_stores(), 0);
}
