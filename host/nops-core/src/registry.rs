//! The agent registry: definitions in the store, live heartbeat state in memory, and the TTL
//! lifecycle that moves silent agents from healthy to stale to zombie to removed.
//!
//! # Heartbeats
//! A heartbeat updates the agent's entry in the in-memory live table and marks it dirty; it
//! does not touch the store (unless it revives a stale or zombie agent, which is rare and
//! written at once). A flusher writes the dirty entries in batches every
//! `heartbeat_flush_interval_ms`, one transaction per batch. Reads overlay the live table, so
//! the latest heartbeat is visible through the API at once.
//!
//! **What a crash can lose:** the heartbeats received since the last successful flush, i.e.
//! at most `heartbeat_flush_interval_ms` of them (plus any flush still failing and being
//! retried). Nothing else: registrations, updates, deletions and status changes are written
//! before the request returns. After a restart an agent's last-seen time is at most one flush
//! interval old, which the TTL thresholds (seconds to minutes) absorb.
//!
//! # Routing index
//! Routing never reads the store: the registry keeps every agent's name, endpoint, labels and
//! capabilities in memory, indexed by tenant and capability name, each entry holding the
//! agent's [`HealthCell`]. The index changes with the store: on create, update, delete and TTL
//! removal (after the store write succeeded), and at load. An agent registered through another
//! kernel on the same database enters the index with its first heartbeat here (its
//! definition is read then); a definition changed through another kernel is seen after a
//! restart or when the agent re-registers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use semver::VersionReq;
use serde::Serialize;
use tokio::sync::watch;

use crate::agent::{
    Agent, AgentEvent, AgentEventKind, AgentId, AgentPatch, AgentStatus, Load, NewAgent, validate_definition,
};
use crate::clock::Clock;
use crate::health::{HealthCell, HealthConfig, HealthTable};
use crate::metrics::Metrics;
use crate::store::{AgentFilter, AgentLiveSeed, HeartbeatRecord, StatusChange, Store, StoreError};
use crate::tenant::TenantId;
use crate::{CoreError, CoreResult};

/// Thresholds of the TTL lifecycle, measured from the last heartbeat (or registration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlConfig {
    /// Silent this long → `stale`.
    pub stale_after_ms: i64,
    /// Silent this long → `zombie`.
    pub zombie_after_ms: i64,
    /// Silent this long → removed.
    pub remove_after_ms: i64,
}

impl Default for TtlConfig {
    fn default() -> Self {
        Self { stale_after_ms: 30_000, zombie_after_ms: 120_000, remove_after_ms: 600_000 }
    }
}

impl TtlConfig {
    /// Checks that the thresholds are positive and increasing.
    pub fn validate(&self) -> CoreResult<()> {
        if !(0 < self.stale_after_ms
            && self.stale_after_ms < self.zombie_after_ms
            && self.zombie_after_ms < self.remove_after_ms)
        {
            return Err(CoreError::invalid(
                "invalid_config",
                "TTL thresholds must satisfy 0 < stale_after_ms < zombie_after_ms < remove_after_ms",
            ));
        }
        Ok(())
    }

    /// Where an agent silent for `silent_ms` belongs; `None` means removed.
    pub fn status_for(&self, silent_ms: i64) -> Option<AgentStatus> {
        if silent_ms >= self.remove_after_ms {
            None
        } else if silent_ms >= self.zombie_after_ms {
            Some(AgentStatus::Zombie)
        } else if silent_ms >= self.stale_after_ms {
            Some(AgentStatus::Stale)
        } else {
            Some(AgentStatus::Healthy)
        }
    }
}

/// Settings of the registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Lifecycle thresholds.
    pub ttl: TtlConfig,
    /// How often dirty heartbeat state is written to the store.
    pub heartbeat_flush_interval_ms: u64,
    /// Most heartbeat states written in one transaction.
    pub heartbeat_flush_batch_max: usize,
    /// How often the TTL sweeper runs.
    pub sweep_interval_ms: u64,
    /// Most agents the kernel holds (the live table's limit).
    pub agents_max: usize,
    /// Largest page a listing returns.
    pub list_limit_max: u32,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            ttl: TtlConfig::default(),
            heartbeat_flush_interval_ms: 500,
            heartbeat_flush_batch_max: 2_000,
            sweep_interval_ms: 1_000,
            agents_max: 1_000_000,
            list_limit_max: 500,
        }
    }
}

/// Most rows fetched per round when a listing filters by version in memory.
const VERSION_SCAN_CHUNK_ROWS: u32 = 2_000;
/// Most rows one listing scans when filtering by version, so a query cannot scan forever.
const VERSION_SCAN_ROWS_MAX: u32 = 200_000;

/// Most lifecycle changes one sweep writes; the rest wait for the next sweep, so one
/// transaction stays short even when a whole fleet goes silent at once.
const SWEEP_CHANGES_MAX: usize = 5_000;

/// What the registry keeps in memory about one agent.
#[derive(Debug, Clone)]
struct LiveEntry {
    tenant: TenantId,
    status: AgentStatus,
    last_seen_ms: i64,
    heartbeat: Option<(i64, Load)>,
    /// The status a heartbeat revived the agent from, until the flush writes the change.
    revived_from: Option<AgentStatus>,
    dirty: bool,
}

