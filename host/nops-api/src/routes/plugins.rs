//! `/api/v1/plugins`: upload, list, show, activate, roll back, shadow, delete and call
//! plugins, and export their hash chains.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::response::IntoResponse;
use http::StatusCode;
use nops_core::plugin::call::{Attribute, Caller, Invocation, Value};
use nops_core::plugin::service::{Answer, PluginService, PluginView};
use nops_core::plugin::{ChainEntry, Manifest, PluginState, PluginVersion, ShadowDiff, validate_plugin_name};
use semver::Version;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use crate::AppState;
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::extract::{Json, Path, Query};
use crate::openapi::ErrorBody;

/// Shadow differences returned when the client names no limit.
const DIFFS_LIMIT_DEFAULT: u32 = 50;
/// Most shadow differences one listing returns.
const DIFFS_LIMIT_MAX: u32 = 1_000;

pub(crate) fn router(upload_bytes_max: usize) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, upload).layer(DefaultBodyLimit::max(upload_bytes_max)))
        .routes(routes!(show))
        .routes(routes!(activate))
        .routes(routes!(rollback))
        .routes(routes!(deactivate))
        .routes(routes!(shadow_diffs, start_shadow, stop_shadow))
        .routes(routes!(delete_version))
        .routes(routes!(chain))
        .routes(routes!(invoke))
}

fn service(state: &AppState) -> Result<&Arc<PluginService>, ApiError> {
    state
        .plugins
        .as_ref()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "plugins_disabled", "the plugin runtime is off"))
}

fn name(raw: &str) -> Result<&str, ApiError> {
    validate_plugin_name(raw)?;
    Ok(raw)
}

fn version(raw: &str) -> Result<Version, ApiError> {
    raw.parse().map_err(|e| ApiError::bad_request("invalid_version", format!("`{raw}` is not a semantic version: {e}")))
}

/// List plugins.
///
/// The tenant's plugins: which version is active and which shadows it.
#[utoipa::path(
    get,
    path = "/plugins",
    operation_id = "list_plugins",
    tag = "plugins",
    responses(
        (status = 200, description = "The tenant's plugins", body = PluginList),
        (status = 503, description = "`plugins_disabled`: the plugin runtime is off", body = ErrorBody),
    ),
    security(("bearer" = ["plugins:list"])),
)]
async fn list(State(state): State<AppState>, ctx: RequestContext) -> Result<axum::Json<PluginList>, ApiError> {
    Ok(axum::Json(PluginList { plugins: service(&state)?.list(&ctx.tenant).await? }))
}

/// The plugins of a tenant.
#[derive(Debug, Serialize, ToSchema)]
struct PluginList {
    /// Each plugin's state.
    plugins: Vec<PluginState>,
}

/// Query of `POST /plugins`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct UploadParams {
    /// Activate the version once stored.
    #[serde(default)]
    activate: bool,
}

/// The parts of an upload (`multipart/form-data`).
#[derive(ToSchema)]
#[allow(dead_code)] // documentation only: `upload` reads the parts one by one
struct UploadForm {
    /// The manifest (TOML).
    #[schema(content_media_type = "application/toml")]
    manifest: String,
    /// The component (`.wasm`).
    #[schema(value_type = String, content_media_type = "application/wasm")]
    wasm: Vec<u8>,
    /// The configuration document, when the manifest names one.
    #[schema(value_type = String, required = false, content_media_type = "application/octet-stream")]
    config: Option<Vec<u8>>,
}

