//! The kernel's WebAssembly plugin runtime.
//!
//! One long-lived [`Runtime`] owns two wasmtime [`Engine`]s with the pooling instance
//! allocator and epoch interruption, sharing an on-disk cache of compiled code keyed by the
//! component's hash: one for every kind, and one that also meters fuel, for contracts (fuel
//! instrumentation slows code down, so only the kind that needs deterministic metering pays
//! for it). [`Runtime::load`] checks a component against the world of its kind (a component
//! that does not export the world's interface, or imports anything the world does not
//! offer, is refused) and pre-instantiates it.
//!
//! Every call runs in a [`Store`] with:
//!
//! - a **memory cap** (`limits.memory_bytes_max`): growth beyond it traps;
//! - a **deadline** (`limits.deadline_ms`): the epoch ticker advances the engines every
//!   [`EPOCH_TICK_MS`]; the guest yields to the async executor at each tick and is interrupted
//!   once its ticks run out, so even a loop that never calls the host is stopped without
//!   holding a thread;
//! - **fuel** for contracts (`limits.fuel_max`): deterministic metering, the same on every
//!   replica;
//! - **deny-by-default host interfaces**: `storage`, `bus` and `identity` answer
//!   `host-error.denied` (or nothing) unless granted; WASI is linked with an empty context (no
//!   files, network, environment or arguments, stdio discarded) and, without the `clock`
//!   grant, a clock fixed at the Unix epoch and a seeded random generator.
//!
//! Stores are kept warm between calls, per plugin version and tenant ([`WARM_PER_TENANT_MAX`]),
//! so a call costs a function call rather than an instantiation; a store that trapped, timed
//! out or failed is dropped, never reused. Contracts always get a fresh instance, so their
//! results depend only on their inputs and storage.
//!
//! A trap, an interruption or an error from the guest becomes a [`CallError`]; the kernel keeps
//! serving.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nops_core::plugin::call::{
    CallContext, CallError, CallReport, Caller, Candidate, Decision, Direction, Invocation, LoadError, LoadSpec,
    LoadedPlugin, Output, PluginRuntime, ToolDescription, Value, Verdict,
};
use nops_core::plugin::{PluginKind, subject_matches, validate_subject};
use nops_core::store::{OutboxEvent, PluginCommit, PluginEffects, PluginKv, StoreError};
use nops_core::tenant::TenantId;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

mod bindings {
    //! Host bindings of the worlds (a scorer's two, one for each other kind). The `mcp-tool` world imports every host interface,
    //! so its bindings are generated first and the other worlds reuse them.
    pub mod tool {
        wasmtime::component::bindgen!({
            world: "mcp-tool",
            path: "../../wit",
            imports: { default: async },
            exports: { default: async },
        });
    }
    pub mod scorer {
        wasmtime::component::bindgen!({
            world: "scorer",
            path: "../../wit",
            imports: { default: async },
            exports: { default: async },
            with: {
                "nops:plugin/types": super::tool::nops::plugin::types,
                "nops:plugin/log": super::tool::nops::plugin::log,
                "nops:plugin/config": super::tool::nops::plugin::config,
                "nops:plugin/storage": super::tool::nops::plugin::storage,
            },
        });
    }
    pub mod scorer_columns {
        wasmtime::component::bindgen!({
            world: "scorer-columns",
            path: "../../wit",
            imports: { default: async },
            exports: { default: async },
            with: {
                "nops:plugin/types": super::tool::nops::plugin::types,
                "nops:plugin/log": super::tool::nops::plugin::log,
                "nops:plugin/config": super::tool::nops::plugin::config,
                "nops:plugin/storage": super::tool::nops::plugin::storage,
            },
        });
    }
    pub mod policy {
        wasmtime::component::bindgen!({
            world: "policy",
            path: "../../wit",
            imports: { default: async },
            exports: { default: async },
            with: {
                "nops:plugin/types": super::tool::nops::plugin::types,
                "nops:plugin/log": super::tool::nops::plugin::log,
                "nops:plugin/config": super::tool::nops::plugin::config,
                "nops:plugin/storage": super::tool::nops::plugin::storage,
                "nops:plugin/identity": super::tool::nops::plugin::identity,
            },
        });
    }
    pub mod migration {
        wasmtime::component::bindgen!({
            world: "migration",
            path: "../../wit",
            imports: { default: async },
            exports: { default: async },
            with: {
                "nops:plugin/log": super::tool::nops::plugin::log,
                "nops:plugin/config": super::tool::nops::plugin::config,
            },
        });
    }
    pub mod contract {
        wasmtime::component::bindgen!({
            world: "contract",
            path: "../../wit",
            imports: { default: async },
            exports: { default: async },
            with: {
                "nops:plugin/types": super::tool::nops::plugin::types,
                "nops:plugin/log": super::tool::nops::plugin::log,
                "nops:plugin/config": super::tool::nops::plugin::config,
                "nops:plugin/storage": super::tool::nops::plugin::storage,
                "nops:plugin/bus": super::tool::nops::plugin::bus,
            },
        });
    }
}

use bindings::scorer_columns::exports::nops::plugin::scoring_columns;
use bindings::tool::nops::plugin as host;
use host::types::HostError;

