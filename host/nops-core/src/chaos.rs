//! Chaos toggles: faults an operator injects on purpose into dispatch, store, bus or plugin
//! calls, per tenant or kernel-wide. Off by default.
//!
//! A toggle names a target, a tenant (or the whole kernel) and its faults: added latency (with
//! optional jitter), a share of calls that fail (`error_ratio`) and a share that are dropped
//! (`drop_ratio`). Every toggle ends on its own (`expires_at_ms`, by default
//! [`ChaosConfig::duration_ms_default`] after its creation), so a forgotten one cannot outlive
//! the experiment.
//!
//! The set of toggles is one immutable snapshot behind an [`ArcSwap`]: an injection point
//! loads it once (no lock, no allocation) and, when it is empty, returns at once. Changes are
//! serialised by one async lock, audited (one JSON record on the `nops::audit` target) and
//! written to the outbox as `nops.chaos.created|deleted|expired`.
//!
//! Toggles live in the memory of one kernel process: they are not shared by replicas (an
//! operator sets them on each replica's address).

pub mod store;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::Rng;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::{Principal, Role};
use crate::clock::Clock;
use crate::degraded::{Criticality, DegradedModes, SpooledEvent, WriteClass};
use crate::metrics::Metrics;
use crate::store::{OutboxEvent, PluginCommit, PluginEffects};
use crate::tenant::TenantId;
use crate::{CoreError, CoreResult};

/// Most toggles on at once, by default.
pub const TOGGLES_MAX_DEFAULT: usize = 64;
/// How long a toggle lasts when its creator names no end, in ms (10 minutes).
pub const DURATION_MS_DEFAULT: u64 = 10 * 60 * 1000;
/// Longest a toggle may last, by default, in ms (24 hours).
pub const DURATION_MS_MAX_DEFAULT: u64 = 24 * 60 * 60 * 1000;
/// Largest latency (and jitter) one toggle may add, in ms.
pub const LATENCY_MS_MAX: u64 = 60_000;
/// How often the background task ends expired toggles (their effect ends on time anyway).
pub const EXPIRY_INTERVAL_MS: u64 = 1_000;
/// Longest note a toggle carries, in bytes.
pub const NOTE_BYTES_MAX: usize = 256;
/// The tenant label of a kernel-wide toggle in metrics.
pub const KERNEL_WIDE_LABEL: &str = "*";

/// Where a fault is injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChaosTarget {
    /// Task attempts sent to agents.
    Dispatch,
    /// Calls to the kernel's store.
    Store,
    /// Publications to the event bus.
    Bus,
    /// Calls into plugins.
    Plugin,
}

impl ChaosTarget {
    /// The target as written in the API and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dispatch => "dispatch",
            Self::Store => "store",
            Self::Bus => "bus",
            Self::Plugin => "plugin",
        }
    }
}

/// The fault an injection point must apply, decided by [`Chaos::inject`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// Fail the operation as if the dependency answered with an error.
    Error,
    /// Drop the operation: it is never delivered and its caller hears nothing (a timeout).
    Drop,
}

impl Injected {
    /// The fault as written in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Drop => "drop",
        }
    }
}

/// Limits of the chaos service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChaosConfig {
    /// Most toggles on at once.
    pub toggles_max: usize,
    /// How long a toggle lasts when its creator names no end, in ms.
    pub duration_ms_default: u64,
    /// Longest a toggle may last, in ms.
    pub duration_ms_max: u64,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        Self {
            toggles_max: TOGGLES_MAX_DEFAULT,
            duration_ms_default: DURATION_MS_DEFAULT,
            duration_ms_max: DURATION_MS_MAX_DEFAULT,
        }
    }
}

