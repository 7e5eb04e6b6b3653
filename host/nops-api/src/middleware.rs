//! The middleware every request passes through.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, Method, StatusCode, header};
use nops_core::CoreError;
use nops_core::authz::AccessCheck;
use nops_core::plugin::call::{Attribute, Value};
use nops_core::tenant::TenantId;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::AppState;
use crate::context::{RequestContext, TENANT_HEADER};
use crate::error::{ApiError, ErrorBody, ErrorDetail, for_status};

/// The request id header, set on every request and response.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// Longest request id accepted from a client; longer or odd ones are replaced.
const REQUEST_ID_BYTES_MAX: usize = 128;

/// Security headers set on every response (unless a handler set them).
pub(crate) const SECURITY_HEADERS: &[(&str, &str)] = &[
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("content-security-policy", "default-src 'none'; frame-ancestors 'none'"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    ("permissions-policy", "()"),
    ("cache-control", "no-store"),
    ("strict-transport-security", "max-age=63072000; includeSubDomains"),
];

/// Wraps `router` in the layer stack shared by every route (outermost first below). The rate
/// limits themselves run in [`authenticate`], once the caller is known.
pub(crate) fn wrap(router: axum::Router, state: AppState, timeout: Duration, body_bytes_max: usize) -> axum::Router {
    if state.http.rate_limits.enabled {
        // Start the limiters now rather than on the first request.
        crate::ratelimit::LimiterSlot::get(&state);
    }
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(state.http.in_flight_max.max(1)));
    let limits = crate::hardening::Limits {
        headers_bytes_max: state.http.headers_bytes_max,
        json_depth_max: state.http.json_depth_max,
        body_bytes_max,
    };
    router.layer(
        ServiceBuilder::new()
            .layer(SetSensitiveRequestHeadersLayer::new([
                header::AUTHORIZATION,
                header::PROXY_AUTHORIZATION,
                header::COOKIE,
                HeaderName::from_static("x-api-key"),
            ]))
            .layer(from_fn(crate::hardening::strip_identifying_headers))
            .layer(from_fn(edge))
            .layer(from_fn(crate::ratelimit::refusal_headers))
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(|req: &Request| {
                        let request_id =
                            req.headers().get(&REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
                        tracing::info_span!("http", request_id, method = %req.method(), path = %req.uri().path())
                    })
                    .on_request(())
                    .on_response(|res: &Response, latency: Duration, _span: &tracing::Span| {
                        tracing::debug!(
                            status = res.status().as_u16(),
                            latency_us = latency.as_micros() as u64,
                            "response"
                        );
                    })
                    .on_failure(()),
            )
            .layer(from_fn_with_state(state, track_metrics))
            .layer(from_fn_with_state(in_flight, crate::hardening::limit_in_flight))
            .layer(CatchPanicLayer::custom(|_panic| ApiError::internal("handler panicked").into_response()))
            .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, timeout))
            .layer(from_fn_with_state(limits, crate::hardening::guard))
            .layer(axum::extract::DefaultBodyLimit::max(body_bytes_max)),
    )
}

