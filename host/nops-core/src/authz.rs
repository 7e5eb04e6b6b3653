//! Authorization: every API call becomes an access request decided by the active policy
//! plugins.
//!
//! The request carries the principal's attributes (from its credential), the action (the
//! endpoint's declared scope, e.g. `agents:read`), the resource's attributes (its tenant, kind,
//! id, labels) and the context (the tenant acted in, the source address, the time).
//!
//! Which policies decide: the *governing* policy plugins, named by the operator
//! ([`AuthzConfig::policies`], default `api-access`), active in the kernel tenant (`default`,
//! the operator's) and, when the request acts in another tenant, active in that tenant too (a
//! tenant may tighten, never loosen, its own access). Other policy plugins are ordinary plugins
//! that tenants call for their own decisions. Deny overrides: one deny among them denies. A
//! policy that traps or times out denies (fail closed, see [`PluginService::call`]). When no
//! governing plugin is active in the kernel tenant, the built-in copy of
//! `policies/tenant-isolation.json` decides for it, evaluated natively by the same engine the
//! `policy-abac` plugin runs, so a fresh kernel is never open. Activating a new version of a
//! governing plugin takes effect on the next request, on every replica within a sync.
//!
//! Every decision goes to the decision log (tracing target `nops::decision`) with the
//! principal's subject and the source address masked.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use serde::Serialize;

use crate::auth::Principal;
use crate::metrics::Metrics;
use crate::plugin::call::{AccessRequest, Attribute, Caller, Invocation, Output, Value};
use crate::plugin::service::PluginService;
use crate::tenant::TenantId;

/// The policy that decides when no policy plugin is active: the shipped tenant-isolation
/// document.
pub const BUILTIN_POLICY: &str = include_str!("../../../policies/tenant-isolation.json");

/// One access request, as the HTTP edge builds it.
#[derive(Debug, Clone)]
pub struct AccessCheck<'a> {
    /// Who is asking.
    pub principal: &'a Principal,
    /// What they want to do: the endpoint's scope, e.g. `agents:read`.
    pub action: &'a str,
    /// The tenant the request acts in; it owns the resource.
    pub tenant: &'a TenantId,
    /// Further attributes of the resource (`kind`, `id`, `labels`).
    pub resource: Vec<Attribute>,
    /// Where the request came from.
    pub source: Option<IpAddr>,
    /// When (ms since the Unix epoch).
    pub now_ms: i64,
}

/// The answer to an [`AccessCheck`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessDecision {
    /// Allowed or not.
    pub allow: bool,
    /// Why: the deciding rules or failures, prefixed with the policy that gave them.
    pub reasons: Vec<String>,
    /// Conditions the kernel applies to an allowed request (e.g. `["mask", "labels.secret"]`).
    pub obligations: Vec<(String, String)>,
}

/// Decides access requests.
#[async_trait]
pub trait Authorizer: Send + Sync + 'static {
    /// Allow or deny, with reasons. Never fails: a failure to decide is a deny.
    async fn authorize(&self, check: &AccessCheck<'_>) -> AccessDecision;
}

/// Settings of authorization.
#[derive(Debug, Clone)]
pub struct AuthzConfig {
    /// Names of the policy plugins that govern API access.
    pub policies: Vec<String>,
    /// Break glass: ignore the policy plugins and decide with the built-in policy only (for
    /// an operator who locked themselves out with a bad policy).
    pub builtin_only: bool,
}

/// The name of the governing policy plugin when the operator names none.
pub const GOVERNING_POLICY_DEFAULT: &str = "api-access";

impl Default for AuthzConfig {
    fn default() -> Self {
        Self { policies: vec![GOVERNING_POLICY_DEFAULT.to_string()], builtin_only: false }
    }
}

/// The kernel's authorizer: the governing policy plugins, else the built-in policy.
pub struct PolicyAuthorizer {
    plugins: Option<Arc<PluginService>>,
    config: AuthzConfig,
    builtin: abac_engine::Policy,
    kernel_tenant: TenantId,
    metrics: Metrics,
    maintenance: AtomicBool,
}

impl std::fmt::Debug for PolicyAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyAuthorizer").field("builtin_rules", &self.builtin.rule_count()).finish_non_exhaustive()
    }
}

impl PolicyAuthorizer {
    /// An authorizer over the active policies of `plugins` (none: the built-in policy only).
    pub fn new(plugins: Option<Arc<PluginService>>, config: AuthzConfig, metrics: Metrics) -> Self {
        // The document is part of the binary and checked by a unit test below.
        let builtin = abac_engine::Policy::from_json(BUILTIN_POLICY.as_bytes())
            .unwrap_or_else(|e| unreachable!("the built-in policy is checked by a unit test: {e}"));
        if config.builtin_only {
            tracing::warn!("authorization: policy plugins are ignored; the built-in policy decides (break glass)");
        }
        Self {
            plugins,
            config,
            builtin,
            kernel_tenant: TenantId::default_tenant(),
            metrics,
            maintenance: AtomicBool::new(false),
        }
    }

