//! Configuration: command-line flags override environment variables, which override
//! `nops.toml`, which overrides the built-in defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use nops_api::HttpConfig;
use nops_core::auth::jwt::{
    Algorithm, InlineKey, IssuerConfig, IssuerKind, JwksLimits, JwtIssuer, KeyMaterial, KeySource, LEEWAY_S_DEFAULT,
    LEEWAY_S_MAX, ROLE_CLAIM_DEFAULT, SpiffeIssuer, TENANT_CLAIM_DEFAULT, Zeroizing, parse_algorithm,
};
use nops_core::auth::{Role, Scopes};
use nops_core::plugin::{Ceilings, TrustPolicy};
use nops_core::registry::{RegistryConfig, TtlConfig};
use nops_core::tenant::TenantId;
use nops_store::StoreConfig;
use serde::{Deserialize, Serialize};

/// Settings of `nops serve`. Every flag can also be set by the environment variable shown and
/// by the key of the same name in `nops.toml` (grouped in sections, see `nops config show`).
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Configuration file [default: ./nops.toml if it exists]
    #[arg(long, env = "NOPS_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7420]
    #[arg(long, env = "NOPS_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory for the kernel's local state (SQLite database, caches) [default: ./.nops]
    #[arg(long, env = "NOPS_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database: sqlite://PATH or postgres://USER@HOST/DB [default: sqlite://$NOPS_DATA_DIR/nops.db]
    #[arg(long, env = "NOPS_DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Log format: json or pretty [default: json]
    #[arg(long, env = "NOPS_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. info or nops=debug,sqlx=warn [default: info]
    #[arg(long, env = "NOPS_LOG", value_name = "FILTER")]
    pub log: Option<String>,

    /// Most open database connections [default: 16]
    #[arg(long, env = "NOPS_DB_POOL_CONNECTIONS_MAX", value_name = "N", help_heading = "Store")]
    pub db_pool_connections_max: Option<u32>,
    /// Attempts to reach the database at start before exiting [default: 8]
    #[arg(long, env = "NOPS_DB_CONNECT_ATTEMPTS_MAX", value_name = "N", help_heading = "Store")]
    pub db_connect_attempts_max: Option<usize>,

    /// An agent silent this long becomes stale [default: 30000]
    #[arg(long, env = "NOPS_STALE_AFTER_MS", value_name = "MS", help_heading = "Agent lifecycle")]
    pub stale_after_ms: Option<i64>,
    /// An agent silent this long becomes a zombie [default: 120000]
    #[arg(long, env = "NOPS_ZOMBIE_AFTER_MS", value_name = "MS", help_heading = "Agent lifecycle")]
    pub zombie_after_ms: Option<i64>,
    /// An agent silent this long is removed [default: 600000]
    #[arg(long, env = "NOPS_REMOVE_AFTER_MS", value_name = "MS", help_heading = "Agent lifecycle")]
    pub remove_after_ms: Option<i64>,
    /// How often the TTL sweeper runs [default: 1000]
    #[arg(long, env = "NOPS_SWEEP_INTERVAL_MS", value_name = "MS", help_heading = "Agent lifecycle")]
    pub sweep_interval_ms: Option<u64>,
    /// How often heartbeats are flushed to the store; a crash loses at most this much [default: 500]
    #[arg(long, env = "NOPS_HEARTBEAT_FLUSH_INTERVAL_MS", value_name = "MS", help_heading = "Agent lifecycle")]
    pub heartbeat_flush_interval_ms: Option<u64>,
    /// Most heartbeat states written in one transaction [default: 2000]
    #[arg(long, env = "NOPS_HEARTBEAT_FLUSH_BATCH_MAX", value_name = "N", help_heading = "Agent lifecycle")]
    pub heartbeat_flush_batch_max: Option<usize>,
    /// Most agents the kernel holds [default: 1000000]
    #[arg(long, env = "NOPS_AGENTS_MAX", value_name = "N", help_heading = "Agent lifecycle")]
    pub agents_max: Option<usize>,

    /// Largest request body, in bytes [default: 1048576]
    #[arg(long, env = "NOPS_BODY_BYTES_MAX", value_name = "BYTES", help_heading = "HTTP")]
    pub body_bytes_max: Option<usize>,
    /// Longest a request may take [default: 30000]
    #[arg(long, env = "NOPS_REQUEST_TIMEOUT_MS", value_name = "MS", help_heading = "HTTP")]
    pub request_timeout_ms: Option<u64>,
    /// Largest total of request header bytes; more is answered 431 [default: 32768]
    #[arg(long, env = "NOPS_HEADERS_BYTES_MAX", value_name = "BYTES", help_heading = "HTTP")]
    pub headers_bytes_max: Option<usize>,
    /// Deepest nesting of a JSON body; deeper is answered 400 [default: 32]
    #[arg(long, env = "NOPS_JSON_DEPTH_MAX", value_name = "N", help_heading = "HTTP")]
    pub json_depth_max: Option<usize>,
    /// Longest a client may take to send request headers, and longest an idle keep-alive
    /// connection stays open [default: 30000]
    #[arg(long, env = "NOPS_HEADER_READ_TIMEOUT_MS", value_name = "MS", help_heading = "HTTP")]
    pub header_read_timeout_ms: Option<u64>,
    /// Most open client connections; more are answered 503 and closed [default: 8192]
    #[arg(long, env = "NOPS_CONNECTIONS_MAX", value_name = "N", help_heading = "HTTP")]
    pub connections_max: Option<usize>,
    /// Most requests served at once; more are answered 503 [default: 2048]
    #[arg(long, env = "NOPS_IN_FLIGHT_MAX", value_name = "N", help_heading = "HTTP")]
    pub in_flight_max: Option<usize>,
    /// Enforce rate limits (budgets are set in `[rate_limits]`) [default: true]
    #[arg(long, env = "NOPS_RATE_LIMITS_ENABLED", value_name = "BOOL", help_heading = "Rate limits")]
    pub rate_limits_enabled: Option<bool>,
    /// Keep rate limit budgets in the database, shared by every kernel on it (PostgreSQL
    /// only) [default: false]
    #[arg(long, env = "NOPS_RATE_LIMITS_SHARED", value_name = "BOOL", help_heading = "Rate limits")]
    pub rate_limits_shared: Option<bool>,

    /// Secret mixed into API key hashes (keyed BLAKE2b), 1 to 64 bytes. Set it before the first
    /// start and never change it: existing keys stop working if it changes
    /// Directory watched for plugins: a `<name>.toml` manifest beside its `.wasm` (and config
    /// document) is uploaded and activated when it appears or changes
    #[arg(long, env = "NOPS_PLUGINS_DIR", value_name = "DIR", help_heading = "Plugins")]
    pub plugins_dir: Option<PathBuf>,
    /// Refuse plugins whose manifest carries no valid signature by a trusted key
    #[arg(long, env = "NOPS_PLUGINS_REQUIRE_SIGNED", value_name = "BOOL", help_heading = "Plugins")]
    pub plugins_require_signed: Option<bool>,
    /// Most plugin instances alive at once (each reserves address space, not memory)
    #[arg(long, env = "NOPS_PLUGIN_INSTANCES_MAX", value_name = "N", help_heading = "Plugins")]
    pub plugin_instances_max: Option<u32>,
    /// NATS server of the event bus, e.g. nats://127.0.0.1:4222 [default: unset, the embedded
    /// bus in the kernel's store]
    #[arg(long, env = "NOPS_NATS_URL", value_name = "URL", hide_env_values = true, help_heading = "Event bus")]
    pub nats_url: Option<String>,
    /// Prefix of the streams, consumers and subjects the kernel creates on NATS; kernels that
    /// share one NATS deployment and one prefix share one bus [default: NOPS]
    #[arg(long, env = "NOPS_NATS_PREFIX", value_name = "PREFIX", help_heading = "Event bus")]
    pub nats_prefix: Option<String>,
    /// Name of the scorer plugin routing consults [default: `scorer`]
    #[arg(long, env = "NOPS_ROUTING_SCORER", value_name = "NAME", help_heading = "Routing")]
    pub routing_scorer: Option<String>,
    /// Break glass: ignore the governing policy plugins and authorize with the built-in
    /// tenant-isolation policy only
    #[arg(long, env = "NOPS_AUTHZ_BUILTIN_ONLY", value_name = "BOOL", help_heading = "Auth")]
    pub authz_builtin_only: Option<bool>,

    #[arg(long, env = "NOPS_API_KEY_PEPPER", value_name = "SECRET", hide_env_values = true, help_heading = "Auth")]
    pub api_key_pepper: Option<String>,
    /// Development JWT issuer: the HS256 secret (at least 32 bytes). Set it together with
    /// --jwt-issuer and --jwt-audience, or none of the three
    #[arg(long, env = "NOPS_JWT_HS256_SECRET", value_name = "SECRET", hide_env_values = true, help_heading = "Auth")]
    pub jwt_hs256_secret: Option<SecretString>,
    /// Development JWT issuer: the `iss` its tokens carry
    #[arg(long, env = "NOPS_JWT_ISSUER", value_name = "ISS", help_heading = "Auth")]
    pub jwt_issuer: Option<String>,
    /// Development JWT issuer: the audience its tokens must name in `aud`
    #[arg(long, env = "NOPS_JWT_AUDIENCE", value_name = "AUD", help_heading = "Auth")]
    pub jwt_audience: Option<String>,
}