impl LiveEntry {
    fn from_seed(seed: AgentLiveSeed) -> Self {
        Self {
            tenant: seed.tenant,
            status: seed.status,
            last_seen_ms: seed.last_seen_ms,
            heartbeat: None,
            revived_from: None,
            dirty: false,
        }
    }
}

/// Agents read per page when the routing index is built at load.
const INDEX_LOAD_PAGE_ROWS: u32 = 2_000;
/// How often the routing index follows agent changes made by other kernels on the database.
pub const FOLLOW_INTERVAL_MS: u64 = 1_000;
/// Agent events read per page by a follow step.
pub const FOLLOW_CHANGES_PAGE_MAX: u32 = 1_000;
/// Pages one follow step reads at most (a larger backlog is read over several steps).
pub const FOLLOW_PAGES_PER_STEP_MAX: u32 = 10;
/// Agent events younger than this are read again by the next follow step, in case an event
/// with a smaller `seq` commits after them.
pub const FOLLOW_SETTLE_MS: i64 = 2_000;

/// What the routing index keeps about one agent.
#[derive(Debug)]
pub struct IndexedAgent {
    /// The agent.
    pub id: AgentId,
    /// Its tenant.
    pub tenant: TenantId,
    /// Its name.
    pub name: String,
    /// Where pushed work goes.
    pub endpoint: Option<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its capabilities' names and versions.
    pub capabilities: Vec<(String, semver::Version)>,
    /// Its health entry.
    pub health: Arc<HealthCell>,
    /// A hash of its labels and capabilities: agents with the same profile pass or fail
    /// routing's filters alike, so routing decides once per profile (see
    /// [`crate::routing`]). Keyed per process.
    pub profile: u64,
}

/// The keys of [`IndexedAgent::profile`]'s hash, random per process.
static PROFILE_HASHER: std::sync::LazyLock<std::hash::RandomState> =
    std::sync::LazyLock::new(std::hash::RandomState::new);

impl IndexedAgent {
    /// The highest version of capability `name` that `requirement` accepts.
    pub fn best_version(&self, name: &str, requirement: &VersionReq) -> Option<&semver::Version> {
        self.capabilities.iter().filter(|(n, v)| n == name && requirement.matches(v)).map(|(_, v)| v).max()
    }

    /// Whether the agent carries every label in `labels`.
    pub fn has_labels(&self, labels: &BTreeMap<String, String>) -> bool {
        labels.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// Agents with one capability in one tenant: a vector for sampling by position, and each
/// agent's position for O(1) removal.
#[derive(Debug, Default)]
struct CapabilitySet {
    items: Vec<Arc<IndexedAgent>>,
    positions: HashMap<AgentId, usize>,
}

impl CapabilitySet {
    fn insert(&mut self, agent: Arc<IndexedAgent>) {
        if self.positions.contains_key(&agent.id) {
            return;
        }
        self.positions.insert(agent.id, self.items.len());
        self.items.push(agent);
    }

    fn remove(&mut self, id: AgentId) {
        if let Some(position) = self.positions.remove(&id) {
            self.items.swap_remove(position);
            if let Some(moved) = self.items.get(position) {
                self.positions.insert(moved.id, position);
            }
        }
    }
}

#[derive(Debug, Default)]
struct AgentIndex {
    agents: HashMap<AgentId, Arc<IndexedAgent>>,
    by_capability: HashMap<TenantId, HashMap<String, CapabilitySet>>,
}

impl AgentIndex {
    fn insert(&mut self, agent: Arc<IndexedAgent>) {
        self.remove(agent.id);
        let sets = self.by_capability.entry(agent.tenant.clone()).or_default();
        for (name, _) in &agent.capabilities {
            sets.entry(name.clone()).or_default().insert(agent.clone());
        }
        self.agents.insert(agent.id, agent);
    }

    fn remove(&mut self, id: AgentId) -> Option<Arc<IndexedAgent>> {
        let agent = self.agents.remove(&id)?;
        if let Some(sets) = self.by_capability.get_mut(&agent.tenant) {
            for (name, _) in &agent.capabilities {
                if let Some(set) = sets.get_mut(name) {
                    set.remove(id);
                    if set.items.is_empty() {
                        sets.remove(name);
                    }
                }
            }
            if sets.is_empty() {
                self.by_capability.remove(&agent.tenant);
            }
        }
        Some(agent)
    }
}

/// A listing request.
#[derive(Debug, Clone, Default)]
pub struct AgentQuery {
    /// Store-side filters (the tenant is always set by the caller's context).
    pub filter: AgentFilter,
    /// Only agents whose capability (named in `filter.capability`) satisfies this requirement.
    pub version: Option<VersionReq>,
    /// Page size.
    pub limit: u32,
}

/// One page of agents.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AgentPage {
    /// The agents, ordered by id.
    pub items: Vec<Agent>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next_after: Option<AgentId>,
}

/// What a heartbeat returns to the agent.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HeartbeatAck {
    /// The agent's status after this heartbeat (always `healthy`).
    pub status: AgentStatus,
    /// When the kernel recorded the heartbeat (ms since the Unix epoch).
    pub at_ms: i64,
    /// How often the agent should send heartbeats to stay healthy.
    pub heartbeat_interval_ms: i64,
}

