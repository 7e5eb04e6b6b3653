//! The OpenAPI 3.1 document of the HTTP API, served at `GET /openapi.json`, and the single
//! source of the scope every `/api/v1` endpoint requires.
//!
//! Routes and document are one registration: each route module returns an [`OpenApiRouter`]
//! built with [`utoipa_axum::routes!`] from handlers annotated with `#[utoipa::path]`, so a
//! handler is routed exactly when it is documented. [`assemble`] puts the modules together for
//! both [`crate::router`] and [`document`]; [`scopes`] walks the document's security
//! requirements to build [`crate::access_table`], so the scope a handler declares in its
//! annotation (`security(("bearer" = ["agents:read"]))`) is the scope the middleware enforces.
//!
//! [`Conventions`] adds what holds for every operation rather than repeating it on each
//! handler: the `bearer` security scheme; on `/api/v1` the `X-Nops-Tenant` header and the
//! 400/401/403/429/503 answers of authentication and rate limiting; the 400/413/415/422
//! answers of the JSON body extractor and the edge guard; 408, 415, 431, 500 and 503
//! `overloaded` of the edge layers everywhere; and the `x-request-id` response header.
//!
//! # Adding a route module
//!
//! A module under `routes/` (say `admin_keys.rs`) provides
//! `pub(crate) fn router() -> OpenApiRouter<AppState>` built only with
//! `OpenApiRouter::new().routes(routes!(handler, ...))` (one `routes!` per path; never
//! `.route(...)`, which would route without documenting). Each handler carries
//! `#[utoipa::path(method, path = "/admin/api-keys…" (relative to `/api/v1`), operation_id,
//! tag, summary, params(...), request_body(...), responses(... every status, errors with
//! `body = ErrorBody` ...), security(("bearer" = ["<one scope>"])))]`, and the types it takes
//! and returns derive `ToSchema` (query structs `IntoParams`). Then one line in
//! [`api_routes`] (`.merge(routes::admin_keys::router())`) routes, documents and protects it.

use std::sync::OnceLock;

use axum::response::IntoResponse;
use http::{HeaderValue, Method, header};
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Header, Ref, RefOr, Required};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::{AppState, routes};

/// The name of the security scheme every `/api/v1` operation requires.
pub(crate) const SECURITY_SCHEME: &str = "bearer";
/// Where the versioned API is nested.
pub(crate) const API_PREFIX: &str = "/api/v1";

/// The header that selects the tenant (see [`crate::context::TENANT_HEADER`]), as documented.
const TENANT_HEADER_NAME: &str = "X-Nops-Tenant";
/// The request id header on every response.
const REQUEST_ID_HEADER_NAME: &str = "x-request-id";
/// Paths the in-flight limit never refuses (see `hardening::limit_in_flight`).
const EXEMPT_FROM_IN_FLIGHT: &[&str] = &["/health", "/metrics"];

#[derive(OpenApi)]
#[openapi(
    info(
        title = "NOPS kernel API",
        description = "The control plane for edge agents: the agent registry and the plugin lifecycle. \
            Everything under `/api/v1` needs `Authorization: Bearer <credential>` (an API key `nops_…` or \
            a JWT) whose scopes cover the operation's; every error is the `ErrorBody` envelope.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    tags(
        (name = "health", description = "Liveness, readiness and component health (public)."),
        (name = "observability", description = "Prometheus metrics (public)."),
        (name = "meta", description = "This document (public)."),
        (name = "agents", description = "The agent registry, heartbeats and lifecycle events."),
        (name = "plugins", description = "Upload, activate, roll back, shadow, delete and call WebAssembly plugins."),
        (name = "routing", description = "Route decisions over healthy agents; agent health and circuit breakers."),
        (name = "tasks", description = "Task dispatch: submit tasks and read their results; agents pull work and report results."),
        (name = "keys", description = "API keys: create, list, show, rotate with a grace period, revoke; and who is calling."),
        (name = "chaos", description = "Chaos toggles: latency, errors and drops injected on purpose (admins only)."),
        (name = "events", description = "The event bus: publish, consumer groups (fetch, stream, ack), the dead-letter queue and replay."),
        (name = "slo", description = "SLOs: SLIs, burn rates, error budgets and burn-rate alerts."),
    ),
    components(schemas(ErrorBody, ErrorDetail)),
)]
struct ApiDoc;