impl ChaosConfig {
    /// Checks the limits: each at least 1, the default duration within the longest.
    pub fn validate(&self) -> Result<(), String> {
        if self.toggles_max == 0 || self.duration_ms_default == 0 || self.duration_ms_max == 0 {
            return Err("toggles_max, duration_ms_default and duration_ms_max must be at least 1".into());
        }
        if self.duration_ms_default > self.duration_ms_max {
            return Err("duration_ms_default must not exceed duration_ms_max".into());
        }
        Ok(())
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A toggle to create (`POST /api/v1/admin/chaos`). It applies to the tenant the request acts
/// in, or with `kernel_wide` to every tenant (kernel-wide admins only).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToggle {
    /// Where to inject.
    pub target: ChaosTarget,
    /// Apply to every tenant (and to calls that belong to none), not only the request's.
    #[serde(default)]
    pub kernel_wide: bool,
    /// Latency added to each matching call, in ms (at most 60000).
    #[serde(default)]
    pub latency_ms: u64,
    /// Up to this much more latency, uniformly at random, in ms (at most 60000).
    #[serde(default)]
    pub jitter_ms: u64,
    /// Share of matching calls that fail, 0 to 1.
    #[serde(default)]
    pub error_ratio: f64,
    /// Share of matching calls that are dropped (their caller hears nothing), 0 to 1.
    #[serde(default)]
    pub drop_ratio: f64,
    /// How long the toggle stays on, in ms (default 10 minutes; at most the configured
    /// `duration_ms_max`, 24 hours by default).
    pub duration_ms: Option<u64>,
    /// When the toggle ends (ms since the Unix epoch), instead of `duration_ms`.
    pub expires_at_ms: Option<i64>,
    /// Why: shown in the list and the audit record.
    pub note: Option<String>,
}

impl NewToggle {
    /// A toggle on `target` for the request's tenant with no fault yet: set at least one.
    pub fn on(target: ChaosTarget) -> Self {
        Self {
            target,
            kernel_wide: false,
            latency_ms: 0,
            jitter_ms: 0,
            error_ratio: 0.0,
            drop_ratio: 0.0,
            duration_ms: None,
            expires_at_ms: None,
            note: None,
        }
    }
}

/// A toggle that is on.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Toggle {
    /// Its id.
    #[schema(value_type = String, format = Uuid)]
    pub id: Uuid,
    /// Where it injects.
    pub target: ChaosTarget,
    /// The tenant it applies to; absent for a kernel-wide toggle.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub tenant: Option<TenantId>,
    /// Latency added to each matching call, in ms.
    #[serde(skip_serializing_if = "is_zero")]
    pub latency_ms: u64,
    /// Up to this much more latency, in ms.
    #[serde(skip_serializing_if = "is_zero")]
    pub jitter_ms: u64,
    /// Share of matching calls that fail.
    pub error_ratio: f64,
    /// Share of matching calls that are dropped.
    pub drop_ratio: f64,
    /// Creation (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// When it ends on its own (ms since the Unix epoch).
    pub expires_at_ms: i64,
    /// Who created it: the credential (key id or `issuer#subject`), never a secret.
    pub created_by: String,
    /// Why it was created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Toggle {
    fn applies(&self, target: ChaosTarget, tenant: Option<&TenantId>, now_ms: i64) -> bool {
        self.target == target
            && self.expires_at_ms > now_ms
            && match &self.tenant {
                None => true,
                Some(own) => tenant == Some(own),
            }
    }

    /// The faults it injects, as metric labels.
    fn faults(&self) -> impl Iterator<Item = &'static str> {
        [
            (self.latency_ms > 0 || self.jitter_ms > 0, "latency"),
            (self.error_ratio > 0.0, "error"),
            (self.drop_ratio > 0.0, "drop"),
        ]
        .into_iter()
        .filter_map(|(on, label)| on.then_some(label))
    }

    fn tenant_label(&self) -> &str {
        self.tenant.as_ref().map_or(KERNEL_WIDE_LABEL, TenantId::as_str)
    }
}

/// Which toggles a request sees and may delete: those of its tenant and, for a kernel-wide
/// principal, every toggle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChaosScope {
    /// The tenant the request acts in.
    pub tenant: TenantId,
    /// The caller is kernel-wide: it sees and changes every toggle.
    pub kernel_wide: bool,
}