/// A secret setting: `Debug` never prints it and `config show` shows `<redacted>`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretString {
    fn from(secret: String) -> Self {
        Self(secret)
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (for machines).
    Json,
    /// Human-readable lines (for a terminal).
    Pretty,
}

/// The shape of `nops.toml`. Every key is optional.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    /// The event bus's NATS server (unset: the embedded bus).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// Prefix of the kernel's streams on NATS [default: NOPS].
    pub nats_prefix: Option<String>,
    pub log_format: Option<LogFormat>,
    pub log: Option<String>,
    pub store: FileStore,
    pub lifecycle: FileLifecycle,
    pub http: FileHttp,
    pub rate_limits: FileRateLimits,
    pub auth: FileAuth,
    pub authz: FileAuthz,
    pub plugins: FilePlugins,
    /// `[chaos]`: limits of the chaos toggles.
    pub chaos: nops_core::chaos::ChaosConfig,
    /// `[[slo]]`: the SLOs [default: `api-availability` 99.9 % and `api-latency` 99 % within
    /// 250 ms, both over `/api/v1` and 30 days].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo: Option<Vec<nops_core::slo::SloSpec>>,
    /// `[[slo_alert]]`: the multi-window burn-rate alert rules, applied to every SLO [default:
    /// page 14.4 over 1h/5m and 6 over 6h/30m, ticket 3 over 1d/2h and 1 over 3d/6h].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo_alert: Option<Vec<nops_core::slo::AlertSpec>>,
    pub routing: FileRouting,
    /// `[dispatch]`: task dispatch limits (timeouts, retries, queues, leases).
    pub dispatch: nops_core::dispatch::DispatchConfig,
    /// `[degraded]`: the criticality matrix and the local spool of critical writes.
    pub degraded: DegradedSettings,
    /// `[idempotency]`: `Idempotency-Key` on mutating endpoints (retention, limits).
    pub idempotency: nops_api::IdempotencyConfig,
    /// `[bus]`: the event log's dedupe window, retention and limits (both backends).
    pub bus: nops_core::bus::BusConfig,
    /// `[events]`: consumer group defaults and replay limits.
    pub events: nops_core::events::EventsConfig,
    /// `[outbox]`: the relay that publishes state-change events to the bus.
    pub outbox: nops_core::outbox::OutboxConfig,
}

/// The `[degraded]` section: what the kernel buffers while its database is down.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DegradedSettings {
    /// Most writes the local spool holds [default: 100000].
    pub spool_records_max: u64,
    /// Most bytes the local spool holds [default: 268435456, 256 MiB].
    pub spool_bytes_max: u64,
    /// How often the database is probed, in ms [default: 1000].
    pub probe_interval_ms: u64,
    /// Longest a probe waits, in ms [default: 2000].
    pub probe_timeout_ms: u64,
    /// `[degraded.criticality]`: overrides of the criticality matrix, e.g.
    /// `shadow_diff = "critical"` [default: task_result and audit_event critical, heartbeat
    /// essential, key_usage and shadow_diff best effort].
    pub criticality: std::collections::BTreeMap<nops_core::degraded::WriteClass, nops_core::degraded::Criticality>,
}

impl Default for DegradedSettings {
    fn default() -> Self {
        let limits = nops_store::spool::SpoolLimits::default();
        let probe = nops_core::degraded::DegradedConfig::default();
        Self {
            spool_records_max: limits.records_max,
            spool_bytes_max: limits.bytes_max,
            probe_interval_ms: probe.probe_interval_ms,
            probe_timeout_ms: probe.probe_timeout_ms,
            criticality: std::collections::BTreeMap::new(),
        }
    }
}

impl DegradedSettings {
    fn validate(&self) -> anyhow::Result<()> {
        for (name, value) in [
            ("spool_records_max", self.spool_records_max),
            ("spool_bytes_max", self.spool_bytes_max),
            ("probe_interval_ms", self.probe_interval_ms),
            ("probe_timeout_ms", self.probe_timeout_ms),
        ] {
            anyhow::ensure!(value > 0, "[degraded] {name} must be positive");
        }
        Ok(())
    }

    /// The core settings.
    pub fn core(&self) -> nops_core::degraded::DegradedConfig {
        nops_core::degraded::DegradedConfig {
            matrix: nops_core::degraded::CriticalityMatrix::with_overrides(&self.criticality),
            probe_interval_ms: self.probe_interval_ms,
            probe_timeout_ms: self.probe_timeout_ms,
        }
    }

    /// The spool's limits.
    pub fn spool_limits(&self) -> nops_store::spool::SpoolLimits {
        nops_store::spool::SpoolLimits { records_max: self.spool_records_max, bytes_max: self.spool_bytes_max }
    }
}

/// The `[routing]` section, with its `[routing.health]` and `[routing.breaker]` subtables.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileRouting {
    /// Name of the scorer plugin consulted [default: `scorer`].
    pub scorer: Option<String>,
    /// Most agents one route request may ask for.
    pub count_max: Option<u32>,
    /// Most candidates scored per request.
    pub candidates_max: Option<usize>,
    /// Most indexed agents examined per request.
    pub scan_max: Option<usize>,
    /// Health scoring.
    pub health: FileHealth,
    /// The circuit breaker of each agent.
    pub breaker: FileBreaker,
}

/// The `[routing.health]` subtable.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileHealth {
    pub latency_tau_ms: Option<u64>,
    pub rate_tau_ms: Option<u64>,
    pub latency_ref_ms: Option<f64>,
    pub in_flight_ref: Option<f64>,
    pub error_penalty: Option<f64>,
    pub qps_floor: Option<f64>,
    pub utilization_floor: Option<f64>,
    pub metrics_agents_max: Option<usize>,
    pub snapshot_refresh_ms: Option<u64>,
}