/// The state of the background work, for `/health/extended`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RegistryHealth {
    /// Agents in the live table.
    pub agents: usize,
    /// Heartbeat states waiting to be flushed.
    pub heartbeats_pending: usize,
    /// When the last successful flush finished (ms since the Unix epoch), 0 if none yet.
    pub last_flush_at_ms: i64,
    /// When the last sweep finished (ms since the Unix epoch), 0 if none yet.
    pub last_sweep_at_ms: i64,
    /// The last flush or sweep error, if the last attempt failed.
    pub last_error: Option<String>,
}

/// The agent registry service.
pub struct Registry {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    config: RegistryConfig,
    live: DashMap<AgentId, LiveEntry>,
    /// Ids whose live entry became dirty since the last flush; each id at most once.
    pending: Mutex<Vec<AgentId>>,
    /// Serialises lifecycle transitions (sweeps and revivals) so memory and store agree.
    transitions: tokio::sync::Mutex<()>,
    last_flush_at_ms: AtomicI64,
    last_sweep_at_ms: AtomicI64,
    /// Agent events up to this `seq` are reflected in the index (see [`Registry::follow_changes`]).
    followed_seq: AtomicI64,
    last_error: Mutex<Option<String>>,
    /// Agents by tenant and capability, for routing.
    index: std::sync::RwLock<AgentIndex>,
    /// Health of every indexed agent.
    health: Arc<HealthTable>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("agents", &self.live.len()).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave their data inconsistent (plain pushes
    // and swaps), so a poisoned lock is used as is.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Registry {
    /// A registry over `store`; call [`Registry::load`] before serving.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        metrics: Metrics,
        config: RegistryConfig,
    ) -> CoreResult<Self> {
        config.ttl.validate()?;
        let health = Arc::new(HealthTable::new(
            HealthConfig { stale_after_ms: config.ttl.stale_after_ms, ..HealthConfig::default() },
            clock.clone(),
            metrics.clone(),
        ));
        Ok(Self {
            index: std::sync::RwLock::new(AgentIndex::default()),
            health,
            store,
            clock,
            metrics,
            config,
            live: DashMap::new(),
            pending: Mutex::new(Vec::new()),
            transitions: tokio::sync::Mutex::new(()),
            last_flush_at_ms: AtomicI64::new(0),
            last_sweep_at_ms: AtomicI64::new(0),
            followed_seq: AtomicI64::new(0),
            last_error: Mutex::new(None),
        })
    }

    /// Uses `health` as the health table (instead of one with default settings); call before
    /// [`Registry::load`].
    pub fn with_health(mut self, health: Arc<HealthTable>) -> Self {
        self.health = health;
        self
    }

    /// The health table the heartbeats feed.
    pub fn health_table(&self) -> &Arc<HealthTable> {
        &self.health
    }

    /// The registry's settings.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Loads every agent's live seed from the store, and every definition into the routing
    /// index.
    pub async fn load(&self) -> CoreResult<usize> {
        // Read first: a change made while the index loads is applied again by the follower.
        self.followed_seq.store(self.store.agent_events_head().await?, Ordering::Release);
        let seeds = self.store.load_live_seeds().await?;
        let count = seeds.len();
        for seed in seeds {
            self.live.insert(seed.id, LiveEntry::from_seed(seed));
        }
        let mut filter = AgentFilter::default();
        loop {
            let page = self.store.list_agents(&filter, INDEX_LOAD_PAGE_ROWS).await?;
            for agent in &page {
                let last_seen_ms = self.live.get(&agent.id).map_or(agent.updated_at_ms, |e| e.last_seen_ms);
                self.index_insert(agent, last_seen_ms);
            }
            match page.last() {
                Some(last) if page.len() == INDEX_LOAD_PAGE_ROWS as usize => filter.after = Some(last.id),
                _ => break,
            }
        }
        self.refresh_status_gauges();
        Ok(count)
    }

    fn index_write(&self) -> std::sync::RwLockWriteGuard<'_, AgentIndex> {
        // The index is rebuilt entry by entry under the lock; a panic mid-way leaves at worst
        // one agent half-indexed, which its next change repairs.
        self.index.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn index_insert(&self, agent: &Agent, last_seen_ms: i64) {
        let health = self.health.cell(agent.id, &agent.tenant, last_seen_ms);
        let capabilities: Vec<(String, semver::Version)> =
            agent.capabilities.iter().map(|c| (c.name.clone(), c.version.clone())).collect();
        let profile = std::hash::BuildHasher::hash_one(&*PROFILE_HASHER, (&agent.labels, &capabilities));
        let indexed = Arc::new(IndexedAgent {
            id: agent.id,
            tenant: agent.tenant.clone(),
            name: agent.name.clone(),
            endpoint: agent.endpoint.clone(),
            labels: agent.labels.clone(),
            capabilities,
            health,
            profile,
        });
        self.index_write().insert(indexed);
    }

    fn index_remove(&self, id: AgentId) {
        self.index_write().remove(id);
        self.health.remove(id);
    }

