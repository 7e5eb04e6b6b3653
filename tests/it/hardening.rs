//! The edge's hardening: header size, JSON depth, strict media types, in-flight and connection
//! caps, slow clients, security headers on every response, and secrets kept out of logs and
//! metrics. Limits answer in the JSON envelope and change nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use http::{HeaderMap, Request, StatusCode};
use nops_core::store::{AgentFilter, AgentStore};
use nops_core::tenant::TenantId;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::process::Process;
use crate::support::{Backend, TestDb, TestKernel, agent_json};

async fn stored_agents(k: &TestKernel) -> usize {
    let filter = AgentFilter { tenant: Some(TenantId::default_tenant()), ..AgentFilter::default() };
    k.kernel.store.list_agents(&filter, 1_000).await.expect("list").len()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

/// An error in the JSON envelope with `code`, its request id in the header too.
fn assert_envelope(status: StatusCode, expected: StatusCode, headers: &HeaderMap, body: &Value, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert_eq!(body["error"]["request_id"], header(headers, "x-request-id"), "{body}");
    assert_security_headers(headers, &format!("{expected}"));
}

/// The security headers, and nothing naming the server software.
fn assert_security_headers(headers: &HeaderMap, context: &str) {
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("content-security-policy", "default-src 'none'; frame-ancestors 'none'"),
        ("strict-transport-security", "max-age=63072000; includeSubDomains"),
        ("cache-control", "no-store"),
    ] {
        assert_eq!(header(headers, name), value, "{context}: {name} in {headers:?}");
    }
    assert!(headers.get("server").is_none() && headers.get("x-powered-by").is_none(), "{context}: {headers:?}");
}

async fn start(tweak: impl FnOnce(&mut nops::config::ServeArgs)) -> TestKernel {
    TestKernel::start_with(Backend::Sqlite, TestDb::new(Backend::Sqlite).await, tweak).await
}

