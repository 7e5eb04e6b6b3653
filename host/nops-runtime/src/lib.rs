//! The kernel's WebAssembly plugin runtime.
//!
//! One long-lived [`Runtime`] owns a wasmtime [`Engine`] with the pooling instance allocator,
//! epoch interruption and an on-disk cache of compiled code keyed by the component's hash.
//! A plugin is loaded once ([`Runtime::load_scorer`]): its world is checked against the kind
//! it claims (a component that does not export the world's interface, or imports anything
//! the world does not offer, is refused) and it is pre-instantiated. Every call then gets a
//! fresh [`Store`] with:
//!
//! - a **memory cap** ([`PluginLimits::memory_bytes_max`]): growth beyond it traps;
//! - a **deadline** ([`PluginLimits::deadline_ms`]): the epoch ticker advances the engine every
//!   [`EPOCH_TICK_MS`]; the guest yields to the async executor at each tick and is interrupted
//!   once its ticks run out, so even a loop that never calls the host is stopped without
//!   holding a thread;
//! - **deny-by-default host interfaces**: `storage` answers `host-error.denied` unless the
//!   operator granted it; WASI is linked with an empty context (no files, no network, no
//!   environment, no arguments, stdio discarded).
//!
//! A trap, an interruption or an error from the guest becomes a [`CallError`]; the kernel
//! keeps serving and the plugin's [`PluginStats`] count it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blake2::{Blake2b, Digest, digest::consts::U32};
use nops_core::store::{PluginKv, StoreError};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({
        world: "scorer",
        path: "../../wit",
        imports: { default: async },
        exports: { default: async },
    });
}

pub use bindings::exports::nops::plugin::scoring::{Candidate, Task};

/// How often the epoch ticker advances the engine's epoch.
pub const EPOCH_TICK_MS: u64 = 5;
/// Most component instances alive at once (the pooling allocator reserves this many slots).
pub const INSTANCES_MAX: u32 = 256;
/// The operator's ceiling on one plugin's linear memory.
pub const MEMORY_BYTES_CEILING: usize = 256 << 20;
/// The operator's ceiling on one call's deadline.
pub const DEADLINE_MS_CEILING: u64 = 10_000;
/// Most bytes a key passed to `storage` may have (and a `list-keys` prefix).
pub const STORAGE_KEY_BYTES_MAX: usize = 256;
/// Most bytes a value passed to `storage` may have.
pub const STORAGE_VALUE_BYTES_MAX: usize = 64 * 1024;
/// Most scores a scorer may return (its input is bounded by the host).
pub const CANDIDATES_MAX: usize = 10_000;

/// Limits of one plugin, chosen by its manifest within the operator's ceilings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PluginLimits {
    /// Largest linear memory the plugin may grow to, in bytes.
    pub memory_bytes_max: usize,
    /// Longest one call may run, in milliseconds.
    pub deadline_ms: u64,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self { memory_bytes_max: 32 << 20, deadline_ms: 50 }
    }
}

impl PluginLimits {
    /// Checks the limits against the operator's ceilings.
    pub fn validate(&self) -> Result<(), LoadError> {
        if self.memory_bytes_max == 0 || self.memory_bytes_max > MEMORY_BYTES_CEILING {
            return Err(LoadError::Limits(format!("memory_bytes_max must be between 1 and {MEMORY_BYTES_CEILING}")));
        }
        if self.deadline_ms == 0 || self.deadline_ms > DEADLINE_MS_CEILING {
            return Err(LoadError::Limits(format!("deadline_ms must be between 1 and {DEADLINE_MS_CEILING}")));
        }
        Ok(())
    }
}

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The bytes are not a valid WebAssembly component.
    #[error("not a valid WebAssembly component: {0}")]
    Invalid(String),
    /// The component does not implement the world of its declared kind.
    #[error("the component does not implement the `{kind}` world: {detail}")]
    WorldMismatch {
        /// The declared kind.
        kind: &'static str,
        /// What did not match.
        detail: String,
    },
    /// The requested limits exceed the operator's ceilings.
    #[error("limits refused: {0}")]
    Limits(String),
}