/// Upload a plugin version.
///
/// `multipart/form-data` with parts `manifest` (TOML), `wasm` (the component) and optionally
/// `config` (the configuration document). A refused upload stores nothing.
#[utoipa::path(
    post,
    path = "/plugins",
    operation_id = "upload_plugin",
    tag = "plugins",
    params(UploadParams),
    request_body(content = UploadForm, content_type = "multipart/form-data", description = "Manifest, component and configuration"),
    responses(
        (status = 201, description = "Stored (and activated, when asked)", body = Uploaded,
            headers(("Location" = String, description = "The plugin's URL, `/api/v1/plugins/{name}`"))),
        (status = 400, description = "`invalid_upload`: a malformed multipart body, an unknown, missing or repeated part; `bad_request`: not a multipart body", body = ErrorBody),
        (status = 409, description = "`version_exists`, `kind_mismatch`, `limit_exceeded`, `concurrent_change`", body = ErrorBody),
        (status = 413, description = "`body_too_large`: the upload exceeds the limit", body = ErrorBody),
        (status = 422, description = "`invalid_manifest`, `invalid_name`, `digest_mismatch`, `limits_refused`, `invalid_limits`, `invalid_grants`, `grant_refused`, `unsigned`, `bad_signature`, `world_mismatch`, `load_failed`", body = ErrorBody),
        (status = 503, description = "`plugins_disabled`: the plugin runtime is off", body = ErrorBody),
    ),
    security(("bearer" = ["plugins:write"])),
)]
async fn upload(
    State(state): State<AppState>,
    ctx: RequestContext,
    Query(params): Query<UploadParams>,
    mut form: Multipart,
) -> Result<impl IntoResponse, ApiError> {
    let plugins = service(&state)?;
    let (mut manifest, mut wasm, mut config) = (None, None, None);
    let bad = |message: String| ApiError::bad_request("invalid_upload", message);
    while let Some(field) = form.next_field().await.map_err(|e| bad(format!("malformed multipart body: {e}")))? {
        let part = field.name().unwrap_or_default().to_string();
        let bytes = field.bytes().await.map_err(|e| bad(format!("reading part `{part}`: {e}")))?;
        let slot = match part.as_str() {
            "manifest" => &mut manifest,
            "wasm" => &mut wasm,
            "config" => &mut config,
            other => return Err(bad(format!("unknown part `{other}`: expected manifest, wasm and config"))),
        };
        if slot.replace(bytes).is_some() {
            return Err(bad(format!("part `{part}` sent twice")));
        }
    }
    let manifest = manifest.ok_or_else(|| bad("the `manifest` part is missing".into()))?;
    let wasm = wasm.ok_or_else(|| bad("the `wasm` part is missing".into()))?;
    let text = std::str::from_utf8(&manifest).map_err(|_| bad("the manifest is not UTF-8".into()))?;
    let manifest = Manifest::from_toml(text)?;
    let name = manifest.name.clone();
    let actor = ctx.principal.subject.to_string();
    let version = plugins.upload(&ctx.tenant, &actor, manifest, wasm.to_vec(), config.map(|c| c.to_vec())).await?;
    let swap_ms = if params.activate {
        Some(plugins.activate(&ctx.tenant, &name, &version.manifest.version, &actor).await?.as_secs_f64() * 1e3)
    } else {
        None
    };
    let location = format!("/api/v1/plugins/{name}");
    Ok((StatusCode::CREATED, [(http::header::LOCATION, location)], axum::Json(Uploaded { version, swap_ms })))
}

/// The answer to an upload: the stored version.
#[derive(Debug, Serialize, ToSchema)]
struct Uploaded {
    /// The stored version.
    #[serde(flatten)]
    version: PluginVersion,
    /// How long the activation took, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    swap_ms: Option<f64>,
}

/// Show a plugin.
///
/// A plugin's state and every stored version: digests, grants, limits, signer, uploader and
/// call metrics.
#[utoipa::path(
    get,
    path = "/plugins/{name}",
    operation_id = "show_plugin",
    tag = "plugins",
    params(
        ("name" = String, Path, description = "The plugin's name"),
    ),
    responses(
        (status = 200, description = "The plugin", body = PluginView),
        (status = 404, description = "`not_found`: no such plugin in the tenant", body = ErrorBody),
        (status = 422, description = "`invalid_name`: not a valid plugin name", body = ErrorBody),
        (status = 503, description = "`plugins_disabled`: the plugin runtime is off", body = ErrorBody),
    ),
    security(("bearer" = ["plugins:read"])),
)]
async fn show(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(raw): Path<String>,
) -> Result<axum::Json<PluginView>, ApiError> {
    Ok(axum::Json(service(&state)?.show(&ctx.tenant, name(&raw)?).await?))
}

/// Body of activate, rollback and shadow.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct VersionBody {
    /// A stored version (required by activate and shadow; rollback without it returns to the
    /// version active before).
    #[schema(example = "1.2.0")]
    version: Option<String>,
}

