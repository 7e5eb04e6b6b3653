//! Rate limits: GCRA budgets per credential, per tenant and per route.
//!
//! Every authenticated request is counted against up to three budgets, in this order:
//!
//! - `key`: its credential ([`Principal::credential`]: the key id, or `issuer#subject`);
//! - `tenant`: the tenant it acts in;
//! - `route`: its method and matched route (`POST /api/v1/agents/{id}/heartbeat`), across
//!   every caller.
//!
//! The first budget that is spent refuses the request with 429 `rate_limited` before the
//! handler runs (so a refused request changes nothing); budgets checked before it have
//! counted the request. Responses carry the most constraining budget in the IETF draft
//! headers (draft-ietf-httpapi-ratelimit-headers): `RateLimit-Policy: "key";q=400;w=2` and
//! `RateLimit: "key";r=12;t=1`, and a refusal carries `Retry-After` in whole seconds.
//!
//! In process the budgets are `governor` keyed limiters on a monotonic clock. Their key maps
//! are bounded: stale keys are dropped every `housekeeping_interval_ms`, and once a map holds
//! `keys_max` keys every new key shares one overflow budget until housekeeping frees room, so a
//! flood of distinct credentials cannot exhaust memory.
//!
//! With `shared = true` the budgets are kept in the store ([`RateLimitStore`]), so replicas on
//! one PostgreSQL database share them. When the store fails or does not answer within
//! `store_timeout_ms`, `on_store_error` decides: `allow` (the default) counts the request
//! against this kernel's in-process budgets instead, so a database blip neither refuses an
//! edge fleet's traffic nor turns the limits off; `deny` refuses it with 503. Either way the
//! failure is logged (at most once per second) and counted in
//! `nops_rate_limit_store_errors_total`, and the store is not asked again for a second.
//!
//! [`RateLimitStore`]: nops_core::store::RateLimitStore

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock as _, MonotonicClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use nops_core::auth::Principal;
use nops_core::tenant::TenantId;
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::error::ApiError;

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT_POLICY_HEADER: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT_HEADER: HeaderName = HeaderName::from_static("ratelimit");
/// Fastest rate a shared budget can express: the store counts in whole milliseconds.
pub const SHARED_PER_SECOND_MAX: f64 = 1_000.0;
/// How long the store is left alone after it failed a check.
const STORE_BACKOFF_MS: u64 = 1_000;
/// Least time between two "store failed" log lines.
const STORE_ERROR_LOG_INTERVAL_MS: u64 = 1_000;
/// Least time between two early clean-ups when a key map is full.
const FULL_CLEANUP_INTERVAL_MS: u64 = 1_000;
/// The key every new key shares while a key map is full.
const OVERFLOW_KEY: &str = "\u{0}overflow";

/// A budget: `burst` requests at once, refilled at `per_second` requests a second (one every
/// `1 / per_second` s). Over `burst / per_second` seconds it lets through `burst` requests at
/// most beyond the steady rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateQuota {
    /// Steady rate, in requests a second (fractions allowed: 0.5 is one every 2 s).
    pub per_second: f64,
    /// Requests allowed at once.
    pub burst: u32,
}

impl RateQuota {
    /// A budget of `burst` refilled at `per_second`.
    pub const fn new(per_second: f64, burst: u32) -> Self {
        Self { per_second, burst }
    }

    /// Why this budget is unusable, if it is.
    pub fn validate(&self, what: &str) -> Result<(), String> {
        if !self.per_second.is_finite() || self.per_second <= 0.0 || self.per_second > 1e9 {
            return Err(format!("{what}: per_second must be a number above 0 (got {})", self.per_second));
        }
        if self.burst == 0 {
            return Err(format!("{what}: burst must be at least 1"));
        }
        Ok(())
    }

    /// Time between two refills.
    fn emission_interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_second).max(Duration::from_nanos(1))
    }

    /// The emission interval in whole milliseconds, for the store.
    fn emission_interval_ms(&self) -> i64 {
        ((1_000.0 / self.per_second).round() as i64).max(1)
    }

    /// The window the draft headers name: seconds to refill the whole burst.
    fn window_s(&self) -> u64 {
        ((f64::from(self.burst) / self.per_second).ceil() as u64).max(1)
    }

    fn governor_quota(&self) -> Quota {
        let burst = NonZeroU32::new(self.burst).unwrap_or(NonZeroU32::MIN);
        Quota::with_period(self.emission_interval()).unwrap_or_else(|| Quota::per_second(burst)).allow_burst(burst)
    }
}