    /// Runs `f` over the indexed agents of `tenant` having capability `name` (under the
    /// index's read lock: keep `f` short).
    pub fn with_candidates<R>(&self, tenant: &TenantId, name: &str, f: impl FnOnce(&[Arc<IndexedAgent>]) -> R) -> R {
        let index = self.index.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let items = index.by_capability.get(tenant).and_then(|sets| sets.get(name)).map_or(&[][..], |s| &s.items[..]);
        f(items)
    }

    /// How many agents of `tenant` have capability `name`.
    pub fn capability_count(&self, tenant: &TenantId, name: &str) -> usize {
        self.with_candidates(tenant, name, <[_]>::len)
    }

    /// The indexed definition of agent `id`, if it belongs to `tenant`.
    pub fn indexed(&self, tenant: &TenantId, id: AgentId) -> Option<Arc<IndexedAgent>> {
        let index = self.index.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        index.agents.get(&id).filter(|a| &a.tenant == tenant).cloned()
    }

    /// Agents in the routing index.
    pub fn indexed_len(&self) -> usize {
        self.index.read().unwrap_or_else(std::sync::PoisonError::into_inner).agents.len()
    }

    /// Registers an agent in `tenant`.
    pub async fn create(&self, tenant: &TenantId, new: NewAgent) -> CoreResult<Agent> {
        validate_definition(&new.name, new.endpoint.as_deref(), &new.labels, &new.capabilities)?;
        if self.live.len() >= self.config.agents_max {
            return Err(CoreError::LimitExceeded {
                message: format!("the kernel holds at most {} agents (agents_max)", self.config.agents_max).into(),
            });
        }
        let now_ms = self.clock.now_ms();
        let agent = Agent {
            id: AgentId::new(),
            tenant: tenant.clone(),
            name: new.name,
            endpoint: new.endpoint,
            labels: new.labels,
            capabilities: new.capabilities,
            status: AgentStatus::Healthy,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            last_heartbeat_at_ms: None,
            load: None,
            revision: 1,
        };
        let event = AgentEvent::new(&agent, AgentEventKind::Registered, now_ms);
        self.store.insert_agent(&agent, &event).await.map_err(name_conflict)?;
        self.live.insert(
            agent.id,
            LiveEntry {
                tenant: tenant.clone(),
                status: agent.status,
                last_seen_ms: now_ms,
                heartbeat: None,
                revived_from: None,
                dirty: false,
            },
        );
        self.metrics.agents.with_label_values(&["healthy"]).inc();
        self.index_insert(&agent, now_ms);
        Ok(agent)
    }

    /// The agent `id` in `tenant`, with its latest heartbeat.
    pub async fn get(&self, tenant: &TenantId, id: AgentId) -> CoreResult<Agent> {
        let mut agent = self.store.get_agent(tenant, id).await?.ok_or(CoreError::NotFound { what: "agent" })?;
        self.overlay(&mut agent);
        Ok(agent)
    }

    /// Applies `patch` to the agent `id` in `tenant`.
    pub async fn update(&self, tenant: &TenantId, id: AgentId, patch: AgentPatch) -> CoreResult<Agent> {
        let current = self.get(tenant, id).await?;
        if let Some(expected) = patch.revision
            && expected != current.revision
        {
            return Err(revision_conflict(current.revision));
        }
        let mut next = current.clone();
        if let Some(name) = patch.name {
            next.name = name;
        }
        if let Some(endpoint) = patch.endpoint {
            next.endpoint = endpoint;
        }
        if let Some(labels) = patch.labels {
            next.labels = labels;
        }
        if let Some(capabilities) = patch.capabilities {
            next.capabilities = capabilities;
        }
        validate_definition(&next.name, next.endpoint.as_deref(), &next.labels, &next.capabilities)?;
        let now_ms = self.clock.now_ms();
        next.updated_at_ms = now_ms;
        next.revision = current.revision + 1;
        let event = AgentEvent::new(&next, AgentEventKind::Updated, now_ms);
        let updated = self.store.update_agent(&next, current.revision, &event).await.map_err(name_conflict)?;
        if !updated {
            // Deleted or changed by someone else between our read and write.
            return match self.store.get_agent(tenant, id).await? {
                Some(agent) => Err(revision_conflict(agent.revision)),
                None => Err(CoreError::NotFound { what: "agent" }),
            };
        }
        let last_seen_ms = self.live.get(&id).map_or(now_ms, |e| e.last_seen_ms);
        self.index_insert(&next, last_seen_ms);
        Ok(next)
    }

    /// Deletes the agent `id` in `tenant`.
    pub async fn delete(&self, tenant: &TenantId, id: AgentId) -> CoreResult<()> {
        let now_ms = self.clock.now_ms();
        let status = self.live.get(&id).map_or(AgentStatus::Healthy, |e| e.status);
        let event = AgentEvent {
            seq: 0,
            tenant: tenant.clone(),
            agent_id: id,
            kind: AgentEventKind::Deleted,
            from_status: Some(status),
            to_status: None,
            at_ms: now_ms,
        };
        if !self.store.delete_agent(tenant, id, &event).await? {
            return Err(CoreError::NotFound { what: "agent" });
        }
        if self.live.remove_if(&id, |_, e| &e.tenant == tenant).is_some() {
            self.metrics.agents.with_label_values(&[status.as_str()]).dec();
        }
        self.index_remove(id);
        Ok(())
    }

