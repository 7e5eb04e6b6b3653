//! The event bus over HTTP: publish with deduplication, consumer groups (fetch, stream, ack,
//! nack, redelivery), the dead-letter queue, replay and what-if, the transactional outbox
//! (including a kernel killed between publish and mark), roles and tenants; on the embedded
//! bus (SQLite and PostgreSQL) and on NATS JetStream.

use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use nops_core::plugin::PluginKind;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::plugin_api::{DENY_ALL, admin_request, policy_document, upload_abac};
use crate::support::{Backend, TestDb, TestKernel, as_key, nats_url};

/// A kernel on SQLite whose bus is NATS JetStream (streams under a prefix of its own).
async fn nats_kernel(url: &str) -> TestKernel {
    let prefix = format!("T{}", uuid::Uuid::now_v7().simple().to_string().to_uppercase()[20..].to_owned());
    let db = TestDb::new(Backend::Sqlite).await;
    let url = url.to_string();
    TestKernel::start_with(Backend::Sqlite, db, move |args| {
        args.nats_url = Some(url);
        args.nats_prefix = Some(prefix);
    })
    .await
}

/// Every kernel the bus tests run on: embedded on SQLite and PostgreSQL, and NATS.
async fn bus_kernels() -> Vec<(String, TestKernel)> {
    let mut kernels = Vec::new();
    for k in TestKernel::all().await {
        kernels.push((format!("embedded/{:?}", k.backend), k));
    }
    if let Some(url) = nats_url() {
        kernels.push(("nats".to_string(), nats_kernel(&url).await));
    }
    kernels
}

async fn publish(k: &TestKernel, events: Value) -> (StatusCode, Value) {
    k.call("POST", "/api/v1/events", Some(json!({ "events": events }))).await
}