/// What a rate limit does when the store cannot answer (shared limits only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Count the request against this kernel's in-process budgets instead.
    #[default]
    Allow,
    /// Refuse the request with 503.
    Deny,
}

/// Rate limit settings (`[rate_limits]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    /// Enforce the limits at all.
    pub enabled: bool,
    /// Keep the budgets in the store, shared by every kernel on the database (PostgreSQL).
    pub shared: bool,
    /// What a shared limit does when the store fails.
    pub on_store_error: OnStoreError,
    /// Budget of each credential.
    pub per_key: Option<RateQuota>,
    /// Budget of each tenant.
    pub per_tenant: Option<RateQuota>,
    /// Budget of named routes, `"METHOD /api/v1/route/{param}"`, across every caller.
    pub per_route: BTreeMap<String, RateQuota>,
    /// Budget of each route not named in `per_route`, across every caller.
    pub route_default: Option<RateQuota>,
    /// Most keys each in-process limiter holds (per credential, per tenant).
    pub keys_max: usize,
    /// How often stale keys are dropped (in process) and expired rows deleted (shared).
    pub housekeeping_interval_ms: u64,
    /// Longest wait for the store's answer before `on_store_error` applies.
    pub store_timeout_ms: u64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            shared: false,
            on_store_error: OnStoreError::Allow,
            per_key: Some(RateQuota::new(1_000.0, 2_000)),
            per_tenant: Some(RateQuota::new(1_000.0, 4_000)),
            per_route: BTreeMap::new(),
            route_default: None,
            keys_max: 100_000,
            housekeeping_interval_ms: 10_000,
            store_timeout_ms: 250,
        }
    }
}

impl RateLimitConfig {
    /// Why these settings are unusable, if they are. `routes` are the `"METHOD /path"` of the
    /// endpoints a route budget may name.
    pub fn validate<'a>(&self, routes: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
        let routes: Vec<&str> = routes.into_iter().collect();
        let mut quotas: Vec<(String, RateQuota)> = Vec::new();
        quotas.extend(self.per_key.map(|q| ("per_key".to_string(), q)));
        quotas.extend(self.per_tenant.map(|q| ("per_tenant".to_string(), q)));
        quotas.extend(self.route_default.map(|q| ("route_default".to_string(), q)));
        for (route, quota) in &self.per_route {
            let known = routes.iter().any(|r| r == route);
            if !known {
                return Err(format!(
                    "per_route: unknown route {route:?}; expected \"METHOD /api/v1/…\" as one of: {}",
                    routes.join(", ")
                ));
            }
            quotas.push((format!("per_route {route:?}"), *quota));
        }
        for (what, quota) in &quotas {
            quota.validate(what)?;
            if self.shared && quota.per_second > SHARED_PER_SECOND_MAX {
                return Err(format!(
                    "{what}: shared limits count in whole milliseconds, so per_second can be at most {SHARED_PER_SECOND_MAX} (got {})",
                    quota.per_second
                ));
            }
        }
        if self.keys_max == 0 {
            return Err("keys_max must be at least 1".into());
        }
        if self.housekeeping_interval_ms == 0 {
            return Err("housekeeping_interval_ms must be at least 1".into());
        }
        Ok(())
    }
}

/// Where a kernel keeps its in-process limiter state; filled when the router is built.
///
/// A clone starts empty: each [`crate::AppState`] built from a copy of an [`crate::HttpConfig`]
/// counts on its own, and every router of one state shares its budgets.
#[derive(Default)]
pub struct LimiterSlot(OnceLock<Arc<Limiters>>);

impl Clone for LimiterSlot {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for LimiterSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() { "LimiterSlot(started)" } else { "LimiterSlot(empty)" })
    }
}

impl LimiterSlot {
    /// The limiters of `state`, created on first use.
    pub(crate) fn get(state: &AppState) -> &Arc<Limiters> {
        state.http.limiter.0.get_or_init(|| Arc::new(Limiters::new(&state.http.rate_limits, state)))
    }
}

/// Which budget decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    Key,
    Tenant,
    Route,
}

impl Limit {
    fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Tenant => "tenant",
            Self::Route => "route",
        }
    }
}

/// One budget's answer.
#[derive(Debug, Clone, Copy)]
struct Verdict {
    limit: Limit,
    quota: RateQuota,
    allowed: bool,
    remaining: u32,
    reset_ms: u64,
    retry_after_ms: u64,
}

