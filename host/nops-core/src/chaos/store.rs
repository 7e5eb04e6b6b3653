//! [`ChaosStore`]: the store with chaos toggles applied to every call.
//!
//! A decorator over any store: each call first asks [`Chaos::inject_for`] with target
//! [`ChaosTarget::Store`] (the call's tenant when it names one, else only kernel-wide toggles
//! apply), then either fails (`error`: the dependency answered with an error; `drop`: it never
//! answered, reported as a timeout) or runs the real call. With no toggle on, the cost is one
//! `ArcSwap` load per call.
//!
//! Two calls are never injected: `find_api_key` and `touch_api_keys`, the authentication path.
//! Failing them would lock the operator out of the API that turns the toggle off.
//!
//! Effects commits also apply target [`ChaosTarget::Bus`] to the events a plugin publishes
//! (the outbox is where publications go until the event bus exists): `error` fails the whole
//! commit, `drop` commits the storage writes and silently loses the events.
//!
//! Written out with a `macro_rules!` rather than a delegation crate: each method needs its own
//! tenant expression and the injection step before delegating, which general delegation
//! crates do not offer; the macro keeps one line per method, so a new store method is one line.

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use super::{Chaos, ChaosTarget, Injected};
use crate::agent::{Agent, AgentEvent, AgentId};
use crate::auth::ApiKeyRecord;
use crate::degraded::DegradedModes;
use crate::dispatch::{
    AttemptRecord, AttemptReport, PulledAttempt, RecordedEnd, StartVerdict, TaskRecord, TaskStatus, Verdict,
};
use crate::plugin::{ChainEntry, PluginChange, PluginState, PluginVersion, ShadowDiff};
use crate::store::{
    AgentFilter, AgentLiveSeed, AgentStore, GcraOutcome, HeartbeatRecord, KeyStore, OutboxEvent, PluginCommit,
    PluginEffects, PluginKv, PluginStore, PoolStats, RateLimitStore, StatusChange, StoreError, StoreHealth, TaskStore,
};
use crate::store::{ClaimOutcome, IdempotencyClaim, IdempotencyStore, IdempotentResponse};
use crate::tenant::TenantId;

/// A store whose calls go through the chaos toggles first, and fail fast while the store is
/// known to be down (degraded mode), instead of each waiting out connection timeouts.
#[derive(Debug, Clone)]
pub struct ChaosStore<S> {
    inner: S,
    chaos: Arc<Chaos>,
    degraded: Option<Arc<DegradedModes>>,
}

impl<S> ChaosStore<S> {
    /// Decorates `inner` with `chaos`.
    pub fn new(inner: S, chaos: Arc<Chaos>) -> Self {
        Self { inner, chaos, degraded: None }
    }

    /// Fails every call at once (`503 store_unavailable` at the edge) while `degraded` says
    /// the store is down; its own probe, on the undecorated store, ends that.
    #[must_use]
    pub fn with_degraded(mut self, degraded: Arc<DegradedModes>) -> Self {
        self.degraded = Some(degraded);
        self
    }

    fn gate(&self) -> Result<(), StoreError> {
        match &self.degraded {
            Some(degraded) if degraded.fail_fast() => {
                Err(StoreError::Backend("the store is unavailable (degraded mode): failing fast".into()))
            }
            _ => Ok(()),
        }
    }

    /// The undecorated store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    async fn fault(&self, target: ChaosTarget, tenant: Option<&TenantId>) -> Result<(), StoreError> {
        self.gate()?;
        match self.chaos.inject_for(target, tenant).await {
            None => Ok(()),
            Some(fault) => Err(injected_error(target, fault)),
        }
    }
}

/// The store error an injected fault becomes.
pub fn injected_error(target: ChaosTarget, fault: Injected) -> StoreError {
    match fault {
        Injected::Error => StoreError::Backend(format!("{} error injected by a chaos toggle", target.as_str())),
        Injected::Drop => {
            StoreError::Backend(format!("{} call dropped by a chaos toggle: no answer (timeout)", target.as_str()))
        }
    }
}

/// Implements `$trait` for `ChaosStore<S>`: each method injects (with the tenant expression in
/// brackets, `[None]` for calls that name no tenant) and then delegates.
macro_rules! chaos_delegate {
    ($trait:ident { $( fn $name:ident(&self $(, $arg:ident : $ty:ty)* ) -> $ret:ty [$tenant:expr]; )* }) => {
        #[async_trait]
        impl<S: $trait> $trait for ChaosStore<S> {
            $(
                async fn $name(&self $(, $arg: $ty)*) -> Result<$ret, StoreError> {
                    self.fault(ChaosTarget::Store, $tenant).await?;
                    self.inner.$name($($arg),*).await
                }
            )*
        }
    };
}

