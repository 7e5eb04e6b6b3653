//! The store capability: what the kernel needs from durable storage, as traits.
//!
//! `nops-store` implements these over SQLite and PostgreSQL with the same semantics; the
//! domain services use only the traits.

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::agent::{Agent, AgentEvent, AgentId, AgentStatus, Load};
use crate::auth::ApiKeyRecord;
use crate::plugin::{ChainEntry, PluginChange, PluginState, PluginVersion, ShadowDiff};
use crate::tenant::TenantId;
use uuid::Uuid;

/// A store failure. Transient failures have already been retried by the adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A uniqueness rule was broken (e.g. an agent name taken within the tenant).
    #[error("unique constraint violated: {0}")]
    UniqueViolation(String),
    /// The store could not be reached or failed; the detail is for logs.
    #[error("{0}")]
    Backend(String),
    /// A size or count limit was reached; nothing was written.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// The row changed under the caller (e.g. a key rotated or revoked meanwhile); nothing was
    /// written.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Stored data could not be decoded.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// Filters of an agent listing that the store applies.
#[derive(Debug, Clone, Default)]
pub struct AgentFilter {
    /// Only this tenant's agents.
    pub tenant: Option<TenantId>,
    /// Only agents with a capability of this name.
    pub capability: Option<String>,
    /// Only agents in this status.
    pub status: Option<AgentStatus>,
    /// Only agents carrying all these labels.
    pub labels: BTreeMap<String, String>,
    /// Only agents whose id sorts after this one (cursor pagination).
    pub after: Option<AgentId>,
}

/// What the registry keeps in memory about each agent, loaded at start.
#[derive(Debug, Clone)]
pub struct AgentLiveSeed {
    /// The agent.
    pub id: AgentId,
    /// Its tenant.
    pub tenant: TenantId,
    /// Stored status.
    pub status: AgentStatus,
    /// Last heartbeat or registration (ms since the Unix epoch).
    pub last_seen_ms: i64,
}

/// The latest heartbeat state of one agent, written in batches.
#[derive(Debug, Clone)]
pub struct HeartbeatRecord {
    /// The agent.
    pub id: AgentId,
    /// Heartbeat time (ms since the Unix epoch).
    pub at_ms: i64,
    /// Reported load.
    pub load: Load,
}

/// A lifecycle transition decided by the registry, applied with its event in one transaction.
#[derive(Debug, Clone)]
pub struct StatusChange {
    /// The event recording the change (carries agent, tenant, from and to).
    pub event: AgentEvent,
    /// Applied only if the agent was last seen at or before this time, so that a heartbeat
    /// recorded meanwhile (possibly by another kernel) wins.
    pub last_seen_at_or_before_ms: i64,
    /// Remove the agent instead of changing its status.
    pub remove: bool,
}

/// Usage of the connection pool, for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolStats {
    /// Open connections.
    pub size: u32,
    /// Idle connections.
    pub idle: u32,
    /// Configured maximum.
    pub max: u32,
}

/// Durable storage of agents and their events.
#[async_trait]
pub trait AgentStore: Send + Sync + 'static {
    /// Inserts an agent and its `registered` event in one transaction.
    async fn insert_agent(&self, agent: &Agent, event: &AgentEvent) -> Result<(), StoreError>;
    /// The agent with this id in this tenant.
    async fn get_agent(&self, tenant: &TenantId, id: AgentId) -> Result<Option<Agent>, StoreError>;
    /// The agent with this id in any tenant, as the registry's in-memory seed.
    async fn get_live_seed(&self, id: AgentId) -> Result<Option<AgentLiveSeed>, StoreError>;
    /// Every agent's seed, at start.
    async fn load_live_seeds(&self) -> Result<Vec<AgentLiveSeed>, StoreError>;
    /// Replaces an agent's definition if its stored revision is `expected_revision`; records
    /// the event in the same transaction. Returns false when nothing matched.
    async fn update_agent(&self, agent: &Agent, expected_revision: i64, event: &AgentEvent)
    -> Result<bool, StoreError>;
    /// Deletes an agent and records the event in one transaction. Returns false if absent.
    async fn delete_agent(&self, tenant: &TenantId, id: AgentId, event: &AgentEvent) -> Result<bool, StoreError>;
    /// Agents matching `filter`, ordered by id, at most `limit`.
    async fn list_agents(&self, filter: &AgentFilter, limit: u32) -> Result<Vec<Agent>, StoreError>;
    /// Ids and versions of the capability named in `filter.capability` (required) of the
    /// agents matching the other filters, ordered by agent id, at most `limit`. A light scan
    /// for semver filtering, which SQL cannot do.
    async fn list_capability_versions(
        &self,
        filter: &AgentFilter,
        limit: u32,
    ) -> Result<Vec<(AgentId, String)>, StoreError>;
    /// The agents of `tenant` with these ids, ordered by id.
    async fn get_agents(&self, tenant: &TenantId, ids: &[AgentId]) -> Result<Vec<Agent>, StoreError>;
    /// Writes the latest heartbeat of many agents in one transaction; returns rows written.
    async fn write_heartbeats(&self, batch: &[HeartbeatRecord]) -> Result<u64, StoreError>;
    /// Applies lifecycle changes with their events in one transaction; returns those applied.
    async fn apply_status_changes(&self, changes: &[StatusChange]) -> Result<Vec<AgentEvent>, StoreError>;
    /// The `seq` of the latest agent event, 0 when there is none.
    async fn agent_events_head(&self) -> Result<i64, StoreError>;
    /// Agent events of every tenant with `seq` greater than `after_seq`, oldest first: what
    /// other kernels on the same database did, for the routing index.
    async fn list_agent_changes(&self, after_seq: i64, limit: u32) -> Result<Vec<AgentEvent>, StoreError>;
    /// Events of a tenant (optionally of one agent), with `seq` greater than `after_seq`.
    async fn list_agent_events(
        &self,
        tenant: &TenantId,
        agent: Option<AgentId>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AgentEvent>, StoreError>;
}

