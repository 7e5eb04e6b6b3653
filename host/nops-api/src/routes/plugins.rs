//! `/api/v1/plugins`: upload, list, show, activate, roll back, shadow, delete and call
//! plugins, and export their hash chains.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use http::StatusCode;
use nops_core::plugin::call::{Attribute, Caller, Invocation, Value};
use nops_core::plugin::service::{Answer, PluginService, PluginView};
use nops_core::plugin::{ChainEntry, Manifest, PluginState, PluginVersion, ShadowDiff, validate_plugin_name};
use semver::Version;
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::extract::{Json, Path, Query};

/// Shadow differences returned when the client names no limit.
const DIFFS_LIMIT_DEFAULT: u32 = 50;
/// Most shadow differences one listing returns.
const DIFFS_LIMIT_MAX: u32 = 1_000;

pub(crate) fn router(upload_bytes_max: usize) -> Router<AppState> {
    Router::new()
        .route("/plugins", get(list).post(upload).layer(DefaultBodyLimit::max(upload_bytes_max)))
        .route("/plugins/{name}", get(show))
        .route("/plugins/{name}/activate", post(activate))
        .route("/plugins/{name}/rollback", post(rollback))
        .route("/plugins/{name}/deactivate", post(deactivate))
        .route("/plugins/{name}/shadow", get(shadow_diffs).put(start_shadow).delete(stop_shadow))
        .route("/plugins/{name}/versions/{version}", delete(delete_version))
        .route("/plugins/{name}/chain", get(chain))
        .route("/plugins/{name}/invoke", post(invoke))
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

async fn list(State(state): State<AppState>, ctx: RequestContext) -> Result<axum::Json<PluginList>, ApiError> {
    Ok(axum::Json(PluginList { plugins: service(&state)?.list(&ctx.tenant).await? }))
}

/// The plugins of a tenant.
#[derive(Debug, Serialize)]
struct PluginList {
    plugins: Vec<PluginState>,
}

/// Query of `POST /plugins`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadParams {
    /// Activate the version once stored.
    #[serde(default)]
    activate: bool,
}

/// `multipart/form-data` with parts `manifest` (TOML), `wasm` (the component) and optionally
/// `config` (the configuration document).
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

/// The answer to an upload.
#[derive(Debug, Serialize)]
struct Uploaded {
    #[serde(flatten)]
    version: PluginVersion,
    /// How long the activation took, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    swap_ms: Option<f64>,
}

async fn show(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(raw): Path<String>,
) -> Result<axum::Json<PluginView>, ApiError> {
    Ok(axum::Json(service(&state)?.show(&ctx.tenant, name(&raw)?).await?))
}

/// Body of activate, rollback and shadow.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionBody {
    version: Option<String>,
}

/// The answer to an activation or rollback.
#[derive(Debug, Serialize)]
struct Activated {
    active: Version,
    /// Time from the request to the new version serving in this process.
    swap_ms: f64,
}

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

async fn deactivate(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    service(&state)?.deactivate(&ctx.tenant, name(&raw)?, &ctx.principal.subject).await?;
    Ok(StatusCode::NO_CONTENT)
}

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

async fn stop_shadow(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    service(&state)?.set_shadow(&ctx.tenant, name(&raw)?, None, &ctx.principal.subject).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query of the shadow differences.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiffParams {
    limit: Option<u32>,
}

/// Recorded shadow differences, newest first.
#[derive(Debug, Serialize)]
struct DiffList {
    diffs: Vec<ShadowDiff>,
}

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
#[derive(Debug, Serialize)]
struct Chain {
    entries: Vec<ChainEntry>,
}

async fn chain(
    State(state): State<AppState>,
    ctx: RequestContext,
    Path(raw): Path<String>,
) -> Result<axum::Json<Chain>, ApiError> {
    Ok(axum::Json(Chain { entries: service(&state)?.chain(&ctx.tenant, name(&raw)?).await? }))
}

/// Calls the active version, e.g. `{"authorize": {"action": "agents:read", ...}}`. A policy
/// that fails answers deny, a scorer that fails answers the built-in scores (both with
/// `failure` set); a contract that fails is a 409 and committed nothing.
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
