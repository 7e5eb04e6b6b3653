//! Rate limits: per credential, per tenant and per route budgets (GCRA), their headers, their
//! recovery, bounded key maps, the store's GCRA on both backends, and one budget shared by two
//! kernels on one PostgreSQL database.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use nops::config::{Config, ServeArgs};
use nops::kernel::Kernel;
use nops_core::clock::ManualClock;
use nops_core::store::{AgentFilter, AgentStore, GcraOutcome, RateLimitStore};
use nops_core::tenant::TenantId;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::support::{Backend, T0_MS, TestDb, TestKernel, agent_json, backends, test_args};

/// A kernel on a fresh database of `backend` with `toml` as its configuration file.
async fn kernel_with(backend: Backend, toml: &str) -> TestKernel {
    let db = TestDb::new(backend).await;
    let path = write_config(&db, toml);
    TestKernel::start_with(backend, db, |args| args.config = Some(path)).await
}

fn write_config(db: &TestDb, toml: &str) -> std::path::PathBuf {
    let path = db.dir.path().join(format!("limits-{}.toml", uuid::Uuid::now_v7().simple()));
    std::fs::write(&path, toml).expect("write config");
    path
}

/// Agents stored in the default tenant, read from the store (the API would be rate limited).
async fn stored_agents(k: &TestKernel) -> usize {
    let filter = AgentFilter { tenant: Some(TenantId::default_tenant()), ..AgentFilter::default() };
    k.kernel.store.list_agents(&filter, 1_000).await.expect("list").len()
}

