//! The plugin lifecycle: upload → verify → compile → stage → activate (atomic swap) →
//! rollback, shadow runs, deletion, and calls with each kind's failure semantics.
//!
//! The active set is one immutable map behind an [`ArcSwap`]: a call loads it once and keeps
//! the version it found, so an activation never fails a call in flight and never blocks one.
//! Every change is written to the store first (with its hash-chain entry, in one
//! transaction) and then applied here; other replicas notice the store's plugin generation
//! change ([`PluginService::sync`], polled every [`SYNC_INTERVAL_MS`]) and rebuild their set.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};
use semver::Version;
use serde::Serialize;

use super::call::{
    CallContext, CallError, CallReport, Caller, Decision, Invocation, LoadSpec, LoadedPlugin, Output, PluginRuntime,
};
use super::{
    Ceilings, ChainAction, ChainEntry, Manifest, PluginChange, PluginKind, PluginState, PluginVersion, ShadowDiff,
    TrustPolicy, VERSIONS_PER_PLUGIN_MAX, verify_chain,
};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::tenant::TenantId;
use crate::{CoreError, CoreResult};

/// How often a replica checks the store for plugin changes made elsewhere.
pub const SYNC_INTERVAL_MS: u64 = 250;
/// Loaded (compiled, pre-instantiated) versions kept in memory beyond the active ones.
pub const LOADED_VERSIONS_MAX: usize = 64;
/// Most plugins one tenant may have.
pub const PLUGINS_PER_TENANT_MAX: usize = 256;
/// Shadow differences kept per plugin.
pub const SHADOW_DIFFS_MAX: u32 = 1_000;
/// Shadow calls running at once; beyond it a call is not shadowed (and counted).
pub const SHADOW_IN_FLIGHT_MAX: i64 = 64;

/// Settings of the plugin service.
#[derive(Debug, Clone, Default)]
pub struct PluginConfig {
    /// What manifests may ask for.
    pub ceilings: Ceilings,
    /// Signature requirements and trusted keys.
    pub trust: TrustPolicy,
}

type Key = (TenantId, String);

/// A plugin version ready to call, with its metric handles resolved once.
pub struct Loaded {
    /// The version.
    pub version: Version,
    /// Its kind.
    pub kind: PluginKind,
    plugin: Arc<dyn LoadedPlugin>,
    label: String,
    calls_ok: IntCounter,
    calls: IntCounterVec,
    latency: Histogram,
    fuel: IntCounter,
    memory: IntGauge,
    deadline_ms: u64,
}

/// The version serving a plugin's calls, and the one shadowing it.
pub struct Active {
    /// Serving calls.
    pub current: Arc<Loaded>,
    /// Run beside it; differences recorded.
    pub shadow: Option<Arc<Loaded>>,
}

/// How a call was answered.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Answer {
    /// The plugin's output, or the kind's fallback when it failed.
    pub output: Output,
    /// The version that answered.
    #[schema(value_type = String, example = "1.2.0")]
    pub version: Version,
    /// Why the plugin failed, when the output is a fallback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<CallError>,
}

/// The plugin service.
pub struct PluginService {
    store: Arc<dyn Store>,
    runtime: Arc<dyn PluginRuntime>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    config: PluginConfig,
    active: ArcSwap<HashMap<Key, Arc<Active>>>,
    loaded: std::sync::Mutex<HashMap<(Key, Version), Arc<Loaded>>>,
    generation: AtomicI64,
    changes: tokio::sync::Mutex<()>,
    shadow_in_flight: Arc<AtomicI64>,
    /// Chaos toggles applied to calls (target `plugin`), when wired.
    chaos: Option<Arc<crate::chaos::Chaos>>,
}

impl std::fmt::Debug for PluginService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginService").finish_non_exhaustive()
    }
}

/// A plugin as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PluginView {
    /// Its state.
    #[serde(flatten)]
    pub state: PluginState,
    /// Every stored version, oldest first.
    pub versions: Vec<VersionView>,
}

/// A version as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VersionView {
    /// The version.
    #[schema(value_type = String, example = "1.2.0")]
    pub version: Version,
    /// `blake2b256:` digest of the component.
    pub digest: String,
    /// Digest of its configuration document.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// What it may reach.
    pub grants: super::Grants,
    /// Its limits.
    pub limits: super::Limits,
    /// The key that signed it.
    pub signed_by: Option<String>,
    /// When it was uploaded (ms since the Unix epoch).
    pub uploaded_at_ms: i64,
    /// Who uploaded it.
    pub uploaded_by: String,
    /// Its call metrics in this process.
    pub metrics: Option<VersionMetrics>,
}

