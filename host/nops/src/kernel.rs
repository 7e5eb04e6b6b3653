//! Wiring: opens the store, creates the bootstrap key, loads the registry and builds the HTTP
//! application. Shared by `nops serve` and the integration tests.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use nops_api::{AppState, Services};
use nops_core::auth::keys::{KeyConfig, KeyService};
use nops_core::auth::{ApiKeyAuthenticator, BearerAuthenticator, GeneratedKey, KeyHasher, ensure_bootstrap_key};
use nops_core::authz::PolicyAuthorizer;
use nops_core::chaos::Chaos;
use nops_core::chaos::store::ChaosStore;
use nops_core::clock::Clock;
use nops_core::degraded::{DegradedModes, OutboxSink, WriteClass};
use nops_core::health::HealthTable;
use nops_core::metrics::Metrics;
use nops_core::plugin::service::{PluginConfig, PluginService};
use nops_core::registry::Registry;
use nops_core::routing::RoutingService;
use nops_core::slo::SloService;
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
    /// Routing and agent health (also in `state`).
    pub routing: Arc<RoutingService>,
    /// Task dispatch (also in `state`), for its background work and tests.
    pub dispatch: Arc<nops_core::dispatch::TaskService>,
    /// Degraded modes (also in `state`): the store probe and the spool's replay.
    pub degraded: Arc<DegradedModes>,
    /// The event bus (embedded or NATS).
    pub bus: Arc<dyn nops_core::bus::Bus>,
    /// The embedded bus, when it is the one in use, for its retention sweep.
    pub embedded_bus: Option<nops_store::bus::EmbeddedBus>,
    /// The outbox relay, run by `nops serve`.
    pub relay: Arc<nops_core::outbox::OutboxRelay>,
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
        // Chaos toggles (off until an admin turns one on) wrap every store call; their own
        // change events go to the undecorated store.
        let chaos = Arc::new(Chaos::with(clock.clone(), metrics.clone(), Some(Arc::new(sql.clone())), config.chaos));
        let remote = nops_core::store::StoreHealth::backend(&sql) == "postgres";
        // Critical writes wait in a local spool while a remote database is down; a local
        // SQLite store needs none (if it cannot be written, neither could the spool).
        let spool: Option<Arc<dyn nops_core::degraded::Spool>> = if remote {
            let path = config.data_dir.join("spool.db");
            let spool = nops_store::spool::SqliteSpool::open(&path, config.degraded.spool_limits())
                .await
                .map_err(|e| anyhow::anyhow!("opening the spool {}: {e}", path.display()))?;
            Some(Arc::new(spool))
        } else {
            None
        };
        let mut degraded = DegradedModes::new(config.degraded.core(), spool, clock.clone(), metrics.clone());
        if remote {
            degraded = degraded.failing_fast();
        }
        let degraded = Arc::new(degraded);
        let store: Arc<dyn Store> =
            Arc::new(ChaosStore::new(sql.clone(), chaos.clone()).with_degraded(degraded.clone()));
        let hasher =
            KeyHasher::new(config.api_key_pepper.as_deref().map(str::as_bytes)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let bootstrap_key = ensure_bootstrap_key(store.as_ref(), &hasher, clock.now_ms())
            .await
            .context("creating the bootstrap key")?;
        let health = Arc::new(HealthTable::new(config.routing.health.clone(), clock.clone(), metrics.clone()));
        let registry = Arc::new(
            Registry::new(store.clone(), clock.clone(), metrics.clone(), config.registry.clone())
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .with_health(health.clone()),
        );
        let agents_loaded = registry.load().await.context("loading the agent registry")?;
        let runtime = nops_runtime::Runtime::new(
            &nops_runtime::RuntimeConfig {
                cache_dir: Some(config.plugins.cache_dir.clone()),
                instances_max: config.plugins.instances_max,
                ..nops_runtime::RuntimeConfig::default()
            },
            Arc::new(ChaosStore::new(sql.clone(), chaos.clone()).with_degraded(degraded.clone())),
            Arc::new(ChaosStore::new(sql.clone(), chaos.clone()).with_degraded(degraded.clone())),
        )
        .map_err(|e| anyhow::anyhow!("starting the plugin runtime: {e:#}"))?;
        let plugins = Arc::new(
            PluginService::new(
                store.clone(),
                Arc::new(runtime),
                clock.clone(),
                metrics.clone(),
                PluginConfig { ceilings: config.plugins.ceilings.clone(), trust: config.plugins.trust.clone() },
            )
            .with_chaos(chaos.clone()),
        );
        plugins.verify_chains().await.map_err(|e| anyhow::anyhow!("plugin provenance check failed: {e}"))?;
        plugins.sync().await.context("loading the active plugins")?;
        let routing = Arc::new(RoutingService::new(
            registry.clone(),
            Some(plugins.clone()),
            health,
            metrics.clone(),
            config.routing.routing.clone(),
        ));
        let api_keys = Arc::new(ApiKeyAuthenticator::new(store.clone(), hasher, clock.clone()));
        let keys = Arc::new(KeyService::new(
            store.clone(),
            api_keys.clone(),
            clock.clone(),
            metrics.clone(),
            KeyConfig::default(),
        ));
        keys.refresh_metrics().await.context("counting the API keys")?;
        let dispatch = Arc::new(
            nops_core::dispatch::TaskService::new(
                store.clone(),
                routing.clone(),
                Arc::new(crate::dispatch_http::HttpTaskTransport::new(config.dispatch.output_bytes_max)?),
                chaos.clone(),
                clock.clone(),
                metrics.clone(),
                config.dispatch.clone(),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_degraded(degraded.clone()),
        );
        degraded.set_sink(WriteClass::TaskResult, dispatch.clone());
        degraded.set_sink(WriteClass::AuditEvent, Arc::new(OutboxSink(Arc::new(sql.clone()))));
        chaos.set_degraded(degraded.clone());
        let slo = Arc::new(SloService::new(config.slo.clone(), clock.clone(), metrics.clone()));
        let (bus, embedded_bus): (Arc<dyn nops_core::bus::Bus>, _) = match &config.nats_url {
            Some(url) => {
                let nats = nops_bus::NatsBus::connect(nops_bus::NatsBusConfig {
                    url: url.clone(),
                    prefix: config.nats_prefix.clone(),
                    bus: config.bus.clone(),
                })
                .await
                .map_err(|e| {
                    anyhow::anyhow!("connecting to the NATS event bus at {}: {e}", nops_store::redact_url(url))
                })?;
                (Arc::new(nats), None)
            }
            None => {
                let embedded = nops_store::bus::EmbeddedBus::new(&sql, config.bus.clone(), clock.clone());
                (Arc::new(embedded.clone()), Some(embedded))
            }
        };
        let mut events = nops_core::events::EventService::new(
            bus.clone(),
            Some(plugins.clone()),
            clock.clone(),
            metrics.clone(),
            config.events.clone(),
        );
        if embedded_bus.is_none() {
            // A remote bus can go away while the store stays: publishes then wait in the outbox.
            events = events.with_buffer(Arc::new(sql.clone()), degraded.clone());
        }
        let events = Arc::new(events);
        let relay = Arc::new(nops_core::outbox::OutboxRelay::new(
            Arc::new(sql.clone()),
            bus.clone(),
            clock.clone(),
            metrics.clone(),
            config.outbox.clone(),
        ));
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
            routing: routing.clone(),
            chaos: chaos.clone(),
            dispatch: dispatch.clone(),
            degraded: degraded.clone(),
            events,
            slo,
            http: config.http.clone(),
            started_at,
        });
        Ok(Self {
            state,
            registry,
            store: sql,
            bootstrap_key,
            agents_loaded,
            plugins,
            routing,
            dispatch,
            degraded,
            bus,
            embedded_bus,
            relay,
        })
    }

    /// The HTTP application.
    pub fn router(&self) -> axum::Router {
        nops_api::router(self.state.clone())
    }
}