impl ChaosScope {
    /// The toggles `principal` sees when acting in `tenant`.
    pub fn of(principal: &Principal, tenant: &TenantId) -> Self {
        Self { tenant: tenant.clone(), kernel_wide: principal.tenant.is_none() }
    }

    fn holds(&self, toggle: &Toggle) -> bool {
        self.kernel_wide || toggle.tenant.as_ref() == Some(&self.tenant)
    }
}

/// Metric label set of one toggle fault: target, tenant, fault.
type Labels = (&'static str, String, &'static str);

/// The chaos toggles of one kernel.
pub struct Chaos {
    /// The toggles on now; replaced whole on every change.
    active: ArcSwap<Vec<Arc<Toggle>>>,
    /// Serialises changes; holds the label sets of `nops_chaos_toggle` now exported.
    changes: tokio::sync::Mutex<BTreeSet<Labels>>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    /// Where change events are written (the undecorated store: chaos never hits its own
    /// audit trail).
    outbox: Option<Arc<dyn PluginCommit>>,
    /// Where change events wait while the store is down.
    degraded: std::sync::OnceLock<Arc<DegradedModes>>,
    config: ChaosConfig,
}

impl std::fmt::Debug for Chaos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chaos").field("toggles", &self.active.load().len()).field("config", &self.config).finish()
    }
}

impl Default for Chaos {
    fn default() -> Self {
        Self::new()
    }
}

impl Chaos {
    /// No toggles on, the system clock, metrics of its own and no outbox: for tests of the
    /// injection points. The kernel uses [`Chaos::with`].
    pub fn new() -> Self {
        Self::with(Arc::new(crate::clock::SystemClock), Metrics::new(), None, ChaosConfig::default())
    }

    /// No toggles on; time from `clock`, change events written through `outbox`.
    pub fn with(
        clock: Arc<dyn Clock>,
        metrics: Metrics,
        outbox: Option<Arc<dyn PluginCommit>>,
        config: ChaosConfig,
    ) -> Self {
        Self {
            active: ArcSwap::from_pointee(Vec::new()),
            changes: tokio::sync::Mutex::new(BTreeSet::new()),
            clock,
            metrics,
            outbox,
            degraded: std::sync::OnceLock::new(),
            config,
        }
    }

    /// Spools change events that cannot be written while the store is down (set once, at
    /// wiring).
    pub fn set_degraded(&self, degraded: Arc<DegradedModes>) {
        let _ = self.degraded.set(degraded);
    }

    /// The limits in force.
    pub fn config(&self) -> &ChaosConfig {
        &self.config
    }

    /// True when at least one toggle is on (expired ones included until they are swept).
    pub fn any_on(&self) -> bool {
        !self.active.load().is_empty()
    }

    /// Applies the toggles that match `target` and `tenant`: sleeps for injected latency,
    /// then says whether the operation must fail or be dropped (`None`: carry on).
    pub async fn inject(&self, target: ChaosTarget, tenant: &TenantId) -> Option<Injected> {
        self.inject_for(target, Some(tenant)).await
    }

    /// [`Chaos::inject`] for a call that may belong to no tenant (`None`): then only
    /// kernel-wide toggles apply.
    pub async fn inject_for(&self, target: ChaosTarget, tenant: Option<&TenantId>) -> Option<Injected> {
        let (latency_ms, outcome) = {
            let toggles = self.active.load();
            if toggles.is_empty() {
                return None;
            }
            self.decide(&toggles, target, tenant)
        };
        if latency_ms > 0 {
            self.metrics.chaos_injections_total.with_label_values(&[target.as_str(), "latency"]).inc();
            tokio::time::sleep(Duration::from_millis(latency_ms)).await;
        }
        if let Some(fault) = outcome {
            self.metrics.chaos_injections_total.with_label_values(&[target.as_str(), fault.as_str()]).inc();
        }
        outcome
    }