/// Call metrics of one version in this process (the same numbers `/metrics` exports).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VersionMetrics {
    /// Calls answered.
    pub calls: u64,
    /// Calls that failed, by reason.
    #[schema(value_type = HashMap<String, u64>)]
    pub failures: HashMap<&'static str, u64>,
    /// Mean call latency, in microseconds.
    pub latency_us_mean: f64,
    /// Fuel burnt in total (contracts).
    pub fuel_used: u64,
    /// Largest linear memory of an instance, in bytes.
    pub memory_high_water_bytes: i64,
}

const FAILURE_LABELS: [&str; 7] =
    ["timeout", "out_of_fuel", "trap", "guest_error", "bad_output", "wrong_kind", "unavailable"];

fn unavailable(err: StoreError) -> CoreError {
    CoreError::Store(err)
}

fn not_found() -> CoreError {
    CoreError::NotFound { what: "plugin" }
}

fn version_not_found() -> CoreError {
    CoreError::NotFound { what: "plugin version" }
}

fn label(key: &Key) -> String {
    format!("{}/{}", key.0, key.1)
}

impl PluginService {
    /// A service over `store`, loading components through `runtime`.
    pub fn new(
        store: Arc<dyn Store>,
        runtime: Arc<dyn PluginRuntime>,
        clock: Arc<dyn Clock>,
        metrics: Metrics,
        config: PluginConfig,
    ) -> Self {
        Self {
            store,
            runtime,
            clock,
            metrics,
            config,
            active: ArcSwap::from_pointee(HashMap::new()),
            loaded: std::sync::Mutex::new(HashMap::new()),
            generation: AtomicI64::new(-1),
            changes: tokio::sync::Mutex::new(()),
            shadow_in_flight: Arc::new(AtomicI64::new(0)),
            chaos: None,
        }
    }

    /// Applies `chaos` toggles (target `plugin`, the plugin's tenant) to every call: an
    /// injected error is a failure of the call (`unavailable`), a drop a timeout after the
    /// plugin's deadline; either way the kind's failure semantics answer.
    pub fn with_chaos(mut self, chaos: Arc<crate::chaos::Chaos>) -> Self {
        self.chaos = Some(chaos);
        self
    }

    /// Verifies every plugin's hash chain against the stored versions and states. The kernel
    /// refuses to start when one is broken.
    pub async fn verify_chains(&self) -> CoreResult<usize> {
        let plugins = self.store.list_plugin_chains().await.map_err(unavailable)?;
        for (tenant, name) in &plugins {
            let chain = self.store.plugin_chain(tenant, name).await.map_err(unavailable)?;
            let versions = self.store.list_plugin_versions(tenant, name).await.map_err(unavailable)?;
            let state = self.store.get_plugin_state(tenant, name).await.map_err(unavailable)?;
            verify_chain(&chain, &versions, state.as_ref())
                .map_err(|broken| CoreError::Conflict { code: "chain_broken", message: broken.to_string().into() })?;
        }
        Ok(plugins.len())
    }

    /// Loads the active set from the store if it changed since the last sync (or at first).
    /// Returns true when the set was rebuilt.
    pub async fn sync(&self) -> CoreResult<bool> {
        let generation = self.store.plugin_generation().await.map_err(unavailable)?;
        if generation == self.generation.load(Ordering::Acquire) {
            return Ok(false);
        }
        let states = self.store.list_plugin_states(None).await.map_err(unavailable)?;
        let mut next = HashMap::new();
        for state in states {
            let key = (state.tenant.clone(), state.name.clone());
            let Some(active) = &state.active else { continue };
            let current = match self.load_version(&key, active).await {
                Ok(loaded) => loaded,
                Err(err) => {
                    tracing::error!(plugin = %label(&key), version = %active, error = %err, "active plugin version could not be loaded");
                    continue;
                }
            };
            let shadow = match &state.shadow {
                Some(v) => self.load_version(&key, v).await.ok(),
                None => None,
            };
            next.insert(key, Arc::new(Active { current, shadow }));
        }
        self.publish_active(next);
        self.generation.store(generation, Ordering::Release);
        Ok(true)
    }