/// Durable storage of API keys.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// How many keys exist (revoked ones included).
    async fn api_key_count(&self) -> Result<u64, StoreError>;
    /// Inserts the bootstrap key unless another kernel already did; true if this call did.
    async fn insert_bootstrap_key(&self, record: &ApiKeyRecord) -> Result<bool, StoreError>;
    /// The key with this hash.
    async fn find_api_key(&self, hash: &[u8]) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// The key with this id.
    async fn get_api_key(&self, id: Uuid) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Keys of `tenant` (every key when `None`), by id, after `after`, at most `limit`.
    async fn list_api_keys(
        &self,
        tenant: Option<&TenantId>,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Inserts a key and its event in one transaction. Fails with
    /// [`StoreError::LimitExceeded`] when the key's tenant (or the kernel, for tenantless keys)
    /// already holds `keys_max` keys that are neither revoked nor expired at `now_ms`.
    async fn insert_api_key(
        &self,
        record: &ApiKeyRecord,
        event: &OutboxEvent,
        keys_max: u32,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// Rotates `old` to `next` in one transaction: inserts `next`, marks `old` replaced by it
    /// and sets its expiry to `old_expires_at_ms`, and writes `event`. Fails with
    /// [`StoreError::Conflict`] when `old` is revoked or already rotated (so two concurrent
    /// rotations cannot both succeed).
    async fn rotate_api_key(
        &self,
        old: Uuid,
        old_expires_at_ms: i64,
        next: &ApiKeyRecord,
        event: &OutboxEvent,
    ) -> Result<(), StoreError>;
    /// Revokes a key and writes `event` in one transaction; false when it was already revoked
    /// (nothing is written then).
    async fn revoke_api_key(&self, id: Uuid, at_ms: i64, event: &OutboxEvent) -> Result<bool, StoreError>;
    /// Keys neither revoked nor expired at `now_ms`, across tenants.
    async fn live_api_key_count(&self, now_ms: i64) -> Result<u64, StoreError>;
    /// Records when keys were last used.
    async fn touch_api_keys(&self, used: &[(Uuid, i64)]) -> Result<(), StoreError>;
}

/// Key-value storage for plugins. Namespaces isolate plugins and tenants from each other;
/// the runtime builds them, plugins never choose them.
#[async_trait]
pub trait PluginKv: Send + Sync + 'static {
    /// The value under `key` in `namespace`.
    async fn kv_get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores `value` under `key`. Fails with [`StoreError::LimitExceeded`] when the key is
    /// new and the namespace already holds `keys_max` keys.
    async fn kv_set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        keys_max: u32,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// Removes `key`; true if it existed.
    async fn kv_delete(&self, namespace: &str, key: &str) -> Result<bool, StoreError>;
    /// Keys of `namespace` starting with `prefix`, in order, at most `limit`.
    async fn kv_list(&self, namespace: &str, prefix: &str, limit: u32) -> Result<Vec<String>, StoreError>;
}

/// An event a plugin published, written to the kernel's outbox with the call's other effects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// The tenant the plugin ran for.
    pub tenant: TenantId,
    /// The subject (granted to the plugin).
    pub subject: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Who published: `plugin/<name>@<version>`.
    pub source: String,
}

