//! Idempotency keys on every mutating endpoint, with the semantics of the IETF
//! `Idempotency-Key` header draft (draft-ietf-httpapi-idempotency-key-header).
//!
//! A `POST`, `PUT`, `PATCH` or `DELETE` under `/api/v1` that carries `Idempotency-Key` runs at
//! most once per key and caller while its record is kept ([`IdempotencyConfig::retention_ms`]):
//!
//! - the first request claims the key (one atomic insert in the store, which is what makes
//!   the key hold across kernels sharing a PostgreSQL database), runs, and its response
//!   (status, `content-type`, `location`, `etag`, body) is kept;
//! - a retry with the same fingerprint (method, path and query, BLAKE2b-256 of the body) gets
//!   the kept response again, byte for byte, with `idempotent-replayed: true`;
//! - the same key with another fingerprint: 422 `idempotency_key_reused`, nothing runs;
//! - the same key while the first request still runs: 409 `idempotency_key_in_flight` with
//!   `Retry-After`, nothing runs. A request in flight longer than
//!   [`IdempotencyConfig::in_flight_timeout_ms`] belonged to a kernel that stopped, and a retry
//!   takes its key over;
//! - answers that say "try again" are not kept, so a retry runs again: every 5xx, 429, a
//!   response larger than [`IdempotencyConfig::response_bytes_max`] or of unknown length, and
//!   a request cancelled before it answered (timeout, client gone, panic).
//!
//! Keys are scoped to the caller: the credential (API key id, or JWT issuer and subject) and
//! the tenant the request acts in. The layer runs after authentication, so refusals of
//! authentication, authorization and rate limits never touch a key. Requests without the
//! header, and reads, are not affected at all.
//!
//! The error envelope of a kept error response is written here (the edge layer would write it
//! only after this layer), so the replay is the same JSON; its `request_id` is that of the
//! first request, while the replay's `x-request-id` header is its own.

use std::sync::Arc;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{OriginalUri, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use nops_core::store::{ClaimOutcome, IdempotencyClaim, IdempotentResponse, Store, StoreError};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AppState;
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::middleware::REQUEST_ID_HEADER;

/// The request header carrying the key.
pub const IDEMPOTENCY_KEY_HEADER: HeaderName = HeaderName::from_static("idempotency-key");
/// The response header marking a replayed response.
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Longest key, in bytes (after removing the quotes of an sf-string).
pub const KEY_BYTES_MAX: usize = 255;
/// Response headers kept and replayed with the body.
const KEPT_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::LOCATION, header::ETAG];
/// `Retry-After` of a 409 for a key in flight, in seconds.
const IN_FLIGHT_RETRY_AFTER_S: &str = "1";

/// Settings of idempotency keys (`[idempotency]` in `nops.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// Honour `Idempotency-Key` (when false the header is ignored) [default: true].
    pub enabled: bool,
    /// How long a completed key's response is kept and replayed, in ms [default: 86400000].
    pub retention_ms: u64,
    /// How long a request may hold its key in flight before a retry may take it over (its
    /// kernel presumed stopped), in ms; at least `[http] request_timeout_ms` [default: 60000].
    pub in_flight_timeout_ms: u64,
    /// Largest response body kept, in bytes; a larger response is answered but not kept, and
    /// a retry runs again [default: 2097152].
    pub response_bytes_max: usize,
    /// How often expired records are deleted, in ms [default: 60000].
    pub sweep_interval_ms: u64,
    /// Most records deleted per statement of a sweep [default: 1000].
    pub purge_batch_max: u32,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            retention_ms: 24 * 60 * 60 * 1000,
            in_flight_timeout_ms: 60_000,
            response_bytes_max: 2 * 1024 * 1024,
            sweep_interval_ms: 60_000,
            purge_batch_max: 1_000,
        }
    }
}