/// The answer to an activation or rollback.
#[derive(Debug, Serialize, ToSchema)]
struct Activated {
    /// The version now serving.
    #[schema(value_type = String, example = "1.2.0")]
    active: Version,
    /// Time from the request to the new version serving in this process.
    swap_ms: f64,
}

/// Activate a version.
///
/// Makes a stored version serve the plugin's calls.
#[utoipa::path(
    post,
    path = "/plugins/{name}/activate",
    operation_id = "activate_plugin",
    tag = "plugins",
    params(
        ("name" = String, Path, description = "The plugin's name"),
    ),
    request_body(content = VersionBody, content_type = "application/json", description = "`{\"version\": \"1.2.0\"}`"),
    responses(
        (status = 200, description = "Activated", body = Activated),
        (status = 400, description = "`invalid_body`: `version` is missing; `invalid_version`: not a semantic version", body = ErrorBody),
        (status = 404, description = "`not_found`: no such plugin or version in the tenant", body = ErrorBody),
        (status = 409, description = "`concurrent_change`: another change was made at the same time", body = ErrorBody),
        (status = 422, description = "`invalid_name`: not a valid plugin name", body = ErrorBody),
        (status = 503, description = "`plugins_disabled`: the plugin runtime is off", body = ErrorBody),
    ),
    security(("bearer" = ["plugins:write"])),
)]
async fn activate(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(raw): Path<String>,
    Json(body): Json<VersionBody>,
) -> Result<axum::Json<Activated>, ApiError> {
    let name = name(&raw)?;
    let raw_version = body.version.ok_or_else(|| ApiError::bad_request("invalid_body", "`version` is required"))?;
    let v = version(&raw_version)?;
    let took = service(&state)?.activate(&ctx.tenant, name, &v, &ctx.principal.subject).await?;
    Ok(axum::Json(Activated { active: v, swap_ms: took.as_secs_f64() * 1e3 }))
}

/// Roll back.
///
/// Activates the version active before (or the named one).
#[utoipa::path(
    post,
    path = "/plugins/{name}/rollback",
    operation_id = "rollback_plugin",
    tag = "plugins",
    params(
        ("name" = String, Path, description = "The plugin's name"),
    ),
    request_body(content = VersionBody, content_type = "application/json", description = "`{}` or `{\"version\": \"1.1.0\"}`"),
    responses(
        (status = 200, description = "Rolled back", body = Activated),
        (status = 400, description = "`invalid_version`: not a semantic version", body = ErrorBody),
        (status = 404, description = "`not_found`: no such plugin or version in the tenant", body = ErrorBody),
        (status = 409, description = "`not_active`: nothing is active; `no_previous_version`: nothing to roll back to; `concurrent_change`", body = ErrorBody),
        (status = 422, description = "`invalid_name`: not a valid plugin name", body = ErrorBody),
        (status = 503, description = "`plugins_disabled`: the plugin runtime is off", body = ErrorBody),
    ),
    security(("bearer" = ["plugins:write"])),
)]
async fn rollback(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(raw): Path<String>,
    Json(body): Json<VersionBody>,
) -> Result<axum::Json<Activated>, ApiError> {
    let name = name(&raw)?;
    let plugins = service(&state)?;
    let (active, took) = match body.version {
        Some(raw_version) => {
            let v = version(&raw_version)?;
            let took = plugins.activate(&ctx.tenant, name, &v, &ctx.principal.subject).await?;
            (v, took)
        }
        None => plugins.rollback(&ctx.tenant, name, &ctx.principal.subject).await?,
    };
    Ok(axum::Json(Activated { active, swap_ms: took.as_secs_f64() * 1e3 }))
}