#[tokio::test]
async fn oversized_headers_are_431_and_change_nothing() {
    let k = start(|args| args.headers_bytes_max = Some(4_096)).await;
    let mut request = k.request("POST", "/api/v1/agents", Some(agent_json("a", "a.b", "1.0.0")));
    request.headers_mut().insert("x-padding", "p".repeat(5_000).parse().expect("header"));
    let (status, headers, body) = k.send(request).await;
    assert_envelope(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, &headers, &body, "headers_too_large");
    assert_eq!(stored_agents(&k).await, 0);
    // Just under the limit is fine.
    let mut request = k.request("POST", "/api/v1/agents", Some(agent_json("a", "a.b", "1.0.0")));
    request.headers_mut().insert("x-padding", "p".repeat(3_000).parse().expect("header"));
    assert_eq!(k.send(request).await.0, StatusCode::CREATED);
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn json_nested_deeper_than_the_limit_is_400_before_serde_sees_it() {
    let k = start(|_| {}).await;
    // 40 levels inside a label value of an otherwise valid agent.
    let body = format!(r#"{{"name": "deep", "labels": {{"x": {}}}}}"#, nested(40));
    let request = Request::builder()
        .method("POST")
        .uri("/api/v1/agents")
        .header("authorization", format!("Bearer {}", k.key))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("request");
    let (status, headers, body) = k.send(request).await;
    assert_envelope(status, StatusCode::BAD_REQUEST, &headers, &body, "json_too_deep");
    assert_eq!(stored_agents(&k).await, 0);
    // Brackets inside strings do not count; 30 levels are within the default 32.
    let shallow = json!({"name": "ok", "labels": {"x": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}});
    assert_eq!(k.call("POST", "/api/v1/agents", Some(shallow)).await.0, StatusCode::CREATED);
    let body = format!(r#"{{"name": "deep", "labels": {{"x": {}}}}}"#, nested(30));
    let request = Request::builder()
        .method("POST")
        .uri("/api/v1/agents")
        .header("authorization", format!("Bearer {}", k.key))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("request");
    let (status, _, body) = k.send(request).await;
    assert_ne!(body["error"]["code"], "json_too_deep", "{status}: {body}");
}

#[tokio::test]
async fn bodies_must_carry_the_media_type_their_endpoint_reads() {
    let k = start(|_| {}).await;
    let agent = k.create_agent(agent_json("a", "a.b", "1.0.0")).await;
    let id = agent["id"].as_str().expect("id").to_string();
    let with = |method: &str, path: &str, content_type: Option<&str>, body: &'static str| {
        let mut builder =
            Request::builder().method(method).uri(path).header("authorization", format!("Bearer {}", k.key));
        if let Some(ct) = content_type {
            builder = builder.header("content-type", ct);
        }
        builder.body(Body::from(body)).expect("request")
    };
    let cases = [
        ("POST", "/api/v1/agents".to_string(), Some("text/plain"), r#"{"name": "b"}"#),
        ("POST", "/api/v1/agents".to_string(), None, r#"{"name": "b"}"#),
        ("POST", "/api/v1/agents".to_string(), Some("application/x-www-form-urlencoded"), "name=b"),
        ("PATCH", format!("/api/v1/agents/{id}"), Some("text/json"), r#"{"labels": {}}"#),
        ("POST", format!("/api/v1/agents/{id}/heartbeat"), Some("multipart/form-data; boundary=x"), "--x--"),
        ("DELETE", format!("/api/v1/agents/{id}"), Some("application/json"), r#"{"really": true}"#),
        ("GET", "/api/v1/agents".to_string(), Some("application/json"), r#"{"q": 1}"#),
        ("POST", "/api/v1/plugins/p/deactivate".to_string(), Some("application/json"), r#"{"version": "1.0.0"}"#),
        ("POST", "/api/v1/plugins".to_string(), Some("application/json"), r#"{"wasm": ""}"#),
    ];
    for (method, path, content_type, body) in cases {
        let (status, headers, answer) = k.send(with(method, &path, content_type, body)).await;
        assert_envelope(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, &headers, &answer, "unsupported_media_type");
    }
    assert_eq!(stored_agents(&k).await, 1, "nothing created or deleted");
    let (_, got) = k.call("GET", &format!("/api/v1/agents/{id}"), None).await;
    assert_eq!(got["labels"], json!({}), "nothing patched");
    // The accepted forms: a JSON media type with parameters or a +json suffix, and empty
    // bodies without one.
    let (status, _, body) =
        k.send(with("POST", "/api/v1/agents", Some("application/json; charset=utf-8"), r#"{"name": "b"}"#)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _, body) =
        k.send(with("PATCH", &format!("/api/v1/agents/{id}"), Some("application/merge-patch+json"), "{}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(k.send(with("DELETE", &format!("/api/v1/agents/{id}"), None, "")).await.0, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn past_in_flight_max_a_request_is_503_at_once() {
    let k = Arc::new(start(|args| args.in_flight_max = Some(1)).await);
    // A request whose body never ends holds the only slot.
    let (sender, channel) = http_body_util::channel::Channel::<Bytes>::new(1);
    let held = Request::builder()
        .method("POST")
        .uri("/api/v1/agents")
        .header("authorization", format!("Bearer {}", k.key))
        .header("content-type", "application/json")
        .body(Body::new(channel))
        .expect("request");
    let slow = tokio::spawn({
        let k = k.clone();
        async move { k.send(held).await.0 }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, headers, body) =
        k.send(k.request("POST", "/api/v1/agents", Some(agent_json("b", "a.b", "1.0.0")))).await;
    assert_envelope(status, StatusCode::SERVICE_UNAVAILABLE, &headers, &body, "overloaded");
    assert_eq!(header(&headers, "retry-after"), "1");
    // Liveness and metrics answer whatever the load.
    let (status, _) = k.send_text(Request::builder().uri("/health").body(Body::empty()).expect("req")).await;
    assert_eq!(status, StatusCode::OK);
    drop(sender);
    assert_eq!(slow.await.expect("join"), StatusCode::BAD_REQUEST, "the held request ends with its empty body");
    assert_eq!(stored_agents(&k).await, 0);
    assert_eq!(k.call("POST", "/api/v1/agents", Some(agent_json("c", "a.b", "1.0.0"))).await.0, StatusCode::CREATED);
}

#[tokio::test]
async fn security_headers_are_on_200_401_404_429_and_errors() {
    let k = start(|_| {}).await;
    let path = k.db.dir.path().join("limits.toml");
    std::fs::write(&path, "[rate_limits]\nper_key = { per_second = 0.01, burst = 1 }\n").expect("write");
    let limited = start(|args| args.config = Some(path)).await;
    let get = |uri: &str| Request::builder().uri(uri).body(Body::empty()).expect("request");

    let (status, headers, _) = k.send(get("/health")).await;
    assert_eq!(status, StatusCode::OK);
    assert_security_headers(&headers, "200");
    let (status, headers, body) = k.send(get("/api/v1/agents")).await;
    assert_envelope(status, StatusCode::UNAUTHORIZED, &headers, &body, "unauthenticated");
    let (status, headers, body) = k.send(get("/nope")).await;
    assert_envelope(status, StatusCode::NOT_FOUND, &headers, &body, "not_found");
    let (status, headers, body) = k.send(k.request("PUT", "/health", None)).await;
    assert_envelope(status, StatusCode::METHOD_NOT_ALLOWED, &headers, &body, "method_not_allowed");
    assert_eq!(limited.call("GET", "/api/v1/agents", None).await.0, StatusCode::OK);
    let (status, headers, body) = limited.send(limited.request("GET", "/api/v1/agents", None)).await;
    assert_envelope(status, StatusCode::TOO_MANY_REQUESTS, &headers, &body, "rate_limited");
    assert!(header(&headers, "retry-after").parse::<u64>().is_ok_and(|s| (1..=100).contains(&s)), "{headers:?}");
}

/// Reads until the server closes the connection (or `wait` passes); returns what it sent and
/// whether it closed.
async fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> (String, bool) {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(wait, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&received).into_owned(), closed)
}

#[tokio::test]
async fn a_client_that_trickles_its_headers_is_disconnected() {
    let db = TestDb::new(Backend::Sqlite).await;
    let served = Process::start(&db, &[("NOPS_HEADER_READ_TIMEOUT_MS", "500")]).await;
    // Half a request, then nothing.
    let mut slow = TcpStream::connect(&served.addr()).await.expect("connect");
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: nops\r\nX-Slow: ").await.expect("write");
    // Nothing at all.
    let mut silent = TcpStream::connect(&served.addr()).await.expect("connect");
    // A client that keeps sending, a byte at a time, never finishing its headers.
    let mut dripping = TcpStream::connect(&served.addr()).await.expect("connect");
    let drip = tokio::spawn(async move {
        dripping.write_all(b"GET /health HTTP/1.1\r\nX-Drip: ").await.expect("write");
        for _ in 0..40 {
            if dripping.write_all(b"a").await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut buf = [0u8; 64];
        matches!(dripping.read(&mut buf).await, Ok(0) | Err(_))
    });
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(3)).await;
    assert!(closed, "the slow client was disconnected");
    let (sent, closed) = read_until_closed(&mut silent, Duration::from_secs(3)).await;
    assert!(closed && sent.is_empty(), "the silent client was disconnected: {sent:?}");
    assert!(drip.await.expect("join"), "the dripping client was disconnected");
    // A well-behaved client is served, with the security headers and no server banner.
    let response = reqwest::get(format!("http://{}/health", served.addr())).await.expect("health");
    assert_eq!(response.status(), 200);
    assert_security_headers(response.headers(), "a real 200");
    served.stop().await;
}

#[tokio::test]
async fn past_connections_max_a_connection_is_answered_503_and_closed() {
    let db = TestDb::new(Backend::Sqlite).await;
    let served = Process::start(&db, &[("NOPS_CONNECTIONS_MAX", "2")]).await;
    let held =
        [TcpStream::connect(&served.addr()).await.expect("a"), TcpStream::connect(&served.addr()).await.expect("b")];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(&served.addr()).await.expect("connect");
    third.write_all(b"GET /health HTTP/1.1\r\nHost: nops\r\n\r\n").await.expect("write");
    let (response, closed) = read_until_closed(&mut third, Duration::from_secs(5)).await;
    assert!(closed, "closed after the answer");
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    let lower = response.to_ascii_lowercase();
    for needle in ["content-type: application/json", "retry-after: 1", "strict-transport-security:", "x-request-id:"] {
        assert!(lower.contains(needle), "{needle} in {response}");
    }
    let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap_or_default()).expect("json body");
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    // Once the held connections close, new ones are served again.
    drop(held);
    let http = reqwest::Client::new();
    let mut status = None;
    for _ in 0..50 {
        if let Ok(response) = http.get(format!("http://{}/health", served.addr())).send().await
            && response.status() == 200
        {
            status = Some(200);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, Some(200));
    served.stop().await;
}

#[tokio::test]
async fn secrets_never_reach_logs_errors_or_metrics() {
    let db = TestDb::new(Backend::Sqlite).await;
    // The first start prints the bootstrap key once, by design; the second start is watched.
    let first = Process::start(&db, &[]).await;
    let key = first.bootstrap_key().expect("the first start prints the key");
    first.stop().await;
    let served = Process::start(&db, &[("NOPS_LOG", "debug"), ("RUST_LOG", "debug")]).await;
    let base = format!("http://{}", served.addr());
    let bogus_bearer = "nops_BogusBogusBogusBogusBogusBogus123456";
    let bogus_jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJzZWNyZXQtc3ViamVjdCJ9.c2VjcmV0LXNpZ25hdHVyZS12YWx1ZQ";
    let http = reqwest::Client::new();
    let ok = http.get(format!("{base}/api/v1/agents")).bearer_auth(&key).send().await.expect("request");
    assert_eq!(ok.status(), 200);
    let created = http
        .post(format!("{base}/api/v1/agents"))
        .bearer_auth(&key)
        .header("cookie", format!("session={key}"))
        .header("x-api-key", &key)
        .json(&agent_json("a", "a.b", "1.0.0"))
        .send()
        .await
        .expect("request");
    assert_eq!(created.status(), 201);
    for bogus in [bogus_bearer, bogus_jwt] {
        let refused = http.get(format!("{base}/api/v1/agents")).bearer_auth(bogus).send().await.expect("request");
        assert_eq!(refused.status(), 401);
        let text = refused.text().await.expect("body");
        assert!(!text.contains(bogus), "the error does not echo the credential: {text}");
    }
    let wrong_type = http
        .post(format!("{base}/api/v1/agents"))
        .bearer_auth(&key)
        .header("content-type", "text/plain")
        .body(key.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(wrong_type.status(), 415);
    assert!(!wrong_type.text().await.expect("body").contains(&key));
    let metrics = http.get(format!("{base}/metrics")).send().await.expect("metrics").text().await.expect("text");
    let output = served.stop().await;
    assert!(output.contains("\"level\":\"DEBUG\""), "debug logging was on:\n{output}");
    for secret in [key.as_str(), &key[5..], bogus_bearer, bogus_jwt, "c2VjcmV0LXNpZ25hdHVyZS12YWx1ZQ"] {
        assert!(!output.contains(secret), "a secret in the process output:\n{output}");
        assert!(!metrics.contains(secret), "a secret in the metrics");
    }
}
