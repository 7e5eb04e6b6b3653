//! `nops keys …`: API key management from the command line, through the kernel's HTTP API
//! (`/api/v1/admin/api-keys`).

use clap::Subcommand;
use serde_json::{Map, Value, json};

use crate::plugins_cli::Remote;

/// Key commands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key in the tenant (`--tenant`) and print its secret, once
    Create {
        /// A name for people, e.g. `ci-deployer`
        name: String,
        /// admin, operator, viewer or agent
        #[arg(long, default_value = "viewer")]
        role: String,
        /// Space-separated scopes, e.g. "agents:read agents:heartbeat" [default: the caller's]
        #[arg(long)]
        scopes: Option<String>,
        /// Who the key speaks for, e.g. an agent's id
        #[arg(long)]
        subject: Option<String>,
        /// Lifetime in seconds [default: no expiry]
        #[arg(long)]
        expires_in_s: Option<u64>,
        /// A kernel-wide key (no tenant); kernel-wide admins only
        #[arg(long)]
        kernel_wide: bool,
    },
    /// List the tenant's keys (`--kernel` for kernel-wide keys)
    List {
        #[arg(long)]
        kernel: bool,
    },
    /// Show one key
    Show { id: String },
    /// Rotate a key: print the new secret; the old key works until the grace period ends
    Rotate {
        id: String,
        /// Seconds the old key keeps working [default: 86400]
        #[arg(long)]
        grace_s: Option<u64>,
    },
    /// Revoke a key at once
    Revoke { id: String },
}

pub fn run(remote: Remote, command: KeyCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let base = "/api/v1/admin/api-keys";
        use reqwest::Method;
        let builder = match command {
            KeyCommand::Create { name, role, scopes, subject, expires_in_s, kernel_wide } => {
                let mut body = Map::new();
                body.insert("name".into(), json!(name));
                body.insert("role".into(), json!(role));
                if let Some(scopes) = scopes {
                    body.insert("scopes".into(), json!(scopes.split_whitespace().collect::<Vec<_>>()));
                }
                if let Some(subject) = subject {
                    body.insert("subject".into(), json!(subject));
                }
                if let Some(s) = expires_in_s {
                    body.insert("expires_in_s".into(), json!(s));
                }
                if kernel_wide {
                    body.insert("kernel_wide".into(), json!(true));
                }
                remote.request(&client, Method::POST, base).json(&Value::Object(body))
            }
            KeyCommand::List { kernel } => {
                remote.request(&client, Method::GET, &format!("{base}{}", if kernel { "?kernel=true" } else { "" }))
            }
            KeyCommand::Show { id } => remote.request(&client, Method::GET, &format!("{base}/{id}")),
            KeyCommand::Rotate { id, grace_s } => {
                let body = grace_s.map_or_else(|| json!({}), |g| json!({ "grace_s": g }));
                remote.request(&client, Method::POST, &format!("{base}/{id}/rotate")).json(&body)
            }
            KeyCommand::Revoke { id } => remote.request(&client, Method::POST, &format!("{base}/{id}/revoke")),
        };
        remote.print_response(builder).await
    })
}
