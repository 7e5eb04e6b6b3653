//! `/api/v1/admin/api-keys`: create, list, show, rotate and revoke API keys; and `/api/v1/whoami`.
//!
//! Keys act within the tenant the request acts in; a kernel-wide principal also sees the
//! kernel-wide keys. A key's secret is in the response to `create` and `rotate`, once.

use axum::extract::State;
use axum::response::IntoResponse;
use http::StatusCode;
use nops_core::auth::keys::{IssuedKey, KeyScope, KeyView, NewKey};
use nops_core::auth::{AuthMethod, Role};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::extract::{Json, Path, Query};
use crate::openapi::ErrorBody;

/// Page size when the client names none.
const LIST_LIMIT_DEFAULT: u32 = 50;
/// Largest page.
const LIST_LIMIT_MAX: u32 = 500;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show))
        .routes(routes!(rotate))
        .routes(routes!(revoke))
        .routes(routes!(whoami))
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse().map_err(|_| ApiError::bad_request("invalid_id", "a key id is a UUID"))
}

/// A key and its secret, shown once.
#[derive(Debug, Serialize, ToSchema)]
struct Issued {
    /// The key.
    key: KeyView,
    /// The secret: store it now, it is never shown again.
    #[schema(example = "nops_2bX0kq…")]
    secret: String,
    /// The key this one replaced (rotations only), now in its grace period.
    #[serde(skip_serializing_if = "Option::is_none")]
    previous: Option<KeyView>,
}

impl Issued {
    fn new(issued: IssuedKey, previous: Option<KeyView>) -> Self {
        Self { key: issued.key, secret: issued.secret.secret, previous }
    }
}

/// Creates a key in the tenant the request acts in (or, with `kernel_wide`, a kernel-wide key)
/// and returns its secret, once. Its scopes are capped by the caller's.
#[utoipa::path(
    post,
    path = "/admin/api-keys",
    operation_id = "create_api_key",
    tag = "keys",
    summary = "Create an API key",
    request_body(content = NewKey, content_type = "application/json", description = "The key to create"),
    responses(
        (status = 201, description = "Created; the secret is shown this once", body = Issued,
            headers(("Location" = String, description = "The key's URL"))),
        (status = 409, description = "`limit_exceeded`: too many live keys in the tenant", body = ErrorBody),
        (status = 422, description = "`invalid_name`, `invalid_subject`, `invalid_scope`, `invalid_expiry`, `scope_escalation`", body = ErrorBody),
    ),
    security(("bearer" = ["keys:create"])),
)]
async fn create(
    State(state): State<AppState>,
    ctx: RequestContext,
    Json(new): Json<NewKey>,
) -> Result<impl IntoResponse, ApiError> {
    let issued = state.keys.create(&ctx.principal, &ctx.tenant, new).await?;
    let location = format!("/api/v1/admin/api-keys/{}", issued.key.id);
    Ok((StatusCode::CREATED, [(http::header::LOCATION, location)], axum::Json(Issued::new(issued, None))))
}

/// Query of `GET /admin/api-keys`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// List the kernel-wide keys instead of the tenant's (kernel-wide callers only).
    #[serde(default)]
    kernel: bool,
    /// Cursor: `next_after` of the previous page.
    after: Option<String>,
    /// Page size, 1 to 500 (default 50).
    limit: Option<u32>,
}

/// A page of keys.
#[derive(Debug, Serialize, ToSchema)]
struct KeyPage {
    /// The keys, by id.
    keys: Vec<KeyView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid)]
    next_after: Option<Uuid>,
}

/// The tenant's keys (or the kernel-wide keys), by id, without secrets.
#[utoipa::path(
    get,
    path = "/admin/api-keys",
    operation_id = "list_api_keys",
    tag = "keys",
    summary = "List API keys",
    params(ListParams),
    responses(
        (status = 200, description = "A page of keys", body = KeyPage),
        (status = 400, description = "`invalid_query`, `invalid_id`", body = ErrorBody),
    ),
    security(("bearer" = ["keys:list"])),
)]
async fn list(
    State(state): State<AppState>,
    ctx: RequestContext,
    Query(params): Query<ListParams>,
) -> Result<axum::Json<KeyPage>, ApiError> {
    let limit = params.limit.unwrap_or(LIST_LIMIT_DEFAULT);
    if limit == 0 || limit > LIST_LIMIT_MAX {
        return Err(ApiError::bad_request("invalid_query", format!("limit must be between 1 and {LIST_LIMIT_MAX}")));
    }
    let after = params.after.as_deref().map(parse_id).transpose()?;
    let scope = KeyScope::of(&ctx.principal, &ctx.tenant);
    let keys = state.keys.list(&scope, params.kernel, after, limit).await?;
    let next_after = (keys.len() == limit as usize).then(|| keys.last().map(|k| k.id)).flatten();
    Ok(axum::Json(KeyPage { keys, next_after }))
}