    /// Sets `context.maintenance`, which the shipped policy uses to freeze changes by
    /// anyone but admins.
    pub fn set_maintenance(&self, on: bool) {
        self.maintenance.store(on, Ordering::Relaxed);
    }

    /// The governing plugins active for a request in `tenant`: the kernel tenant's, then the
    /// tenant's own. The first flag says whether the kernel tenant has any.
    fn policies(&self, tenant: &TenantId) -> (bool, Vec<(TenantId, String)>) {
        let Some(plugins) = self.plugins.as_ref().filter(|_| !self.config.builtin_only) else {
            return (false, Vec::new());
        };
        let mut out = Vec::new();
        for name in &self.config.policies {
            if plugins.active(&self.kernel_tenant, name).is_some() {
                out.push((self.kernel_tenant.clone(), name.clone()));
            }
        }
        let kernel_has = !out.is_empty();
        if *tenant != self.kernel_tenant {
            for name in &self.config.policies {
                if plugins.active(tenant, name).is_some() {
                    out.push((tenant.clone(), name.clone()));
                }
            }
        }
        (kernel_has, out)
    }

    fn request(&self, check: &AccessCheck<'_>) -> AccessRequest {
        AccessRequest {
            principal: principal_attributes(check.principal),
            action: check.action.to_string(),
            resource: {
                let mut resource = Vec::with_capacity(check.resource.len() + 1);
                resource.push(text("tenant", check.tenant.as_str()));
                resource.extend(check.resource.iter().cloned());
                resource
            },
            context: {
                let mut context = vec![
                    text("tenant", check.tenant.as_str()),
                    Attribute { name: "time_ms".into(), value: Value::Integer(check.now_ms) },
                    Attribute {
                        name: "maintenance".into(),
                        value: Value::Boolean(self.maintenance.load(Ordering::Relaxed)),
                    },
                ];
                if let Some(ip) = check.source {
                    context.push(text("source", &ip.to_string()));
                }
                context
            },
        }
    }

    async fn decide(&self, check: &AccessCheck<'_>) -> (AccessDecision, &'static str) {
        let request = self.request(check);
        let (kernel_has, policies) = self.policies(check.tenant);
        let mut decision = AccessDecision { allow: true, reasons: Vec::new(), obligations: Vec::new() };
        if !kernel_has {
            decision = self.builtin_decision(&request);
            if !decision.allow || policies.is_empty() {
                return (decision, "builtin");
            }
        }
        let Some(plugins) = self.plugins.as_ref() else { return (decision, "builtin") };
        let caller = Arc::new(Caller {
            subject: check.principal.subject.to_string(),
            tenant: check.principal.tenant.as_ref().map(|t| t.to_string()),
            attributes: request.principal.clone(),
        });
        for (tenant, name) in policies {
            let answer =
                plugins.call(&tenant, &name, Some(caller.clone()), Invocation::Authorize(request.clone())).await;
            match answer {
                Ok(answer) => match answer.output {
                    Output::Decision(d) => {
                        decision.allow &= d.allow;
                        decision.reasons.extend(d.reasons.into_iter().map(|r| format!("{tenant}/{name}: {r}")));
                        if d.allow {
                            decision.obligations.extend(d.obligations);
                        }
                    }
                    _ => {
                        decision.allow = false;
                        decision.reasons.push(format!("{tenant}/{name}: not a decision"));
                    }
                },
                // Deactivated between listing and calling, or the wrong kind: fail closed.
                Err(err) => {
                    decision.allow = false;
                    decision.reasons.push(format!("{tenant}/{name}: {err}"));
                }
            }
        }
        if !decision.allow {
            decision.obligations.clear();
        }
        (decision, "plugins")
    }

    fn builtin_decision(&self, request: &AccessRequest) -> AccessDecision {
        let (principal, resource, context) =
            (Attrs(&request.principal), Attrs(&request.resource), Attrs(&request.context));
        let d = self.builtin.evaluate(&abac_engine::Request {
            principal: &principal,
            action: &request.action,
            resource: &resource,
            context: &context,
        });
        AccessDecision {
            allow: d.allow,
            reasons: d.reasons.iter().map(|r| format!("builtin: {r}")).collect(),
            obligations: d.obligations.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect(),
        }
    }
}

