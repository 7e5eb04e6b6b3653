//! `/api/v1/admin/chaos`: list, create, delete and clear chaos toggles.
//!
//! A toggle applies to the tenant the request acts in, or (`kernel_wide`, kernel-wide admins
//! only) to every tenant. A tenant-bound admin sees and changes its own tenant's toggles only;
//! a kernel-wide admin sees and changes every toggle. Toggles belong to the kernel process that
//! received the request.

use axum::extract::State;
use axum::response::IntoResponse;
use http::StatusCode;
use nops_core::chaos::{ChaosScope, NewToggle, Toggle};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::openapi::ErrorBody;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list, create, clear)).routes(routes!(delete))
}

/// The toggles on now.
#[derive(Debug, Serialize, ToSchema)]
struct TogglePage {
    /// The toggles, oldest first.
    toggles: Vec<Toggle>,
    /// The most that may be on at once on this kernel.
    toggles_max: usize,
}

/// The toggles on now that the caller may see (a tenant-bound admin: its tenant's; a
/// kernel-wide admin: all). Expired toggles are ended first.
#[utoipa::path(
    get,
    path = "/admin/chaos",
    operation_id = "list_chaos_toggles",
    tag = "chaos",
    summary = "List chaos toggles",
    responses((status = 200, description = "The toggles on now", body = TogglePage)),
    security(("bearer" = ["chaos:read"])),
)]
async fn list(State(state): State<AppState>, ctx: RequestContext) -> axum::Json<TogglePage> {
    let scope = ChaosScope::of(&ctx.principal, &ctx.tenant);
    axum::Json(TogglePage { toggles: state.chaos.list(&scope).await, toggles_max: state.chaos.config().toggles_max })
}

/// Turns a toggle on: latency, errors or drops injected into `dispatch`, `store`, `bus` or
/// `plugin` calls of the request's tenant (or, with `kernel_wide`, of every tenant). It ends
/// on its own after `duration_ms` (default 10 minutes).
#[utoipa::path(
    post,
    path = "/admin/chaos",
    operation_id = "create_chaos_toggle",
    tag = "chaos",
    summary = "Create a chaos toggle",
    request_body(content = NewToggle, content_type = "application/json", description = "The toggle"),
    responses(
        (status = 201, description = "On", body = Toggle,
            headers(("Location" = String, description = "The toggle's URL"))),
        (status = 400, description = "`malformed_json`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not an admin, or a kernel-wide toggle by a tenant-bound admin", body = ErrorBody),
        (status = 409, description = "`limit_exceeded`: `toggles_max` toggles are on", body = ErrorBody),
        (status = 422, description = "`invalid_body` (unknown target or field, wrong type), `invalid_ratio`, `invalid_latency`, `invalid_duration`, `invalid_note`, `no_fault`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`: the change event could not be recorded; nothing changed", body = ErrorBody),
    ),
    security(("bearer" = ["chaos:write"])),
)]
async fn create(
    State(state): State<AppState>,
    ctx: RequestContext,
    Json(new): Json<NewToggle>,
) -> Result<impl IntoResponse, ApiError> {
    let toggle = state.chaos.create(&ctx.principal, &ctx.tenant, new).await?;
    let location = format!("/api/v1/admin/chaos/{}", toggle.id);
    Ok((StatusCode::CREATED, [(http::header::LOCATION, location)], axum::Json(toggle)))
}

/// What a clear turned off.
#[derive(Debug, Serialize, ToSchema)]
struct Cleared {
    /// The toggles turned off.
    cleared: Vec<Toggle>,
}

/// Turns off every toggle the caller may change (a tenant-bound admin: its tenant's; a
/// kernel-wide admin: all).
#[utoipa::path(
    delete,
    path = "/admin/chaos",
    operation_id = "clear_chaos_toggles",
    tag = "chaos",
    summary = "Clear chaos toggles",
    responses((status = 200, description = "The toggles turned off", body = Cleared)),
    security(("bearer" = ["chaos:write"])),
)]
async fn clear(State(state): State<AppState>, ctx: RequestContext) -> Result<axum::Json<Cleared>, ApiError> {
    let scope = ChaosScope::of(&ctx.principal, &ctx.tenant);
    Ok(axum::Json(Cleared { cleared: state.chaos.clear(&ctx.principal, &scope).await? }))
}

/// Turns one toggle off.
#[utoipa::path(
    delete,
    path = "/admin/chaos/{id}",
    operation_id = "delete_chaos_toggle",
    tag = "chaos",
    summary = "Delete a chaos toggle",
    params(("id" = String, Path, description = "The toggle id (UUID)")),
    responses(
        (status = 200, description = "The toggle, now off", body = Toggle),
        (status = 400, description = "`invalid_id`", body = ErrorBody),
        (status = 404, description = "No such toggle on (or not the caller's to see)", body = ErrorBody),
    ),
    security(("bearer" = ["chaos:write"])),
)]
async fn delete(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> Result<axum::Json<Toggle>, ApiError> {
    let id: Uuid = id.parse().map_err(|_| ApiError::bad_request("invalid_id", "a toggle id is a UUID"))?;
    let scope = ChaosScope::of(&ctx.principal, &ctx.tenant);
    Ok(axum::Json(state.chaos.delete(&ctx.principal, &scope, id).await?))
}