    /// The latency to add and the fault to apply, from the toggles that match. Latencies of
    /// several matching toggles add up; the first fault drawn wins.
    fn decide(
        &self,
        toggles: &[Arc<Toggle>],
        target: ChaosTarget,
        tenant: Option<&TenantId>,
    ) -> (u64, Option<Injected>) {
        let now_ms = self.clock.now_ms();
        let mut rng = rand::rng();
        let mut latency_ms = 0u64;
        let mut outcome = None;
        for toggle in toggles.iter().filter(|t| t.applies(target, tenant, now_ms)) {
            let jitter = if toggle.jitter_ms > 0 { rng.random_range(0..=toggle.jitter_ms) } else { 0 };
            latency_ms = latency_ms.saturating_add(toggle.latency_ms).saturating_add(jitter);
            if outcome.is_none() {
                if toggle.error_ratio > 0.0 && rng.random_bool(toggle.error_ratio.clamp(0.0, 1.0)) {
                    outcome = Some(Injected::Error);
                } else if toggle.drop_ratio > 0.0 && rng.random_bool(toggle.drop_ratio.clamp(0.0, 1.0)) {
                    outcome = Some(Injected::Drop);
                }
            }
        }
        (latency_ms, outcome)
    }

    /// The toggles on in `scope`, oldest first. Ends expired toggles first.
    pub async fn list(&self, scope: &ChaosScope) -> Vec<Toggle> {
        self.expire_due().await;
        self.active.load().iter().filter(|t| scope.holds(t)).map(|t| Toggle::clone(t)).collect()
    }

    /// Turns a toggle on for `actor`, in `tenant` (or kernel-wide).
    pub async fn create(&self, actor: &Principal, tenant: &TenantId, new: NewToggle) -> CoreResult<Toggle> {
        if actor.role != Role::Admin {
            return Err(CoreError::Forbidden);
        }
        if new.kernel_wide && actor.tenant.is_some() {
            return Err(CoreError::Forbidden);
        }
        let now_ms = self.clock.now_ms();
        let expires_at_ms = self.validate(&new, now_ms)?;
        self.expire_due().await;
        let mut labels = self.changes.lock().await;
        let current = self.active.load_full();
        if current.len() >= self.config.toggles_max {
            return Err(CoreError::LimitExceeded {
                message: format!("at most {} chaos toggles may be on at once (toggles_max)", self.config.toggles_max)
                    .into(),
            });
        }
        let toggle = Toggle {
            id: Uuid::now_v7(),
            target: new.target,
            tenant: (!new.kernel_wide).then(|| tenant.clone()),
            latency_ms: new.latency_ms,
            jitter_ms: new.jitter_ms,
            error_ratio: new.error_ratio,
            drop_ratio: new.drop_ratio,
            created_at_ms: now_ms,
            expires_at_ms,
            created_by: actor.credential.to_string(),
            note: new.note,
        };
        // The event is written before the toggle goes on: a toggle is never on unrecorded.
        self.write_event("created", &toggle, Some(actor), now_ms).await.map_err(CoreError::Store)?;
        let mut next: Vec<Arc<Toggle>> = current.iter().cloned().collect();
        next.push(Arc::new(toggle.clone()));
        self.publish(next, &mut labels);
        drop(labels);
        self.audit("created", &toggle, Some(actor));
        Ok(toggle)
    }

    /// Turns toggle `id` off. Toggles outside `scope` are not found.
    pub async fn delete(&self, actor: &Principal, scope: &ChaosScope, id: Uuid) -> CoreResult<Toggle> {
        if actor.role != Role::Admin {
            return Err(CoreError::Forbidden);
        }
        self.expire_due().await;
        let removed = self.remove(|t| t.id == id && scope.holds(t)).await;
        let toggle = removed.into_iter().next().ok_or(CoreError::NotFound { what: "chaos toggle" })?;
        self.after_removal("deleted", &toggle, Some(actor)).await;
        Ok(Toggle::clone(&toggle))
    }