    /// A page of agents matching `query`.
    pub async fn list(&self, query: AgentQuery) -> CoreResult<AgentPage> {
        let limit = query.limit.clamp(1, self.config.list_limit_max);
        let Some(version) = &query.version else {
            let mut items = self.store.list_agents(&query.filter, limit).await?;
            let next_after = (items.len() == limit as usize).then(|| items.last().map(|a| a.id)).flatten();
            self.overlay_page(&mut items, query.filter.status);
            return Ok(AgentPage { items, next_after });
        };
        if query.filter.capability.is_none() {
            return Err(CoreError::invalid("invalid_query", "a version requirement needs a capability to apply to"));
        }
        // Versions are compared with semver rules, which SQL cannot do: scan the capability's
        // (id, version) rows in id order, keep the ids that match, then fetch those agents.
        let mut filter = query.filter.clone();
        let mut ids = Vec::with_capacity(limit as usize);
        let mut scanned_rows = 0u32;
        // Start small (most requirements match a good share of versions) and grow.
        let mut chunk_rows = (limit * 2).clamp(64, VERSION_SCAN_CHUNK_ROWS);
        let next_after = loop {
            let chunk = self.store.list_capability_versions(&filter, chunk_rows).await?;
            let chunk_len = chunk.len();
            scanned_rows += chunk_len as u32;
            let mut last_scanned = None;
            for (id, raw) in chunk {
                last_scanned = Some(id);
                // A version the store cannot parse never matches (it was validated on write).
                if raw.parse::<semver::Version>().is_ok_and(|v| version.matches(&v)) {
                    ids.push(id);
                    if ids.len() == limit as usize {
                        break;
                    }
                }
            }
            if ids.len() == limit as usize {
                break ids.last().copied();
            }
            if chunk_len < chunk_rows as usize {
                break None;
            }
            if scanned_rows >= VERSION_SCAN_ROWS_MAX {
                // Return what was found; the cursor resumes the scan where it stopped.
                break last_scanned;
            }
            filter.after = last_scanned;
            chunk_rows = (chunk_rows * 4).min(VERSION_SCAN_CHUNK_ROWS);
        };
        let tenant = query.filter.tenant.clone().unwrap_or_else(TenantId::default_tenant);
        let mut items = self.store.get_agents(&tenant, &ids).await?;
        self.overlay_page(&mut items, query.filter.status);
        Ok(AgentPage { items, next_after })
    }

    /// Records a heartbeat from agent `id` of `tenant`.
    pub async fn heartbeat(&self, tenant: &TenantId, id: AgentId, load: Load) -> CoreResult<HeartbeatAck> {
        load.validate()?;
        let now_ms = self.clock.now_ms();
        if !self.live.contains_key(&id) {
            // Registered by another kernel on the same database, or not at all.
            let seed = self.store.get_live_seed(id).await?.ok_or(CoreError::NotFound { what: "agent" })?;
            if &seed.tenant != tenant {
                return Err(CoreError::NotFound { what: "agent" });
            }
            if self.live.len() >= self.config.agents_max {
                return Err(CoreError::LimitExceeded {
                    message: format!("the kernel holds at most {} agents (agents_max)", self.config.agents_max).into(),
                });
            }
            // Its definition, for the routing index (rare: once per agent per kernel).
            if let Some(agent) = self.store.get_agent(tenant, id).await? {
                self.index_insert(&agent, now_ms);
            }
            // Two first heartbeats may race here: the first seed wins, the second is dropped.
            if let dashmap::Entry::Vacant(vacant) = self.live.entry(id) {
                self.metrics.agents.with_label_values(&[seed.status.as_str()]).inc();
                vacant.insert(LiveEntry::from_seed(seed));
            }
        }
        {
            let mut entry = self.live.get_mut(&id).ok_or(CoreError::NotFound { what: "agent" })?;
            if &entry.tenant != tenant {
                return Err(CoreError::NotFound { what: "agent" });
            }
            entry.last_seen_ms = now_ms;
            self.health.heartbeat(id, tenant, now_ms, &load);
            entry.heartbeat = Some((now_ms, load));
            if entry.status != AgentStatus::Healthy {
                // Revived: healthy now in memory; the change and its event are written with
                // the next flush, in the same batch as this heartbeat.
                self.metrics.agents.with_label_values(&[entry.status.as_str()]).dec();
                self.metrics.agents.with_label_values(&["healthy"]).inc();
                let from = entry.status;
                entry.revived_from.get_or_insert(from);
                entry.status = AgentStatus::Healthy;
            }
            self.mark_dirty(id, &mut entry);
        }
        self.metrics.heartbeats_total.inc();
        Ok(HeartbeatAck {
            status: AgentStatus::Healthy,
            at_ms: now_ms,
            heartbeat_interval_ms: self.config.ttl.stale_after_ms / 3,
        })
    }

    fn mark_dirty(&self, id: AgentId, entry: &mut LiveEntry) {
        if !entry.dirty {
            entry.dirty = true;
            lock(&self.pending).push(id);
            self.metrics.heartbeats_pending.inc();
        }
    }

