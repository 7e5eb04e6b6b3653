//! Bad input gets a clear 4xx in the error envelope and changes nothing.

use axum::body::Body;
use http::{Request, StatusCode};
use serde_json::{Value, json};

use crate::support::{TestDb, TestKernel, agent_json, backends};

/// Body limit of the kernels in this module, so the oversized case stays small.
const BODY_BYTES_MAX: usize = 8 * 1024;

fn raw(k: &TestKernel, method: &str, path: &str, content_type: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(path).header("authorization", format!("Bearer {}", k.key));
    if let Some(ct) = content_type {
        builder = builder.header("content-type", ct);
    }
    builder.body(body.into()).expect("request")
}

async fn snapshot(k: &TestKernel) -> Value {
    let (_, page) = k.call("GET", "/api/v1/agents?limit=500", None).await;
    let (_, events) = k.call("GET", "/api/v1/agent-events?limit=500", None).await;
    json!({"agents": page["items"], "events": events["items"], "pending": k.kernel.registry.health().heartbeats_pending})
}

#[tokio::test]
async fn malformed_requests_are_refused_without_effect() {
    for backend in backends() {
        let db = TestDb::new(backend).await;
        let k = TestKernel::start_with(backend, db, |a| a.body_bytes_max = Some(BODY_BYTES_MAX)).await;
        let agent = k.create_agent(agent_json("keep", "a.b", "1.0.0")).await;
        let id = agent["id"].as_str().expect("id").to_string();
        let agents = "/api/v1/agents";
        let one = format!("/api/v1/agents/{id}");
        let hb = format!("/api/v1/agents/{id}/heartbeat");
        let json_ct = Some("application/json");
        let deep = format!(
            r#"{{"name":"a","capabilities":[{{"name":"a.b","version":"1.0.0","params":{{"x":{}{}}}}}]}}"#,
            "[".repeat(1_000),
            "]".repeat(1_000)
        );
        let huge = json!({"name": "x".repeat(BODY_BYTES_MAX)}).to_string();
        let many_labels: serde_json::Map<String, Value> = (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
        let cases: Vec<(&str, Request<Body>, StatusCode, &str)> = vec![
            ("syntax", raw(&k, "POST", agents, json_ct, "{\"name\":"), StatusCode::BAD_REQUEST, "malformed_json"),
            (
                "not utf-8",
                raw(&k, "POST", agents, json_ct, vec![0xff, 0xfe, 0x00]),
                StatusCode::BAD_REQUEST,
                "malformed_json",
            ),
            ("nesting", raw(&k, "POST", agents, json_ct, deep), StatusCode::BAD_REQUEST, "json_too_deep"),
            (
                "wrong type",
                raw(&k, "POST", agents, json_ct, r#"{"name": 5}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
            ),
            (
                "unknown field",
                raw(&k, "POST", agents, json_ct, r#"{"name":"a","nmae":"b"}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
            ),
            ("missing field", raw(&k, "POST", agents, json_ct, "{}"), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
            (
                "no content type",
                raw(&k, "POST", agents, None, r#"{"name":"a"}"#),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
            ),
            (
                "text content type",
                raw(&k, "POST", agents, Some("text/plain"), r#"{"name":"a"}"#),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
            ),
            ("oversized", raw(&k, "POST", agents, json_ct, huge), StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            (
                "bad semver",
                raw(&k, "POST", agents, json_ct, r#"{"name":"a","capabilities":[{"name":"a.b","version":"one"}]}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
            ),
            (
                "capability name",
                raw(&k, "POST", agents, json_ct, r#"{"name":"a","capabilities":[{"name":"A B","version":"1.0.0"}]}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_capability",
            ),
            (
                "params not object",
                raw(
                    &k,
                    "POST",
                    agents,
                    json_ct,
                    r#"{"name":"a","capabilities":[{"name":"a.b","version":"1.0.0","params":[1]}]}"#,
                ),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_capability",
            ),
            (
                "endpoint scheme",
                raw(&k, "POST", agents, json_ct, r#"{"name":"a","endpoint":"ftp://h/x"}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_endpoint",
            ),
            (
                "empty name",
                raw(&k, "POST", agents, json_ct, r#"{"name":" "}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_name",
            ),
            (
                "control char",
                raw(&k, "POST", agents, json_ct, r#"{"name":"a\u0000b"}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_name",
            ),
            (
                "too many labels",
                raw(&k, "POST", agents, json_ct, json!({"name": "a", "labels": many_labels}).to_string()),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_label",
            ),
            (
                "bad id",
                raw(&k, "GET", "/api/v1/agents/not-a-uuid", None, Body::empty()),
                StatusCode::BAD_REQUEST,
                "invalid_id",
            ),
            (
                "bad id patch",
                raw(&k, "PATCH", "/api/v1/agents/123", json_ct, "{}"),
                StatusCode::BAD_REQUEST,
                "invalid_id",
            ),
            (
                "patch dup caps",
                raw(
                    &k,
                    "PATCH",
                    &one,
                    json_ct,
                    r#"{"capabilities":[{"name":"a.b","version":"1.0.0"},{"name":"a.b","version":"2.0.0"}]}"#,
                ),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_capability",
            ),
            (
                "patch wrong type",
                raw(&k, "PATCH", &one, json_ct, r#"{"labels":"x"}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
            ),
            (
                "limit zero",
                raw(&k, "GET", "/api/v1/agents?limit=0", None, Body::empty()),
                StatusCode::BAD_REQUEST,
                "invalid_query",
            ),
            (
                "limit huge",
                raw(&k, "GET", "/api/v1/agents?limit=100000", None, Body::empty()),
                StatusCode::BAD_REQUEST,
                "invalid_query",
            ),
            (
                "limit text",
                raw(&k, "GET", "/api/v1/agents?limit=abc", None, Body::empty()),
                StatusCode::BAD_REQUEST,
                "invalid_query",
            ),
            (
                "version syntax",
                raw(&k, "GET", "/api/v1/agents?capability=a.b&version=%5E%5E1", None, Body::empty()),
                StatusCode::BAD_REQUEST,
                "invalid_query",
            ),
            (
                "version alone",
                raw(&k, "GET", "/api/v1/agents?version=1", None, Body::empty()),
                StatusCode::BAD_REQUEST,
                "invalid_query",
            ),
            (
                "status",
                raw(&k, "GET", "/api/v1/agents?status=dead", None, Body::empty()),
                StatusCode::BAD_REQUEST,
                "invalid_query",
            ),
            (
                "label",
                raw(&k, "GET", "/api/v1/agents?label=novalue", None, Body::empty()),
                StatusCode::BAD_REQUEST,
                "invalid_query",
            ),
            (
                "unknown param",
                raw(&k, "GET", "/api/v1/agents?colour=red", None, Body::empty()),
                StatusCode::BAD_REQUEST,
                "invalid_query",
            ),
            (
                "cursor",
                raw(&k, "GET", "/api/v1/agents?after=zzz", None, Body::empty()),
                StatusCode::BAD_REQUEST,
                "invalid_id",
            ),
            (
                "capability query",
                raw(&k, "GET", "/api/v1/agents?capability=..", None, Body::empty()),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_capability",
            ),
            (
                "negative cpu",
                raw(&k, "POST", &hb, json_ct, r#"{"cpu_ratio": -1}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_heartbeat",
            ),
            (
                "overflow",
                raw(&k, "POST", &hb, json_ct, r#"{"in_flight_tasks": 1e20}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
            ),
            (
                "negative count",
                raw(&k, "POST", &hb, json_ct, r#"{"error_count": -1}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
            ),
            (
                "telemetry text",
                raw(&k, "POST", &hb, json_ct, r#"{"telemetry": {"a": "b"}}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
            ),
            (
                "heartbeat extra",
                raw(&k, "POST", &hb, json_ct, r#"{"cpu": 1}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
            ),
            (
                "event cursor",
                raw(&k, "GET", "/api/v1/agent-events?after=x", None, Body::empty()),
                StatusCode::BAD_REQUEST,
                "invalid_query",
            ),
            (
                "unknown route",
                raw(&k, "GET", "/api/v1/nothing", None, Body::empty()),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                "wrong method",
                raw(&k, "PUT", agents, json_ct, "{}"),
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
            ),
        ];
        let before = snapshot(&k).await;
        for (name, request, status, code) in cases {
            let (got, headers, body) = k.send(request).await;
            assert_eq!(got, status, "{backend:?} {name}: {body}");
            assert_eq!(body["error"]["code"], code, "{backend:?} {name}: {body}");
            assert!(!body["error"]["message"].as_str().unwrap_or("").is_empty(), "{name}: a message");
            let request_id = headers.get("x-request-id").and_then(|v| v.to_str().ok()).expect("request id");
            assert_eq!(body["error"]["request_id"], request_id, "{name}: the body names the request");
        }
        assert_eq!(snapshot(&k).await, before, "{backend:?}: nothing changed");
    }
}

#[tokio::test]
async fn requests_without_a_valid_key_are_401() {
    for k in TestKernel::all().await {
        let forged = {
            // Right shape, wrong checksum; and right checksum, unknown key.
            let mut s = k.key.clone();
            s.replace_range(6..7, if &s[6..7] == "a" { "b" } else { "a" });
            s
        };
        let unknown = nops_core::auth::generate_api_key().secret;
        for auth in [
            None,
            Some("Bearer".to_string()),
            Some("Basic dXNlcjpwYXNz".into()),
            Some(format!("Bearer {forged}")),
            Some(format!("Bearer {unknown}")),
            Some("Bearer x".repeat(1000)),
        ] {
            let mut builder = Request::builder().uri("/api/v1/agents");
            if let Some(auth) = &auth {
                builder = builder.header("authorization", auth);
            }
            let (status, headers, body) = k.send(builder.body(Body::empty()).expect("request")).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{:?} {auth:?}", k.backend);
            assert_eq!(headers.get("www-authenticate").expect("challenge"), "Bearer");
            assert_eq!(body["error"]["code"], "unauthenticated");
        }
        let mut bad_tenant = k.request("GET", "/api/v1/agents", None);
        bad_tenant.headers_mut().insert("x-nops-tenant", "NOT A TENANT".parse().expect("header"));
        let (status, _, body) = k.send(bad_tenant).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "invalid_tenant");
        let metrics = k.send_text(k.request("GET", "/metrics", None)).await.1;
        for line in [
            r#"nops_auth_total{method="unknown",outcome="failure",reason="missing"} 3"#,
            r#"nops_auth_total{method="api_key",outcome="failure",reason="unknown_key"} 1"#,
            r#"nops_auth_total{method="api_key",outcome="failure",reason="malformed"} 1"#,
            r#"nops_auth_total{method="unknown",outcome="failure",reason="malformed"} 1"#,
        ] {
            assert!(metrics.contains(line), "missing {line}: {metrics}");
        }
    }
}