    fn publish_active(&self, next: HashMap<Key, Arc<Active>>) {
        self.metrics.plugin_active.reset();
        for (key, active) in &next {
            self.metrics.plugin_active.with_label_values(&[&label(key), &active.current.version.to_string()]).set(1);
        }
        self.active.store(Arc::new(next));
        self.metrics.plugin_swaps_total.inc();
        // Keep compiled versions for quick rollbacks, within the bound.
        if let Ok(mut loaded) = self.loaded.lock()
            && loaded.len() > LOADED_VERSIONS_MAX
        {
            let active = self.active.load();
            loaded.retain(|(key, version), _| {
                active.get(key).is_some_and(|a| {
                    a.current.version == *version || a.shadow.as_ref().is_some_and(|s| s.version == *version)
                })
            });
        }
    }

    /// Runs [`PluginService::sync`] every [`SYNC_INTERVAL_MS`] until the process ends.
    pub async fn run_sync(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(SYNC_INTERVAL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(err) = self.sync().await {
                tracing::warn!(error = %err, "plugin sync failed; retrying");
            }
        }
    }

    async fn load_version(&self, key: &Key, version: &Version) -> CoreResult<Arc<Loaded>> {
        let cache_key = (key.clone(), version.clone());
        if let Some(loaded) = self.loaded.lock().ok().and_then(|l| l.get(&cache_key).cloned()) {
            return Ok(loaded);
        }
        let versions = self.store.list_plugin_versions(&key.0, &key.1).await.map_err(unavailable)?;
        let record = versions.into_iter().find(|v| v.manifest.version == *version).ok_or_else(version_not_found)?;
        let manifest = &record.manifest;
        let wasm = self.blob(&manifest.digest).await?;
        let config = match &manifest.config_digest {
            Some(digest) => self.blob(digest).await?,
            None => Vec::new(),
        };
        let loaded = self.compile(key, manifest, wasm, config).await?;
        if let Ok(mut cache) = self.loaded.lock() {
            cache.insert(cache_key, loaded.clone());
        }
        Ok(loaded)
    }