/// How often the epoch ticker advances the engines' epoch.
pub const EPOCH_TICK_MS: u64 = 5;
/// Default of [`RuntimeConfig::instances_max`].
pub const INSTANCES_MAX_DEFAULT: u32 = 256;
/// The largest linear memory any plugin may have (the pooling allocator's slot size).
pub const MEMORY_BYTES_CEILING: usize = 256 << 20;
/// Default of [`RuntimeConfig::warm_per_tenant_max`].
pub const WARM_PER_TENANT_MAX: usize = 4;
/// Most bytes a key passed to `storage` may have (and a `list-keys` prefix).
pub const STORAGE_KEY_BYTES_MAX: usize = 256;
/// Most bytes a value passed to `storage` may have.
pub const STORAGE_VALUE_BYTES_MAX: usize = 64 * 1024;
/// Most keys one `list-keys` call returns.
pub const STORAGE_LIST_KEYS_MAX: u32 = 1_000;
/// Most keys one plugin namespace (plugin × tenant) holds.
pub const STORAGE_KEYS_MAX: u32 = 10_000;
/// Most storage writes one contract call may buffer.
pub const CONTRACT_WRITES_MAX: usize = 256;
/// Most events one call may publish.
pub const PUBLISHES_PER_CALL_MAX: usize = 64;
/// Largest event payload a plugin may publish, in bytes.
pub const PUBLISH_PAYLOAD_BYTES_MAX: usize = 64 * 1024;
/// Most scores a scorer may return (its input is bounded by the host).
pub const CANDIDATES_MAX: usize = 10_000;
/// Most reasons or obligations in a policy decision.
pub const DECISION_ITEMS_MAX: usize = 64;
/// Largest text a plugin may return in one field (a reason, a verdict, a description), in bytes.
pub const OUTPUT_TEXT_BYTES_MAX: usize = 4 * 1024;
/// Largest tool result or migrated record a plugin may return, in bytes.
pub const OUTPUT_BYTES_MAX: usize = 1 << 20;
/// Log lines one call may write; later lines are dropped.
pub const LOG_LINES_PER_CALL_MAX: u32 = 32;
/// Longest log message kept from a plugin, in characters.
pub const LOG_MESSAGE_CHARS_MAX: usize = 1024;

/// Settings of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled code is cached (by content hash); `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Most component instances alive at once (the pooling allocator reserves this many
    /// slots, each with a 4 GiB virtual memory reservation; warm stores hold some of them).
    /// Contracts get a quarter as many more.
    pub instances_max: u32,
    /// Warm stores kept per plugin version and tenant; 0 instantiates for every call.
    pub warm_per_tenant_max: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self { cache_dir: None, instances_max: INSTANCES_MAX_DEFAULT, warm_per_tenant_max: WARM_PER_TENANT_MAX }
    }
}

/// Longest a plugin storage read is served from the runtime's cache, in milliseconds. Writes
/// through this kernel invalidate at once; a write through another kernel on the same database
/// is seen within this time.
pub const STORAGE_READ_CACHE_MS: u64 = 1_000;
/// Most entries the storage read cache holds; it is emptied when full.
pub const STORAGE_READ_CACHE_ENTRIES_MAX: usize = 10_000;

/// Recent plugin storage reads, shared by every plugin of a runtime: a scorer that reads its
/// weights on every call must not pay a database round trip each time. Contracts never read
/// through it, so their verdicts always see committed state.
#[derive(Default)]
struct ReadCache {
    /// (namespace, key) → (value, when it was read).
    entries: dashmap::DashMap<(String, String), CachedRead>,
}

/// A value read from plugin storage (`None`: the key was absent) and when.
type CachedRead = (Option<Vec<u8>>, Instant);

impl ReadCache {
    fn get(&self, namespace: &str, key: &str) -> Option<Option<Vec<u8>>> {
        let entry = self.entries.get(&(namespace.to_string(), key.to_string()))?;
        (entry.1.elapsed() < Duration::from_millis(STORAGE_READ_CACHE_MS)).then(|| entry.0.clone())
    }

    fn put(&self, namespace: &str, key: &str, value: Option<Vec<u8>>) {
        if self.entries.len() >= STORAGE_READ_CACHE_ENTRIES_MAX {
            self.entries.clear();
        }
        self.entries.insert((namespace.to_string(), key.to_string()), (value, Instant::now()));
    }

    fn invalidate(&self, namespace: &str, key: &str) {
        self.entries.remove(&(namespace.to_string(), key.to_string()));
    }
}

/// What a store needs that does not change between calls of one plugin version.
struct Shared {
    /// `plugin/<name>@<version>`, the source of published events.
    source: String,
    name: String,
    spec: LoadSpec,
    kv: Arc<dyn PluginKv>,
    commit: Arc<dyn PluginCommit>,
    reads: Arc<ReadCache>,
}

