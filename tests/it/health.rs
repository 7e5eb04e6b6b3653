//! Health, readiness, extended health, metrics, request ids and security headers.

use axum::body::Body;
use http::{Request, StatusCode};
use serde_json::json;

use crate::support::{TestKernel, agent_json};

#[tokio::test]
async fn health_ready_and_extended_report_each_component() {
    for k in TestKernel::all().await {
        let (status, body) = k.call("GET", "/health", None).await;
        assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
        let (status, body) = k.call("GET", "/ready", None).await;
        assert_eq!((status, body), (StatusCode::OK, json!({"status": "ready"})));
        let (status, body) = k.call("GET", "/health/extended", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "ok");
        let store = &body["components"]["store"];
        assert_eq!(store["status"], "ok");
        let backend = match k.backend {
            crate::support::Backend::Sqlite => "sqlite",
            crate::support::Backend::Postgres => "postgres",
        };
        assert_eq!(store["backend"], backend);
        assert!(store["latency_ms"].as_f64().expect("latency") >= 0.0);
        assert!(store["pool_max_connections"].as_u64().expect("pool") > 0);
        assert_eq!(body["components"]["registry"]["status"], "ok");

        let agent = k.create_agent(agent_json("hb", "a.b", "1.0.0")).await;
        let id = agent["id"].as_str().expect("id");
        let (status, _) = k.call("POST", &format!("/api/v1/agents/{id}/heartbeat"), Some(json!({}))).await;
        assert_eq!(status, StatusCode::OK);

        // A closed store: not ready, degraded, and the API says so with a 503.
        k.kernel.store.close().await;
        assert!(k.kernel.registry.flush_heartbeats().await.is_err(), "the flush fails");
        assert_eq!(k.kernel.registry.health().heartbeats_pending, 1, "{:?}: the state is kept for a retry", k.backend);
        let (status, _) = k.call("POST", &format!("/api/v1/agents/{id}/heartbeat"), Some(json!({}))).await;
        assert_eq!(status, StatusCode::OK, "heartbeats are still accepted while the store is down");
        let (status, body) = k.call("GET", "/ready", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "not_ready");
        let (status, body) = k.call("GET", "/health/extended", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "degraded");
        assert_eq!(body["components"]["store"]["status"], "down");
        assert_eq!(body["components"]["registry"]["status"], "degraded");
        assert!(body["components"]["registry"]["last_error"].as_str().expect("error").contains("heartbeat flush"));
        let (status, body) = k.call("GET", "/api/v1/agents", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(!body.to_string().contains("pool"), "internals stay in the logs: {body}");
    }
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    for k in TestKernel::all().await {
        let agent = k.create_agent(agent_json("m", "a.b", "1.0.0")).await;
        let id = agent["id"].as_str().expect("id");
        for _ in 0..3 {
            k.call("POST", &format!("/api/v1/agents/{id}/heartbeat"), Some(json!({}))).await;
        }
        k.call("GET", "/api/v1/agents/not-a-uuid", None).await;
        let (status, text) = k.send_text(k.request("GET", "/metrics", None)).await;
        assert_eq!(status, StatusCode::OK);
        for line in [
            "nops_http_requests_total{method=\"POST\",route=\"/api/v1/agents/{id}/heartbeat\",status=\"200\"} 3",
            "nops_http_requests_total{method=\"POST\",route=\"/api/v1/agents\",status=\"201\"} 1",
            "nops_http_requests_total{method=\"GET\",route=\"/api/v1/agents/{id}\",status=\"400\"} 1",
            "nops_heartbeats_total 3",
            "nops_heartbeats_pending 1",
            "nops_agents{status=\"healthy\"} 1",
        ] {
            assert!(text.contains(line), "{:?}: missing {line}\n{text}", k.backend);
        }
        for family in [
            "nops_http_request_duration_seconds_bucket",
            "nops_store_pool_max_connections",
            "nops_http_requests_in_flight",
        ] {
            assert!(text.contains(family), "missing {family}");
        }
        k.kernel.registry.flush_heartbeats().await.expect("flush");
        let (_, text) = k.send_text(k.request("GET", "/metrics", None)).await;
        assert!(text.contains("nops_heartbeats_flushed_total 1"), "{text}");
        assert!(text.contains("nops_heartbeats_pending 0"), "{text}");
    }
}

#[tokio::test]
async fn every_response_has_a_request_id_and_security_headers() {
    for k in TestKernel::all().await {
        let requests = [
            Request::get("/health").body(Body::empty()).expect("req"),
            Request::get("/api/v1/agents").body(Body::empty()).expect("req"),
            k.request("GET", "/api/v1/agents", None),
            Request::get("/nowhere").body(Body::empty()).expect("req"),
            Request::get("/health").header("x-request-id", "trace-me-123").body(Body::empty()).expect("req"),
            Request::get("/health").header("x-request-id", "x".repeat(500)).body(Body::empty()).expect("req"),
        ];
        let mut ids = Vec::new();
        for request in requests {
            let (_, headers, _) = k.send(request).await;
            let id = headers.get("x-request-id").and_then(|v| v.to_str().ok()).expect("request id").to_string();
            assert!(!id.is_empty() && id.len() <= 128, "{id}");
            ids.push(id);
            for (name, value) in [
                ("x-content-type-options", "nosniff"),
                ("x-frame-options", "DENY"),
                ("referrer-policy", "no-referrer"),
                ("content-security-policy", "default-src 'none'; frame-ancestors 'none'"),
                ("cache-control", "no-store"),
            ] {
                assert_eq!(headers.get(name).and_then(|v| v.to_str().ok()), Some(value), "{name}");
            }
            assert!(headers.get("server").is_none(), "no server banner");
        }
        assert_eq!(ids[4], "trace-me-123", "a well-formed client id is kept");
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 6, "ids are unique");
    }
}