#[async_trait]
impl Authorizer for PolicyAuthorizer {
    async fn authorize(&self, check: &AccessCheck<'_>) -> AccessDecision {
        let (decision, source) = self.decide(check).await;
        let outcome = if decision.allow { "allow" } else { "deny" };
        self.metrics.authz_decisions_total.with_label_values(&[outcome, source]).inc();
        tracing::info!(
            target: "nops::decision",
            decision = outcome,
            action = check.action,
            tenant = %check.tenant,
            principal = %mask_subject(&check.principal.subject),
            principal_tenant = check.principal.tenant.as_ref().map_or("", |t| t.as_str()),
            role = check.principal.role.as_str(),
            method = check.principal.method.as_str(),
            source = %check.source.map(mask_ip).unwrap_or_default(),
            reasons = ?decision.reasons,
            decided_by = source,
        );
        decision
    }
}

/// The principal as policies see it: `subject`, `role`, `method`, `tenant` (absent for a
/// kernel-wide principal) and `scopes`.
pub fn principal_attributes(principal: &Principal) -> Vec<Attribute> {
    let mut out = vec![
        text("subject", &principal.subject),
        text("role", principal.role.as_str()),
        text("method", principal.method.as_str()),
        Attribute {
            name: "scopes".into(),
            value: Value::Texts(principal.scopes.iter().map(|s| s.to_string()).collect()),
        },
    ];
    if let Some(tenant) = &principal.tenant {
        out.push(text("tenant", tenant.as_str()));
    }
    out
}

fn text(name: &str, value: &str) -> Attribute {
    Attribute { name: name.into(), value: Value::Text(value.into()) }
}

/// Keeps the first four characters of a subject: enough to tell principals apart in a log,
/// not enough to name an agent or a person.
pub fn mask_subject(subject: &str) -> String {
    let kept: String = subject.chars().take(4).collect();
    if subject.chars().count() > 4 { format!("{kept}…") } else { kept }
}

/// An address with its host part dropped: `/24` for IPv4, `/48` for IPv6.
pub fn mask_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
        }
    }
}

/// The kernel's attributes, read in place by the native engine.
struct Attrs<'a>(&'a [Attribute]);

impl abac_engine::Attributes for Attrs<'_> {
    fn lookup(&self, name: &str) -> Option<abac_engine::ValueRef<'_>> {
        self.0.iter().find(|a| a.name == name).map(|a| match &a.value {
            Value::Text(s) => abac_engine::ValueRef::Text(s),
            Value::Integer(i) => abac_engine::ValueRef::Integer(*i),
            Value::Number(n) => abac_engine::ValueRef::Number(*n),
            Value::Boolean(b) => abac_engine::ValueRef::Boolean(*b),
            Value::Texts(l) => abac_engine::ValueRef::Texts(l),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{AuthMethod, Role};

    fn tenant(s: &str) -> TenantId {
        s.parse().expect("tenant")
    }

    async fn decide(principal: &Principal, action: &str, in_tenant: &str, resource: Vec<Attribute>) -> AccessDecision {
        let authz = PolicyAuthorizer::new(None, AuthzConfig::default(), Metrics::new());
        let t = tenant(in_tenant);
        authz.authorize(&AccessCheck { principal, action, tenant: &t, resource, source: None, now_ms: 0 }).await
    }

    #[test]
    fn the_builtin_policy_parses() {
        assert!(abac_engine::Policy::from_json(BUILTIN_POLICY.as_bytes()).is_ok());
    }

    #[tokio::test]
    async fn the_builtin_policy_isolates_tenants() {
        let a_admin = Principal::new("k1", Some(tenant("a")), Role::Admin, AuthMethod::ApiKey);
        assert!(decide(&a_admin, "agents:read", "a", vec![]).await.allow);
        let denied = decide(&a_admin, "agents:read", "b", vec![]).await;
        assert!(!denied.allow);
        assert_eq!(denied.reasons, vec!["builtin: tenant-isolation".to_string()]);
        let global = Principal::new("k0", None, Role::Admin, AuthMethod::ApiKey);
        assert!(decide(&global, "plugins:write", "b", vec![]).await.allow);
        let viewer = Principal::new("k2", Some(tenant("a")), Role::Viewer, AuthMethod::Jwt);
        assert!(decide(&viewer, "agents:read", "a", vec![]).await.allow);
        assert!(!decide(&viewer, "agents:write", "a", vec![]).await.allow);
        let agent = Principal::new("agent-7", Some(tenant("a")), Role::Agent, AuthMethod::Workload);
        assert!(decide(&agent, "agents:heartbeat", "a", vec![text("id", "agent-7")]).await.allow);
        assert!(!decide(&agent, "agents:heartbeat", "a", vec![text("id", "agent-8")]).await.allow);
    }

    #[test]
    fn masks_drop_identifying_parts() {
        assert_eq!(mask_subject("0191f0aa-bbbb"), "0191…");
        assert_eq!(mask_subject("ab"), "ab");
        assert_eq!(mask_ip("10.1.2.3".parse().expect("ip")), "10.1.2.0/24");
        assert_eq!(mask_ip("2001:db8:1:2::9".parse().expect("ip")), "2001:db8:1::/48");
    }
}