/// The JSON body of every error response (the schema of [`crate::error::ErrorBody`]).
#[derive(ToSchema)]
#[allow(dead_code)] // documentation only: the middleware writes `crate::error::ErrorBody`
pub(crate) struct ErrorBody {
    /// The error.
    error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(ToSchema)]
#[allow(dead_code)] // documentation only
pub(crate) struct ErrorDetail {
    /// Stable machine-readable code, e.g. `not_found`.
    #[schema(example = "not_found")]
    code: String,
    /// A message for the caller.
    message: String,
    /// The request id, as in the `x-request-id` response header.
    request_id: String,
}

/// The `/api/v1` route modules (relative paths, behind authentication). A new module is one
/// line here.
fn api_routes(upload_bytes_max: usize) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(routes::agents::router())
        .merge(routes::plugins::router(upload_bytes_max))
        .merge(routes::admin_keys::router())
        .merge(routes::tasks::router())
        .merge(routes::events::router())
        .merge(routes::admin_chaos::router())
        .merge(routes::slo::router())
        .merge(routes::route::router())
}

/// The public route modules (no credential).
fn public_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().merge(routes::health::router()).routes(routes!(openapi_json))
}

/// Every route of the application and its document. `guard` wraps the `/api/v1` routes (the
/// router passes the authentication layer; the document alone passes them through).
pub(crate) fn assemble(
    upload_bytes_max: usize,
    guard: impl FnOnce(OpenApiRouter<AppState>) -> OpenApiRouter<AppState>,
) -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(public_routes())
        .nest(API_PREFIX, guard(api_routes(upload_bytes_max)))
        .split_for_parts();
    Conventions.modify(&mut doc);
    (router, doc)
}

/// The document, built once.
pub(crate) fn document() -> &'static utoipa::openapi::OpenApi {
    static DOCUMENT: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOCUMENT.get_or_init(|| assemble(0, |api| api).1)
}

/// The document as served, serialized once.
fn document_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| document().to_json().unwrap_or_else(|e| panic!("the OpenAPI document serializes: {e}")))
}

/// The OpenAPI 3.1 document.
///
/// This document: every endpoint, its parameters, bodies and answers, and the scope it
/// requires.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object)),
)]
async fn openapi_json() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], document_json())
}

/// The operations of a path item with their methods.
fn operations(item: &PathItem) -> impl Iterator<Item = (Method, &Operation)> {
    [
        (Method::GET, &item.get),
        (Method::PUT, &item.put),
        (Method::POST, &item.post),
        (Method::DELETE, &item.delete),
        (Method::OPTIONS, &item.options),
        (Method::HEAD, &item.head),
        (Method::PATCH, &item.patch),
        (Method::TRACE, &item.trace),
    ]
    .into_iter()
    .filter_map(|(method, op)| op.as_ref().map(|op| (method, op)))
}

fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

/// The scopes an operation's `bearer` security requirements name, in order.
fn operation_scopes(op: &Operation) -> Vec<String> {
    let mut scopes = Vec::new();
    for requirement in op.security.iter().flatten() {
        // `SecurityRequirement` keeps its map private; its JSON is `{"bearer": ["scope", ...]}`.
        let json = serde_json::to_value(requirement).unwrap_or_default();
        if let Some(names) = json.get(SECURITY_SCHEME).and_then(serde_json::Value::as_array) {
            scopes.extend(names.iter().filter_map(|s| s.as_str().map(str::to_owned)));
        }
    }
    scopes
}

/// `(method, route, scope)` for every operation of the document that declares exactly one
/// scope. An `/api/v1` operation that declares none or several is left out, so the middleware
/// refuses it (fail closed); the `openapi` integration test fails on it first.
pub(crate) fn scopes() -> Vec<(Method, String, String)> {
    let mut out = Vec::new();
    for (path, item) in &document().paths.paths {
        for (method, op) in operations(item) {
            match operation_scopes(op).as_slice() {
                [] => {}
                [scope] => out.push((method, path.clone(), scope.clone())),
                several => tracing::error!(
                    path = %path,
                    method = %method,
                    scopes = ?several,
                    "an operation declares several scopes: refused"
                ),
            }
        }
    }
    out
}