/// The budget to report in a response's rate limit headers.
#[derive(Debug, Clone, Default)]
pub(crate) struct RateInfo(Option<Verdict>);

impl RateInfo {
    /// Sets `RateLimit-Policy` and `RateLimit`, and `Retry-After` on a refusal.
    pub(crate) fn set_headers(&self, headers: &mut HeaderMap) {
        let Some(v) = &self.0 else { return };
        let name = v.limit.as_str();
        let policy = format!("\"{name}\";q={};w={}", v.quota.burst, v.quota.window_s());
        let state = format!("\"{name}\";r={};t={}", v.remaining, v.reset_ms.div_ceil(1_000));
        if let Ok(value) = HeaderValue::from_str(&policy) {
            headers.insert(RATELIMIT_POLICY_HEADER, value);
        }
        if let Ok(value) = HeaderValue::from_str(&state) {
            headers.insert(RATELIMIT_HEADER, value);
        }
        if !v.allowed {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(v.retry_after_ms.div_ceil(1_000).max(1)));
        }
    }
}

tokio::task_local! {
    /// The refusal of the request this task serves, for [`refusal_headers`] to put on the 429.
    static REFUSAL: RefCell<Option<RateInfo>>;
}

/// Puts the rate limit headers of a refusal on its 429 (a refusal leaves [`check`] as an
/// [`ApiError`], which carries no headers).
pub(crate) async fn refusal_headers(req: Request, next: Next) -> Response {
    REFUSAL
        .scope(RefCell::new(None), async move {
            let mut response = next.run(req).await;
            if let Some(info) = REFUSAL.with(|cell| cell.borrow_mut().take()) {
                info.set_headers(response.headers_mut());
            }
            response
        })
        .await
}

/// A keyed state store that holds at most `keys_max` keys: while full, new keys share one
/// overflow budget (so they are still limited, together) instead of growing the map.
struct BoundedStore {
    map: DashMapStateStore<Arc<str>>,
    keys_max: usize,
    overflow: Arc<str>,
    /// Requests counted against the overflow budget.
    overflowed: prometheus::IntCounter,
    /// Set when a new key found the map full, for housekeeping to clean up early.
    full: Arc<AtomicBool>,
}

impl StateStore for BoundedStore {
    type Key = Arc<str>;

    fn measure_and_replace<T, F, E>(&self, key: &Self::Key, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // The length is counted only for keys not yet held; two new keys arriving together
        // may both get in, so the map can exceed keys_max by the requests in flight.
        if !self.map.contains_key(key) && self.map.len() >= self.keys_max {
            self.overflowed.inc();
            self.full.store(true, Ordering::Relaxed);
            return self.map.measure_and_replace(&self.overflow, f);
        }
        self.map.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<Arc<str>> for BoundedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&self.map, drop_below);
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&self.map);
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

type Keyed = RateLimiter<Arc<str>, BoundedStore, MonotonicClock, StateInformationMiddleware>;

/// One in-process budget: a quota and its keyed limiter.
struct Local {
    quota: RateQuota,
    limiter: Keyed,
    /// The store's "a new key found the map full" flag.
    full: Arc<AtomicBool>,
}

impl Local {
    fn new(quota: RateQuota, keys_max: usize, overflowed: prometheus::IntCounter) -> Self {
        let full = Arc::new(AtomicBool::new(false));
        let store = BoundedStore {
            map: DashMapStateStore::default(),
            keys_max,
            overflow: Arc::from(OVERFLOW_KEY),
            overflowed,
            full: full.clone(),
        };
        let limiter: Keyed = RateLimiter::new(quota.governor_quota(), store, MonotonicClock);
        Self { quota, limiter, full }
    }

    fn check(&self, limit: Limit, key: &Arc<str>) -> Verdict {
        let t_ns = self.quota.emission_interval().as_nanos() as u64;
        let burst = u64::from(self.quota.burst);
        match self.limiter.check_key(key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity().min(self.quota.burst.saturating_sub(1));
                let used = burst.saturating_sub(u64::from(remaining));
                Verdict {
                    limit,
                    quota: self.quota,
                    allowed: true,
                    remaining,
                    reset_ms: (used.saturating_mul(t_ns)).div_ceil(1_000_000),
                    retry_after_ms: 0,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                let wait_ms = (wait.as_nanos() as u64).div_ceil(1_000_000);
                let tolerance_ms = (burst.saturating_sub(1).saturating_mul(t_ns)).div_ceil(1_000_000);
                Verdict {
                    limit,
                    quota: self.quota,
                    allowed: false,
                    remaining: 0,
                    reset_ms: wait_ms + tolerance_ms,
                    retry_after_ms: wait_ms.max(1),
                }
            }
        }
    }
}