/// The `[routing.breaker]` subtable.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileBreaker {
    pub consecutive_failures_max: Option<u32>,
    pub failure_ratio_max: Option<f64>,
    pub window_attempts_min: Option<u32>,
    pub window_ms: Option<u64>,
    pub open_ms: Option<u64>,
    pub open_ms_max: Option<u64>,
    pub half_open_probes_max: Option<u32>,
}

/// Routing, health scoring and circuit breakers, resolved.
#[derive(Debug, Clone, Default)]
pub struct RoutingSettings {
    /// Routing.
    pub routing: nops_core::routing::RoutingConfig,
    /// Health scoring and breakers (`stale_after_ms` comes from the lifecycle section).
    pub health: nops_core::health::HealthConfig,
}

fn resolve_routing(args: &ServeArgs, file: &FileRouting, stale_after_ms: i64) -> anyhow::Result<RoutingSettings> {
    let r = nops_core::routing::RoutingConfig::default();
    let routing = nops_core::routing::RoutingConfig {
        scorer: args.routing_scorer.clone().or_else(|| file.scorer.clone()).unwrap_or(r.scorer),
        count_max: file.count_max.unwrap_or(r.count_max),
        candidates_max: file.candidates_max.unwrap_or(r.candidates_max),
        scan_max: file.scan_max.unwrap_or(r.scan_max),
    };
    routing.validate().map_err(|e| anyhow::anyhow!("[routing] {e}"))?;
    let h = nops_core::health::HealthConfig::default();
    let (fh, fb) = (&file.health, &file.breaker);
    let health = nops_core::health::HealthConfig {
        stale_after_ms,
        latency_tau_ms: fh.latency_tau_ms.unwrap_or(h.latency_tau_ms),
        rate_tau_ms: fh.rate_tau_ms.unwrap_or(h.rate_tau_ms),
        latency_ref_ms: fh.latency_ref_ms.unwrap_or(h.latency_ref_ms),
        in_flight_ref: fh.in_flight_ref.unwrap_or(h.in_flight_ref),
        error_penalty: fh.error_penalty.unwrap_or(h.error_penalty),
        qps_floor: fh.qps_floor.unwrap_or(h.qps_floor),
        utilization_floor: fh.utilization_floor.unwrap_or(h.utilization_floor),
        metrics_agents_max: fh.metrics_agents_max.unwrap_or(h.metrics_agents_max),
        snapshot_refresh_ms: fh.snapshot_refresh_ms.unwrap_or(h.snapshot_refresh_ms),
        breaker: nops_core::health::BreakerConfig {
            consecutive_failures_max: fb.consecutive_failures_max.unwrap_or(h.breaker.consecutive_failures_max),
            failure_ratio_max: fb.failure_ratio_max.unwrap_or(h.breaker.failure_ratio_max),
            window_attempts_min: fb.window_attempts_min.unwrap_or(h.breaker.window_attempts_min),
            window_ms: fb.window_ms.unwrap_or(h.breaker.window_ms),
            open_ms: fb.open_ms.unwrap_or(h.breaker.open_ms),
            open_ms_max: fb.open_ms_max.unwrap_or(h.breaker.open_ms_max),
            half_open_probes_max: fb.half_open_probes_max.unwrap_or(h.breaker.half_open_probes_max),
        },
    };
    health.validate().map_err(|e| anyhow::anyhow!("[routing] {e}"))?;
    Ok(RoutingSettings { routing, health })
}

fn file_routing(settings: &RoutingSettings) -> FileRouting {
    let (r, h, b) = (&settings.routing, &settings.health, &settings.health.breaker);
    FileRouting {
        scorer: Some(r.scorer.clone()),
        count_max: Some(r.count_max),
        candidates_max: Some(r.candidates_max),
        scan_max: Some(r.scan_max),
        health: FileHealth {
            latency_tau_ms: Some(h.latency_tau_ms),
            rate_tau_ms: Some(h.rate_tau_ms),
            latency_ref_ms: Some(h.latency_ref_ms),
            in_flight_ref: Some(h.in_flight_ref),
            error_penalty: Some(h.error_penalty),
            qps_floor: Some(h.qps_floor),
            utilization_floor: Some(h.utilization_floor),
            metrics_agents_max: Some(h.metrics_agents_max),
            snapshot_refresh_ms: Some(h.snapshot_refresh_ms),
        },
        breaker: FileBreaker {
            consecutive_failures_max: Some(b.consecutive_failures_max),
            failure_ratio_max: Some(b.failure_ratio_max),
            window_attempts_min: Some(b.window_attempts_min),
            window_ms: Some(b.window_ms),
            open_ms: Some(b.open_ms),
            open_ms_max: Some(b.open_ms_max),
            half_open_probes_max: Some(b.half_open_probes_max),
        },
    }
}

/// The `[authz]` section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileAuthz {
    /// Names of the policy plugins that govern API access [default: `api-access`].
    pub policies: Option<Vec<String>>,
    /// Ignore the policy plugins; the built-in policy decides (break glass).
    pub builtin_only: Option<bool>,
}

