//! The plugin runtime's hard limits, with real components built from `plugins/` and
//! `tests/plugins/` by `scripts/build-plugins.sh` (run by `make test`).

use std::sync::Arc;

use nops_core::store::PluginKv;
use nops_runtime::{CallError, Candidate, Grants, LoadError, PluginLimits, Runtime, RuntimeConfig, Task, namespace};

use crate::support::{Backend, TestKernel, backends};

fn component(name: &str) -> Vec<u8> {
    let path = format!("{}/../../target/wasm/wasm32-wasip2/release/{name}.wasm", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}; build the plugins with scripts/build-plugins.sh"))
}

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

fn task() -> Task {
    Task { capabilities: vec!["inference.llm".into()], hints: Vec::new() }
}

/// A runtime whose plugin storage is the test kernel's real store.
fn runtime(k: &TestKernel) -> Runtime {
    Runtime::new(&RuntimeConfig::default(), Arc::new(k.kernel.store.clone())).expect("runtime")
}

async fn sqlite_kernel() -> TestKernel {
    TestKernel::start(Backend::Sqlite).await
}

#[tokio::test]
async fn the_weighted_scorer_prefers_healthy_idle_fast_agents() {
    let k = sqlite_kernel().await;
    let rt = runtime(&k);
    let scorer = rt
        .load_scorer("scorer-weighted", &component("scorer_weighted"), PluginLimits::default(), Grants::default())
        .expect("load");
    let candidates =
        [candidate(0, 0.2, 8, 400.0, 0.3), candidate(1, 1.0, 0, 10.0, 0.0), candidate(2, 0.9, 2, 50.0, 0.01)];
    let scores = scorer.score("default", &task(), &candidates).await.expect("scores");
    assert_eq!(scores.len(), 3);
    assert!(scores[1] > scores[2] && scores[2] > scores[0], "{scores:?}");
    assert_eq!(scorer.digest().len(), 64, "BLAKE2b-256 hex");
}

#[tokio::test]
async fn misbehaving_plugins_are_stopped_and_the_runtime_keeps_serving() {
    let k = sqlite_kernel().await;
    let rt = runtime(&k);
    let limits = PluginLimits { memory_bytes_max: 16 << 20, deadline_ms: 50 };
    let candidates = [candidate(0, 1.0, 0, 10.0, 0.0)];

    let spin = rt.load_scorer("fixture", &component("loop_forever"), limits, Grants::default()).expect("load");
    assert_eq!(
        spin.score("default", &task(), &candidates).await,
        Err(CallError::Timeout(50)),
        "an endless loop is interrupted"
    );
    assert_eq!(spin.stats().timeouts.load(std::sync::atomic::Ordering::Relaxed), 1);

    let bomb = rt.load_scorer("fixture", &component("memory_bomb"), limits, Grants::default()).expect("load");
    let result = bomb.score("default", &task(), &candidates).await;
    assert!(matches!(result, Err(CallError::Trap(_))), "a memory bomb traps at the cap: {result:?}");
    let high_water = bomb.stats().memory_high_water_bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(high_water > 0 && high_water <= 16 << 20, "memory stayed under the cap: {high_water}");

    let trap = rt.load_scorer("fixture", &component("trap"), limits, Grants::default()).expect("load");
    assert!(matches!(trap.score("default", &task(), &candidates).await, Err(CallError::Trap(_))));
    assert_eq!(trap.stats().traps.load(std::sync::atomic::Ordering::Relaxed), 1);

    // The same engine still serves a well-behaved plugin, many times.
    let good = rt.load_scorer("fixture", &component("scorer_weighted"), limits, Grants::default()).expect("load");
    for _ in 0..50 {
        assert_eq!(good.score("default", &task(), &candidates).await.expect("scores").len(), 1);
    }
    // And the misbehaving ones fail the same way again (no state leaks between calls).
    assert_eq!(spin.score("default", &task(), &candidates).await, Err(CallError::Timeout(50)));
}