/// Why a call into a plugin failed. The kernel keeps serving in every case.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallError {
    /// The call ran past its deadline and was interrupted.
    #[error("deadline of {0} ms exceeded")]
    Timeout(u64),
    /// The guest trapped (including memory growth past its cap).
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// The guest returned an error value.
    #[error("plugin returned an error: {0}")]
    Guest(String),
    /// The guest returned something the host refuses (e.g. the wrong number of scores).
    #[error("plugin output refused: {0}")]
    BadOutput(String),
}

/// Counters of one loaded plugin.
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Calls made.
    pub calls: AtomicU64,
    /// Calls that failed for any reason.
    pub errors: AtomicU64,
    /// Calls that trapped.
    pub traps: AtomicU64,
    /// Calls interrupted at their deadline.
    pub timeouts: AtomicU64,
    /// Largest linear memory any call grew to, in bytes.
    pub memory_high_water_bytes: AtomicU64,
}

/// Settings of the runtime.
#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    /// Where compiled code is cached (by content hash); `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
}

/// The per-call state a guest reaches through its imports.
struct HostState {
    limits: Limiter,
    wasi: WasiCtx,
    table: ResourceTable,
    /// Epoch ticks left before the call is interrupted.
    ticks_left: u64,
    /// The plugin's storage namespace, when `storage` is granted.
    storage: Option<StorageAccess>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl bindings::nops::plugin::types::Host for HostState {}

impl bindings::nops::plugin::log::Host for HostState {
    async fn write(&mut self, level: bindings::nops::plugin::log::Level, message: String) {
        use bindings::nops::plugin::log::Level;
        let message: String = message.chars().take(LOG_MESSAGE_CHARS_MAX).collect();
        match level {
            Level::Trace => tracing::trace!(target: "nops::plugin", %message),
            Level::Debug => tracing::debug!(target: "nops::plugin", %message),
            Level::Info => tracing::info!(target: "nops::plugin", %message),
            Level::Warn => tracing::warn!(target: "nops::plugin", %message),
            Level::Error => tracing::error!(target: "nops::plugin", %message),
        }
    }
}

/// Longest log message kept from a plugin, in characters.
const LOG_MESSAGE_CHARS_MAX: usize = 1024;

use bindings::nops::plugin::types::HostError;

impl bindings::nops::plugin::storage::Host for HostState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, HostError> {
        let access = self.storage(&key)?;
        access.kv.kv_get(&access.namespace, &key).await.map_err(storage_error)
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), HostError> {
        let access = self.storage(&key)?;
        if value.len() > STORAGE_VALUE_BYTES_MAX {
            return Err(HostError::LimitExceeded(format!("values are at most {STORAGE_VALUE_BYTES_MAX} bytes")));
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        access.kv.kv_set(&access.namespace, &key, &value, STORAGE_KEYS_MAX, now_ms).await.map_err(storage_error)
    }

    async fn delete(&mut self, key: String) -> Result<bool, HostError> {
        let access = self.storage(&key)?;
        access.kv.kv_delete(&access.namespace, &key).await.map_err(storage_error)
    }

    async fn list_keys(&mut self, prefix: String, limit: u32) -> Result<Vec<String>, HostError> {
        if prefix.len() > STORAGE_KEY_BYTES_MAX {
            return Err(HostError::LimitExceeded(format!("keys are at most {STORAGE_KEY_BYTES_MAX} bytes")));
        }
        let access = self.storage.clone().ok_or_else(not_granted)?;
        let limit = limit.clamp(1, STORAGE_LIST_KEYS_MAX);
        access.kv.kv_list(&access.namespace, &prefix, limit).await.map_err(storage_error)
    }
}

/// Most keys one `list-keys` call returns.
pub const STORAGE_LIST_KEYS_MAX: u32 = 1_000;
/// Most keys one plugin namespace (plugin × tenant) holds.
pub const STORAGE_KEYS_MAX: u32 = 10_000;

fn not_granted() -> HostError {
    HostError::Denied("storage is not granted to this plugin".into())
}

fn storage_error(err: StoreError) -> HostError {
    match err {
        StoreError::LimitExceeded(message) => HostError::LimitExceeded(message),
        other => {
            tracing::warn!(error = %other, "plugin storage call failed");
            HostError::Unavailable("the kernel's store is unavailable".into())
        }
    }
}

/// A plugin's access to its storage namespace, present only when granted.
#[derive(Clone)]
struct StorageAccess {
    kv: Arc<dyn PluginKv>,
    namespace: String,
}

impl HostState {
    fn storage(&self, key: &str) -> Result<StorageAccess, HostError> {
        let access = self.storage.clone().ok_or_else(not_granted)?;
        if key.is_empty() || key.len() > STORAGE_KEY_BYTES_MAX {
            return Err(HostError::Invalid(format!("keys are 1 to {STORAGE_KEY_BYTES_MAX} bytes")));
        }
        Ok(access)
    }
}

/// The plugin runtime: one engine, its epoch ticker and the linkers of each world.
pub struct Runtime {
    engine: Engine,
    kv: Arc<dyn PluginKv>,
    scorer_linker: Linker<HostState>,
    ticker_stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// Creates the engine and starts the epoch ticker.
    pub fn new(config: &RuntimeConfig, kv: Arc<dyn PluginKv>) -> wasmtime::Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(INSTANCES_MAX)
            .total_core_instances(INSTANCES_MAX * 4)
            .total_memories(INSTANCES_MAX * 2)
            .total_tables(INSTANCES_MAX * 4)
            .total_stacks(INSTANCES_MAX)
            .max_memory_size(MEMORY_BYTES_CEILING);
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        if let Some(dir) = &config.cache_dir {
            let mut cache = CacheConfig::new();
            cache.with_directory(dir);
            wasm.cache(Some(Cache::new(cache)?));
        }
        let engine = Engine::new(&wasm)?;
        let mut scorer_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut scorer_linker)?;
        bindings::Scorer::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut scorer_linker, |s| s)?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (stop, ticking) = (ticker_stop.clone(), engine.weak());
        std::thread::Builder::new().name("nops-epoch".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(EPOCH_TICK_MS));
                match ticking.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })?;
        Ok(Self { engine, kv, scorer_linker, ticker_stop })
    }

    /// Compiles (or loads from the cache) and pre-instantiates a scorer.
    pub fn load_scorer(
        &self,
        name: &str,
        wasm: &[u8],
        limits: PluginLimits,
        grants: Grants,
    ) -> Result<ScorerPlugin, LoadError> {
        limits.validate()?;
        if name.is_empty() || name.contains('/') || name.len() > PLUGIN_NAME_BYTES_MAX {
            return Err(LoadError::Invalid(format!("plugin names are 1 to {PLUGIN_NAME_BYTES_MAX} bytes without '/'")));
        }
        let component = Component::new(&self.engine, wasm).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        let pre = self
            .scorer_linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WorldMismatch { kind: "scorer", detail: format!("{e:#}") })?;
        let pre = bindings::ScorerPre::new(pre)
            .map_err(|e| LoadError::WorldMismatch { kind: "scorer", detail: format!("{e:#}") })?;
        Ok(ScorerPlugin {
            name: name.to_string(),
            kv: grants.storage.then(|| self.kv.clone()),
            engine: self.engine.clone(),
            pre,
            limits,
            digest: digest(wasm),
            stats: Arc::new(PluginStats::default()),
        })
    }
}