/// The per-call state a guest reaches through its imports.
struct HostState {
    limits: Limiter,
    wasi: WasiCtx,
    table: ResourceTable,
    shared: Arc<Shared>,
    /// The storage namespace: plugin and tenant.
    namespace: String,
    tenant: TenantId,
    /// Epoch ticks left before the call is interrupted.
    ticks_left: u64,
    caller: Option<Arc<Caller>>,
    /// Buffered storage writes of a contract call; `None` for other kinds (writes go through).
    writes: Option<BTreeMap<String, Option<Vec<u8>>>>,
    /// Events published during the call, committed when it succeeds.
    events: Vec<OutboxEvent>,
    log_lines_left: u32,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl host::types::Host for HostState {}

impl host::log::Host for HostState {
    async fn write(&mut self, level: host::log::Level, message: String) {
        use host::log::Level;
        if self.log_lines_left == 0 {
            return;
        }
        self.log_lines_left -= 1;
        let message: String = message.chars().take(LOG_MESSAGE_CHARS_MAX).collect();
        let plugin = &self.shared.source;
        match level {
            Level::Trace => tracing::trace!(target: "nops::plugin", %plugin, %message),
            Level::Debug => tracing::debug!(target: "nops::plugin", %plugin, %message),
            Level::Info => tracing::info!(target: "nops::plugin", %plugin, %message),
            Level::Warn => tracing::warn!(target: "nops::plugin", %plugin, %message),
            Level::Error => tracing::error!(target: "nops::plugin", %plugin, %message),
        }
    }
}

impl host::config::Host for HostState {
    async fn get(&mut self) -> Vec<u8> {
        self.shared.spec.config.to_vec()
    }
}

impl host::storage::Host for HostState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, HostError> {
        self.check_key(&key)?;
        if let Some(writes) = &self.writes {
            // A contract: its own buffered writes, else committed state, never the cache.
            if let Some(buffered) = writes.get(&key) {
                return Ok(buffered.clone());
            }
            return self.shared.kv.kv_get(&self.namespace, &key).await.map_err(storage_error);
        }
        if let Some(cached) = self.shared.reads.get(&self.namespace, &key) {
            return Ok(cached);
        }
        let value = self.shared.kv.kv_get(&self.namespace, &key).await.map_err(storage_error)?;
        self.shared.reads.put(&self.namespace, &key, value.clone());
        Ok(value)
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), HostError> {
        self.check_key(&key)?;
        if value.len() > STORAGE_VALUE_BYTES_MAX {
            return Err(HostError::LimitExceeded(format!("values are at most {STORAGE_VALUE_BYTES_MAX} bytes")));
        }
        if let Some(writes) = &mut self.writes {
            if writes.len() >= CONTRACT_WRITES_MAX && !writes.contains_key(&key) {
                return Err(HostError::LimitExceeded(format!("at most {CONTRACT_WRITES_MAX} keys written per call")));
            }
            writes.insert(key, Some(value));
            return Ok(());
        }
        self.shared.reads.invalidate(&self.namespace, &key);
        let result = self.shared.kv.kv_set(&self.namespace, &key, &value, STORAGE_KEYS_MAX, now_ms()).await;
        self.shared.reads.invalidate(&self.namespace, &key);
        result.map_err(storage_error)
    }

    async fn delete(&mut self, key: String) -> Result<bool, HostError> {
        self.check_key(&key)?;
        if self.writes.is_some() {
            let existed = match self.writes.as_ref().and_then(|w| w.get(&key)) {
                Some(buffered) => buffered.is_some(),
                None => self.shared.kv.kv_get(&self.namespace, &key).await.map_err(storage_error)?.is_some(),
            };
            let writes = self.writes.get_or_insert_default();
            if writes.len() >= CONTRACT_WRITES_MAX && !writes.contains_key(&key) {
                return Err(HostError::LimitExceeded(format!("at most {CONTRACT_WRITES_MAX} keys written per call")));
            }
            writes.insert(key, None);
            return Ok(existed);
        }
        self.shared.reads.invalidate(&self.namespace, &key);
        let result = self.shared.kv.kv_delete(&self.namespace, &key).await;
        self.shared.reads.invalidate(&self.namespace, &key);
        result.map_err(storage_error)
    }

    async fn list_keys(&mut self, prefix: String, limit: u32) -> Result<Vec<String>, HostError> {
        if !self.shared.spec.grants.storage {
            return Err(denied("storage"));
        }
        if prefix.len() > STORAGE_KEY_BYTES_MAX {
            return Err(HostError::LimitExceeded(format!("keys are at most {STORAGE_KEY_BYTES_MAX} bytes")));
        }
        let limit = limit.clamp(1, STORAGE_LIST_KEYS_MAX);
        let mut keys = self.shared.kv.kv_list(&self.namespace, &prefix, limit).await.map_err(storage_error)?;
        if let Some(writes) = &self.writes {
            // Show the call its own buffered writes, as a transaction would.
            let mut merged: std::collections::BTreeSet<String> = keys.into_iter().collect();
            for (key, value) in writes.range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix)) {
                match value {
                    Some(_) => merged.insert(key.clone()),
                    None => merged.remove(key),
                };
            }
            keys = merged.into_iter().take(limit as usize).collect();
        }
        Ok(keys)
    }
}

impl host::bus::Host for HostState {
    async fn publish(&mut self, subject: String, payload: Vec<u8>) -> Result<(), HostError> {
        if validate_subject(&subject, false).is_err() {
            return Err(HostError::Invalid(format!("`{subject}` is not a subject")));
        }
        if !self.shared.spec.grants.bus.iter().any(|pattern| subject_matches(pattern, &subject)) {
            return Err(HostError::Denied(format!("publishing to `{subject}` is not granted to this plugin")));
        }
        if payload.len() > PUBLISH_PAYLOAD_BYTES_MAX {
            return Err(HostError::LimitExceeded(format!("payloads are at most {PUBLISH_PAYLOAD_BYTES_MAX} bytes")));
        }
        if self.events.len() >= PUBLISHES_PER_CALL_MAX {
            return Err(HostError::LimitExceeded(format!("at most {PUBLISHES_PER_CALL_MAX} events per call")));
        }
        self.events.push(OutboxEvent {
            tenant: self.tenant.clone(),
            subject,
            payload,
            source: self.shared.source.clone(),
        });
        Ok(())
    }
}