/// The effects of one successful plugin call, applied in one transaction: storage writes of
/// a contract (buffered during the call) and the events the plugin published.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginEffects {
    /// Keys to set (`Some`) or delete (`None`) in the call's namespace.
    pub writes: Vec<(String, Option<Vec<u8>>)>,
    /// Events to append to the outbox.
    pub events: Vec<OutboxEvent>,
}

impl PluginEffects {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.events.is_empty()
    }
}

/// Commits plugin effects.
#[async_trait]
pub trait PluginCommit: Send + Sync + 'static {
    /// Applies `effects` in one transaction; fails with [`StoreError::LimitExceeded`] (nothing
    /// written) when the namespace would exceed `keys_max` keys.
    async fn commit_plugin_effects(
        &self,
        namespace: &str,
        effects: &PluginEffects,
        keys_max: u32,
        now_ms: i64,
    ) -> Result<(), StoreError>;
}

/// Durable storage of plugins: versions, their components and configurations (by digest),
/// each plugin's state and hash chain, and shadow differences.
#[async_trait]
pub trait PluginStore: Send + Sync + 'static {
    /// Stores a blob (a component or a configuration) under its digest; a no-op if present.
    async fn put_plugin_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), StoreError>;
    /// The blob stored under `digest`.
    async fn get_plugin_blob(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Applies a change in one transaction: appends its chain entry (failing with
    /// [`StoreError::UniqueViolation`] when an entry with that `seq` exists), inserts the
    /// version (failing with `UniqueViolation` if it exists), replaces the state, deletes the
    /// version, and advances the kernel-wide plugin generation.
    async fn apply_plugin_change(&self, change: &PluginChange) -> Result<(), StoreError>;
    /// Every plugin's state, of one tenant or of all.
    async fn list_plugin_states(&self, tenant: Option<&TenantId>) -> Result<Vec<PluginState>, StoreError>;
    /// The state of one plugin.
    async fn get_plugin_state(&self, tenant: &TenantId, name: &str) -> Result<Option<PluginState>, StoreError>;
    /// The stored versions of a plugin, oldest first.
    async fn list_plugin_versions(&self, tenant: &TenantId, name: &str) -> Result<Vec<PluginVersion>, StoreError>;
    /// A plugin's chain, in `seq` order.
    async fn plugin_chain(&self, tenant: &TenantId, name: &str) -> Result<Vec<ChainEntry>, StoreError>;
    /// The (tenant, name) of every plugin that has a chain.
    async fn list_plugin_chains(&self) -> Result<Vec<(TenantId, String)>, StoreError>;
    /// A counter advanced by every plugin change: replicas poll it to notice changes.
    async fn plugin_generation(&self) -> Result<i64, StoreError>;
    /// Records a shadow difference, keeping at most `keep_max` per plugin (oldest dropped).
    async fn insert_shadow_diff(&self, diff: &ShadowDiff, keep_max: u32) -> Result<(), StoreError>;
    /// The latest shadow differences of a plugin, newest first.
    async fn list_shadow_diffs(&self, tenant: &TenantId, name: &str, limit: u32)
    -> Result<Vec<ShadowDiff>, StoreError>;
}

/// Reachability and pool usage of the store.
#[async_trait]
pub trait StoreHealth: Send + Sync + 'static {
    /// A round trip to the database.
    async fn ping(&self) -> Result<(), StoreError>;
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// Pool usage now.
    fn pool_stats(&self) -> PoolStats;
}

/// The answer of one GCRA check ([`RateLimitStore::gcra_check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcraOutcome {
    /// The request may proceed (and was counted).
    pub allowed: bool,
    /// Requests that would still be allowed right now, after this one.
    pub remaining: u32,
    /// When refused: how long until one more request would be allowed, in ms (0 when
    /// allowed). An upper bound, exact to within one emission interval.
    pub retry_after_ms: i64,
    /// How long until the whole burst is available again, in ms.
    pub reset_ms: i64,
}

/// Rate limits shared by every kernel on one database: the generic cell rate algorithm (GCRA),
/// one theoretical arrival time (TAT) per key, decided and advanced in one atomic statement.
#[async_trait]
pub trait RateLimitStore: Send + Sync + 'static {
    /// Counts one request against `key`, whose budget is `burst` requests at once, refilled
    /// by one every `emission_interval_ms`, at `now_ms` (ms since the Unix epoch, the same
    /// time base on every replica). A refused request changes nothing.
    async fn gcra_check(
        &self,
        key: &str,
        emission_interval_ms: i64,
        burst: u32,
        now_ms: i64,
    ) -> Result<GcraOutcome, StoreError>;
    /// Deletes the keys whose TAT lies before `now_ms`: they are indistinguishable from keys
    /// never seen. Returns how many were deleted.
    async fn gcra_purge_expired(&self, now_ms: i64) -> Result<u64, StoreError>;
}