/// A kernel's rate limiters.
pub(crate) struct Limiters {
    config: RateLimitConfig,
    per_key: Option<Local>,
    per_tenant: Option<Local>,
    per_route: HashMap<String, Local>,
    route_default: Option<Local>,
    started: Instant,
    /// Milliseconds since `started` of the last housekeeping.
    housekept_ms: AtomicU64,
    /// Milliseconds since `started` of the last early clean-up of a full map.
    full_cleanup_ms: AtomicU64,
    /// Milliseconds since `started` until which the store is not asked (it failed).
    store_down_until_ms: AtomicU64,
    /// Milliseconds since `started` of the last "store failed" log line (plus one; 0 = never).
    store_error_logged_ms: AtomicU64,
    store_errors: prometheus::IntCounter,
    keys: prometheus::IntGaugeVec,
}

impl Limiters {
    fn new(config: &RateLimitConfig, state: &AppState) -> Self {
        let keys_max = config.keys_max.max(1);
        let store_errors = prometheus::IntCounter::new(
            "rate_limit_store_errors_total",
            "Shared rate limit checks the store failed (answered by on_store_error)",
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        let overflowed = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "rate_limit_keys_overflow_total",
                "Requests counted against the shared overflow budget because a key map was full",
            ),
            &["limit"],
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        // A second limiter set on the same registry (two states over one `Metrics`) keeps
        // counting in its own, unregistered, counters.
        let _ = state.metrics.registry.register(Box::new(store_errors.clone()));
        let _ = state.metrics.registry.register(Box::new(overflowed.clone()));
        let keys = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "rate_limit_keys",
                "Keys held by the in-process rate limiters, at the last housekeeping",
            ),
            &["limit"],
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        let _ = state.metrics.registry.register(Box::new(keys.clone()));
        let overflow = |limit: Limit| overflowed.with_label_values(&[limit.as_str()]);
        Self {
            per_key: config.per_key.map(|q| Local::new(q, keys_max, overflow(Limit::Key))),
            per_tenant: config.per_tenant.map(|q| Local::new(q, keys_max, overflow(Limit::Tenant))),
            // One key per limiter: the route itself.
            per_route: config
                .per_route
                .iter()
                .map(|(route, q)| (route.clone(), Local::new(*q, 1, overflow(Limit::Route))))
                .collect(),
            // Routes are a fixed set (matched routes only); keys_max still bounds the map.
            route_default: config.route_default.map(|q| Local::new(q, keys_max, overflow(Limit::Route))),
            config: config.clone(),
            started: Instant::now(),
            housekept_ms: AtomicU64::new(0),
            full_cleanup_ms: AtomicU64::new(0),
            store_down_until_ms: AtomicU64::new(0),
            store_error_logged_ms: AtomicU64::new(0),
            store_errors,
            keys,
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn locals(&self) -> impl Iterator<Item = &Local> {
        self.per_key.iter().chain(&self.per_tenant).chain(&self.route_default).chain(self.per_route.values())
    }

    /// Drops stale keys every `housekeeping_interval_ms` (and as soon as a map is full, at
    /// most once a second); with shared limits, deletes the store's expired rows too.
    fn housekeep(&self, state: &AppState) {
        let now = self.now_ms();
        let last = self.housekept_ms.load(Ordering::Relaxed);
        let due = now.saturating_sub(last) >= self.config.housekeeping_interval_ms;
        if due && self.housekept_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            for local in self.locals() {
                local.limiter.retain_recent();
                local.limiter.shrink_to_fit();
            }
            let held = |local: &Option<Local>| local.as_ref().map_or(0, |l| l.limiter.len() as i64);
            self.keys.with_label_values(&[Limit::Key.as_str()]).set(held(&self.per_key));
            self.keys.with_label_values(&[Limit::Tenant.as_str()]).set(held(&self.per_tenant));
            let routes =
                held(&self.route_default) + self.per_route.values().map(|l| l.limiter.len() as i64).sum::<i64>();
            self.keys.with_label_values(&[Limit::Route.as_str()]).set(routes);
            if self.config.shared {
                let store = state.store.clone();
                let now_ms = state.clock.now_ms();
                tokio::spawn(async move {
                    match store.gcra_purge_expired(now_ms).await {
                        Ok(deleted) => tracing::debug!(deleted, "expired shared rate limit rows deleted"),
                        Err(err) => tracing::warn!(error = %err, "deleting expired shared rate limit rows failed"),
                    }
                });
            }
            return;
        }
        // A full map: clean up early (at most once a second) so new keys get their own budget
        // as soon as stale ones are gone.
        let last_full = self.full_cleanup_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last_full) >= FULL_CLEANUP_INTERVAL_MS
            && self.locals().any(|l| l.full.load(Ordering::Relaxed))
            && self.full_cleanup_ms.compare_exchange(last_full, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            for local in self.locals().filter(|l| l.full.swap(false, Ordering::Relaxed)) {
                local.limiter.retain_recent();
            }
        }
    }

    /// Notes a store failure: counted, logged at most once a second, store left alone a while.
    fn store_failed(&self, what: &str) {
        self.store_errors.inc();
        let now = self.now_ms();
        self.store_down_until_ms.fetch_max(now + STORE_BACKOFF_MS, Ordering::Relaxed);
        let last = self.store_error_logged_ms.load(Ordering::Relaxed);
        if (last == 0 || now + 1 >= last + STORE_ERROR_LOG_INTERVAL_MS)
            && self.store_error_logged_ms.compare_exchange(last, now + 1, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(
                error = what,
                on_store_error = ?self.config.on_store_error,
                "shared rate limit check failed; the store is skipped for {STORE_BACKOFF_MS} ms"
            );
        }
    }

    /// One budget's verdict: from the store when shared and reachable, else in process.
    async fn decide(
        &self,
        state: &AppState,
        local: &Local,
        limit: Limit,
        key: &Arc<str>,
        store_ok: &mut bool,
    ) -> Result<Verdict, ApiError> {
        if self.config.shared && *store_ok {
            let down = self.now_ms() < self.store_down_until_ms.load(Ordering::Relaxed);
            let answer = if down {
                Err("the store failed recently".to_string())
            } else {
                let shared_key = format!("{}:{key}", &limit.as_str()[..1]);
                let check = state.store.gcra_check(
                    &shared_key,
                    local.quota.emission_interval_ms(),
                    local.quota.burst,
                    state.clock.now_ms(),
                );
                match tokio::time::timeout(Duration::from_millis(self.config.store_timeout_ms), check).await {
                    Ok(Ok(outcome)) => Ok(outcome),
                    Ok(Err(err)) => {
                        let text = err.to_string();
                        self.store_failed(&text);
                        Err(text)
                    }
                    Err(_) => {
                        self.store_failed("no answer in time");
                        Err("no answer in time".to_string())
                    }
                }
            };
            match answer {
                Ok(outcome) => {
                    return Ok(Verdict {
                        limit,
                        quota: local.quota,
                        allowed: outcome.allowed,
                        remaining: outcome.remaining,
                        reset_ms: outcome.reset_ms.max(0) as u64,
                        retry_after_ms: outcome.retry_after_ms.max(0) as u64,
                    });
                }
                Err(_) => {
                    *store_ok = false;
                    if self.config.on_store_error == OnStoreError::Deny {
                        return Err(ApiError {
                            detail: Some("shared rate limit store unavailable".into()),
                            ..ApiError::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "rate_limit_unavailable",
                                "rate limits cannot be checked right now; retry later",
                            )
                        });
                    }
                }
            }
        }
        Ok(local.check(limit, key))
    }
}

