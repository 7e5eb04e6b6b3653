//! `Idempotency-Key` on mutating endpoints: replays, conflicts (422 reused key, 409 in flight),
//! scoping per caller, answers that are not kept (5xx, too large), retention and its sweep,
//! malformed keys, reads unaffected, settings, and one key shared by two kernels on one
//! PostgreSQL database.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use nops::config::Config;
use nops::kernel::Kernel;
use nops_core::clock::ManualClock;
use nops_core::store::IdempotencyStore;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::support::{Backend, T0_MS, TestDb, TestKernel, agent_json, as_key, backends, test_args};

/// A kernel on a fresh database of `backend` with `toml` as its configuration file.
async fn kernel_with(backend: Backend, toml: &str) -> TestKernel {
    let db = TestDb::new(backend).await;
    let path = db.dir.path().join("idempotency.toml");
    std::fs::write(&path, toml).expect("write config");
    TestKernel::start_with(backend, db, |args| args.config = Some(path)).await
}

/// A kernel of every backend with `toml` as its configuration file.
async fn all_with(toml: &str) -> Vec<TestKernel> {
    let mut kernels = Vec::new();
    for backend in backends() {
        kernels.push(kernel_with(backend, toml).await);
    }
    kernels
}

/// A reply: status, headers and raw body.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn replayed(&self) -> bool {
        self.headers.get("idempotent-replayed").is_some_and(|v| v == "true")
    }
}

/// A request with `credential`, acting in `tenant` if given, with the raw `Idempotency-Key`
/// header values given.
fn keyed(
    credential: &str,
    tenant: Option<&str>,
    keys: &[&str],
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Request<Body> {
    let mut builder =
        Request::builder().method(method).uri(path).header("authorization", format!("Bearer {credential}"));
    if let Some(tenant) = tenant {
        builder = builder.header("x-nops-tenant", tenant);
    }
    for key in keys {
        builder = builder.header("idempotency-key", *key);
    }
    match body {
        Some(body) => builder
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).expect("json")))
            .expect("request"),
        None => builder.body(Body::empty()).expect("request"),
    }
}

async fn send(router: &Router, request: Request<Body>) -> Reply {
    let response = router.clone().oneshot(request).await.expect("infallible");
    let (status, headers) = (response.status(), response.headers().clone());
    let body = response.into_body().collect().await.expect("body").to_bytes().to_vec();
    Reply { status, headers, body }
}

/// `POST /api/v1/agents` with the bootstrap key and `Idempotency-Key: key`.
async fn create(k: &TestKernel, key: &str, body: &Value) -> Reply {
    send(&k.router, keyed(&k.key, None, &[key], "POST", "/api/v1/agents", Some(body))).await
}

async fn metrics(router: &Router) -> String {
    let reply = send(router, Request::builder().uri("/metrics").body(Body::empty()).expect("request")).await;
    String::from_utf8(reply.body).expect("utf-8")
}