/// The outermost middleware, in one layer because it runs on every request:
/// - gives the request an id (a well-formed client id is kept for end-to-end tracing; a
///   missing, overlong or odd one is replaced) and returns it in `x-request-id`;
/// - writes the JSON error body (with the request id) for every error response and logs the
///   error's detail once;
/// - sets the [`SECURITY_HEADERS`] that a handler did not set.
async fn edge(mut req: Request, next: Next) -> Response {
    let client_id_ok = req.headers().get(&REQUEST_ID_HEADER).is_some_and(|v| {
        !v.is_empty()
            && v.len() <= REQUEST_ID_BYTES_MAX
            && v.as_bytes().iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    });
    if !client_id_ok {
        let generated = uuid::Uuid::now_v7().hyphenated().to_string();
        // A hyphenated UUID is always a valid header value.
        if let Ok(value) = HeaderValue::from_str(&generated) {
            req.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
    }
    let request_id = req.headers().get(&REQUEST_ID_HEADER).cloned();
    let mut response = next.run(req).await;
    let status = response.status();
    if status.is_client_error() || status.is_server_error() {
        let id = request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or_default();
        write_error_body(&mut response, id);
    }
    let headers = response.headers_mut();
    if let Some(id) = request_id {
        headers.insert(REQUEST_ID_HEADER, id);
    }
    for (name, value) in SECURITY_HEADERS {
        let name = HeaderName::from_static(name);
        if !headers.contains_key(&name) {
            headers.insert(name, HeaderValue::from_static(value));
        }
    }
    response
}

/// Replaces the body of an error response with the JSON envelope.
pub(crate) fn write_error_body(response: &mut Response, request_id: &str) {
    let error = match response.extensions_mut().remove::<ApiError>() {
        Some(error) => error,
        None => {
            let is_json = response
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
            if is_json {
                return;
            }
            for_status(response.status())
        }
    };
    if error.status.is_server_error() {
        tracing::error!(
            request_id,
            code = error.code,
            detail = error.detail.as_deref().unwrap_or(""),
            "request failed"
        );
    } else {
        tracing::debug!(request_id, code = error.code, "request rejected");
    }
    let body = ErrorBody {
        error: ErrorDetail {
            code: error.code.to_string(),
            message: error.message.into_owned(),
            request_id: request_id.to_string(),
        },
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.remove(header::CONTENT_LENGTH);
    *response.body_mut() = Body::from(bytes);
}

/// Counts requests by matched route, method and status, and observes their latency.
async fn track_metrics(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let method = method_label(req.method());
    let metrics = &state.metrics;
    metrics.http_requests_in_flight.inc();
    let started = Instant::now();
    let response = next.run(req).await;
    metrics.http_requests_in_flight.dec();
    metrics.http_request_duration_seconds.with_label_values(&[&route, method]).observe(started.elapsed().as_secs_f64());
    metrics.http_requests_total.with_label_values(&[&route, method, response.status().as_str()]).inc();
    response
}

/// A bounded set of method labels, so odd methods cannot grow the metric's cardinality.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Authenticates the bearer credential, resolves the tenant, checks the credential's scopes
/// against the endpoint's, asks the authorizer, and puts the [`RequestContext`] in the
/// request's extensions.
pub(crate) async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let Some(bearer) = bearer.filter(|b| !b.is_empty()) else {
        state.metrics.auth_total.with_label_values(&["unknown", "failure", "missing"]).inc();
        return Err(ApiError::unauthenticated("missing bearer credential (Authorization: Bearer <credential>)"));
    };
    let method_label = credential_method(bearer);
    let principal = match state.authenticator.authenticate(bearer).await {
        Ok(principal) => {
            state.metrics.auth_total.with_label_values(&[principal.method.as_str(), "success", "ok"]).inc();
            principal
        }
        Err(CoreError::Unauthenticated { reason }) => {
            state.metrics.auth_total.with_label_values(&[method_label, "failure", reason]).inc();
            tracing::info!(target: "nops::audit", event = "auth.failure", method = method_label, reason, "authentication failed");
            return Err(ApiError::unauthenticated("invalid, expired or revoked credential"));
        }
        Err(other) => return Err(other.into()),
    };
    let tenant = match req.headers().get(TENANT_HEADER) {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.parse::<TenantId>().ok())
            .ok_or_else(|| ApiError::bad_request("invalid_tenant", "X-Nops-Tenant must be a valid tenant id"))?,
        None => principal.tenant.clone().unwrap_or_else(TenantId::default_tenant),
    };
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let Some(action) = state.access.required(req.method(), &route) else {
        tracing::error!(route, method = %req.method(), "endpoint declares no scope: refused");
        state.metrics.authz_decisions_total.with_label_values(&["deny", "undeclared"]).inc();
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "not allowed"));
    };
    if !principal.scopes.covers(action) {
        state.metrics.authz_decisions_total.with_label_values(&["deny", "scope"]).inc();
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            format!("this endpoint requires the scope `{action}`"),
        ));
    }
    let rate = crate::ratelimit::check(&state, &principal, &tenant, &route, req.method()).await?;
    let mut resource = resource_attributes(&req, &route);
    add_agent_labels(&state, &tenant, action, &mut resource).await?;
    let source = req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    let decision = state
        .authorizer
        .authorize(&AccessCheck {
            principal: &principal,
            action,
            tenant: &tenant,
            resource,
            source,
            now_ms: state.clock.now_ms(),
        })
        .await;
    if !decision.allow {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "not allowed"));
    }
    let masks = match label_masks(&decision.obligations) {
        Ok(masks) => masks,
        Err(unknown) => {
            // An obligation the kernel cannot fulfil must not be dropped silently: deny.
            tracing::warn!(target: "nops::decision", obligation = %unknown, "unknown obligation: request denied");
            return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "not allowed"));
        }
    };
    req.extensions_mut().insert(RequestContext { principal, tenant, obligations: decision.obligations });
    let mut response = next.run(req).await;
    if !masks.is_empty() {
        response = mask_labels(response, &masks).await;
    }
    rate.set_headers(response.headers_mut());
    Ok(response)
}