/// The `[plugins]` section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilePlugins {
    /// Directory watched for plugins.
    pub dir: Option<PathBuf>,
    /// Refuse unsigned plugins.
    pub require_signed: Option<bool>,
    /// Trusted ed25519 public keys (base64) by key id.
    pub trusted_keys: std::collections::BTreeMap<String, String>,
    /// What manifests may ask for.
    pub ceilings: Option<Ceilings>,
    /// Most plugin instances alive at once.
    pub instances_max: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileStore {
    pub pool_connections_max: Option<u32>,
    pub connect_attempts_max: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileLifecycle {
    pub stale_after_ms: Option<i64>,
    pub zombie_after_ms: Option<i64>,
    pub remove_after_ms: Option<i64>,
    pub sweep_interval_ms: Option<u64>,
    pub heartbeat_flush_interval_ms: Option<u64>,
    pub heartbeat_flush_batch_max: Option<usize>,
    pub agents_max: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileHttp {
    pub body_bytes_max: Option<usize>,
    pub request_timeout_ms: Option<u64>,
    pub headers_bytes_max: Option<usize>,
    pub json_depth_max: Option<usize>,
    pub header_read_timeout_ms: Option<u64>,
    pub connections_max: Option<usize>,
    pub in_flight_max: Option<usize>,
}

/// The `[rate_limits]` section: GCRA budgets, e.g.
/// `per_key = { per_second = 200, burst = 400 }` and
/// `per_route = { "POST /api/v1/agents/{id}/heartbeat" = { per_second = 50, burst = 100 } }`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileRateLimits {
    /// Enforce the limits.
    pub enabled: Option<bool>,
    /// Keep the budgets in the database, shared by every kernel (PostgreSQL only).
    pub shared: Option<bool>,
    /// `allow` or `deny` a request when the shared store cannot answer.
    pub on_store_error: Option<nops_api::OnStoreError>,
    /// Most keys each in-process limiter holds.
    pub keys_max: Option<usize>,
    /// How often stale keys (and expired shared rows) are dropped.
    pub housekeeping_interval_ms: Option<u64>,
    /// Longest wait for the shared store's answer.
    pub store_timeout_ms: Option<u64>,
    /// Budget of each credential.
    pub per_key: Option<nops_api::RateQuota>,
    /// Budget of each tenant.
    pub per_tenant: Option<nops_api::RateQuota>,
    /// Budget of each route not named in `per_route`, across every caller.
    pub route_default: Option<nops_api::RateQuota>,
    /// Budgets of named routes (`"METHOD /api/v1/…"`), across every caller.
    pub per_route: std::collections::BTreeMap<String, nops_api::RateQuota>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileAuth {
    pub api_key_pepper: Option<String>,
    /// Development JWT issuer (with `jwt_issuer` and `jwt_audience`): its HS256 secret.
    pub jwt_hs256_secret: Option<SecretString>,
    /// Development JWT issuer: its `iss`.
    pub jwt_issuer: Option<String>,
    /// Development JWT issuer: the audience its tokens must name.
    pub jwt_audience: Option<String>,
    /// Issuers of bearer JWTs and SPIFFE trust domains of JWT-SVIDs (`[[auth.issuers]]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub issuers: Vec<FileIssuer>,
}

/// What an `[[auth.issuers]]` entry is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileIssuerKind {
    /// An issuer of bearer JWTs, chosen by the token's `iss`.
    #[default]
    Jwt,
    /// A SPIFFE trust domain whose workloads present JWT-SVIDs, chosen by the trust domain of the
    /// token's `sub`.
    Spiffe,
}

/// One `[[auth.issuers]]` entry. A `kind = "jwt"` issuer needs `issuer`, `audiences` and one of
/// `keys`, `jwks_file`, `jwks_url`; a `kind = "spiffe"` one needs `trust_domain`, `audiences` and
/// one of `bundle_file`, `bundle_url`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileIssuer {
    /// `jwt` (default) or `spiffe`.
    pub kind: FileIssuerKind,
    /// jwt: the exact `iss` of the issuer's tokens.
    pub issuer: Option<String>,
    /// Accepted audiences: a token's `aud` must name at least one (required).
    pub audiences: Vec<String>,
    /// jwt: keys given here, each `{ kid, alg, secret_env | secret_file | public_key_pem_file }`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<FileKey>,
    /// jwt: a JWK set file, re-read when a refresh is due (key rotation by file).
    pub jwks_file: Option<PathBuf>,
    /// jwt: a JWK set URL (`https`, or `http` on a loopback host).
    pub jwks_url: Option<String>,
    /// Clock-skew allowance for `exp`, `nbf` and `iat`, in seconds [default: 30, at most 300].
    pub leeway_s: Option<u64>,
    /// jwt: the claim naming the principal's tenant [default: nops_tenant]; absent → no tenant.
    pub tenant_claim: Option<String>,
    /// jwt: the claim naming the principal's role [default: nops_role]; absent → `default_role`.
    pub role_claim: Option<String>,
    /// jwt: the role of a token without a role claim [default: viewer].
    pub default_role: Option<Role>,
    /// spiffe: the trust domain, e.g. `example.org`.
    pub trust_domain: Option<String>,
    /// spiffe: a SPIFFE trust bundle file (a JWK set whose `"use": "jwt-svid"` keys count).
    pub bundle_file: Option<PathBuf>,
    /// spiffe: a SPIFFE trust bundle URL.
    pub bundle_url: Option<String>,
    /// spiffe: the role of every workload [default: agent].
    pub workload_role: Option<Role>,
    /// spiffe: the tenant of every workload [default: none].
    pub tenant: Option<TenantId>,
    /// spiffe: the scopes of an SVID without a `scope` claim [default: none].
    pub default_scopes: Option<Scopes>,
    /// At most one key set fetch (or file read) per this many ms [default: 30000].
    pub jwks_refetch_interval_ms: Option<u64>,
    /// Keys older than this are refreshed, so removed keys stop working, in ms [default: 300000].
    pub jwks_max_age_ms: Option<u64>,
    /// Longest one key set fetch may take, in ms [default: 5000].
    pub jwks_fetch_timeout_ms: Option<u64>,
    /// Largest key set document, in bytes [default: 262144].
    pub jwks_bytes_max: Option<usize>,
    /// Most usable keys in one key set [default: 64].
    pub jwks_keys_max: Option<usize>,
}

/// One key of an `[[auth.issuers]]` entry: exactly one of `secret_env`, `secret_file`,
/// `public_key_pem_file`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileKey {
    /// The key id tokens name in their header; required when the issuer has several keys.
    pub kid: Option<String>,
    /// The one algorithm the key verifies: HS256/384/512, RS256/384/512, PS256/384/512,
    /// ES256/384 or EdDSA.
    pub alg: String,
    /// HMAC: the environment variable holding the secret (at least the hash size, e.g. 32 bytes).
    pub secret_env: Option<String>,
    /// HMAC: a file holding the secret (one trailing newline is dropped).
    pub secret_file: Option<PathBuf>,
    /// RSA, EC, Ed25519: a PEM public key file.
    pub public_key_pem_file: Option<PathBuf>,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    pub log: String,
    pub store: StoreConfig,
    pub registry: RegistryConfig,
    pub http: HttpConfig,
    pub api_key_pepper: Option<String>,
    /// Where the file layer came from, if any.
    pub config_file: Option<PathBuf>,
    /// Plugin settings.
    pub plugins: PluginSettings,
    /// Token authentication settings.
    pub auth: AuthSettings,
    /// Authorization settings.
    pub authz: nops_core::authz::AuthzConfig,
    /// Limits of the chaos toggles.
    pub chaos: nops_core::chaos::ChaosConfig,
    /// SLOs and their alert rules, validated.
    pub slo: nops_core::slo::SloConfig,
    /// Routing, health scoring and circuit breakers.
    pub routing: RoutingSettings,
    /// Task dispatch, validated.
    pub dispatch: nops_core::dispatch::DispatchConfig,
    /// Degraded modes, validated.
    pub degraded: DegradedSettings,
    /// The event bus's NATS server; `None` is the embedded bus.
    pub nats_url: Option<String>,
    /// Prefix of the kernel's streams on NATS.
    pub nats_prefix: String,
    /// The event bus, validated.
    pub bus: nops_core::bus::BusConfig,
    /// Consumer group defaults and replay limits, validated.
    pub events: nops_core::events::EventsConfig,
    /// The outbox relay, validated.
    pub outbox: nops_core::outbox::OutboxConfig,
}

/// Token authentication, resolved.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// Every issuer and trust domain, validated, with secrets loaded.
    pub issuers: Vec<IssuerConfig>,
    /// The `[[auth.issuers]]` entries as written, for `config show`.
    pub file_issuers: Vec<FileIssuer>,
    /// The development issuer's `iss` and audience, if configured.
    pub dev_issuer: Option<(String, String)>,
}

/// Plugin settings, resolved.
#[derive(Debug, Clone)]
pub struct PluginSettings {
    /// Directory watched for plugins.
    pub dir: Option<PathBuf>,
    /// Ceilings on manifests.
    pub ceilings: Ceilings,
    /// Signature policy and trusted keys.
    pub trust: TrustPolicy,
    /// The trusted keys as configured (base64), for `config show`.
    pub trusted_keys: std::collections::BTreeMap<String, String>,
    /// Where compiled components are cached.
    pub cache_dir: PathBuf,
    /// Most plugin instances alive at once.
    pub instances_max: u32,
}

/// The default configuration file, read when present.
const DEFAULT_CONFIG_FILE: &str = "nops.toml";

