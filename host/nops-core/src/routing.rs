//! Routing: which agent should run a task. Candidates are filtered by capability (with a
//! version requirement), health and circuit breaker, then ranked by the active scorer plugin;
//! when the scorer fails, a built-in power-of-two-choices fallback answers.
//!
//! # A decision
//! 1. **Candidates** come from the registry's in-memory index (tenant + capability name), never
//!    the store: the requirement whose capability the fewest agents have is the starting set
//!    (at most `scan_max` of them, sampled when more), filtered by every requirement's
//!    version, by labels, and by the `skip` predicate of [`Placement::place`].
//! 2. **Health**: stale agents (silent for the stale threshold) and agents whose circuit
//!    breaker does not admit an attempt are excluded (read live; the decayed health and weight
//!    may be reused for `snapshot_refresh_ms`, see [`HealthTable::routing_snapshot_at`]). At
//!    most `candidates_max` of the rest are scored (a random sample when more).
//! 3. **Ranking**: the active scorer plugin (`[routing] scorer`, of the request's tenant, else
//!    of the `default` tenant) scores every candidate; the best `count` distinct agents win.
//!    When no scorer is active or it fails, the built-in **power of two choices** answers:
//!    two random candidates, the better by `health × weight / (1 + in_flight)`, repeated for
//!    each agent chosen. A scorer failure is never an error for the caller; it is counted in
//!    `nops_route_fallbacks_total{reason}`.
//!
//! Invariants: an agent whose breaker is open is never chosen; [`Placement::place`] takes the
//! half-open breaker's probe slot when it chooses such an agent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rand::Rng;
use semver::VersionReq;
use serde::{Deserialize, Serialize};

use crate::agent::{AgentId, CAPABILITIES_MAX, LABELS_MAX, validate_capability_name};
use crate::health::{HealthSnapshot, HealthTable, HealthView};
use crate::metrics::Metrics;
use crate::plugin::call::{Candidate, Invocation, Output, ScoreTask};
use crate::plugin::service::PluginService;
use crate::registry::{IndexedAgent, Registry};
use crate::tenant::TenantId;
use crate::{CoreError, CoreResult};

/// One capability a task needs, e.g. `inference.llm` with `^1.2`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CapabilityRequirement {
    /// Capability name, e.g. `inference.llm`.
    pub name: String,
    /// Versions accepted (semver requirement); any version when absent.
    #[serde(default = "any_version")]
    #[schema(value_type = String, example = "^1.2")]
    pub version: VersionReq,
}

fn any_version() -> VersionReq {
    VersionReq::STAR
}

/// What a task needs from the agent that runs it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteRequest {
    /// Capabilities the agent must have, each in an accepted version.
    pub capabilities: Vec<CapabilityRequirement>,
    /// Labels the agent must carry, e.g. `{"zone": "eu-1"}`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Hints passed to the scorer, e.g. `{"prefer": "gpu"}`.
    #[serde(default)]
    pub hints: BTreeMap<String, String>,
    /// How many agents to choose (best first); 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

/// One chosen agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RoutedAgent {
    /// The agent.
    pub id: AgentId,
    /// Its name.
    pub name: String,
    /// Where pushed work goes; `None` for agents that pull.
    pub endpoint: Option<String>,
    /// The score that ranked it (higher is better).
    pub score: f32,
    /// Its health in [0, 1].
    pub health: f32,
    /// Its dynamic weight.
    pub weight: f32,
    /// Version of its best capability matching the first requirement.
    pub version: String,
}

/// The answer to a routing request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RouteDecision {
    /// The chosen agents, best first (empty when none qualifies).
    pub chosen: Vec<RoutedAgent>,
    /// Who ranked them: `plugin:<tenant>/<name>@<version>` or `builtin:p2c`.
    pub scorer: String,
    /// Whether the built-in fallback answered because the scorer failed or none is active.
    pub fallback: bool,
    /// Agents that matched the capabilities and labels.
    pub matched: u32,
    /// Of those, agents left out as unhealthy or with an open circuit breaker.
    pub excluded: u32,
    /// A short explanation in words.
    pub explanation: String,
}

