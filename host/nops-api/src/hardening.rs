//! Edge limits that keep one client from exhausting the kernel, and strict request shapes.
//!
//! - [`limit_in_flight`]: at most `in_flight_max` requests are served at once; past that a
//!   request is refused at once with 503 `overloaded` (and `Retry-After: 1`) rather than
//!   queued. `/health` and `/metrics` are exempt, so probes and scrapes still answer.
//! - [`guard`], on every request, in order:
//!   1. request headers larger than `headers_bytes_max` in total → 431 `headers_too_large`;
//!   2. on a matched route, a request with a body must send the media type the endpoint reads,
//!      as its OpenAPI operation declares it (the same registration routes it):
//!      `application/json` (or `application/*+json`), `multipart/form-data` (the plugin
//!      upload), and no body at all on operations without a `requestBody` (every GET and
//!      DELETE, `POST …/deactivate`, `POST …/revoke`) → otherwise 415 `unsupported_media_type`;
//!   3. a JSON body is read (at most `body_bytes_max`, else 413) and scanned: nested deeper
//!      than `json_depth_max` → 400 `json_too_deep`, before serde sees it.
//! - [`strip_identifying_headers`]: no `server` or `x-powered-by` header leaves the kernel.
//!
//! Every refusal is an [`ApiError`], so it leaves in the JSON envelope with the security
//! headers, and never reaches a handler: nothing changes.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, Method, StatusCode, header};
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// The media type of multipart bodies.
const MULTIPART: &str = "multipart/form-data";
/// Paths served whatever the load: liveness and metrics.
const EXEMPT_FROM_IN_FLIGHT: &[&str] = &["/health", "/metrics"];

/// The limits [`guard`] applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) headers_bytes_max: usize,
    pub(crate) json_depth_max: usize,
    pub(crate) body_bytes_max: usize,
}

/// Refuses a request with 503 when `in_flight_max` requests are already being served.
pub(crate) async fn limit_in_flight(State(slots): State<Arc<Semaphore>>, req: Request, next: Next) -> Response {
    if EXEMPT_FROM_IN_FLIGHT.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let Ok(_permit) = slots.try_acquire() else {
        let mut response =
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "too many requests in flight; retry shortly")
                .into_response();
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    next.run(req).await
}

/// What body an endpoint reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    None,
    Json,
    Multipart,
}

/// What body each documented operation reads, by route and method, from the OpenAPI
/// document: no `requestBody` → none; `multipart/form-data` → multipart; else JSON.
fn documented_kinds() -> &'static HashMap<String, Vec<(Method, BodyKind)>> {
    static KINDS: OnceLock<HashMap<String, Vec<(Method, BodyKind)>>> = OnceLock::new();
    KINDS.get_or_init(|| {
        let mut kinds: HashMap<String, Vec<(Method, BodyKind)>> = HashMap::new();
        for (path, item) in &crate::openapi::document().paths.paths {
            let operations = [
                (Method::GET, &item.get),
                (Method::HEAD, &item.head),
                (Method::POST, &item.post),
                (Method::PUT, &item.put),
                (Method::PATCH, &item.patch),
                (Method::DELETE, &item.delete),
                (Method::OPTIONS, &item.options),
            ];
            for (method, operation) in operations {
                let Some(operation) = operation else { continue };
                let kind = match &operation.request_body {
                    None => BodyKind::None,
                    Some(body) if body.content.contains_key(MULTIPART) => BodyKind::Multipart,
                    Some(_) => BodyKind::Json,
                };
                kinds.entry(path.clone()).or_default().push((method, kind));
            }
        }
        kinds
    })
}

fn body_kind(method: &Method, route: &str) -> BodyKind {
    let documented = documented_kinds().get(route).and_then(|ops| ops.iter().find(|(m, _)| m == method));
    match (documented, method) {
        (Some((_, kind)), _) => *kind,
        // An undocumented operation (none today): by its method.
        (None, &Method::POST | &Method::PUT | &Method::PATCH) => BodyKind::Json,
        (None, _) => BodyKind::None,
    }
}

/// Request header bytes as on the wire: `name: value\r\n` for each.
pub(crate) fn header_bytes(headers: &http::HeaderMap) -> usize {
    headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum()
}

fn media_type(req: &Request) -> Option<String> {
    let value = req.headers().get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
}

