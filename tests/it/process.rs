//! The real `nops` binary: help, configuration precedence, the bootstrap key, an unreachable
//! database, and a kernel killed with SIGKILL under load.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::{Backend, TestDb, backends};

pub(crate) const NOPS: &str = env!("CARGO_BIN_EXE_nops");
/// How long a test waits for a kernel to start serving.
const START_WAIT_MS_MAX: u64 = 30_000;

/// A running `nops serve` process and what it printed.
pub(crate) struct Process {
    child: Child,
    pub(crate) stderr: Arc<Mutex<String>>,
    pub(crate) base: String,
}

impl Process {
    pub(crate) async fn start(db: &TestDb, extra_env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(NOPS);
        cmd.arg("serve")
            .current_dir(db.dir.path())
            .env_remove("NOPS_CONFIG")
            .env("NOPS_LISTEN", "127.0.0.1:0")
            .env("NOPS_DATA_DIR", db.dir.path())
            .env("NOPS_DATABASE_URL", &db.url)
            .env("NOPS_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn nops");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut addr_tx = Some(addr_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(log) = serde_json::from_str::<Value>(&line)
                    && log["message"] == "nops kernel serving"
                    && let Some(tx) = addr_tx.take()
                {
                    let _ = tx.send(log["listen"].as_str().unwrap_or_default().to_string());
                }
                let mut text = sink.lock().expect("lock");
                text.push_str(&line);
                text.push('\n');
            }
        });
        // Standard output goes to the same buffer: whatever the kernel prints is in `output`.
        let mut out_lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let sink = stderr.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = out_lines.next_line().await {
                let mut text = sink.lock().expect("lock");
                text.push_str(&line);
                text.push('\n');
            }
        });
        let addr = tokio::time::timeout(Duration::from_millis(START_WAIT_MS_MAX), addr_rx)
            .await
            .unwrap_or_else(|_| panic!("nops did not start; stderr:\n{}", stderr.lock().expect("lock")))
            .unwrap_or_else(|_| panic!("nops exited; stderr:\n{}", stderr.lock().expect("lock")));
        Self { child, stderr, base: format!("http://{addr}") }
    }

    /// `host:port` the kernel listens on.
    pub(crate) fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// SIGTERM, a clean exit expected; returns everything the process printed.
    pub(crate) async fn stop(self) -> String {
        let output = self.stderr.clone();
        let status = self.terminate().await;
        assert!(status.success(), "a clean exit on SIGTERM:\n{}", output.lock().expect("lock"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        output.lock().expect("lock").clone()
    }

    pub(crate) fn bootstrap_key(&self) -> Option<String> {
        let text = self.stderr.lock().expect("lock");
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with("nops_") && nops_core::auth::is_well_formed_api_key(l))
            .map(String::from)
    }

    pub(crate) fn kill9(&mut self) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().expect("kill");
        assert!(status.success());
    }

    async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running");
        std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill");
        tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.expect("exits on SIGTERM").expect("wait")
    }
}

/// POSTs `body` with the key and returns the JSON answer.
async fn post_json(http: &reqwest::Client, url: &str, key: &str, body: &Value) -> Value {
    let response = http.post(url).bearer_auth(key).json(body).send().await.expect("request");
    response.json().await.expect("json body")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client")
}

#[test]
fn help_is_readable() {
    let out = std::process::Command::new(NOPS).arg("--help").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["serve", "config", "bootstrap admin API key", "nops.toml"] {
        assert!(text.contains(needle), "--help mentions {needle}:\n{text}");
    }
    let out = std::process::Command::new(NOPS).args(["serve", "--help"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in
        ["NOPS_LISTEN", "NOPS_DATA_DIR", "NOPS_DATABASE_URL", "NOPS_STALE_AFTER_MS", "--heartbeat-flush-interval-ms"]
    {
        assert!(text.contains(needle), "serve --help mentions {needle}:\n{text}");
    }
}

#[test]
fn flags_override_env_override_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("nops.toml"),
        "listen = \"127.0.0.1:1111\"\n[lifecycle]\nstale_after_ms = 1000\nzombie_after_ms = 2000\nremove_after_ms = 3000\n",
    )
    .expect("write");
    let show = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = std::process::Command::new(NOPS);
        cmd.args(["config", "show"])
            .args(args)
            .current_dir(dir.path())
            .env_remove("NOPS_LISTEN")
            .env_remove("NOPS_CONFIG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(show(&[], &[]).contains("listen = \"127.0.0.1:1111\""), "file over default");
    assert!(show(&[], &[]).contains("stale_after_ms = 1000"));
    let env = [("NOPS_LISTEN", "127.0.0.1:2222")];
    assert!(show(&env, &[]).contains("listen = \"127.0.0.1:2222\""), "env over file");
    assert!(show(&env, &["--listen", "127.0.0.1:3333"]).contains("listen = \"127.0.0.1:3333\""), "flag over env");
    let secret =
        show(&[("NOPS_DATABASE_URL", "postgres://u:hunter2@h/db"), ("NOPS_API_KEY_PEPPER", "pepper-secret")], &[]);
    assert!(!secret.contains("hunter2") && !secret.contains("pepper-secret"), "secrets are redacted:\n{secret}");
}