    /// Turns off every toggle in `scope`; returns those turned off.
    pub async fn clear(&self, actor: &Principal, scope: &ChaosScope) -> CoreResult<Vec<Toggle>> {
        if actor.role != Role::Admin {
            return Err(CoreError::Forbidden);
        }
        self.expire_due().await;
        let removed = self.remove(|t| scope.holds(t)).await;
        for toggle in &removed {
            self.after_removal("deleted", toggle, Some(actor)).await;
        }
        Ok(removed.iter().map(|t| Toggle::clone(t)).collect())
    }

    /// Ends the toggles whose time is up; returns how many. The background task calls it every
    /// [`EXPIRY_INTERVAL_MS`]; every list and change calls it too.
    pub async fn expire_due(&self) -> usize {
        let now_ms = self.clock.now_ms();
        if !self.active.load().iter().any(|t| t.expires_at_ms <= now_ms) {
            return 0;
        }
        let removed = self.remove(|t| t.expires_at_ms <= now_ms).await;
        for toggle in &removed {
            self.after_removal("expired", toggle, None).await;
        }
        removed.len()
    }

    /// Ends expired toggles every [`EXPIRY_INTERVAL_MS`], forever.
    pub async fn run_expiry(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(EXPIRY_INTERVAL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.expire_due().await;
        }
    }

    /// Removes the toggles matching `which` and publishes the rest.
    async fn remove(&self, which: impl Fn(&Toggle) -> bool) -> Vec<Arc<Toggle>> {
        let mut labels = self.changes.lock().await;
        let current = self.active.load_full();
        let (removed, kept): (Vec<Arc<Toggle>>, Vec<Arc<Toggle>>) = current.iter().cloned().partition(|t| which(t));
        if !removed.is_empty() {
            self.publish(kept, &mut labels);
        }
        removed
    }

    /// Installs `toggles` as the new snapshot and brings `nops_chaos_toggle` in line with it.
    fn publish(&self, toggles: Vec<Arc<Toggle>>, labels: &mut BTreeSet<Labels>) {
        let next: BTreeSet<Labels> = toggles
            .iter()
            .flat_map(|t| t.faults().map(|f| (t.target.as_str(), t.tenant_label().to_owned(), f)))
            .collect();
        self.active.store(Arc::new(toggles));
        let gauge = &self.metrics.chaos_toggle;
        for gone in labels.difference(&next) {
            let _ = gauge.remove_label_values(&[gone.0, &gone.1, gone.2]);
        }
        for on in &next {
            gauge.with_label_values(&[on.0, &on.1, on.2]).set(1);
        }
        *labels = next;
    }

    async fn after_removal(&self, kind: &'static str, toggle: &Toggle, actor: Option<&Principal>) {
        // A toggle always goes off, even when its event cannot be written (the store may be
        // the very thing that is down); the audit record is written regardless.
        let at_ms = self.clock.now_ms();
        let written = if self.degraded.get().is_some_and(|d| d.fail_fast()) {
            // The store is known to be down: don't wait out its timeouts.
            Err(crate::store::StoreError::Backend("the store is unavailable (degraded mode)".into()))
        } else {
            self.write_event(kind, toggle, actor, at_ms).await
        };
        if let Err(err) = written {
            // An audit event is critical: keep it in the local spool until the store returns.
            let spooled = match self.degraded.get() {
                Some(degraded) if degraded.criticality(WriteClass::AuditEvent) == Criticality::Critical => {
                    let event = SpooledEvent {
                        tenant: toggle.tenant.clone().unwrap_or_else(TenantId::default_tenant),
                        subject: format!("nops.chaos.{kind}"),
                        payload: Self::payload(kind, toggle, actor, at_ms),
                        source: "kernel/chaos".into(),
                    };
                    let body = serde_json::to_value(&event).unwrap_or_default();
                    degraded.spool(WriteClass::AuditEvent, format!("chaos/{}/{kind}", toggle.id), body).await.is_ok()
                }
                _ => false,
            };
            if !spooled {
                tracing::warn!(error = %err, toggle = %toggle.id, "writing the chaos {kind} event to the outbox failed");
            }
        }
        self.audit(kind, toggle, actor);
    }

