//! `/api/v1/agents`: the agent registry, heartbeats and lifecycle events.

use axum::extract::State;
use axum::response::IntoResponse;
use http::StatusCode;
use nops_core::agent::{
    Agent, AgentEvent, AgentId, AgentPatch, AgentStatus, Load, NewAgent, parse_label_selector, validate_capability_name,
};
use nops_core::registry::{AgentPage, AgentQuery, HeartbeatAck};
use nops_core::store::AgentFilter;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::extract::{Json, Path, Query};
use crate::openapi::ErrorBody;

/// Page size when the client names none.
const LIST_LIMIT_DEFAULT: u32 = 50;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_agents, create_agent))
        .routes(routes!(get_agent, update_agent, delete_agent))
        .routes(routes!(heartbeat))
        .routes(routes!(agent_events))
        .routes(routes!(tenant_events))
}

/// The page size a client asked for (or the default), within 1 and the configured maximum.
fn page_limit(state: &AppState, requested: Option<u32>) -> Result<u32, ApiError> {
    let limit_max = state.registry.config().list_limit_max;
    let limit = requested.unwrap_or(LIST_LIMIT_DEFAULT);
    if limit == 0 || limit > limit_max {
        return Err(ApiError::bad_request("invalid_query", format!("limit must be between 1 and {limit_max}")));
    }
    Ok(limit)
}

fn parse_id(raw: &str) -> Result<AgentId, ApiError> {
    raw.parse().map_err(ApiError::from)
}

/// Register an agent.
///
/// Registers an agent: `name` (unique within the tenant), optional `endpoint`, `labels` and
/// `capabilities`.
#[utoipa::path(
    post,
    path = "/agents",
    operation_id = "create_agent",
    tag = "agents",
    request_body(content = NewAgent, content_type = "application/json", description = "The agent to register"),
    responses(
        (status = 201, description = "Registered", body = Agent,
            headers(("Location" = String, description = "The agent's URL, `/api/v1/agents/{id}`"))),
        (status = 409, description = "`name_taken`: another agent of the tenant has this name; `limit_exceeded`: too many agents", body = ErrorBody),
        (status = 422, description = "`invalid_name`, `invalid_endpoint`, `invalid_label`, `invalid_capability`", body = ErrorBody),
    ),
    security(("bearer" = ["agents:write"])),
)]
async fn create_agent(
    State(state): State<AppState>,
    ctx: RequestContext,
    Json(new): Json<NewAgent>,
) -> Result<impl IntoResponse, ApiError> {
    let agent = state.registry.create(&ctx.tenant, new).await?;
    let location = format!("/api/v1/agents/{}", agent.id);
    Ok((StatusCode::CREATED, [(http::header::LOCATION, location)], axum::Json(agent)))
}

/// Show an agent.
///
/// One agent, with its latest heartbeat.
#[utoipa::path(
    get,
    path = "/agents/{id}",
    operation_id = "get_agent",
    tag = "agents",
    params(
        ("id" = String, Path, format = Uuid, description = "The agent's id"),
    ),
    responses(
        (status = 200, description = "The agent", body = Agent),
        (status = 400, description = "`invalid_id`: the id is not a UUID", body = ErrorBody),
        (status = 404, description = "`not_found`: no such agent in the tenant", body = ErrorBody),
    ),
    security(("bearer" = ["agents:read"])),
)]
async fn get_agent(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> Result<axum::Json<Agent>, ApiError> {
    Ok(axum::Json(state.registry.get(&ctx.tenant, parse_id(&id)?).await?))
}

/// Change an agent.
///
/// Replaces the fields the body names (`endpoint: null` removes the endpoint). With
/// `"revision": N` it applies only while the stored revision is still N.
#[utoipa::path(
    patch,
    path = "/agents/{id}",
    operation_id = "update_agent",
    tag = "agents",
    params(
        ("id" = String, Path, format = Uuid, description = "The agent's id"),
    ),
    request_body(content = AgentPatch, content_type = "application/json", description = "The fields to replace"),
    responses(
        (status = 200, description = "The changed agent", body = Agent),
        (status = 400, description = "`invalid_id`: the id is not a UUID", body = ErrorBody),
        (status = 404, description = "`not_found`: no such agent in the tenant", body = ErrorBody),
        (status = 409, description = "`name_taken`: another agent has this name; `revision_mismatch`: the agent changed since `revision`", body = ErrorBody),
        (status = 422, description = "`invalid_name`, `invalid_endpoint`, `invalid_label`, `invalid_capability`", body = ErrorBody),
    ),
    security(("bearer" = ["agents:write"])),
)]
async fn update_agent(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(patch): Json<AgentPatch>,
) -> Result<axum::Json<Agent>, ApiError> {
    let id = parse_id(&id)?;
    Ok(axum::Json(state.registry.update(&ctx.tenant, id, patch).await?))
}