#[tokio::test]
async fn a_retry_replays_the_first_response_and_creates_nothing() {
    for k in TestKernel::all().await {
        let body = agent_json("once", "gpu", "1.0.0");
        let first = create(&k, "\"create-once-1\"", &body).await;
        assert_eq!(first.status, StatusCode::CREATED, "{:?}: {}", k.backend, String::from_utf8_lossy(&first.body));
        assert!(!first.replayed());
        let id = first.json()["id"].as_str().expect("id").to_string();

        for _ in 0..2 {
            let retry = create(&k, "\"create-once-1\"", &body).await;
            assert_eq!(retry.status, StatusCode::CREATED, "{:?}", k.backend);
            assert!(retry.replayed(), "{:?}: the replay says so", k.backend);
            assert_eq!(retry.body, first.body, "byte for byte the first body");
            assert_eq!(retry.json()["id"], id.as_str());
            assert_eq!(retry.headers.get("content-type"), first.headers.get("content-type"));
            // A replay is still a response of this kernel: its own request id and headers.
            assert!(retry.headers.get("x-request-id").is_some());
            assert_eq!(retry.headers.get("x-content-type-options").map(|v| v.as_bytes()), Some(&b"nosniff"[..]));
        }
        // The bare-token form names the same key.
        let bare = create(&k, "create-once-1", &body).await;
        assert!(bare.replayed(), "{:?}", k.backend);
        assert_eq!(k.agent_count().await, 1, "{:?}: one agent", k.backend);

        let text = metrics(&k.router).await;
        assert!(text.contains(r#"nops_idempotency_requests_total{outcome="replayed"} 3"#), "{text}");
        assert!(text.contains(r#"nops_idempotency_requests_total{outcome="kept"} 1"#), "{text}");
    }
}

#[tokio::test]
async fn every_mutating_method_is_covered() {
    for k in TestKernel::all().await {
        let agent = k.create_agent(agent_json("patched", "gpu", "1.0.0")).await;
        let path = format!("/api/v1/agents/{}", agent["id"].as_str().expect("id"));
        let patch = json!({ "labels": { "zone": "a" } });
        let first = send(&k.router, keyed(&k.key, None, &["\"patch-1\""], "PATCH", &path, Some(&patch))).await;
        assert_eq!(first.status, StatusCode::OK, "{:?}: {}", k.backend, String::from_utf8_lossy(&first.body));
        let retry = send(&k.router, keyed(&k.key, None, &["\"patch-1\""], "PATCH", &path, Some(&patch))).await;
        assert!(retry.replayed());
        assert_eq!(retry.body, first.body);

        let first = send(&k.router, keyed(&k.key, None, &["\"delete-1\""], "DELETE", &path, None)).await;
        assert_eq!(first.status, StatusCode::NO_CONTENT, "{:?}", k.backend);
        // Without the key, the delete runs again and finds nothing; with it, the answer is the
        // first one.
        let retry = send(&k.router, keyed(&k.key, None, &["\"delete-1\""], "DELETE", &path, None)).await;
        assert_eq!(retry.status, StatusCode::NO_CONTENT, "{:?}", k.backend);
        assert!(retry.replayed());
        let (status, _) = k.call("DELETE", &path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn the_same_key_with_another_request_is_refused_and_changes_nothing() {
    for k in TestKernel::all().await {
        let first = create(&k, "\"reused\"", &agent_json("first", "gpu", "1.0.0")).await;
        assert_eq!(first.status, StatusCode::CREATED);
        let other = create(&k, "\"reused\"", &agent_json("second", "gpu", "1.0.0")).await;
        assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY, "{:?}", k.backend);
        assert_eq!(other.json()["error"]["code"], "idempotency_key_reused");
        assert!(other.json()["error"]["request_id"].is_string(), "the usual envelope");
        assert!(!other.replayed());
        // Another path with the same body and key is another request too.
        let elsewhere = send(
            &k.router,
            keyed(
                &k.key,
                None,
                &["\"reused\""],
                "POST",
                "/api/v1/agents?x=1",
                Some(&agent_json("first", "gpu", "1.0.0")),
            ),
        )
        .await;
        assert_eq!(elsewhere.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(k.agent_count().await, 1, "{:?}: nothing changed", k.backend);
        // The first request still replays.
        assert!(create(&k, "\"reused\"", &agent_json("first", "gpu", "1.0.0")).await.replayed());
        let text = metrics(&k.router).await;
        assert!(text.contains(r#"nops_idempotency_requests_total{outcome="key_reused"} 2"#), "{text}");
    }
}

#[tokio::test]
async fn a_retry_while_the_first_runs_gets_409_and_the_first_answer_afterwards() {
    for k in TestKernel::all().await {
        // Store calls of tenant `slow` take 0.7 s, so the first request is still running when
        // the second arrives. Keys are claimed kernel-wide, without the delay.
        let toggle = json!({ "target": "store", "latency_ms": 700 });
        let (status, created) = as_key(&k, &k.key, Some("slow"), "POST", "/api/v1/admin/chaos", Some(toggle)).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let body = agent_json("slowpoke", "gpu", "1.0.0");
        let request = || keyed(&k.key, Some("slow"), &["\"slow-1\""], "POST", "/api/v1/agents", Some(&body));
        let (a, b) = tokio::join!(send(&k.router, request()), send(&k.router, request()));
        let mut statuses = [a.status, b.status];
        statuses.sort();
        assert_eq!(statuses, [StatusCode::CREATED, StatusCode::CONFLICT], "{:?}", k.backend);
        let (done, refused) = if a.status == StatusCode::CREATED { (a, b) } else { (b, a) };
        assert_eq!(refused.json()["error"]["code"], "idempotency_key_in_flight", "{}", refused.json());
        assert_eq!(refused.headers.get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));
        // Once the first finished, a retry gets its answer.
        let retry = send(&k.router, request()).await;
        assert!(retry.replayed(), "{:?}", k.backend);
        assert_eq!(retry.body, done.body);
        let (_, page) = as_key(&k, &k.key, Some("slow"), "GET", "/api/v1/agents", None).await;
        assert_eq!(page["items"].as_array().expect("items").len(), 1, "{:?}: one agent", k.backend);
        let text = metrics(&k.router).await;
        assert!(text.contains(r#"nops_idempotency_requests_total{outcome="in_flight"} 1"#), "{text}");
    }
}

#[tokio::test]
async fn a_request_cancelled_before_it_answers_frees_its_key() {
    for k in TestKernel::all().await {
        let toggle = json!({ "target": "store", "latency_ms": 2_000 });
        let (status, created) = as_key(&k, &k.key, Some("gone"), "POST", "/api/v1/admin/chaos", Some(toggle)).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let body = agent_json("abandoned", "gpu", "1.0.0");
        let request = || keyed(&k.key, Some("gone"), &["\"gone-1\""], "POST", "/api/v1/agents", Some(&body));
        // The client gives up (or the request timeout fires) while the handler waits.
        let cancelled = tokio::time::timeout(std::time::Duration::from_millis(300), send(&k.router, request())).await;
        assert!(cancelled.is_err(), "still running when dropped");
        let id = created["id"].as_str().expect("id");
        let (status, _) = as_key(&k, &k.key, Some("gone"), "DELETE", &format!("/api/v1/admin/chaos/{id}"), None).await;
        assert_eq!(status, StatusCode::OK);
        // The key is released in the background; until then a retry is told to wait.
        let mut retry = send(&k.router, request()).await;
        for _ in 0..100 {
            if retry.status != StatusCode::CONFLICT {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            retry = send(&k.router, request()).await;
        }
        assert_eq!(retry.status, StatusCode::CREATED, "{:?}: the retry runs: {}", k.backend, retry.json());
        assert!(!retry.replayed());
    }
}

#[tokio::test]
async fn a_key_held_by_a_stopped_kernel_is_taken_over_after_the_in_flight_timeout() {
    for k in TestKernel::all().await {
        // A record in flight, as a kernel that stopped mid-request leaves it: it refuses a
        // retry with another fingerprint, and (with its own fingerprint) only until its lock
        // runs out. The store's claim is what the middleware calls.
        let store = &k.kernel.store;
        let claim = |token: uuid::Uuid, fingerprint: &'static [u8], now_ms: i64| nops_core::store::IdempotencyClaim {
            scope: "api_key:test@default",
            key: "stuck",
            fingerprint,
            token,
            now_ms,
            locked_until_ms: now_ms + 60_000,
            expires_at_ms: now_ms + 86_400_000,
        };
        let dead = uuid::Uuid::now_v7();
        let outcome = store.idempotency_claim(&claim(dead, b"fp", T0_MS)).await.expect("claim");
        assert_eq!(outcome, nops_core::store::ClaimOutcome::Claimed);
        let retry = uuid::Uuid::now_v7();
        match store.idempotency_claim(&claim(retry, b"fp", T0_MS + 59_999)).await.expect("claim") {
            nops_core::store::ClaimOutcome::Existing(record) => {
                assert_eq!(record.token, dead);
                assert!(record.response.is_none(), "in flight");
            }
            other => panic!("{:?}: {other:?}", k.backend),
        }
        let other = store.idempotency_claim(&claim(retry, b"other", T0_MS + 60_000)).await.expect("claim");
        assert!(matches!(other, nops_core::store::ClaimOutcome::Existing(_)), "another request never takes over");
        let taken = store.idempotency_claim(&claim(retry, b"fp", T0_MS + 60_000)).await.expect("claim");
        assert_eq!(taken, nops_core::store::ClaimOutcome::Claimed, "{:?}", k.backend);
        // The dead execution can no longer complete or release the key.
        let response = nops_core::store::IdempotentResponse { status: 201, headers: vec![], body: b"{}".to_vec() };
        assert!(!store.idempotency_complete("api_key:test@default", "stuck", dead, &response).await.expect("complete"));
        assert!(!store.idempotency_release("api_key:test@default", "stuck", dead).await.expect("release"));
        assert!(store.idempotency_complete("api_key:test@default", "stuck", retry, &response).await.expect("complete"));
    }
}

#[tokio::test]
async fn keys_belong_to_their_caller_and_tenant() {
    for k in TestKernel::all().await {
        let first = create(&k, "\"shared-key\"", &agent_json("mine", "gpu", "1.0.0")).await;
        assert_eq!(first.status, StatusCode::CREATED);
        // The same caller in another tenant: another scope, the request runs.
        let body = agent_json("mine", "gpu", "1.0.0");
        let elsewhere =
            send(&k.router, keyed(&k.key, Some("acme"), &["\"shared-key\""], "POST", "/api/v1/agents", Some(&body)))
                .await;
        assert_eq!(elsewhere.status, StatusCode::CREATED, "{:?}: {}", k.backend, elsewhere.json());
        assert!(!elsewhere.replayed());
        assert_ne!(elsewhere.json()["id"], first.json()["id"]);
        // Another credential in the same tenant, with another body: runs (not 422).
        let key = json!({ "name": "second operator", "role": "operator", "scopes": ["agents:*"] });
        let (status, created) = k.call("POST", "/api/v1/admin/api-keys", Some(key)).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let secret = created["secret"].as_str().expect("secret");
        let body = agent_json("theirs", "gpu", "1.0.0");
        let theirs =
            send(&k.router, keyed(secret, None, &["\"shared-key\""], "POST", "/api/v1/agents", Some(&body))).await;
        assert_eq!(theirs.status, StatusCode::CREATED, "{:?}: {}", k.backend, theirs.json());
        assert!(!theirs.replayed());
        assert_eq!(k.agent_count().await, 2);
    }
}

#[tokio::test]
async fn client_errors_are_kept_and_replayed_as_the_same_json() {
    for k in TestKernel::all().await {
        let bad = json!({ "name": "", "capabilities": [] });
        let first = send(&k.router, keyed(&k.key, None, &["\"bad-1\""], "POST", "/api/v1/agents", Some(&bad))).await;
        assert!(first.status.is_client_error(), "{:?}: {}", k.backend, first.json());
        let code = first.json()["error"]["code"].clone();
        assert!(code.is_string(), "{}", first.json());
        let retry = send(&k.router, keyed(&k.key, None, &["\"bad-1\""], "POST", "/api/v1/agents", Some(&bad))).await;
        assert_eq!(retry.status, first.status);
        assert!(retry.replayed());
        assert_eq!(retry.body, first.body, "the same envelope, the first request's id included");
        assert_eq!(retry.json()["error"]["request_id"], first.json()["error"]["request_id"]);
        assert_ne!(retry.headers.get("x-request-id"), first.headers.get("x-request-id"), "each its own header");
    }
}

#[tokio::test]
async fn server_errors_are_not_kept_so_a_retry_runs_again() {
    for k in TestKernel::all().await {
        let toggle = json!({ "target": "store", "error_ratio": 1.0 });
        let (status, created) = as_key(&k, &k.key, Some("flaky"), "POST", "/api/v1/admin/chaos", Some(toggle)).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let body = agent_json("retried", "gpu", "1.0.0");
        let request = || keyed(&k.key, Some("flaky"), &["\"flaky-1\""], "POST", "/api/v1/agents", Some(&body));
        let failed = send(&k.router, request()).await;
        assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}: {}", k.backend, failed.json());
        let again = send(&k.router, request()).await;
        assert_eq!(again.status, StatusCode::SERVICE_UNAVAILABLE, "ran again, failed again");
        assert!(!again.replayed());

        let id = created["id"].as_str().expect("id");
        let (status, _) = as_key(&k, &k.key, Some("flaky"), "DELETE", &format!("/api/v1/admin/chaos/{id}"), None).await;
        assert_eq!(status, StatusCode::OK);
        let ok = send(&k.router, request()).await;
        assert_eq!(ok.status, StatusCode::CREATED, "{:?}: the store is back, the request runs", k.backend);
        assert!(!ok.replayed());
        assert!(send(&k.router, request()).await.replayed());
        let text = metrics(&k.router).await;
        assert!(text.contains(r#"nops_idempotency_requests_total{outcome="not_kept"} 2"#), "{text}");
    }
}

#[tokio::test]
async fn a_response_too_large_to_keep_is_answered_and_a_retry_runs_again() {
    for k in all_with("[idempotency]\nresponse_bytes_max = 16\n").await {
        let body = agent_json("big", "gpu", "1.0.0");
        let first = create(&k, "\"big-1\"", &body).await;
        assert_eq!(first.status, StatusCode::CREATED, "{:?}: answered in full", k.backend);
        assert!(first.json()["id"].is_string());
        // Not kept: the retry runs again (and finds the name taken).
        let retry = create(&k, "\"big-1\"", &body).await;
        assert!(!retry.replayed());
        assert_eq!(retry.status, StatusCode::CONFLICT, "{:?}: {}", k.backend, retry.json());
    }
}

#[tokio::test]
async fn expired_keys_are_forgotten_and_swept() {
    for k in all_with("[idempotency]\nretention_ms = 60000\n").await {
        let first = create(&k, "\"short-lived\"", &agent_json("kept", "gpu", "1.0.0")).await;
        assert_eq!(first.status, StatusCode::CREATED);
        k.clock.advance_ms(59_999);
        assert!(create(&k, "\"short-lived\"", &agent_json("kept", "gpu", "1.0.0")).await.replayed());
        assert_eq!(
            k.kernel
                .store
                .idempotency_purge_expired(nops_core::clock::Clock::now_ms(&k.clock), 100)
                .await
                .expect("purge"),
            0
        );
        k.clock.advance_ms(1);
        // Expired: ignored when read (another body is not a reuse), before any sweep.
        let other = create(&k, "\"short-lived\"", &agent_json("fresh", "gpu", "1.0.0")).await;
        assert_eq!(other.status, StatusCode::CREATED, "{:?}: {}", k.backend, other.json());
        assert!(!other.replayed());
        assert_eq!(k.agent_count().await, 2);
        // The sweep deletes what expired, and nothing else.
        let second = create(&k, "\"another\"", &agent_json("third", "gpu", "1.0.0")).await;
        assert_eq!(second.status, StatusCode::CREATED);
        k.clock.advance_ms(60_000);
        let purged = k
            .kernel
            .store
            .idempotency_purge_expired(nops_core::clock::Clock::now_ms(&k.clock), 100)
            .await
            .expect("purge");
        assert_eq!(purged, 2, "{:?}", k.backend);
        assert_eq!(
            k.kernel
                .store
                .idempotency_purge_expired(nops_core::clock::Clock::now_ms(&k.clock), 100)
                .await
                .expect("purge"),
            0
        );
    }
}

#[tokio::test]
async fn malformed_keys_are_refused_and_change_nothing() {
    for k in TestKernel::all().await {
        let long = format!("\"{}\"", "k".repeat(256));
        let body = agent_json("never", "gpu", "1.0.0");
        for key in ["\"\"", "\"open", "two words", "\"tab\there\"", "\"bad\\escape\"", long.as_str()] {
            let reply = create(&k, key, &body).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{:?}: {key:?}", k.backend);
            assert_eq!(reply.json()["error"]["code"], "invalid_idempotency_key", "{key:?}");
        }
        let twice =
            send(&k.router, keyed(&k.key, None, &["\"a\"", "\"b\""], "POST", "/api/v1/agents", Some(&body))).await;
        assert_eq!(twice.status, StatusCode::BAD_REQUEST, "two keys");
        let ok = create(&k, &format!("\"{}\"", "k".repeat(255)), &body).await;
        assert_eq!(ok.status, StatusCode::CREATED, "255 bytes is the limit");
        assert_eq!(k.agent_count().await, 1);
    }
}

#[tokio::test]
async fn reads_and_requests_without_a_key_are_unaffected() {
    for k in TestKernel::all().await {
        k.create_agent(agent_json("read-me", "gpu", "1.0.0")).await;
        for _ in 0..2 {
            let read = send(&k.router, keyed(&k.key, None, &["\"read-1\""], "GET", "/api/v1/agents", None)).await;
            assert_eq!(read.status, StatusCode::OK);
            assert!(!read.replayed());
            // Even a malformed key on a read is ignored.
            let read = send(&k.router, keyed(&k.key, None, &["\"open"], "GET", "/api/v1/agents", None)).await;
            assert_eq!(read.status, StatusCode::OK);
        }
        // Without the header, a repeated create runs twice (the second finds the name taken).
        let (status, _) = k.call("POST", "/api/v1/agents", Some(agent_json("read-me", "gpu", "1.0.0"))).await;
        assert_eq!(status, StatusCode::CONFLICT);
        // Unauthenticated requests never reach the key.
        let anonymous = send(
            &k.router,
            Request::builder()
                .method("POST")
                .uri("/api/v1/agents")
                .header("idempotency-key", "\"anon\"")
                .header("content-type", "application/json")
                .body(Body::from(agent_json("anon", "gpu", "1.0.0").to_string()))
                .expect("request"),
        )
        .await;
        assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn keys_can_be_turned_off_and_bad_settings_are_refused() {
    for k in all_with("[idempotency]\nenabled = false\n").await {
        let body = agent_json("off", "gpu", "1.0.0");
        assert_eq!(create(&k, "\"off-1\"", &body).await.status, StatusCode::CREATED);
        let retry = create(&k, "\"off-1\"", &body).await;
        assert_eq!(retry.status, StatusCode::CONFLICT, "{:?}: ran again", k.backend);
        assert!(!retry.replayed());
    }
    let db = TestDb::new(Backend::Sqlite).await;
    for (toml, expected) in [
        ("[idempotency]\nin_flight_timeout_ms = 1000\n", "in_flight_timeout_ms"),
        ("[idempotency]\nretention_ms = 0\n", "retention_ms must be positive"),
        ("[idempotency]\nretain = 1\n", "unknown field"),
    ] {
        let path = db.dir.path().join("bad.toml");
        std::fs::write(&path, toml).expect("write");
        let args = nops::config::ServeArgs { config: Some(path), ..test_args(&db.url) };
        let err = Config::resolve(&args).expect_err("refused");
        assert!(format!("{err:#}").contains(expected), "{toml}: {err:#}");
    }
    let path = db.dir.path().join("good.toml");
    std::fs::write(&path, "[idempotency]\nretention_ms = 3600000\n").expect("write");
    let config = Config::resolve(&nops::config::ServeArgs { config: Some(path), ..test_args(&db.url) }).expect("ok");
    assert_eq!(config.http.idempotency.retention_ms, 3_600_000);
    let shown = config.to_toml().expect("toml");
    assert!(shown.contains("[idempotency]") && shown.contains("retention_ms = 3600000"), "{shown}");
}

#[tokio::test]
async fn a_retry_on_another_kernel_replays_the_first_kernels_answer() {
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    let a = TestKernel::start(Backend::Postgres).await;
    let dir = tempfile::tempdir().expect("dir");
    let mut args = test_args(&a.db.url);
    args.data_dir = Some(dir.path().to_path_buf());
    let b = Kernel::open(&Config::resolve(&args).expect("config"), Arc::new(ManualClock::new(T0_MS)))
        .await
        .expect("replica");
    let b_router = b.router();
    let body = agent_json("replicated", "gpu", "1.0.0");
    let request = |key: &str| keyed(&a.key, None, &[key], "POST", "/api/v1/agents", Some(&body));
    let first = send(&a.router, request("\"across-1\"")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.json());
    let retry = send(&b_router, request("\"across-1\"")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed(), "kernel B replays kernel A's answer");
    assert_eq!(retry.body, first.body);
    // Simultaneous first requests on both kernels: exactly one runs; the other is refused
    // while it runs, or replays its answer.
    let body = agent_json("raced", "gpu", "1.0.0");
    let request = || keyed(&a.key, None, &["\"across-2\""], "POST", "/api/v1/agents", Some(&body));
    let (x, y) = tokio::join!(send(&a.router, request()), send(&b_router, request()));
    let ran: Vec<&Reply> = [&x, &y].into_iter().filter(|r| r.status == StatusCode::CREATED && !r.replayed()).collect();
    assert_eq!(ran.len(), 1, "{} {}", x.json(), y.json());
    let other = if std::ptr::eq(ran[0], &x) { &y } else { &x };
    let refused = other.status == StatusCode::CONFLICT && other.json()["error"]["code"] == "idempotency_key_in_flight";
    assert!(refused || (other.replayed() && other.body == ran[0].body), "{}", other.json());
    assert_eq!(a.agent_count().await, 2, "one agent per key across both kernels");
    b.store.close().await;
}
