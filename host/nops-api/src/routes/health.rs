//! `/health`, `/ready`, `/health/extended` and `/metrics`.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use http::{HeaderValue, StatusCode, header};
use nops_core::registry::RegistryHealth;
use prometheus::{Encoder, TextEncoder};
use serde::Serialize;
use serde_json::json;

use crate::AppState;
use crate::error::ApiError;

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/health/extended", get(health_extended))
        .route("/metrics", get(metrics))
}

/// Liveness: the process serves HTTP.
async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// Readiness: the store answers within the probe timeout.
async fn ready(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let probe = Duration::from_millis(state.http.probe_timeout_ms);
    match tokio::time::timeout(probe, state.store.ping()).await {
        Ok(Ok(())) => Ok(axum::Json(json!({"status": "ready"}))),
        Ok(Err(err)) => Err(ApiError {
            detail: Some(err.to_string()),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the store is unreachable")
        }),
        Err(_) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the store did not answer in time")),
    }
}

#[derive(Serialize)]
struct Extended {
    status: &'static str,
    version: &'static str,
    uptime_ms: u64,
    components: Components,
}

#[derive(Serialize)]
struct Components {
    store: StoreComponent,
    registry: RegistryComponent,
}

#[derive(Serialize)]
struct StoreComponent {
    status: &'static str,
    backend: &'static str,
    latency_ms: f64,
    error: Option<String>,
    pool_connections: u32,
    pool_idle_connections: u32,
    pool_max_connections: u32,
}

#[derive(Serialize)]
struct RegistryComponent {
    status: &'static str,
    #[serde(flatten)]
    health: RegistryHealth,
}

/// Each component's status and latency. `status` is `ok`, or `degraded` when any component is
/// not (and the response is then 503, so a load balancer can act on it).
async fn health_extended(State(state): State<AppState>) -> impl IntoResponse {
    let probe = Duration::from_millis(state.http.probe_timeout_ms);
    let started = Instant::now();
    let ping = tokio::time::timeout(probe, state.store.ping()).await;
    let latency_ms = started.elapsed().as_secs_f64() * 1e3;
    let error = match ping {
        Ok(Ok(())) => None,
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "store ping failed");
            Some("unreachable".to_string())
        }
        Err(_) => Some(format!("no answer within {} ms", state.http.probe_timeout_ms)),
    };
    let pool = state.store.pool_stats();
    let store = StoreComponent {
        status: if error.is_none() { "ok" } else { "down" },
        backend: state.store.backend(),
        latency_ms,
        error,
        pool_connections: pool.size,
        pool_idle_connections: pool.idle,
        pool_max_connections: pool.max,
    };
    let health = state.registry.health();
    let registry = RegistryComponent { status: if health.last_error.is_none() { "ok" } else { "degraded" }, health };
    let all_ok = store.status == "ok" && registry.status == "ok";
    let body = Extended {
        status: if all_ok { "ok" } else { "degraded" },
        version: env!("CARGO_PKG_VERSION"),
        uptime_ms: state.started_at.elapsed().as_millis() as u64,
        components: Components { store, registry },
    };
    let status = if all_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body))
}

/// Prometheus text exposition of every kernel metric.
async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let pool = state.store.pool_stats();
    state.metrics.store_pool_connections.set(i64::from(pool.size));
    state.metrics.store_pool_idle.set(i64::from(pool.idle));
    state.metrics.store_pool_max.set(i64::from(pool.max));
    let encoder = TextEncoder::new();
    let mut buffer = Vec::with_capacity(16 * 1024);
    encoder
        .encode(&state.metrics.registry.gather(), &mut buffer)
        .map_err(|e| ApiError::internal(format!("encoding metrics: {e}")))?;
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))], buffer))
}
