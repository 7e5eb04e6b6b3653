//! Routing: candidates filtered by capability, version, labels, freshness and circuit breaker,
//! ranked by the scorer plugin (or the built-in power of two choices when it fails), the
//! health view, tenant isolation and bad input.

use std::time::Duration;

use axum::body::Body;
use http::{Request, StatusCode};
use nops_core::clock::Clock;
use nops_core::plugin::PluginKind;
use nops_core::routing::{AttemptOutcome, CapabilityRequirement, Placement, RouteRequest};
use nops_core::tenant::TenantId;
use serde_json::{Value, json};

use crate::plugin_api::{manifest, upload, wasm};
use crate::support::{TestKernel, as_key};

/// Sends `method path` with the bootstrap key, acting in `tenant`.
async fn in_tenant(k: &TestKernel, tenant: &str, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    as_key(k, &k.key, Some(tenant), method, path, body).await
}

/// Registers an agent with `capabilities` (name, version) and `labels`; returns its id.
async fn agent(k: &TestKernel, tenant: &str, name: &str, capabilities: &[(&str, &str)], labels: Value) -> String {
    let capabilities: Vec<Value> =
        capabilities.iter().map(|(n, v)| json!({"name": n, "version": v, "params": {}})).collect();
    let (status, body) = in_tenant(
        k,
        tenant,
        "POST",
        "/api/v1/agents",
        Some(json!({"name": name, "capabilities": capabilities, "labels": labels})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{:?}: {body}", k.backend);
    body["id"].as_str().expect("id").to_string()
}

async fn heartbeat(k: &TestKernel, tenant: &str, id: &str, load: Value) {
    let (status, body) = in_tenant(k, tenant, "POST", &format!("/api/v1/agents/{id}/heartbeat"), Some(load)).await;
    assert_eq!(status, StatusCode::OK, "{:?}: {body}", k.backend);
}

async fn route(k: &TestKernel, tenant: &str, request: Value) -> Value {
    let (status, body) = in_tenant(k, tenant, "POST", "/api/v1/route", Some(request)).await;
    assert_eq!(status, StatusCode::OK, "{:?}: {body}", k.backend);
    body
}

fn chosen_ids(decision: &Value) -> Vec<String> {
    decision["chosen"].as_array().expect("chosen").iter().map(|a| a["id"].as_str().expect("id").to_string()).collect()
}

fn request(capability: &str, version: &str) -> RouteRequest {
    RouteRequest {
        capabilities: vec![CapabilityRequirement { name: capability.into(), version: version.parse().expect("req") }],
        ..RouteRequest::default()
    }
}

async fn metrics(k: &TestKernel) -> String {
    let request = Request::builder().uri("/metrics").body(Body::empty()).expect("request");
    k.send_text(request).await.1
}

#[tokio::test]
async fn routes_by_capability_version_and_labels() {
    for k in TestKernel::all().await {
        let v1 = agent(&k, "default", "llm-v1", &[("inference.llm", "1.2.0")], json!({"zone": "eu-1"})).await;
        let v2 = agent(&k, "default", "llm-v2", &[("inference.llm", "2.0.0")], json!({"zone": "us-1"})).await;
        let both =
            agent(&k, "default", "both", &[("inference.llm", "1.4.0"), ("embed.text", "1.0.0")], json!({})).await;

        let d = route(&k, "default", json!({"capabilities": [{"name": "inference.llm", "version": "^1"}], "count": 5}))
            .await;
        let mut ids = chosen_ids(&d);
        ids.sort();
        let mut expected = vec![v1.clone(), both.clone()];
        expected.sort();
        assert_eq!(ids, expected, "{:?}: {d}", k.backend);
        assert_eq!(d["matched"], 2);
        assert_eq!(d["scorer"], "builtin:p2c", "no scorer is active");
        assert_eq!(d["fallback"], true);
        let versions: Vec<&str> =
            d["chosen"].as_array().expect("chosen").iter().map(|a| a["version"].as_str().expect("v")).collect();
        assert!(versions.iter().all(|v| v.starts_with("1.")), "{versions:?}");

        let d = route(&k, "default", json!({"capabilities": [{"name": "inference.llm"}], "labels": {"zone": "us-1"}}))
            .await;
        assert_eq!(chosen_ids(&d), vec![v2.clone()], "{d}");

        let d = route(
            &k,
            "default",
            json!({"capabilities": [{"name": "inference.llm", "version": ">=1.3"}, {"name": "embed.text"}]}),
        )
        .await;
        assert_eq!(chosen_ids(&d), vec![both.clone()], "every requirement must hold: {d}");

        let d = route(&k, "default", json!({"capabilities": [{"name": "inference.llm", "version": "^3"}]})).await;
        assert!(chosen_ids(&d).is_empty());
        assert_eq!(d["matched"], 0);

        // An update re-indexes the agent; a deletion removes it.
        let (status, _) = k
            .call(
                "PATCH",
                &format!("/api/v1/agents/{v2}"),
                Some(json!({"capabilities": [{"name": "inference.llm", "version": "1.9.0", "params": {}}]})),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = k.call("DELETE", &format!("/api/v1/agents/{v1}"), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let d = route(&k, "default", json!({"capabilities": [{"name": "inference.llm", "version": "^1"}], "count": 5}))
            .await;
        let mut ids = chosen_ids(&d);
        ids.sort();
        let mut expected = vec![v2.clone(), both.clone()];
        expected.sort();
        assert_eq!(ids, expected, "{d}");
    }
}

#[tokio::test]
async fn stale_agents_are_not_routed_to() {
    for k in TestKernel::all().await {
        let quiet = agent(&k, "default", "quiet", &[("inference.llm", "1.0.0")], json!({})).await;
        let chatty = agent(&k, "default", "chatty", &[("inference.llm", "1.0.0")], json!({})).await;
        k.clock.advance_ms(8_000);
        heartbeat(&k, "default", &chatty, json!({})).await;
        k.clock.advance_ms(4_000); // quiet: 12 s silent (stale at 10 s); chatty: 4 s.
        let d = route(&k, "default", json!({"capabilities": [{"name": "inference.llm"}], "count": 2})).await;
        assert_eq!(chosen_ids(&d), vec![chatty.clone()], "{:?}: {d}", k.backend);
        assert_eq!(d["matched"], 2);
        assert_eq!(d["excluded"], 1);
        assert!(d["explanation"].as_str().expect("text").contains("1 stale"), "{d}");
        let (_, view) = k.call("GET", &format!("/api/v1/agents/{quiet}/health"), None).await;
        assert_eq!(view["stale"], true, "{view}");
        assert_eq!(view["routable"], false);
        // A heartbeat brings it back.
        heartbeat(&k, "default", &quiet, json!({})).await;
        let d = route(&k, "default", json!({"capabilities": [{"name": "inference.llm"}], "count": 2})).await;
        assert_eq!(chosen_ids(&d).len(), 2, "{d}");
        // Removed by the TTL lifecycle: gone from the index and the health table.
        k.clock.advance_ms(61_000);
        k.kernel.registry.sweep().await.expect("sweep");
        let d = route(&k, "default", json!({"capabilities": [{"name": "inference.llm"}], "count": 2})).await;
        assert!(chosen_ids(&d).is_empty(), "{d}");
        assert_eq!(d["matched"], 0);
        let (status, _) = k.call("GET", &format!("/api/v1/agents/{quiet}/health"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(k.kernel.routing.health_table().len(), 0);
    }
}

async fn upload_scorer(k: &TestKernel, file: &str) {
    let component = wasm(file);
    let m = manifest("scorer", "1.0.0", PluginKind::Scorer, &component, None);
    let (status, body) = upload(k, &m, &component, None, true).await;
    assert_eq!(status, StatusCode::CREATED, "{:?}: {body}", k.backend);
}

#[tokio::test]
async fn the_scorer_plugin_decides_the_order() {
    for k in TestKernel::all().await {
        upload_scorer(&k, "scorer_weighted").await;
        let slow = agent(&k, "default", "slow", &[("inference.llm", "1.0.0")], json!({})).await;
        let fast = agent(&k, "default", "fast", &[("inference.llm", "1.0.0")], json!({})).await;
        let busy = agent(&k, "default", "busy", &[("inference.llm", "1.0.0")], json!({})).await;
        heartbeat(&k, "default", &slow, json!({"latency_ms": 2000.0, "in_flight_tasks": 2})).await;
        heartbeat(&k, "default", &fast, json!({"latency_ms": 5.0})).await;
        heartbeat(&k, "default", &busy, json!({"latency_ms": 5.0, "in_flight_tasks": 40})).await;
        for _ in 0..5 {
            let d = route(&k, "default", json!({"capabilities": [{"name": "inference.llm"}], "count": 3})).await;
            assert_eq!(chosen_ids(&d), vec![fast.clone(), busy.clone(), slow.clone()], "{:?}: {d}", k.backend);
            assert_eq!(d["scorer"], "plugin:default/scorer@1.0.0");
            assert_eq!(d["fallback"], false);
            let scores: Vec<f64> =
                d["chosen"].as_array().expect("chosen").iter().map(|a| a["score"].as_f64().expect("score")).collect();
            assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first: {scores:?}");
        }
        // Another tenant without its own scorer uses the default tenant's.
        let other = agent(&k, "acme", "acme-llm", &[("inference.llm", "1.0.0")], json!({})).await;
        let d = route(&k, "acme", json!({"capabilities": [{"name": "inference.llm"}]})).await;
        assert_eq!(chosen_ids(&d), vec![other]);
        assert_eq!(d["scorer"], "plugin:default/scorer@1.0.0");
        assert!(metrics(&k).await.contains("nops_route_decisions_total{source=\"plugin\"} 6"));
    }
}

#[tokio::test]
async fn a_trapping_scorer_falls_back_to_two_choices_and_is_counted() {
    for k in TestKernel::all().await {
        upload_scorer(&k, "trap").await;
        let a = agent(&k, "default", "a", &[("inference.llm", "1.0.0")], json!({})).await;
        let b = agent(&k, "default", "b", &[("inference.llm", "1.0.0")], json!({})).await;
        for _ in 0..3 {
            let d = route(&k, "default", json!({"capabilities": [{"name": "inference.llm"}], "count": 2})).await;
            let mut ids = chosen_ids(&d);
            ids.sort();
            let mut expected = vec![a.clone(), b.clone()];
            expected.sort();
            assert_eq!(ids, expected, "{:?}: {d}", k.backend);
            assert_eq!(d["scorer"], "builtin:p2c");
            assert_eq!(d["fallback"], true);
            assert!(d["explanation"].as_str().expect("text").contains("scorer unavailable"), "{d}");
        }
        let text = metrics(&k).await;
        assert!(text.contains("nops_route_fallbacks_total{reason=\"trap\"} 3"), "{text}");
        assert!(text.contains("nops_route_decisions_total{source=\"builtin\"} 3"));
    }
}

#[tokio::test]
async fn a_failing_agent_trips_its_breaker_which_half_opens_and_closes() {
    for k in TestKernel::all().await {
        let bad = agent(&k, "default", "bad", &[("inference.llm", "1.0.0")], json!({})).await;
        let good = agent(&k, "default", "good", &[("inference.llm", "1.0.0")], json!({})).await;
        let bad_id = bad.parse().expect("id");
        let routing = &k.kernel.routing;
        let tenant = TenantId::default_tenant();
        let ms = Duration::from_millis(20);
        for outcome in
            [AttemptOutcome::Failure, AttemptOutcome::Timeout, AttemptOutcome::Failure, AttemptOutcome::Failure]
        {
            routing.attempt_started(bad_id);
            routing.attempt_finished(bad_id, ms, outcome);
        }
        let (_, view) = k.call("GET", &format!("/api/v1/agents/{bad}/health"), None).await;
        assert_eq!(view["breaker"]["state"], "closed", "4 failures in a row: not yet ({view})");
        assert_eq!(view["breaker"]["consecutive_failures"], 4);
        routing.attempt_finished(bad_id, ms, AttemptOutcome::Failure);
        let (_, view) = k.call("GET", &format!("/api/v1/agents/{bad}/health"), None).await;
        assert_eq!(view["breaker"]["state"], "open", "{:?}: {view}", k.backend);
        assert_eq!(view["routable"], false);

        // Open: never chosen.
        for _ in 0..10 {
            let d = route(&k, "default", json!({"capabilities": [{"name": "inference.llm"}], "count": 2})).await;
            assert_eq!(chosen_ids(&d), vec![good.clone()], "{d}");
            assert!(d["explanation"].as_str().expect("text").contains("1 breaker open"), "{d}");
        }
        let none_tried = |_| false;
        let skip_good = |id: nops_core::agent::AgentId| id.to_string() == good;
        assert!(routing.place(&tenant, &request("inference.llm", "*"), &skip_good).await.expect("place").is_none());

        // After open_ms (5 s): half-open, one probe at a time.
        k.clock.advance_ms(5_000);
        let (_, view) = k.call("GET", &format!("/api/v1/agents/{bad}/health"), None).await;
        assert_eq!(view["breaker"]["state"], "half_open", "{view}");
        let probe = routing.place(&tenant, &request("inference.llm", "*"), &skip_good).await.expect("place");
        assert_eq!(probe.map(|a| a.id), Some(bad_id));
        assert!(
            routing.place(&tenant, &request("inference.llm", "*"), &skip_good).await.expect("place").is_none(),
            "one probe at a time"
        );
        // The probe fails: open again, for twice as long.
        routing.attempt_finished(bad_id, ms, AttemptOutcome::Timeout);
        let (_, view) = k.call("GET", &format!("/api/v1/agents/{bad}/health"), None).await;
        assert_eq!(view["breaker"]["state"], "open");
        assert_eq!(view["breaker"]["open_until_ms"], json!(k.clock.now_ms() + 10_000));
        k.clock.advance_ms(10_000);
        // Both stay fresh (the stale threshold is 10 s).
        heartbeat(&k, "default", &bad, json!({})).await;
        heartbeat(&k, "default", &good, json!({})).await;
        let probe = routing.place(&tenant, &request("inference.llm", "*"), &skip_good).await.expect("place");
        assert_eq!(probe.map(|a| a.id), Some(bad_id));
        routing.attempt_finished(bad_id, ms, AttemptOutcome::Success);
        let (_, view) = k.call("GET", &format!("/api/v1/agents/{bad}/health"), None).await;
        assert_eq!(view["breaker"]["state"], "closed", "{view}");
        assert!(routing.place(&tenant, &request("inference.llm", "*"), &none_tried).await.expect("place").is_some());

        let text = metrics(&k).await;
        assert!(text.contains("nops_circuit_breaker_transitions_total{to=\"open\"} 2"), "{text}");
        assert!(text.contains("nops_circuit_breaker_transitions_total{to=\"closed\"} 1"), "{text}");
        assert!(text.contains("nops_circuit_breaker_state{state=\"closed\"} 2"), "{text}");
    }
}

#[tokio::test]
async fn the_health_view_shows_scores_weights_and_load() {
    for k in TestKernel::all().await {
        let id = agent(&k, "default", "a", &[("inference.llm", "1.0.0")], json!({})).await;
        heartbeat(
            &k,
            "default",
            &id,
            json!({"latency_ms": 250.0, "in_flight_tasks": 3, "cpu_ratio": 0.5, "request_count": 0, "error_count": 0}),
        )
        .await;
        k.clock.advance_ms(1_000);
        heartbeat(&k, "default", &id, json!({"latency_ms": 250.0, "in_flight_tasks": 3, "cpu_ratio": 0.5, "request_count": 100, "error_count": 10})).await;
        let (status, view) = k.call("GET", &format!("/api/v1/agents/{id}/health"), None).await;
        assert_eq!(status, StatusCode::OK, "{view}");
        assert_eq!(view["agent_id"], id.as_str());
        assert_eq!(view["latency_ms"], 250.0);
        assert_eq!(view["in_flight"], 3);
        assert_eq!(view["cpu_ratio"], 0.5);
        assert!((view["error_rate"].as_f64().expect("rate") - 0.1).abs() < 1e-9, "{view}");
        let health = view["health"].as_f64().expect("health");
        assert!(health > 0.0 && health < 1.0, "{view}");
        assert!(view["weight"].as_f64().expect("weight") > 0.0);
        assert_eq!(view["silence_ms"], 0);
        assert_eq!(view["routable"], true);
        assert_eq!(view["breaker"]["state"], "closed");
        assert!(metrics(&k).await.contains(&format!("nops_agent_health{{agent=\"{id}\"}}")));

        let (status, body) = k.call("GET", &format!("/api/v1/agents/{}/health", uuid::Uuid::now_v7()), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        let (status, body) = k.call("GET", "/api/v1/agents/not-a-uuid/health", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }
}

#[tokio::test]
async fn a_tenant_never_routes_to_another_tenants_agents() {
    for k in TestKernel::all().await {
        let ours = agent(&k, "acme", "ours", &[("inference.llm", "1.0.0")], json!({})).await;
        let theirs = agent(&k, "globex", "theirs", &[("inference.llm", "1.0.0")], json!({})).await;
        for _ in 0..10 {
            let d = route(&k, "acme", json!({"capabilities": [{"name": "inference.llm"}], "count": 5})).await;
            assert_eq!(chosen_ids(&d), vec![ours.clone()], "{:?}: {d}", k.backend);
        }
        let d = route(&k, "default", json!({"capabilities": [{"name": "inference.llm"}]})).await;
        assert!(chosen_ids(&d).is_empty(), "{d}");
        let (status, _) = in_tenant(&k, "acme", "GET", &format!("/api/v1/agents/{theirs}/health"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let placed = k
            .kernel
            .routing
            .place(&"acme".parse().expect("tenant"), &request("inference.llm", "*"), &|_| false)
            .await
            .expect("place");
        assert_eq!(placed.map(|a| a.id.to_string()), Some(ours));
    }
}

#[tokio::test]
async fn bad_route_requests_are_refused_with_json_errors() {
    for k in TestKernel::all().await {
        agent(&k, "default", "a", &[("inference.llm", "1.0.0")], json!({})).await;
        let cases = [
            (json!({"capabilities": []}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_route"),
            (
                json!({"capabilities": [{"name": "inference.llm"}], "count": 0}),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_route",
            ),
            (
                json!({"capabilities": [{"name": "inference.llm"}], "count": 17}),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_route",
            ),
            (
                json!({"capabilities": [{"name": "inference.llm", "version": "^^1"}]}),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
            ),
            (
                json!({"capabilities": [{"name": "inference.llm"}], "colour": "red"}),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
            ),
            (
                json!({"capabilities": [{"name": "inference.llm", "extra": 1}]}),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
            ),
            (json!({"capabilities": [{"name": "Not A Name"}]}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_capability"),
            (json!({}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        ];
        for (body, status, code) in cases {
            let (got, error) = k.call("POST", "/api/v1/route", Some(body.clone())).await;
            assert_eq!(got, status, "{:?}: {body} → {error}", k.backend);
            assert_eq!(error["error"]["code"], code, "{body} → {error}");
        }
        let request = Request::builder()
            .method("POST")
            .uri("/api/v1/route")
            .header("authorization", format!("Bearer {}", k.key))
            .header("content-type", "application/json")
            .body(Body::from("{not json"))
            .expect("request");
        let (status, _, error) = k.send(request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
        // Nothing changed: the agent is still there and routable.
        let d = route(&k, "default", json!({"capabilities": [{"name": "inference.llm"}]})).await;
        assert_eq!(chosen_ids(&d).len(), 1);
    }
}

#[test]
fn invalid_routing_settings_stop_the_kernel_at_start() {
    let dir = tempfile::tempdir().expect("dir");
    let cases = [
        "[routing.breaker]\nfailure_ratio_max = 1.5\n",
        "[routing.breaker]\nopen_ms = 10000\nopen_ms_max = 5000\n",
        "[routing]\ncount_max = 0\n",
        "[routing]\ncandidates_max = 100\nscan_max = 10\n",
        "[routing.health]\nlatency_tau_ms = 0\n",
        "[routing.health]\nbogus = 1\n",
    ];
    for text in cases {
        let path = dir.path().join("nops.toml");
        std::fs::write(&path, text).expect("write");
        let args = nops::config::ServeArgs { config: Some(path), ..nops::config::ServeArgs::default() };
        let err = nops::config::Config::resolve(&args).expect_err(text);
        assert!(format!("{err:#}").contains("routing") || format!("{err:#}").contains("bogus"), "{text}: {err:#}");
    }
    let path = dir.path().join("nops.toml");
    std::fs::write(&path, "[routing]\nscorer = \"ranker\"\n[routing.breaker]\nopen_ms = 1000\n").expect("write");
    let args = nops::config::ServeArgs { config: Some(path), ..nops::config::ServeArgs::default() };
    let config = nops::config::Config::resolve(&args).expect("config");
    assert_eq!(config.routing.routing.scorer, "ranker");
    assert_eq!(config.routing.health.breaker.open_ms, 1000);
    assert_eq!(config.routing.health.stale_after_ms, config.registry.ttl.stale_after_ms);
}

/// Routing decides once per profile (labels and capabilities) of agents: many profiles, more
/// than it remembers, and many agents of one profile, still filter exactly.
#[tokio::test]
async fn filters_hold_across_many_agent_profiles() {
    for k in TestKernel::all().await {
        let mut expected = Vec::new();
        for shard in 0..20 {
            let labels = json!({"shard": shard.to_string()});
            let id = agent(&k, "default", &format!("shard-{shard}"), &[("fleet.sum", "1.0.0")], labels).await;
            if shard == 7 {
                expected.push(id);
            }
        }
        for copy in 0..5 {
            let id = agent(&k, "default", &format!("shard-7-{copy}"), &[("fleet.sum", "1.0.0")], json!({"shard": "7"}))
                .await;
            expected.push(id);
        }
        let other = agent(&k, "default", "shard-7-v2", &[("fleet.sum", "2.0.0")], json!({"shard": "7"})).await;

        let d = route(
            &k,
            "default",
            json!({"capabilities": [{"name": "fleet.sum", "version": "^1"}], "labels": {"shard": "7"}, "count": 16}),
        )
        .await;
        let mut ids = chosen_ids(&d);
        ids.sort();
        expected.sort();
        assert_eq!(ids, expected, "{:?}: {d}", k.backend);
        assert_eq!(d["matched"], 6, "{d}");
        assert!(!ids.contains(&other), "version 2 is not accepted by ^1");
    }
}

/// Two kernels on one database (replicas): agents registered, changed and deleted through one
/// are routed accordingly by the other once it has followed the store's agent changes, without
/// a heartbeat reaching it and without a restart.
#[tokio::test]
async fn a_replica_routes_by_the_agent_changes_made_through_another() {
    for a in TestKernel::all().await {
        let b = crate::support::replica(&a).await;
        let tenant = TenantId::default_tenant();
        let gpu = || RouteRequest {
            capabilities: vec![CapabilityRequirement {
                name: "gpu.render".into(),
                version: "^2".parse().expect("req"),
            }],
            ..RouteRequest::default()
        };
        let chosen =
            |d: nops_core::routing::RouteDecision| d.chosen.iter().map(|c| c.id.to_string()).collect::<Vec<_>>();

        // Registered through A after B loaded: B routes to it after one follow step.
        let id = agent(&a, "default", "render-1", &[("gpu.render", "2.1.0")], json!({"zone": "eu-1"})).await;
        heartbeat(&a, "default", &id, json!({})).await;
        let none: [String; 0] = [];
        assert_eq!(
            chosen(b.routing.route(&tenant, &gpu()).await.expect("route")),
            none,
            "{:?}: not followed yet",
            a.backend
        );
        assert_eq!(b.registry.follow_changes().await.expect("follow"), 1);
        assert_eq!(chosen(b.routing.route(&tenant, &gpu()).await.expect("route")), vec![id.clone()], "{:?}", a.backend);

        // Its capability downgraded through A: B no longer routes `^2` to it.
        let (status, body) = in_tenant(
            &a,
            "default",
            "PATCH",
            &format!("/api/v1/agents/{id}"),
            Some(json!({"capabilities": [{"name": "gpu.render", "version": "1.9.0", "params": {}}]})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{:?}: {body}", a.backend);
        b.registry.follow_changes().await.expect("follow");
        assert_eq!(
            chosen(b.routing.route(&tenant, &gpu()).await.expect("route")),
            none,
            "{:?}: the update is followed",
            a.backend
        );

        // Deleted through A: B forgets it.
        let (status, body) = in_tenant(&a, "default", "DELETE", &format!("/api/v1/agents/{id}"), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{:?}: {body}", a.backend);
        b.registry.follow_changes().await.expect("follow");
        assert!(b.registry.indexed(&tenant, id.parse().expect("agent id")).is_none(), "{:?}", a.backend);
        assert_eq!(b.registry.indexed_len(), 0, "{:?}", a.backend);

        // Recent events are read again (one could commit out of order); once settled, a step
        // moves past them, status changes included, and has nothing left to look up.
        assert_eq!(b.registry.follow_changes().await.expect("follow"), 1, "{:?}: still settling", a.backend);
        a.clock.advance_ms(nops_core::registry::FOLLOW_SETTLE_MS + 1);
        b.registry.follow_changes().await.expect("follow");
        assert_eq!(b.registry.follow_changes().await.expect("follow"), 0, "{:?}: settled", a.backend);
    }
}
