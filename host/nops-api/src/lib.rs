//! The HTTP edge of the NOPS kernel.
//!
//! [`router`] builds the whole axum application: health and metrics endpoints, the versioned
//! API under `/api/v1`, and the middleware every request passes through (request id, security
//! headers, tracing, metrics, limits, the JSON error envelope, authentication and
//! authorization). This crate knows HTTP and JSON; it never knows SQL or WebAssembly.

mod access;
mod context;
mod error;
mod extract;
mod hardening;
mod idempotency;
mod middleware;
mod openapi;
mod ratelimit;
mod routes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use nops_core::auth::Authenticator;
use nops_core::authz::Authorizer;
use nops_core::clock::Clock;
use nops_core::metrics::Metrics;
use nops_core::registry::Registry;
use nops_core::store::Store;

pub use access::AccessTable;
pub use context::RequestContext;
pub use error::{ApiError, ErrorBody};
pub use hardening::connection_refusal;
pub use idempotency::{IdempotencyConfig, run_sweeper as run_idempotency_sweeper};
pub use ratelimit::{LimiterSlot, OnStoreError, RateLimitConfig, RateQuota};

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
    /// Largest total of request header bytes (`name: value\r\n` each); more is 431.
    pub headers_bytes_max: usize,
    /// Deepest nesting of arrays and objects in a JSON body; deeper is 400 `json_too_deep`.
    pub json_depth_max: usize,
    /// Longest a client may take to send a request's headers (also how long an idle
    /// keep-alive connection stays open); a slower client is disconnected.
    pub header_read_timeout_ms: u64,
    /// Most open client connections; past it a new connection is answered 503 and closed.
    pub connections_max: usize,
    /// Most requests served at once; past it a request is answered 503 `overloaded`.
    pub in_flight_max: usize,
    /// Rate limits per credential, tenant and route.
    pub rate_limits: RateLimitConfig,
    /// The in-process rate limiter state (a clone starts empty).
    pub limiter: LimiterSlot,
    /// Idempotency keys on mutating endpoints.
    pub idempotency: IdempotencyConfig,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            body_bytes_max: 1024 * 1024,
            request_timeout_ms: 30_000,
            probe_timeout_ms: 2_000,
            upload_bytes_max: nops_core::plugin::WASM_BYTES_MAX + nops_core::plugin::CONFIG_BYTES_MAX + 64 * 1024,
            headers_bytes_max: 32 * 1024,
            json_depth_max: 32,
            header_read_timeout_ms: 30_000,
            connections_max: 8_192,
            in_flight_max: 2_048,
            rate_limits: RateLimitConfig::default(),
            limiter: LimiterSlot::default(),
            idempotency: IdempotencyConfig::default(),
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
    /// API key management.
    pub keys: Arc<nops_core::auth::keys::KeyService>,
    /// The scope each endpoint requires.
    pub access: AccessTable,
    /// Time, for access requests and key management.
    pub clock: Arc<dyn Clock>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// The plugin lifecycle and calls (`None` when the runtime is off).
    pub plugins: Option<Arc<nops_core::plugin::service::PluginService>>,
    /// Routing decisions, agent health and circuit breakers.
    pub routing: Arc<nops_core::routing::RoutingService>,
    /// Chaos toggles of this kernel.
    pub chaos: Arc<nops_core::chaos::Chaos>,
    /// SLOs measured by this kernel.
    pub slo: Arc<nops_core::slo::SloService>,
    /// Task dispatch: submit, read, pull and complete tasks.
    pub dispatch: Arc<nops_core::dispatch::TaskService>,
    /// The event bus: publish, consumer groups, dead letters, replay.
    pub events: Arc<nops_core::events::EventService>,
    /// Degraded modes: dependency states and the spool of critical writes.
    pub degraded: Arc<nops_core::degraded::DegradedModes>,
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

/// The scope every `/api/v1` endpoint requires, read from the OpenAPI document: each
/// operation's `security(("bearer" = ["<scope>"]))` annotation is the scope the middleware
/// enforces (one source of truth; an operation without exactly one scope is refused).
pub fn access_table() -> AccessTable {
    AccessTable::new(openapi::scopes())
}

/// The kernel's HTTP application: the routes of [`openapi::assemble`] (the same registration
/// that produces `/openapi.json`), `/api/v1` behind authentication.
pub fn router(state: AppState) -> Router {
    // Route layers added later run first: authentication, then idempotency keys.
    let (app, _document) = openapi::assemble(state.http.upload_bytes_max, |api| {
        api.route_layer(axum::middleware::from_fn_with_state(state.clone(), idempotency::idempotency))
            .route_layer(axum::middleware::from_fn_with_state(state.clone(), middleware::authenticate))
    });
    let timeout = Duration::from_millis(state.http.request_timeout_ms);
    let body_bytes_max = state.http.body_bytes_max;
    let router = app
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .with_state(state.clone());
    middleware::wrap(router, state, timeout, body_bytes_max)
}