    /// Writes dirty heartbeat state (and the revivals heartbeats caused) to the store in
    /// batches; returns how many heartbeat states were written.
    pub async fn flush_heartbeats(&self) -> CoreResult<usize> {
        let ids = std::mem::take(&mut *lock(&self.pending));
        if ids.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let mut records = Vec::with_capacity(ids.len());
        let mut revivals = Vec::new();
        for id in ids {
            if let Some(mut entry) = self.live.get_mut(&id)
                && entry.dirty
            {
                entry.dirty = false;
                if let Some((at_ms, load)) = &entry.heartbeat {
                    records.push(HeartbeatRecord { id, at_ms: *at_ms, load: load.clone() });
                }
                if let Some(from) = entry.revived_from.take() {
                    revivals.push(StatusChange {
                        event: AgentEvent {
                            seq: 0,
                            tenant: entry.tenant.clone(),
                            agent_id: id,
                            kind: AgentEventKind::StatusChanged,
                            from_status: Some(from),
                            to_status: Some(AgentStatus::Healthy),
                            at_ms: entry.last_seen_ms,
                        },
                        last_seen_at_or_before_ms: i64::MAX,
                        remove: false,
                    });
                }
            }
        }
        let mut written = 0;
        let batch_max = self.config.heartbeat_flush_batch_max.max(1);
        let mut failure = None;
        for (i, batch) in records.chunks(batch_max).enumerate() {
            if let Err(err) = self.store.write_heartbeats(batch).await {
                failure = Some((i * batch_max, err));
                break;
            }
            written += batch.len();
        }
        if failure.is_none() && !revivals.is_empty() {
            let _serial = self.transitions.lock().await;
            for batch in revivals.chunks(batch_max) {
                match self.store.apply_status_changes(batch).await {
                    Ok(applied) => applied.iter().for_each(|_| self.count_transition(Some(AgentStatus::Healthy))),
                    Err(err) => {
                        failure = Some((records.len(), err));
                        break;
                    }
                }
            }
        }
        if let Some((unwritten_from, err)) = failure {
            // Put back everything not yet written, unless a newer heartbeat already did.
            for record in &records[unwritten_from..] {
                if let Some(mut entry) = self.live.get_mut(&record.id) {
                    self.mark_dirty(record.id, &mut entry);
                }
            }
            for change in &revivals {
                if let Some(mut entry) = self.live.get_mut(&change.event.agent_id)
                    && entry.status == AgentStatus::Healthy
                {
                    entry.revived_from.get_or_insert(change.event.from_status.unwrap_or(AgentStatus::Stale));
                    self.mark_dirty(change.event.agent_id, &mut entry);
                }
            }
            self.metrics.heartbeats_flushed_total.inc_by(written as u64);
            self.metrics.heartbeat_flush_errors_total.inc();
            self.metrics.heartbeats_pending.set(lock(&self.pending).len() as i64);
            *lock(&self.last_error) = Some(format!("heartbeat flush: {err}"));
            return Err(err.into());
        }
        self.metrics.heartbeats_flushed_total.inc_by(written as u64);
        self.metrics.heartbeats_pending.set(lock(&self.pending).len() as i64);
        self.metrics.heartbeat_flush_duration_seconds.observe(started.elapsed().as_secs_f64());
        self.last_flush_at_ms.store(self.clock.now_ms(), Ordering::Relaxed);
        *lock(&self.last_error) = None;
        Ok(written)
    }

    /// Runs one pass of the TTL lifecycle; returns the events it recorded.
    pub async fn sweep(&self) -> CoreResult<Vec<AgentEvent>> {
        let _serial = self.transitions.lock().await;
        let now_ms = self.clock.now_ms();
        let ttl = self.config.ttl;
        let mut changes = Vec::new();
        for entry in &self.live {
            if changes.len() == SWEEP_CHANGES_MAX {
                break;
            }
            let target = ttl.status_for(now_ms - entry.last_seen_ms);
            // The sweeper only degrades; heartbeats revive.
            let degrade = match target {
                None => true,
                Some(to) => rank(to) > rank(entry.status),
            };
            if degrade {
                changes.push(StatusChange {
                    event: AgentEvent {
                        seq: 0,
                        tenant: entry.tenant.clone(),
                        agent_id: *entry.key(),
                        kind: if target.is_none() { AgentEventKind::Expired } else { AgentEventKind::StatusChanged },
                        from_status: Some(entry.status),
                        to_status: target,
                        at_ms: now_ms,
                    },
                    last_seen_at_or_before_ms: entry.last_seen_ms,
                    remove: target.is_none(),
                });
            }
        }
        if changes.is_empty() {
            self.last_sweep_at_ms.store(now_ms, Ordering::Relaxed);
            return Ok(Vec::new());
        }
        let applied = match self.store.apply_status_changes(&changes).await {
            Ok(applied) => applied,
            Err(err) => {
                *lock(&self.last_error) = Some(format!("TTL sweep: {err}"));
                return Err(err.into());
            }
        };
        let applied_ids: HashSet<AgentId> = applied.iter().map(|e| e.agent_id).collect();
        for change in &changes {
            let id = change.event.agent_id;
            if !applied_ids.contains(&id) {
                // The store knows a newer heartbeat (another kernel's) or the agent is gone.
                self.reseed(id).await?;
                continue;
            }
            let to = change.event.to_status;
            if change.remove {
                self.live.remove(&id);
                self.index_remove(id);
            } else if let Some(mut entry) = self.live.get_mut(&id) {
                if entry.last_seen_ms > change.last_seen_at_or_before_ms {
                    // A heartbeat arrived while this sweep was writing: the agent stays
                    // healthy in memory and the next flush records the revival.
                    if let Some(to) = to {
                        entry.revived_from.get_or_insert(to);
                    }
                    self.mark_dirty(id, &mut entry);
                } else if let Some(to) = to {
                    entry.status = to;
                }
            }
            self.count_transition(to);
        }
        self.refresh_status_gauges();
        self.last_sweep_at_ms.store(now_ms, Ordering::Relaxed);
        Ok(applied)
    }

