//! The TTL lifecycle, driven by a manual clock: healthy → stale → zombie → removed, each step
//! recorded as an event; a heartbeat revives.

use http::StatusCode;
use serde_json::{Value, json};

use crate::support::{T0_MS, TestKernel, agent_json};

async fn status_of(k: &TestKernel, id: &str) -> (StatusCode, Value) {
    let (status, agent) = k.call("GET", &format!("/api/v1/agents/{id}"), None).await;
    (status, agent["status"].clone())
}

fn transitions(events: &Value) -> Vec<(String, Value, Value, i64)> {
    events["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().expect("kind").to_string(),
                e["from_status"].clone(),
                e["to_status"].clone(),
                e["at_ms"].as_i64().expect("at"),
            )
        })
        .collect()
}

#[tokio::test]
async fn silent_agents_go_stale_then_zombie_then_are_removed() {
    // Test kernels: stale after 10 s, zombie after 20 s, removed after 60 s of silence.
    for k in TestKernel::all().await {
        let agent = k.create_agent(agent_json("quiet", "a.b", "1.0.0")).await;
        let id = agent["id"].as_str().expect("id").to_string();
        let registry = &k.kernel.registry;

        k.clock.advance_ms(9_999);
        assert!(registry.sweep().await.expect("sweep").is_empty(), "{:?}: still healthy", k.backend);
        assert_eq!(status_of(&k, &id).await.1, "healthy");

        k.clock.advance_ms(1);
        assert_eq!(registry.sweep().await.expect("sweep").len(), 1);
        assert_eq!(status_of(&k, &id).await.1, "stale", "{:?}", k.backend);
        let (_, stale) = k.call("GET", "/api/v1/agents?status=stale", None).await;
        assert_eq!(stale["items"].as_array().expect("items").len(), 1, "the store knows the status");

        k.clock.advance_ms(10_000);
        registry.sweep().await.expect("sweep");
        assert_eq!(status_of(&k, &id).await.1, "zombie", "{:?}", k.backend);

        k.clock.advance_ms(40_000);
        registry.sweep().await.expect("sweep");
        assert_eq!(status_of(&k, &id).await.0, StatusCode::NOT_FOUND, "{:?}: removed", k.backend);

        let (_, events) = k.call("GET", &format!("/api/v1/agents/{id}/events"), None).await;
        assert_eq!(
            transitions(&events),
            vec![
                ("registered".into(), Value::Null, Value::Null, T0_MS),
                ("status_changed".into(), json!("healthy"), json!("stale"), T0_MS + 10_000),
                ("status_changed".into(), json!("stale"), json!("zombie"), T0_MS + 20_000),
                ("expired".into(), json!("zombie"), Value::Null, T0_MS + 60_000),
            ],
            "{:?}: every step is recorded with its time",
            k.backend
        );
    }
}

#[tokio::test]
async fn a_heartbeat_revives_a_stale_or_zombie_agent() {
    for k in TestKernel::all().await {
        let agent = k.create_agent(agent_json("flaky", "a.b", "1.0.0")).await;
        let id = agent["id"].as_str().expect("id").to_string();
        let registry = &k.kernel.registry;
        k.clock.advance_ms(25_000);
        registry.sweep().await.expect("sweep");
        assert_eq!(status_of(&k, &id).await.1, "zombie");

        let (status, ack) = k.call("POST", &format!("/api/v1/agents/{id}/heartbeat"), Some(json!({}))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ack["status"], "healthy");
        assert_eq!(status_of(&k, &id).await.1, "healthy", "{:?}: revived at once", k.backend);
        let (_, zombies) = k.call("GET", "/api/v1/agents?status=zombie", None).await;
        assert_eq!(zombies["items"], json!([]), "{:?}: no longer listed as a zombie", k.backend);

        // The revival is written with the heartbeat flush.
        k.kernel.registry.flush_heartbeats().await.expect("flush");
        let (_, healthy) = k.call("GET", "/api/v1/agents?status=healthy", None).await;
        assert_eq!(healthy["items"].as_array().expect("items").len(), 1, "{:?}: revival is stored", k.backend);
        let metrics = k.send_text(k.request("GET", "/metrics", None)).await.1;
        assert!(metrics.contains("nops_agent_transitions_total{to=\"healthy\"} 1"), "{metrics}");
        assert!(metrics.contains("nops_agents{status=\"healthy\"} 1"), "{metrics}");

        // The heartbeat restarts the clock: 9.999 s later it is still healthy.
        k.clock.advance_ms(9_999);
        assert!(registry.sweep().await.expect("sweep").is_empty());
        let (_, events) = k.call("GET", &format!("/api/v1/agents/{id}/events"), None).await;
        let last = transitions(&events).pop().expect("events");
        assert_eq!((last.1, last.2), (json!("zombie"), json!("healthy")), "{:?}", k.backend);
    }
}

#[tokio::test]
async fn heartbeating_agents_stay_healthy_and_the_tenant_event_log_pages() {
    for k in TestKernel::all().await {
        let live = k.create_agent(agent_json("live", "a.b", "1.0.0")).await;
        let live_id = live["id"].as_str().expect("id").to_string();
        k.create_agent(agent_json("dead", "a.b", "1.0.0")).await;
        for _ in 0..7 {
            k.clock.advance_ms(5_000);
            let (status, _) = k.call("POST", &format!("/api/v1/agents/{live_id}/heartbeat"), Some(json!({}))).await;
            assert_eq!(status, StatusCode::OK);
            k.kernel.registry.sweep().await.expect("sweep");
        }
        assert_eq!(status_of(&k, &live_id).await.1, "healthy", "{:?}", k.backend);
        // Events of the whole tenant, two per page.
        let mut kinds = Vec::new();
        let mut path = "/api/v1/agent-events?limit=2".to_string();
        loop {
            let (status, page) = k.call("GET", &path, None).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            kinds.extend(transitions(&page).into_iter().map(|t| t.0));
            match page["next_after"].as_i64() {
                Some(after) => path = format!("/api/v1/agent-events?limit=2&after={after}"),
                None => break,
            }
        }
        assert_eq!(kinds, ["registered", "registered", "status_changed", "status_changed"], "{:?}", k.backend);
        let metrics = k.send_text(k.request("GET", "/metrics", None)).await.1;
        assert!(metrics.contains("nops_agent_transitions_total{to=\"zombie\"} 1"), "{metrics}");
        assert!(metrics.contains("nops_agents{status=\"healthy\"} 1"), "{metrics}");
        assert!(metrics.contains("nops_agents{status=\"zombie\"} 1"), "{metrics}");
    }
}
