//! Route handlers, one module per resource.

pub(crate) mod admin_chaos;
pub(crate) mod admin_keys;
pub(crate) mod agents;
pub(crate) mod events;
pub(crate) mod health;
pub(crate) mod plugins;
pub(crate) mod route;
pub(crate) mod slo;
pub(crate) mod tasks;

use http::StatusCode;

use crate::error::ApiError;

/// Any path no route matches.
pub(crate) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// A known path with a method it does not serve.
pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}