#[tokio::test]
async fn an_unreachable_database_fails_the_start_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(NOPS)
        .arg("serve")
        .current_dir(dir.path())
        .env("NOPS_DATABASE_URL", "postgres://postgres:topsecret@127.0.0.1:1/nops")
        .env("NOPS_DB_CONNECT_ATTEMPTS_MAX", "2")
        .env("NOPS_LISTEN", "127.0.0.1:0")
        .output()
        .await
        .expect("run");
    assert!(!out.status.success(), "exits non-zero");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "nops: error: cannot reach the database at postgres://postgres:***@127.0.0.1:1/nops after 2 attempts"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("topsecret"), "the password never shows: {stderr}");
}

#[tokio::test]
async fn the_bootstrap_key_is_printed_once_and_sigterm_flushes() {
    for backend in backends() {
        let db = TestDb::new(backend).await;
        let first = Process::start(&db, &[]).await;
        let key = first.bootstrap_key().expect("first start prints the key");
        let http = client();
        let agent: Value =
            post_json(&http, &format!("{}/api/v1/agents", first.base), &key, &json!({"name": "a"})).await;
        let id = agent["id"].as_str().expect("id").to_string();
        let ack: Value = post_json(
            &http,
            &format!("{}/api/v1/agents/{id}/heartbeat", first.base),
            &key,
            &json!({"in_flight_tasks": 7}),
        )
        .await;
        let status = first.terminate().await;
        assert!(status.success(), "{backend:?}: a clean exit on SIGTERM");

        let second = Process::start(&db, &[]).await;
        assert_eq!(second.bootstrap_key(), None, "{backend:?}: never printed again");
        let got: Value = http
            .get(format!("{}/api/v1/agents/{id}", second.base))
            .bearer_auth(&key)
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        assert_eq!(got["last_heartbeat_at_ms"], ack["at_ms"], "{backend:?}: shutdown flushed the heartbeat");
        assert_eq!(got["load"]["in_flight_tasks"], 7);
        let db_file = std::fs::read(db.dir.path().join("nops.db")).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&db_file).contains(&key), "only the hash is stored");
    }
}

#[tokio::test]
async fn a_kernel_killed_with_sigkill_under_load_loses_no_acknowledged_write() {
    for backend in backends() {
        sigkill_under_load(backend).await;
    }
}

