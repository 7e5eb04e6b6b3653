//! The error envelope: every error leaves the kernel as
//! `{"error": {"code", "message", "request_id"}}` with the right status.
//!
//! Handlers return [`ApiError`]; its response carries the error in an extension and the
//! envelope middleware writes the body (adding the request id) and logs the detail once.
//! Errors produced outside handlers (unknown routes, body limits, timeouts) are wrapped by the
//! same middleware.

use std::borrow::Cow;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use nops_core::CoreError;
use serde::Serialize;

/// An error on its way to the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// A message for the client; never internals.
    pub message: Cow<'static, str>,
    /// Detail for the logs only.
    pub detail: Option<String>,
    /// `WWW-Authenticate` challenge, for 401s.
    pub challenge: bool,
}

impl ApiError {
    /// An error with status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self { status, code, message: message.into(), detail: None, challenge: false }
    }

    /// A 400 for a bad request.
    pub fn bad_request(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A 500 whose detail goes to the logs, not the client.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self {
            detail: Some(detail.into()),
            ..Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
        }
    }

    /// A 401 with a bearer challenge.
    pub fn unauthenticated(message: impl Into<Cow<'static, str>>) -> Self {
        Self { challenge: true, ..Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message) }
    }
}

impl From<CoreError> for ApiError {
    fn from(err: CoreError) -> Self {
        match err {
            CoreError::Invalid { code, message } => {
                let status = if code == "invalid_id" || code == "invalid_tenant" || code == "invalid_query" {
                    StatusCode::BAD_REQUEST
                } else {
                    StatusCode::UNPROCESSABLE_ENTITY
                };
                Self::new(status, code, message)
            }
            CoreError::NotFound { what } => Self::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found")),
            CoreError::Conflict { code, message } => Self::new(StatusCode::CONFLICT, code, message),
            CoreError::LimitExceeded { message } => Self::new(StatusCode::CONFLICT, "limit_exceeded", message),
            CoreError::Unauthenticated { .. } => {
                Self::unauthenticated("missing, invalid, expired or revoked credential")
            }
            CoreError::Forbidden => Self::new(StatusCode::FORBIDDEN, "forbidden", "not allowed"),
            CoreError::Store(err) => Self {
                detail: Some(err.to_string()),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the store is unavailable; retry later",
                )
            },
            CoreError::BusUnavailable(detail) => Self {
                detail: Some(detail),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "bus_unavailable",
                    "the event bus is unavailable; retry later",
                )
            },
            other => Self::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.status.into_response();
        if self.challenge {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response.extensions_mut().insert(self);
        response
    }
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    pub code: String,
    /// A message for the caller.
    pub message: String,
    /// The request id, as in the `x-request-id` response header.
    pub request_id: String,
}

/// The code and message for an error status produced outside a handler.
pub(crate) fn for_status(status: StatusCode) -> ApiError {
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", "no such route"),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "method not allowed on this route"),
        StatusCode::PAYLOAD_TOO_LARGE => ("body_too_large", "request body too large"),
        StatusCode::REQUEST_TIMEOUT => ("timeout", "request took too long"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "expected Content-Type: application/json"),
        s if s.is_server_error() => ("internal", "internal error"),
        _ => ("bad_request", "bad request"),
    };
    ApiError::new(status, code, message)
}