impl Config {
    /// Merges flags/env (`args`) over the configuration file over the defaults.
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<Self> {
        let (file, config_file) = match &args.config {
            Some(path) => (read_file(path)?, Some(path.clone())),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                (read_file(Path::new(DEFAULT_CONFIG_FILE))?, Some(PathBuf::from(DEFAULT_CONFIG_FILE)))
            }
            None => (FileConfig::default(), None),
        };
        let data_dir = args.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from("./.nops"));
        let database_url = args
            .database_url
            .clone()
            .or(file.database_url)
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("nops.db").display()));
        let store_defaults = StoreConfig::default();
        let store = StoreConfig {
            database_url,
            pool_connections_max: args
                .db_pool_connections_max
                .or(file.store.pool_connections_max)
                .unwrap_or(store_defaults.pool_connections_max),
            connect_attempts_max: args
                .db_connect_attempts_max
                .or(file.store.connect_attempts_max)
                .unwrap_or(store_defaults.connect_attempts_max)
                .max(1),
            ..store_defaults
        };
        let reg = RegistryConfig::default();
        let lc = &file.lifecycle;
        let registry = RegistryConfig {
            ttl: TtlConfig {
                stale_after_ms: args.stale_after_ms.or(lc.stale_after_ms).unwrap_or(reg.ttl.stale_after_ms),
                zombie_after_ms: args.zombie_after_ms.or(lc.zombie_after_ms).unwrap_or(reg.ttl.zombie_after_ms),
                remove_after_ms: args.remove_after_ms.or(lc.remove_after_ms).unwrap_or(reg.ttl.remove_after_ms),
            },
            heartbeat_flush_interval_ms: args
                .heartbeat_flush_interval_ms
                .or(lc.heartbeat_flush_interval_ms)
                .unwrap_or(reg.heartbeat_flush_interval_ms),
            heartbeat_flush_batch_max: args
                .heartbeat_flush_batch_max
                .or(lc.heartbeat_flush_batch_max)
                .unwrap_or(reg.heartbeat_flush_batch_max),
            sweep_interval_ms: args.sweep_interval_ms.or(lc.sweep_interval_ms).unwrap_or(reg.sweep_interval_ms),
            agents_max: args.agents_max.or(lc.agents_max).unwrap_or(reg.agents_max),
            list_limit_max: reg.list_limit_max,
        };
        registry.ttl.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut http = resolve_http(args, &file.http, &file.rate_limits, &store.database_url)?;
        file.idempotency.validate(http.request_timeout_ms).map_err(|e| anyhow::anyhow!("[idempotency] {e}"))?;
        http.idempotency = file.idempotency.clone();
        let require_signed = args.plugins_require_signed.or(file.plugins.require_signed).unwrap_or(false);
        let trust = TrustPolicy::from_base64(require_signed, &file.plugins.trusted_keys)
            .map_err(|e| anyhow::anyhow!("[plugins] trusted_keys: {e}"))?;
        let plugins = PluginSettings {
            dir: args.plugins_dir.clone().or(file.plugins.dir.clone()),
            ceilings: file.plugins.ceilings.clone().unwrap_or_default(),
            trust,
            trusted_keys: file.plugins.trusted_keys.clone(),
            // wasmtime's cache wants an absolute path.
            cache_dir: std::path::absolute(data_dir.join("cache").join("wasm"))
                .context("resolving the plugin cache directory")?,
            instances_max: args
                .plugin_instances_max
                .or(file.plugins.instances_max)
                .unwrap_or(nops_runtime::INSTANCES_MAX_DEFAULT),
        };
        let auth = resolve_auth(args, &file.auth)?;
        let authz = resolve_authz(args, &file.authz)?;
        let routing = resolve_routing(args, &file.routing, registry.ttl.stale_after_ms)?;
        let dispatch = file.dispatch.clone();
        dispatch.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        if dispatch.wait_ms_max >= http.request_timeout_ms {
            anyhow::bail!(
                "[dispatch] wait_ms_max ({}) must be shorter than [http] request_timeout_ms ({}), or long polls time out",
                dispatch.wait_ms_max,
                http.request_timeout_ms
            );
        }
        file.chaos.validate().map_err(|e| anyhow::anyhow!("[chaos] {e}"))?;
        file.degraded.validate()?;
        let slo_defaults = nops_core::slo::SloConfig::default();
        let slo = nops_core::slo::SloConfig {
            slos: file.slo.clone().unwrap_or(slo_defaults.slos),
            alerts: file.slo_alert.clone().unwrap_or(slo_defaults.alerts),
            sample_interval_ms: slo_defaults.sample_interval_ms,
        };
        slo.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        file.events.validate().map_err(|e| anyhow::anyhow!("[events] {e}"))?;
        if file.events.fetch_wait_ms_max >= http.request_timeout_ms {
            anyhow::bail!(
                "[events] fetch_wait_ms_max ({}) must be shorter than [http] request_timeout_ms ({}), or long polls time out",
                file.events.fetch_wait_ms_max,
                http.request_timeout_ms
            );
        }
        file.outbox.validate().map_err(|e| anyhow::anyhow!("[outbox] {e}"))?;
        if file.bus.dedupe_window_ms == 0 || file.bus.events_max == 0 || file.bus.consumers_per_tenant_max == 0 {
            anyhow::bail!("[bus] dedupe_window_ms, events_max and consumers_per_tenant_max must be at least 1");
        }
        let nats_url = args.nats_url.clone().or(file.nats_url.clone()).filter(|u| !u.is_empty());
        if let Some(url) = &nats_url
            && !(url.starts_with("nats://") || url.starts_with("tls://"))
        {
            anyhow::bail!("NOPS_NATS_URL must start with nats:// or tls://");
        }
        let nats_prefix = args.nats_prefix.clone().or(file.nats_prefix.clone()).unwrap_or_else(|| "NOPS".into());
        if nats_prefix.is_empty()
            || nats_prefix.len() > 16
            || !nats_prefix.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        {
            anyhow::bail!("NOPS_NATS_PREFIX is 1 to 16 uppercase letters or digits");
        }
        Ok(Self {
            nats_url,
            nats_prefix,
            bus: file.bus.clone(),
            events: file.events.clone(),
            outbox: file.outbox.clone(),
            dispatch,
            degraded: file.degraded.clone(),
            chaos: file.chaos,
            slo,
            routing,
            auth,
            authz,
            plugins,
            listen: args.listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7420))),
            data_dir,
            log_format: args.log_format.or(file.log_format).unwrap_or(LogFormat::Json),
            log: args.log.clone().or(file.log).unwrap_or_else(|| "info".into()),
            store,
            registry,
            http,
            api_key_pepper: args.api_key_pepper.clone().or(file.auth.api_key_pepper),
            config_file,
        })
    }

    /// The effective configuration as `nops.toml` text, secrets redacted.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        let file = FileConfig {
            listen: Some(self.listen),
            data_dir: Some(self.data_dir.clone()),
            database_url: Some(nops_store::redact_url(&self.store.database_url)),
            nats_url: self.nats_url.as_deref().map(nops_store::redact_url),
            nats_prefix: Some(self.nats_prefix.clone()),
            log_format: Some(self.log_format),
            log: Some(self.log.clone()),
            store: FileStore {
                pool_connections_max: Some(self.store.pool_connections_max),
                connect_attempts_max: Some(self.store.connect_attempts_max),
            },
            lifecycle: FileLifecycle {
                stale_after_ms: Some(self.registry.ttl.stale_after_ms),
                zombie_after_ms: Some(self.registry.ttl.zombie_after_ms),
                remove_after_ms: Some(self.registry.ttl.remove_after_ms),
                sweep_interval_ms: Some(self.registry.sweep_interval_ms),
                heartbeat_flush_interval_ms: Some(self.registry.heartbeat_flush_interval_ms),
                heartbeat_flush_batch_max: Some(self.registry.heartbeat_flush_batch_max),
                agents_max: Some(self.registry.agents_max),
            },
            http: FileHttp {
                body_bytes_max: Some(self.http.body_bytes_max),
                request_timeout_ms: Some(self.http.request_timeout_ms),
                headers_bytes_max: Some(self.http.headers_bytes_max),
                json_depth_max: Some(self.http.json_depth_max),
                header_read_timeout_ms: Some(self.http.header_read_timeout_ms),
                connections_max: Some(self.http.connections_max),
                in_flight_max: Some(self.http.in_flight_max),
            },
            rate_limits: {
                let limits = &self.http.rate_limits;
                FileRateLimits {
                    enabled: Some(limits.enabled),
                    shared: Some(limits.shared),
                    on_store_error: Some(limits.on_store_error),
                    keys_max: Some(limits.keys_max),
                    housekeeping_interval_ms: Some(limits.housekeeping_interval_ms),
                    store_timeout_ms: Some(limits.store_timeout_ms),
                    per_key: limits.per_key,
                    per_tenant: limits.per_tenant,
                    route_default: limits.route_default,
                    per_route: limits.per_route.clone(),
                }
            },
            auth: FileAuth {
                api_key_pepper: self.api_key_pepper.as_ref().map(|_| "<redacted>".into()),
                jwt_hs256_secret: self.auth.dev_issuer.as_ref().map(|_| SecretString::from("<redacted>".to_owned())),
                jwt_issuer: self.auth.dev_issuer.as_ref().map(|(iss, _)| iss.clone()),
                jwt_audience: self.auth.dev_issuer.as_ref().map(|(_, aud)| aud.clone()),
                issuers: self.auth.file_issuers.clone(),
            },
            authz: FileAuthz {
                policies: Some(self.authz.policies.clone()),
                builtin_only: Some(self.authz.builtin_only),
            },
            routing: file_routing(&self.routing),
            dispatch: self.dispatch.clone(),
            degraded: self.degraded.clone(),
            idempotency: self.http.idempotency.clone(),
            bus: self.bus.clone(),
            events: self.events.clone(),
            outbox: self.outbox.clone(),
            chaos: self.chaos,
            slo: Some(self.slo.slos.clone()),
            slo_alert: Some(self.slo.alerts.clone()),
            plugins: FilePlugins {
                dir: self.plugins.dir.clone(),
                require_signed: Some(self.plugins.trust.require_signed),
                trusted_keys: self.plugins.trusted_keys.clone(),
                ceilings: Some(self.plugins.ceilings.clone()),
                instances_max: Some(self.plugins.instances_max),
            },
        };
        Ok(toml::to_string_pretty(&file)?)
    }
}