/// What every operation shares (see the module documentation).
struct Conventions;

impl Modify for Conventions {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SECURITY_SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("nops_… API key or JWT")
                    .description(Some(
                        "`Authorization: Bearer <credential>`: an API key (`nops_…`) or a JWT. Each operation \
                         names the one scope it requires; a credential's scopes cover it when equal, by a \
                         `prefix:*` wildcard, or by `*`.",
                    ))
                    .build(),
            ),
        );
        for (path, item) in doc.paths.paths.iter_mut() {
            let api = path.starts_with(&format!("{API_PREFIX}/"));
            if api {
                let mutating = [&mut item.post, &mut item.put, &mut item.patch, &mut item.delete];
                for op in mutating.into_iter().flatten() {
                    add_idempotency_header(op);
                    error(op, "400", "`invalid_idempotency_key`: `Idempotency-Key` is not a 1 to 255 character string");
                    error(
                        op,
                        "409",
                        "`idempotency_key_in_flight`: a request with this `Idempotency-Key` is still running; \
                         retry after `Retry-After` seconds",
                    );
                    error(
                        op,
                        "422",
                        "`idempotency_key_reused`: this `Idempotency-Key` was used for a different request",
                    );
                }
            }
            for op in operations_mut(item) {
                if api {
                    add_tenant_header(op);
                    error(op, "400", "`invalid_tenant`: `X-Nops-Tenant` is not a valid tenant id");
                    error(op, "401", "`unauthenticated`: missing, invalid, expired or revoked credential");
                    error(
                        op,
                        "403",
                        "`insufficient_scope`: the credential's scopes do not cover the operation's; \
                         `forbidden`: the policy denies",
                    );
                    error(op, "429", "`rate_limited`: a rate limit budget is spent; retry after `Retry-After` seconds");
                    error(op, "503", "`store_unavailable`: the store is unavailable; retry later");
                    error(op, "503", "`rate_limit_unavailable`: the shared rate limit store is unreachable");
                    header(op, "401", header::WWW_AUTHENTICATE.as_str(), "`Bearer`");
                    header(op, "429", header::RETRY_AFTER.as_str(), "Seconds until the budget allows a request");
                }
                let media: Vec<String> =
                    op.request_body.as_ref().map(|body| body.content.keys().cloned().collect()).unwrap_or_default();
                if media.iter().any(|m| m == "application/json") {
                    error(op, "400", "`malformed_json`: the body is not valid JSON");
                    error(op, "400", "`json_too_deep`: the body nests too deep");
                    error(op, "422", "`invalid_body`: a field has the wrong type, is unknown or is missing");
                }
                if media.is_empty() {
                    error(op, "415", "`unsupported_media_type`: this operation reads no body");
                } else {
                    error(op, "413", "`body_too_large`: the body exceeds the limit");
                    let expected =
                        format!("`unsupported_media_type`: expected `Content-Type: {}`", media.join("` or `"));
                    error(op, "415", &expected);
                }
                let queried = op.parameters.iter().flatten().any(|p| p.parameter_in == ParameterIn::Query);
                if queried {
                    error(op, "400", "`invalid_query`: a query parameter is malformed or unknown");
                }
                error(op, "408", "`timeout`: the request took too long");
                error(op, "431", "`headers_too_large`: the request headers are too large");
                error(op, "500", "`internal`: internal error (details only in the kernel's log)");
                if !EXEMPT_FROM_IN_FLIGHT.contains(&path.as_str()) {
                    error(op, "503", "`overloaded`: too many requests in flight; retry after `Retry-After` seconds");
                    header(op, "503", header::RETRY_AFTER.as_str(), "Seconds to wait before retrying");
                }
                for response in op.responses.responses.values_mut() {
                    if let RefOr::T(response) = response {
                        let mut id = Header::new(ObjectBuilder::new().schema_type(Type::String));
                        id.description = Some("The request id (the client's, when well-formed)".into());
                        response.headers.entry(REQUEST_ID_HEADER_NAME.into()).or_insert(id);
                    }
                }
            }
        }
    }
}