/// One key, without its secret.
#[utoipa::path(
    get,
    path = "/admin/api-keys/{id}",
    operation_id = "show_api_key",
    tag = "keys",
    summary = "Show an API key",
    params(("id" = String, Path, description = "The key id (UUID)")),
    responses(
        (status = 200, description = "The key", body = KeyView),
        (status = 400, description = "`invalid_id`", body = ErrorBody),
        (status = 404, description = "No such key in the tenant", body = ErrorBody),
    ),
    security(("bearer" = ["keys:read"])),
)]
async fn show(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> Result<axum::Json<KeyView>, ApiError> {
    let scope = KeyScope::of(&ctx.principal, &ctx.tenant);
    Ok(axum::Json(state.keys.show(&scope, parse_id(&id)?).await?))
}

/// Body of `POST /admin/api-keys/{id}/rotate`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// How long the old key keeps working, in seconds (default 86400, at most 30 days; 0
    /// stops it at once).
    grace_s: Option<u64>,
    /// Lifetime of the new key in seconds; the old key's expiry when omitted.
    expires_in_s: Option<u64>,
}

/// Replaces a key with a new one of the same name, tenant, role, subject and scopes. Both work
/// until the grace period ends; then only the new one.
#[utoipa::path(
    post,
    path = "/admin/api-keys/{id}/rotate",
    operation_id = "rotate_api_key",
    tag = "keys",
    summary = "Rotate an API key",
    params(("id" = String, Path, description = "The key id (UUID)")),
    request_body(content = Option<RotateBody>, content_type = "application/json", description = "Optional: the grace period"),
    responses(
        (status = 200, description = "The new key, its secret (once) and the old key in its grace period", body = Issued),
        (status = 400, description = "`invalid_id`", body = ErrorBody),
        (status = 404, description = "No such key in the tenant", body = ErrorBody),
        (status = 409, description = "`already_rotated`, `key_not_active`, `key_changed`", body = ErrorBody),
        (status = 422, description = "`invalid_grace`, `invalid_expiry`, `scope_escalation`", body = ErrorBody),
    ),
    security(("bearer" = ["keys:rotate"])),
)]
async fn rotate(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    body: Option<Json<RotateBody>>,
) -> Result<axum::Json<Issued>, ApiError> {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let scope = KeyScope::of(&ctx.principal, &ctx.tenant);
    let (issued, previous) =
        state.keys.rotate(&ctx.principal, &scope, parse_id(&id)?, body.grace_s, body.expires_in_s).await?;
    Ok(axum::Json(Issued::new(issued, Some(previous))))
}

/// Revokes a key at once (within the key cache's 5 s on other replicas).
#[utoipa::path(
    post,
    path = "/admin/api-keys/{id}/revoke",
    operation_id = "revoke_api_key",
    tag = "keys",
    summary = "Revoke an API key",
    params(("id" = String, Path, description = "The key id (UUID)")),
    responses(
        (status = 200, description = "The revoked key", body = KeyView),
        (status = 400, description = "`invalid_id`", body = ErrorBody),
        (status = 404, description = "No such key in the tenant", body = ErrorBody),
        (status = 409, description = "`already_revoked`", body = ErrorBody),
    ),
    security(("bearer" = ["keys:revoke"])),
)]
async fn revoke(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> Result<axum::Json<KeyView>, ApiError> {
    let scope = KeyScope::of(&ctx.principal, &ctx.tenant);
    Ok(axum::Json(state.keys.revoke(&ctx.principal, &scope, parse_id(&id)?).await?))
}

/// Who the credential speaks for, as the kernel sees it.
#[derive(Debug, Serialize, ToSchema)]
struct WhoAmI {
    /// The subject: a key's subject or id, a token's `sub`, a workload's SPIFFE ID.
    subject: String,
    /// The principal's tenant; absent for a kernel-wide principal.
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    /// The tenant this request acted in.
    acting_in: String,
    /// The role.
    role: Role,
    /// How it authenticated.
    method: AuthMethod,
    /// Its scopes.
    scopes: Vec<String>,
}

/// The calling principal: subject, tenant, role, method and scopes. Every role may ask.
#[utoipa::path(
    get,
    path = "/whoami",
    operation_id = "whoami",
    tag = "keys",
    summary = "Who am I",
    responses((status = 200, description = "The calling principal", body = WhoAmI)),
    security(("bearer" = ["self:read"])),
)]
async fn whoami(ctx: RequestContext) -> axum::Json<WhoAmI> {
    let p = &ctx.principal;
    axum::Json(WhoAmI {
        subject: p.subject.to_string(),
        tenant: p.tenant.as_ref().map(|t| t.to_string()),
        acting_in: ctx.tenant.to_string(),
        role: p.role,
        method: p.method,
        scopes: p.scopes.iter().map(|s| s.to_string()).collect(),
    })
}