/// What a masked label's value becomes.
pub(crate) const MASKED: &str = "***";
/// Largest response body the label masks are applied to; a larger one is refused (500) rather
/// than sent unmasked.
const MASKED_BODY_BYTES_MAX: usize = 16 * 1024 * 1024;

/// The label keys of the `["mask", "labels.<key>"]` obligations; the first obligation of any
/// other form is an error.
fn label_masks(obligations: &[(String, String)]) -> Result<Vec<String>, String> {
    obligations
        .iter()
        .map(|(kind, target)| match (kind.as_str(), target.strip_prefix("labels.")) {
            ("mask", Some(key)) if !key.is_empty() => Ok(key.to_string()),
            _ => Err(format!("[{kind:?}, {target:?}]")),
        })
        .collect()
}

/// Replaces the value of every masked label in a JSON response (an agent, a page of agents,
/// anything with a `labels` object) with [`MASKED`].
async fn mask_labels(response: Response, masks: &[String]) -> Response {
    let is_json =
        response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !is_json || !response.status().is_success() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MASKED_BODY_BYTES_MAX).await else {
        return ApiError::internal("a response to mask was too large").into_response();
    };
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return ApiError::internal("a response to mask was not JSON").into_response();
    };
    mask_in(&mut value, masks);
    let bytes = serde_json::to_vec(&value).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(bytes))
}

fn mask_in(value: &mut serde_json::Value, masks: &[String]) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Object(labels)) = map.get_mut("labels") {
                for key in masks {
                    if let Some(v) = labels.get_mut(key) {
                        *v = serde_json::Value::String(MASKED.into());
                    }
                }
            }
            map.values_mut().for_each(|v| mask_in(v, masks));
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| mask_in(v, masks)),
        _ => {}
    }
}

/// The method a credential looks like, for failure metrics.
fn credential_method(bearer: &str) -> &'static str {
    if bearer.starts_with(nops_core::auth::API_KEY_PREFIX) {
        "api_key"
    } else if bearer.bytes().filter(|b| *b == b'.').count() == 2 {
        "jwt"
    } else {
        "unknown"
    }
}

/// Actions whose policy may depend on the agent's labels (the shipped policy protects agents
/// labelled `protected=true` from everyone but admins). Reads and heartbeats are not among
/// them, so the hot paths never read the store here.
const LABELLED_AGENT_ACTIONS: [&str; 2] = ["agents:write", "agents:delete"];

/// For a change to one agent, its labels as `resource.labels` (`key=value` texts). An agent
/// that does not exist (or an id that does not parse) gets none: the handler answers 404/400.
async fn add_agent_labels(
    state: &AppState,
    tenant: &TenantId,
    action: &str,
    resource: &mut Vec<Attribute>,
) -> Result<(), ApiError> {
    if !LABELLED_AGENT_ACTIONS.contains(&action)
        || !resource.iter().any(|a| a.name == "kind" && a.value == Value::Text("agents".into()))
    {
        return Ok(());
    }
    let Some(id) = resource.iter().find(|a| a.name == "id").and_then(|a| match &a.value {
        Value::Text(id) => id.parse::<nops_core::agent::AgentId>().ok(),
        _ => None,
    }) else {
        return Ok(());
    };
    match state.registry.get(tenant, id).await {
        Ok(agent) => {
            let labels = agent.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            resource.push(Attribute { name: "labels".into(), value: Value::Texts(labels) });
            Ok(())
        }
        Err(CoreError::NotFound { .. }) => Ok(()),
        Err(other) => Err(other.into()),
    }
}

/// The resource's attributes from the route: `kind` (the first segment after `/api/v1/`) and
/// `id` (the `{id}` or `{name}` path parameter).
fn resource_attributes(req: &Request, route: &str) -> Vec<Attribute> {
    let mut out = Vec::with_capacity(2);
    let rest = route.strip_prefix("/api/v1/").unwrap_or(route);
    let kind = rest.split('/').next().unwrap_or_default();
    if !kind.is_empty() {
        out.push(Attribute { name: "kind".into(), value: Value::Text(kind.to_string()) });
    }
    let route_segments: Vec<&str> = route.split('/').collect();
    // Inside the nested `/api/v1` router the URI has lost its prefix; the original has not.
    let path = req.extensions().get::<axum::extract::OriginalUri>().map_or_else(|| req.uri().path(), |u| u.0.path());
    let path_segments: Vec<&str> = path.split('/').collect();
    if route_segments.len() == path_segments.len() {
        for (pattern, actual) in route_segments.iter().zip(&path_segments) {
            if matches!(*pattern, "{id}" | "{name}") {
                out.push(Attribute { name: "id".into(), value: Value::Text((*actual).to_string()) });
                break;
            }
        }
    }
    out
}