impl host::identity::Host for HostState {
    async fn caller(&mut self) -> Option<host::identity::Principal> {
        if !self.shared.spec.grants.identity {
            return None;
        }
        self.caller.as_ref().map(|c| host::identity::Principal {
            subject: c.subject.clone(),
            tenant: c.tenant.clone(),
            attributes: c.attributes.iter().map(to_wit_attribute).collect(),
        })
    }
}

fn to_wit_attribute(a: &nops_core::plugin::call::Attribute) -> host::types::Attribute {
    use host::types::Value as W;
    host::types::Attribute {
        name: a.name.clone(),
        value: match &a.value {
            Value::Text(t) => W::Text(t.clone()),
            Value::Integer(i) => W::Integer(*i),
            Value::Number(n) => W::Number(*n),
            Value::Boolean(b) => W::Boolean(*b),
            Value::Texts(t) => W::Texts(t.clone()),
        },
    }
}

fn denied(what: &str) -> HostError {
    HostError::Denied(format!("{what} is not granted to this plugin"))
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl HostState {
    fn check_key(&self, key: &str) -> Result<(), HostError> {
        if !self.shared.spec.grants.storage {
            return Err(denied("storage"));
        }
        if key.is_empty() || key.len() > STORAGE_KEY_BYTES_MAX {
            return Err(HostError::Invalid(format!("keys are 1 to {STORAGE_KEY_BYTES_MAX} bytes")));
        }
        Ok(())
    }
}

/// A clock that always reads the Unix epoch: what a plugin without the `clock` grant sees.
struct FixedClock;

impl wasmtime_wasi::HostWallClock for FixedClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FixedClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// The WASI context of a plugin: nothing ambient; real clocks and randomness only if granted.
fn wasi_context(clock: bool) -> WasiCtx {
    let mut builder = WasiCtxBuilder::new();
    if !clock {
        builder
            .wall_clock(FixedClock)
            .monotonic_clock(FixedClock)
            .secure_random(wasmtime_wasi::Deterministic::new(vec![0x5e, 0xed, 0x17, 0x42]))
            .insecure_random(wasmtime_wasi::Deterministic::new(vec![0x42, 0x17, 0xed, 0x5e]))
            .insecure_random_seed(0);
    }
    builder.build()
}

/// The linkers of one engine, one per kind.
struct Linkers {
    by_kind: HashMap<PluginKind, Linker<HostState>>,
}

impl Linkers {
    fn new(engine: &Engine, kinds: &[PluginKind]) -> wasmtime::Result<Self> {
        let mut by_kind = HashMap::new();
        for &kind in kinds {
            let mut linker = Linker::new(engine);
            wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
            match kind {
                PluginKind::Scorer => {
                    bindings::scorer::Scorer::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
                }
                PluginKind::Policy => {
                    bindings::policy::Policy::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
                }
                PluginKind::Migration => {
                    bindings::migration::Migration::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
                }
                PluginKind::McpTool => {
                    bindings::tool::McpTool::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
                }
                PluginKind::Contract => {
                    bindings::contract::Contract::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
                }
            }
            by_kind.insert(kind, linker);
        }
        Ok(Self { by_kind })
    }
}

/// The plugin runtime: the engines, their epoch ticker and the linkers of each world.
pub struct Runtime {
    engine: Engine,
    metered: Engine,
    linkers: Linkers,
    metered_linkers: Linkers,
    kv: Arc<dyn PluginKv>,
    commit: Arc<dyn PluginCommit>,
    reads: Arc<ReadCache>,
    warm_total: Arc<AtomicUsize>,
    /// Warm stores kept across the whole runtime: half the instance slots, so calls that find
    /// no warm store can still instantiate.
    warm_total_max: usize,
    warm_per_tenant_max: usize,
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

fn new_engine(config: &RuntimeConfig, fuel: bool, instances: u32) -> wasmtime::Result<Engine> {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(instances)
        .total_core_instances(instances * 4)
        .total_memories(instances * 2)
        .total_tables(instances * 4)
        .total_stacks(instances)
        .max_memory_size(MEMORY_BYTES_CEILING);
    let mut wasm = Config::new();
    wasm.wasm_component_model(true)
        .epoch_interruption(true)
        .consume_fuel(fuel)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    if let Some(dir) = &config.cache_dir {
        let mut cache = CacheConfig::new();
        cache.with_directory(dir);
        wasm.cache(Some(Cache::new(cache)?));
    }
    Engine::new(&wasm)
}

impl Runtime {
    /// Creates the engines and starts the epoch ticker. Plugin storage goes to `kv`; the
    /// effects of a successful call (a contract's writes, published events) to `commit`.
    pub fn new(config: &RuntimeConfig, kv: Arc<dyn PluginKv>, commit: Arc<dyn PluginCommit>) -> wasmtime::Result<Self> {
        let instances_max = config.instances_max.max(4);
        let engine = new_engine(config, false, instances_max)?;
        let metered = new_engine(config, true, instances_max / 4)?;
        let unmetered_kinds = [PluginKind::Scorer, PluginKind::Policy, PluginKind::Migration, PluginKind::McpTool];
        let linkers = Linkers::new(&engine, &unmetered_kinds)?;
        let metered_linkers = Linkers::new(&metered, &[PluginKind::Contract])?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (stop, a, b) = (ticker_stop.clone(), engine.weak(), metered.weak());
        std::thread::Builder::new().name("nops-epoch".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(EPOCH_TICK_MS));
                match (a.upgrade(), b.upgrade()) {
                    (Some(a), Some(b)) => {
                        a.increment_epoch();
                        b.increment_epoch();
                    }
                    _ => break,
                }
            }
        })?;
        Ok(Self {
            engine,
            metered,
            linkers,
            metered_linkers,
            kv,
            commit,
            reads: Arc::new(ReadCache::default()),
            warm_total: Arc::new(AtomicUsize::new(0)),
            warm_total_max: instances_max as usize / 2,
            warm_per_tenant_max: config.warm_per_tenant_max,
            ticker_stop,
        })
    }

    /// Loads a plugin version (see [`PluginRuntime::load`]), returning the concrete type.
    pub fn load_plugin(&self, spec: LoadSpec, wasm: &[u8]) -> Result<WasmPlugin, LoadError> {
        let kind = spec.kind;
        let (engine, linkers) = if kind == PluginKind::Contract {
            (&self.metered, &self.metered_linkers)
        } else {
            (&self.engine, &self.linkers)
        };
        let component = Component::new(engine, wasm).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        let linker = linkers
            .by_kind
            .get(&kind)
            .ok_or_else(|| LoadError::WorldMismatch { kind, detail: "this kind is not hosted by the engine".into() })?;
        let mismatch = |e: wasmtime::Error| LoadError::WorldMismatch { kind, detail: format!("{e:#}") };
        let pre = linker.instantiate_pre(&component).map_err(mismatch)?;
        let pre = match kind {
            // A scorer exports either world; the column one is the cheaper to call.
            PluginKind::Scorer => match bindings::scorer_columns::ScorerColumnsPre::new(pre.clone()) {
                Ok(columns) => Pre::ScorerColumns(columns),
                Err(_) => Pre::Scorer(bindings::scorer::ScorerPre::new(pre).map_err(|e| LoadError::WorldMismatch {
                    kind,
                    detail: format!("exports neither `scoring-columns` nor `scoring`: {e:#}"),
                })?),
            },
            PluginKind::Policy => Pre::Policy(bindings::policy::PolicyPre::new(pre).map_err(mismatch)?),
            PluginKind::Migration => Pre::Migration(bindings::migration::MigrationPre::new(pre).map_err(mismatch)?),
            PluginKind::McpTool => Pre::Tool(bindings::tool::McpToolPre::new(pre).map_err(mismatch)?),
            PluginKind::Contract => Pre::Contract(bindings::contract::ContractPre::new(pre).map_err(mismatch)?),
        };
        if (kind == PluginKind::Contract) != spec.limits.fuel_max.is_some() {
            return Err(LoadError::Invalid("contracts, and only contracts, run with limits.fuel_max".into()));
        }
        let shared = Arc::new(Shared {
            source: format!("plugin/{}@{}", spec.name, spec.version),
            name: spec.name.clone(),
            spec,
            kv: self.kv.clone(),
            commit: self.commit.clone(),
            reads: self.reads.clone(),
        });
        Ok(WasmPlugin {
            shared,
            engine: engine.clone(),
            pre,
            warm: Mutex::new(HashMap::new()),
            warm_total: self.warm_total.clone(),
            warm_total_max: self.warm_total_max,
            warm_per_tenant_max: self.warm_per_tenant_max,
        })
    }

    /// Stores kept warm right now, across every plugin.
    pub fn warm_stores(&self) -> usize {
        self.warm_total.load(Ordering::Relaxed)
    }
}