/// How an attempt on an agent ended, for health scoring and circuit breakers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The agent answered with a result.
    Success,
    /// The agent answered with an error, refused, or could not be reached.
    Failure,
    /// The attempt's timeout passed without an answer.
    Timeout,
}

/// Places work on agents: what dispatch needs from routing.
#[async_trait]
pub trait Placement: Send + Sync + 'static {
    /// Chooses the best agent for `request` in `tenant`, never one for which `skip` is true
    /// (agents already tried). `None` when no agent qualifies.
    async fn place(
        &self,
        tenant: &TenantId,
        request: &RouteRequest,
        skip: &(dyn Fn(AgentId) -> bool + Send + Sync),
    ) -> CoreResult<Option<RoutedAgent>>;

    /// An attempt on `agent` started (it counts as in flight until it finishes).
    fn attempt_started(&self, agent: AgentId);

    /// An attempt on `agent` finished after `elapsed` with `outcome`.
    fn attempt_finished(&self, agent: AgentId, elapsed: Duration, outcome: AttemptOutcome);
}

/// Most routing hints in one request.
pub const HINTS_MAX: usize = 32;
/// Longest hint key or value, in bytes.
pub const HINT_BYTES_MAX: usize = 256;

/// Settings of routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    /// Name of the scorer plugin consulted (the request tenant's, else the `default` tenant's).
    pub scorer: String,
    /// Most agents one request may ask for.
    pub count_max: u32,
    /// Most candidates scored per request (a random sample when more qualify).
    pub candidates_max: usize,
    /// Most indexed agents examined per request (a random sample when the capability has more).
    pub scan_max: usize,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self { scorer: "scorer".into(), count_max: 16, candidates_max: 1_024, scan_max: 16_384 }
    }
}

impl RoutingConfig {
    /// Checks ranges.
    pub fn validate(&self) -> CoreResult<()> {
        if crate::plugin::validate_plugin_name(&self.scorer).is_err() {
            return Err(CoreError::invalid(
                "invalid_config",
                format!("routing: scorer must be a plugin name, not {:?}", self.scorer),
            ));
        }
        if self.count_max == 0 || self.candidates_max == 0 || self.scan_max < self.candidates_max {
            return Err(CoreError::invalid(
                "invalid_config",
                "routing: count_max and candidates_max must be positive and scan_max at least candidates_max",
            ));
        }
        Ok(())
    }
}

/// A candidate that passed the filters: what scoring needs, compact and without a reference
/// to the agent (the chosen few are looked up again, see [`RoutingService::resolve`]).
struct Eligible {
    id: AgentId,
    health: f64,
    weight: f64,
    in_flight: u32,
    silence_ms: u32,
    cpu_ratio: f32,
    latency_ms: f32,
    error_rate: f32,
    /// The best version of the first requirement, as major, minor, patch.
    version: (u32, u32, u32),
}

impl Eligible {
    fn new(id: AgentId, snapshot: &HealthSnapshot, version: (u32, u32, u32)) -> Self {
        Self {
            id,
            health: snapshot.health,
            weight: snapshot.weight,
            in_flight: snapshot.in_flight,
            silence_ms: u32::try_from(snapshot.silence_ms).unwrap_or(u32::MAX),
            cpu_ratio: snapshot.cpu_ratio.unwrap_or(0.0) as f32,
            latency_ms: snapshot.latency_ms as f32,
            error_rate: snapshot.error_rate as f32,
            version,
        }
    }

    /// The built-in fallback's measure: `health × weight / (1 + in_flight)`.
    fn p2c_score(&self) -> f64 {
        self.health * self.weight / (1.0 + f64::from(self.in_flight))
    }
}

/// Why candidates were left out, for the explanation.
#[derive(Debug, Default)]
struct Exclusions {
    stale: u32,
    breaker: u32,
    skipped: u32,
}

