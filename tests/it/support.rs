//! The test harness: a whole kernel per test on a fresh database, driven through its router.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use nops::config::{Config, ServeArgs};
use nops::kernel::Kernel;
use nops_core::clock::ManualClock;
use serde_json::Value;
use tower::ServiceExt;

/// Start of the manual clock in every test (2026-01-01T00:00:00Z).
pub const T0_MS: i64 = 1_767_225_600_000;

/// The PostgreSQL server for tests, from `NOPS_TEST_DATABASE_URL`. Under `CI=true` a missing
/// variable fails the run rather than silently skipping the PostgreSQL half of the suite.
pub fn postgres_url() -> Option<String> {
    match std::env::var("NOPS_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but NOPS_TEST_DATABASE_URL is not set: the PostgreSQL tests cannot run"
            );
            None
        }
    }
}

/// The NATS server for tests, from `NOPS_TEST_NATS_URL`; under `CI=true` a missing variable
/// fails the run rather than silently skipping the NATS half of the suite.
pub fn nats_url() -> Option<String> {
    match std::env::var("NOPS_TEST_NATS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but NOPS_TEST_NATS_URL is not set: the NATS tests cannot run"
            );
            None
        }
    }
}

/// Which database a test kernel runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Every backend this run can test.
pub fn backends() -> Vec<Backend> {
    let mut all = vec![Backend::Sqlite];
    if postgres_url().is_some() {
        all.push(Backend::Postgres);
    }
    all
}

/// A fresh, empty database for one test; dropped (PostgreSQL) or deleted (SQLite) with the value.
pub struct TestDb {
    pub url: String,
    pub dir: tempfile::TempDir,
    pg_name: Option<String>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        match backend {
            Backend::Sqlite => {
                let url = format!("sqlite://{}", dir.path().join("nops.db").display());
                Self { url, dir, pg_name: None }
            }
            Backend::Postgres => {
                let admin = postgres_url().expect("postgres url");
                let name = format!("nops_it_{}", uuid::Uuid::now_v7().simple());
                let mut conn = connect_admin(&admin).await;
                sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut conn).await.expect("create database");
                let url = replace_database(&admin, &name);
                Self { url, dir, pg_name: Some(name) }
            }
        }
    }
}

impl TestDb {
    /// A database the test manages itself (e.g. on a private server), kept after the test.
    pub fn at(url: String) -> Self {
        Self { url, dir: tempfile::tempdir().expect("tempdir"), pg_name: None }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.pg_name.take() {
            let admin = postgres_url().expect("postgres url");
            // Drop runs outside any runtime guarantee: use a private thread and runtime.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                rt.block_on(async {
                    let mut conn = connect_admin(&admin).await;
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                });
            })
            .join();
        }
    }
}

async fn connect_admin(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url).await.expect("connect to the test PostgreSQL server")
}

/// `url` with its database name replaced by `name`.
pub fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let cut = base.rfind('/').filter(|&i| i > base.find("://").map_or(0, |s| s + 2)).unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..cut], name);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// Settings every test kernel starts from: short TTLs so tests read easily.
pub fn test_args(url: &str) -> ServeArgs {
    ServeArgs {
        database_url: Some(url.to_string()),
        stale_after_ms: Some(10_000),
        zombie_after_ms: Some(20_000),
        remove_after_ms: Some(60_000),
        // Each kernel's runtime reserves address space per instance slot; tests need few.
        plugin_instances_max: Some(16),
        ..ServeArgs::default()
    }
}

/// A second kernel on `k`'s database and clock, with its own data directory: a replica.
pub async fn replica(k: &TestKernel) -> Kernel {
    let mut args = test_args(&k.db.url);
    args.data_dir = Some(k.db.dir.path().join("replica"));
    let config = Config::resolve(&args).expect("config");
    Kernel::open(&config, Arc::new(k.clock.clone())).await.expect("replica opens")
}

/// A kernel in process, on its own database, with a manual clock.
pub struct TestKernel {
    pub backend: Backend,
    pub kernel: Kernel,
    pub router: Router,
    pub clock: ManualClock,
    pub key: String,
    pub db: TestDb,
}

impl TestKernel {
    pub async fn start(backend: Backend) -> Self {
        let db = TestDb::new(backend).await;
        Self::start_with(backend, db, |_| {}).await
    }

    /// Starts a kernel on `db` after letting `tweak` adjust the settings.
    pub async fn start_with(backend: Backend, db: TestDb, tweak: impl FnOnce(&mut ServeArgs)) -> Self {
        let mut args = test_args(&db.url);
        args.data_dir = Some(db.dir.path().to_path_buf());
        tweak(&mut args);
        let config = Config::resolve(&args).expect("config");
        let clock = ManualClock::new(T0_MS);
        let kernel = Kernel::open(&config, Arc::new(clock.clone())).await.expect("kernel opens");
        let key = kernel.bootstrap_key.as_ref().expect("a fresh store creates the bootstrap key").secret.clone();
        let router = kernel.router();
        Self { backend, kernel, router, clock, key, db }
    }

    /// Every backend's kernel, one after the other.
    pub async fn all() -> Vec<Self> {
        let mut kernels = Vec::new();
        for backend in backends() {
            kernels.push(Self::start(backend).await);
        }
        kernels
    }

    /// Sends a request with the bootstrap key; returns status and JSON body (Null if empty).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let response = self.send(self.request(method, path, body)).await;
        (response.0, response.2)
    }

    pub fn request(&self, method: &str, path: &str, body: Option<Value>) -> Request<Body> {
        let builder =
            Request::builder().method(method).uri(path).header("authorization", format!("Bearer {}", self.key));
        match body {
            Some(body) => builder
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&body).expect("json")))
                .expect("request"),
            None => builder.body(Body::empty()).expect("request"),
        }
    }

    /// Sends any request; returns status, headers and JSON body (Null if empty or not JSON).
    pub async fn send(&self, request: Request<Body>) -> (StatusCode, http::HeaderMap, Value) {
        let response = self.router.clone().oneshot(request).await.expect("router is infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, body)
    }

    /// Sends a request and returns the raw body text.
    pub async fn send_text(&self, request: Request<Body>) -> (StatusCode, String) {
        let response = self.router.clone().oneshot(request).await.expect("router is infallible");
        let status = response.status();
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Registers an agent and returns its JSON.
    pub async fn create_agent(&self, body: Value) -> Value {
        let (status, agent) = self.call("POST", "/api/v1/agents", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{:?}: {agent}", self.backend);
        agent
    }

    /// Counts the agents of the default tenant.
    pub async fn agent_count(&self) -> usize {
        let (status, page) = self.call("GET", "/api/v1/agents?limit=500", None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        page["items"].as_array().expect("items").len()
    }
}

/// An agent definition with one capability.
pub fn agent_json(name: &str, capability: &str, version: &str) -> Value {
    serde_json::json!({
        "name": name,
        "capabilities": [{"name": capability, "version": version, "params": {}}],
    })
}

/// Sends `method path` with `credential` (any bearer token), acting in `tenant` if given
/// (the credential's own tenant when `None`); returns status and JSON body.
pub async fn as_key(
    k: &TestKernel,
    credential: &str,
    tenant: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut builder =
        Request::builder().method(method).uri(path).header("authorization", format!("Bearer {credential}"));
    if let Some(tenant) = tenant {
        builder = builder.header("x-nops-tenant", tenant);
    }
    let request = match body {
        Some(body) => builder
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).expect("json")))
            .expect("request"),
        None => builder.body(Body::empty()).expect("request"),
    };
    let (status, _, body) = k.send(request).await;
    (status, body)
}