/// Durable storage of dispatched tasks and their attempts (see [`crate::dispatch`]).
#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// Inserts a new task. Fails with [`StoreError::LimitExceeded`] (nothing written) when its
    /// tenant already has `active_max` queued or running tasks.
    async fn insert_task(&self, task: &crate::dispatch::TaskRecord, active_max: u32) -> Result<(), StoreError>;
    /// The task with this id in `tenant` (any tenant when `None`).
    async fn get_task(
        &self,
        tenant: Option<&TenantId>,
        id: Uuid,
    ) -> Result<Option<crate::dispatch::TaskRecord>, StoreError>;
    /// Tasks of `tenant`, optionally in one status, ordered by id, after `after`, at most `limit`.
    async fn list_tasks(
        &self,
        tenant: &TenantId,
        status: Option<crate::dispatch::TaskStatus>,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<crate::dispatch::TaskRecord>, StoreError>;
    /// The task with this id in `tenant` (any tenant when `None`) and its attempts, oldest
    /// first, read together (one statement), as of one moment.
    async fn get_task_with_attempts(
        &self,
        tenant: Option<&TenantId>,
        id: Uuid,
    ) -> Result<Option<(crate::dispatch::TaskRecord, Vec<crate::dispatch::AttemptRecord>)>, StoreError>;
    /// One attempt.
    async fn get_attempt(&self, task: Uuid, attempt: u32)
    -> Result<Option<crate::dispatch::AttemptRecord>, StoreError>;
    /// Starts `attempt` in one transaction if `owner` still drives its task, the task is
    /// unfinished and its latest attempt is older: inserts the attempt, marks the task running
    /// on it and extends the lease to `lease_until_ms`. A pull attempt not yet delivered is
    /// refused with [`crate::dispatch::StartVerdict::QueueFull`] when its agent's queue holds
    /// `queue_depth_max` attempts.
    async fn start_attempt(
        &self,
        attempt: &crate::dispatch::AttemptRecord,
        owner: &str,
        lease_until_ms: i64,
        queue_depth_max: u32,
    ) -> Result<crate::dispatch::StartVerdict, StoreError>;
    /// Inserts a new task together with its first attempt, already started, in one
    /// transaction: [`TaskStore::insert_task`] and then [`TaskStore::start_attempt`] without a
    /// commit between them. `task` is stored as given: running on `attempt`, owned by this
    /// kernel and leased. When `attempt` is a pull attempt not yet delivered and its agent's
    /// queue holds `queue_depth_max` attempts, the task is stored queued with no attempt
    /// (attempt 0) and the answer is [`crate::dispatch::StartVerdict::QueueFull`]. Fails
    /// with [`StoreError::LimitExceeded`] (nothing written) when the tenant already has
    /// `active_max` queued or running tasks.
    async fn insert_task_started(
        &self,
        task: &crate::dispatch::TaskRecord,
        attempt: &crate::dispatch::AttemptRecord,
        active_max: u32,
        queue_depth_max: u32,
    ) -> Result<crate::dispatch::StartVerdict, StoreError>;
    /// Records the end of an attempt if it is the first for the task's current, unfinished
    /// attempt (a success finishes the task with its output, in the same transaction). A late
    /// answer of the agent (superseded attempt, finished task) marks the attempt `late` and
    /// changes nothing else.
    async fn finish_attempt(
        &self,
        report: &crate::dispatch::AttemptReport,
    ) -> Result<crate::dispatch::Verdict, StoreError> {
        Ok(self.finish_attempt_recorded(report).await?.0)
    }
    /// [`TaskStore::finish_attempt`], also answering, when the end was accepted, the task and
    /// the attempt as that write stored them (read back by the write itself, not by another
    /// statement).
    async fn finish_attempt_recorded(
        &self,
        report: &crate::dispatch::AttemptReport,
    ) -> Result<(crate::dispatch::Verdict, Option<Box<crate::dispatch::RecordedEnd>>), StoreError>;
    /// Marks an unfinished task driven by `owner` failed with `error`; false when it had
    /// finished or another kernel drives it.
    async fn fail_task(&self, id: Uuid, owner: &str, error: &str, at_ms: i64) -> Result<bool, StoreError>;
    /// Hands the oldest queued pull attempt of `agent` in `tenant` to it (marks it delivered at
    /// `now_ms`); `None` when its queue is empty.
    async fn claim_next_pull(
        &self,
        tenant: &TenantId,
        agent: AgentId,
        now_ms: i64,
    ) -> Result<Option<crate::dispatch::PulledAttempt>, StoreError>;
    /// Extends the lease of every unfinished task `owner` drives to `lease_until_ms`.
    async fn renew_task_leases(&self, owner: &str, lease_until_ms: i64) -> Result<u64, StoreError>;
    /// Claims for `owner`, until `lease_until_ms`, at most `limit` unfinished tasks whose lease
    /// ran out before `now_ms` (their kernel stopped, or none had a free driver); returns their
    /// ids. Each task is claimed by one kernel only.
    async fn claim_orphaned_tasks(
        &self,
        owner: &str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: u32,
    ) -> Result<Vec<Uuid>, StoreError>;
    /// Deletes at most `limit` tasks (with their attempts) finished before `before_ms`.
    async fn purge_finished_tasks(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError>;
    /// Pull attempts waiting in agents' queues, kernel-wide.
    async fn pull_queue_depth(&self) -> Result<u64, StoreError>;
}

/// A response kept under an idempotency key and replayed to retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotentResponse {
    /// The HTTP status.
    pub status: u16,
    /// The headers replayed with it, as (lower-case name, value).
    pub headers: Vec<(String, String)>,
    /// The body, byte for byte.
    pub body: Vec<u8>,
}