    async fn reseed(&self, id: AgentId) -> CoreResult<()> {
        match self.store.get_live_seed(id).await? {
            Some(seed) => {
                if let Some(mut entry) = self.live.get_mut(&id) {
                    entry.status = seed.status;
                    entry.last_seen_ms = entry.last_seen_ms.max(seed.last_seen_ms);
                }
            }
            None => {
                self.live.remove(&id);
                self.index_remove(id);
            }
        }
        Ok(())
    }

    /// Lifecycle and change events of `tenant` (optionally of one agent) after `after_seq`.
    pub async fn events(
        &self,
        tenant: &TenantId,
        agent: Option<AgentId>,
        after_seq: i64,
        limit: u32,
    ) -> CoreResult<Vec<AgentEvent>> {
        let limit = limit.clamp(1, self.config.list_limit_max);
        Ok(self.store.list_agent_events(tenant, agent, after_seq, limit).await?)
    }

    /// State of the background work.
    pub fn health(&self) -> RegistryHealth {
        RegistryHealth {
            agents: self.live.len(),
            heartbeats_pending: lock(&self.pending).len(),
            last_flush_at_ms: self.last_flush_at_ms.load(Ordering::Relaxed),
            last_sweep_at_ms: self.last_sweep_at_ms.load(Ordering::Relaxed),
            last_error: lock(&self.last_error).clone(),
        }
    }

    /// Recounts agents by status into the `nops_agents` gauge.
    pub fn refresh_status_gauges(&self) {
        let mut counts = [0i64; 3];
        for entry in &self.live {
            counts[rank(entry.status)] += 1;
        }
        for status in AgentStatus::ALL {
            self.metrics.agents.with_label_values(&[status.as_str()]).set(counts[rank(status)]);
        }
    }

    /// Applies to the routing index the agent definitions that changed in the store since the
    /// last call: registrations, updates, deletions and expiries made by other kernels on the
    /// same database (and this kernel's own, which change nothing). Returns how many agents
    /// were looked up again.
    ///
    /// Sequence numbers are taken when an event is written and become visible when its
    /// transaction commits, not always in order: the events of the last
    /// [`FOLLOW_SETTLE_MS`] are read again at the next call, so one committed out of order
    /// within that time is not skipped. Applying a change twice is harmless (the agent's current
    /// definition is read from the store).
    pub async fn follow_changes(&self) -> CoreResult<usize> {
        let settled_at_ms = self.clock.now_ms().saturating_sub(FOLLOW_SETTLE_MS);
        let mut after = self.followed_seq.load(Ordering::Acquire);
        let mut settled = true;
        let mut refreshed = HashSet::new();
        for _ in 0..FOLLOW_PAGES_PER_STEP_MAX {
            let events = self.store.list_agent_changes(after, FOLLOW_CHANGES_PAGE_MAX).await?;
            for event in &events {
                // Status changes are read only to move past them: they do not change a
                // definition, and the live status is each kernel's own.
                let changes_definition = !matches!(event.kind, AgentEventKind::StatusChanged);
                if changes_definition && refreshed.insert(event.agent_id) {
                    self.refresh_agent(&event.tenant, event.agent_id).await?;
                }
                settled &= event.at_ms <= settled_at_ms;
                if settled {
                    self.followed_seq.fetch_max(event.seq, Ordering::AcqRel);
                }
            }
            match events.last() {
                Some(last) if events.len() == FOLLOW_CHANGES_PAGE_MAX as usize => after = last.seq,
                _ => break,
            }
        }
        Ok(refreshed.len())
    }

    /// Brings one agent's routing-index entry and live entry in line with the store.
    async fn refresh_agent(&self, tenant: &TenantId, id: AgentId) -> CoreResult<()> {
        let Some(agent) = self.store.get_agent(tenant, id).await? else {
            if let Some((_, entry)) = self.live.remove_if(&id, |_, e| &e.tenant == tenant) {
                self.metrics.agents.with_label_values(&[entry.status.as_str()]).dec();
            }
            if self.indexed(tenant, id).is_some() {
                self.index_remove(id);
            }
            return Ok(());
        };
        if !self.live.contains_key(&id) {
            if self.live.len() >= self.config.agents_max {
                // Past the limit: indexed on its first heartbeat here, which is refused too.
                return Ok(());
            }
            let Some(seed) = self.store.get_live_seed(id).await? else {
                return Ok(());
            };
            if let dashmap::Entry::Vacant(vacant) = self.live.entry(id) {
                self.metrics.agents.with_label_values(&[seed.status.as_str()]).inc();
                vacant.insert(LiveEntry::from_seed(seed));
            }
        }
        let last_seen_ms = self.live.get(&id).map_or(agent.updated_at_ms, |e| e.last_seen_ms);
        self.index_insert(&agent, last_seen_ms);
        Ok(())
    }