/// Deactivate.
///
/// Stops serving the plugin; its versions stay stored.
#[utoipa::path(
    post,
    path = "/plugins/{name}/deactivate",
    operation_id = "deactivate_plugin",
    tag = "plugins",
    params(
        ("name" = String, Path, description = "The plugin's name"),
    ),
    responses(
        (status = 204, description = "Deactivated"),
        (status = 404, description = "`not_found`: no such plugin in the tenant", body = ErrorBody),
        (status = 409, description = "`not_active`: nothing is active; `concurrent_change`", body = ErrorBody),
        (status = 422, description = "`invalid_name`: not a valid plugin name", body = ErrorBody),
        (status = 503, description = "`plugins_disabled`: the plugin runtime is off", body = ErrorBody),
    ),
    security(("bearer" = ["plugins:write"])),
)]
async fn deactivate(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    service(&state)?.deactivate(&ctx.tenant, name(&raw)?, &ctx.principal.subject).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Start shadowing.
///
/// Runs a stored version beside the active one and records where their answers differ.
#[utoipa::path(
    put,
    path = "/plugins/{name}/shadow",
    operation_id = "start_shadow",
    tag = "plugins",
    params(
        ("name" = String, Path, description = "The plugin's name"),
    ),
    request_body(content = VersionBody, content_type = "application/json", description = "`{\"version\": \"1.3.0\"}`"),
    responses(
        (status = 204, description = "Shadowing"),
        (status = 400, description = "`invalid_body`: `version` is missing; `invalid_version`: not a semantic version", body = ErrorBody),
        (status = 404, description = "`not_found`: no such plugin or version in the tenant", body = ErrorBody),
        (status = 409, description = "`not_active`: nothing is active to shadow; `concurrent_change`", body = ErrorBody),
        (status = 422, description = "`invalid_name`: not a valid plugin name; the version cannot shadow the active one", body = ErrorBody),
        (status = 503, description = "`plugins_disabled`: the plugin runtime is off", body = ErrorBody),
    ),
    security(("bearer" = ["plugins:write"])),
)]
async fn start_shadow(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(raw): Path<String>,
    Json(body): Json<VersionBody>,
) -> Result<StatusCode, ApiError> {
    let name = name(&raw)?;
    let raw_version = body.version.ok_or_else(|| ApiError::bad_request("invalid_body", "`version` is required"))?;
    let v = version(&raw_version)?;
    service(&state)?.set_shadow(&ctx.tenant, name, Some(&v), &ctx.principal.subject).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Stop shadowing.
///
/// Stops shadowing.
#[utoipa::path(
    delete,
    path = "/plugins/{name}/shadow",
    operation_id = "stop_shadow",
    tag = "plugins",
    params(
        ("name" = String, Path, description = "The plugin's name"),
    ),
    responses(
        (status = 204, description = "Not shadowing"),
        (status = 404, description = "`not_found`: no such plugin in the tenant", body = ErrorBody),
        (status = 409, description = "`not_active`; `concurrent_change`", body = ErrorBody),
        (status = 422, description = "`invalid_name`: not a valid plugin name", body = ErrorBody),
        (status = 503, description = "`plugins_disabled`: the plugin runtime is off", body = ErrorBody),
    ),
    security(("bearer" = ["plugins:write"])),
)]
async fn stop_shadow(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    service(&state)?.set_shadow(&ctx.tenant, name(&raw)?, None, &ctx.principal.subject).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query of the shadow differences.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DiffParams {
    /// Most differences to return (1 to 1000; default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// Recorded shadow differences, newest first.
#[derive(Debug, Serialize, ToSchema)]
struct DiffList {
    /// The differences.
    diffs: Vec<ShadowDiff>,
}

/// Shadow differences.
///
/// The differences recorded between the active and the shadow version, newest first: input,
/// both outputs, versions.
#[utoipa::path(
    get,
    path = "/plugins/{name}/shadow",
    operation_id = "shadow_diffs",
    tag = "plugins",
    params(
        ("name" = String, Path, description = "The plugin's name"),
        DiffParams,
    ),
    responses(
        (status = 200, description = "The differences", body = DiffList),
        (status = 400, description = "`invalid_query`: `limit` out of range", body = ErrorBody),
        (status = 404, description = "`not_found`: no such plugin in the tenant", body = ErrorBody),
        (status = 422, description = "`invalid_name`: not a valid plugin name", body = ErrorBody),
        (status = 503, description = "`plugins_disabled`: the plugin runtime is off", body = ErrorBody),
    ),
    security(("bearer" = ["plugins:read"])),
)]
async fn shadow_diffs(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(raw): Path<String>,
    Query(params): Query<DiffParams>,
) -> Result<axum::Json<DiffList>, ApiError> {
    let limit = params.limit.unwrap_or(DIFFS_LIMIT_DEFAULT);
    if limit == 0 || limit > DIFFS_LIMIT_MAX {
        return Err(ApiError::bad_request("invalid_query", format!("limit must be between 1 and {DIFFS_LIMIT_MAX}")));
    }
    Ok(axum::Json(DiffList { diffs: service(&state)?.shadow_diffs(&ctx.tenant, name(&raw)?, limit).await? }))
}