impl PluginRuntime for Runtime {
    fn load(&self, spec: LoadSpec, wasm: &[u8]) -> Result<Arc<dyn LoadedPlugin>, LoadError> {
        Ok(Arc::new(self.load_plugin(spec, wasm)?))
    }
}

enum Pre {
    Scorer(bindings::scorer::ScorerPre<HostState>),
    ScorerColumns(bindings::scorer_columns::ScorerColumnsPre<HostState>),
    Policy(bindings::policy::PolicyPre<HostState>),
    Migration(bindings::migration::MigrationPre<HostState>),
    Tool(bindings::tool::McpToolPre<HostState>),
    Contract(bindings::contract::ContractPre<HostState>),
}

enum Instance {
    Scorer(bindings::scorer::Scorer),
    ScorerColumns(bindings::scorer_columns::ScorerColumns),
    Policy(bindings::policy::Policy),
    Migration(bindings::migration::Migration),
    Tool(bindings::tool::McpTool),
    Contract(bindings::contract::Contract),
}

/// A store with its instance, kept between calls.
struct Warm {
    store: Store<HostState>,
    instance: Instance,
}

/// A loaded, pre-instantiated plugin version.
pub struct WasmPlugin {
    shared: Arc<Shared>,
    engine: Engine,
    pre: Pre,
    warm: Mutex<HashMap<TenantId, Vec<Warm>>>,
    warm_total: Arc<AtomicUsize>,
    warm_total_max: usize,
    warm_per_tenant_max: usize,
}

impl std::fmt::Debug for WasmPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmPlugin").field("plugin", &self.shared.source).finish_non_exhaustive()
    }
}

impl Drop for WasmPlugin {
    fn drop(&mut self) {
        let warm = self.warm.get_mut().map(|w| w.values().map(Vec::len).sum()).unwrap_or(0);
        self.warm_total.fetch_sub(warm, Ordering::Relaxed);
    }
}