    /// Follows other kernels' agent changes every [`FOLLOW_INTERVAL_MS`] until `shutdown`
    /// changes (its own task, so a long backlog never delays heartbeat flushes).
    async fn run_follower(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(FOLLOW_INTERVAL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(err) = self.follow_changes().await {
                        tracing::warn!(error = %err, "following agent changes failed; will retry");
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
    }

    /// Runs the heartbeat flusher, the TTL sweeper and the follower of other kernels' agent
    /// changes until `shutdown` changes, then flushes one last time.
    pub async fn run_background(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let follower = tokio::spawn(self.clone().run_follower(shutdown.clone()));
        let mut flush_tick =
            tokio::time::interval(Duration::from_millis(self.config.heartbeat_flush_interval_ms.max(1)));
        let mut sweep_tick = tokio::time::interval(Duration::from_millis(self.config.sweep_interval_ms.max(1)));
        flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = flush_tick.tick() => {
                    if let Err(err) = self.flush_heartbeats().await {
                        tracing::warn!(error = %err, "heartbeat flush failed; will retry");
                    }
                }
                _ = sweep_tick.tick() => {
                    match self.sweep().await {
                        Ok(events) => for event in events {
                            tracing::info!(
                                agent_id = %event.agent_id, tenant = %event.tenant, kind = event.kind.as_str(),
                                from = event.from_status.map(AgentStatus::as_str),
                                to = event.to_status.map(AgentStatus::as_str),
                                "agent lifecycle transition"
                            );
                        },
                        Err(err) => tracing::warn!(error = %err, "TTL sweep failed; will retry"),
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        if let Err(err) = follower.await {
            tracing::error!(error = %err, "the follower of agent changes failed");
        }
        if let Err(err) = self.flush_heartbeats().await {
            tracing::error!(error = %err, "final heartbeat flush failed; the last heartbeats are lost");
        }
    }

    /// Overlays live state on a page read from the store. The store's status lags a revival
    /// by at most one flush; agents whose live status no longer matches the `status` filter
    /// are dropped (the page may then be shorter than the limit; the cursor still holds).
    fn overlay_page(&self, items: &mut Vec<Agent>, status: Option<AgentStatus>) {
        items.iter_mut().for_each(|a| self.overlay(a));
        if let Some(status) = status {
            items.retain(|a| a.status == status);
        }
    }

    fn overlay(&self, agent: &mut Agent) {
        if let Some(entry) = self.live.get(&agent.id) {
            agent.status = entry.status;
            if let Some((at_ms, load)) = &entry.heartbeat
                && agent.last_heartbeat_at_ms.is_none_or(|stored| stored <= *at_ms)
            {
                agent.last_heartbeat_at_ms = Some(*at_ms);
                agent.load = Some(load.clone());
            }
        }
    }

    fn count_transition(&self, to: Option<AgentStatus>) {
        self.metrics.agent_transitions_total.with_label_values(&[to.map_or("removed", AgentStatus::as_str)]).inc();
    }
}

/// Position of a status in the lifecycle (higher is worse).
fn rank(status: AgentStatus) -> usize {
    match status {
        AgentStatus::Healthy => 0,
        AgentStatus::Stale => 1,
        AgentStatus::Zombie => 2,
    }
}

fn name_conflict(err: StoreError) -> CoreError {
    match err {
        StoreError::UniqueViolation(_) => CoreError::Conflict {
            code: "name_taken",
            message: "an agent with this name already exists in the tenant".into(),
        },
        other => other.into(),
    }
}

fn revision_conflict(current: i64) -> CoreError {
    CoreError::Conflict {
        code: "revision_mismatch",
        message: format!("the agent was changed concurrently; its current revision is {current}").into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_thresholds_map_silence_to_status() {
        let ttl = TtlConfig { stale_after_ms: 10, zombie_after_ms: 20, remove_after_ms: 30 };
        assert_eq!(ttl.status_for(0), Some(AgentStatus::Healthy));
        assert_eq!(ttl.status_for(9), Some(AgentStatus::Healthy));
        assert_eq!(ttl.status_for(10), Some(AgentStatus::Stale));
        assert_eq!(ttl.status_for(20), Some(AgentStatus::Zombie));
        assert_eq!(ttl.status_for(30), None);
    }

    #[test]
    fn ttl_thresholds_must_increase() {
        assert!(TtlConfig::default().validate().is_ok());
        let bad = [
            TtlConfig { stale_after_ms: 0, zombie_after_ms: 20, remove_after_ms: 30 },
            TtlConfig { stale_after_ms: 20, zombie_after_ms: 20, remove_after_ms: 30 },
            TtlConfig { stale_after_ms: 10, zombie_after_ms: 40, remove_after_ms: 30 },
        ];
        for ttl in bad {
            assert!(ttl.validate().is_err(), "{ttl:?}");
        }
    }
}