/// The routing service: candidates from the registry's index, health from the health table,
/// ranking by the scorer plugin or the built-in power of two choices.
pub struct RoutingService {
    registry: Arc<Registry>,
    plugins: Option<Arc<PluginService>>,
    health: Arc<HealthTable>,
    metrics: Metrics,
    config: RoutingConfig,
    default_tenant: TenantId,
    /// `nops_route_decisions_total` by source, resolved once.
    decisions: [prometheus::IntCounter; 3],
}

impl std::fmt::Debug for RoutingService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingService").field("config", &self.config).finish_non_exhaustive()
    }
}

impl RoutingService {
    /// A routing service. `health` should be the table the registry feeds
    /// ([`Registry::health_table`]).
    pub fn new(
        registry: Arc<Registry>,
        plugins: Option<Arc<PluginService>>,
        health: Arc<HealthTable>,
        metrics: Metrics,
        config: RoutingConfig,
    ) -> Self {
        let decisions = ["plugin", "builtin", "none"].map(|s| metrics.route_decisions_total.with_label_values(&[s]));
        Self { registry, plugins, health, metrics, config, default_tenant: TenantId::default_tenant(), decisions }
    }

    /// The settings.
    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    /// The health table.
    pub fn health_table(&self) -> &Arc<HealthTable> {
        &self.health
    }

    /// Chooses up to `request.count` agents of `tenant` for `request`, best first.
    pub async fn route(&self, tenant: &TenantId, request: &RouteRequest) -> CoreResult<RouteDecision> {
        self.decide(tenant, request, None, false).await
    }

    /// The health view of agent `id` in `tenant`.
    pub fn agent_health(&self, tenant: &TenantId, id: AgentId) -> CoreResult<HealthView> {
        if self.registry.indexed(tenant, id).is_none() {
            return Err(CoreError::NotFound { what: "agent" });
        }
        self.health.view(tenant, id)
    }

    /// Checks a request; returns how many agents it asks for.
    pub fn validate(&self, request: &RouteRequest) -> CoreResult<usize> {
        let bad = |m: String| Err(CoreError::invalid("invalid_route", m));
        if request.capabilities.is_empty() {
            return bad("capabilities must name at least one capability".into());
        }
        if request.capabilities.len() > CAPABILITIES_MAX {
            return bad(format!("at most {CAPABILITIES_MAX} capabilities"));
        }
        for requirement in &request.capabilities {
            validate_capability_name(&requirement.name)?;
        }
        if request.labels.len() > LABELS_MAX {
            return bad(format!("at most {LABELS_MAX} labels"));
        }
        if request.hints.len() > HINTS_MAX
            || request.hints.iter().any(|(k, v)| k.len() > HINT_BYTES_MAX || v.len() > HINT_BYTES_MAX)
        {
            return bad(format!("at most {HINTS_MAX} hints of at most {HINT_BYTES_MAX} bytes each"));
        }
        let count = request.count.unwrap_or(1);
        if count == 0 || count > self.config.count_max {
            return bad(format!("count must be between 1 and {} (count_max)", self.config.count_max));
        }
        Ok(count as usize)
    }