/// What the operator granted a plugin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grants {
    /// Access to its namespaced key-value storage.
    pub storage: bool,
}

/// Longest plugin name, in bytes.
pub const PLUGIN_NAME_BYTES_MAX: usize = 128;

/// The storage namespace of `plugin` running for `tenant`.
pub fn namespace(plugin: &str, tenant: &str) -> String {
    format!("{plugin}/{tenant}")
}

/// The BLAKE2b-256 digest of a component, hex-encoded: its identity in caches and manifests.
pub fn digest(wasm: &[u8]) -> String {
    let hash = Blake2b::<U32>::digest(wasm);
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// A loaded, pre-instantiated scorer.
pub struct ScorerPlugin {
    name: String,
    kv: Option<Arc<dyn PluginKv>>,
    engine: Engine,
    pre: bindings::ScorerPre<HostState>,
    limits: PluginLimits,
    digest: String,
    stats: Arc<PluginStats>,
}

impl std::fmt::Debug for ScorerPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScorerPlugin")
            .field("name", &self.name)
            .field("digest", &self.digest)
            .field("limits", &self.limits)
            .finish()
    }
}

impl ScorerPlugin {
    /// The component's BLAKE2b-256 digest.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The plugin's counters.
    pub fn stats(&self) -> &PluginStats {
        &self.stats
    }