impl IdempotencyConfig {
    /// Every limit positive, and no request taken over while it can still be running.
    pub fn validate(&self, request_timeout_ms: u64) -> Result<(), String> {
        for (name, value) in [
            ("retention_ms", self.retention_ms),
            ("in_flight_timeout_ms", self.in_flight_timeout_ms),
            ("response_bytes_max", self.response_bytes_max as u64),
            ("sweep_interval_ms", self.sweep_interval_ms),
            ("purge_batch_max", u64::from(self.purge_batch_max)),
        ] {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if self.in_flight_timeout_ms < request_timeout_ms {
            return Err(format!(
                "in_flight_timeout_ms ({}) must be at least [http] request_timeout_ms ({request_timeout_ms}), or a \
                 retry could run a request that is still running",
                self.in_flight_timeout_ms
            ));
        }
        i64::try_from(self.retention_ms).map_err(|_| "retention_ms is too large".to_string())?;
        Ok(())
    }
}

/// Deletes expired records every `sweep_interval_ms` until `shutdown` turns true.
pub async fn run_sweeper(
    store: Arc<dyn Store>,
    clock: Arc<dyn nops_core::clock::Clock>,
    metrics: nops_core::metrics::Metrics,
    config: IdempotencyConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(config.sweep_interval_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        if !config.enabled {
            continue;
        }
        match sweep(store.as_ref(), clock.now_ms(), config.purge_batch_max).await {
            Ok(purged) => metrics.idempotency_purged_total.inc_by(purged),
            Err(err) => tracing::warn!(error = %err, "deleting expired idempotency keys failed; retrying next sweep"),
        }
    }
}

/// Most statements of one sweep, so a sweep ends even while records expire faster than it
/// deletes them.
const SWEEP_BATCHES_MAX: u32 = 100;

/// Deletes records expired at `now_ms`, in batches of `batch_max`; returns how many.
pub async fn sweep(store: &dyn Store, now_ms: i64, batch_max: u32) -> Result<u64, StoreError> {
    let mut purged = 0;
    for _ in 0..SWEEP_BATCHES_MAX {
        let deleted = store.idempotency_purge_expired(now_ms, batch_max).await?;
        purged += deleted;
        if deleted < u64::from(batch_max) {
            break;
        }
    }
    Ok(purged)
}

/// Whether the method changes state (the only ones keys apply to).
fn is_mutating(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
}

/// The key from the header: an sf-string (`"abc"`, with `\"` and `\\` escapes) or, leniently,
/// a bare run of visible ASCII; 1 to [`KEY_BYTES_MAX`] printable ASCII bytes either way.
pub fn parse_key(value: &[u8]) -> Option<String> {
    let key = match value {
        [b'"', inner @ .., b'"'] => {
            let mut out = Vec::with_capacity(inner.len());
            let mut bytes = inner.iter();
            while let Some(&b) = bytes.next() {
                match b {
                    b'\\' => match bytes.next() {
                        Some(&escaped @ (b'"' | b'\\')) => out.push(escaped),
                        _ => return None,
                    },
                    b'"' => return None,
                    0x20..=0x7e => out.push(b),
                    _ => return None,
                }
            }
            out
        }
        _ if value.iter().all(|b| (0x21..=0x7e).contains(b)) && value.first() != Some(&b'"') => value.to_vec(),
        _ => return None,
    };
    if key.is_empty() || key.len() > KEY_BYTES_MAX {
        return None;
    }
    String::from_utf8(key).ok()
}

/// Who a key belongs to: the credential and the tenant the request acts in.
fn scope_of(ctx: &RequestContext) -> String {
    format!("{}:{}@{}", ctx.principal.method.as_str(), ctx.principal.credential, ctx.tenant)
}

/// BLAKE2b-256 of the method, the path with its query, and the body.
fn fingerprint(method: &Method, path_and_query: &str, body: &[u8]) -> Vec<u8> {
    let mut hasher = Blake2b::<U32>::new();
    hasher.update(method.as_str().as_bytes());
    hasher.update([0]);
    hasher.update(path_and_query.as_bytes());
    hasher.update([0]);
    hasher.update(body);
    hasher.finalize().to_vec()
}

fn invalid_key() -> ApiError {
    ApiError::bad_request(
        "invalid_idempotency_key",
        format!(
            "Idempotency-Key must be one quoted string (e.g. \"8e03978e-40d5\") of 1 to {KEY_BYTES_MAX} printable \
             ASCII characters"
        ),
    )
}

fn store_unavailable(err: StoreError) -> ApiError {
    ApiError::from(nops_core::CoreError::Store(err))
}

/// Releases the key of an execution that ended without a kept response, including when its
/// future is dropped (request timeout, client gone, panic).
struct Claimed {
    store: Arc<dyn Store>,
    scope: String,
    key: String,
    token: Uuid,
    armed: bool,
}

impl Claimed {
    async fn release(mut self) {
        self.armed = false;
        if let Err(err) = self.store.idempotency_release(&self.scope, &self.key, self.token).await {
            tracing::warn!(error = %err, "releasing an idempotency key failed; it frees itself after in_flight_timeout_ms");
        }
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (store, scope, key, token) =
            (self.store.clone(), std::mem::take(&mut self.scope), std::mem::take(&mut self.key), self.token);
        runtime.spawn(async move {
            if let Err(err) = store.idempotency_release(&scope, &key, token).await {
                tracing::warn!(error = %err, "releasing the idempotency key of a cancelled request failed");
            }
        });
    }
}

/// The middleware (see the module documentation). Runs inside authentication.
pub(crate) async fn idempotency(State(state): State<AppState>, req: Request, next: Next) -> Result<Response, ApiError> {
    let config = &state.http.idempotency;
    if !config.enabled || !is_mutating(req.method()) {
        return Ok(next.run(req).await);
    }
    let mut values = req.headers().get_all(&IDEMPOTENCY_KEY_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(next.run(req).await);
    };
    if values.next().is_some() {
        return Err(invalid_key());
    }
    let key = parse_key(value.as_bytes()).ok_or_else(invalid_key)?;
    let Some(ctx) = req.extensions().get::<RequestContext>() else {
        return Err(ApiError::internal("idempotency keys need an authenticated request"));
    };
    let scope = scope_of(ctx);
    let (parts, body) = req.into_parts();
    let bytes_max = state.http.body_bytes_max.max(state.http.upload_bytes_max);
    let body = read_body(body, bytes_max).await?;
    let uri = parts.extensions.get::<OriginalUri>().map_or(&parts.uri, |u| &u.0);
    let path = uri.path_and_query().map_or_else(|| uri.path(), |p| p.as_str());
    let fingerprint = fingerprint(&parts.method, path, &body);
    let request_id = parts.headers.get(&REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let now_ms = state.clock.now_ms();
    let token = Uuid::now_v7();
    let ms = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    // Armed before the claim: a request cancelled while its claim commits still frees the key.
    let claimed = Claimed { store: state.store.clone(), scope, key, token, armed: true };
    let claim = IdempotencyClaim {
        scope: &claimed.scope,
        key: &claimed.key,
        fingerprint: &fingerprint,
        token,
        now_ms,
        locked_until_ms: now_ms.saturating_add(ms(config.in_flight_timeout_ms)),
        expires_at_ms: now_ms.saturating_add(ms(config.retention_ms)),
    };
    let outcome = state.store.idempotency_claim(&claim).await.map_err(store_unavailable)?;
    let metrics = &state.metrics.idempotency_requests_total;
    if let ClaimOutcome::Existing(record) = outcome {
        let mut claimed = claimed;
        claimed.armed = false;
        if record.fingerprint != fingerprint {
            metrics.with_label_values(&["key_reused"]).inc();
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request (method, path or body); use a new key",
            ));
        }
        let Some(kept) = record.response else {
            metrics.with_label_values(&["in_flight"]).inc();
            let mut response = ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_in_flight",
                "a request with this Idempotency-Key is still being processed; retry later",
            )
            .into_response();
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(IN_FLIGHT_RETRY_AFTER_S));
            return Ok(response);
        };
        metrics.with_label_values(&["replayed"]).inc();
        return Ok(replay(kept));
    }
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    let status = response.status();
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        metrics.with_label_values(&["not_kept"]).inc();
        claimed.release().await;
        return Ok(response);
    }
    let mut response = response;
    if status.is_client_error() {
        // The envelope the edge layer would write later, now, so the kept body is the one the
        // client receives.
        crate::middleware::write_error_body(&mut response, &request_id);
    }
    let exact = response.body().size_hint().exact();
    let Some(length) = exact.filter(|n| *n <= config.response_bytes_max as u64) else {
        tracing::warn!(
            status = status.as_u16(),
            length = exact,
            response_bytes_max = config.response_bytes_max,
            "response too large (or of unknown length) to keep for its Idempotency-Key; a retry runs again"
        );
        metrics.with_label_values(&["not_kept"]).inc();
        claimed.release().await;
        return Ok(response);
    };
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::try_from(length).unwrap_or(usize::MAX)).await else {
        claimed.release().await;
        return Err(ApiError::internal("reading a response to keep for its Idempotency-Key failed"));
    };
    let kept =
        IdempotentResponse { status: status.as_u16(), headers: kept_headers(&parts.headers), body: bytes.to_vec() };
    match state.store.idempotency_complete(&claimed.scope, &claimed.key, token, &kept).await {
        Ok(true) => metrics.with_label_values(&["kept"]).inc(),
        Ok(false) => {
            tracing::warn!("an Idempotency-Key was taken over while its request ran; its response is not kept");
        }
        Err(err) => {
            // The request ran: answer it. The key stays in flight until in_flight_timeout_ms,
            // then a retry runs again.
            tracing::error!(error = %err, "keeping the response of an Idempotency-Key failed");
        }
    }
    let mut claimed = claimed;
    claimed.armed = false;
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