async fn sigkill_under_load(backend: Backend) {
    let db = TestDb::new(backend).await;
    // A long flush interval makes the flushed/unflushed boundary easy to see.
    let mut kernel = Process::start(&db, &[("NOPS_HEARTBEAT_FLUSH_INTERVAL_MS", "200")]).await;
    let key = kernel.bootstrap_key().expect("key");
    let http = client();

    // Phase 1: heartbeats, then wait until the kernel reports nothing pending.
    let mut flushed: HashMap<String, i64> = HashMap::new();
    for i in 0..20 {
        let agent: Value =
            post_json(&http, &format!("{}/api/v1/agents", kernel.base), &key, &json!({"name": format!("hb-{i}")}))
                .await;
        let id = agent["id"].as_str().expect("id").to_string();
        let ack: Value = post_json(
            &http,
            &format!("{}/api/v1/agents/{id}/heartbeat", kernel.base),
            &key,
            &json!({"in_flight_tasks": i}),
        )
        .await;
        flushed.insert(id, ack["at_ms"].as_i64().expect("at"));
    }
    wait_until_flushed(&http, &kernel.base, flushed.len()).await;

    // Phase 2: concurrent creates and heartbeats, killed mid-stream.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let http = http.clone();
        let base = kernel.base.clone();
        let key = key.clone();
        let acknowledged = acknowledged.clone();
        let hb_ids: Vec<String> = flushed.keys().cloned().collect();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let create = http
                    .post(format!("{base}/api/v1/agents"))
                    .bearer_auth(&key)
                    .json(&json!({"name": format!("load-{w}-{i}"), "capabilities": [{"name": "a.b", "version": "1.0.0"}]}))
                    .send()
                    .await;
                match create {
                    Ok(r) if r.status() == 201 => {
                        acknowledged.lock().expect("lock").push(format!("load-{w}-{i}"));
                    }
                    Ok(r) => panic!("unexpected status {} before the kill", r.status()),
                    Err(_) => break,
                }
                // Heartbeats after phase 1 are not guaranteed durable: do not count them.
                let id = &hb_ids[i % hb_ids.len()];
                if http.post(format!("{base}/api/v1/agents/{id}/heartbeat")).bearer_auth(&key).json(&json!({})).send().await.is_err() {
                    break;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    kernel.kill9();
    for writer in writers {
        writer.await.expect("writer");
    }
    let acknowledged = acknowledged.lock().expect("lock").clone();
    assert!(acknowledged.len() > 10, "{backend:?}: the load ran ({} creates)", acknowledged.len());

    let restarted = Process::start(&db, &[]).await;
    assert_eq!(restarted.bootstrap_key(), None);
    let mut names = std::collections::HashSet::new();
    let mut after: Option<String> = None;
    let mut heartbeat_at = HashMap::new();
    loop {
        let mut url = format!("{}/api/v1/agents?limit=500", restarted.base);
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let page: Value = http.get(url).bearer_auth(&key).send().await.expect("list").json().await.expect("json");
        for agent in page["items"].as_array().expect("items") {
            names.insert(agent["name"].as_str().expect("name").to_string());
            heartbeat_at.insert(agent["id"].as_str().expect("id").to_string(), agent["last_heartbeat_at_ms"].as_i64());
        }
        match page["next_after"].as_str() {
            Some(a) => after = Some(a.to_string()),
            None => break,
        }
    }
    let lost: Vec<&String> = acknowledged.iter().filter(|n| !names.contains(*n)).collect();
    assert!(lost.is_empty(), "{backend:?}: acknowledged registrations lost: {lost:?}");
    for (id, at) in &flushed {
        let stored = heartbeat_at.get(id).copied().flatten().expect("flushed heartbeat survives");
        assert!(stored >= *at, "{backend:?}: a flushed heartbeat is never lost ({stored} < {at})");
    }
}

async fn wait_until_flushed(http: &reqwest::Client, base: &str, count: usize) {
    for _ in 0..100 {
        let text = http.get(format!("{base}/metrics")).send().await.expect("metrics").text().await.expect("text");
        let flushed = text
            .lines()
            .find_map(|l| l.strip_prefix("nops_heartbeats_flushed_total "))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        if flushed >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("heartbeats were never flushed");
}

/// Polls `GET url` until `done` accepts the JSON answer.
async fn wait_for(http: &reqwest::Client, url: &str, key: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..300 {
        if let Ok(response) = http.get(url).bearer_auth(key).send().await {
            last = response.json().await.unwrap_or(Value::Null);
            if done(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: last answer {last}");
}

/// Runs the `nops` CLI against a kernel and returns its stdout as JSON.
fn cli(base: &str, key: &str, args: &[&str]) -> Value {
    nops_cli("plugins", base, key, args)
}

/// Runs `nops <group> <args>` against the kernel at `base` with `key`; returns its JSON output.
fn nops_cli(group: &str, base: &str, key: &str, args: &[&str]) -> Value {
    let out = std::process::Command::new(NOPS)
        .arg(group)
        .args(args)
        .env("NOPS_URL", base)
        .env("NOPS_API_KEY", key)
        .output()
        .expect("run nops");
    assert!(out.status.success(), "nops {group} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[tokio::test]
async fn the_cli_creates_rotates_and_revokes_keys_and_mints_tokens() {
    let db = TestDb::new(Backend::Sqlite).await;
    let secret = "cli-test-secret-cli-test-secret-0123456789";
    let kernel = Process::start(
        &db,
        &[("NOPS_JWT_HS256_SECRET", secret), ("NOPS_JWT_ISSUER", "dev"), ("NOPS_JWT_AUDIENCE", "nops")],
    )
    .await;
    let admin = kernel.bootstrap_key().expect("bootstrap key");
    let http = client();
    let whoami = |credential: String| {
        let http = http.clone();
        let url = format!("{}/api/v1/whoami", kernel.base);
        async move { http.get(url).bearer_auth(credential).send().await.expect("request").status().as_u16() }
    };
    let created = nops_cli(
        "keys",
        &kernel.base,
        &admin,
        &["--tenant", "acme", "create", "deployer", "--role", "operator", "--scopes", "agents:* self:read"],
    );
    let secret_1 = created["secret"].as_str().expect("secret").to_string();
    let id = created["key"]["id"].as_str().expect("id").to_string();
    assert_eq!(created["key"]["scopes"], json!(["agents:*", "self:read"]));
    assert_eq!(whoami(secret_1.clone()).await, 200);
    let listed = nops_cli("keys", &kernel.base, &admin, &["--tenant", "acme", "list"]);
    assert_eq!(listed["keys"][0]["id"], id.as_str());
    let rotated = nops_cli("keys", &kernel.base, &admin, &["--tenant", "acme", "rotate", &id, "--grace-s", "0"]);
    let secret_2 = rotated["secret"].as_str().expect("secret").to_string();
    assert_eq!(whoami(secret_1.clone()).await, 401, "grace 0: the old key stops at once");
    assert_eq!(whoami(secret_2.clone()).await, 200);
    let new_id = rotated["key"]["id"].as_str().expect("id").to_string();
    let revoked = nops_cli("keys", &kernel.base, &admin, &["--tenant", "acme", "revoke", &new_id]);
    assert_eq!(revoked["status"], "revoked");
    assert_eq!(whoami(secret_2.clone()).await, 401);

    // A development token from the CLI is accepted, with its claims.
    let out = std::process::Command::new(NOPS)
        .args(["token", "mint", "--secret-env", "MINT_SECRET", "--issuer", "dev", "--audience", "nops"])
        .args(["--subject", "alice", "--tenant", "acme", "--role", "viewer", "--scope", "self:read agents:read"])
        .env("MINT_SECRET", secret)
        .output()
        .expect("run nops token mint");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let me: Value = http
        .get(format!("{}/api/v1/whoami", kernel.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(me["subject"], "alice");
    assert_eq!(me["method"], "jwt");
    assert_eq!(me["role"], "viewer");
    assert_eq!(me["scopes"], json!(["self:read", "agents:read"]));
    // The audit log has one record per key event, and no secret (the bootstrap key is printed
    // once, by design, at the first start).
    let logs = kernel.stop().await;
    for event in ["api_key.created", "api_key.rotated", "api_key.revoked"] {
        assert!(logs.contains(event), "no audit record for {event}");
    }
    for secret in [&token, &secret_1, &secret_2] {
        assert!(!logs.contains(secret.as_str()), "a secret reached the logs");
    }
}

#[tokio::test]
async fn the_reference_plugins_hot_load_from_the_plugins_directory_and_the_cli_drives_them() {
    let db = TestDb::new(Backend::Sqlite).await;
    let dir = db.dir.path().join("plugins");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let staged = std::process::Command::new(format!("{root}/scripts/stage-plugins.sh"))
        .arg(&dir)
        .output()
        .expect("stage the reference plugins");
    assert!(staged.status.success(), "{}", String::from_utf8_lossy(&staged.stderr));
    let kernel = Process::start(&db, &[("NOPS_PLUGINS_DIR", dir.to_str().expect("utf-8"))]).await;
    let key = kernel.bootstrap_key().expect("bootstrap key");
    let http = client();
    let list_url = format!("{}/api/v1/plugins", kernel.base);
    let names =
        ["abac", "contract-spend-limit", "migration-agent-labels", "scorer-weighted", "scorer-weighted-js", "tool-kv"];
    // The version each manifest under plugins/ declares (the reference scorer is at 0.2.0,
    // since it exports the `scorer-columns` world).
    let version = |name: &str| if name == "scorer-weighted" { "0.2.0" } else { "0.1.0" };
    let list = wait_for(&http, &list_url, &key, "every reference plugin active", |v| {
        v["plugins"].as_array().is_some_and(|p| {
            p.len() == names.len() && p.iter().all(|p| p["name"].as_str().is_some_and(|n| p["active"] == version(n)))
        })
    })
    .await;
    let mut listed: Vec<&str> =
        list["plugins"].as_array().expect("plugins").iter().filter_map(|p| p["name"].as_str()).collect();
    listed.sort_unstable();
    assert_eq!(listed, names);

    // Each kind answers through the real server.
    let cross_tenant = json!({ "authorize": { "action": "agents:read",
        "principal": [ { "name": "role", "value": "operator" }, { "name": "tenant", "value": "acme" } ],
        "resource": [ { "name": "tenant", "value": "globex" } ] } });
    let answer = cli(&kernel.base, &key, &["invoke", "abac", &cross_tenant.to_string()]);
    assert_eq!(answer["output"]["decision"]["allow"], false, "{answer}");
    let spend =
        |amount: i64| json!({ "govern": { "kind": "spend", "attributes": [ { "name": "amount", "value": amount } ] } });
    let first = cli(&kernel.base, &key, &["invoke", "contract-spend-limit", &spend(600).to_string()]);
    assert_eq!(first["output"]["verdict"]["accept"], true, "{first}");
    let second = cli(&kernel.base, &key, &["invoke", "contract-spend-limit", &spend(600).to_string()]);
    assert_eq!(second["output"]["verdict"]["accept"], false, "the limit of 1000 holds across calls: {second}");
    let described = cli(&kernel.base, &key, &["invoke", "tool-kv", r#"{"describe": null}"#]);
    assert_eq!(described["output"]["description"]["name"], "kv", "{described}");

    // A new version dropped into the directory is verified, stored and activated.
    let manifest_path = dir.join("abac.toml");
    let manifest = std::fs::read_to_string(&manifest_path).expect("manifest");
    std::fs::write(dir.join("deny-all.json"), br#"{"version": 1, "rules": []}"#).expect("config");
    let config_digest = nops_core::plugin::digest(br#"{"version": 1, "rules": []}"#);
    let next: String = manifest
        .lines()
        .map(|l| match l {
            l if l.starts_with("version = ") => "version = \"0.2.0\"".to_string(),
            l if l.starts_with("config = ") => "config = \"deny-all.json\"".to_string(),
            l if l.starts_with("config_digest = ") => format!("config_digest = \"{config_digest}\""),
            l => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&manifest_path, next).expect("new manifest");
    let abac_url = format!("{}/api/v1/plugins/abac", kernel.base);
    wait_for(&http, &abac_url, &key, "0.2.0 hot-loaded", |v| v["active"] == "0.2.0").await;
    let same_tenant = json!({ "authorize": { "action": "agents:read",
        "principal": [ { "name": "role", "value": "admin" }, { "name": "tenant", "value": "acme" } ],
        "resource": [ { "name": "tenant", "value": "acme" } ] } });
    let answer = cli(&kernel.base, &key, &["invoke", "abac", &same_tenant.to_string()]);
    assert_eq!((answer["version"].as_str(), &answer["output"]["decision"]["allow"]), (Some("0.2.0"), &json!(false)));

    // The CLI rolls back, and the chain records every step.
    let rolled = cli(&kernel.base, &key, &["rollback", "abac"]);
    assert_eq!(rolled["active"], "0.1.0", "{rolled}");
    let chain = cli(&kernel.base, &key, &["chain", "abac"]);
    let actions: Vec<&str> =
        chain["entries"].as_array().expect("entries").iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions, ["upload", "activate", "upload", "activate", "rollback"]);

    // Compiled code is cached on disk for the next start.
    let cached = walk_files(&db.dir.path().join("cache").join("wasm"));
    assert!(cached > 0, "the compilation cache holds the compiled components");
    assert!(kernel.terminate().await.success());
}

fn walk_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries.filter_map(Result::ok).map(|e| if e.path().is_dir() { walk_files(&e.path()) } else { 1 }).sum()
    })
}