/// Resolves `[http]` and `[rate_limits]` (flags/env over the file over the defaults) and checks
/// them: every limit at least 1, route budgets naming real routes, and shared rate limits only
/// on PostgreSQL.
fn resolve_http(
    args: &ServeArgs,
    file: &FileHttp,
    limits: &FileRateLimits,
    database_url: &str,
) -> anyhow::Result<HttpConfig> {
    let d = HttpConfig::default();
    let rd = d.rate_limits.clone();
    let rate_limits = nops_api::RateLimitConfig {
        enabled: args.rate_limits_enabled.or(limits.enabled).unwrap_or(rd.enabled),
        shared: args.rate_limits_shared.or(limits.shared).unwrap_or(rd.shared),
        on_store_error: limits.on_store_error.unwrap_or(rd.on_store_error),
        per_key: limits.per_key.or(rd.per_key),
        per_tenant: limits.per_tenant.or(rd.per_tenant),
        per_route: limits.per_route.clone(),
        route_default: limits.route_default.or(rd.route_default),
        keys_max: limits.keys_max.unwrap_or(rd.keys_max),
        housekeeping_interval_ms: limits.housekeeping_interval_ms.unwrap_or(rd.housekeeping_interval_ms),
        store_timeout_ms: limits.store_timeout_ms.unwrap_or(rd.store_timeout_ms),
    };
    let routes: Vec<String> = nops_api::access_table().entries().map(|(m, path, _)| format!("{m} {path}")).collect();
    rate_limits.validate(routes.iter().map(String::as_str)).map_err(|e| anyhow::anyhow!("[rate_limits] {e}"))?;
    if rate_limits.enabled && rate_limits.shared && database_url.starts_with("sqlite:") {
        anyhow::bail!(
            "[rate_limits] shared = true needs PostgreSQL: kernels share rate limits through the database, and \
             SQLite is one kernel's file. Use a postgres:// database_url, or shared = false"
        );
    }
    let http = HttpConfig {
        body_bytes_max: args.body_bytes_max.or(file.body_bytes_max).unwrap_or(d.body_bytes_max),
        request_timeout_ms: args.request_timeout_ms.or(file.request_timeout_ms).unwrap_or(d.request_timeout_ms),
        headers_bytes_max: args.headers_bytes_max.or(file.headers_bytes_max).unwrap_or(d.headers_bytes_max),
        json_depth_max: args.json_depth_max.or(file.json_depth_max).unwrap_or(d.json_depth_max),
        header_read_timeout_ms: args
            .header_read_timeout_ms
            .or(file.header_read_timeout_ms)
            .unwrap_or(d.header_read_timeout_ms),
        connections_max: args.connections_max.or(file.connections_max).unwrap_or(d.connections_max),
        in_flight_max: args.in_flight_max.or(file.in_flight_max).unwrap_or(d.in_flight_max),
        rate_limits,
        ..d
    };
    for (name, value) in [
        ("body_bytes_max", http.body_bytes_max as u64),
        ("request_timeout_ms", http.request_timeout_ms),
        ("headers_bytes_max", http.headers_bytes_max as u64),
        ("json_depth_max", http.json_depth_max as u64),
        ("header_read_timeout_ms", http.header_read_timeout_ms),
        ("connections_max", http.connections_max as u64),
        ("in_flight_max", http.in_flight_max as u64),
    ] {
        if value == 0 {
            anyhow::bail!("[http] {name} must be at least 1");
        }
    }
    Ok(http)
}

/// Resolves `[authz]` and the break-glass flag; every governing name must be a valid plugin
/// name.
fn resolve_authz(args: &ServeArgs, file: &FileAuthz) -> anyhow::Result<nops_core::authz::AuthzConfig> {
    let mut config = nops_core::authz::AuthzConfig::default();
    if let Some(policies) = &file.policies {
        for name in policies {
            nops_core::plugin::validate_plugin_name(name).map_err(|e| anyhow::anyhow!("[authz] policies: {e}"))?;
        }
        config.policies = policies.clone();
    }
    config.builtin_only = args.authz_builtin_only.or(file.builtin_only).unwrap_or(false);
    Ok(config)
}

/// Resolves the development issuer (flags/env over `[auth]`) and the `[[auth.issuers]]` entries.
fn resolve_auth(args: &ServeArgs, file: &FileAuth) -> anyhow::Result<AuthSettings> {
    let mut issuers = Vec::new();
    for (i, entry) in file.issuers.iter().enumerate() {
        let label = format!("[[auth.issuers]] #{}", i + 1);
        let config = resolve_issuer(entry).with_context(|| label.clone())?;
        config.validate().map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
        issuers.push(config);
    }
    let secret = args.jwt_hs256_secret.clone().or_else(|| file.jwt_hs256_secret.clone());
    let iss = args.jwt_issuer.clone().or_else(|| file.jwt_issuer.clone());
    let aud = args.jwt_audience.clone().or_else(|| file.jwt_audience.clone());
    let dev_issuer = match (secret, iss, aud) {
        (None, None, None) => None,
        (Some(secret), Some(iss), Some(aud)) => {
            let config = IssuerConfig {
                kind: IssuerKind::Jwt(JwtIssuer::new(iss.clone())),
                audiences: vec![aud.clone()],
                keys: KeySource::Inline(vec![InlineKey {
                    kid: None,
                    alg: Algorithm::HS256,
                    material: KeyMaterial::HmacSecret(Zeroizing::new(secret.expose().as_bytes().to_vec())),
                }]),
                leeway_s: LEEWAY_S_DEFAULT,
                jwks: JwksLimits::default(),
            };
            config
                .validate()
                .map_err(|e| anyhow::anyhow!("the development JWT issuer (NOPS_JWT_HS256_SECRET): {e}"))?;
            issuers.push(config);
            Some((iss, aud))
        }
        (secret, iss, aud) => {
            let missing: Vec<&str> = [
                (secret.is_none(), "NOPS_JWT_HS256_SECRET (jwt_hs256_secret)"),
                (iss.is_none(), "NOPS_JWT_ISSUER (jwt_issuer)"),
                (aud.is_none(), "NOPS_JWT_AUDIENCE (jwt_audience)"),
            ]
            .into_iter()
            .filter_map(|(missing, name)| missing.then_some(name))
            .collect();
            anyhow::bail!("the development JWT issuer needs all three settings; missing: {}", missing.join(", "));
        }
    };
    let mut seen = std::collections::HashSet::new();
    for config in &issuers {
        let key = (matches!(config.kind, IssuerKind::Spiffe(_)), config.name().to_owned());
        if !seen.insert(key) {
            anyhow::bail!("[auth] issuer or trust domain `{}` is configured twice", config.name());
        }
    }
    Ok(AuthSettings { issuers, file_issuers: file.issuers.clone(), dev_issuer })
}

