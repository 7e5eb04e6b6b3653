//! Heartbeats: visible at once, coalesced in memory, flushed to the store in batches.

use http::StatusCode;
use serde_json::json;

use crate::support::{T0_MS, TestKernel, agent_json};

#[tokio::test]
async fn a_heartbeat_is_visible_at_once_and_durable_after_a_flush() {
    for k in TestKernel::all().await {
        let agent = k.create_agent(agent_json("hb", "a.b", "1.0.0")).await;
        let id = agent["id"].as_str().expect("id");
        k.clock.advance_ms(1_500);
        let load = json!({
            "in_flight_tasks": 3, "cpu_ratio": 0.42, "memory_bytes": 1_073_741_824u64, "latency_ms": 12.5,
            "error_count": 1, "request_count": 100, "telemetry": {"gpu_ratio": 0.7}
        });
        let (status, ack) = k.call("POST", &format!("/api/v1/agents/{id}/heartbeat"), Some(load.clone())).await;
        assert_eq!(status, StatusCode::OK, "{ack}");
        assert_eq!(ack["status"], "healthy");
        assert_eq!(ack["at_ms"], T0_MS + 1_500);
        assert!(ack["heartbeat_interval_ms"].as_i64().expect("interval") > 0);

        let (_, got) = k.call("GET", &format!("/api/v1/agents/{id}"), None).await;
        assert_eq!(got["last_heartbeat_at_ms"], T0_MS + 1_500, "{:?}: visible before any flush", k.backend);
        assert_eq!(got["load"], load);

        // Nothing in the store yet: a second kernel on the same database does not see it.
        let tenant = "default".parse().expect("tenant");
        let agent_id = id.parse().expect("id");
        use nops_core::store::AgentStore;
        let stored = k.kernel.store.get_agent(&tenant, agent_id).await.expect("store").expect("agent");
        assert_eq!(stored.last_heartbeat_at_ms, None, "{:?}: heartbeats are coalesced in memory", k.backend);

        assert_eq!(k.kernel.registry.flush_heartbeats().await.expect("flush"), 1);
        let stored = k.kernel.store.get_agent(&tenant, agent_id).await.expect("store").expect("agent");
        assert_eq!(stored.last_heartbeat_at_ms, Some(T0_MS + 1_500), "{:?}: flushed", k.backend);
        assert_eq!(stored.load.expect("load").in_flight_tasks, 3);
    }
}

#[tokio::test]
async fn many_heartbeats_coalesce_into_one_write_per_agent() {
    for k in TestKernel::all().await {
        let mut ids = Vec::new();
        for i in 0..5 {
            let agent = k.create_agent(agent_json(&format!("a{i}"), "a.b", "1.0.0")).await;
            ids.push(agent["id"].as_str().expect("id").to_string());
        }
        for round in 0..10 {
            k.clock.advance_ms(100);
            for id in &ids {
                let (status, _) = k
                    .call("POST", &format!("/api/v1/agents/{id}/heartbeat"), Some(json!({"in_flight_tasks": round})))
                    .await;
                assert_eq!(status, StatusCode::OK);
            }
        }
        assert_eq!(k.kernel.registry.health().heartbeats_pending, 5, "{:?}: one pending state per agent", k.backend);
        assert_eq!(k.kernel.registry.flush_heartbeats().await.expect("flush"), 5);
        assert_eq!(k.kernel.registry.flush_heartbeats().await.expect("flush"), 0, "nothing left to write");
        use nops_core::store::AgentStore;
        let tenant = "default".parse().expect("tenant");
        for id in &ids {
            let stored =
                k.kernel.store.get_agent(&tenant, id.parse().expect("id")).await.expect("store").expect("agent");
            assert_eq!(stored.load.expect("load").in_flight_tasks, 9, "{:?}: the latest state wins", k.backend);
            assert_eq!(stored.last_heartbeat_at_ms, Some(T0_MS + 1_000));
        }
    }
}

#[tokio::test]
async fn heartbeats_for_unknown_agents_are_404() {
    for k in TestKernel::all().await {
        let (status, body) =
            k.call("POST", "/api/v1/agents/01a22892-d26e-71cb-8c2f-db8f6271f5f5/heartbeat", Some(json!({}))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(k.kernel.registry.health().heartbeats_pending, 0);
    }
}

#[tokio::test]
async fn a_second_kernel_on_the_same_database_accepts_heartbeats_for_agents_it_did_not_register() {
    for backend in crate::support::backends() {
        let first = TestKernel::start(backend).await;
        let agent = first.create_agent(agent_json("shared", "a.b", "1.0.0")).await;
        let id = agent["id"].as_str().expect("id");
        let config = nops::config::Config::resolve(&crate::support::test_args(&first.db.url)).expect("config");
        let clock = nops_core::clock::ManualClock::new(T0_MS + 5_000);
        let second = nops::kernel::Kernel::open(&config, std::sync::Arc::new(clock)).await.expect("second kernel");
        let tenant: nops_core::tenant::TenantId = "default".parse().expect("tenant");
        // Registered after the second kernel loaded its table? Simulate with a fresh id lookup.
        let ack = second
            .registry
            .heartbeat(&tenant, id.parse().expect("id"), Default::default())
            .await
            .expect("heartbeat through the second kernel");
        assert_eq!(ack.at_ms, T0_MS + 5_000);
        let other: nops_core::tenant::TenantId = "other".parse().expect("tenant");
        assert!(second.registry.heartbeat(&other, id.parse().expect("id"), Default::default()).await.is_err());
        second.store.close().await;
    }
}
