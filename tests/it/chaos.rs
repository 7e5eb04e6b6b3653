//! Chaos toggles over the real router: off by default; store, plugin and latency faults where
//! they are injected; tenant scoping; expiry on the manual clock; every change audited (log
//! record, outbox event, metrics); bad input and non-admins refused with nothing changed.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use nops_core::plugin::PluginKind;
use serde_json::{Value, json};

use crate::plugin_api::{manifest, policy_document, upload, wasm};
use crate::support::{Backend, TestKernel, agent_json, as_key};

/// Creates a key with the bootstrap admin key, acting in `tenant`; returns its secret.
async fn create_key(k: &TestKernel, tenant: &str, body: Value) -> String {
    let (status, created) = as_key(k, &k.key, Some(tenant), "POST", "/api/v1/admin/api-keys", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["secret"].as_str().expect("secret").to_string()
}

/// Turns a toggle on as the bootstrap admin, acting in `tenant`; returns its id.
async fn toggle_on(k: &TestKernel, tenant: &str, body: Value) -> String {
    let (status, toggle) = as_key(k, &k.key, Some(tenant), "POST", "/api/v1/admin/chaos", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{:?}: {toggle}", k.backend);
    toggle["id"].as_str().expect("id").to_string()
}

async fn metrics(k: &TestKernel) -> String {
    k.send_text(k.request("GET", "/metrics", None)).await.1
}

/// Subjects of the kernel's outbox rows, oldest first.
async fn outbox_subjects(k: &TestKernel) -> Vec<String> {
    const SQL: &str = "SELECT subject FROM outbox ORDER BY id";
    match k.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&k.db.url).await.expect("open the test database");
            let rows: Vec<(String,)> = sqlx::query_as(SQL).fetch_all(&pool).await.expect("read the outbox");
            pool.close().await;
            rows.into_iter().map(|r| r.0).collect()
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&k.db.url).await.expect("open the test database");
            let rows: Vec<(String,)> = sqlx::query_as(SQL).fetch_all(&pool).await.expect("read the outbox");
            pool.close().await;
            rows.into_iter().map(|r| r.0).collect()
        }
    }
}

/// Log lines written while a test runs (on its thread).
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

impl Capture {
    /// The audit records of `event` about these toggles.
    fn audit_records(&self, event: &str, toggles: &[String]) -> Vec<Value> {
        let text = String::from_utf8_lossy(&self.0.lock().expect("capture")).into_owned();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "nops::audit" && v["event"] == event)
            .filter(|v| v["toggle_id"].as_str().is_some_and(|id| toggles.iter().any(|t| t == id)))
            .collect()
    }
}

/// Every log line of this test process, as JSON. One subscriber for the whole process rather
/// than one per test (`set_default`): a thread-scoped subscriber misses events whose callsites
/// other tests' threads registered first.
fn captured_logs() -> &'static Capture {
    static CAPTURE: std::sync::OnceLock<Capture> = std::sync::OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(capture.clone())
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber of the tests");
        capture
    })
}