/// Delete a version.
///
/// Deletes a version that is neither active nor shadowing.
#[utoipa::path(
    delete,
    path = "/plugins/{name}/versions/{version}",
    operation_id = "delete_plugin_version",
    tag = "plugins",
    params(
        ("name" = String, Path, description = "The plugin's name"),
        ("version" = String, Path, description = "The version, e.g. `1.2.0`"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`invalid_version`: not a semantic version", body = ErrorBody),
        (status = 404, description = "`not_found`: no such plugin or version in the tenant", body = ErrorBody),
        (status = 409, description = "`version_in_use`: the version is active or shadowing; `concurrent_change`", body = ErrorBody),
        (status = 422, description = "`invalid_name`: not a valid plugin name", body = ErrorBody),
        (status = 503, description = "`plugins_disabled`: the plugin runtime is off", body = ErrorBody),
    ),
    security(("bearer" = ["plugins:write"])),
)]
async fn delete_version(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path((raw, raw_version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let v = version(&raw_version)?;
    service(&state)?.delete_version(&ctx.tenant, name(&raw)?, &v, &ctx.principal.subject).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A plugin's hash chain.
#[derive(Debug, Serialize, ToSchema)]
struct Chain {
    /// The entries, first to last.
    entries: Vec<ChainEntry>,
}

/// Export the hash chain.
///
/// The plugin's hash-chained history: every upload, activation, rollback, shadow change,
/// deactivation and deletion.
#[utoipa::path(
    get,
    path = "/plugins/{name}/chain",
    operation_id = "plugin_chain",
    tag = "plugins",
    params(
        ("name" = String, Path, description = "The plugin's name"),
    ),
    responses(
        (status = 200, description = "The chain", body = Chain),
        (status = 404, description = "`not_found`: no such plugin in the tenant", body = ErrorBody),
        (status = 422, description = "`invalid_name`: not a valid plugin name", body = ErrorBody),
        (status = 503, description = "`plugins_disabled`: the plugin runtime is off", body = ErrorBody),
    ),
    security(("bearer" = ["plugins:read"])),
)]
async fn chain(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(raw): Path<String>,
) -> Result<axum::Json<Chain>, ApiError> {
    Ok(axum::Json(Chain { entries: service(&state)?.chain(&ctx.tenant, name(&raw)?).await? }))
}

/// Call the active version.
///
/// Calls the active version, e.g. `{"authorize": {"action": "agents:read", ...}}`. A policy
/// that fails answers deny, a scorer that fails answers the built-in scores (both with
/// `failure` set); a contract that fails is a 409 and committed nothing.
#[utoipa::path(
    post,
    path = "/plugins/{name}/invoke",
    operation_id = "invoke_plugin",
    tag = "plugins",
    params(
        ("name" = String, Path, description = "The plugin's name"),
    ),
    request_body(content = Invocation, content_type = "application/json", description = "One key naming the call, e.g. `{\"authorize\": {...}}`"),
    responses(
        (status = 200, description = "The answer (with `failure` when the kind's fallback answered)", body = Answer),
        (status = 404, description = "`not_found`: no active version of this plugin in the tenant", body = ErrorBody),
        (status = 409, description = "`plugin_failed`: a contract or migration call failed and committed nothing", body = ErrorBody),
        (status = 422, description = "`invalid_name`: not a valid plugin name; the call does not fit the plugin's kind", body = ErrorBody),
        (status = 503, description = "`plugins_disabled`: the plugin runtime is off", body = ErrorBody),
    ),
    security(("bearer" = ["plugins:invoke"])),
)]
async fn invoke(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(raw): Path<String>,
    Json(invocation): Json<Invocation>,
) -> Result<axum::Json<Answer>, ApiError> {
    let caller = Caller {
        subject: ctx.principal.subject.to_string(),
        tenant: ctx.principal.tenant.as_ref().map(ToString::to_string),
        attributes: vec![Attribute { name: "role".into(), value: Value::Text(ctx.principal.role.as_str().into()) }],
    };
    let answer = service(&state)?.call(&ctx.tenant, name(&raw)?, Some(Arc::new(caller)), invocation).await?;
    Ok(axum::Json(answer))
}