    async fn blob(&self, digest: &str) -> CoreResult<Vec<u8>> {
        let bytes = self
            .store
            .get_plugin_blob(digest)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| CoreError::Store(StoreError::Corrupt(format!("blob {digest} is missing"))))?;
        if super::digest(&bytes) != digest {
            return Err(CoreError::Store(StoreError::Corrupt(format!("blob {digest} does not match its digest"))));
        }
        Ok(bytes)
    }

    async fn compile(&self, key: &Key, manifest: &Manifest, wasm: Vec<u8>, config: Vec<u8>) -> CoreResult<Arc<Loaded>> {
        let spec = LoadSpec {
            tenant: key.0.clone(),
            name: key.1.clone(),
            version: manifest.version.clone(),
            kind: manifest.kind,
            grants: manifest.grants.clone(),
            limits: manifest.limits,
            config: config.into(),
        };
        let runtime = self.runtime.clone();
        // Compiling is CPU-bound (Cranelift) or a cache read: keep it off the async workers.
        let plugin = tokio::task::spawn_blocking(move || runtime.load(spec, &wasm))
            .await
            .map_err(|e| CoreError::invalid("load_failed", format!("loading the component failed: {e}")))?
            .map_err(|e| CoreError::invalid("world_mismatch", e.to_string()))?;
        let plugin_label = label(key);
        let version = manifest.version.to_string();
        let labels = [plugin_label.as_str(), version.as_str()];
        let m = &self.metrics;
        Ok(Arc::new(Loaded {
            version: manifest.version.clone(),
            kind: manifest.kind,
            plugin,
            label: plugin_label.clone(),
            calls_ok: m.plugin_calls_total.with_label_values(&[&plugin_label, &version, "ok"]),
            calls: m.plugin_calls_total.clone(),
            latency: m.plugin_call_duration_seconds.with_label_values(&labels),
            fuel: m.plugin_fuel_used_total.with_label_values(&labels),
            memory: m.plugin_memory_high_water_bytes.with_label_values(&labels),
            deadline_ms: manifest.limits.deadline_ms,
        }))
    }

    /// Uploads a version: checks the manifest (digests, grants and limits within the
    /// operator's ceilings), its signature, and that the component implements the world of
    /// its kind; then stores it, staged (not active).
    pub async fn upload(
        &self,
        tenant: &TenantId,
        actor: &str,
        manifest: Manifest,
        wasm: Vec<u8>,
        config: Option<Vec<u8>>,
    ) -> CoreResult<PluginVersion> {
        manifest.check(&wasm, config.as_deref(), &self.config.ceilings)?;
        let signed_by = self.config.trust.verify(&manifest)?;
        let key = (tenant.clone(), manifest.name.clone());
        // Compile before storing: a component that does not load is never recorded.
        let loaded = self.compile(&key, &manifest, wasm.clone(), config.clone().unwrap_or_default()).await?;
        let _guard = self.changes.lock().await;
        let versions = self.store.list_plugin_versions(tenant, &manifest.name).await.map_err(unavailable)?;
        if let Some(first) = versions.first()
            && first.manifest.kind != manifest.kind
        {
            return Err(CoreError::Conflict {
                code: "kind_mismatch",
                message: format!("plugin `{}` is a {} plugin", manifest.name, first.manifest.kind).into(),
            });
        }
        if versions.iter().any(|v| v.manifest.version == manifest.version) {
            return Err(CoreError::Conflict {
                code: "version_exists",
                message: format!("version {} of `{}` exists; versions are immutable", manifest.version, manifest.name)
                    .into(),
            });
        }
        if versions.is_empty()
            && self.store.list_plugin_states(Some(tenant)).await.map_err(unavailable)?.len() >= PLUGINS_PER_TENANT_MAX
        {
            return Err(CoreError::LimitExceeded {
                message: format!("at most {PLUGINS_PER_TENANT_MAX} plugins per tenant").into(),
            });
        }
        if versions.len() >= VERSIONS_PER_PLUGIN_MAX {
            return Err(CoreError::LimitExceeded {
                message: format!("at most {VERSIONS_PER_PLUGIN_MAX} versions per plugin; delete old ones").into(),
            });
        }
        self.store.put_plugin_blob(&manifest.digest, &wasm).await.map_err(unavailable)?;
        if let (Some(bytes), Some(digest)) = (&config, &manifest.config_digest) {
            self.store.put_plugin_blob(digest, bytes).await.map_err(unavailable)?;
        }
        let now = self.clock.now_ms();
        let version = PluginVersion {
            tenant: tenant.clone(),
            manifest: manifest.clone(),
            signed_by,
            uploaded_at_ms: now,
            uploaded_by: actor.to_string(),
        };
        let state = self.store.get_plugin_state(tenant, &manifest.name).await.map_err(unavailable)?;
        let state = state.unwrap_or(PluginState {
            tenant: tenant.clone(),
            name: manifest.name.clone(),
            kind: manifest.kind,
            active: None,
            shadow: None,
            updated_at_ms: now,
        });
        self.append(
            tenant,
            &manifest.name,
            ChainAction::Upload,
            &manifest,
            actor,
            Some(version.clone()),
            Some(state),
            None,
        )
        .await?;
        if let Ok(mut cache) = self.loaded.lock() {
            cache.insert((key, manifest.version.clone()), loaded);
        }
        Ok(version)
    }

    #[allow(clippy::too_many_arguments)]
    async fn append(
        &self,
        tenant: &TenantId,
        name: &str,
        action: ChainAction,
        manifest: &Manifest,
        actor: &str,
        insert: Option<PluginVersion>,
        state: Option<PluginState>,
        delete: Option<Version>,
    ) -> CoreResult<()> {
        let chain = self.store.plugin_chain(tenant, name).await.map_err(unavailable)?;
        let entry = ChainEntry::next(chain.last(), tenant, name, action, manifest, self.clock.now_ms(), actor);
        let change = PluginChange { entry, insert, state, delete };
        self.store.apply_plugin_change(&change).await.map_err(|err| match err {
            StoreError::UniqueViolation(_) => CoreError::Conflict {
                code: "concurrent_change",
                message: "another change to this plugin was made at the same time; retry".into(),
            },
            other => CoreError::Store(other),
        })
    }

    async fn version_record(&self, tenant: &TenantId, name: &str, version: &Version) -> CoreResult<PluginVersion> {
        let versions = self.store.list_plugin_versions(tenant, name).await.map_err(unavailable)?;
        if versions.is_empty() && self.store.get_plugin_state(tenant, name).await.map_err(unavailable)?.is_none() {
            return Err(not_found());
        }
        versions.into_iter().find(|v| v.manifest.version == *version).ok_or_else(version_not_found)
    }

    async fn state(&self, tenant: &TenantId, name: &str) -> CoreResult<PluginState> {
        self.store.get_plugin_state(tenant, name).await.map_err(unavailable)?.ok_or_else(not_found)
    }

    /// Makes `version` the active one (a rollback when it is older than the current one).
    /// Returns how long the swap took in this process, store write included.
    pub async fn activate(
        &self,
        tenant: &TenantId,
        name: &str,
        version: &Version,
        actor: &str,
    ) -> CoreResult<Duration> {
        let started = Instant::now();
        let record = self.version_record(tenant, name, version).await?;
        let key = (tenant.clone(), name.to_string());
        // Load (usually from memory) before recording, so an activation never points at a
        // version that cannot run.
        self.load_version(&key, version).await?;
        let _guard = self.changes.lock().await;
        let mut state = self.state(tenant, name).await?;
        let action = match &state.active {
            Some(current) if version < current => ChainAction::Rollback,
            _ => ChainAction::Activate,
        };
        state.active = Some(version.clone());
        if state.shadow.as_ref() == Some(version) {
            state.shadow = None;
        }
        state.updated_at_ms = self.clock.now_ms();
        self.append(tenant, name, action, &record.manifest, actor, None, Some(state), None).await?;
        self.sync().await?;
        Ok(started.elapsed())
    }

    /// Activates the version that was active before the current one (from the chain).
    pub async fn rollback(&self, tenant: &TenantId, name: &str, actor: &str) -> CoreResult<(Version, Duration)> {
        let state = self.state(tenant, name).await?;
        let current = state.active.clone().ok_or_else(|| CoreError::Conflict {
            code: "not_active",
            message: "the plugin has no active version to roll back from".into(),
        })?;
        let chain = self.store.plugin_chain(tenant, name).await.map_err(unavailable)?;
        let versions = self.store.list_plugin_versions(tenant, name).await.map_err(unavailable)?;
        let previous = chain
            .iter()
            .rev()
            .filter(|e| matches!(e.action, ChainAction::Activate | ChainAction::Rollback))
            .map(|e| e.version.clone())
            .find(|v| *v != current && versions.iter().any(|s| s.manifest.version == *v))
            .ok_or_else(|| CoreError::Conflict {
                code: "no_previous_version",
                message: "no earlier active version is stored; activate a version explicitly".into(),
            })?;
        let took = self.activate(tenant, name, &previous, actor).await?;
        Ok((previous, took))
    }

    /// Runs `version` in shadow beside the active one (`None` stops shadowing).
    pub async fn set_shadow(
        &self,
        tenant: &TenantId,
        name: &str,
        version: Option<&Version>,
        actor: &str,
    ) -> CoreResult<()> {
        let _guard = self.changes.lock().await;
        let mut state = self.state(tenant, name).await?;
        let (action, manifest) = match version {
            Some(v) => {
                if state.active.is_none() {
                    return Err(CoreError::Conflict {
                        code: "not_active",
                        message: "activate a version before shadowing it".into(),
                    });
                }
                if state.active.as_ref() == Some(v) {
                    return Err(CoreError::invalid(
                        "invalid_shadow",
                        "the shadow version must differ from the active one",
                    ));
                }
                let record = self.version_record(tenant, name, v).await?;
                self.load_version(&(tenant.clone(), name.to_string()), v).await?;
                (ChainAction::ShadowStart, record.manifest)
            }
            None => {
                let Some(current) = state.shadow.clone() else { return Ok(()) };
                (ChainAction::ShadowStop, self.version_record(tenant, name, &current).await?.manifest)
            }
        };
        state.shadow = version.cloned();
        state.updated_at_ms = self.clock.now_ms();
        self.append(tenant, name, action, &manifest, actor, None, Some(state), None).await?;
        self.sync().await?;
        Ok(())
    }

    /// Deletes a stored version that is neither active nor shadowing.
    pub async fn delete_version(
        &self,
        tenant: &TenantId,
        name: &str,
        version: &Version,
        actor: &str,
    ) -> CoreResult<()> {
        let _guard = self.changes.lock().await;
        let record = self.version_record(tenant, name, version).await?;
        let state = self.state(tenant, name).await?;
        if state.active.as_ref() == Some(version) || state.shadow.as_ref() == Some(version) {
            return Err(CoreError::Conflict {
                code: "version_in_use",
                message: "the version is active or shadowing; activate another or deactivate first".into(),
            });
        }
        self.append(tenant, name, ChainAction::Delete, &record.manifest, actor, None, None, Some(version.clone()))
            .await?;
        if let Ok(mut cache) = self.loaded.lock() {
            cache.remove(&((tenant.clone(), name.to_string()), version.clone()));
        }
        Ok(())
    }

    /// Stops serving a plugin: no version active, no shadow. Its versions stay stored.
    pub async fn deactivate(&self, tenant: &TenantId, name: &str, actor: &str) -> CoreResult<()> {
        let _guard = self.changes.lock().await;
        let mut state = self.state(tenant, name).await?;
        let Some(current) = state.active.clone() else { return Ok(()) };
        let record = self.version_record(tenant, name, &current).await?;
        if let Some(shadow) = state.shadow.take() {
            let shadow = self.version_record(tenant, name, &shadow).await?;
            state.active = Some(current);
            self.append(
                tenant,
                name,
                ChainAction::ShadowStop,
                &shadow.manifest,
                actor,
                None,
                Some(state.clone()),
                None,
            )
            .await?;
        }
        state.active = None;
        state.updated_at_ms = self.clock.now_ms();
        self.append(tenant, name, ChainAction::Deactivate, &record.manifest, actor, None, Some(state), None).await?;
        self.sync().await?;
        Ok(())
    }

    /// Every plugin of `tenant`.
    pub async fn list(&self, tenant: &TenantId) -> CoreResult<Vec<PluginState>> {
        self.store.list_plugin_states(Some(tenant)).await.map_err(unavailable)
    }

    /// One plugin with its versions and their metrics.
    pub async fn show(&self, tenant: &TenantId, name: &str) -> CoreResult<PluginView> {
        let state = self.state(tenant, name).await?;
        let versions = self.store.list_plugin_versions(tenant, name).await.map_err(unavailable)?;
        let plugin_label = format!("{tenant}/{name}");
        let versions = versions
            .into_iter()
            .map(|v| {
                let m = &v.manifest;
                VersionView {
                    metrics: Some(self.version_metrics(&plugin_label, &m.version.to_string())),
                    version: m.version.clone(),
                    digest: m.digest.clone(),
                    config_digest: m.config_digest.clone(),
                    grants: m.grants.clone(),
                    limits: m.limits,
                    signed_by: v.signed_by,
                    uploaded_at_ms: v.uploaded_at_ms,
                    uploaded_by: v.uploaded_by,
                }
            })
            .collect();
        Ok(PluginView { state, versions })
    }

    fn version_metrics(&self, plugin: &str, version: &str) -> VersionMetrics {
        let m = &self.metrics;
        let failures = FAILURE_LABELS
            .iter()
            .map(|l| (*l, m.plugin_calls_total.with_label_values(&[plugin, version, l]).get()))
            .filter(|(_, n)| *n > 0)
            .collect();
        let latency = m.plugin_call_duration_seconds.with_label_values(&[plugin, version]);
        let count = latency.get_sample_count();
        VersionMetrics {
            calls: m.plugin_calls_total.with_label_values(&[plugin, version, "ok"]).get(),
            failures,
            latency_us_mean: if count == 0 { 0.0 } else { latency.get_sample_sum() * 1e6 / count as f64 },
            fuel_used: m.plugin_fuel_used_total.with_label_values(&[plugin, version]).get(),
            memory_high_water_bytes: m.plugin_memory_high_water_bytes.with_label_values(&[plugin, version]).get(),
        }
    }

    /// A plugin's hash chain, for audit.
    pub async fn chain(&self, tenant: &TenantId, name: &str) -> CoreResult<Vec<ChainEntry>> {
        let chain = self.store.plugin_chain(tenant, name).await.map_err(unavailable)?;
        if chain.is_empty() {
            return Err(not_found());
        }
        Ok(chain)
    }

    /// The latest recorded shadow differences of a plugin, newest first.
    pub async fn shadow_diffs(&self, tenant: &TenantId, name: &str, limit: u32) -> CoreResult<Vec<ShadowDiff>> {
        self.state(tenant, name).await?;
        self.store.list_shadow_diffs(tenant, name, limit).await.map_err(unavailable)
    }

    /// The active version of a plugin in this process.
    pub fn active(&self, tenant: &TenantId, name: &str) -> Option<Arc<Active>> {
        self.active.load().get(&(tenant.clone(), name.to_string())).cloned()
    }

    /// Calls the active version of plugin `name` of `tenant`, applying the kind's failure
    /// semantics: a policy that fails denies (and the failure is audited), a scorer that fails
    /// is replaced by the built-in scoring, a tool's failure becomes an error result. A
    /// contract's failure is returned as an error: its transaction did not commit.
    pub async fn call(
        &self,
        tenant: &TenantId,
        name: &str,
        caller: Option<Arc<Caller>>,
        invocation: Invocation,
    ) -> CoreResult<Answer> {
        let active = self.active(tenant, name).ok_or(CoreError::NotFound { what: "active plugin" })?;
        let ctx = CallContext { tenant: tenant.clone(), caller };
        let current = active.current.clone();
        if current.kind != invocation.kind() {
            return Err(CoreError::invalid(
                "wrong_kind",
                format!("`{name}` is a {} plugin; it cannot answer this call", current.kind),
            ));
        }
        let injected = match &self.chaos {
            Some(chaos) => chaos.inject(crate::chaos::ChaosTarget::Plugin, tenant).await,
            None => None,
        };
        let result = match injected {
            None => run_measured(&current, &ctx, &invocation).await,
            Some(crate::chaos::Injected::Error) => {
                Err(CallError::Unavailable("error injected by a chaos toggle".into()))
            }
            Some(crate::chaos::Injected::Drop) => {
                // Nobody answers: the caller waits out the deadline, as for a guest that hangs.
                tokio::time::sleep(Duration::from_millis(current.deadline_ms)).await;
                Err(CallError::Timeout(current.deadline_ms))
            }
        };
        if let Some(shadow) = active.shadow.clone() {
            self.shadow(tenant, name, &current, shadow, ctx, invocation.clone(), result.as_ref().ok().cloned());
        }
        let version = current.version.clone();
        match result {
            Ok(output) => Ok(Answer { output, version, failure: None }),
            Err(failure) => {
                let plugin = format!("{tenant}/{name}");
                self.metrics.plugin_fallbacks_total.with_label_values(&[&plugin, current.kind.as_str()]).inc();
                let output = match (current.kind, &invocation) {
                    (PluginKind::Policy, Invocation::Authorize(request)) => {
                        tracing::warn!(
                            target: "nops::audit",
                            %plugin, %version, action = %request.action, error = %failure,
                            "policy failed: request denied (fail closed)"
                        );
                        Output::Decision(Decision {
                            allow: false,
                            reasons: vec![format!("policy failed ({}): denied", failure.label())],
                            obligations: Vec::new(),
                        })
                    }
                    (PluginKind::Scorer, Invocation::Score { candidates, .. }) => {
                        Output::Scores(candidates.iter().map(builtin_score).collect())
                    }
                    (PluginKind::McpTool, Invocation::CallTool { .. }) => Output::ToolResult(Err(failure.to_string())),
                    _ => {
                        return Err(CoreError::Conflict { code: "plugin_failed", message: failure.to_string().into() });
                    }
                };
                Ok(Answer { output, version, failure: Some(failure) })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn shadow(
        &self,
        tenant: &TenantId,
        name: &str,
        current: &Arc<Loaded>,
        shadow: Arc<Loaded>,
        ctx: CallContext,
        invocation: Invocation,
        active_output: Option<Output>,
    ) {
        if self.shadow_in_flight.fetch_add(1, Ordering::AcqRel) >= SHADOW_IN_FLIGHT_MAX {
            self.shadow_in_flight.fetch_sub(1, Ordering::AcqRel);
            self.metrics.plugin_shadow_skipped_total.inc();
            return;
        }
        let (store, clock, in_flight) = (self.store.clone(), self.clock.clone(), self.shadow_in_flight.clone());
        let diffs = self.metrics.plugin_shadow_diffs_total.with_label_values(&[&format!("{tenant}/{name}")]);
        let compared = self.metrics.plugin_shadow_calls_total.with_label_values(&[&format!("{tenant}/{name}")]);
        let (tenant, name, active_version) = (tenant.clone(), name.to_string(), current.version.clone());
        tokio::spawn(async move {
            let shadow_result = run_measured(&shadow, &ctx, &invocation).await;
            in_flight.fetch_sub(1, Ordering::AcqRel);
            compared.inc();
            let as_json = |r: Result<&Output, &CallError>| match r {
                Ok(o) => serde_json::to_value(o).unwrap_or_default(),
                Err(e) => serde_json::json!({ "error": e }),
            };
            let active_json = match &active_output {
                Some(o) => as_json(Ok(o)),
                None => serde_json::json!({ "error": "the active version failed" }),
            };
            let shadow_json = as_json(shadow_result.as_ref());
            if active_json == shadow_json {
                return;
            }
            diffs.inc();
            let diff = ShadowDiff {
                tenant,
                name,
                active: active_version,
                shadow: shadow.version.clone(),
                input: serde_json::to_value(&invocation).unwrap_or_default(),
                active_output: active_json,
                shadow_output: shadow_json,
                at_ms: clock.now_ms(),
            };
            if let Err(err) = store.insert_shadow_diff(&diff, SHADOW_DIFFS_MAX).await {
                tracing::warn!(error = %err, "recording a shadow difference failed");
            }
        });
    }
}

/// What a what-if replay found: the same inputs through the active version and a candidate.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WhatIf {
    /// The active version.
    #[schema(value_type = String)]
    pub active: Version,
    /// The candidate version.
    #[schema(value_type = String)]
    pub candidate: Version,
    /// Inputs run through both.
    pub compared: u64,
    /// Of those, how many decisions differ.
    pub differ: u64,
    /// Events whose payload is not an input of this plugin's kind (not run).
    pub skipped: u64,
    /// A few of the differences, in sequence order.
    pub samples: Vec<WhatIfDiff>,
}

/// One input on which the candidate decides differently.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WhatIfDiff {
    /// The event's sequence.
    pub seq: u64,
    /// The active version's output (or its error).
    #[schema(value_type = Object)]
    pub active: serde_json::Value,
    /// The candidate's output (or its error).
    #[schema(value_type = Object)]
    pub candidate: serde_json::Value,
}

