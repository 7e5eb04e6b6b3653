//! Extractors that turn every malformed input into an [`ApiError`] with a clear message.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use http::StatusCode;
use http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON body; rejections become 400/413/415/422 in the error envelope.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let status = rejection.status();
    let (code, message) = match &rejection {
        JsonRejection::JsonDataError(e) => ("invalid_body", data_error_message(&e.body_text())),
        JsonRejection::JsonSyntaxError(_) => ("malformed_json", "request body is not valid JSON".to_string()),
        JsonRejection::MissingJsonContentType(_) => {
            ("unsupported_media_type", "expected Content-Type: application/json".to_string())
        }
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => ("body_too_large", "request body too large".to_string()),
        _ => ("bad_request", "could not read the request body".to_string()),
    };
    let status = if status == StatusCode::UNPROCESSABLE_ENTITY { StatusCode::UNPROCESSABLE_ENTITY } else { status };
    ApiError::new(status, code, message)
}

/// serde's message without axum's "Failed to deserialize the JSON body into the target type: "
/// prefix; it names the field and what was expected, never echoes large input.
fn data_error_message(body_text: &str) -> String {
    let text =
        body_text.strip_prefix("Failed to deserialize the JSON body into the target type: ").unwrap_or(body_text);
    truncate(text, 300)
}

fn truncate(text: &str, chars_max: usize) -> String {
    if text.chars().count() <= chars_max {
        text.to_string()
    } else {
        let cut: String = text.chars().take(chars_max).collect();
        format!("{cut}…")
    }
}

/// Query parameters; rejections become 400 `invalid_query`.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    let text = rejection.body_text();
    let text = text.strip_prefix("Failed to deserialize query string: ").unwrap_or(&text);
    ApiError::bad_request("invalid_query", truncate(text, 300))
}

/// Path parameters; rejections become 400 `invalid_path`.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

fn path_rejection(rejection: PathRejection) -> ApiError {
    ApiError::bad_request("invalid_path", truncate(&rejection.body_text(), 300))
}

/// An optional JSON body: `None` when the request has no body and no content type (e.g.
/// `POST …/rotate` with nothing to say); otherwise as [`Json`].
impl<S: Send + Sync, T: DeserializeOwned> axum::extract::OptionalFromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        let empty_length = req.headers().get(http::header::CONTENT_LENGTH).is_none_or(|v| v.as_bytes() == b"0");
        let no_type = !req.headers().contains_key(http::header::CONTENT_TYPE);
        let no_transfer = !req.headers().contains_key(http::header::TRANSFER_ENCODING);
        if empty_length && no_type && no_transfer {
            return Ok(None);
        }
        <Self as FromRequest<S>>::from_request(req, state).await.map(Some)
    }
}