impl WasmPlugin {
    fn new_store(&self, tenant: &TenantId) -> Store<HostState> {
        let spec = &self.shared.spec;
        let state = HostState {
            limits: Limiter {
                inner: StoreLimitsBuilder::new()
                    .memory_size(usize::try_from(spec.limits.memory_bytes_max).unwrap_or(usize::MAX))
                    .trap_on_grow_failure(true)
                    .build(),
                memory_bytes: 0,
            },
            wasi: wasi_context(spec.grants.clock),
            table: ResourceTable::new(),
            shared: self.shared.clone(),
            namespace: namespace(&self.shared.name, tenant.as_str()),
            tenant: tenant.clone(),
            ticks_left: 0,
            caller: None,
            writes: None,
            events: Vec::new(),
            log_lines_left: 0,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            if state.ticks_left == 0 {
                return Ok(UpdateDeadline::Interrupt);
            }
            state.ticks_left -= 1;
            Ok(UpdateDeadline::Yield(1))
        });
        store
    }

    async fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Instance> {
        Ok(match &self.pre {
            Pre::Scorer(pre) => Instance::Scorer(pre.instantiate_async(&mut *store).await?),
            Pre::ScorerColumns(pre) => Instance::ScorerColumns(pre.instantiate_async(&mut *store).await?),
            Pre::Policy(pre) => Instance::Policy(pre.instantiate_async(&mut *store).await?),
            Pre::Migration(pre) => Instance::Migration(pre.instantiate_async(&mut *store).await?),
            Pre::Tool(pre) => Instance::Tool(pre.instantiate_async(&mut *store).await?),
            Pre::Contract(pre) => Instance::Contract(pre.instantiate_async(&mut *store).await?),
        })
    }

    fn take_warm(&self, tenant: &TenantId) -> Option<Warm> {
        let mut warm = self.warm.lock().ok()?;
        let warm = warm.get_mut(tenant)?.pop()?;
        self.warm_total.fetch_sub(1, Ordering::Relaxed);
        Some(warm)
    }

    fn return_warm(&self, tenant: &TenantId, warm: Warm) {
        if self.shared.spec.kind == PluginKind::Contract {
            return;
        }
        let Ok(mut pool) = self.warm.lock() else { return };
        let slots = pool.entry(tenant.clone()).or_default();
        if slots.len() < self.warm_per_tenant_max && self.warm_total.load(Ordering::Relaxed) < self.warm_total_max {
            self.warm_total.fetch_add(1, Ordering::Relaxed);
            slots.push(warm);
        }
    }

    async fn run(&self, ctx: &CallContext, call: &Invocation) -> (Result<Output, CallError>, CallReport) {
        let started = Instant::now();
        let spec = &self.shared.spec;
        let mut report = CallReport::default();
        let mut warm = match self.take_warm(&ctx.tenant) {
            Some(warm) => warm,
            None => {
                let mut store = self.new_store(&ctx.tenant);
                store.data_mut().ticks_left = deadline_ticks(spec.limits.deadline_ms);
                store.set_epoch_deadline(1);
                if let Some(fuel) = spec.limits.fuel_max {
                    let _ = store.set_fuel(fuel);
                }
                match self.instantiate(&mut store).await {
                    Ok(instance) => Warm { store, instance },
                    Err(err) => {
                        report.elapsed = started.elapsed();
                        return (
                            Err(classify(&err, store.data().ticks_left, spec.limits.deadline_ms, spec.limits.fuel_max)),
                            report,
                        );
                    }
                }
            }
        };
        let store = &mut warm.store;
        {
            let state = store.data_mut();
            state.ticks_left = deadline_ticks(spec.limits.deadline_ms);
            state.caller = ctx.caller.clone();
            state.writes = (spec.kind == PluginKind::Contract).then(BTreeMap::new);
            state.events.clear();
            state.log_lines_left = LOG_LINES_PER_CALL_MAX;
        }
        store.set_epoch_deadline(1);
        let outcome = call_instance(&warm.instance, store, call).await;
        if let Some(fuel_max) = spec.limits.fuel_max {
            report.fuel_used = store.get_fuel().ok().map(|left| fuel_max.saturating_sub(left));
        }
        report.memory_bytes = store.data().limits.memory_bytes as u64;
        let result = match outcome {
            Ok(Ok(output)) => validate(output),
            Ok(Err(err)) => Err(err),
            Err(err) => Err(classify(&err, store.data().ticks_left, spec.limits.deadline_ms, spec.limits.fuel_max)),
        };
        let result = match result {
            Ok(output) => {
                let state = store.data_mut();
                let effects = PluginEffects {
                    writes: state.writes.take().map(|w| w.into_iter().collect()).unwrap_or_default(),
                    events: std::mem::take(&mut state.events),
                };
                if effects.is_empty() {
                    Ok(output)
                } else {
                    let committed = self
                        .shared
                        .commit
                        .commit_plugin_effects(&state.namespace, &effects, STORAGE_KEYS_MAX, now_ms())
                        .await;
                    for (key, _) in &effects.writes {
                        self.shared.reads.invalidate(&state.namespace, key);
                    }
                    match committed {
                        Ok(()) => Ok(output),
                        Err(StoreError::LimitExceeded(message)) => Err(CallError::Guest(message)),
                        Err(err) => {
                            tracing::warn!(error = %err, plugin = %self.shared.source, "committing plugin effects failed");
                            Err(CallError::Unavailable("the kernel's store is unavailable".into()))
                        }
                    }
                }
            }
            Err(err) => Err(err),
        };
        report.elapsed = started.elapsed();
        // A store is reused only after a clean call: a trap or an interruption may leave the
        // instance in any state.
        let reusable = match &result {
            Ok(_) => true,
            Err(CallError::Guest(_) | CallError::BadOutput(_) | CallError::Unavailable(_)) => true,
            Err(_) => false,
        };
        if reusable {
            self.return_warm(&ctx.tenant, warm);
        }
        (result, report)
    }
}