    async fn decide(
        &self,
        tenant: &TenantId,
        request: &RouteRequest,
        skip: Option<&(dyn Fn(AgentId) -> bool + Send + Sync)>,
        take_probe: bool,
    ) -> CoreResult<RouteDecision> {
        let count = self.validate(request)?;
        let started = Instant::now();
        let now_ms = self.health.now_ms();
        // Start from the rarest capability: every agent must have all of them.
        let pivot = request
            .capabilities
            .iter()
            .min_by_key(|r| self.registry.capability_count(tenant, &r.name))
            .unwrap_or(&request.capabilities[0]);
        let mut exclusions = Exclusions::default();
        let mut matched = 0u32;
        // Agents of one profile (the same labels and capabilities) pass or fail the filters
        // alike: the verdict is worked out once per profile, and a fleet has few. The
        // profile is a 64-bit keyed hash; the agents finally chosen are checked in full
        // (`resolve`), so even a collision cannot place work on an agent that does not qualify.
        let mut verdicts: Vec<(u64, Option<Qualified>)> = Vec::new();
        let (mut eligible, indexed, scanned) = self.registry.with_candidates(tenant, &pivot.name, |items| {
            let mut eligible = Vec::with_capacity(items.len().min(self.config.scan_max));
            let mut consider = |agent: &Arc<IndexedAgent>| {
                let verdict = match verdicts.iter().find(|(profile, _)| *profile == agent.profile) {
                    Some((_, verdict)) => *verdict,
                    None => {
                        let verdict = qualifies(agent, request);
                        if verdicts.len() < PROFILE_VERDICTS_MAX {
                            verdicts.push((agent.profile, verdict));
                        }
                        verdict
                    }
                };
                let Some((_, version)) = verdict else { return };
                matched += 1;
                if skip.is_some_and(|skip| skip(agent.id)) {
                    exclusions.skipped += 1;
                    return;
                }
                let snapshot = self.health.routing_snapshot_at(&agent.health, now_ms);
                if snapshot.stale {
                    exclusions.stale += 1;
                } else if !snapshot.admits {
                    exclusions.breaker += 1;
                } else {
                    eligible.push(Eligible::new(agent.id, &snapshot, version));
                }
            };
            if items.len() <= self.config.scan_max {
                items.iter().for_each(&mut consider);
            } else {
                let mut rng = rand::rng();
                for i in rand::seq::index::sample(&mut rng, items.len(), self.config.scan_max) {
                    consider(&items[i]);
                }
            }
            (eligible, items.len(), items.len().min(self.config.scan_max))
        });
        if eligible.len() > self.config.candidates_max {
            let mut rng = rand::rng();
            // A partial Fisher-Yates shuffle: the first `candidates_max` are a uniform sample.
            for i in 0..self.config.candidates_max {
                let j = rng.random_range(i..eligible.len());
                eligible.swap(i, j);
            }
            eligible.truncate(self.config.candidates_max);
        }
        let scored = eligible.len();
        let (chosen, scorer, fallback) = if eligible.is_empty() {
            self.decisions[2].inc();
            (Vec::new(), "none".to_string(), false)
        } else {
            match self.score(tenant, request, &eligible).await {
                Ok((scores, label)) => {
                    self.decisions[0].inc();
                    (self.pick_ranked(tenant, request, &eligible, &scores, count, take_probe), label, false)
                }
                Err(reason) => {
                    self.metrics.route_fallbacks_total.with_label_values(&[reason]).inc();
                    self.decisions[1].inc();
                    (self.pick_p2c(tenant, request, eligible, count, take_probe), "builtin:p2c".to_string(), true)
                }
            }
        };
        let excluded = exclusions.stale + exclusions.breaker;
        let mut explanation = format!(
            "{} chosen; {matched} of {} agents with `{}` matched",
            chosen.len(),
            if scanned < indexed { format!("{scanned} sampled of {indexed}") } else { indexed.to_string() },
            pivot.name
        );
        if excluded > 0 || exclusions.skipped > 0 {
            let mut reasons = Vec::new();
            if exclusions.stale > 0 {
                reasons.push(format!("{} stale", exclusions.stale));
            }
            if exclusions.breaker > 0 {
                reasons.push(format!("{} breaker open", exclusions.breaker));
            }
            if exclusions.skipped > 0 {
                reasons.push(format!("{} already tried", exclusions.skipped));
            }
            explanation.push_str(&format!("; {} excluded ({})", excluded + exclusions.skipped, reasons.join(", ")));
        }
        if scored > 0 {
            explanation.push_str(&format!("; {scored} scored, ranked by {scorer}"));
            if fallback {
                explanation.push_str(" (scorer unavailable)");
            }
        }
        self.metrics.route_duration_seconds.observe(started.elapsed().as_secs_f64());
        Ok(RouteDecision { chosen, scorer, fallback, matched, excluded, explanation })
    }