/// Counts the request against its credential's, tenant's and route's budgets.
///
/// Returns the most constraining budget for the response headers
/// ([`RateInfo::set_headers`]). A spent budget returns 429 `rate_limited` (its headers are
/// put on the response by [`refusal_headers`]) and counts
/// `nops_rate_limited_total{limit="key|tenant|route"}`; with `shared` limits and
/// `on_store_error = "deny"`, an unreachable store returns 503 `rate_limit_unavailable`.
pub(crate) async fn check(
    state: &AppState,
    principal: &Principal,
    tenant: &TenantId,
    route: &str,
    method: &Method,
) -> Result<RateInfo, ApiError> {
    if !state.http.rate_limits.enabled {
        return Ok(RateInfo::default());
    }
    let limiters = LimiterSlot::get(state);
    limiters.housekeep(state);
    let method = if *method == Method::HEAD { &Method::GET } else { method };
    let route_key = format!("{method} {route}");
    let mut verdicts: Vec<Verdict> = Vec::with_capacity(3);
    let mut store_ok = true;
    let route_local = limiters.per_route.get(&route_key).or(limiters.route_default.as_ref());
    let checks = [
        (Limit::Key, limiters.per_key.as_ref()),
        (Limit::Tenant, limiters.per_tenant.as_ref()),
        (Limit::Route, route_local),
    ];
    for (limit, local) in checks {
        let Some(local) = local else { continue };
        // Keys are built only for the budgets that exist.
        let key: Arc<str> = match limit {
            Limit::Key => principal.credential.clone(),
            Limit::Tenant => Arc::from(tenant.as_str()),
            Limit::Route => Arc::from(route_key.as_str()),
        };
        let verdict = limiters.decide(state, local, limit, &key, &mut store_ok).await?;
        if !verdict.allowed {
            state.metrics.rate_limited_total.with_label_values(&[limit.as_str()]).inc();
            tracing::debug!(limit = limit.as_str(), route = %route_key, "rate limited");
            let info = RateInfo(Some(verdict));
            let _ = REFUSAL.try_with(|cell| *cell.borrow_mut() = Some(info));
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("rate limit exceeded ({} budget); retry later", limit.as_str()),
            ));
        }
        verdicts.push(verdict);
    }
    // The most constraining: fewest requests left, then the longest until reset.
    let most = verdicts.into_iter().min_by(|a, b| a.remaining.cmp(&b.remaining).then(b.reset_ms.cmp(&a.reset_ms)));
    Ok(RateInfo(most))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_name_their_window() {
        let q = RateQuota::new(200.0, 400);
        assert_eq!(q.window_s(), 2);
        assert_eq!(q.emission_interval_ms(), 5);
        assert_eq!(RateQuota::new(0.5, 1).emission_interval_ms(), 2_000);
        assert!(RateQuota::new(0.0, 1).validate("x").is_err());
        assert!(RateQuota::new(1.0, 0).validate("x").is_err());
    }

    #[test]
    fn route_names_are_checked() {
        let mut config = RateLimitConfig::default();
        config.per_route.insert("POST /api/v1/agents".into(), RateQuota::new(1.0, 1));
        assert!(config.validate(["POST /api/v1/agents"]).is_ok());
        assert!(config.validate(["GET /api/v1/agents"]).is_err());
        config.shared = true;
        config.per_key = Some(RateQuota::new(5_000.0, 10));
        assert!(config.validate(["POST /api/v1/agents"]).is_err(), "too fast to share");
    }

    #[test]
    fn a_local_budget_refuses_past_its_burst_and_reports_it() {
        let local = Local::new(RateQuota::new(1.0, 3), 10, prometheus::IntCounter::new("x", "x").expect("counter"));
        let key: Arc<str> = Arc::from("k");
        let first = local.check(Limit::Key, &key);
        assert!(first.allowed);
        assert_eq!(first.remaining, 2);
        assert!(local.check(Limit::Key, &key).allowed);
        assert!(local.check(Limit::Key, &key).allowed);
        let refused = local.check(Limit::Key, &key);
        assert!(!refused.allowed);
        assert!(refused.retry_after_ms > 0 && refused.retry_after_ms <= 1_000, "{refused:?}");
        let mut headers = HeaderMap::new();
        RateInfo(Some(refused)).set_headers(&mut headers);
        assert_eq!(headers["ratelimit-policy"], "\"key\";q=3;w=3");
        assert_eq!(headers["ratelimit"], "\"key\";r=0;t=3");
        assert_eq!(headers["retry-after"], "1");
    }

    #[test]
    fn a_full_key_map_sends_new_keys_to_the_overflow_budget() {
        let overflowed = prometheus::IntCounter::new("x", "x").expect("counter");
        let local = Local::new(RateQuota::new(1.0, 2), 3, overflowed.clone());
        for i in 0..10 {
            let _ = local.check(Limit::Key, &Arc::from(format!("k{i}").as_str()));
        }
        assert!(local.limiter.len() <= 4, "3 keys and the overflow: {}", local.limiter.len());
        assert_eq!(overflowed.get(), 7);
        assert!(!local.check(Limit::Key, &Arc::from("k99")).allowed, "new keys share the spent overflow budget");
        assert!(local.check(Limit::Key, &Arc::from("k0")).allowed, "held keys keep their own budget");
    }
}