    fn validate(&self, new: &NewToggle, now_ms: i64) -> CoreResult<i64> {
        for (name, ratio) in [("error_ratio", new.error_ratio), ("drop_ratio", new.drop_ratio)] {
            if !ratio.is_finite() || !(0.0..=1.0).contains(&ratio) {
                return Err(CoreError::invalid("invalid_ratio", format!("{name} must be between 0 and 1")));
            }
        }
        if new.error_ratio + new.drop_ratio > 1.0 {
            return Err(CoreError::invalid("invalid_ratio", "error_ratio + drop_ratio must not exceed 1"));
        }
        for (name, ms) in [("latency_ms", new.latency_ms), ("jitter_ms", new.jitter_ms)] {
            if ms > LATENCY_MS_MAX {
                return Err(CoreError::invalid("invalid_latency", format!("{name} must be at most {LATENCY_MS_MAX}")));
            }
        }
        if new.latency_ms == 0 && new.jitter_ms == 0 && new.error_ratio == 0.0 && new.drop_ratio == 0.0 {
            return Err(CoreError::invalid(
                "no_fault",
                "a toggle needs at least one fault: latency_ms, jitter_ms, error_ratio or drop_ratio",
            ));
        }
        if let Some(note) = &new.note
            && (note.len() > NOTE_BYTES_MAX || note.chars().any(char::is_control))
        {
            return Err(CoreError::invalid(
                "invalid_note",
                format!("a note is at most {NOTE_BYTES_MAX} bytes without control characters"),
            ));
        }
        let max = self.config.duration_ms_max;
        let expires_at_ms = match (new.duration_ms, new.expires_at_ms) {
            (Some(_), Some(_)) => {
                return Err(CoreError::invalid("invalid_duration", "give duration_ms or expires_at_ms, not both"));
            }
            (Some(d), None) => {
                if d == 0 || d > max {
                    return Err(CoreError::invalid(
                        "invalid_duration",
                        format!("duration_ms must be between 1 and {max}"),
                    ));
                }
                now_ms.saturating_add(i64::try_from(d).unwrap_or(i64::MAX))
            }
            (None, Some(at)) => {
                let latest = now_ms.saturating_add(i64::try_from(max).unwrap_or(i64::MAX));
                if at <= now_ms || at > latest {
                    return Err(CoreError::invalid(
                        "invalid_duration",
                        format!("expires_at_ms must lie in the future, at most {max} ms from now"),
                    ));
                }
                at
            }
            (None, None) => now_ms.saturating_add(i64::try_from(self.config.duration_ms_default).unwrap_or(i64::MAX)),
        };
        Ok(expires_at_ms)
    }

    fn payload(kind: &str, toggle: &Toggle, actor: Option<&Principal>, at_ms: i64) -> serde_json::Value {
        serde_json::json!({
            "event": format!("chaos.{kind}"),
            "toggle": toggle,
            "actor": actor.map(|a| a.credential.as_ref()),
            "actor_method": actor.map(|a| a.method.as_str()),
            "at_ms": at_ms,
        })
    }

    async fn write_event(
        &self,
        kind: &str,
        toggle: &Toggle,
        actor: Option<&Principal>,
        at_ms: i64,
    ) -> Result<(), crate::store::StoreError> {
        let Some(outbox) = &self.outbox else { return Ok(()) };
        let event = OutboxEvent {
            tenant: toggle.tenant.clone().unwrap_or_else(TenantId::default_tenant),
            subject: format!("nops.chaos.{kind}"),
            payload: serde_json::to_vec(&Self::payload(kind, toggle, actor, at_ms)).unwrap_or_default(),
            source: "kernel/chaos".into(),
        };
        // The kernel's effects commit is its outbox writer: with no storage writes the
        // namespace is not touched, and the event is one row in one transaction.
        let effects = PluginEffects { writes: Vec::new(), events: vec![event] };
        outbox.commit_plugin_effects("kernel/chaos", &effects, 0, at_ms).await
    }