    /// Scores `eligible` with the active scorer plugin; `Err(reason)` when the fallback must
    /// answer.
    async fn score(
        &self,
        tenant: &TenantId,
        request: &RouteRequest,
        eligible: &[Eligible],
    ) -> Result<(Vec<f32>, String), &'static str> {
        let plugins = self.plugins.as_ref().ok_or("no_scorer")?;
        let owner = if plugins.active(tenant, &self.config.scorer).is_some() {
            tenant
        } else if plugins.active(&self.default_tenant, &self.config.scorer).is_some() {
            &self.default_tenant
        } else {
            return Err("no_scorer");
        };
        let candidates = eligible
            .iter()
            .enumerate()
            .map(|(i, e)| Candidate {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                health: e.health as f32,
                in_flight: e.in_flight,
                cpu_ratio: e.cpu_ratio,
                latency_ms: e.latency_ms,
                error_rate: e.error_rate,
                silence_ms: e.silence_ms,
                version: e.version,
            })
            .collect();
        let task = ScoreTask {
            capabilities: request.capabilities.iter().map(|r| r.name.clone()).collect(),
            hints: request.hints.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        let answer = plugins
            .call(owner, &self.config.scorer, None, Invocation::Score { task, candidates })
            .await
            .map_err(|err| {
                tracing::warn!(error = %err, "scorer call failed; the built-in fallback answers");
                match err {
                    CoreError::NotFound { .. } => "no_scorer",
                    CoreError::Invalid { .. } => "wrong_kind",
                    _ => "error",
                }
            })?;
        if let Some(failure) = &answer.failure {
            tracing::warn!(error = %failure, scorer = %self.config.scorer, "scorer failed; the built-in fallback answers");
            return Err(failure.label());
        }
        match answer.output {
            Output::Scores(scores) if scores.len() == eligible.len() && scores.iter().all(|s| s.is_finite()) => {
                Ok((scores, format!("plugin:{owner}/{}@{}", self.config.scorer, answer.version)))
            }
            _ => Err("bad_output"),
        }
    }

    /// The agent of `e` as it is now, with the position of its best version of the first
    /// requirement; `None` when it left the index (or no longer matches) since it was
    /// filtered.
    fn resolve(&self, tenant: &TenantId, request: &RouteRequest, e: &Eligible) -> Option<(Arc<IndexedAgent>, usize)> {
        let agent = self.registry.indexed(tenant, e.id)?;
        let (version_at, _) = qualifies(&agent, request)?;
        Some((agent, version_at))
    }

    /// The agent of `e`, chosen with `score`, when it is still there and (for placement)
    /// its breaker gives it the attempt.
    fn choose(
        &self,
        tenant: &TenantId,
        request: &RouteRequest,
        e: &Eligible,
        score: f32,
        take_probe: bool,
    ) -> Option<RoutedAgent> {
        let (agent, version_at) = self.resolve(tenant, request, e)?;
        if take_probe && !self.health.try_admit(&agent.health) {
            return None;
        }
        Some(RoutedAgent {
            id: agent.id,
            name: agent.name.clone(),
            endpoint: agent.endpoint.clone(),
            score,
            health: e.health as f32,
            weight: e.weight as f32,
            version: agent.capabilities[version_at].1.to_string(),
        })
    }

    /// The best `count` by score (ties broken by the built-in measure).
    fn pick_ranked(
        &self,
        tenant: &TenantId,
        request: &RouteRequest,
        eligible: &[Eligible],
        scores: &[f32],
        count: usize,
        take_probe: bool,
    ) -> Vec<RoutedAgent> {
        let mut order: Vec<usize> = (0..eligible.len()).collect();
        let better = |a: &usize, b: &usize| {
            scores[*b]
                .total_cmp(&scores[*a])
                .then_with(|| eligible[*b].p2c_score().total_cmp(&eligible[*a].p2c_score()))
        };
        // Placement may have to skip a few whose half-open breaker has no probe slot left.
        let head = if take_probe { order.len() } else { count.min(order.len()) };
        if head < order.len() && head > 0 {
            order.select_nth_unstable_by(head - 1, better);
            order.truncate(head);
        }
        order.sort_unstable_by(better);
        let mut chosen = Vec::with_capacity(count);
        for i in order {
            if chosen.len() == count {
                break;
            }
            chosen.extend(self.choose(tenant, request, &eligible[i], scores[i], take_probe));
        }
        chosen
    }