#[tokio::test]
async fn components_that_do_not_match_their_kind_are_refused_at_load() {
    let k = sqlite_kernel().await;
    let rt = runtime(&k);
    let err = rt
        .load_scorer("fixture", &component("policy_as_scorer"), PluginLimits::default(), Grants::default())
        .expect_err("a policy is not a scorer");
    assert!(matches!(err, LoadError::WorldMismatch { kind: "scorer", .. }), "{err}");
    let err = rt
        .load_scorer("fixture", b"\0asm not really", PluginLimits::default(), Grants::default())
        .expect_err("garbage");
    assert!(matches!(err, LoadError::Invalid(_)), "{err}");
    let err = rt
        .load_scorer(
            "fixture",
            &component("scorer_weighted"),
            PluginLimits { memory_bytes_max: usize::MAX, deadline_ms: 50 },
            Grants::default(),
        )
        .expect_err("over the ceiling");
    assert!(matches!(err, LoadError::Limits(_)), "{err}");
}

fn weights(w: [f32; 4]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[tokio::test]
async fn storage_is_namespaced_per_tenant_and_denied_unless_granted() {
    for backend in backends() {
        let k = TestKernel::start(backend).await;
        let rt = runtime(&k);
        let wasm = component("scorer_weighted");
        // Latency-only weights for tenant acme: the fastest candidate wins despite poor health.
        k.kernel
            .store
            .kv_set(&namespace("scorer-weighted", "acme"), "weights", &weights([0.0, 0.0, 1.0, 0.0]), 10, 0)
            .await
            .expect("seed weights");
        let candidates = [candidate(0, 1.0, 0, 300.0, 0.0), candidate(1, 0.1, 0, 5.0, 0.0)];
        let granted =
            rt.load_scorer("scorer-weighted", &wasm, PluginLimits::default(), Grants { storage: true }).expect("load");
        let acme = granted.score("acme", &task(), &candidates).await.expect("scores");
        assert!(acme[1] > acme[0], "{backend:?}: acme's weights apply: {acme:?}");
        let other = granted.score("other", &task(), &candidates).await.expect("scores");
        assert!(other[0] > other[1], "{backend:?}: another tenant sees its own (empty) namespace: {other:?}");
        let denied =
            rt.load_scorer("scorer-weighted", &wasm, PluginLimits::default(), Grants { storage: false }).expect("load");
        let defaults = denied.score("acme", &task(), &candidates).await.expect("a denied call is a value, not a trap");
        assert_eq!(defaults, other, "{backend:?}: without the grant the plugin falls back to its defaults");
    }
}

#[tokio::test]
async fn the_plugin_kv_enforces_its_key_limit() {
    for backend in backends() {
        let k = TestKernel::start(backend).await;
        let store = &k.kernel.store;
        let ns = namespace("p", "t");
        store.kv_set(&ns, "a", b"1", 2, 0).await.expect("first key");
        store.kv_set(&ns, "b", b"2", 2, 0).await.expect("second key");
        assert!(store.kv_set(&ns, "c", b"3", 2, 0).await.is_err(), "{backend:?}: a third key is refused");
        store.kv_set(&ns, "a", b"updated", 2, 0).await.expect("updating an existing key is allowed");
        assert_eq!(store.kv_get(&ns, "a").await.expect("get"), Some(b"updated".to_vec()));
        assert_eq!(store.kv_list(&ns, "", 10).await.expect("list"), ["a", "b"]);
        store.kv_set(&ns, "a%", b"x", 3, 0).await.expect("key with a LIKE metacharacter");
        assert_eq!(store.kv_list(&ns, "a%", 10).await.expect("list"), ["a%"], "prefixes match literally");
        assert!(store.kv_delete(&ns, "a").await.expect("delete"));
        assert_eq!(store.kv_get(&namespace("p", "other"), "b").await.expect("get"), None, "namespaces are apart");
    }
}
