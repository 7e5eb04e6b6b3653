//! `POST /api/v1/route`: choose agents for a task; `GET /api/v1/agents/{id}/health`: an
//! agent's health score, dynamic weight and circuit breaker.

use axum::extract::State;
use nops_core::health::HealthView;
use nops_core::routing::{RouteDecision, RouteRequest, RoutingService};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::openapi::ErrorBody;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(route)).routes(routes!(agent_health))
}

/// Choose agents for a task.
///
/// Candidates are the tenant's agents with every required capability in an accepted version
/// and every label; stale agents and agents whose circuit breaker is open are left out; the
/// active scorer plugin ranks the rest (the built-in power of two choices answers when it
/// fails or none is active). Nothing changes: this is a decision only.
#[utoipa::path(
    post,
    path = "/route",
    operation_id = "route",
    tag = "routing",
    request_body(content = RouteRequest, content_type = "application/json", description = "What the task needs"),
    responses(
        (status = 200, description = "The decision (`chosen` is empty when no agent qualifies)", body = RouteDecision),
        (status = 400, description = "`malformed_json`: the body is not JSON", body = ErrorBody),
        (status = 422, description = "`invalid_body` (unknown field, bad version requirement), `invalid_route` (no capability, count out of range, too many hints), `invalid_capability`", body = ErrorBody),
    ),
    security(("bearer" = ["route:invoke"])),
)]
async fn route(
    State(state): State<AppState>,
    ctx: RequestContext,
    Json(request): Json<RouteRequest>,
) -> Result<axum::Json<RouteDecision>, ApiError> {
    // Called by path: a method call named `route` reads like an axum routing call.
    Ok(axum::Json(RoutingService::route(&state.routing, &ctx.tenant, &request).await?))
}

/// An agent's health.
///
/// Its health score, dynamic weight, peak-EWMA latency, error rate, load, silence and circuit
/// breaker, as routing sees them now.
#[utoipa::path(
    get,
    path = "/agents/{id}/health",
    operation_id = "agent_health",
    tag = "routing",
    params(
        ("id" = String, Path, format = Uuid, description = "The agent's id"),
    ),
    responses(
        (status = 200, description = "The health view", body = HealthView),
        (status = 400, description = "`invalid_id`: the id is not a UUID", body = ErrorBody),
        (status = 404, description = "`not_found`: no such agent in the tenant", body = ErrorBody),
    ),
    security(("bearer" = ["agents:read"])),
)]
async fn agent_health(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> Result<axum::Json<HealthView>, ApiError> {
    let id = id.parse().map_err(|_| ApiError::bad_request("invalid_id", "an agent id is a UUID"))?;
    Ok(axum::Json(state.routing.agent_health(&ctx.tenant, id)?))
}