/// One `[[auth.issuers]]` entry, with its secrets and key files read.
fn resolve_issuer(entry: &FileIssuer) -> anyhow::Result<IssuerConfig> {
    let refuse = |fields: &[(&str, bool)], kind: &str| -> anyhow::Result<()> {
        match fields.iter().find(|(_, set)| *set) {
            Some((field, _)) => anyhow::bail!("{field} does not apply to kind = \"{kind}\""),
            None => Ok(()),
        }
    };
    let one_of = |fields: &[(&str, bool)]| -> anyhow::Result<()> {
        let names: Vec<&str> = fields.iter().map(|(name, _)| *name).collect();
        match fields.iter().filter(|(_, set)| *set).count() {
            1 => Ok(()),
            0 => anyhow::bail!("one of {} is required", names.join(", ")),
            _ => anyhow::bail!("only one of {} may be set", names.join(", ")),
        }
    };
    let (kind, keys) = match entry.kind {
        FileIssuerKind::Jwt => {
            refuse(
                &[
                    ("trust_domain", entry.trust_domain.is_some()),
                    ("bundle_file", entry.bundle_file.is_some()),
                    ("bundle_url", entry.bundle_url.is_some()),
                    ("workload_role", entry.workload_role.is_some()),
                    ("tenant", entry.tenant.is_some()),
                    ("default_scopes", entry.default_scopes.is_some()),
                ],
                "jwt",
            )?;
            let issuer = entry.issuer.clone().filter(|i| !i.is_empty()).context("issuer is required")?;
            one_of(&[
                ("keys", !entry.keys.is_empty()),
                ("jwks_file", entry.jwks_file.is_some()),
                ("jwks_url", entry.jwks_url.is_some()),
            ])?;
            let keys = if let Some(path) = &entry.jwks_file {
                KeySource::JwksFile(path.clone())
            } else if let Some(url) = &entry.jwks_url {
                KeySource::JwksUrl(url.clone())
            } else {
                let keys = entry
                    .keys
                    .iter()
                    .enumerate()
                    .map(|(i, key)| resolve_key(key).with_context(|| format!("keys[{i}]")));
                KeySource::Inline(keys.collect::<anyhow::Result<_>>()?)
            };
            let jwt = JwtIssuer {
                issuer,
                tenant_claim: entry.tenant_claim.clone().unwrap_or_else(|| TENANT_CLAIM_DEFAULT.into()),
                role_claim: entry.role_claim.clone().unwrap_or_else(|| ROLE_CLAIM_DEFAULT.into()),
                default_role: entry.default_role.unwrap_or(Role::Viewer),
            };
            (IssuerKind::Jwt(jwt), keys)
        }
        FileIssuerKind::Spiffe => {
            refuse(
                &[
                    ("issuer", entry.issuer.is_some()),
                    ("keys", !entry.keys.is_empty()),
                    ("jwks_file", entry.jwks_file.is_some()),
                    ("jwks_url", entry.jwks_url.is_some()),
                    ("tenant_claim", entry.tenant_claim.is_some()),
                    ("role_claim", entry.role_claim.is_some()),
                    ("default_role", entry.default_role.is_some()),
                ],
                "spiffe",
            )?;
            let trust_domain = entry.trust_domain.clone().context("trust_domain is required")?;
            one_of(&[("bundle_file", entry.bundle_file.is_some()), ("bundle_url", entry.bundle_url.is_some())])?;
            let keys = match (&entry.bundle_file, &entry.bundle_url) {
                (Some(path), _) => KeySource::JwksFile(path.clone()),
                (None, Some(url)) => KeySource::JwksUrl(url.clone()),
                (None, None) => unreachable!("checked by one_of"),
            };
            let spiffe = SpiffeIssuer {
                trust_domain,
                workload_role: entry.workload_role.unwrap_or(Role::Agent),
                tenant: entry.tenant.clone(),
                default_scopes: entry.default_scopes.clone().unwrap_or_default(),
            };
            (IssuerKind::Spiffe(spiffe), keys)
        }
    };
    if entry.audiences.is_empty() {
        anyhow::bail!("audiences is required (a non-empty list)");
    }
    let leeway_s = entry.leeway_s.unwrap_or(LEEWAY_S_DEFAULT);
    if leeway_s > LEEWAY_S_MAX {
        anyhow::bail!("leeway_s must be at most {LEEWAY_S_MAX}");
    }
    let defaults = JwksLimits::default();
    Ok(IssuerConfig {
        kind,
        audiences: entry.audiences.clone(),
        keys,
        leeway_s,
        jwks: JwksLimits {
            refetch_interval_ms: entry.jwks_refetch_interval_ms.unwrap_or(defaults.refetch_interval_ms),
            max_age_ms: entry.jwks_max_age_ms.unwrap_or(defaults.max_age_ms),
            fetch_timeout_ms: entry.jwks_fetch_timeout_ms.unwrap_or(defaults.fetch_timeout_ms),
            bytes_max: entry.jwks_bytes_max.unwrap_or(defaults.bytes_max),
            keys_max: entry.jwks_keys_max.unwrap_or(defaults.keys_max),
        },
    })
}

/// One inline key, with its secret or public key read.
fn resolve_key(key: &FileKey) -> anyhow::Result<InlineKey> {
    let alg = parse_algorithm(&key.alg).with_context(|| {
        format!(
            "alg `{}` is not one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA",
            key.alg
        )
    })?;
    let material = match (&key.secret_env, &key.secret_file, &key.public_key_pem_file) {
        (Some(var), None, None) => {
            let secret = std::env::var(var)
                .ok()
                .filter(|s| !s.is_empty())
                .with_context(|| format!("secret_env: the environment variable {var} is not set"))?;
            KeyMaterial::HmacSecret(Zeroizing::new(secret.into_bytes()))
        }
        (None, Some(path), None) => KeyMaterial::HmacSecret(read_secret_file(path).context("secret_file")?),
        (None, None, Some(path)) => KeyMaterial::PublicKeyPem(
            std::fs::read(path).with_context(|| format!("public_key_pem_file: reading {}", path.display()))?,
        ),
        _ => anyhow::bail!("exactly one of secret_env, secret_file, public_key_pem_file is required"),
    };
    Ok(InlineKey { kid: key.kid.clone(), alg, material })
}