fn deadline_ticks(deadline_ms: u64) -> u64 {
    deadline_ms.div_ceil(EPOCH_TICK_MS).max(1)
}

fn classify(err: &wasmtime::Error, ticks_left: u64, deadline_ms: u64, fuel_max: Option<u64>) -> CallError {
    match err.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => CallError::Timeout(deadline_ms),
        Some(wasmtime::Trap::OutOfFuel) => CallError::OutOfFuel(fuel_max.unwrap_or(0)),
        _ if ticks_left == 0 => CallError::Timeout(deadline_ms),
        // The trap code (`wasm \`unreachable\` instruction executed`) or the host's reason
        // (a memory growth past the cap), without wasmtime's backtrace.
        Some(trap) => CallError::Trap(trap.to_string()),
        None => CallError::Trap(truncate(err.root_cause().to_string())),
    }
}

fn wrong_kind(plugin: PluginKind, call: &Invocation) -> Result<Output, CallError> {
    Err(CallError::WrongKind { plugin, call: call.kind() })
}

async fn call_instance(
    instance: &Instance,
    store: &mut Store<HostState>,
    call: &Invocation,
) -> wasmtime::Result<Result<Output, CallError>> {
    use bindings::scorer::exports::nops::plugin::scoring;
    Ok(match (instance, call) {
        (Instance::Scorer(i), Invocation::Score { task, candidates }) => {
            if candidates.len() > CANDIDATES_MAX {
                return Ok(Err(CallError::BadOutput(format!("at most {CANDIDATES_MAX} candidates"))));
            }
            let task = scoring::Task { capabilities: task.capabilities.clone(), hints: task.hints.clone() };
            let wit: Vec<scoring::Candidate> = candidates
                .iter()
                .map(|c| scoring::Candidate {
                    index: c.index,
                    health: c.health,
                    in_flight: c.in_flight,
                    cpu_ratio: c.cpu_ratio,
                    latency_ms: c.latency_ms,
                    error_rate: c.error_rate,
                    silence_ms: c.silence_ms,
                    version: c.version,
                })
                .collect();
            scores(i.nops_plugin_scoring().call_score(&mut *store, &task, &wit).await?, candidates.len())
        }
        (Instance::ScorerColumns(i), Invocation::Score { task, candidates }) => {
            if candidates.len() > CANDIDATES_MAX {
                return Ok(Err(CallError::BadOutput(format!("at most {CANDIDATES_MAX} candidates"))));
            }
            let task = scoring_columns::Task { capabilities: task.capabilities.clone(), hints: task.hints.clone() };
            let columns = columns(candidates);
            scores(i.nops_plugin_scoring_columns().call_score(&mut *store, &task, &columns).await?, candidates.len())
        }
        (Instance::Policy(i), Invocation::Authorize(request)) => {
            use bindings::policy::exports::nops::plugin::authorization as authz;
            let request = authz::AccessRequest {
                principal: request.principal.iter().map(to_wit_attribute).collect(),
                action: request.action.clone(),
                resource: request.resource.iter().map(to_wit_attribute).collect(),
                context: request.context.iter().map(to_wit_attribute).collect(),
            };
            let d = i.nops_plugin_authorization().call_evaluate(&mut *store, &request).await?;
            Ok(Output::Decision(Decision { allow: d.allow, reasons: d.reasons, obligations: d.obligations }))
        }
        (Instance::Migration(i), Invocation::FromVersion) => {
            Ok(Output::FromVersion(i.nops_plugin_migrating().call_from_version(&mut *store).await?))
        }
        (Instance::Migration(i), Invocation::Migrate { direction, data }) => {
            let bytes = serde_json::to_vec(data).unwrap_or_default();
            let migrating = i.nops_plugin_migrating();
            let out = match direction {
                Direction::Up => migrating.call_up(&mut *store, &bytes).await?,
                Direction::Down => migrating.call_down(&mut *store, &bytes).await?,
            };
            match out {
                Ok(bytes) if bytes.len() > OUTPUT_BYTES_MAX => {
                    Err(CallError::BadOutput(format!("records are at most {OUTPUT_BYTES_MAX} bytes")))
                }
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map(Output::Migrated)
                    .map_err(|e| CallError::BadOutput(format!("the migrated record is not JSON: {e}"))),
                Err(message) => Err(CallError::Guest(truncate(message))),
            }
        }
        (Instance::Tool(i), Invocation::Describe) => {
            let d = i.nops_plugin_tool().call_describe(&mut *store).await?;
            Ok(Output::Description(ToolDescription {
                name: d.name,
                description: d.description,
                input_schema: d.input_schema,
            }))
        }
        (Instance::Tool(i), Invocation::CallTool { arguments }) => {
            let arguments = serde_json::to_string(arguments).unwrap_or_default();
            match i.nops_plugin_tool().call_call(&mut *store, &arguments).await? {
                Ok(content) if content.len() > OUTPUT_BYTES_MAX => {
                    Err(CallError::BadOutput(format!("tool results are at most {OUTPUT_BYTES_MAX} bytes")))
                }
                Ok(content) => Ok(Output::ToolResult(Ok(
                    serde_json::from_str(&content).unwrap_or(serde_json::Value::String(content))
                ))),
                Err(message) => Ok(Output::ToolResult(Err(truncate(message)))),
            }
        }
        (Instance::Contract(i), Invocation::Govern(event)) => {
            use bindings::contract::exports::nops::plugin::governance;
            let event = governance::Event {
                kind: event.kind.clone(),
                attributes: event.attributes.iter().map(to_wit_attribute).collect(),
            };
            match i.nops_plugin_governance().call_evaluate(&mut *store, &event).await? {
                Ok(v) => Ok(Output::Verdict(Verdict { accept: v.accept, reason: v.reason })),
                Err(message) => Err(CallError::Guest(truncate(message))),
            }
        }
        (instance, call) => {
            let kind = match instance {
                Instance::Scorer(_) | Instance::ScorerColumns(_) => PluginKind::Scorer,
                Instance::Policy(_) => PluginKind::Policy,
                Instance::Migration(_) => PluginKind::Migration,
                Instance::Tool(_) => PluginKind::McpTool,
                Instance::Contract(_) => PluginKind::Contract,
            };
            wrong_kind(kind, call)
        }
    })
}