chaos_delegate!(AgentStore {
    fn insert_agent(&self, agent: &Agent, event: &AgentEvent) -> () [Some(&agent.tenant)];
    fn get_agent(&self, tenant: &TenantId, id: AgentId) -> Option<Agent> [Some(tenant)];
    fn get_live_seed(&self, id: AgentId) -> Option<AgentLiveSeed> [None];
    fn load_live_seeds(&self) -> Vec<AgentLiveSeed> [None];
    fn update_agent(&self, agent: &Agent, expected_revision: i64, event: &AgentEvent) -> bool [Some(&agent.tenant)];
    fn delete_agent(&self, tenant: &TenantId, id: AgentId, event: &AgentEvent) -> bool [Some(tenant)];
    fn list_agents(&self, filter: &AgentFilter, limit: u32) -> Vec<Agent> [filter.tenant.as_ref()];
    fn list_capability_versions(&self, filter: &AgentFilter, limit: u32) -> Vec<(AgentId, String)> [filter.tenant.as_ref()];
    fn get_agents(&self, tenant: &TenantId, ids: &[AgentId]) -> Vec<Agent> [Some(tenant)];
    fn write_heartbeats(&self, batch: &[HeartbeatRecord]) -> u64 [None];
    fn apply_status_changes(&self, changes: &[StatusChange]) -> Vec<AgentEvent> [None];
    fn list_agent_events(&self, tenant: &TenantId, agent: Option<AgentId>, after_seq: i64, limit: u32) -> Vec<AgentEvent> [Some(tenant)];
    fn agent_events_head(&self) -> i64 [None];
    fn list_agent_changes(&self, after_seq: i64, limit: u32) -> Vec<AgentEvent> [None];
});

#[async_trait]
impl<S: KeyStore> KeyStore for ChaosStore<S> {
    async fn api_key_count(&self) -> Result<u64, StoreError> {
        self.fault(ChaosTarget::Store, None).await?;
        self.inner.api_key_count().await
    }
    async fn insert_bootstrap_key(&self, record: &ApiKeyRecord) -> Result<bool, StoreError> {
        self.fault(ChaosTarget::Store, None).await?;
        self.inner.insert_bootstrap_key(record).await
    }
    /// Not injected: the authentication path (see the module documentation).
    async fn find_api_key(&self, hash: &[u8]) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.gate()?;
        self.inner.find_api_key(hash).await
    }
    async fn get_api_key(&self, id: Uuid) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.fault(ChaosTarget::Store, None).await?;
        self.inner.get_api_key(id).await
    }
    async fn list_api_keys(
        &self,
        tenant: Option<&TenantId>,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.fault(ChaosTarget::Store, tenant).await?;
        self.inner.list_api_keys(tenant, after, limit).await
    }
    async fn insert_api_key(
        &self,
        record: &ApiKeyRecord,
        event: &OutboxEvent,
        keys_max: u32,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.fault(ChaosTarget::Store, record.tenant.as_ref()).await?;
        self.inner.insert_api_key(record, event, keys_max, now_ms).await
    }
    async fn rotate_api_key(
        &self,
        old: Uuid,
        old_expires_at_ms: i64,
        next: &ApiKeyRecord,
        event: &OutboxEvent,
    ) -> Result<(), StoreError> {
        self.fault(ChaosTarget::Store, next.tenant.as_ref()).await?;
        self.inner.rotate_api_key(old, old_expires_at_ms, next, event).await
    }
    async fn revoke_api_key(&self, id: Uuid, at_ms: i64, event: &OutboxEvent) -> Result<bool, StoreError> {
        self.fault(ChaosTarget::Store, Some(&event.tenant)).await?;
        self.inner.revoke_api_key(id, at_ms, event).await
    }
    async fn live_api_key_count(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.fault(ChaosTarget::Store, None).await?;
        self.inner.live_api_key_count(now_ms).await
    }
    /// Not injected: the authentication path (see the module documentation).
    async fn touch_api_keys(&self, used: &[(Uuid, i64)]) -> Result<(), StoreError> {
        self.gate()?;
        self.inner.touch_api_keys(used).await
    }
}

chaos_delegate!(PluginKv {
    fn kv_get(&self, namespace: &str, key: &str) -> Option<Vec<u8>> [None];
    fn kv_set(&self, namespace: &str, key: &str, value: &[u8], keys_max: u32, now_ms: i64) -> () [None];
    fn kv_delete(&self, namespace: &str, key: &str) -> bool [None];
    fn kv_list(&self, namespace: &str, prefix: &str, limit: u32) -> Vec<String> [None];
});

