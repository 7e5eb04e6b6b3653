//! The whole kernel under a misbehaving fleet while its dependencies go away: agents that are
//! slow, fail or vanish, while the PostgreSQL store and the NATS bus are stopped and started
//! (private servers of this test's own, see `outage.rs`).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{Value, json};

use crate::dispatch::{Behaviour, push_agent};
use crate::outage::{PrivateNats, PrivatePostgres, eventually};
use crate::support::{Backend, TestDb, TestKernel};

const CAPABILITY: &str = "fleet.work";
/// Tasks submitted per round.
const TASKS_PER_ROUND: usize = 6;

fn closed_port_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
    // The listener is dropped here: nothing answers on this port, as for an agent that vanished.
    format!("http://127.0.0.1:{port}/work")
}

async fn register(k: &TestKernel, name: &str, endpoint: &str) -> String {
    let body = json!({ "name": name, "endpoint": endpoint,
        "capabilities": [{ "name": CAPABILITY, "version": "1.0.0", "params": {} }] });
    k.create_agent(body).await["id"].as_str().expect("id").to_string()
}

/// Submits a round of tasks and waits for each to finish; returns the finished tasks.
async fn round(k: &TestKernel, label: &str) -> Vec<Value> {
    let mut ids = Vec::new();
    for n in 0..TASKS_PER_ROUND {
        let body = json!({ "capabilities": [{ "name": CAPABILITY }], "input": { "round": label, "n": n },
            "attempts_max": 5, "attempt_timeout_ms": 1000 });
        let (status, task) = k.call("POST", "/api/v1/tasks", Some(body)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{label}: {task}");
        ids.push(task["id"].as_str().expect("id").to_string());
    }
    let mut done = Vec::new();
    for id in ids {
        let (status, task) = k.call("GET", &format!("/api/v1/tasks/{id}?wait_ms=20000"), None).await;
        assert_eq!(status, StatusCode::OK, "{task}");
        done.push(task);
    }
    done
}

/// Every task of a round succeeded, answered by a healthy agent, after retries away from the
/// slow, failing and vanished ones.
fn check_round(label: &str, tasks: &[Value], names: &HashMap<String, &str>) {
    for task in tasks {
        assert_eq!(task["status"], "succeeded", "{label}: {task}");
        let winner = task["output"]["agent"].as_str().expect("agent");
        assert!(["good-1", "good-2", "slow"].contains(&winner), "{label}: {task}");
        for attempt in task["attempts"].as_array().expect("attempts") {
            let agent = names.get(attempt["agent_id"].as_str().unwrap_or_default()).copied().unwrap_or("?");
            if matches!(agent, "failing" | "vanished") {
                assert_ne!(attempt["outcome"], "success", "{label}: {task}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_fleet_rides_out_store_and_bus_outages_and_loses_nothing_critical() {
    let Some(pg) = PrivatePostgres::start() else { return };
    let Some(mut nats) = PrivateNats::start() else { return };
    let nats_url = nats.url();
    let k = TestKernel::start_with(Backend::Postgres, TestDb::at(pg.url()), move |a| {
        a.nats_url = Some(nats_url);
        a.rate_limits_enabled = Some(false);
    })
    .await;
    // The background work `nops serve` runs.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let kernel = &k.kernel;
    tokio::spawn(kernel.degraded.clone().run(std::sync::Arc::new(kernel.store.clone()), stop_rx.clone()));
    tokio::spawn(kernel.degraded.clone().run_bus_probe(kernel.bus.clone(), stop_rx.clone()));
    tokio::spawn(kernel.relay.clone().run(stop_rx.clone()));
    tokio::spawn(kernel.dispatch.clone().run_background(stop_rx));

    let (good_1, good_2) = (push_agent("good-1", Behaviour::Echo).await, push_agent("good-2", Behaviour::Echo).await);
    let slow = push_agent("slow", Behaviour::SlowFirstAttempt).await;
    let failing = push_agent("failing", Behaviour::Fail).await;
    let mut names: HashMap<String, &str> = HashMap::new();
    for (name, url) in [
        ("good-1", good_1.url.clone()),
        ("good-2", good_2.url.clone()),
        ("slow", slow.url.clone()),
        ("failing", failing.url.clone()),
        ("vanished", closed_port_url()),
    ] {
        names.insert(register(&k, name, &url).await, name);
    }
    let (status, group) = k
        .call(
            "PUT",
            "/api/v1/consumers/audit",
            Some(json!({"filter": ">", "start": {"from": "all"}, "ack_wait_ms": 60000})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{group}");

    check_round("all up", &round(&k, "all up").await, &names);

    // The store goes away: what needs it is refused with a clear 503; heartbeats and routing
    // keep working from memory.
    pg.stop();
    eventually("the store to count as down", || async {
        let (_, health) = k.call("GET", "/health/extended", None).await;
        health["components"]["degraded"]["store"]["degraded"] == true
    })
    .await;
    let good = names.iter().find(|(_, n)| **n == "good-1").map(|(id, _)| id.clone()).expect("good-1");
    let (status, body) = k.call("POST", &format!("/api/v1/agents/{good}/heartbeat"), Some(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = k.call("POST", "/api/v1/route", Some(json!({"capabilities": [{"name": CAPABILITY}]}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) =
        k.call("POST", "/api/v1/tasks", Some(json!({"capabilities": [{"name": CAPABILITY}], "input": {}}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("store_unavailable")));
    pg.resume();
    eventually("the store to be back", || async {
        let (_, health) = k.call("GET", "/health/extended", None).await;
        health["components"]["degraded"]["store"]["degraded"] == false
    })
    .await;
    check_round("after the store outage", &round(&k, "store back").await, &names);

    // The bus goes away: the kernel keeps serving; a registration's event and a client's
    // event wait in the outbox.
    nats.stop();
    eventually("the bus to count as down", || async {
        let (_, health) = k.call("GET", "/health/extended", None).await;
        health["components"]["degraded"]["bus"]["degraded"] == true
    })
    .await;
    names.insert(register(&k, "late", &good_2.url).await, "good-2");
    let publish = json!({"events": [{"id": "fleet-1", "subject": "fleet.report", "payload": {"ok": true}}]});
    let (status, body) = k.call("POST", "/api/v1/events", Some(publish)).await;
    assert_eq!((status, body["buffered"].as_u64()), (StatusCode::ACCEPTED, Some(1)), "{body}");
    check_round("during the bus outage", &round(&k, "bus down").await, &names);
    nats.resume();
    eventually("the bus to be back", || async {
        let (status, _) = k.call("GET", "/health/extended", None).await;
        status == StatusCode::OK
    })
    .await;
    check_round("after the bus outage", &round(&k, "bus back").await, &names);

    // Every event reached the consumer group exactly once: the client's, and each of the six
    // registrations the kernel published through its outbox.
    let mut seen: Vec<(String, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) =
            k.call("POST", "/api/v1/consumers/audit/fetch", Some(json!({"max": 500, "wait_ms": 1000}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let deliveries = body["deliveries"].as_array().cloned().unwrap_or_default();
        for d in &deliveries {
            let event = &d["event"];
            seen.push((event["id"].as_str().unwrap_or("").into(), event["subject"].as_str().unwrap_or("").into()));
            k.call(
                "POST",
                "/api/v1/consumers/audit/ack",
                Some(json!({"acks": [{"token": d["token"], "kind": "ack"}]})),
            )
            .await;
        }
        let registered = seen.iter().filter(|(_, s)| s == "nops.agents.registered").count();
        if (deliveries.is_empty() && registered >= 6) || Instant::now() > deadline {
            break;
        }
    }
    let ids: Vec<&String> = seen.iter().map(|(id, _)| id).collect();
    let unique: BTreeSet<&String> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no event twice: {seen:?}");
    assert_eq!(seen.iter().filter(|(id, _)| id == "fleet-1").count(), 1, "{seen:?}");
    assert_eq!(seen.iter().filter(|(_, s)| s == "nops.agents.registered").count(), 6, "{seen:?}");
    let _ = stop_tx.send(true);
}