impl PluginService {
    /// Runs `inputs` (by event sequence; `None` is an event that is not an input of this
    /// kind) through the active version of `name` and through `candidate`, and counts how many
    /// outputs differ. Nothing is recorded and no fallback applies: a failure is an output.
    /// Only kinds without side effects (policy, scorer) are replayed.
    pub async fn what_if(
        &self,
        tenant: &TenantId,
        name: &str,
        candidate: &Version,
        inputs: Vec<(u64, Option<Invocation>)>,
        samples_max: usize,
    ) -> CoreResult<WhatIf> {
        let active = self.active(tenant, name).ok_or(CoreError::NotFound { what: "active plugin" })?;
        let current = active.current.clone();
        if !matches!(current.kind, PluginKind::Policy | PluginKind::Scorer) {
            return Err(CoreError::invalid(
                "invalid_replay",
                format!("what-if replays policies and scorers; `{name}` is a {} plugin", current.kind),
            ));
        }
        let key = (tenant.clone(), name.to_string());
        let candidate = self.load_version(&key, candidate).await?;
        let ctx = CallContext { tenant: tenant.clone(), caller: None };
        let as_json = |r: Result<Output, CallError>| match r {
            Ok(o) => serde_json::to_value(o).unwrap_or_default(),
            Err(e) => serde_json::json!({ "error": e }),
        };
        let mut report = WhatIf {
            active: current.version.clone(),
            candidate: candidate.version.clone(),
            compared: 0,
            differ: 0,
            skipped: 0,
            samples: Vec::new(),
        };
        for (seq, input) in inputs {
            let Some(invocation) = input else {
                report.skipped += 1;
                continue;
            };
            let a = as_json(current.plugin.invoke(&ctx, &invocation).await.0);
            let b = as_json(candidate.plugin.invoke(&ctx, &invocation).await.0);
            report.compared += 1;
            if a != b {
                report.differ += 1;
                if report.samples.len() < samples_max {
                    report.samples.push(WhatIfDiff { seq, active: a, candidate: b });
                }
            }
        }
        Ok(report)
    }
}

/// Runs one call and records its metrics.
async fn run_measured(loaded: &Loaded, ctx: &CallContext, invocation: &Invocation) -> Result<Output, CallError> {
    let (result, report): (_, CallReport) = loaded.plugin.invoke(ctx, invocation).await;
    loaded.latency.observe(report.elapsed.as_secs_f64());
    if let Some(fuel) = report.fuel_used {
        loaded.fuel.inc_by(fuel);
    }
    let memory = i64::try_from(report.memory_bytes).unwrap_or(i64::MAX);
    if memory > loaded.memory.get() {
        loaded.memory.set(memory);
    }
    match &result {
        Ok(_) => loaded.calls_ok.inc(),
        Err(err) => {
            loaded.calls.with_label_values(&[&loaded.label, &loaded.version.to_string(), err.label()]).inc();
        }
    }
    result
}

/// The kernel's own scoring, used when a scorer fails: health discounted by load.
pub fn builtin_score(c: &super::call::Candidate) -> f32 {
    let health = if c.health.is_finite() { c.health.clamp(0.0, 1.0) } else { 0.0 };
    health / (1.0 + c.in_flight as f32)
}
