//! `/api/v1/agents`: the agent registry, heartbeats and lifecycle events.

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use http::StatusCode;
use nops_core::agent::{
    Agent, AgentEvent, AgentId, AgentPatch, AgentStatus, Load, NewAgent, parse_label_selector, validate_capability_name,
};
use nops_core::registry::{AgentPage, AgentQuery, HeartbeatAck};
use nops_core::store::AgentFilter;
use serde::Deserialize;

use crate::AppState;
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::extract::{Json, Path, Query};

/// Page size when the client names none.
const LIST_LIMIT_DEFAULT: u32 = 50;

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/agents", get(list_agents).post(create_agent))
        .route("/agents/{id}", get(get_agent).patch(update_agent).delete(delete_agent))
        .route("/agents/{id}/heartbeat", post(heartbeat))
        .route("/agents/{id}/events", get(agent_events))
        .route("/agent-events", get(tenant_events))
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

async fn create_agent(
    State(state): State<AppState>,
    ctx: RequestContext,
    Json(new): Json<NewAgent>,
) -> Result<impl IntoResponse, ApiError> {
    let agent = state.registry.create(&ctx.tenant, new).await?;
    let location = format!("/api/v1/agents/{}", agent.id);
    Ok((StatusCode::CREATED, [(http::header::LOCATION, location)], axum::Json(agent)))
}

async fn get_agent(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> Result<axum::Json<Agent>, ApiError> {
    Ok(axum::Json(state.registry.get(&ctx.tenant, parse_id(&id)?).await?))
}

async fn update_agent(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(patch): Json<AgentPatch>,
) -> Result<axum::Json<Agent>, ApiError> {
    let id = parse_id(&id)?;
    Ok(axum::Json(state.registry.update(&ctx.tenant, id, patch).await?))
}

async fn delete_agent(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.registry.delete(&ctx.tenant, parse_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query parameters of `GET /api/v1/agents`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    /// Only agents providing this capability.
    capability: Option<String>,
    /// A semver requirement on that capability's version, e.g. `^1.2`.
    version: Option<String>,
    /// Only agents in this status.
    status: Option<String>,
    /// `key=value[,key=value…]`: only agents carrying all these labels.
    label: Option<String>,
    /// Page size (1 to the configured maximum).
    limit: Option<u32>,
    /// Cursor: the `next_after` of the previous page.
    after: Option<String>,
}

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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventParams {
    /// Only events with a greater sequence number.
    after: Option<i64>,
    /// Page size.
    limit: Option<u32>,
}

/// A page of events.
#[derive(Debug, serde::Serialize)]
struct EventPage {
    items: Vec<AgentEvent>,
    /// Pass as `after` for the next page; absent on the last page.
    next_after: Option<i64>,
}

async fn agent_events(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Query(params): Query<EventParams>,
) -> Result<axum::Json<EventPage>, ApiError> {
    events_page(&state, &ctx, Some(parse_id(&id)?), params).await
}

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