chaos_delegate!(PluginStore {
    fn put_plugin_blob(&self, digest: &str, bytes: &[u8]) -> () [None];
    fn get_plugin_blob(&self, digest: &str) -> Option<Vec<u8>> [None];
    fn apply_plugin_change(&self, change: &PluginChange) -> () [Some(&change.entry.tenant)];
    fn list_plugin_states(&self, tenant: Option<&TenantId>) -> Vec<PluginState> [tenant];
    fn get_plugin_state(&self, tenant: &TenantId, name: &str) -> Option<PluginState> [Some(tenant)];
    fn list_plugin_versions(&self, tenant: &TenantId, name: &str) -> Vec<PluginVersion> [Some(tenant)];
    fn plugin_chain(&self, tenant: &TenantId, name: &str) -> Vec<ChainEntry> [Some(tenant)];
    fn list_plugin_chains(&self) -> Vec<(TenantId, String)> [None];
    fn plugin_generation(&self) -> i64 [None];
    fn insert_shadow_diff(&self, diff: &ShadowDiff, keep_max: u32) -> () [Some(&diff.tenant)];
    fn list_shadow_diffs(&self, tenant: &TenantId, name: &str, limit: u32) -> Vec<ShadowDiff> [Some(tenant)];
});

chaos_delegate!(TaskStore {
    fn insert_task(&self, task: &TaskRecord, active_max: u32) -> () [Some(&task.tenant)];
    fn get_task(&self, tenant: Option<&TenantId>, id: Uuid) -> Option<TaskRecord> [tenant];
    fn list_tasks(&self, tenant: &TenantId, status: Option<TaskStatus>, after: Option<Uuid>, limit: u32) -> Vec<TaskRecord> [Some(tenant)];
    fn get_task_with_attempts(&self, tenant: Option<&TenantId>, id: Uuid) -> Option<(TaskRecord, Vec<AttemptRecord>)> [tenant];
    fn get_attempt(&self, task: Uuid, attempt: u32) -> Option<AttemptRecord> [None];
    fn start_attempt(&self, attempt: &AttemptRecord, owner: &str, lease_until_ms: i64, queue_depth_max: u32) -> StartVerdict [Some(&attempt.tenant)];
    fn insert_task_started(&self, task: &TaskRecord, attempt: &AttemptRecord, active_max: u32, queue_depth_max: u32) -> StartVerdict [Some(&task.tenant)];
    fn finish_attempt(&self, report: &AttemptReport) -> Verdict [Some(&report.tenant)];
    fn finish_attempt_recorded(&self, report: &AttemptReport) -> (Verdict, Option<Box<RecordedEnd>>) [Some(&report.tenant)];
    fn fail_task(&self, id: Uuid, owner: &str, error: &str, at_ms: i64) -> bool [None];
    fn claim_next_pull(&self, tenant: &TenantId, agent: AgentId, now_ms: i64) -> Option<PulledAttempt> [Some(tenant)];
    fn renew_task_leases(&self, owner: &str, lease_until_ms: i64) -> u64 [None];
    fn claim_orphaned_tasks(&self, owner: &str, now_ms: i64, lease_until_ms: i64, limit: u32) -> Vec<Uuid> [None];
    fn purge_finished_tasks(&self, before_ms: i64, limit: u32) -> u64 [None];
    fn pull_queue_depth(&self) -> u64 [None];
});

chaos_delegate!(RateLimitStore {
    fn gcra_check(&self, key: &str, emission_interval_ms: i64, burst: u32, now_ms: i64) -> GcraOutcome [None];
    fn gcra_purge_expired(&self, now_ms: i64) -> u64 [None];
});

chaos_delegate!(IdempotencyStore {
    fn idempotency_claim(&self, claim: &IdempotencyClaim<'_>) -> ClaimOutcome [None];
    fn idempotency_complete(&self, scope: &str, key: &str, token: Uuid, response: &IdempotentResponse) -> bool [None];
    fn idempotency_release(&self, scope: &str, key: &str, token: Uuid) -> bool [None];
    fn idempotency_purge_expired(&self, now_ms: i64, limit: u32) -> u64 [None];
});

#[async_trait]
impl<S: StoreHealth> StoreHealth for ChaosStore<S> {
    async fn ping(&self) -> Result<(), StoreError> {
        self.fault(ChaosTarget::Store, None).await?;
        self.inner.ping().await
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn pool_stats(&self) -> PoolStats {
        self.inner.pool_stats()
    }
}

#[async_trait]
impl<S: PluginCommit> PluginCommit for ChaosStore<S> {
    async fn commit_plugin_effects(
        &self,
        namespace: &str,
        effects: &PluginEffects,
        keys_max: u32,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let tenant = effects.events.first().map(|e| &e.tenant);
        self.fault(ChaosTarget::Store, tenant).await?;
        if let Some(tenant) = tenant {
            match self.chaos.inject_for(ChaosTarget::Bus, Some(tenant)).await {
                None => {}
                Some(Injected::Error) => return Err(injected_error(ChaosTarget::Bus, Injected::Error)),
                Some(Injected::Drop) => {
                    // The publications are lost on the way; the rest of the call's effects stand.
                    let kept = PluginEffects { writes: effects.writes.clone(), events: Vec::new() };
                    if kept.is_empty() {
                        return Ok(());
                    }
                    return self.inner.commit_plugin_effects(namespace, &kept, keys_max, now_ms).await;
                }
            }
        }
        self.inner.commit_plugin_effects(namespace, effects, keys_max, now_ms).await
    }
}