/// The headers of a response that are kept with it.
fn kept_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    KEPT_HEADERS
        .iter()
        .filter_map(|name| {
            let value = headers.get(name)?.to_str().ok()?;
            Some((name.as_str().to_owned(), value.to_owned()))
        })
        .collect()
}

/// A kept response, as it was first sent, marked as replayed.
fn replay(kept: IdempotentResponse) -> Response {
    let status = StatusCode::from_u16(kept.status).unwrap_or(StatusCode::OK);
    let mut response = (status, Body::from(kept.body)).into_response();
    let headers = response.headers_mut();
    for (name, value) in kept.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.insert(name, value);
        }
    }
    headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}

/// The whole request body, refused with 413 past `bytes_max`.
async fn read_body(mut body: Body, bytes_max: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "request body too large");
    if body.size_hint().lower() > bytes_max as u64 {
        return Err(too_large());
    }
    let mut buffer: Vec<u8> = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|_| ApiError::bad_request("bad_request", "could not read the request body"))?;
        if let Ok(data) = frame.into_data() {
            if buffer.len() + data.len() > bytes_max {
                return Err(too_large());
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buffer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sf_strings_or_bare_tokens() {
        assert_eq!(parse_key(b"\"abc\"").as_deref(), Some("abc"));
        assert_eq!(parse_key(b"\"a b \\\"c\\\" \\\\\"").as_deref(), Some("a b \"c\" \\"));
        assert_eq!(
            parse_key(b"8e03978e-40d5-43e8-bc93-6894a57f9324").as_deref(),
            Some("8e03978e-40d5-43e8-bc93-6894a57f9324")
        );
        for bad in [&b""[..], b"\"\"", b"\"abc", b"a b", b"\"a\\x\"", b"\"a\"b\"", b"\"\xc3\xa9\"", b"\"a\tb\""] {
            assert_eq!(parse_key(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(parse_key(format!("\"{}\"", "k".repeat(KEY_BYTES_MAX)).as_bytes()).is_some());
        assert!(parse_key(format!("\"{}\"", "k".repeat(KEY_BYTES_MAX + 1)).as_bytes()).is_none());
    }

    #[test]
    fn the_fingerprint_covers_method_path_and_body() {
        let base = fingerprint(&Method::POST, "/api/v1/agents", b"{}");
        assert_eq!(base, fingerprint(&Method::POST, "/api/v1/agents", b"{}"));
        assert_ne!(base, fingerprint(&Method::PUT, "/api/v1/agents", b"{}"));
        assert_ne!(base, fingerprint(&Method::POST, "/api/v1/agents?x=1", b"{}"));
        assert_ne!(base, fingerprint(&Method::POST, "/api/v1/agents", b"{ }"));
    }

    #[test]
    fn the_defaults_are_valid_and_bad_settings_are_refused() {
        assert_eq!(IdempotencyConfig::default().validate(30_000), Ok(()));
        let short = IdempotencyConfig { in_flight_timeout_ms: 1_000, ..IdempotencyConfig::default() };
        assert!(short.validate(30_000).is_err());
        let zero = IdempotencyConfig { retention_ms: 0, ..IdempotencyConfig::default() };
        assert!(zero.validate(30_000).is_err());
    }
}