    fn audit(&self, kind: &'static str, toggle: &Toggle, actor: Option<&Principal>) {
        self.metrics.chaos_events_total.with_label_values(&[kind]).inc();
        tracing::info!(
            target: "nops::audit",
            event = format!("chaos.{kind}"),
            toggle_id = %toggle.id,
            chaos_target = toggle.target.as_str(),
            tenant = toggle.tenant_label(),
            latency_ms = toggle.latency_ms,
            jitter_ms = toggle.jitter_ms,
            error_ratio = toggle.error_ratio,
            drop_ratio = toggle.drop_ratio,
            expires_at_ms = toggle.expires_at_ms,
            actor = actor.map_or("kernel", |a| a.credential.as_ref()),
            actor_method = actor.map_or("expiry", |a| a.method.as_str()),
            note = toggle.note.as_deref().unwrap_or(""),
            "chaos toggle {kind}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthMethod;
    use crate::clock::ManualClock;

    fn kernel(clock: &ManualClock) -> Chaos {
        Chaos::with(Arc::new(clock.clone()), Metrics::new(), None, ChaosConfig { toggles_max: 2, ..Default::default() })
    }

    fn admin(tenant: Option<&str>) -> Principal {
        Principal::new("ops", tenant.map(|t| t.parse().expect("tenant")), Role::Admin, AuthMethod::ApiKey)
    }

    fn acme() -> TenantId {
        "acme".parse().expect("tenant")
    }

    #[tokio::test]
    async fn nothing_is_injected_by_default() {
        let chaos = Chaos::new();
        assert!(!chaos.any_on());
        for target in [ChaosTarget::Dispatch, ChaosTarget::Store, ChaosTarget::Bus, ChaosTarget::Plugin] {
            assert_eq!(chaos.inject(target, &acme()).await, None);
            assert_eq!(chaos.inject_for(target, None).await, None);
        }
    }

    #[tokio::test]
    async fn a_tenant_toggle_hits_its_tenant_and_target_only() {
        let clock = ManualClock::new(1_000);
        let chaos = kernel(&clock);
        let new = NewToggle { error_ratio: 1.0, ..NewToggle::on(ChaosTarget::Store) };
        chaos.create(&admin(None), &acme(), new).await.expect("created");
        assert_eq!(chaos.inject(ChaosTarget::Store, &acme()).await, Some(Injected::Error));
        assert_eq!(chaos.inject(ChaosTarget::Store, &TenantId::default_tenant()).await, None);
        assert_eq!(chaos.inject_for(ChaosTarget::Store, None).await, None, "tenantless calls see kernel-wide only");
        assert_eq!(chaos.inject(ChaosTarget::Plugin, &acme()).await, None);
        let text = chaos.metrics.chaos_toggle.with_label_values(&["store", "acme", "error"]).get();
        assert_eq!(text, 1);
    }

    #[tokio::test]
    async fn kernel_wide_toggles_need_a_kernel_wide_admin_and_hit_everyone() {
        let clock = ManualClock::new(1_000);
        let chaos = kernel(&clock);
        let new = NewToggle { kernel_wide: true, drop_ratio: 1.0, ..NewToggle::on(ChaosTarget::Bus) };
        let refused = chaos.create(&admin(Some("acme")), &acme(), new.clone()).await;
        assert!(matches!(refused, Err(CoreError::Forbidden)), "{refused:?}");
        chaos.create(&admin(None), &acme(), new).await.expect("created");
        assert_eq!(chaos.inject_for(ChaosTarget::Bus, None).await, Some(Injected::Drop));
        assert_eq!(chaos.inject(ChaosTarget::Bus, &TenantId::default_tenant()).await, Some(Injected::Drop));
        // A tenant admin neither sees nor clears it.
        let tenant_scope = ChaosScope::of(&admin(Some("acme")), &acme());
        assert!(chaos.list(&tenant_scope).await.is_empty());
        assert!(chaos.clear(&admin(Some("acme")), &tenant_scope).await.expect("clear").is_empty());
        assert!(chaos.any_on());
    }

    #[tokio::test]
    async fn bad_toggles_are_refused_and_change_nothing() {
        let clock = ManualClock::new(1_000);
        let chaos = kernel(&clock);
        let base = NewToggle { error_ratio: 0.5, ..NewToggle::on(ChaosTarget::Plugin) };
        for (bad, code) in [
            (NewToggle { error_ratio: 1.5, ..base.clone() }, "invalid_ratio"),
            (NewToggle { drop_ratio: -0.1, ..base.clone() }, "invalid_ratio"),
            (NewToggle { error_ratio: f64::NAN, ..base.clone() }, "invalid_ratio"),
            (NewToggle { drop_ratio: 0.6, ..base.clone() }, "invalid_ratio"),
            (NewToggle { error_ratio: 0.0, ..base.clone() }, "no_fault"),
            (NewToggle { latency_ms: LATENCY_MS_MAX + 1, ..base.clone() }, "invalid_latency"),
            (NewToggle { duration_ms: Some(0), ..base.clone() }, "invalid_duration"),
            (NewToggle { duration_ms: Some(DURATION_MS_MAX_DEFAULT + 1), ..base.clone() }, "invalid_duration"),
            (NewToggle { expires_at_ms: Some(999), ..base.clone() }, "invalid_duration"),
            (NewToggle { note: Some("a\nb".into()), ..base.clone() }, "invalid_note"),
        ] {
            match chaos.create(&admin(None), &acme(), bad).await {
                Err(CoreError::Invalid { code: got, .. }) => assert_eq!(got, code),
                other => panic!("expected {code}, got {other:?}"),
            }
        }
        assert!(!chaos.any_on());
        let viewer = Principal::new("v", None, Role::Viewer, AuthMethod::ApiKey);
        assert!(matches!(chaos.create(&viewer, &acme(), base.clone()).await, Err(CoreError::Forbidden)));
        chaos.create(&admin(None), &acme(), base.clone()).await.expect("one");
        chaos.create(&admin(None), &acme(), base.clone()).await.expect("two");
        let third = chaos.create(&admin(None), &acme(), base).await;
        assert!(matches!(third, Err(CoreError::LimitExceeded { .. })), "toggles_max: {third:?}");
    }

    #[tokio::test]
    async fn toggles_end_on_their_own() {
        let clock = ManualClock::new(1_000);
        let chaos = kernel(&clock);
        let new = NewToggle { error_ratio: 1.0, duration_ms: Some(5_000), ..NewToggle::on(ChaosTarget::Store) };
        chaos.create(&admin(None), &acme(), new).await.expect("created");
        clock.advance_ms(4_999);
        assert_eq!(chaos.inject(ChaosTarget::Store, &acme()).await, Some(Injected::Error));
        clock.advance_ms(1);
        assert_eq!(chaos.inject(ChaosTarget::Store, &acme()).await, None, "off on time, before any sweep");
        assert_eq!(chaos.expire_due().await, 1);
        assert!(!chaos.any_on());
        assert_eq!(chaos.metrics.chaos_events_total.with_label_values(&["expired"]).get(), 1);
        let scope = ChaosScope { tenant: acme(), kernel_wide: true };
        assert!(chaos.list(&scope).await.is_empty());
    }

    #[tokio::test]
    async fn latency_is_added_before_the_answer() {
        let clock = ManualClock::new(1_000);
        let chaos = kernel(&clock);
        let new = NewToggle { latency_ms: 30, ..NewToggle::on(ChaosTarget::Dispatch) };
        chaos.create(&admin(None), &acme(), new).await.expect("created");
        let started = std::time::Instant::now();
        assert_eq!(chaos.inject(ChaosTarget::Dispatch, &acme()).await, None);
        assert!(started.elapsed() >= Duration::from_millis(30));
    }
}
