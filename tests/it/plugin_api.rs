//! The plugin lifecycle over HTTP: upload with verification, activation, rollback, shadow,
//! deletion, hash chains and tamper detection, failure semantics, hot swap under load and
//! replicas on one PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use http::{Request, StatusCode};
use nops::config::Config;
use nops::kernel::Kernel;
use nops_core::clock::ManualClock;
use nops_core::plugin::{ChainEntry, Limits, Manifest, PluginKind, digest, public_key_base64, sign_manifest};
use serde_json::{Value, json};

use crate::support::{Backend, TestDb, TestKernel, backends, test_args};

pub(crate) fn wasm(name: &str) -> Vec<u8> {
    let path = format!("{}/../../target/wasm/wasm32-wasip2/release/{name}.wasm", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}; build the plugins with scripts/build-plugins.sh"))
}

pub(crate) fn policy_document(name: &str) -> Vec<u8> {
    let path = format!("{}/../../policies/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A rule document that permits nothing: every decision is a deny.
pub(crate) const DENY_ALL: &[u8] = br#"{"version": 1, "rules": []}"#;

pub(crate) fn manifest(
    name: &str,
    version: &str,
    kind: PluginKind,
    component: &[u8],
    config: Option<&[u8]>,
) -> Manifest {
    Manifest {
        name: name.into(),
        version: version.parse().expect("version"),
        kind,
        digest: digest(component),
        config: None,
        config_digest: config.map(digest),
        grants: Default::default(),
        limits: if kind == PluginKind::Contract {
            Limits { fuel_max: Some(10_000_000), ..Limits::default() }
        } else {
            Limits::default()
        },
        signature: None,
    }
}

/// A `multipart/form-data` upload built by hand, as any HTTP client would send it.
fn upload_request(k: &TestKernel, query: &str, parts: &[(&str, &[u8])]) -> Request<Body> {
    let boundary = "nops-test-boundary-7f3a";
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
        body.extend_from_slice(bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    Request::builder()
        .method("POST")
        .uri(format!("/api/v1/plugins{query}"))
        .header("authorization", format!("Bearer {}", k.key))
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(Body::from(body))
        .expect("request")
}

pub(crate) async fn upload(
    k: &TestKernel,
    m: &Manifest,
    component: &[u8],
    config: Option<&[u8]>,
    activate: bool,
) -> (StatusCode, Value) {
    let text = m.to_toml();
    let mut parts: Vec<(&str, &[u8])> = vec![("manifest", text.as_bytes()), ("wasm", component)];
    if let Some(config) = config {
        parts.push(("config", config));
    }
    let (status, _, body) = k.send(upload_request(k, if activate { "?activate=true" } else { "" }, &parts)).await;
    (status, body)
}

pub(crate) fn admin_request(tenant: &str, resource_tenant: &str) -> Value {
    json!({ "authorize": {
        "action": "agents:read",
        "principal": [ { "name": "role", "value": "admin" }, { "name": "tenant", "value": tenant } ],
        "resource": [ { "name": "tenant", "value": resource_tenant } ],
        "context": []
    }})
}

pub(crate) async fn upload_abac(k: &TestKernel, version: &str, config: &[u8], activate: bool) {
    let component = wasm("policy_abac");
    let m = manifest("abac", version, PluginKind::Policy, &component, Some(config));
    let (status, body) = upload(k, &m, &component, Some(config), activate).await;
    assert_eq!(status, StatusCode::CREATED, "{:?}: {body}", k.backend);
}

async fn decide(k: &TestKernel, request: &Value) -> Value {
    let (status, answer) = k.call("POST", "/api/v1/plugins/abac/invoke", Some(request.clone())).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

#[tokio::test]
async fn an_uploaded_policy_is_activated_called_and_measured() {
    for k in TestKernel::all().await {
        upload_abac(&k, "1.0.0", &policy_document("tenant-isolation.json"), true).await;

        let allowed = decide(&k, &admin_request("acme", "acme")).await;
        assert_eq!(allowed["output"]["decision"]["allow"], true, "{allowed}");
        assert_eq!(allowed["version"], "1.0.0");
        let denied = decide(&k, &admin_request("acme", "globex")).await;
        assert_eq!(denied["output"]["decision"]["allow"], false, "{denied}");
        assert_eq!(denied["output"]["decision"]["reasons"], json!(["tenant-isolation"]), "{denied}");

        let (status, list) = k.call("GET", "/api/v1/plugins", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(list["plugins"][0]["name"], "abac");
        assert_eq!(list["plugins"][0]["kind"], "policy");
        assert_eq!(list["plugins"][0]["active"], "1.0.0");

        let (_, shown) = k.call("GET", "/api/v1/plugins/abac", None).await;
        let v = &shown["versions"][0];
        assert_eq!(v["digest"], digest(&wasm("policy_abac")));
        assert_eq!(v["metrics"]["calls"], 2, "{shown}");
        assert!(v["metrics"]["latency_us_mean"].as_f64().expect("mean") > 0.0);
        assert!(v["metrics"]["memory_high_water_bytes"].as_i64().expect("memory") > 0);

        let (_, metrics) = k.send_text(k.request("GET", "/metrics", None)).await;
        assert!(
            metrics.contains(r#"nops_plugin_calls_total{outcome="ok",plugin="default/abac",version="1.0.0"} 2"#),
            "{metrics}"
        );
        assert!(metrics.contains(r#"nops_plugin_active{plugin="default/abac",version="1.0.0"} 1"#));

        // Another tenant sees none of it.
        let other = k
            .send(
                Request::builder()
                    .uri("/api/v1/plugins/abac")
                    .header("authorization", format!("Bearer {}", k.key))
                    .header("x-nops-tenant", "globex")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await;
        assert_eq!(other.0, StatusCode::NOT_FOUND);
    }
}

/// What is wrong, the manifest, the component, the config and the expected error code.
type RefusedUpload<'a> = (&'a str, Manifest, Vec<u8>, Option<Vec<u8>>, &'a str);
/// Named parts of a multipart body.
type Parts<'a> = Vec<(&'a str, &'a [u8])>;

#[tokio::test]
async fn uploads_are_verified_and_a_refused_upload_stores_nothing() {
    for k in TestKernel::all().await {
        let policy = wasm("policy_abac");
        let scorer = wasm("scorer_weighted");
        let config = policy_document("tenant-isolation.json");
        let good = manifest("abac", "1.0.0", PluginKind::Policy, &policy, Some(&config));

        let mut wrong_digest = good.clone();
        wrong_digest.digest = digest(b"something else");
        let mut over_memory = good.clone();
        over_memory.limits.memory_bytes_max = 1 << 40;
        let mut fuel_on_policy = good.clone();
        fuel_on_policy.limits.fuel_max = Some(1_000);
        let mut ungrantable = good.clone();
        ungrantable.grants.bus = vec!["billing.>".into()];
        let mut clock = good.clone();
        clock.grants.clock = true;
        let cases: Vec<RefusedUpload> = vec![
            ("digest mismatch", wrong_digest, policy.clone(), Some(config.clone()), "digest_mismatch"),
            ("config tampered", good.clone(), policy.clone(), Some(DENY_ALL.to_vec()), "digest_mismatch"),
            ("config missing", good.clone(), policy.clone(), None, "invalid_manifest"),
            ("memory over the ceiling", over_memory, policy.clone(), Some(config.clone()), "limits_refused"),
            ("fuel on a policy", fuel_on_policy, policy.clone(), Some(config.clone()), "invalid_limits"),
            ("bus outside the ceiling", ungrantable, policy.clone(), Some(config.clone()), "grant_refused"),
            ("clock not grantable", clock, policy.clone(), Some(config.clone()), "grant_refused"),
            (
                "a scorer declared as a policy",
                manifest("abac", "1.0.0", PluginKind::Policy, &scorer, None),
                scorer.clone(),
                None,
                "world_mismatch",
            ),
            (
                "not a component",
                manifest("abac", "1.0.0", PluginKind::Policy, b"\0asm\x01\0\0\0", None),
                b"\0asm\x01\0\0\0".to_vec(),
                None,
                "world_mismatch",
            ),
        ];
        for (what, m, component, config, code) in cases {
            let (status, body) = upload(&k, &m, &component, config.as_deref(), true).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {body}");
            assert_eq!(body["error"]["code"], code, "{what}: {body}");
        }

        // Malformed uploads.
        let text = good.to_toml();
        let malformed: Vec<(&str, Parts)> = vec![
            ("no component", vec![("manifest", text.as_bytes())]),
            ("no manifest", vec![("wasm", &policy)]),
            ("manifest twice", vec![("manifest", text.as_bytes()), ("manifest", text.as_bytes()), ("wasm", &policy)]),
            ("unknown part", vec![("manifest", text.as_bytes()), ("wasm", &policy), ("extra", b"x")]),
            ("manifest not TOML", vec![("manifest", b"name = "), ("wasm", &policy)]),
            (
                "unknown manifest field",
                vec![
                    (
                        "manifest",
                        b"name = \"a\"\nversion = \"1.0.0\"\nkind = \"policy\"\ndigest = \"x\"\ncolour = \"red\"\n",
                    ),
                    ("wasm", &policy),
                ],
            ),
            (
                "unknown kind",
                vec![
                    ("manifest", b"name = \"a\"\nversion = \"1.0.0\"\nkind = \"oracle\"\ndigest = \"x\"\n"),
                    ("wasm", &policy),
                ],
            ),
        ];
        for (what, parts) in malformed {
            let (status, _, body) = k.send(upload_request(&k, "", &parts)).await;
            assert!(status.is_client_error(), "{what}: {status} {body}");
            assert!(body["error"]["code"].is_string(), "{what}: {body}");
        }

        let (_, list) = k.call("GET", "/api/v1/plugins", None).await;
        assert_eq!(list["plugins"], json!([]), "{:?}: nothing was stored", k.backend);
        let (status, _) = k.call("GET", "/api/v1/plugins/abac/chain", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        // The good upload still works, and its version is immutable.
        let (status, body) = upload(&k, &good, &policy, Some(&config), false).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, body) = upload(&k, &good, &policy, Some(&config), false).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("version_exists")));
        // A later version must keep the kind.
        let as_scorer = manifest("abac", "2.0.0", PluginKind::Scorer, &scorer, None);
        let (status, body) = upload(&k, &as_scorer, &scorer, None, false).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("kind_mismatch")));
    }
}

/// A kernel whose `nops.toml` requires signed plugins and trusts one key.
async fn signed_kernel(secret: &[u8; 32]) -> TestKernel {
    let db = TestDb::new(Backend::Sqlite).await;
    let config_path = db.dir.path().join("nops.toml");
    std::fs::write(
        &config_path,
        format!(
            "[plugins]\nrequire_signed = true\n[plugins.trusted_keys]\nrelease = \"{}\"\n",
            public_key_base64(secret)
        ),
    )
    .expect("config");
    TestKernel::start_with(Backend::Sqlite, db, |args| args.config = Some(config_path)).await
}

#[tokio::test]
async fn signed_plugins_are_required_and_no_missing_field_skips_verification() {
    let secret = [42u8; 32];
    let k = signed_kernel(&secret).await;
    let component = wasm("policy_abac");
    let config = policy_document("tenant-isolation.json");
    let unsigned = manifest("abac", "1.0.0", PluginKind::Policy, &component, Some(&config));

    let (status, body) = upload(&k, &unsigned, &component, Some(&config), false).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("unsigned")));

    let mut signed = unsigned.clone();
    sign_manifest(&mut signed, "release", &secret);
    let mut other_signer = unsigned.clone();
    sign_manifest(&mut other_signer, "release", &[7u8; 32]);
    let mut unknown_key = signed.clone();
    unknown_key.signature.as_mut().expect("signature").key_id = "someone-else".into();
    let mut widened = signed.clone();
    widened.grants.storage = true;
    let mut truncated = signed.clone();
    truncated.signature.as_mut().expect("signature").ed25519.truncate(20);
    for (what, m) in [
        ("another key", other_signer),
        ("unknown key id", unknown_key),
        ("grants changed after signing", widened),
        ("truncated", truncated),
    ] {
        let (status, body) = upload(&k, &m, &component, Some(&config), false).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {body}");
        assert_eq!(body["error"]["code"], "bad_signature", "{what}: {body}");
    }
    // A signature table with a field missing does not parse, so it can never be skipped.
    let text = signed.to_toml();
    for cut in ["key_id = \"release\"\n", "ed25519 = "] {
        let partial: String =
            text.lines().filter(|l| !l.starts_with(cut.trim_end())).map(|l| format!("{l}\n")).collect();
        assert_ne!(partial, text, "the cut removed a line");
        let (status, _, body) = k
            .send(upload_request(
                &k,
                "",
                &[("manifest", partial.as_bytes()), ("wasm", &component), ("config", &config)],
            ))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{cut}: {body}");
        assert_eq!(body["error"]["code"], "invalid_manifest", "{cut}: {body}");
    }
    let (_, list) = k.call("GET", "/api/v1/plugins", None).await;
    assert_eq!(list["plugins"], json!([]));

    let (status, body) = upload(&k, &signed, &component, Some(&config), true).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["signed_by"], "release");
}

fn chain_of(body: &Value) -> Vec<ChainEntry> {
    serde_json::from_value(body["entries"].clone()).expect("chain entries")
}

#[tokio::test]
async fn versions_roll_back_shadow_and_delete_with_every_step_in_the_hash_chain() {
    for k in TestKernel::all().await {
        upload_abac(&k, "1.0.0", &policy_document("tenant-isolation.json"), true).await;
        upload_abac(&k, "2.0.0", DENY_ALL, false).await;
        let request = admin_request("acme", "acme");
        assert_eq!(decide(&k, &request).await["output"]["decision"]["allow"], true);

        let (status, body) = k.call("POST", "/api/v1/plugins/abac/activate", Some(json!({"version": "2.0.0"}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body["swap_ms"].as_f64().is_some());
        let answer = decide(&k, &request).await;
        assert_eq!(
            (answer["version"].as_str(), &answer["output"]["decision"]["allow"]),
            (Some("2.0.0"), &json!(false))
        );

        let (status, body) = k.call("POST", "/api/v1/plugins/abac/rollback", Some(json!({}))).await;
        assert_eq!((status, body["active"].as_str()), (StatusCode::OK, Some("1.0.0")), "{body}");
        assert_eq!(decide(&k, &request).await["output"]["decision"]["allow"], true);

        // Shadow 2.0.0: answers come from 1.0.0, differences are recorded.
        let (status, _) = k.call("PUT", "/api/v1/plugins/abac/shadow", Some(json!({"version": "2.0.0"}))).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        for _ in 0..3 {
            assert_eq!(decide(&k, &request).await["output"]["decision"]["allow"], true, "the active version answers");
        }
        let mut diffs = Value::Null;
        for _ in 0..100 {
            let (_, body) = k.call("GET", "/api/v1/plugins/abac/shadow", None).await;
            diffs = body["diffs"].clone();
            if diffs.as_array().is_some_and(|d| d.len() == 3) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(diffs.as_array().map(Vec::len), Some(3), "{diffs}");
        assert_eq!(diffs[0]["active_output"]["decision"]["allow"], true);
        assert_eq!(diffs[0]["shadow_output"]["decision"]["allow"], false);
        assert_eq!(diffs[0]["shadow"], "2.0.0");

        let (status, body) = k.call("DELETE", "/api/v1/plugins/abac/versions/1.0.0", None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("version_in_use")));
        let (status, _) = k.call("DELETE", "/api/v1/plugins/abac/versions/2.0.0", None).await;
        assert_eq!(status, StatusCode::CONFLICT, "a shadowing version is in use");
        let (status, _) = k.call("DELETE", "/api/v1/plugins/abac/shadow", None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _) = k.call("DELETE", "/api/v1/plugins/abac/versions/2.0.0", None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _) = k.call("POST", "/api/v1/plugins/abac/activate", Some(json!({"version": "2.0.0"}))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "a deleted version cannot be activated");

        let (status, body) = k.call("GET", "/api/v1/plugins/abac/chain", None).await;
        assert_eq!(status, StatusCode::OK);
        let chain = chain_of(&body);
        let actions: Vec<String> = chain
            .iter()
            .map(|e| serde_json::to_value(e.action).expect("action").as_str().expect("str").to_string())
            .collect();
        assert_eq!(
            actions,
            ["upload", "activate", "upload", "activate", "rollback", "shadow_start", "shadow_stop", "delete"],
            "{body}"
        );
        for (i, entry) in chain.iter().enumerate() {
            assert_eq!(entry.hash, entry.compute_hash(), "entry {i} hashes its contents");
            if i > 0 {
                assert_eq!(entry.prev_hash, chain[i - 1].hash, "entry {i} links to the one before");
            }
        }
    }
}

#[tokio::test]
async fn a_tampered_history_stops_the_kernel_at_start() {
    for backend in backends() {
        for tamper in [
            "UPDATE plugin_chain SET actor = 'mallory' WHERE seq = 1",
            "UPDATE plugin_states SET active = '2.0.0'",
            "DELETE FROM plugin_chain WHERE seq = 3",
        ] {
            let k = TestKernel::start(backend).await;
            upload_abac(&k, "1.0.0", &policy_document("tenant-isolation.json"), true).await;
            upload_abac(&k, "2.0.0", DENY_ALL, false).await;
            let url = k.db.url.clone();
            let data_dir = k.db.dir.path().to_path_buf();
            // The kernel that wrote the history reopens cleanly.
            let mut args = test_args(&url);
            args.data_dir = Some(data_dir);
            let config = Config::resolve(&args).expect("config");
            Kernel::open(&config, Arc::new(ManualClock::new(0))).await.expect("an intact history opens");

            execute(&url, tamper).await;
            let err = Kernel::open(&config, Arc::new(ManualClock::new(0))).await.expect_err("tampering is detected");
            let message = format!("{err:#}");
            assert!(
                message.contains("hash chain broken") && message.contains("default/abac"),
                "{backend:?} {tamper}: {message}"
            );
        }
    }
}

async fn execute(url: &str, sql: &str) {
    if url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(url).await.expect("connect");
        sqlx::query(sql).execute(&pool).await.expect("tamper");
        pool.close().await;
    } else {
        let pool = sqlx::SqlitePool::connect(url).await.expect("connect");
        sqlx::query(sql).execute(&pool).await.expect("tamper");
        pool.close().await;
    }
}

#[tokio::test]
async fn failing_plugins_fail_closed_or_fall_back_and_show_in_metrics() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let trap = wasm("policy_trap");
    let (status, body) =
        upload(&k, &manifest("gate", "1.0.0", PluginKind::Policy, &trap, None), &trap, None, true).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, answer) = k.call("POST", "/api/v1/plugins/gate/invoke", Some(admin_request("acme", "acme"))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["output"]["decision"]["allow"], false, "a trapping policy denies: {answer}");
    assert_eq!(answer["failure"]["reason"], "trap");

    let spin = wasm("loop_forever");
    let m = manifest("rank", "1.0.0", PluginKind::Scorer, &spin, None);
    let (status, body) = upload(&k, &m, &spin, None, true).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let candidate = |index: u32, health: f32, in_flight: u32| {
        json!({ "index": index, "health": health, "in_flight": in_flight, "cpu_ratio": 0.1, "latency_ms": 5.0,
                "error_rate": 0.0, "silence_ms": 100, "version": [1, 0, 0] })
    };
    let call = json!({ "score": { "task": { "capabilities": ["gpu"] },
        "candidates": [candidate(0, 1.0, 3), candidate(1, 0.5, 0)] } });
    let (status, answer) = k.call("POST", "/api/v1/plugins/rank/invoke", Some(call)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["failure"]["reason"], "timeout", "{answer}");
    assert_eq!(answer["output"]["scores"], json!([0.25, 0.5]), "built-in scoring: health / (1 + in flight)");

    let (status, answer) = k.call("POST", "/api/v1/plugins/gate/invoke", Some(json!({"describe": null}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "a call of the wrong kind: {answer}");

    let (_, metrics) = k.send_text(k.request("GET", "/metrics", None)).await;
    for line in [
        r#"nops_plugin_calls_total{outcome="trap",plugin="default/gate",version="1.0.0"} 1"#,
        r#"nops_plugin_calls_total{outcome="timeout",plugin="default/rank",version="1.0.0"} 1"#,
        r#"nops_plugin_fallbacks_total{kind="policy",plugin="default/gate"} 1"#,
        r#"nops_plugin_fallbacks_total{kind="scorer",plugin="default/rank"} 1"#,
    ] {
        assert!(metrics.contains(line), "missing {line}");
    }
    // The kernel kept serving.
    let (status, _) = k.call("GET", "/api/v1/agents", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_versions_under_load_fails_no_request() {
    const SWAPS: usize = 100;
    const CLIENTS: usize = 8;
    // The clients share the swapper's key: rate limits would refuse the swaps, not the test's
    // subject, on a fast machine.
    let db = TestDb::new(Backend::Sqlite).await;
    let k = Arc::new(TestKernel::start_with(Backend::Sqlite, db, |a| a.rate_limits_enabled = Some(false)).await);
    let policy = policy_document("tenant-isolation.json");
    upload_abac(&k, "1.0.0", &policy, true).await;
    upload_abac(&k, "1.0.1", &policy, false).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (k, stop, ok, failed) = (k.clone(), stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let request = admin_request("acme", "acme");
            while !stop.load(Ordering::Relaxed) {
                let (status, answer) = k.call("POST", "/api/v1/plugins/abac/invoke", Some(request.clone())).await;
                if status == StatusCode::OK
                    && answer["output"]["decision"]["allow"] == true
                    && answer["failure"].is_null()
                {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                // A warm call can complete without ever waiting; let the swapper run.
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut swap_ms = Vec::with_capacity(SWAPS);
    for i in 0..SWAPS {
        let version = if i % 2 == 0 { "1.0.1" } else { "1.0.0" };
        let started = Instant::now();
        let (status, body) = k.call("POST", "/api/v1/plugins/abac/activate", Some(json!({"version": version}))).await;
        swap_ms.push(started.elapsed().as_secs_f64() * 1e3);
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }
    swap_ms.sort_by(f64::total_cmp);
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "hot swap: {SWAPS} swaps under {CLIENTS} clients, {ok} calls ok, {failed} failed; swap p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        swap_ms[SWAPS / 2],
        swap_ms[SWAPS * 99 / 100],
        swap_ms[SWAPS - 1]
    );
    assert_eq!(failed, 0, "no request failed during {SWAPS} swaps");
    assert!(ok > SWAPS as u64, "the load ran throughout: {ok} calls");
    let (_, chain) = k.call("GET", "/api/v1/plugins/abac/chain", None).await;
    assert_eq!(chain_of(&chain).len(), 2 + 1 + SWAPS, "every swap is in the chain");
}

#[tokio::test]
async fn an_activation_on_one_replica_becomes_active_on_the_other() {
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    let a = TestKernel::start(Backend::Postgres).await;
    let mut args = test_args(&a.db.url);
    let dir = tempfile::tempdir().expect("dir");
    args.data_dir = Some(dir.path().to_path_buf());
    let b =
        Kernel::open(&Config::resolve(&args).expect("config"), Arc::new(ManualClock::new(0))).await.expect("replica");
    let sync = tokio::spawn(b.plugins.clone().run_sync());
    let tenant = nops_core::tenant::TenantId::default_tenant();

    upload_abac(&a, "1.0.0", &policy_document("tenant-isolation.json"), false).await;
    assert!(b.plugins.active(&tenant, "abac").is_none());
    for version in ["1.0.0", "2.0.0"] {
        if version == "2.0.0" {
            upload_abac(&a, version, DENY_ALL, false).await;
        }
        let started = Instant::now();
        let (status, body) = a.call("POST", "/api/v1/plugins/abac/activate", Some(json!({ "version": version }))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        loop {
            if b.plugins.active(&tenant, "abac").is_some_and(|active| active.current.version.to_string() == version) {
                break;
            }
            // A liveness bound, not a speed claim (the replica polls every 250 ms; the figure is
            // printed below and recorded in docs/benchmarks.md): generous, so a loaded machine
            // compiling the version on the replica does not fail the test.
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "version {version} not active on the replica within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("replica: {version} active on the other kernel after {:?}", started.elapsed());
    }
    sync.abort();
}
