//! The HTTP side of token authentication: fetches JWK sets and SPIFFE bundles for
//! [`nops_core::auth::jwt`], and builds the kernel's token authenticator from the configuration.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use nops_core::auth::Authenticator;
use nops_core::auth::jwt::{JWKS_FETCH_TIMEOUT_MS_DEFAULT, JwksSource, JwtAuthenticator};
use nops_core::clock::Clock;

use crate::config::AuthSettings;

/// Fetches key sets over HTTP(S): no redirects (a redirect could downgrade to `http` or leave the
/// configured host), a whole-request timeout, and reading stops past the size cap.
#[derive(Debug, Clone)]
pub struct HttpJwksSource {
    client: reqwest::Client,
}

impl HttpJwksSource {
    /// A source whose requests give up after `timeout`. Issuers apply their own (shorter or
    /// equal) `jwks_fetch_timeout_ms` on top.
    pub fn new(timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("nops/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client for key sets")?;
        Ok(Self { client })
    }
}

#[async_trait]
impl JwksSource for HttpJwksSource {
    async fn fetch(&self, url: &str, bytes_max: usize) -> Result<Vec<u8>, String> {
        let mut response = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/jwk-set+json, application/json")
            .send()
            .await
            .map_err(|e| format!("request failed: {}", e.without_url()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("status {status}"));
        }
        if response.content_length().is_some_and(|len| len > bytes_max as u64) {
            return Err(format!("the document is larger than {bytes_max} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| format!("reading failed: {}", e.without_url()))? {
            if body.len() + chunk.len() > bytes_max {
                return Err(format!("the document is larger than {bytes_max} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// The kernel's token authenticator for the configured issuers, or `None` when there are none.
/// Loads every issuer's keys (see [`JwtAuthenticator::new`]).
pub async fn token_authenticator(
    auth: &AuthSettings,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Option<Arc<dyn Authenticator>>> {
    if auth.issuers.is_empty() {
        return Ok(None);
    }
    let timeout_ms =
        auth.issuers.iter().map(|i| i.jwks.fetch_timeout_ms).max().unwrap_or(JWKS_FETCH_TIMEOUT_MS_DEFAULT);
    let source = Arc::new(HttpJwksSource::new(Duration::from_millis(timeout_ms))?);
    let authenticator = JwtAuthenticator::new(auth.issuers.clone(), clock, source)
        .await
        .map_err(|e| anyhow::anyhow!("[auth] issuers: {e}"))?;
    Ok(Some(Arc::new(authenticator)))
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::http::{StatusCode, header};
    use axum::routing::get;

    use super::*;

    async fn serve() -> String {
        let app = Router::new()
            .route("/jwks", get(|| async { r#"{"keys":[]}"# }))
            .route("/big", get(|| async { "x".repeat(4096) }))
            .route("/missing", get(|| async { StatusCode::NOT_FOUND }))
            .route("/moved", get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/jwks")]) }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn fetches_are_capped_and_never_redirected() {
        let base = serve().await;
        let source = HttpJwksSource::new(Duration::from_secs(5)).expect("client");
        assert_eq!(source.fetch(&format!("{base}/jwks"), 1024).await.expect("fetched"), br#"{"keys":[]}"#);
        let big = source.fetch(&format!("{base}/big"), 1024).await.expect_err("too big");
        assert!(big.contains("larger than 1024"), "{big}");
        assert!(source.fetch(&format!("{base}/missing"), 1024).await.expect_err("404").contains("404"));
        assert!(source.fetch(&format!("{base}/moved"), 1024).await.expect_err("redirect").contains("302"));
    }
}
