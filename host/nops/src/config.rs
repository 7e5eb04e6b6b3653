//! Configuration: command-line flags override environment variables, which override
//! `nops.toml`, which overrides the built-in defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use nops_api::HttpConfig;
use nops_core::plugin::{Ceilings, TrustPolicy};
use nops_core::registry::{RegistryConfig, TtlConfig};
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

    #[arg(long, env = "NOPS_API_KEY_PEPPER", value_name = "SECRET", hide_env_values = true, help_heading = "Auth")]
    pub api_key_pepper: Option<String>,
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
    pub log_format: Option<LogFormat>,
    pub log: Option<String>,
    pub store: FileStore,
    pub lifecycle: FileLifecycle,
    pub http: FileHttp,
    pub auth: FileAuth,
    pub plugins: FilePlugins,
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
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileAuth {
    pub api_key_pepper: Option<String>,
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
        let http_defaults = HttpConfig::default();
        let http = HttpConfig {
            body_bytes_max: args.body_bytes_max.or(file.http.body_bytes_max).unwrap_or(http_defaults.body_bytes_max),
            request_timeout_ms: args
                .request_timeout_ms
                .or(file.http.request_timeout_ms)
                .unwrap_or(http_defaults.request_timeout_ms),
            ..http_defaults
        };
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
        Ok(Self {
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
            },
            auth: FileAuth { api_key_pepper: self.api_key_pepper.as_ref().map(|_| "<redacted>".into()) },
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
}