/// Declares that `op` can answer `status` with the error envelope for `why`: adds the
/// response, or adds `why` to the description of the one the handler declared (whose body
/// becomes "its schema or `ErrorBody`" when it declared another).
fn error(op: &mut Operation, status: &str, why: &str) {
    let code = why.split('`').nth(1).unwrap_or(why);
    let envelope = || RefOr::Ref(Ref::from_schema_name("ErrorBody"));
    match op.responses.responses.get_mut(status) {
        Some(RefOr::T(response)) => {
            if !response.description.contains(code) {
                response.description = format!("{}; {why}", response.description);
            }
            let json = response.content.entry("application/json".into()).or_insert_with(|| Content::new(None::<Ref>));
            let is_envelope = matches!(&json.schema, Some(RefOr::Ref(r)) if r.ref_location.ends_with("/ErrorBody"))
                || matches!(&json.schema, Some(RefOr::T(Schema::OneOf(one))) if one.items.iter().any(
                    |item| matches!(item, RefOr::Ref(r) if r.ref_location.ends_with("/ErrorBody"))));
            if !is_envelope {
                json.schema = Some(match json.schema.take() {
                    Some(other) => RefOr::T(Schema::OneOf(OneOfBuilder::new().item(other).item(envelope()).build())),
                    None => envelope(),
                });
            }
        }
        Some(RefOr::Ref(_)) => {}
        None => {
            let response = ResponseBuilder::new()
                .description(why)
                .content("application/json", Content::new(Some(envelope())))
                .build();
            op.responses.responses.insert(status.to_string(), RefOr::T(response));
        }
    }
}

/// Documents response header `name` on `op`'s `status` response.
fn header(op: &mut Operation, status: &str, name: &str, description: &str) {
    if let Some(RefOr::T(response)) = op.responses.responses.get_mut(status) {
        let mut value = Header::new(ObjectBuilder::new().schema_type(Type::String));
        value.description = Some(description.into());
        response.headers.entry(name.into()).or_insert(value);
    }
}

fn add_idempotency_header(op: &mut Operation) {
    let parameters = op.parameters.get_or_insert_with(Vec::new);
    let parameter: Parameter = ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "Makes a retry safe: a retry with the same key and request replays the first answer \
             (with `idempotent-replayed: true`) instead of running again. Scoped to the caller and \
             tenant; kept for `[idempotency] retention_ms` (24 h by default). See docs/idempotency.md.",
        ))
        .schema(Some(ObjectBuilder::new().schema_type(Type::String).min_length(Some(1)).max_length(Some(257))))
        .build();
    parameters.push(parameter);
}

fn add_tenant_header(op: &mut Operation) {
    let parameters = op.parameters.get_or_insert_with(Vec::new);
    if parameters.iter().any(|p| p.name.eq_ignore_ascii_case(TENANT_HEADER_NAME)) {
        return;
    }
    let parameter: Parameter = ParameterBuilder::new()
        .name(TENANT_HEADER_NAME)
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "The tenant the request acts in; without it, the credential's own tenant, else `default`. \
             1 to 63 lowercase letters, digits, `-` or `_`, starting with a letter or digit.",
        ))
        .schema(Some(ObjectBuilder::new().schema_type(Type::String).pattern(Some("^[a-z0-9][a-z0-9_-]{0,62}$"))))
        .build();
    parameters.push(parameter);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_operation_yields_one_access_entry() {
        let doc = document();
        let mut api_operations = 0;
        for (path, item) in &doc.paths.paths {
            for (method, op) in operations(item) {
                let scopes = operation_scopes(op);
                if path.starts_with(&format!("{API_PREFIX}/")) {
                    api_operations += 1;
                    assert_eq!(scopes.len(), 1, "{method} {path}: {scopes:?}");
                } else {
                    assert!(op.security.is_none(), "{method} {path} is public");
                }
            }
        }
        assert!(api_operations >= 20, "{api_operations}");
        assert_eq!(scopes().len(), api_operations);
        if let Ok(out) = std::env::var("NOPS_OPENAPI_DUMP") {
            std::fs::write(out, doc.to_pretty_json().expect("json")).expect("dump");
        }
    }
}
