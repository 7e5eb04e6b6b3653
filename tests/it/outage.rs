//! Outages of real dependencies: a private PostgreSQL cluster, on its own port and directory,
//! is stopped and started under a running kernel, so an outage test never disturbs the shared
//! server the rest of the suite runs against.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Under `CI=true` a missing server binary fails the test; elsewhere the test is skipped
/// with a notice.
fn missing(what: &str) {
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true but {what} is missing: the outage tests cannot run");
    eprintln!("skipping: {what} is missing");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn wait_for_port(port: u16, up: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() == up {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("port {port} did not become {}", if up { "reachable" } else { "closed" });
}

fn run(command: &mut Command) {
    let output = command.output().unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A PostgreSQL cluster of this test's own, run as the `postgres` system user (PostgreSQL
/// refuses to run as root).
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    /// Creates and starts the cluster; `None` (outside CI) when PostgreSQL's server programs
    /// are not installed.
    pub fn start() -> Option<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| versions.filter_map(Result::ok).map(|e| e.path().join("bin")).max())
            .filter(|bin| bin.join("initdb").exists());
        let Some(bin) = bin else {
            missing("PostgreSQL's server programs (/usr/lib/postgresql/*/bin)");
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        run(Command::new("chown").arg("postgres").arg(dir.path()));
        let data = dir.path().join("data");
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data));
        let cluster = Self { dir, bin, port: free_port() };
        cluster.resume();
        Some(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `postgres://…` of this cluster's `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(self.bin.join("pg_ctl")).arg("-D").arg(self.data()).args(args);
        command
    }

    /// Starts the server (again) on the same port and data.
    pub fn resume(&self) {
        let options =
            format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.path().display());
        let log = self.dir.path().join("server.log");
        run(&mut self.pg_ctl(&["-w", "-t", "60", "-o", &options, "-l", &log.display().to_string(), "start"]));
        wait_for_port(self.port, true);
    }

    /// Stops the server: connections are cut at once (an outage, not a maintenance window).
    pub fn stop(&self) {
        run(&mut self.pg_ctl(&["-w", "-t", "60", "-m", "immediate", "stop"]));
        wait_for_port(self.port, false);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// Waits until `check` holds, polling; panics with `what` after 60 s.
pub(crate) async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// PostgreSQL stops mid-run: the kernel keeps authenticating, taking heartbeats and routing;
/// it refuses what needs the database with a clear 503; an agent's result is buffered on
/// local disk (critical) and recorded once the database returns, so nothing critical is
/// lost; `/health/extended` shows the degraded state, then the recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_keeps_the_fleet_served_and_loses_no_result() {
    use http::StatusCode;
    use serde_json::json;

    use crate::support::{Backend, TestDb, TestKernel, agent_json};

    let Some(pg) = PrivatePostgres::start() else { return };
    let k = TestKernel::start_with(Backend::Postgres, TestDb::at(pg.url()), |_| {}).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(k.kernel.degraded.clone().run(std::sync::Arc::new(k.kernel.store.clone()), stop_rx));

    // A pull agent takes a task before the outage.
    let agent = k.create_agent(agent_json("puller", "work.echo", "1.0.0")).await;
    let id = agent["id"].as_str().expect("id").to_string();
    let task_body =
        json!({ "capabilities": [{ "name": "work.echo" }], "input": { "n": 7 }, "attempt_timeout_ms": 120000 });
    let (status, task) = k.call("POST", "/api/v1/tasks", Some(task_body.clone())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{task}");
    let task_id = task["id"].as_str().expect("task id").to_string();
    let (status, delivery) = k.call("GET", &format!("/api/v1/agents/{id}/tasks/next?wait_ms=10000"), None).await;
    assert_eq!(status, StatusCode::OK, "{delivery}");
    assert_eq!(delivery["task_id"], task_id.as_str());

    // A chaos toggle (on a target the outage doesn't use) turned off during the outage: its
    // audit event is critical.
    let (status, toggle) = k
        .call("POST", "/api/v1/admin/chaos", Some(json!({ "target": "dispatch", "latency_ms": 1, "note": "drill" })))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{toggle}");
    let toggle_id = toggle["id"].as_str().expect("toggle id").to_string();

    pg.stop();
    eventually("the store probe to notice the outage", || async {
        let (status, health) = k.call("GET", "/health/extended", None).await;
        status == StatusCode::SERVICE_UNAVAILABLE && health["components"]["degraded"]["store"]["degraded"] == true
    })
    .await;
    // Past the key cache's freshness: authentication now leans on the last known record.
    k.clock.advance_ms(6_000);

    let (status, ack) = k.call("POST", &format!("/api/v1/agents/{id}/heartbeat"), Some(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "heartbeats are kept in memory during the outage: {ack}");
    let (status, route) =
        k.call("POST", "/api/v1/route", Some(json!({ "capabilities": [{ "name": "work.echo" }] }))).await;
    assert_eq!(status, StatusCode::OK, "routing answers from memory: {route}");
    assert_eq!(route["chosen"][0]["id"], id.as_str());

    let (status, refused) = k.call("POST", "/api/v1/agents", Some(agent_json("late", "work.echo", "1.0.0"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
    assert_eq!(refused["error"]["code"], "store_unavailable");
    let (status, refused) = k.call("POST", "/api/v1/tasks", Some(task_body)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "a new task needs the store: {refused}");

    let result = json!({ "attempt": delivery["attempt"], "ok": true, "output": { "echo": 7 } });
    let (status, buffered) =
        k.call("POST", &format!("/api/v1/agents/{id}/tasks/{task_id}/result"), Some(result.clone())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "the result is spooled: {buffered}");
    assert_eq!(buffered["buffered"], true);

    let (status, removed) = k.call("DELETE", &format!("/api/v1/admin/chaos/{toggle_id}"), None).await;
    assert_eq!(status, StatusCode::OK, "a toggle always goes off: {removed}");

    let (status, health) = k.call("GET", "/health/extended", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
    let degraded = &health["components"]["degraded"];
    assert_eq!(degraded["store"]["degraded"], true, "{health}");
    assert_eq!(degraded["spool"]["records"], 2, "the result and the audit event wait on disk: {health}");
    assert_eq!(degraded["criticality"]["task_result"], "critical");
    let (_, metrics) = k.send_text(k.request("GET", "/metrics", None)).await;
    assert!(metrics.contains("nops_dependency_degraded{dependency=\"store\"} 1"), "{metrics}");

    pg.resume();
    eventually("the spooled result to be recorded", || async {
        let (status, task) = k.call("GET", &format!("/api/v1/tasks/{task_id}"), None).await;
        status == StatusCode::OK && task["status"] == "succeeded"
    })
    .await;
    let (_, task) = k.call("GET", &format!("/api/v1/tasks/{task_id}"), None).await;
    assert_eq!(task["output"], json!({ "echo": 7 }), "the buffered result is the one recorded: {task}");
    let (status, again) = k.call("POST", &format!("/api/v1/agents/{id}/tasks/{task_id}/result"), Some(result)).await;
    assert_eq!(status, StatusCode::OK, "the agent's retry is a duplicate, not a second result: {again}");
    assert_eq!(again["duplicate"], true);
    eventually("/health/extended to recover", || async {
        let (status, health) = k.call("GET", "/health/extended", None).await;
        status == StatusCode::OK && health["components"]["degraded"]["spool"]["records"] == 0
    })
    .await;
    let pool = sqlx::PgPool::connect(&pg.url()).await.expect("connect");
    let events: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT subject, payload FROM outbox WHERE subject = 'nops.chaos.deleted'")
            .fetch_all(&pool)
            .await
            .expect("read the outbox");
    pool.close().await;
    assert_eq!(events.len(), 1, "the spooled audit event reached the outbox exactly once");
    let payload: serde_json::Value = serde_json::from_slice(&events[0].1).expect("json payload");
    assert_eq!(payload["toggle"]["id"], toggle_id.as_str(), "{payload}");
    let _ = stop_tx.send(true);
}

/// The `nats-server` program, where Debian or a manual install puts it.
fn nats_server() -> Option<&'static str> {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

/// A NATS server with JetStream of this test's own (own port, own storage directory).
pub struct PrivateNats {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateNats {
    /// Starts the server; `None` (outside CI) when `nats-server` is not installed.
    pub fn start() -> Option<Self> {
        if nats_server().is_none() {
            missing("nats-server");
            return None;
        }
        let mut nats = Self { dir: tempfile::tempdir().expect("temp dir"), port: free_port(), child: None };
        nats.resume();
        Some(nats)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port and storage (streams and consumers survive).
    pub fn resume(&mut self) {
        let child = Command::new(nats_server().expect("nats-server"))
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        wait_for_port(self.port, true);
    }

    /// Kills the server at once (SIGKILL: no goodbye to clients).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        wait_for_port(self.port, false);
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// NATS stops mid-run under a real kernel: agents keep registering (their events wait in the
/// outbox), published events are answered 202 and kept in the outbox, `/health/extended`
/// shows the bus degraded; when NATS returns every event, the kernel's own and the clients',
/// reaches a consumer group exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_outage_buffers_events_and_delivers_each_once_when_it_returns() {
    use http::StatusCode;
    use serde_json::{Value, json};

    use crate::process::Process;
    use crate::support::{Backend, TestDb, agent_json};

    let Some(mut nats) = PrivateNats::start() else { return };
    let db = TestDb::new(Backend::Sqlite).await;
    let url = nats.url();
    let kernel = Process::start(&db, &[("NOPS_NATS_URL", url.as_str())]).await;
    let key = kernel.bootstrap_key().expect("bootstrap key");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
    let base = kernel.base.clone();
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let request = http.request(method, format!("{base}{path}")).bearer_auth(&key);
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        async move {
            let response = request.send().await.expect("request");
            let status = StatusCode::from_u16(response.status().as_u16()).expect("status");
            (status, response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, body) = call(
        reqwest::Method::PUT,
        "/api/v1/consumers/all",
        Some(json!({"filter": ">", "start": {"from": "all"}, "ack_wait_ms": 60000})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let publish = |id: &str| json!({"events": [{"id": id, "subject": "orders.created", "payload": {"id": id}}]});
    let (status, body) = call(reqwest::Method::POST, "/api/v1/events", Some(publish("before"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    nats.stop();
    eventually("the bus counts as down", || async {
        let (status, health) = call(reqwest::Method::GET, "/health/extended", None).await;
        status == StatusCode::SERVICE_UNAVAILABLE && health["components"]["degraded"]["bus"]["degraded"] == true
    })
    .await;
    // What needs only the store still works; its event waits in the outbox.
    let (status, body) =
        call(reqwest::Method::POST, "/api/v1/agents", Some(agent_json("during", "gpu", "1.0.0"))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // Published events are kept, answered 202; a retry of the same id is kept too and
    // deduplicated when it is published.
    for _ in 0..2 {
        let (status, body) = call(reqwest::Method::POST, "/api/v1/events", Some(publish("during"))).await;
        assert_eq!((status, body["buffered"].as_u64()), (StatusCode::ACCEPTED, Some(1)), "{body}");
    }

    nats.resume();
    eventually("the bus is back", || async {
        let (status, _) = call(reqwest::Method::GET, "/health/extended", None).await;
        status == StatusCode::OK
    })
    .await;
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && !(seen.contains(&"during".to_string()) && seen.iter().any(|s| s.starts_with("outbox/")))
    {
        let (status, body) =
            call(reqwest::Method::POST, "/api/v1/consumers/all/fetch", Some(json!({"max": 100, "wait_ms": 1000})))
                .await;
        if status != StatusCode::OK {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        for d in body["deliveries"].as_array().cloned().unwrap_or_default() {
            seen.push(d["event"]["id"].as_str().expect("id").to_string());
            let ack = json!({"acks": [{"token": d["token"], "kind": "ack"}]});
            call(reqwest::Method::POST, "/api/v1/consumers/all/ack", Some(ack)).await;
        }
    }
    // Anything still in flight arrives within one more fetch; nothing arrives twice.
    let (_, body) =
        call(reqwest::Method::POST, "/api/v1/consumers/all/fetch", Some(json!({"max": 100, "wait_ms": 1000}))).await;
    seen.extend(
        body["deliveries"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| d["event"]["id"].as_str().unwrap_or("").to_string()),
    );
    let count = |id: &str| seen.iter().filter(|s| *s == id).count();
    assert_eq!((count("before"), count("during")), (1, 1), "each client event once: {seen:?}");
    let kernel_events: Vec<&String> = seen.iter().filter(|s| s.starts_with("outbox/")).collect();
    let mut unique = kernel_events.clone();
    unique.sort();
    unique.dedup();
    assert!(!kernel_events.is_empty(), "the registration made during the outage was published: {seen:?}");
    assert_eq!(unique.len(), kernel_events.len(), "no kernel event twice: {seen:?}");
    let output = kernel.stop().await;
    assert!(!output.contains("panicked"), "{output}");
}