/// The record of one idempotency key ([`IdempotencyStore`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The fingerprint of the request that claimed the key (method, path, body digest).
    pub fingerprint: Vec<u8>,
    /// The execution that owns the key while it is in flight.
    pub token: Uuid,
    /// While in flight: after this time (ms since the Unix epoch) the owner is presumed dead.
    pub locked_until_ms: i64,
    /// When the record is forgotten (ms since the Unix epoch).
    pub expires_at_ms: i64,
    /// The response, once the request finished; `None` while it is in flight.
    pub response: Option<IdempotentResponse>,
}

/// A request to claim an idempotency key for one execution.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyClaim<'a> {
    /// Who asks: the authenticated caller and the tenant it acts in.
    pub scope: &'a str,
    /// The client's key.
    pub key: &'a str,
    /// The fingerprint of the request.
    pub fingerprint: &'a [u8],
    /// A fresh id of this execution.
    pub token: Uuid,
    /// Now (ms since the Unix epoch, the same time base on every replica).
    pub now_ms: i64,
    /// Until when the claim holds without completion.
    pub locked_until_ms: i64,
    /// When the record expires.
    pub expires_at_ms: i64,
}

/// The answer to [`IdempotencyStore::idempotency_claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The key is this execution's: run the request.
    Claimed,
    /// Another execution holds the key (in flight or complete); its record.
    Existing(IdempotencyRecord),
}

/// Idempotency keys shared by every kernel on one database: inserting a key's row is its lock.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `(scope, key)` for `claim.token` in one atomic statement: a new key is inserted in
    /// flight; an expired record, or one whose owner's lock ran out while in flight with the
    /// same fingerprint, is taken over; otherwise the existing record is returned unchanged.
    async fn idempotency_claim(&self, claim: &IdempotencyClaim<'_>) -> Result<ClaimOutcome, StoreError>;
    /// Stores the response of the execution `token`; false when the key is no longer its own
    /// (taken over or deleted), and nothing is written then.
    async fn idempotency_complete(
        &self,
        scope: &str,
        key: &str,
        token: Uuid,
        response: &IdempotentResponse,
    ) -> Result<bool, StoreError>;
    /// Deletes the in-flight record of the execution `token` (its response is not kept, so a
    /// retry runs again); false when it was not its own.
    async fn idempotency_release(&self, scope: &str, key: &str, token: Uuid) -> Result<bool, StoreError>;
    /// Deletes at most `limit` records expired at `now_ms` (never one still locked in flight);
    /// returns how many.
    async fn idempotency_purge_expired(&self, now_ms: i64, limit: u32) -> Result<u64, StoreError>;
}

/// Everything the kernel stores.
pub trait Store:
    AgentStore + KeyStore + PluginKv + PluginStore + StoreHealth + RateLimitStore + TaskStore + IdempotencyStore
{
}

impl<T: AgentStore + KeyStore + PluginKv + PluginStore + StoreHealth + RateLimitStore + TaskStore + IdempotencyStore>
    Store for T
{
}