#[tokio::test]
async fn chaos_is_off_by_default() {
    for k in TestKernel::all().await {
        let (status, page) = k.call("GET", "/api/v1/admin/chaos", None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(page["toggles"], json!([]));
        assert_eq!(page["toggles_max"], 64);
        assert!(!metrics(&k).await.contains("nops_chaos_toggle{"), "no toggle series while none is on");
        k.create_agent(agent_json("calm", "gpu", "1.0.0")).await;
    }
}

#[tokio::test]
async fn a_store_toggle_fails_registration_with_503_until_it_is_cleared_and_every_change_is_audited() {
    let capture = captured_logs();
    tracing::callsite::rebuild_interest_cache();
    let mut toggles = Vec::new();
    for k in TestKernel::all().await {
        let id = toggle_on(&k, "default", json!({ "target": "store", "error_ratio": 1.0, "note": "game day" })).await;
        toggles.push(id.clone());

        let (status, error) = k.call("POST", "/api/v1/agents", Some(agent_json("a1", "gpu", "1.0.0"))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
        assert_eq!(error["error"]["code"], "store_unavailable");
        assert!(error["error"]["request_id"].is_string());
        assert!(!error.to_string().contains("chaos"), "a 5xx never leaks internals: {error}");

        // Another tenant is untouched.
        let (status, agent) =
            as_key(&k, &k.key, Some("acme"), "POST", "/api/v1/agents", Some(agent_json("a1", "gpu", "1.0.0"))).await;
        assert_eq!(status, StatusCode::CREATED, "{agent}");

        let text = metrics(&k).await;
        assert!(text.contains(r#"nops_chaos_toggle{fault="error",target="store",tenant="default"} 1"#), "{text}");
        assert!(text.contains(r#"nops_chaos_injections_total{fault="error",target="store"}"#));

        let (status, removed) = k.call("DELETE", &format!("/api/v1/admin/chaos/{id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{removed}");
        assert_eq!(removed["note"], "game day");
        k.create_agent(agent_json("a1", "gpu", "1.0.0")).await;
        let (status, _) = k.call("DELETE", &format!("/api/v1/admin/chaos/{id}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "already off");

        let text = metrics(&k).await;
        assert!(!text.contains("nops_chaos_toggle{"), "the series goes with the toggle");
        assert!(text.contains(r#"nops_chaos_events_total{event="created"} 1"#));
        assert!(text.contains(r#"nops_chaos_events_total{event="deleted"} 1"#));
        let subjects = outbox_subjects(&k).await;
        assert_eq!(
            subjects.iter().filter(|s| s.starts_with("nops.chaos.")).collect::<Vec<_>>(),
            ["nops.chaos.created", "nops.chaos.deleted"]
        );
    }
    let created = capture.audit_records("chaos.created", &toggles);
    assert_eq!(created.len(), super::support::backends().len(), "one audit record per change");
    assert_eq!(created[0]["chaos_target"], "store");
    assert_eq!(created[0]["tenant"], "default");
    assert_eq!(created[0]["error_ratio"], 1.0);
    assert_eq!(created[0]["note"], "game day");
    assert_eq!(capture.audit_records("chaos.deleted", &toggles).len(), super::support::backends().len());
}

#[tokio::test]
async fn a_plugin_error_toggle_makes_a_policy_deny_and_a_scorer_fall_back() {
    for k in TestKernel::all().await {
        let config = policy_document("tenant-isolation.json");
        let component = wasm("policy_abac");
        let m = manifest("abac", "1.0.0", PluginKind::Policy, &component, Some(&config));
        let (status, body) = upload(&k, &m, &component, Some(&config), true).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let scorer = wasm("scorer_weighted");
        let (status, body) =
            upload(&k, &manifest("rank", "1.0.0", PluginKind::Scorer, &scorer, None), &scorer, None, true).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let decide = json!({ "authorize": {
            "action": "agents:read",
            "principal": [ { "name": "role", "value": "admin" }, { "name": "tenant", "value": "default" } ],
            "resource": [ { "name": "tenant", "value": "default" } ],
            "context": []
        }});
        let candidate = |index: u32, health: f32, in_flight: u32| {
            json!({ "index": index, "health": health, "in_flight": in_flight, "cpu_ratio": 0.1, "latency_ms": 5.0,
                    "error_rate": 0.0, "silence_ms": 100, "version": [1, 0, 0] })
        };
        let score = json!({ "score": { "task": { "capabilities": ["gpu"] },
            "candidates": [candidate(0, 1.0, 3), candidate(1, 0.5, 0)] } });

        let (_, answer) = k.call("POST", "/api/v1/plugins/abac/invoke", Some(decide.clone())).await;
        assert_eq!(answer["output"]["decision"]["allow"], true, "{answer}");

        let id = toggle_on(&k, "default", json!({ "target": "plugin", "error_ratio": 1.0 })).await;
        let (status, answer) = k.call("POST", "/api/v1/plugins/abac/invoke", Some(decide.clone())).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["output"]["decision"]["allow"], false, "fail closed: {answer}");
        assert_eq!(answer["failure"]["reason"], "unavailable", "{answer}");
        let (status, answer) = k.call("POST", "/api/v1/plugins/rank/invoke", Some(score.clone())).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["output"]["scores"], json!([0.25, 0.5]), "built-in scoring: {answer}");
        let (status, _) = k.call("DELETE", &format!("/api/v1/admin/chaos/{id}"), None).await;
        assert_eq!(status, StatusCode::OK);

        // A drop is a call nobody answers: a timeout, with the same failure semantics.
        toggle_on(&k, "default", json!({ "target": "plugin", "drop_ratio": 1.0 })).await;
        let (_, answer) = k.call("POST", "/api/v1/plugins/abac/invoke", Some(decide.clone())).await;
        assert_eq!(answer["output"]["decision"]["allow"], false, "{answer}");
        assert_eq!(answer["failure"]["reason"], "timeout", "{answer}");
        let (status, cleared) = k.call("DELETE", "/api/v1/admin/chaos", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(cleared["cleared"].as_array().map(Vec::len), Some(1));

        let (_, answer) = k.call("POST", "/api/v1/plugins/abac/invoke", Some(decide)).await;
        assert_eq!(answer["output"]["decision"]["allow"], true, "back to normal: {answer}");
        let text = metrics(&k).await;
        assert!(text.contains(r#"nops_chaos_injections_total{fault="error",target="plugin"} 2"#), "{text}");
        assert!(text.contains(r#"nops_chaos_injections_total{fault="drop",target="plugin"} 1"#), "{text}");
    }
}

#[tokio::test]
async fn a_latency_toggle_delays_the_calls_it_matches() {
    for k in TestKernel::all().await {
        toggle_on(&k, "default", json!({ "target": "store", "latency_ms": 150, "jitter_ms": 10 })).await;
        let started = Instant::now();
        let (status, _) = k.call("GET", "/api/v1/agents", None).await;
        assert_eq!(status, StatusCode::OK, "latency alone fails nothing");
        assert!(started.elapsed() >= Duration::from_millis(150), "{:?}", started.elapsed());
        let text = metrics(&k).await;
        assert!(text.contains(r#"nops_chaos_toggle{fault="latency",target="store",tenant="default"} 1"#));
        assert!(text.contains(r#"nops_chaos_injections_total{fault="latency",target="store"}"#));
    }
}

#[tokio::test]
async fn toggles_end_on_their_own() {
    for k in TestKernel::all().await {
        toggle_on(&k, "default", json!({ "target": "store", "error_ratio": 1.0, "duration_ms": 60_000 })).await;
        let (status, page) = k.call("GET", "/api/v1/admin/chaos", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(page["toggles"][0]["expires_at_ms"], crate::support::T0_MS + 60_000);
        let (status, _) = k.call("POST", "/api/v1/agents", Some(agent_json("late", "gpu", "1.0.0"))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

        k.clock.advance_ms(60_000);
        k.create_agent(agent_json("late", "gpu", "1.0.0")).await;
        let (_, page) = k.call("GET", "/api/v1/admin/chaos", None).await;
        assert_eq!(page["toggles"], json!([]));
        assert!(outbox_subjects(&k).await.contains(&"nops.chaos.expired".to_string()));
        let text = metrics(&k).await;
        assert!(text.contains(r#"nops_chaos_events_total{event="expired"} 1"#));
        assert!(!text.contains("nops_chaos_toggle{"));
    }
}

#[tokio::test]
async fn tenant_admins_toggle_their_own_tenant_only() {
    for k in TestKernel::all().await {
        let acme_admin = create_key(&k, "acme", json!({ "name": "acme-admin", "role": "admin" })).await;
        let kernel_wide = json!({ "target": "store", "kernel_wide": true, "error_ratio": 1.0 });
        let (status, error) =
            as_key(&k, &acme_admin, None, "POST", "/api/v1/admin/chaos", Some(kernel_wide.clone())).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{error}");
        let (status, error) = as_key(
            &k,
            &acme_admin,
            Some("beta"),
            "POST",
            "/api/v1/admin/chaos",
            Some(json!({ "target": "store", "error_ratio": 1.0 })),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "another tenant: {error}");
        let (status, own) = as_key(
            &k,
            &acme_admin,
            None,
            "POST",
            "/api/v1/admin/chaos",
            Some(json!({ "target": "store", "error_ratio": 1.0 })),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{own}");
        assert_eq!(own["tenant"], "acme");
        // The kernel-wide admin's toggle is invisible to the tenant admin, and out of its reach.
        let global = toggle_on(&k, "default", json!({ "target": "bus", "kernel_wide": true, "drop_ratio": 0.5 })).await;
        let (_, page) = as_key(&k, &acme_admin, None, "GET", "/api/v1/admin/chaos", None).await;
        assert_eq!(page["toggles"].as_array().map(Vec::len), Some(1), "{page}");
        let (status, _) = as_key(&k, &acme_admin, None, "DELETE", &format!("/api/v1/admin/chaos/{global}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (_, page) = k.call("GET", "/api/v1/admin/chaos", None).await;
        assert_eq!(page["toggles"].as_array().map(Vec::len), Some(2), "{page}");
        assert_eq!(page["toggles"][1].get("tenant"), None, "kernel-wide: {page}");

        let (status, error) =
            as_key(&k, &acme_admin, None, "POST", "/api/v1/agents", Some(agent_json("x", "gpu", "1.0.0"))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
        k.create_agent(agent_json("x", "gpu", "1.0.0")).await;
        let text = metrics(&k).await;
        assert!(text.contains(r#"nops_chaos_toggle{fault="error",target="store",tenant="acme"} 1"#), "{text}");
        assert!(text.contains(r#"nops_chaos_toggle{fault="drop",target="bus",tenant="*"} 1"#), "{text}");
    }
}

#[tokio::test]
async fn bad_toggles_and_non_admins_are_refused_and_nothing_changes() {
    for k in TestKernel::all().await {
        for (body, status, code) in [
            (json!({ "target": "store", "error_ratio": 1.5 }), StatusCode::UNPROCESSABLE_ENTITY, "invalid_ratio"),
            (json!({ "target": "store", "drop_ratio": -1 }), StatusCode::UNPROCESSABLE_ENTITY, "invalid_ratio"),
            (json!({ "target": "disk", "error_ratio": 0.5 }), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
            (json!({ "target": "store" }), StatusCode::UNPROCESSABLE_ENTITY, "no_fault"),
            (json!({ "target": "store", "latency_ms": 600_000 }), StatusCode::UNPROCESSABLE_ENTITY, "invalid_latency"),
            (
                json!({ "target": "store", "error_ratio": 0.1, "duration_ms": 0 }),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_duration",
            ),
            (
                json!({ "target": "store", "error_ratio": 0.1, "surprise": true }),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
            ),
        ] {
            let (got, error) = k.call("POST", "/api/v1/admin/chaos", Some(body.clone())).await;
            assert_eq!((got, error["error"]["code"].as_str()), (status, Some(code)), "{body}: {error}");
        }
        let (status, error) = k.call("DELETE", "/api/v1/admin/chaos/not-a-uuid", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
        for role in ["operator", "viewer"] {
            let key = create_key(&k, "acme", json!({ "name": role, "role": role })).await;
            for (method, body) in [("GET", None), ("POST", Some(json!({ "target": "store", "error_ratio": 1.0 })))] {
                let (status, error) = as_key(&k, &key, None, method, "/api/v1/admin/chaos", body).await;
                assert_eq!(status, StatusCode::FORBIDDEN, "{role} {method}: {error}");
            }
        }
        let (_, page) = k.call("GET", "/api/v1/admin/chaos", None).await;
        assert_eq!(page["toggles"], json!([]), "nothing was turned on");
    }
}
