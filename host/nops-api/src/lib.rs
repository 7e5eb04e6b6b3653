//! The HTTP edge of the NOPS kernel.
//!
//! [`router`] builds the whole axum application: health and metrics endpoints, the versioned
//! API under `/api/v1`, and the middleware every request passes through (request id, security
//! headers, tracing, metrics, limits, the JSON error envelope, authentication and
//! authorization). This crate knows HTTP and JSON; it never knows SQL or WebAssembly.

mod context;
mod error;
mod extract;
mod middleware;
mod routes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use nops_core::auth::{Authenticator, Authorizer};
use nops_core::metrics::Metrics;
use nops_core::registry::Registry;
use nops_core::store::Store;

pub use context::RequestContext;
pub use error::{ApiError, ErrorBody};

/// Limits of the HTTP edge.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request body accepted, in bytes.
    pub body_bytes_max: usize,
    /// Longest a request may take, end to end.
    pub request_timeout_ms: u64,
    /// Longest `/ready` and `/health/extended` wait for a component.
    pub probe_timeout_ms: u64,
    /// Largest plugin upload (component, manifest and configuration), in bytes.
    pub upload_bytes_max: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            body_bytes_max: 1024 * 1024,
            request_timeout_ms: 30_000,
            probe_timeout_ms: 2_000,
            upload_bytes_max: nops_core::plugin::WASM_BYTES_MAX + nops_core::plugin::CONFIG_BYTES_MAX + 64 * 1024,
        }
    }
}

/// Everything a handler can reach. Cloned on every request by axum's extractors, so it is
/// one `Arc` (a clone is one atomic increment, not one per field).
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    /// Shares `services` with every handler.
    pub fn new(services: Services) -> Self {
        Self(Arc::new(services))
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

/// The services and settings behind [`AppState`].
pub struct Services {
    /// The agent registry.
    pub registry: Arc<Registry>,
    /// The store, for readiness and pool metrics.
    pub store: Arc<dyn Store>,
    /// Who is calling.
    pub authenticator: Arc<dyn Authenticator>,
    /// What they may do.
    pub authorizer: Arc<dyn Authorizer>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// The plugin lifecycle and calls (`None` when the runtime is off).
    pub plugins: Option<Arc<nops_core::plugin::service::PluginService>>,
    /// Edge limits.
    pub http: HttpConfig,
    /// When the kernel started.
    pub started_at: Instant,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").field("http", &self.http).finish_non_exhaustive()
    }
}

/// The kernel's HTTP application.
pub fn router(state: AppState) -> Router {
    let api = routes::agents::router()
        .merge(routes::plugins::router(state.http.upload_bytes_max))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), middleware::authenticate));
    let timeout = Duration::from_millis(state.http.request_timeout_ms);
    let body_bytes_max = state.http.body_bytes_max;
    let router = Router::new()
        .merge(routes::health::router())
        .nest("/api/v1", api)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .with_state(state.clone());
    middleware::wrap(router, state, timeout, body_bytes_max)
}
