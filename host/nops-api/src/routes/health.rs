//! `/health`, `/ready`, `/health/extended` and `/metrics`.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::IntoResponse;
use http::{HeaderValue, StatusCode, header};
use nops_core::registry::RegistryHealth;
use prometheus::{Encoder, TextEncoder};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::ApiError;
use crate::openapi::ErrorBody;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(health_extended))
        .routes(routes!(metrics))
}

/// A probe's answer.
#[derive(Serialize, ToSchema)]
struct Probe {
    /// `ok` (liveness) or `ready` (readiness).
    #[schema(example = "ok")]
    status: &'static str,
}

/// Liveness.
///
/// Liveness: the process serves HTTP.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "health",
    responses((status = 200, description = "The process serves HTTP: `{\"status\": \"ok\"}`", body = Probe)),
)]
async fn health() -> impl IntoResponse {
    axum::Json(Probe { status: "ok" })
}

/// Readiness.
///
/// Readiness: the store answers within the probe timeout.
#[utoipa::path(
    get,
    path = "/ready",
    operation_id = "ready",
    tag = "health",
    responses(
        (status = 200, description = "The store answers: `{\"status\": \"ready\"}`", body = Probe),
        (status = 503, description = "`not_ready`: the store is unreachable or did not answer in time", body = ErrorBody),
    ),
)]
async fn ready(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let probe = Duration::from_millis(state.http.probe_timeout_ms);
    match tokio::time::timeout(probe, state.store.ping()).await {
        Ok(Ok(())) => Ok(axum::Json(Probe { status: "ready" })),
        Ok(Err(err)) => Err(ApiError {
            detail: Some(err.to_string()),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the store is unreachable")
        }),
        Err(_) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the store did not answer in time")),
    }
}

/// Each component's health.
#[derive(Serialize, ToSchema)]
struct ExtendedHealth {
    /// `ok`, or `degraded` when any component is not.
    #[schema(example = "ok")]
    status: &'static str,
    /// The kernel's version.
    version: &'static str,
    /// Time since the kernel started, in milliseconds.
    uptime_ms: u64,
    /// The components.
    components: HealthComponents,
}

/// The components of [`ExtendedHealth`].
#[derive(Serialize, ToSchema)]
struct HealthComponents {
    /// The store.
    store: StoreComponent,
    /// The registry's background work.
    registry: RegistryComponent,
    /// Dependencies seen down by the kernel's own probe and operations, the local spool of
    /// critical writes waiting for them, and the criticality matrix.
    degraded: nops_core::degraded::DegradedReport,
}

/// The store's health.
#[derive(Serialize, ToSchema)]
struct StoreComponent {
    /// `ok` or `down`.
    status: &'static str,
    /// `sqlite` or `postgres`.
    backend: &'static str,
    /// How long the ping took, in milliseconds.
    latency_ms: f64,
    /// Why the ping failed, if it did.
    error: Option<String>,
    /// Connections in the pool.
    pool_connections: u32,
    /// Idle connections in the pool.
    pool_idle_connections: u32,
    /// Most connections the pool opens.
    pool_max_connections: u32,
}

/// The registry's health.
#[derive(Serialize, ToSchema)]
struct RegistryComponent {
    /// `ok`, or `degraded` after a failed flush or sweep.
    status: &'static str,
    /// The background work's state.
    #[serde(flatten)]
    health: RegistryHealth,
}

/// Component health.
///
/// Each component's status and latency. `status` is `ok`, or `degraded` when any component is
/// not (and the response is then 503, so a load balancer can act on it).
#[utoipa::path(
    get,
    path = "/health/extended",
    operation_id = "health_extended",
    tag = "health",
    responses(
        (status = 200, description = "Every component is ok", body = ExtendedHealth),
        (status = 503, description = "A component is not ok (`status` is `degraded`); the body is the same health report", body = ExtendedHealth),
    ),
)]
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
    let degraded = state.degraded.report();
    let all_ok = store.status == "ok" && registry.status == "ok" && !degraded.degraded;
    let body = ExtendedHealth {
        status: if all_ok { "ok" } else { "degraded" },
        version: env!("CARGO_PKG_VERSION"),
        uptime_ms: state.started_at.elapsed().as_millis() as u64,
        components: HealthComponents { store, registry, degraded },
    };
    let status = if all_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body))
}

/// Prometheus metrics.
///
/// Prometheus text exposition of every kernel metric.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "observability",
    responses(
        (status = 200, description = "Every kernel metric, Prometheus text exposition format 0.0.4",
            content_type = "text/plain; version=0.0.4; charset=utf-8", body = String),
        (status = 500, description = "`internal`: the metrics could not be encoded", body = ErrorBody),
    ),
)]
async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let pool = state.store.pool_stats();
    state.metrics.store_pool_connections.set(i64::from(pool.size));
    state.metrics.store_pool_idle.set(i64::from(pool.idle));
    state.metrics.store_pool_max.set(i64::from(pool.max));
    state.routing.health_table().refresh_metrics();
    let encoder = TextEncoder::new();
    let mut buffer = Vec::with_capacity(16 * 1024);
    encoder
        .encode(&state.metrics.registry.gather(), &mut buffer)
        .map_err(|e| ApiError::internal(format!("encoding metrics: {e}")))?;
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))], buffer))
}