    /// Scores `candidates` for `task` on behalf of `tenant`: one score per candidate, in order.
    pub async fn score(&self, tenant: &str, task: &Task, candidates: &[Candidate]) -> Result<Vec<f32>, CallError> {
        let started = Instant::now();
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let result = self.score_inner(tenant, task, candidates).await;
        if let Err(err) = &result {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            match err {
                CallError::Timeout(_) => self.stats.timeouts.fetch_add(1, Ordering::Relaxed),
                CallError::Trap(_) => self.stats.traps.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
            tracing::debug!(digest = %self.digest, error = %err, elapsed_us = started.elapsed().as_micros() as u64, "scorer call failed");
        }
        result
    }

    async fn score_inner(&self, tenant: &str, task: &Task, candidates: &[Candidate]) -> Result<Vec<f32>, CallError> {
        let deadline_ticks = self.limits.deadline_ms.div_ceil(EPOCH_TICK_MS).max(1);
        let state = HostState {
            limits: Limiter {
                inner: StoreLimitsBuilder::new()
                    .memory_size(self.limits.memory_bytes_max)
                    .trap_on_grow_failure(true)
                    .build(),
                memory_high_water_bytes: 0,
            },
            wasi: WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
            ticks_left: deadline_ticks,
            storage: self.kv.clone().map(|kv| StorageAccess { kv, namespace: namespace(&self.name, tenant) }),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            if state.ticks_left == 0 {
                return Ok(UpdateDeadline::Interrupt);
            }
            state.ticks_left -= 1;
            Ok(UpdateDeadline::Yield(1))
        });
        let outcome = async {
            let instance = self.pre.instantiate_async(&mut store).await?;
            instance.nops_plugin_scoring().call_score(&mut store, task, candidates).await
        }
        .await;
        let memory = store.data().limits.memory_high_water_bytes as u64;
        self.stats.memory_high_water_bytes.fetch_max(memory, Ordering::Relaxed);
        let ticks_left = store.data().ticks_left;
        let scores = match outcome {
            Ok(Ok(scores)) => scores,
            Ok(Err(message)) => return Err(CallError::Guest(message)),
            Err(err) => {
                if ticks_left == 0 || err.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
                    return Err(CallError::Timeout(self.limits.deadline_ms));
                }
                return Err(CallError::Trap(format!("{err:#}").lines().next().unwrap_or("trap").to_string()));
            }
        };
        if scores.len() != candidates.len() || scores.len() > CANDIDATES_MAX {
            return Err(CallError::BadOutput(format!("{} scores for {} candidates", scores.len(), candidates.len())));
        }
        if scores.iter().any(|s| !s.is_finite()) {
            return Err(CallError::BadOutput("scores must be finite".into()));
        }
        Ok(scores)
    }
}

/// The store's resource limiter: wasmtime's [`StoreLimits`] plus the largest memory it
/// allowed, for the plugin's high-water metric.
struct Limiter {
    inner: StoreLimits,
    memory_high_water_bytes: usize,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.inner.memory_growing(current, desired, maximum)?;
        if allowed {
            self.memory_high_water_bytes = self.memory_high_water_bytes.max(desired);
        }
        Ok(allowed)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}