async fn fetch(k: &TestKernel, group: &str, max: u32, wait_ms: u64) -> Vec<Value> {
    let (status, body) = k
        .call("POST", &format!("/api/v1/consumers/{group}/fetch"), Some(json!({"max": max, "wait_ms": wait_ms})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["deliveries"].as_array().expect("deliveries").clone()
}

async fn ack(k: &TestKernel, group: &str, token: &Value, kind: &str, delay_ms: u64) -> String {
    let body = json!({"acks": [{"token": token, "kind": kind, "delay_ms": delay_ms}]});
    let (status, body) = k.call("POST", &format!("/api/v1/consumers/{group}/ack"), Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["results"][0]["status"].as_str().expect("status").to_string()
}

async fn put_group(k: &TestKernel, group: &str, spec: Value) -> (StatusCode, Value) {
    k.call("PUT", &format!("/api/v1/consumers/{group}"), Some(spec)).await
}

fn ids(deliveries: &[Value]) -> Vec<&str> {
    deliveries.iter().map(|d| d["event"]["id"].as_str().expect("id")).collect()
}

#[tokio::test]
async fn events_are_published_once_per_id_and_read_back_in_order() {
    for (name, k) in bus_kernels().await {
        let batch = json!([
            {"id": "o-1", "subject": "orders.created", "payload": {"order": 1, "by": "web"}},
            {"id": "o-2", "subject": "orders.paid", "payload": {"order": 1, "amount": 12.5}},
            {"id": "o-1", "subject": "orders.created", "payload": {"order": 1}},
        ]);
        let (status, body) = publish(&k, batch).await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        assert_eq!((body["accepted"].as_u64(), body["duplicates"].as_u64()), (Some(2), Some(1)), "{name}: {body}");
        let statuses: Vec<&str> =
            body["results"].as_array().expect("results").iter().map(|r| r["status"].as_str().expect("s")).collect();
        assert_eq!(statuses, ["accepted", "accepted", "duplicate"], "{name}");
        assert_eq!(body["results"][2]["seq"], body["results"][0]["seq"], "{name}: a duplicate names the original");

        // A retry of the whole batch stores nothing new.
        let (status, body) = publish(&k, json!([{"id": "o-2", "subject": "orders.paid", "payload": {}}])).await;
        assert_eq!((status, body["duplicates"].as_u64()), (StatusCode::OK, Some(1)), "{name}: {body}");

        // Payloads come back byte for byte (key order, spacing) as they were sent.
        let raw = r#"{"events": [{"id": "raw-1", "subject": "raw.x", "payload": {"z": 1,  "a": [2, 1]}}]}"#;
        let request = http::Request::builder()
            .method("POST")
            .uri("/api/v1/events")
            .header("authorization", format!("Bearer {}", k.key))
            .header("content-type", "application/json")
            .body(axum::body::Body::from(raw))
            .expect("request");
        assert_eq!(k.send(request).await.0, StatusCode::OK, "{name}");
        let (_, text) = k.send_text(k.request("GET", "/api/v1/events?filter=raw.x", None)).await;
        assert!(text.contains(r#""payload":{"z": 1,  "a": [2, 1]}"#), "{name}: {text}");

        let (status, page) = k.call("GET", "/api/v1/events?filter=orders.%3E", None).await;
        assert_eq!(status, StatusCode::OK, "{name}: {page}");
        let items = page["items"].as_array().expect("items");
        assert_eq!(items.len(), 2, "{name}: {page}");
        assert_eq!((items[0]["id"].as_str(), items[1]["id"].as_str()), (Some("o-1"), Some("o-2")), "{name}");
        assert_eq!(items[1]["payload"], json!({"order": 1, "amount": 12.5}), "{name}");
        assert!(items[0]["source"].as_str().expect("source").starts_with("api/"), "{name}: {page}");
        let (_, page) = k.call("GET", "/api/v1/events?filter=orders.paid", None).await;
        assert_eq!(page["items"].as_array().map(Vec::len), Some(1), "{name}: the filter narrows the read");
    }
}

#[tokio::test]
async fn a_bad_event_refuses_the_whole_batch_and_stores_nothing() {
    for (name, k) in bus_kernels().await {
        let good = json!({"id": "ok-1", "subject": "a.b", "payload": {}});
        let too_big = "x".repeat(nops_core::bus::PAYLOAD_BYTES_MAX + 1);
        let many: Vec<Value> = (0..=nops_core::bus::BATCH_EVENTS_MAX)
            .map(|i| json!({"id": format!("e{i}"), "subject": "a", "payload": 1}))
            .collect();
        for (bad, code) in [
            (json!([good, {"id": "x", "subject": "a..b", "payload": {}}]), "invalid_subject"),
            (json!([good, {"id": "x", "subject": "a.*", "payload": {}}]), "invalid_subject"),
            (json!([good, {"id": "has space", "subject": "a", "payload": {}}]), "invalid_event_id"),
            (json!([good, {"id": "", "subject": "a", "payload": {}}]), "invalid_event_id"),
            (json!([good, {"id": "big", "subject": "a", "payload": too_big}]), "payload_too_large"),
            (json!([]), "invalid_batch"),
            (json!(many), "invalid_batch"),
        ] {
            let (status, body) = publish(&k, bad).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {body}");
            assert_eq!(body["error"]["code"], code, "{name}: {body}");
        }
        let (status, body) = publish(&k, json!([{"id": "x", "subject": "a", "payload": {}, "extra": 1}])).await;
        assert!(status.is_client_error(), "{name}: unknown fields are refused: {body}");
        let (status, body) = k.call("POST", "/api/v1/events", Some(json!({"events": "nope"}))).await;
        assert!(status.is_client_error(), "{name}: {body}");
        let (_, page) = k.call("GET", "/api/v1/events", None).await;
        assert_eq!(page["items"], json!([]), "{name}: nothing was stored");
        for query in ["limit=0", "limit=5000", "from_seq=9&to_seq=2", "filter=a..b", "nope=1"] {
            let (status, body) = k.call("GET", &format!("/api/v1/events?{query}"), None).await;
            assert!(status.is_client_error(), "{name}: {query}: {body}");
        }
    }
}

#[tokio::test]
async fn a_consumer_group_fetches_acks_redelivers_and_dead_letters() {
    for (name, k) in bus_kernels().await {
        let spec = json!({"filter": "jobs.>", "deliveries_max": 2, "ack_wait_ms": 60000, "start": {"from": "all"}});
        let (status, group) = put_group(&k, "workers", spec.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "{name}: {group}");
        assert_eq!((group["filter"].as_str(), group["deliveries_max"].as_u64()), (Some("jobs.>"), Some(2)));
        let (status, _) = put_group(&k, "workers", json!({"filter": "jobs.>", "ack_wait_ms": 30000})).await;
        assert_eq!(status, StatusCode::OK, "{name}: an update");
        let (status, body) = put_group(&k, "workers", json!({"filter": "other.>"})).await;
        assert_eq!(status, StatusCode::CONFLICT, "{name}: the filter is fixed: {body}");
        let (status, body) = put_group(&k, "bad%20name", json!({"filter": "jobs.>"})).await;
        assert!(status.is_client_error(), "{name}: {body}");
        let (status, body) = put_group(&k, "w2", json!({"filter": "jobs.>", "deliveries_max": 0})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {body}");

        let events: Vec<Value> =
            (1..=3).map(|i| json!({"id": format!("j{i}"), "subject": "jobs.run", "payload": {"n": i}})).collect();
        publish(&k, json!(events)).await;
        publish(&k, json!([{"id": "n1", "subject": "noise", "payload": {}}])).await;
        let first = fetch(&k, "workers", 10, 2_000).await;
        assert_eq!(ids(&first), ["j1", "j2", "j3"], "{name}: in order, filtered");
        assert!(first.iter().all(|d| d["delivery"] == 1), "{name}");

        assert_eq!(ack(&k, "workers", &first[0]["token"], "ack", 0).await, "ok", "{name}");
        assert_eq!(ack(&k, "workers", &first[0]["token"], "ack", 0).await, "stale", "{name}: acked once");
        assert_eq!(ack(&k, "workers", &first[1]["token"], "nack", 0).await, "ok", "{name}");
        assert_eq!(ack(&k, "workers", &first[2]["token"], "term", 0).await, "ok", "{name}");

        let again = fetch(&k, "workers", 10, 5_000).await;
        assert_eq!(ids(&again), ["j2"], "{name}: the nacked event comes back, the acked one never");
        assert_eq!(again[0]["delivery"], 2, "{name}");
        // Its last allowed delivery fails: it moves to the dead-letter queue.
        assert_eq!(ack(&k, "workers", &again[0]["token"], "nack", 0).await, "ok", "{name}");
        assert_eq!(fetch(&k, "workers", 10, 300).await, Vec::<Value>::new(), "{name}: nothing left to deliver");

        let (status, page) = k.call("GET", "/api/v1/dlq?consumer=workers", None).await;
        assert_eq!(status, StatusCode::OK, "{name}: {page}");
        let letters = page["items"].as_array().expect("items").clone();
        let mut reasons: Vec<(String, String)> = letters
            .iter()
            .map(|l| (l["event"]["id"].as_str().expect("id").into(), l["reason"].as_str().expect("reason").into()))
            .collect();
        reasons.sort();
        assert_eq!(
            reasons,
            [("j2".to_string(), "deliveries_max".to_string()), ("j3".to_string(), "terminated".to_string())],
            "{name}: {page}"
        );
        let j2 = letters.iter().find(|l| l["event"]["id"] == "j2").expect("j2");
        let (status, one) = k.call("GET", &format!("/api/v1/dlq/{}", j2["id"]), None).await;
        assert_eq!((status, &one["event"]["payload"]), (StatusCode::OK, &json!({"n": 2})), "{name}: {one}");
        let (_, group) = k.call("GET", "/api/v1/consumers/workers", None).await;
        assert_eq!(group["dead_letters"], 2, "{name}: {group}");

        // Re-drive: delivered again to this group, counting from one.
        let (status, body) = k.call("POST", "/api/v1/dlq/redrive", Some(json!({"ids": [j2["id"]]}))).await;
        assert_eq!((status, body["count"].as_u64()), (StatusCode::OK, Some(1)), "{name}: {body}");
        let redriven = fetch(&k, "workers", 10, 5_000).await;
        assert_eq!((ids(&redriven), redriven[0]["delivery"].as_u64()), (vec!["j2"], Some(1)), "{name}");
        assert_eq!(ack(&k, "workers", &redriven[0]["token"], "ack", 0).await, "ok", "{name}");

        let (status, body) = k.call("POST", "/api/v1/dlq/purge", Some(json!({"consumer": "workers"}))).await;
        assert_eq!((status, body["count"].as_u64()), (StatusCode::OK, Some(1)), "{name}: {body}");
        let (_, page) = k.call("GET", "/api/v1/dlq", None).await;
        assert_eq!(page["items"], json!([]), "{name}");
        for (method, path) in [("GET", "/api/v1/dlq/999999"), ("GET", "/api/v1/consumers/nobody")] {
            let (status, _) = k.call(method, path, None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{name}: {path}");
        }
        let (status, _) = k.call("POST", "/api/v1/consumers/nobody/fetch", Some(json!({"max": 1}))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{name}");
        let (status, body) = k
            .call("POST", "/api/v1/consumers/workers/ack", Some(json!({"acks": [{"token": "t", "kind": "maybe"}]})))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {body}");
        let (status, _) = k.call("DELETE", "/api/v1/consumers/workers", None).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{name}");
        let (status, _) = k.call("DELETE", "/api/v1/consumers/workers", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{name}");
    }
}

#[tokio::test]
async fn an_unacked_delivery_comes_back_after_its_deadline() {
    // The embedded bus reads the kernel's clock: the test moves it past the deadline.
    for k in TestKernel::all().await {
        put_group(&k, "slow", json!({"filter": "t.>", "ack_wait_ms": 5000, "start": {"from": "all"}})).await;
        publish(&k, json!([{"id": "t1", "subject": "t.x", "payload": {}}])).await;
        let first = fetch(&k, "slow", 1, 1_000).await;
        assert_eq!(ids(&first), ["t1"]);
        assert_eq!(fetch(&k, "slow", 1, 0).await, Vec::<Value>::new(), "not before the deadline");
        // In progress: the deadline starts again.
        k.clock.advance_ms(4_000);
        assert_eq!(ack(&k, "slow", &first[0]["token"], "in_progress", 0).await, "ok");
        k.clock.advance_ms(4_000);
        assert_eq!(fetch(&k, "slow", 1, 0).await, Vec::<Value>::new(), "extended by in_progress");
        k.clock.advance_ms(2_000);
        let again = fetch(&k, "slow", 1, 1_000).await;
        assert_eq!((ids(&again), again[0]["delivery"].as_u64()), (vec!["t1"], Some(2)), "{:?}", k.backend);
        assert_eq!(ack(&k, "slow", &first[0]["token"], "ack", 0).await, "stale", "the first delivery is over");
    }
}

#[tokio::test]
async fn a_replay_delivers_a_range_again_to_one_group_only() {
    for (name, k) in bus_kernels().await {
        for group in ["a", "b"] {
            let (status, body) = put_group(&k, group, json!({"filter": "r.>", "start": {"from": "all"}})).await;
            assert_eq!(status, StatusCode::CREATED, "{name}: {body}");
        }
        let events: Vec<Value> =
            (1..=4).map(|i| json!({"id": format!("r{i}"), "subject": "r.x", "payload": i})).collect();
        let (_, published) = publish(&k, json!(events)).await;
        let seq = |i: usize| published["results"][i]["seq"].as_u64().expect("seq");
        for group in ["a", "b"] {
            let got = fetch(&k, group, 10, 2_000).await;
            assert_eq!(got.len(), 4, "{name}");
            for d in &got {
                assert_eq!(ack(&k, group, &d["token"], "ack", 0).await, "ok", "{name}");
            }
        }
        let (status, report) = k
            .call("POST", "/api/v1/replay", Some(json!({"consumer": "a", "from_seq": seq(1), "to_seq": seq(2)})))
            .await;
        assert_eq!(status, StatusCode::OK, "{name}: {report}");
        assert_eq!((report["events"].as_u64(), report["requeued"].as_u64()), (Some(2), Some(2)), "{name}: {report}");
        let again = fetch(&k, "a", 10, 2_000).await;
        assert_eq!(ids(&again), ["r2", "r3"], "{name}");
        assert_eq!(fetch(&k, "b", 10, 300).await, Vec::<Value>::new(), "{name}: the other group is untouched");

        for (bad, status_expected) in [
            (json!({"from_seq": 1}), StatusCode::UNPROCESSABLE_ENTITY),
            (json!({"consumer": "nobody"}), StatusCode::NOT_FOUND),
            (json!({"consumer": "a", "from_seq": 5, "to_seq": 1}), StatusCode::UNPROCESSABLE_ENTITY),
            (json!({"plugin": "abac"}), StatusCode::UNPROCESSABLE_ENTITY),
        ] {
            let (status, body) = k.call("POST", "/api/v1/replay", Some(bad.clone())).await;
            assert_eq!(status, status_expected, "{name}: {bad}: {body}");
        }
    }
}

#[tokio::test]
async fn a_what_if_replay_counts_the_decisions_a_candidate_policy_would_change() {
    for k in TestKernel::all().await {
        upload_abac(&k, "1.0.0", &policy_document("tenant-isolation.json"), true).await;
        upload_abac(&k, "2.0.0", DENY_ALL, false).await;
        let allowed = admin_request("acme", "acme")["authorize"].clone();
        let mut denied = allowed.clone();
        denied["action"] = json!("agents:write");
        denied["principal"] = json!([{"name": "role", "value": "viewer"}, {"name": "tenant", "value": "acme"}]);
        publish(
            &k,
            json!([
                {"id": "d1", "subject": "authz.requests", "payload": allowed},
                {"id": "d2", "subject": "authz.requests", "payload": denied},
                {"id": "d3", "subject": "authz.requests", "payload": {"not": "a request"}},
            ]),
        )
        .await;
        let (status, report) = k
            .call("POST", "/api/v1/replay", Some(json!({"filter": "authz.>", "plugin": "abac", "candidate": "2.0.0"})))
            .await;
        assert_eq!(status, StatusCode::OK, "{:?}: {report}", k.backend);
        let what_if = &report["what_if"];
        assert_eq!(
            (what_if["compared"].as_u64(), what_if["differ"].as_u64(), what_if["skipped"].as_u64()),
            (Some(2), Some(1), Some(1)),
            "only the allowed request changes under deny-all: {report}"
        );
        assert_eq!((what_if["active"].as_str(), what_if["candidate"].as_str()), (Some("1.0.0"), Some("2.0.0")));
        assert_eq!(what_if["samples"][0]["active"]["decision"]["allow"], true, "{report}");
        assert_eq!(what_if["samples"][0]["candidate"]["decision"]["allow"], false, "{report}");
        let (status, _) = k.call("POST", "/api/v1/replay", Some(json!({"plugin": "abac", "candidate": "9.9.9"}))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "an unknown candidate version");
        let _ = PluginKind::Policy;
    }
}

#[tokio::test]
async fn a_stream_sends_deliveries_as_server_sent_events() {
    for (name, k) in bus_kernels().await {
        put_group(&k, "live", json!({"filter": "s.>", "start": {"from": "all"}})).await;
        publish(&k, json!([{"id": "s1", "subject": "s.one", "payload": {"hello": "stream"}}])).await;
        let response = k
            .router
            .clone()
            .oneshot(k.request("GET", "/api/v1/consumers/live/stream", None))
            .await
            .expect("router is infallible");
        assert_eq!(response.status(), StatusCode::OK, "{name}");
        assert_eq!(response.headers()["content-type"], "text/event-stream", "{name}");
        let mut body = response.into_body();
        let mut text = String::new();
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            while !text.contains("\n\n") {
                let frame = body.frame().await.expect("a frame").expect("body");
                if let Some(data) = frame.data_ref() {
                    text.push_str(&String::from_utf8_lossy(data));
                }
            }
        })
        .await;
        assert!(read.is_ok(), "{name}: no delivery within 10 s: {text:?}");
        assert!(text.starts_with("event: delivery\ndata: "), "{name}: {text}");
        let data: Value =
            serde_json::from_str(text.trim_start_matches("event: delivery\ndata: ").trim()).expect("json");
        assert_eq!(
            (data["event"]["id"].as_str(), &data["event"]["payload"]),
            (Some("s1"), &json!({"hello": "stream"}))
        );
        assert_eq!(
            ack(&k, "live", &data["token"], "ack", 0).await,
            "ok",
            "{name}: a streamed delivery is acked as usual"
        );
        let (status, _) = k.call("GET", "/api/v1/consumers/nobody/stream", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{name}");
    }
}

#[tokio::test]
async fn state_changes_reach_the_bus_through_the_outbox_once() {
    for (name, k) in bus_kernels().await {
        let agent = k.create_agent(crate::support::agent_json("relay-1", "gpu", "1.0.0")).await;
        let (status, _) =
            k.call("DELETE", &format!("/api/v1/agents/{}", agent["id"].as_str().expect("id")), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{name}");
        let published = k.kernel.relay.pass().await.expect("relay pass");
        assert!(published >= 2, "{name}: {published}");
        assert_eq!(k.kernel.relay.pass().await.expect("relay pass"), 0, "{name}: each row is published once");

        let (_, page) = k.call("GET", "/api/v1/events?filter=nops.agents.%3E", None).await;
        let items = page["items"].as_array().expect("items");
        let subjects: Vec<&str> = items.iter().map(|e| e["subject"].as_str().expect("subject")).collect();
        assert_eq!(subjects, ["nops.agents.registered", "nops.agents.deleted"], "{name}: {page}");
        assert!(items.iter().all(|e| e["id"].as_str().is_some_and(|id| id.starts_with("outbox/"))), "{name}");
        assert_eq!(items[0]["payload"]["agent_id"], agent["id"], "{name}");
        assert_eq!(items[0]["source"], "kernel/registry", "{name}");

        // A plugin change is an event too.
        upload_abac(&k, "1.0.0", DENY_ALL, false).await;
        k.kernel.relay.pass().await.expect("relay pass");
        let (_, page) = k.call("GET", "/api/v1/events?filter=nops.plugins.%3E", None).await;
        assert_eq!(page["items"][0]["payload"]["name"], "abac", "{name}: {page}");
    }
}

#[tokio::test]
async fn roles_and_tenants_bound_what_the_bus_shows() {
    for k in TestKernel::all().await {
        let create = |tenant: &'static str, role: &'static str| {
            let k = &k;
            async move {
                let body = json!({"name": format!("{tenant}-{role}"), "role": role});
                let (status, created) =
                    as_key(k, &k.key, Some(tenant), "POST", "/api/v1/admin/api-keys", Some(body)).await;
                assert_eq!(status, StatusCode::CREATED, "{created}");
                created["secret"].as_str().expect("secret").to_string()
            }
        };
        let acme_operator = create("acme", "operator").await;
        let acme_viewer = create("acme", "viewer").await;
        let beta_operator = create("beta", "operator").await;
        let event = json!({"events": [{"id": "e1", "subject": "a.b", "payload": {}}]});
        let (status, body) = as_key(&k, &acme_operator, None, "POST", "/api/v1/events", Some(event.clone())).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, _) = as_key(&k, &acme_viewer, None, "POST", "/api/v1/events", Some(event.clone())).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "viewers do not publish");
        let (status, page) = as_key(&k, &acme_viewer, None, "GET", "/api/v1/events", None).await;
        assert_eq!((status, page["items"].as_array().map(Vec::len)), (StatusCode::OK, Some(1)));
        let (status, _) = as_key(&k, &acme_viewer, None, "POST", "/api/v1/dlq/purge", Some(json!({}))).await;
        assert_eq!(status, StatusCode::FORBIDDEN);

        // Beta sees none of acme's events, and the same id is beta's own.
        let (_, page) = as_key(&k, &beta_operator, None, "GET", "/api/v1/events", None).await;
        assert_eq!(page["items"], json!([]));
        let (status, body) = as_key(&k, &beta_operator, None, "POST", "/api/v1/events", Some(event)).await;
        assert_eq!((status, body["accepted"].as_u64()), (StatusCode::OK, Some(1)), "ids are per tenant: {body}");
        let (status, _) = as_key(&k, &beta_operator, Some("acme"), "GET", "/api/v1/events", None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "no reading across tenants");
    }
}

/// A kernel killed after the relay published a batch and before it marked the rows published
/// publishes them again on restart under the same ids: the bus answers duplicates, and the log
/// holds each state change exactly once. Also: changes committed while the relay could not run
/// (the kernel killed before its first pass) are all published after the restart.
#[tokio::test]
async fn a_kernel_killed_between_publish_and_mark_publishes_each_change_once() {
    use crate::process::Process;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
    let mut cases: Vec<(Backend, Option<String>)> = crate::support::backends().into_iter().map(|b| (b, None)).collect();
    if let Some(url) = nats_url() {
        cases.push((Backend::Sqlite, Some(url)));
    }
    for (backend, nats) in cases {
        let db = TestDb::new(backend).await;
        let prefix = format!("T{}", &uuid::Uuid::now_v7().simple().to_string().to_uppercase()[20..]);
        let mut bus_env: Vec<(&str, &str)> = Vec::new();
        if let Some(url) = &nats {
            bus_env.extend([("NOPS_NATS_URL", url.as_str()), ("NOPS_NATS_PREFIX", prefix.as_str())]);
        }
        let mut env = bus_env.clone();
        // Every relay pass stops right after its publish, before marking anything.
        env.push(("FAILPOINTS", "outbox-after-publish=return"));
        let mut kernel = Process::start(&db, &env).await;
        let key = kernel.bootstrap_key().expect("bootstrap key");
        for i in 0..5 {
            let response = http
                .post(format!("{}/api/v1/agents", kernel.base))
                .bearer_auth(&key)
                .json(&crate::support::agent_json(&format!("crash-{i}"), "gpu", "1.0.0"))
                .send()
                .await
                .expect("request");
            assert_eq!(response.status(), StatusCode::CREATED);
        }
        // Wait until the relay has published the registrations (unmarked).
        let read = |base: String, key: String| {
            let http = http.clone();
            async move {
                let page: Value = http
                    .get(format!("{base}/api/v1/events?filter=nops.agents.>&limit=1000"))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .expect("request")
                    .json()
                    .await
                    .expect("json");
                page["items"].as_array().cloned().unwrap_or_default()
            }
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while read(kernel.base.clone(), key.clone()).await.len() < 5 {
            assert!(std::time::Instant::now() < deadline, "the relay published nothing");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        kernel.kill9();
        drop(kernel);

        let kernel = Process::start(&db, &bus_env).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let events = loop {
            let events = read(kernel.base.clone(), key.clone()).await;
            if events.len() >= 5 || std::time::Instant::now() > deadline {
                break events;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().expect("id")).collect();
        assert_eq!(ids.len(), 5, "{backend:?} {nats:?}: every registration once: {ids:?}");
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 5, "{backend:?} {nats:?}: no registration twice");
        let output = kernel.stop().await;
        assert!(!output.contains("panicked"), "{output}");
    }
}