/// Remove an agent.
///
/// Removes an agent; its events stay readable.
#[utoipa::path(
    delete,
    path = "/agents/{id}",
    operation_id = "delete_agent",
    tag = "agents",
    params(
        ("id" = String, Path, format = Uuid, description = "The agent's id"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "`invalid_id`: the id is not a UUID", body = ErrorBody),
        (status = 404, description = "`not_found`: no such agent in the tenant", body = ErrorBody),
    ),
    security(("bearer" = ["agents:delete"])),
)]
async fn delete_agent(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.registry.delete(&ctx.tenant, parse_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query parameters of `GET /api/v1/agents`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// Only agents providing this capability.
    capability: Option<String>,
    /// A semver requirement on that capability's version, e.g. `^1.2`.
    version: Option<String>,
    /// Only agents in this status.
    #[param(value_type = Option<AgentStatus>)]
    status: Option<String>,
    /// `key=value[,key=value…]`: only agents carrying all these labels.
    label: Option<String>,
    /// Page size (1 to the configured maximum, 500 by default; default 50).
    #[param(minimum = 1)]
    limit: Option<u32>,
    /// Cursor: the `next_after` of the previous page.
    #[param(format = Uuid)]
    after: Option<String>,
}

/// List agents.
///
/// The tenant's agents, ordered by id, filtered by capability (and its version), status and
/// labels, a page at a time.
#[utoipa::path(
    get,
    path = "/agents",
    operation_id = "list_agents",
    tag = "agents",
    params(ListParams),
    responses(
        (status = 200, description = "A page of agents", body = AgentPage),
        (status = 400, description = "`invalid_query`: a malformed filter, `version` without `capability`, `limit` out of range; `invalid_id`: `after` is not a UUID", body = ErrorBody),
        (status = 422, description = "`invalid_capability`: a malformed capability name", body = ErrorBody),
    ),
    security(("bearer" = ["agents:list"])),
)]
async fn list_agents(
    State(state): State<AppState>,
    ctx: RequestContext,
    Query(params): Query<ListParams>,
) -> Result<axum::Json<AgentPage>, ApiError> {
    if let Some(capability) = &params.capability {
        validate_capability_name(capability)?;
    }
    let version = params
        .version
        .as_deref()
        .map(|v| {
            v.parse::<semver::VersionReq>().map_err(|e| {
                ApiError::bad_request("invalid_query", format!("version is not a semver requirement: {e}"))
            })
        })
        .transpose()?;
    if version.is_some() && params.capability.is_none() {
        return Err(ApiError::bad_request("invalid_query", "version needs capability"));
    }
    let status = params
        .status
        .as_deref()
        .map(str::parse::<AgentStatus>)
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))?;
    let labels = params.label.as_deref().map(parse_label_selector).transpose()?.unwrap_or_default();
    let after = params.after.as_deref().map(parse_id).transpose()?;
    let limit = page_limit(&state, params.limit)?;
    let query = AgentQuery {
        filter: AgentFilter { tenant: Some(ctx.tenant), capability: params.capability, status, labels, after },
        version,
        limit,
    };
    Ok(axum::Json(state.registry.list(query).await?))
}