/// The candidates as the `scoring-columns` interface takes them: one list per field.
fn columns(candidates: &[Candidate]) -> scoring_columns::Candidates {
    let column = |field: fn(&Candidate) -> f32| candidates.iter().map(field).collect();
    let integers = |field: fn(&Candidate) -> u32| candidates.iter().map(field).collect();
    scoring_columns::Candidates {
        health: column(|c| c.health),
        in_flight: integers(|c| c.in_flight),
        cpu_ratio: column(|c| c.cpu_ratio),
        latency_ms: column(|c| c.latency_ms),
        error_rate: column(|c| c.error_rate),
        silence_ms: integers(|c| c.silence_ms),
        version_major: integers(|c| c.version.0),
        version_minor: integers(|c| c.version.1),
        version_patch: integers(|c| c.version.2),
    }
}

/// A scorer's answer: one score per candidate, or the guest's error.
fn scores(answer: Result<Vec<f32>, String>, candidates: usize) -> Result<Output, CallError> {
    match answer {
        Ok(scores) if scores.len() != candidates => {
            Err(CallError::BadOutput(format!("{} scores for {candidates} candidates", scores.len())))
        }
        Ok(scores) => Ok(Output::Scores(scores)),
        Err(message) => Err(CallError::Guest(truncate(message))),
    }
}

fn truncate(mut message: String) -> String {
    if message.len() > OUTPUT_TEXT_BYTES_MAX {
        let mut end = OUTPUT_TEXT_BYTES_MAX;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}

/// Refuses outputs the kernel cannot use.
fn validate(output: Output) -> Result<Output, CallError> {
    let too_long = |s: &str| s.len() > OUTPUT_TEXT_BYTES_MAX;
    match &output {
        Output::Scores(scores) if scores.iter().any(|s| !s.is_finite()) => {
            Err(CallError::BadOutput("scores must be finite".into()))
        }
        Output::Decision(d)
            if d.reasons.len() > DECISION_ITEMS_MAX
                || d.obligations.len() > DECISION_ITEMS_MAX
                || d.reasons.iter().any(|r| too_long(r))
                || d.obligations.iter().any(|(k, v)| too_long(k) || too_long(v)) =>
        {
            Err(CallError::BadOutput(format!(
                "decisions carry at most {DECISION_ITEMS_MAX} reasons and obligations of at most {OUTPUT_TEXT_BYTES_MAX} bytes"
            )))
        }
        Output::Description(d)
            if too_long(&d.name) || too_long(&d.description) || d.input_schema.len() > OUTPUT_BYTES_MAX =>
        {
            Err(CallError::BadOutput("the tool description is too large".into()))
        }
        Output::Verdict(v) if too_long(&v.reason) => {
            Err(CallError::BadOutput(format!("verdict reasons are at most {OUTPUT_TEXT_BYTES_MAX} bytes")))
        }
        _ => Ok(output),
    }
}

#[async_trait]
impl LoadedPlugin for WasmPlugin {
    async fn invoke(&self, ctx: &CallContext, call: &Invocation) -> (Result<Output, CallError>, CallReport) {
        if call.kind() != self.shared.spec.kind {
            return (
                Err(CallError::WrongKind { plugin: self.shared.spec.kind, call: call.kind() }),
                CallReport::default(),
            );
        }
        self.run(ctx, call).await
    }
}

/// The storage namespace of `plugin` running for `tenant`.
pub fn namespace(plugin: &str, tenant: &str) -> String {
    format!("{plugin}/{tenant}")
}

/// The store's resource limiter: wasmtime's [`StoreLimits`] plus the largest memory it
/// allowed, for the plugin's high-water metric.
struct Limiter {
    inner: StoreLimits,
    memory_bytes: usize,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.inner.memory_growing(current, desired, maximum)?;
        if allowed {
            self.memory_bytes = self.memory_bytes.max(desired);
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
