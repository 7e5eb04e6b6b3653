//! The HTTP side of dispatch: pushes task attempts to agents' endpoints for
//! [`nops_core::dispatch`] (the wire format is in `docs/dispatch.md`).

use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use nops_core::dispatch::{Delivery, TaskTransport};

/// How long connecting to an agent may take, at most (the attempt's own timeout may be shorter).
const PUSH_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Idle connections kept per agent host.
const PUSH_IDLE_CONNECTIONS_PER_HOST_MAX: usize = 32;
/// Longest error answer body quoted in an attempt's error, in bytes.
const PUSH_ERROR_BODY_BYTES_MAX: usize = 512;

/// Pushes attempts with `POST <endpoint>`: JSON body [`Delivery`], headers `X-Nops-Task-Id` and
/// `X-Nops-Attempt`; a 2xx JSON answer is the result. No redirects (an agent's endpoint is
/// where its work goes, not a hop to elsewhere); reading stops past `output_bytes_max`.
#[derive(Debug, Clone)]
pub struct HttpTaskTransport {
    client: reqwest::Client,
    output_bytes_max: usize,
}

impl HttpTaskTransport {
    /// A transport that refuses answers larger than `output_bytes_max`.
    pub fn new(output_bytes_max: usize) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(PUSH_CONNECT_TIMEOUT_MS))
            .pool_max_idle_per_host(PUSH_IDLE_CONNECTIONS_PER_HOST_MAX)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("nops/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client for task pushes")?;
        Ok(Self { client, output_bytes_max })
    }
}

#[async_trait]
impl TaskTransport for HttpTaskTransport {
    async fn push(&self, endpoint: &str, delivery: &Delivery, wait: Duration) -> Result<serde_json::Value, String> {
        let mut response = self
            .client
            .post(endpoint)
            .timeout(wait)
            .header(reqwest::header::ACCEPT, "application/json")
            .header("x-nops-task-id", delivery.task_id.to_string())
            .header("x-nops-attempt", delivery.attempt.to_string())
            .json(delivery)
            .send()
            .await
            .map_err(|e| format!("push failed: {}", e.without_url()))?;
        let status = response.status();
        let limit = if status.is_success() { self.output_bytes_max } else { PUSH_ERROR_BODY_BYTES_MAX };
        let mut body = Vec::new();
        let mut truncated = false;
        while let Some(chunk) =
            response.chunk().await.map_err(|e| format!("reading the answer failed: {}", e.without_url()))?
        {
            if body.len() + chunk.len() > limit {
                body.extend_from_slice(&chunk[..limit - body.len()]);
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            return Err(format!("the agent answered {status}: {}{}", text.trim(), if truncated { "…" } else { "" }));
        }
        if truncated {
            return Err(format!("the agent's answer is larger than {} bytes", self.output_bytes_max));
        }
        serde_json::from_slice(&body).map_err(|e| format!("the agent's answer is not JSON: {e}"))
    }
}