/// Send a heartbeat.
///
/// Reports liveness and load; the agent becomes `healthy`. Every field is optional: `{}` is a
/// valid heartbeat.
#[utoipa::path(
    post,
    path = "/agents/{id}/heartbeat",
    operation_id = "heartbeat",
    tag = "agents",
    params(
        ("id" = String, Path, format = Uuid, description = "The agent's id"),
    ),
    request_body(content = Load, content_type = "application/json", description = "Load and telemetry"),
    responses(
        (status = 200, description = "Recorded", body = HeartbeatAck),
        (status = 400, description = "`invalid_id`: the id is not a UUID", body = ErrorBody),
        (status = 404, description = "`not_found`: no such agent in the tenant", body = ErrorBody),
        (status = 422, description = "`invalid_heartbeat`: a value out of range", body = ErrorBody),
    ),
    security(("bearer" = ["agents:heartbeat"])),
)]
async fn heartbeat(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(load): Json<Load>,
) -> Result<axum::Json<HeartbeatAck>, ApiError> {
    let id = parse_id(&id)?;
    Ok(axum::Json(state.registry.heartbeat(&ctx.tenant, id, load).await?))
}

/// Query parameters of the event listings.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventParams {
    /// Only events with a greater sequence number.
    after: Option<i64>,
    /// Page size (1 to the configured maximum; default 50).
    #[param(minimum = 1)]
    limit: Option<u32>,
}

/// A page of events, oldest first.
#[derive(Debug, serde::Serialize, ToSchema)]
struct EventPage {
    /// The events.
    items: Vec<AgentEvent>,
    /// Pass as `after` for the next page; absent on the last page.
    next_after: Option<i64>,
}

/// An agent's events.
///
/// The agent's events, oldest first (also after its removal).
#[utoipa::path(
    get,
    path = "/agents/{id}/events",
    operation_id = "agent_events",
    tag = "agents",
    params(
        ("id" = String, Path, format = Uuid, description = "The agent's id"),
        EventParams,
    ),
    responses(
        (status = 200, description = "A page of the agent's events", body = EventPage),
        (status = 400, description = "`invalid_id`: the id is not a UUID; `invalid_query`: `limit` out of range", body = ErrorBody),
    ),
    security(("bearer" = ["agents:read"])),
)]
async fn agent_events(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Query(params): Query<EventParams>,
) -> Result<axum::Json<EventPage>, ApiError> {
    events_page(&state, &ctx, Some(parse_id(&id)?), params).await
}

/// The tenant's agent events.
///
/// Every agent event of the tenant, oldest first.
#[utoipa::path(
    get,
    path = "/agent-events",
    operation_id = "tenant_events",
    tag = "agents",
    params(EventParams),
    responses(
        (status = 200, description = "A page of events", body = EventPage),
        (status = 400, description = "`invalid_query`: `limit` out of range", body = ErrorBody),
    ),
    security(("bearer" = ["agents:list"])),
)]
async fn tenant_events(
    State(state): State<AppState>,
    ctx: RequestContext,
    Query(params): Query<EventParams>,
) -> Result<axum::Json<EventPage>, ApiError> {
    events_page(&state, &ctx, None, params).await
}

async fn events_page(
    state: &AppState,
    ctx: &RequestContext,
    agent: Option<AgentId>,
    params: EventParams,
) -> Result<axum::Json<EventPage>, ApiError> {
    let limit = page_limit(state, params.limit)?;
    let items = state.registry.events(&ctx.tenant, agent, params.after.unwrap_or(0), limit).await?;
    let next_after = (items.len() == limit as usize).then(|| items.last().map(|e| e.seq)).flatten();
    Ok(axum::Json(EventPage { items, next_after }))
}
