//! Wiring: opens the store, creates the bootstrap key, loads the registry and builds the HTTP
//! application. Shared by `nops serve` and the integration tests.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use nops_api::{AppState, Services};
use nops_core::auth::keys::{KeyConfig, KeyService};
use nops_core::auth::{ApiKeyAuthenticator, BearerAuthenticator, GeneratedKey, KeyHasher, ensure_bootstrap_key};
use nops_core::authz::PolicyAuthorizer;
use nops_core::clock::Clock;
use nops_core::metrics::Metrics;
use nops_core::plugin::service::{PluginConfig, PluginService};
use nops_core::registry::Registry;
use nops_core::store::Store;
use nops_store::SqlStore;

use crate::config::Config;

/// A kernel, ready to serve.
pub struct Kernel {
    /// What the HTTP handlers reach.
    pub state: AppState,
    /// The agent registry (also in `state`), for background work and tests.
    pub registry: Arc<Registry>,
    /// The store.
    pub store: SqlStore,
    /// The bootstrap admin key, when this start created it (print it once).
    pub bootstrap_key: Option<GeneratedKey>,
    /// Agents loaded from the store at start.
    pub agents_loaded: usize,
    /// The plugin lifecycle.
    pub plugins: Arc<PluginService>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel").field("store", &self.store).finish_non_exhaustive()
    }
}

impl Kernel {
    /// Opens everything `config` names, with time from `clock`.
    pub async fn open(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let started_at = Instant::now();
        let metrics = Metrics::new();
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
        let sql = SqlStore::open(&config.store).await?;
        let store: Arc<dyn Store> = Arc::new(sql.clone());
        let hasher =
            KeyHasher::new(config.api_key_pepper.as_deref().map(str::as_bytes)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let bootstrap_key = ensure_bootstrap_key(store.as_ref(), &hasher, clock.now_ms())
            .await
            .context("creating the bootstrap key")?;
        let registry = Arc::new(
            Registry::new(store.clone(), clock.clone(), metrics.clone(), config.registry.clone())
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let agents_loaded = registry.load().await.context("loading the agent registry")?;
        let runtime = nops_runtime::Runtime::new(
            &nops_runtime::RuntimeConfig {
                cache_dir: Some(config.plugins.cache_dir.clone()),
                instances_max: config.plugins.instances_max,
                ..nops_runtime::RuntimeConfig::default()
            },
            Arc::new(sql.clone()),
            Arc::new(sql.clone()),
        )
        .map_err(|e| anyhow::anyhow!("starting the plugin runtime: {e:#}"))?;
        let plugins = Arc::new(PluginService::new(
            store.clone(),
            Arc::new(runtime),
            clock.clone(),
            metrics.clone(),
            PluginConfig { ceilings: config.plugins.ceilings.clone(), trust: config.plugins.trust.clone() },
        ));
        plugins.verify_chains().await.map_err(|e| anyhow::anyhow!("plugin provenance check failed: {e}"))?;
        plugins.sync().await.context("loading the active plugins")?;
        let api_keys = Arc::new(ApiKeyAuthenticator::new(store.clone(), hasher, clock.clone()));
        let keys = Arc::new(KeyService::new(
            store.clone(),
            api_keys.clone(),
            clock.clone(),
            metrics.clone(),
            KeyConfig::default(),
        ));
        keys.refresh_metrics().await.context("counting the API keys")?;
        let state = AppState::new(Services {
            registry: registry.clone(),
            store: store.clone(),
            keys: keys.clone(),
            authenticator: Arc::new(BearerAuthenticator {
                api_keys: api_keys.clone(),
                tokens: crate::jwks_http::token_authenticator(&config.auth, clock.clone()).await?,
            }),
            authorizer: Arc::new(PolicyAuthorizer::new(Some(plugins.clone()), config.authz.clone(), metrics.clone())),
            access: nops_api::access_table(),
            clock,
            metrics,
            plugins: Some(plugins.clone()),
            http: config.http.clone(),
            started_at,
        });
        Ok(Self { state, registry, store: sql, bootstrap_key, agents_loaded, plugins })
    }

    /// The HTTP application.
    pub fn router(&self) -> axum::Router {
        nops_api::router(self.state.clone())
    }
}