async fn metrics_text(router: &Router) -> String {
    let response = router
        .clone()
        .oneshot(Request::builder().uri("/metrics").body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The value of a metric line `name{labels} value`, 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

/// A refusal: 429 in the JSON envelope with the request id, `Retry-After` in whole seconds,
/// the draft headers naming `limit`, and the security headers.
fn assert_refused(status: StatusCode, headers: &HeaderMap, body: &Value, limit: &str, context: &str) {
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{context}: {body}");
    assert_eq!(body["error"]["code"], "rate_limited", "{context}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains(limit)), "{context}: {body}");
    assert_eq!(body["error"]["request_id"], header(headers, "x-request-id"), "{context}");
    let retry: u64 = header(headers, "retry-after").parse().unwrap_or_else(|_| panic!("{context}: Retry-After"));
    assert!(retry >= 1, "{context}: Retry-After {retry}");
    assert!(header(headers, "ratelimit-policy").starts_with(&format!("\"{limit}\";q=")), "{context}: {headers:?}");
    assert!(header(headers, "ratelimit").starts_with(&format!("\"{limit}\";r=0;t=")), "{context}: {headers:?}");
    assert_eq!(header(headers, "content-type"), "application/json", "{context}");
    assert_eq!(header(headers, "x-content-type-options"), "nosniff", "{context}");
    assert!(header(headers, "strict-transport-security").starts_with("max-age="), "{context}");
}

#[tokio::test]
async fn a_spent_key_budget_is_429_with_headers_and_the_refused_create_creates_nothing() {
    let toml =
        "[rate_limits]\nper_key = { per_second = 1, burst = 3 }\nper_tenant = { per_second = 1000, burst = 1000 }\n";
    for backend in backends() {
        let k = kernel_with(backend, toml).await;
        for i in 0..3u32 {
            let (status, headers, body) =
                k.send(k.request("POST", "/api/v1/agents", Some(agent_json(&format!("a{i}"), "a.b", "1.0.0")))).await;
            assert_eq!(status, StatusCode::CREATED, "{backend:?}: {body}");
            assert_eq!(header(&headers, "ratelimit-policy"), "\"key\";q=3;w=3", "{backend:?}");
            let state = header(&headers, "ratelimit");
            assert!(state.starts_with(&format!("\"key\";r={};t=", 2 - i)), "{backend:?}: {state}");
        }
        let (status, headers, body) =
            k.send(k.request("POST", "/api/v1/agents", Some(agent_json("a3", "a.b", "1.0.0")))).await;
        assert_refused(status, &headers, &body, "key", &format!("{backend:?}"));
        assert_eq!(stored_agents(&k).await, 3, "{backend:?}: the refused create created nothing");
        let metrics = metrics_text(&k.router).await;
        assert_eq!(metric(&metrics, "nops_rate_limited_total{limit=\"key\"}"), 1.0, "{backend:?}");
        // Probes and metrics are not behind the limits.
        let (status, _) = k.send_text(Request::builder().uri("/health").body(Body::empty()).expect("req")).await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test]
async fn a_spent_tenant_budget_is_429_and_other_tenants_go_on() {
    let toml =
        "[rate_limits]\nper_key = { per_second = 1000, burst = 1000 }\nper_tenant = { per_second = 1, burst = 2 }\n";
    for backend in backends() {
        let k = kernel_with(backend, toml).await;
        let in_tenant = |tenant: &str| {
            let mut request = k.request("GET", "/api/v1/agents", None);
            request.headers_mut().insert("x-nops-tenant", tenant.parse().expect("header"));
            request
        };
        for _ in 0..2 {
            let (status, headers, body) = k.send(in_tenant("acme")).await;
            assert_eq!(status, StatusCode::OK, "{backend:?}: {body}");
            assert_eq!(header(&headers, "ratelimit-policy"), "\"tenant\";q=2;w=2", "the most constraining budget");
        }
        let (status, headers, body) = k.send(in_tenant("acme")).await;
        assert_refused(status, &headers, &body, "tenant", &format!("{backend:?}"));
        let (status, _, body) = k.send(in_tenant("globex")).await;
        assert_eq!(status, StatusCode::OK, "{backend:?}: another tenant has its own budget: {body}");
        let metrics = metrics_text(&k.router).await;
        assert_eq!(metric(&metrics, "nops_rate_limited_total{limit=\"tenant\"}"), 1.0, "{backend:?}");
    }
}

#[tokio::test]
async fn a_spent_route_budget_refuses_that_route_only_and_the_refused_heartbeat_changes_nothing() {
    let toml = "[rate_limits]\nper_key = { per_second = 1000, burst = 1000 }\n\
                [rate_limits.per_route]\n\"POST /api/v1/agents/{id}/heartbeat\" = { per_second = 1, burst = 2 }\n";
    for backend in backends() {
        let k = kernel_with(backend, toml).await;
        let agent = k.create_agent(agent_json("hb", "a.b", "1.0.0")).await;
        let id = agent["id"].as_str().expect("id").to_string();
        let path = format!("/api/v1/agents/{id}/heartbeat");
        for step in 1..=2i64 {
            k.clock.advance_ms(1_000);
            let (status, headers, body) =
                k.send(k.request("POST", &path, Some(json!({"in_flight_tasks": step})))).await;
            assert_eq!(status, StatusCode::OK, "{backend:?}: {body}");
            assert_eq!(header(&headers, "ratelimit-policy"), "\"route\";q=2;w=2");
        }
        k.clock.advance_ms(1_000);
        let (status, headers, body) = k.send(k.request("POST", &path, Some(json!({"in_flight_tasks": 99})))).await;
        assert_refused(status, &headers, &body, "route", &format!("{backend:?}"));
        let (status, got) = k.call("GET", &format!("/api/v1/agents/{id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{backend:?}: other routes go on: {got}");
        assert_eq!(got["last_heartbeat_at_ms"], T0_MS + 2_000, "{backend:?}: the refused heartbeat was not recorded");
        assert_eq!(got["load"]["in_flight_tasks"], 2);
    }
}

#[tokio::test]
async fn a_budget_recovers_after_its_emission_interval() {
    // 2 a second: one request back every 500 ms.
    let toml = "[rate_limits]\nper_key = { per_second = 2, burst = 2 }\n";
    let k = kernel_with(Backend::Sqlite, toml).await;
    for _ in 0..2 {
        assert_eq!(k.call("GET", "/api/v1/agents", None).await.0, StatusCode::OK);
    }
    let (status, headers, body) = k.send(k.request("GET", "/api/v1/agents", None)).await;
    assert_refused(status, &headers, &body, "key", "spent");
    assert_eq!(header(&headers, "retry-after"), "1", "at most 500 ms, rounded up to whole seconds");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, headers, body) = k.send(k.request("GET", "/api/v1/agents", None)).await;
    assert_eq!(status, StatusCode::OK, "recovered: {body}");
    assert!(header(&headers, "ratelimit").starts_with("\"key\";r="), "{headers:?}");
}

#[tokio::test]
async fn a_flood_of_distinct_keys_is_bounded_by_keys_max() {
    // Three tenant budgets at most; every further tenant shares one overflow budget.
    let toml = "[rate_limits]\nkeys_max = 3\nhousekeeping_interval_ms = 1\n\
                per_key = { per_second = 1000, burst = 1000 }\nper_tenant = { per_second = 1, burst = 1 }\n";
    let k = kernel_with(Backend::Sqlite, toml).await;
    let mut statuses = Vec::new();
    for i in 0..10 {
        let mut request = k.request("GET", "/api/v1/agents", None);
        request.headers_mut().insert("x-nops-tenant", format!("flood-{i}").parse().expect("header"));
        statuses.push(k.send(request).await.0);
    }
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(ok, 4, "three tenants with their own budget, one request on the overflow budget: {statuses:?}");
    assert!(statuses[4..].iter().all(|s| *s == StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    let metrics = metrics_text(&k.router).await;
    assert_eq!(metric(&metrics, "nops_rate_limit_keys_overflow_total{limit=\"tenant\"}"), 7.0, "{metrics}");
    let held = metric(&metrics, "nops_rate_limit_keys{limit=\"tenant\"}");
    assert!((1.0..=4.0).contains(&held), "keys_max and the overflow key: {held}");
}

#[tokio::test]
async fn disabled_limits_send_no_headers_and_refuse_nothing() {
    let toml = "[rate_limits]\nenabled = false\nper_key = { per_second = 1, burst = 1 }\n";
    let k = kernel_with(Backend::Sqlite, toml).await;
    for _ in 0..5 {
        let (status, headers, _) = k.send(k.request("GET", "/api/v1/agents", None)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers.get("ratelimit").is_none());
    }
}

#[tokio::test]
async fn the_store_runs_gcra_in_one_statement_on_every_backend() {
    for k in TestKernel::all().await {
        let store = &k.kernel.store;
        let b = format!("{:?}", k.backend);
        // 3 at once, one more every 100 ms.
        let check = |now: i64| store.gcra_check("k:test", 100, 3, now);
        let first = check(T0_MS).await.expect("check");
        assert_eq!(first, GcraOutcome { allowed: true, remaining: 2, retry_after_ms: 0, reset_ms: 100 }, "{b}");
        assert_eq!(check(T0_MS).await.expect("check").remaining, 1, "{b}");
        let third = check(T0_MS).await.expect("check");
        assert_eq!((third.allowed, third.remaining, third.reset_ms), (true, 0, 300), "{b}");
        let refused = check(T0_MS + 50).await.expect("check");
        assert!(!refused.allowed, "{b}");
        assert!(refused.retry_after_ms >= 50 && refused.retry_after_ms <= 100, "{b}: {refused:?}");
        assert!(!check(T0_MS + 99).await.expect("check").allowed, "{b}: the refusal changed nothing");
        assert!(check(T0_MS + 100).await.expect("check").allowed, "{b}: one back after 100 ms");
        assert!(!check(T0_MS + 100).await.expect("check").allowed, "{b}");
        // Other keys are independent.
        assert!(store.gcra_check("k:other", 100, 1, T0_MS).await.expect("check").allowed, "{b}");
        // Much later: a full burst again.
        let later = check(T0_MS + 10_000).await.expect("check");
        assert_eq!(later.remaining, 2, "{b}");
        // Rows whose TAT has passed are deleted; live ones stay.
        assert_eq!(store.gcra_purge_expired(T0_MS + 5_000).await.expect("purge"), 1, "{b}: k:other");
        assert_eq!(store.gcra_purge_expired(T0_MS + 20_000).await.expect("purge"), 1, "{b}: k:test");
        assert_eq!(store.gcra_purge_expired(T0_MS + 20_000).await.expect("purge"), 0, "{b}");
    }
}

#[tokio::test]
async fn concurrent_store_checks_never_allow_more_than_the_burst() {
    for k in TestKernel::all().await {
        let store = Arc::new(k.kernel.store.clone());
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..40 {
            let store = store.clone();
            tasks.spawn(async move { store.gcra_check("k:race", 60_000, 10, T0_MS).await.expect("check").allowed });
        }
        let allowed = tasks.join_all().await.into_iter().filter(|a| *a).count();
        assert_eq!(allowed, 10, "{:?}: exactly the burst", k.backend);
    }
}

#[tokio::test]
async fn shared_limits_on_sqlite_are_refused_at_start() {
    let db = TestDb::new(Backend::Sqlite).await;
    let path = write_config(&db, "[rate_limits]\nshared = true\n");
    let args = ServeArgs { config: Some(path), ..test_args(&db.url) };
    let err = Config::resolve(&args).expect_err("refused");
    assert!(format!("{err:#}").contains("shared = true needs PostgreSQL"), "{err:#}");
    // A route budget must name a real route.
    let path = write_config(&db, "[rate_limits.per_route]\n\"POST /api/v1/nope\" = { per_second = 1, burst = 1 }\n");
    let err = Config::resolve(&ServeArgs { config: Some(path), ..test_args(&db.url) }).expect_err("refused");
    assert!(format!("{err:#}").contains("unknown route"), "{err:#}");
}

/// A second kernel ("replica") on the database of `a`, with its own manual clock at `T0_MS`.
async fn replica(a: &TestKernel, toml: &str) -> (Kernel, Router, ManualClock, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("limits.toml");
    std::fs::write(&path, toml).expect("write");
    let mut args = test_args(&a.db.url);
    args.data_dir = Some(dir.path().to_path_buf());
    args.config = Some(path);
    let clock = ManualClock::new(T0_MS);
    let kernel =
        Kernel::open(&Config::resolve(&args).expect("config"), Arc::new(clock.clone())).await.expect("replica");
    let router = kernel.router();
    (kernel, router, clock, dir)
}

async fn send(router: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
    let response = router.clone().oneshot(request).await.expect("infallible");
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    (status, headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

const SHARED: &str = "[rate_limits]\nshared = true\nper_key = { per_second = 1, burst = 10 }\n\
                      per_tenant = { per_second = 1000, burst = 1000 }\n";

#[tokio::test]
async fn two_replicas_share_one_budget() {
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    let a = kernel_with(Backend::Postgres, SHARED).await;
    let (_b, b_router, b_clock, _dir) = replica(&a, SHARED).await;
    let routers = [&a.router, &b_router];
    // Requests alternate between the kernels: the 11th across both is refused.
    for i in 0..10 {
        let (status, _, body) = send(routers[i % 2], a.request("GET", "/api/v1/agents", None)).await;
        assert_eq!(status, StatusCode::OK, "request {} on kernel {}: {body}", i + 1, i % 2);
    }
    let (status, headers, body) = send(routers[0], a.request("GET", "/api/v1/agents", None)).await;
    assert_refused(status, &headers, &body, "key", "11th request, kernel a");
    let (status, headers, body) = send(routers[1], a.request("GET", "/api/v1/agents", None)).await;
    assert_refused(status, &headers, &body, "key", "12th request, kernel b");
    // One second later (on both clocks) the shared budget has one request again, for either.
    a.clock.advance_ms(1_000);
    b_clock.advance_ms(1_000);
    assert_eq!(send(routers[1], a.request("GET", "/api/v1/agents", None)).await.0, StatusCode::OK);
    assert_eq!(send(routers[0], a.request("GET", "/api/v1/agents", None)).await.0, StatusCode::TOO_MANY_REQUESTS);
    // The refused request on `a` created nothing there, and nothing on `b` either.
    let (status, _, body) =
        send(routers[0], a.request("POST", "/api/v1/agents", Some(agent_json("x", "a.b", "1.0.0")))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(stored_agents(&a).await, 0);
}

#[tokio::test]
async fn an_unreachable_store_fails_open_to_the_local_budget_or_closed_when_asked() {
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    for (policy, expect) in [("allow", StatusCode::OK), ("deny", StatusCode::SERVICE_UNAVAILABLE)] {
        let toml = format!("{SHARED}on_store_error = \"{policy}\"\n");
        let k = kernel_with(Backend::Postgres, &toml).await;
        let agent = k.create_agent(agent_json("hb", "a.b", "1.0.0")).await;
        let path = format!("/api/v1/agents/{}/heartbeat", agent["id"].as_str().expect("id"));
        // The key is cached by the authenticator and heartbeats are kept in memory: only the
        // rate limit needs the store once it is gone.
        k.kernel.store.close().await;
        let (status, headers, body) = k.send(k.request("POST", &path, Some(json!({})))).await;
        assert_eq!(status, expect, "on_store_error = {policy}: {body}");
        if policy == "deny" {
            assert_eq!(body["error"]["code"], "rate_limit_unavailable");
        } else {
            assert!(header(&headers, "ratelimit").starts_with("\"key\";r="), "counted in process: {headers:?}");
            // A store outage does not turn the limits off: the in-process budget (the same
            // quota, 10 at once) still refuses.
            let mut statuses = Vec::new();
            for _ in 0..12 {
                statuses.push(k.send(k.request("POST", &path, Some(json!({})))).await.0);
            }
            let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
            assert!((9..=10).contains(&ok), "{statuses:?}");
            assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
        }
        let metrics = metrics_text(&k.router).await;
        assert!(metric(&metrics, "nops_rate_limit_store_errors_total") >= 1.0, "{metrics}");
    }
}