/// Reads a secret from a file, dropping one trailing newline (`\n` or `\r\n`).
pub fn read_secret_file(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let mut secret = Zeroizing::new(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    if secret.last() == Some(&b'\n') {
        secret.pop();
        if secret.last() == Some(&b'\r') {
            secret.pop();
        }
    }
    Ok(secret)
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_override_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nops.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\ndata_dir = \"/tmp/x\"\n[lifecycle]\nstale_after_ms = 5000\nzombie_after_ms = 9000\n",
        )
        .expect("write");
        let args = ServeArgs { config: Some(path.clone()), stale_after_ms: Some(4000), ..ServeArgs::default() };
        let config = Config::resolve(&args).expect("config");
        assert_eq!(config.listen.port(), 9000, "file over default");
        assert_eq!(config.registry.ttl.stale_after_ms, 4000, "flag over file");
        assert_eq!(config.registry.ttl.zombie_after_ms, 9000, "file over default");
        assert_eq!(config.registry.ttl.remove_after_ms, 600_000, "default");
        assert_eq!(config.store.database_url, "sqlite:///tmp/x/nops.db", "derived from data_dir");
    }

    #[test]
    fn the_scorer_flag_overrides_the_routing_section() {
        let (_dir, args) = with_file("[routing]\nscorer = \"from-file\"\n");
        assert_eq!(Config::resolve(&args).expect("config").routing.routing.scorer, "from-file");
        let args = ServeArgs { routing_scorer: Some("scorer-weighted".into()), ..args };
        assert_eq!(Config::resolve(&args).expect("config").routing.routing.scorer, "scorer-weighted");
        let bad = ServeArgs { routing_scorer: Some("Not A Name".into()), ..args };
        assert!(Config::resolve(&bad).is_err(), "the name is checked like a plugin name");
    }

    #[test]
    fn unknown_keys_and_bad_thresholds_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nops.toml");
        std::fs::write(&path, "lisen = \"127.0.0.1:9000\"\n").expect("write");
        let err = Config::resolve(&ServeArgs { config: Some(path.clone()), ..ServeArgs::default() })
            .expect_err("typo refused");
        assert!(format!("{err:#}").contains("lisen"), "{err:#}");
        let args = ServeArgs { stale_after_ms: Some(999_999), ..ServeArgs::default() };
        assert!(Config::resolve(&args).is_err());
    }

    fn with_file(text: &str) -> (tempfile::TempDir, ServeArgs) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nops.toml");
        std::fs::write(&path, text).expect("write");
        (dir, ServeArgs { config: Some(path), ..ServeArgs::default() })
    }

    const SECRET: &str = "a-development-secret-of-32-bytes-or-more";

    #[test]
    fn auth_issuers_resolve_from_the_file() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/jwt");
        let (dir, args) = with_file(&format!(
            r#"
[[auth.issuers]]
issuer = "https://idp.example.com/"
audiences = ["nops"]
leeway_s = 10
default_role = "operator"
keys = [
  {{ kid = "ec", alg = "ES256", public_key_pem_file = "{fixtures}/ec_public.pem" }},
  {{ kid = "hs", alg = "HS256", secret_file = "SECRET_FILE" }},
]

[[auth.issuers]]
kind = "spiffe"
trust_domain = "example.org"
audiences = ["nops"]
bundle_url = "https://spire.example.org/bundle"
tenant = "acme"
default_scopes = ["agents:heartbeat"]
"#
        ));
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, format!("{SECRET}\n")).expect("write");
        let text = std::fs::read_to_string(args.config.as_ref().expect("path")).expect("read");
        std::fs::write(
            args.config.as_ref().expect("path"),
            text.replace("SECRET_FILE", &secret_file.display().to_string()),
        )
        .expect("write");
        let config = Config::resolve(&args).expect("config");
        assert_eq!(config.auth.issuers.len(), 2);
        let IssuerKind::Jwt(jwt) = &config.auth.issuers[0].kind else { panic!("a jwt issuer") };
        assert_eq!((jwt.default_role, jwt.tenant_claim.as_str()), (Role::Operator, "nops_tenant"));
        assert_eq!(config.auth.issuers[0].leeway_s, 10);
        let KeySource::Inline(keys) = &config.auth.issuers[0].keys else { panic!("inline keys") };
        assert!(matches!(&keys[1].material, KeyMaterial::HmacSecret(s) if s.as_slice() == SECRET.as_bytes()));
        assert!(matches!(config.auth.issuers[1].kind, IssuerKind::Spiffe(_)));
        let shown = config.to_toml().expect("toml");
        assert!(shown.contains("trust_domain = \"example.org\"") && !shown.contains(SECRET), "{shown}");
    }

    #[test]
    fn bad_auth_settings_are_startup_errors_naming_the_field() {
        let cases = [
            (
                "[[auth.issuers]]\nissuer = \"i\"\naudiences = [\"a\"]\njwks_url = \"https://x/j\"\nleeway_s = 301\n",
                "leeway_s",
            ),
            ("[[auth.issuers]]\nissuer = \"i\"\njwks_url = \"https://x/j\"\n", "audiences"),
            ("[[auth.issuers]]\naudiences = [\"a\"]\njwks_url = \"https://x/j\"\n", "issuer is required"),
            ("[[auth.issuers]]\nissuer = \"i\"\naudiences = [\"a\"]\n", "one of keys, jwks_file, jwks_url"),
            (
                "[[auth.issuers]]\nissuer = \"i\"\naudiences = [\"a\"]\njwks_url = \"https://x/j\"\njwks_file = \"j\"\n",
                "only one of",
            ),
            (
                "[[auth.issuers]]\nissuer = \"i\"\naudiences = [\"a\"]\njwks_url = \"http://idp.example.com/j\"\n",
                "https",
            ),
            (
                "[[auth.issuers]]\nissuer = \"i\"\naudiences = [\"a\"]\nkeys = [{ alg = \"none\", secret_env = \"X\" }]\n",
                "keys[0]",
            ),
            (
                "[[auth.issuers]]\nissuer = \"i\"\naudiences = [\"a\"]\nkeys = [{ alg = \"HS256\", secret_env = \"NOPS_TEST_UNSET_SECRET\" }]\n",
                "NOPS_TEST_UNSET_SECRET",
            ),
            (
                "[[auth.issuers]]\nkind = \"spiffe\"\ntrust_domain = \"Example.org\"\naudiences = [\"a\"]\nbundle_url = \"https://x/b\"\n",
                "trust_domain",
            ),
            (
                "[[auth.issuers]]\nkind = \"spiffe\"\nissuer = \"i\"\ntrust_domain = \"e.org\"\naudiences = [\"a\"]\nbundle_url = \"https://x/b\"\n",
                "issuer does not apply",
            ),
            (
                "[[auth.issuers]]\nissuer = \"i\"\naudiences = [\"a\"]\njwks_url = \"https://x/j\"\ndefault_role = \"root\"\n",
                "default_role",
            ),
            ("[auth]\njwt_issuer = \"dev\"\n", "NOPS_JWT_HS256_SECRET"),
            ("[auth]\njwt_issuer = \"dev\"\njwt_audience = \"nops\"\njwt_hs256_secret = \"short\"\n", "32 bytes"),
        ];
        for (text, field) in cases {
            let (_dir, args) = with_file(text);
            let err = format!("{:#}", Config::resolve(&args).expect_err(text));
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn the_development_issuer_comes_from_flags_or_env_and_stays_secret() {
        let args = ServeArgs {
            jwt_hs256_secret: Some(SecretString::from(SECRET.to_owned())),
            jwt_issuer: Some("dev".into()),
            jwt_audience: Some("nops".into()),
            ..ServeArgs::default()
        };
        let config = Config::resolve(&args).expect("config");
        assert_eq!(config.auth.issuers.len(), 1);
        assert_eq!(config.auth.dev_issuer, Some(("dev".into(), "nops".into())));
        for text in [format!("{args:?}"), format!("{config:?}"), config.to_toml().expect("toml")] {
            assert!(!text.contains(SECRET), "{text}");
        }
    }
}