    /// The built-in power of two choices, `count` times without replacement.
    fn pick_p2c(
        &self,
        tenant: &TenantId,
        request: &RouteRequest,
        mut eligible: Vec<Eligible>,
        count: usize,
        take_probe: bool,
    ) -> Vec<RoutedAgent> {
        let mut rng = rand::rng();
        let mut chosen = Vec::with_capacity(count);
        while chosen.len() < count && !eligible.is_empty() {
            let winner = if eligible.len() == 1 {
                0
            } else {
                let a = rng.random_range(0..eligible.len());
                let mut b = rng.random_range(0..eligible.len() - 1);
                if b >= a {
                    b += 1;
                }
                if eligible[a].p2c_score() >= eligible[b].p2c_score() { a } else { b }
            };
            let e = eligible.swap_remove(winner);
            let score = e.p2c_score() as f32;
            chosen.extend(self.choose(tenant, request, &e, score, take_probe));
        }
        chosen
    }
}

/// What [`qualifies`] finds of an agent that qualifies: where in `agent.capabilities` the best
/// version of the first requirement is, and that version as major, minor, patch.
type Qualified = (usize, (u32, u32, u32));

/// Most profiles whose filter verdicts one routing decision remembers (see `decide`); agents
/// of further profiles are checked one by one.
const PROFILE_VERDICTS_MAX: usize = 16;

/// Whether `agent` has every capability (at an accepted version) and label `request` asks
/// for: where in `agent.capabilities` the best version of the first requirement is, and
/// that version as major, minor, patch.
fn qualifies(agent: &IndexedAgent, request: &RouteRequest) -> Option<Qualified> {
    let mut first = None;
    for (i, requirement) in request.capabilities.iter().enumerate() {
        let at = best_version_at(agent, requirement)?;
        if i == 0 {
            first = Some(at);
        }
    }
    let at = first?;
    if !agent.has_labels(&request.labels) {
        return None;
    }
    let version = &agent.capabilities[at].1;
    let part = |x: u64| u32::try_from(x).unwrap_or(u32::MAX);
    Some((at, (part(version.major), part(version.minor), part(version.patch))))
}

/// Where in `agent.capabilities` the highest version of `requirement.name` that
/// `requirement.version` accepts is (as [`IndexedAgent::best_version`], without a copy).
fn best_version_at(agent: &IndexedAgent, requirement: &CapabilityRequirement) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (at, (name, version)) in agent.capabilities.iter().enumerate() {
        if *name == requirement.name
            && requirement.version.matches(version)
            && best.is_none_or(|b| *version > agent.capabilities[b].1)
        {
            best = Some(at);
        }
    }
    best
}

#[async_trait]
impl Placement for RoutingService {
    async fn place(
        &self,
        tenant: &TenantId,
        request: &RouteRequest,
        skip: &(dyn Fn(AgentId) -> bool + Send + Sync),
    ) -> CoreResult<Option<RoutedAgent>> {
        let single = RouteRequest { count: Some(1), ..request.clone() };
        let decision = self.decide(tenant, &single, Some(skip), true).await?;
        Ok(decision.chosen.into_iter().next())
    }

    fn attempt_started(&self, agent: AgentId) {
        self.health.attempt_started(agent);
    }

    fn attempt_finished(&self, agent: AgentId, elapsed: Duration, outcome: AttemptOutcome) {
        self.health.attempt_finished(agent, elapsed, outcome);
    }
}