fn is_json(media: &str) -> bool {
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

/// Applies the header size, media type and JSON depth rules.
pub(crate) async fn guard(State(limits): State<Limits>, req: Request, next: Next) -> Result<Response, ApiError> {
    if header_bytes(req.headers()) > limits.headers_bytes_max {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("request headers exceed {} bytes", limits.headers_bytes_max),
        ));
    }
    // Unmatched paths are 404 (or 405) whatever they carry.
    let Some(route) = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()) else {
        return Ok(next.run(req).await);
    };
    if req.body().size_hint().exact() == Some(0) {
        return Ok(next.run(req).await);
    }
    let media = media_type(&req);
    let unsupported =
        |message: &'static str| ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", message);
    match body_kind(req.method(), &route) {
        BodyKind::None => Err(unsupported("this endpoint takes no request body")),
        BodyKind::Multipart if media.as_deref() == Some(MULTIPART) => Ok(next.run(req).await),
        BodyKind::Multipart => Err(unsupported("expected Content-Type: multipart/form-data")),
        BodyKind::Json if !media.as_deref().is_some_and(is_json) => {
            Err(unsupported("expected Content-Type: application/json"))
        }
        BodyKind::Json => {
            let (parts, body) = req.into_parts();
            let bytes = read_body(body, limits.body_bytes_max).await?;
            if json_depth_exceeds(&bytes, limits.json_depth_max) {
                return Err(ApiError::bad_request(
                    "json_too_deep",
                    format!("the JSON body nests deeper than {} levels", limits.json_depth_max),
                ));
            }
            Ok(next.run(Request::from_parts(parts, Body::from(bytes))).await)
        }
    }
}

/// The whole body, refused with 413 past `bytes_max`.
async fn read_body(mut body: Body, bytes_max: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "request body too large");
    if body.size_hint().lower() > bytes_max as u64 {
        return Err(too_large());
    }
    let mut buffer: Vec<u8> = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|_| ApiError::bad_request("bad_request", "could not read the request body"))?;
        if let Ok(data) = frame.into_data() {
            if buffer.len() + data.len() > bytes_max {
                return Err(too_large());
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buffer))
}

/// True when `bytes` nest arrays and objects deeper than `depth_max`. Brackets inside strings
/// do not count; the scan needs no valid JSON (serde reports malformed input afterwards).
pub(crate) fn json_depth_exceeds(bytes: &[u8], depth_max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in bytes {
        if in_string {
            // `"` and `\` never occur inside a multi-byte UTF-8 sequence.
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > depth_max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The whole HTTP/1.1 response to a connection refused because `connections_max` are open:
/// 503 `overloaded` in the JSON envelope, with the security headers, closing the connection.
/// The connection loop writes it without running the router, so it stays cheap under a flood.
pub fn connection_refusal(request_id: &str) -> String {
    let body = serde_json::json!({
        "error": {"code": "overloaded", "message": "too many open connections; retry shortly", "request_id": request_id}
    })
    .to_string();
    let mut head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\nretry-after: 1\r\nx-request-id: {request_id}\r\n",
        body.len()
    );
    for (name, value) in crate::middleware::SECURITY_HEADERS {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head + &body
}

/// Removes headers that name the software serving the response.
pub(crate) async fn strip_identifying_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    headers.remove(header::SERVER);
    headers.remove(HeaderName::from_static("x-powered-by"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_brackets_outside_strings_only() {
        assert!(!json_depth_exceeds(br#"{"a": [1, {"b": 2}]}"#, 3));
        assert!(json_depth_exceeds(br#"{"a": [1, {"b": 2}]}"#, 2));
        assert!(!json_depth_exceeds(br#"{"a": "[[[[[[[[{{{{{{"}"#, 1));
        assert!(!json_depth_exceeds(br#"{"a": "\"[[[[[[", "b": "\\"}"#, 1));
        assert!(json_depth_exceeds(br#"{"a": "\\", "b": [[1]]}"#, 2), "an escaped backslash ends the escape");
        assert!(json_depth_exceeds("[".repeat(33).as_bytes(), 32));
        assert!(!json_depth_exceeds("[".repeat(32).as_bytes(), 32));
        assert!(!json_depth_exceeds("{\"é[\": \"ü{\"}".as_bytes(), 1));
    }

    #[test]
    fn endpoints_read_the_bodies_they_declare() {
        assert_eq!(body_kind(&Method::POST, "/api/v1/plugins"), BodyKind::Multipart);
        assert_eq!(body_kind(&Method::POST, "/api/v1/plugins/{name}/deactivate"), BodyKind::None);
        assert_eq!(body_kind(&Method::POST, "/api/v1/plugins/{name}/activate"), BodyKind::Json);
        assert_eq!(body_kind(&Method::GET, "/api/v1/agents"), BodyKind::None);
        assert_eq!(body_kind(&Method::PATCH, "/api/v1/agents/{id}"), BodyKind::Json);
        assert_eq!(body_kind(&Method::DELETE, "/api/v1/agents/{id}"), BodyKind::None);
        assert!(is_json("application/json") && is_json("application/merge-patch+json") && !is_json("text/json"));
    }
}
