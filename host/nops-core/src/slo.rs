//! Service level objectives: SLIs measured by the kernel, multi-window multi-burn-rate alerts.
//!
//! Each SLO names an SLI over the kernel's own HTTP metrics: `availability` (the share of
//! responses that are not 5xx) or `latency` (the share of requests answered within
//! `threshold_ms`, a bound of the request-duration histogram), optionally for one route
//! prefix, and an objective such as 0.999 over `window_days`.
//!
//! [`SloService::sample`] reads the cumulative counters (`nops_http_requests_total`,
//! `nops_http_request_duration_seconds`) and adds what changed since the last sample to the
//! current minute of a bounded ring per SLO (one bucket of good/total counts per minute, as
//! many minutes as the SLO window, at most [`WINDOW_DAYS_MAX`] days). From the ring it computes
//! the SLI and the **burn rate** over each alert window: `burn = (1 - SLI) / (1 - objective)`,
//! so a burn rate of 1 spends exactly the error budget over the SLO window. An alert fires when
//! both its long and its short window burn faster than its factor (the SRE workbook's
//! multi-window, multi-burn-rate alerts): by default page at 14.4 over 1 h and 5 min or 6 over
//! 6 h and 30 min, ticket at 3 over 1 d and 2 h or 1 over 3 d and 6 h.
//!
//! Time comes from the kernel's [`Clock`]. The ring lives in memory: it starts empty when the
//! kernel starts (the Prometheus rules in `deploy/prometheus/` are the durable view).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::core::Collector;
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::metrics::{LATENCY_BUCKETS_SECONDS, Metrics};

/// Longest SLO window, in days; also bounds the ring (one bucket per minute).
pub const WINDOW_DAYS_MAX: u32 = 31;
/// Most SLOs.
pub const SLOS_MAX: usize = 32;
/// Most alert rules.
pub const ALERTS_MAX: usize = 16;
/// Longest SLO name, in bytes.
pub const SLO_NAME_BYTES_MAX: usize = 64;
/// How often the background task samples the metrics, by default, in ms.
pub const SAMPLE_INTERVAL_MS_DEFAULT: u64 = 10_000;
/// One ring bucket, in ms.
pub const BUCKET_MS: i64 = 60_000;
/// The long-poll route of pull agents: slow by design, left out of the default latency SLO.
pub const LONG_POLL_ROUTE: &str = "/api/v1/agents/{id}/tasks/next";
/// Minutes in a day.
const DAY_MINUTES: u32 = 24 * 60;

/// What an SLO measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SliKind {
    /// Share of HTTP responses that are not 5xx.
    Availability,
    /// Share of HTTP requests answered within `threshold_ms`.
    Latency,
}

/// One SLO, as configured in `[[slo]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SloSpec {
    /// Its name: 1 to 64 bytes of lowercase letters, digits, `-` and `_`.
    pub name: String,
    /// What it measures.
    pub sli: SliKind,
    /// The target share of good events, strictly between 0 and 1 (e.g. 0.999).
    pub objective: f64,
    /// The window the objective holds over, in days (default 30, at most 31).
    #[serde(default = "SloSpec::default_window_days")]
    pub window_days: u32,
    /// Only requests whose matched route starts with this (e.g. `/api/v1`); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_prefix: Option<String>,
    /// Matched routes left out (e.g. a long-poll endpoint for a latency SLO).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_routes: Vec<String>,
    /// Latency SLOs: a request is good when answered within this many ms; must be a bound
    /// of the request-duration histogram.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_ms: Option<f64>,
}

impl SloSpec {
    fn default_window_days() -> u32 {
        30
    }

    fn counts(&self, route: &str) -> bool {
        self.route_prefix.as_deref().is_none_or(|p| route.starts_with(p))
            && !self.exclude_routes.iter().any(|r| r == route)
    }
}

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Wake someone up.
    Page,
    /// Look at it during working hours.
    Ticket,
}

impl Severity {
    /// As written in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Page => "page",
            Self::Ticket => "ticket",
        }
    }
}

/// One multi-window burn-rate alert rule, as configured in `[[slo_alert]]`: fires when the
/// burn rate over both windows exceeds `burn_rate`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertSpec {
    /// How urgent.
    pub severity: Severity,
    /// The long window, in minutes.
    pub long_window_minutes: u32,
    /// The short window, in minutes (shorter than the long one), so the alert stops soon
    /// after the errors do.
    pub short_window_minutes: u32,
    /// The burn-rate factor both windows must exceed.
    pub burn_rate: f64,
}

impl AlertSpec {
    /// The SRE workbook's four rules.
    pub fn defaults() -> Vec<Self> {
        let rule = |severity, long, short, burn_rate| Self {
            severity,
            long_window_minutes: long,
            short_window_minutes: short,
            burn_rate,
        };
        vec![
            rule(Severity::Page, 60, 5, 14.4),
            rule(Severity::Page, 360, 30, 6.0),
            rule(Severity::Ticket, DAY_MINUTES, 120, 3.0),
            rule(Severity::Ticket, 3 * DAY_MINUTES, 360, 1.0),
        ]
    }
}

/// SLOs and alert rules.
#[derive(Debug, Clone, PartialEq)]
pub struct SloConfig {
    /// The SLOs.
    pub slos: Vec<SloSpec>,
    /// The alert rules, applied to every SLO.
    pub alerts: Vec<AlertSpec>,
    /// How often the background task samples the metrics, in ms.
    pub sample_interval_ms: u64,
}

impl Default for SloConfig {
    /// 99.9 % of `/api/v1` responses not 5xx and 99 % answered within 250 ms (the long poll
    /// of pull agents left out), over 30 days, with the workbook's alert rules.
    fn default() -> Self {
        Self {
            slos: vec![
                SloSpec {
                    name: "api-availability".into(),
                    sli: SliKind::Availability,
                    objective: 0.999,
                    window_days: 30,
                    route_prefix: Some("/api/v1".into()),
                    exclude_routes: Vec::new(),
                    threshold_ms: None,
                },
                SloSpec {
                    name: "api-latency".into(),
                    sli: SliKind::Latency,
                    objective: 0.99,
                    window_days: 30,
                    route_prefix: Some("/api/v1".into()),
                    exclude_routes: vec![LONG_POLL_ROUTE.into()],
                    threshold_ms: Some(250.0),
                },
            ],
            alerts: AlertSpec::defaults(),
            sample_interval_ms: SAMPLE_INTERVAL_MS_DEFAULT,
        }
    }
}

/// The latency thresholds a latency SLO may use: the bounds of the request-duration
/// histogram, in ms.
pub fn latency_thresholds_ms() -> Vec<f64> {
    LATENCY_BUCKETS_SECONDS.iter().map(|s| s * 1000.0).collect()
}

impl SloConfig {
    /// Checks every SLO and alert rule; the message names the offending entry.
    pub fn validate(&self) -> Result<(), String> {
        if self.slos.len() > SLOS_MAX {
            return Err(format!("at most {SLOS_MAX} [[slo]] entries"));
        }
        if self.alerts.len() > ALERTS_MAX {
            return Err(format!("at most {ALERTS_MAX} [[slo_alert]] entries"));
        }
        if self.sample_interval_ms == 0 || self.sample_interval_ms > 60_000 {
            return Err("sample_interval_ms must be between 1 and 60000".into());
        }
        let mut names = std::collections::HashSet::new();
        for slo in &self.slos {
            let name = &slo.name;
            let name_ok = !name.is_empty()
                && name.len() <= SLO_NAME_BYTES_MAX
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
            if !name_ok {
                return Err(format!(
                    "[[slo]] name `{name}`: 1 to {SLO_NAME_BYTES_MAX} bytes of lowercase letters, digits, `-` and `_`"
                ));
            }
            if !names.insert(name.as_str()) {
                return Err(format!("[[slo]] `{name}` is configured twice"));
            }
            if !slo.objective.is_finite() || slo.objective <= 0.0 || slo.objective >= 1.0 {
                return Err(format!("[[slo]] `{name}`: objective must lie strictly between 0 and 1 (e.g. 0.999)"));
            }
            if slo.window_days == 0 || slo.window_days > WINDOW_DAYS_MAX {
                return Err(format!("[[slo]] `{name}`: window_days must be between 1 and {WINDOW_DAYS_MAX}"));
            }
            match (slo.sli, slo.threshold_ms) {
                (SliKind::Availability, Some(_)) => {
                    return Err(format!("[[slo]] `{name}`: threshold_ms applies to latency SLOs only"));
                }
                (SliKind::Latency, None) => {
                    return Err(format!("[[slo]] `{name}`: a latency SLO needs threshold_ms"));
                }
                (SliKind::Latency, Some(t)) if !latency_thresholds_ms().iter().any(|b| (b - t).abs() < 1e-9) => {
                    let bounds: Vec<String> = latency_thresholds_ms().iter().map(|b| b.to_string()).collect();
                    return Err(format!(
                        "[[slo]] `{name}`: threshold_ms = {t} is not a bound of the request-duration histogram; \
                         use one of {}",
                        bounds.join(", ")
                    ));
                }
                _ => {}
            }
        }
        for (i, alert) in self.alerts.iter().enumerate() {
            let label = format!("[[slo_alert]] #{}", i + 1);
            if alert.short_window_minutes == 0 || alert.short_window_minutes >= alert.long_window_minutes {
                return Err(format!("{label}: short_window_minutes must be at least 1 and below long_window_minutes"));
            }
            if alert.long_window_minutes > WINDOW_DAYS_MAX * DAY_MINUTES {
                return Err(format!("{label}: long_window_minutes must be at most {}", WINDOW_DAYS_MAX * DAY_MINUTES));
            }
            if !alert.burn_rate.is_finite() || alert.burn_rate <= 0.0 {
                return Err(format!("{label}: burn_rate must be a positive number"));
            }
        }
        Ok(())
    }

    /// Every window the alerts use, in minutes, shortest first.
    pub fn windows(&self) -> Vec<u32> {
        let mut windows: Vec<u32> =
            self.alerts.iter().flat_map(|a| [a.short_window_minutes, a.long_window_minutes]).collect();
        windows.sort_unstable();
        windows.dedup();
        windows
    }
}

/// A window as a short label: `5m`, `1h`, `3d`.
pub fn window_label(minutes: u32) -> String {
    if minutes.is_multiple_of(DAY_MINUTES) {
        format!("{}d", minutes / DAY_MINUTES)
    } else if minutes.is_multiple_of(60) {
        format!("{}h", minutes / 60)
    } else {
        format!("{minutes}m")
    }
}

/// Good and total events of one minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    minute: i64,
    good: u64,
    total: u64,
}

/// The ring of one SLO: per-minute buckets, oldest first, at most `minutes_max` minutes.
#[derive(Debug, Clone)]
struct Ring {
    buckets: VecDeque<Bucket>,
    minutes_max: u32,
}

impl Ring {
    fn new(minutes_max: u32) -> Self {
        Self { buckets: VecDeque::new(), minutes_max }
    }

    fn add(&mut self, minute: i64, good: u64, total: u64) {
        match self.buckets.back_mut() {
            // A clock that stepped back lands in the newest bucket rather than reordering.
            Some(last) if last.minute >= minute => {
                last.good = last.good.saturating_add(good);
                last.total = last.total.saturating_add(total);
            }
            _ => self.buckets.push_back(Bucket { minute, good, total }),
        }
        self.trim(minute);
    }

    fn trim(&mut self, now_minute: i64) {
        let oldest = now_minute - i64::from(self.minutes_max) + 1;
        while self.buckets.front().is_some_and(|b| b.minute < oldest) {
            self.buckets.pop_front();
        }
    }

    /// Good and total over the last `minutes` minutes up to `now_minute` (inclusive).
    fn sum(&self, now_minute: i64, minutes: u32) -> (u64, u64) {
        let oldest = now_minute - i64::from(minutes) + 1;
        self.buckets
            .iter()
            .rev()
            .take_while(|b| b.minute >= oldest)
            .filter(|b| b.minute <= now_minute)
            .fold((0, 0), |(g, t), b| (g + b.good, t + b.total))
    }
}

/// The burn rate of an error budget: the error ratio over the budget's share (0 without
/// events).
pub fn burn_rate(good: u64, total: u64, objective: f64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let error_ratio = total.saturating_sub(good) as f64 / total as f64;
    error_ratio / (1.0 - objective)
}

/// One window of an SLO report.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct WindowReport {
    /// The window, e.g. `5m`, `1h`, `3d`.
    pub window: String,
    /// Its length in minutes.
    pub minutes: u32,
    /// Good events in it.
    pub good: u64,
    /// All events in it.
    pub total: u64,
    /// good / total; absent without events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sli: Option<f64>,
    /// How fast the error budget burns over it (1 = exactly the budget over the SLO window).
    pub burn_rate: f64,
}

/// One alert rule's state for one SLO.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AlertReport {
    /// How urgent.
    pub severity: Severity,
    /// The long window, e.g. `1h`.
    pub long_window: String,
    /// The short window, e.g. `5m`.
    pub short_window: String,
    /// The factor both must exceed.
    pub burn_rate_threshold: f64,
    /// Whether both exceed it now.
    pub firing: bool,
}

/// One SLO now.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SloReport {
    /// The SLO as configured.
    #[serde(flatten)]
    pub spec: SloSpec,
    /// The SLI over the whole SLO window (as far as the kernel has measured it); absent
    /// without events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_sli: Option<f64>,
    /// Share of the error budget left over the SLO window (negative when overspent).
    pub error_budget_remaining_ratio: f64,
    /// The SLI and burn rate over each alert window, shortest first.
    pub windows: Vec<WindowReport>,
    /// Each alert rule.
    pub alerts: Vec<AlertReport>,
    /// The severities firing now.
    pub firing: Vec<Severity>,
}

/// Every SLO now.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SloStatus {
    /// When the report was computed (ms since the Unix epoch, the kernel's clock).
    pub at_ms: i64,
    /// Since when this kernel has measured (its start).
    pub since_ms: i64,
    /// The SLOs.
    pub slos: Vec<SloReport>,
}

struct Tracked {
    spec: SloSpec,
    /// Cumulative good and total at the last sample.
    last: (u64, u64),
    ring: Ring,
}

/// Measures the SLOs and computes their burn rates and alerts.
pub struct SloService {
    config: SloConfig,
    windows: Vec<u32>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    since_ms: i64,
    tracked: Mutex<Vec<Tracked>>,
}

impl std::fmt::Debug for SloService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SloService").field("config", &self.config).finish_non_exhaustive()
    }
}

impl SloService {
    /// A service measuring `config`'s SLOs from `metrics`, from now on. The configuration
    /// must have passed [`SloConfig::validate`].
    pub fn new(config: SloConfig, clock: Arc<dyn Clock>, metrics: Metrics) -> Self {
        let windows = config.windows();
        let longest_alert = windows.last().copied().unwrap_or(0);
        let tracked = config
            .slos
            .iter()
            .map(|spec| {
                let minutes_max = (spec.window_days.min(WINDOW_DAYS_MAX) * DAY_MINUTES).max(longest_alert);
                Tracked { spec: spec.clone(), last: (0, 0), ring: Ring::new(minutes_max) }
            })
            .collect();
        let service = Self { windows, since_ms: clock.now_ms(), clock, metrics, tracked: Mutex::new(tracked), config };
        // Counts from before the service existed belong to no minute it measures.
        service.with_tracked(|tracked, metrics| {
            for t in tracked.iter_mut() {
                t.last = read(metrics, &t.spec);
            }
        });
        service
    }

    /// The configuration.
    pub fn config(&self) -> &SloConfig {
        &self.config
    }

    fn with_tracked<R>(&self, f: impl FnOnce(&mut Vec<Tracked>, &Metrics) -> R) -> R {
        // A panic while holding the lock leaves plain counters behind: still usable.
        let mut tracked = self.tracked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut tracked, &self.metrics)
    }

    /// Adds what the counters gained since the last sample to the current minute and updates
    /// the `nops_slo_*` metrics.
    pub fn sample(&self) {
        let now_minute = self.clock.now_ms().div_euclid(BUCKET_MS);
        let reports = self.with_tracked(|tracked, metrics| {
            for t in tracked.iter_mut() {
                let now = read(metrics, &t.spec);
                let good = now.0.saturating_sub(t.last.0);
                let total = now.1.saturating_sub(t.last.1);
                t.last = now;
                t.ring.add(now_minute, good.min(total), total);
            }
            tracked.iter().map(|t| self.report_one(t, now_minute)).collect::<Vec<_>>()
        });
        for report in &reports {
            self.export(report);
        }
    }

    /// Samples, then reports every SLO.
    pub fn status(&self) -> SloStatus {
        self.sample();
        let at_ms = self.clock.now_ms();
        let now_minute = at_ms.div_euclid(BUCKET_MS);
        let slos = self.with_tracked(|tracked, _| tracked.iter().map(|t| self.report_one(t, now_minute)).collect());
        SloStatus { at_ms, since_ms: self.since_ms, slos }
    }

    /// Samples every `sample_interval_ms`, forever.
    pub async fn run_sampler(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.sample_interval_ms.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sample();
        }
    }

    fn report_one(&self, t: &Tracked, now_minute: i64) -> SloReport {
        let objective = t.spec.objective;
        let windows: Vec<WindowReport> = self
            .windows
            .iter()
            .map(|&minutes| {
                let (good, total) = t.ring.sum(now_minute, minutes);
                WindowReport {
                    window: window_label(minutes),
                    minutes,
                    good,
                    total,
                    sli: (total > 0).then(|| good as f64 / total as f64),
                    burn_rate: burn_rate(good, total, objective),
                }
            })
            .collect();
        let burn = |minutes: u32| windows.iter().find(|w| w.minutes == minutes).map_or(0.0, |w| w.burn_rate);
        let alerts: Vec<AlertReport> = self
            .config
            .alerts
            .iter()
            .map(|a| AlertReport {
                severity: a.severity,
                long_window: window_label(a.long_window_minutes),
                short_window: window_label(a.short_window_minutes),
                burn_rate_threshold: a.burn_rate,
                firing: burn(a.long_window_minutes) > a.burn_rate && burn(a.short_window_minutes) > a.burn_rate,
            })
            .collect();
        let mut firing: Vec<Severity> = alerts.iter().filter(|a| a.firing).map(|a| a.severity).collect();
        firing.sort_unstable();
        firing.dedup();
        let (good, total) = t.ring.sum(now_minute, t.spec.window_days * DAY_MINUTES);
        SloReport {
            spec: t.spec.clone(),
            window_sli: (total > 0).then(|| good as f64 / total as f64),
            error_budget_remaining_ratio: 1.0 - burn_rate(good, total, objective),
            windows,
            alerts,
            firing,
        }
    }

    fn export(&self, report: &SloReport) {
        let m = &self.metrics;
        let name = report.spec.name.as_str();
        for w in &report.windows {
            m.slo_burn_rate.with_label_values(&[name, &w.window]).set(w.burn_rate);
            if let Some(sli) = w.sli {
                m.slo_sli.with_label_values(&[name, &w.window]).set(sli);
            }
        }
        let mut by_severity: BTreeMap<Severity, bool> = BTreeMap::new();
        for a in &report.alerts {
            *by_severity.entry(a.severity).or_default() |= a.firing;
        }
        for (severity, firing) in by_severity {
            m.slo_alert_firing.with_label_values(&[name, severity.as_str()]).set(i64::from(firing));
        }
        m.slo_error_budget_remaining_ratio.with_label_values(&[name]).set(report.error_budget_remaining_ratio);
    }
}

/// Cumulative (good, total) of `spec`'s SLI from the HTTP metrics now.
fn read(metrics: &Metrics, spec: &SloSpec) -> (u64, u64) {
    let label = |m: &prometheus::proto::Metric, name: &str| -> String {
        m.get_label().iter().find(|l| l.name() == name).map(|l| l.value().to_owned()).unwrap_or_default()
    };
    let (mut good, mut total) = (0u64, 0u64);
    match spec.sli {
        SliKind::Availability => {
            for family in metrics.http_requests_total.collect() {
                for m in family.get_metric() {
                    if !spec.counts(&label(m, "route")) {
                        continue;
                    }
                    // Counters of this kernel are integers kept as f64 by the exposition model.
                    let n = m.get_counter().get_value().max(0.0) as u64;
                    total += n;
                    if !label(m, "status").starts_with('5') {
                        good += n;
                    }
                }
            }
        }
        SliKind::Latency => {
            let threshold_s = spec.threshold_ms.unwrap_or(0.0) / 1000.0;
            for family in metrics.http_request_duration_seconds.collect() {
                for m in family.get_metric() {
                    if !spec.counts(&label(m, "route")) {
                        continue;
                    }
                    let histogram = m.get_histogram();
                    total += histogram.get_sample_count();
                    good += histogram
                        .get_bucket()
                        .iter()
                        .find(|b| (b.upper_bound() - threshold_s).abs() < 1e-12)
                        .map_or(0, |b| b.cumulative_count());
                }
            }
        }
    }
    (good, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    const T0: i64 = 1_767_225_600_000;

    fn service(objective: f64) -> (SloService, ManualClock, Metrics) {
        let clock = ManualClock::new(T0);
        let metrics = Metrics::new();
        let config = SloConfig {
            slos: vec![SloSpec {
                name: "avail".into(),
                sli: SliKind::Availability,
                objective,
                window_days: 30,
                route_prefix: Some("/api/v1".into()),
                exclude_routes: Vec::new(),
                threshold_ms: None,
            }],
            ..SloConfig::default()
        };
        config.validate().expect("valid");
        (SloService::new(config, Arc::new(clock.clone()), metrics.clone()), clock, metrics)
    }

    /// One minute of traffic: `ok` good and `failed` 5xx responses, then a sample.
    fn minute(s: &SloService, clock: &ManualClock, metrics: &Metrics, ok: u64, failed: u64) {
        metrics.http_requests_total.with_label_values(&["/api/v1/agents", "GET", "200"]).inc_by(ok);
        metrics.http_requests_total.with_label_values(&["/api/v1/agents", "POST", "503"]).inc_by(failed);
        s.sample();
        clock.advance_ms(BUCKET_MS);
    }

    fn pages(status: &SloStatus) -> Vec<(String, bool)> {
        status.slos[0]
            .alerts
            .iter()
            .filter(|a| a.severity == Severity::Page)
            .map(|a| (format!("{}/{}", a.long_window, a.short_window), a.firing))
            .collect()
    }

    #[test]
    fn burn_rate_is_the_error_ratio_over_the_budget() {
        assert_eq!(burn_rate(0, 0, 0.999), 0.0);
        assert!((burn_rate(999, 1000, 0.999) - 1.0).abs() < 1e-9);
        assert!((burn_rate(0, 10, 0.999) - 1000.0).abs() < 1e-6);
        assert!((burn_rate(90, 100, 0.99) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn windows_are_labelled_by_their_largest_unit() {
        assert_eq!(window_label(5), "5m");
        assert_eq!(window_label(90), "90m");
        assert_eq!(window_label(360), "6h");
        assert_eq!(window_label(4320), "3d");
    }

    #[test]
    fn five_failing_minutes_page_only_once_the_long_window_burns_too() {
        // 99 %: the budget is 1 %; burn 14.4 needs 14.4 % errors over both 1 h and 5 min.
        let (s, clock, metrics) = service(0.99);
        for _ in 0..55 {
            minute(&s, &clock, &metrics, 100, 0);
        }
        for _ in 0..5 {
            minute(&s, &clock, &metrics, 0, 100);
        }
        clock.advance_ms(-BUCKET_MS);
        let status = s.status();
        let five = &status.slos[0].windows[0];
        assert_eq!((five.window.as_str(), five.good, five.total), ("5m", 0, 500));
        assert!((five.burn_rate - 100.0).abs() < 1e-9, "all failing: burn = 1 / 0.01");
        let hour = status.slos[0].windows.iter().find(|w| w.window == "1h").expect("1h");
        assert!((hour.burn_rate - 500.0 / 6000.0 / 0.01).abs() < 1e-9, "{hour:?}");
        assert_eq!(pages(&status), [("1h/5m".into(), false), ("6h/30m".into(), true)]);
        clock.advance_ms(BUCKET_MS);
        // Four more failing minutes: 9 of 60 minutes failed, 15 % > 14.4 %.
        for _ in 0..4 {
            minute(&s, &clock, &metrics, 0, 100);
        }
        clock.advance_ms(-BUCKET_MS);
        let status = s.status();
        assert_eq!(pages(&status)[0], ("1h/5m".into(), true));
        assert_eq!(status.slos[0].firing, [Severity::Page, Severity::Ticket]);
        assert_eq!(metrics.slo_alert_firing.with_label_values(&["avail", "page"]).get(), 1);
    }

    #[test]
    fn the_short_window_ends_the_alert_soon_after_the_errors_stop() {
        let (s, clock, metrics) = service(0.999);
        for _ in 0..10 {
            minute(&s, &clock, &metrics, 0, 100);
        }
        clock.advance_ms(-BUCKET_MS);
        assert_eq!(s.status().slos[0].firing, [Severity::Page, Severity::Ticket]);
        clock.advance_ms(BUCKET_MS);
        // Five good minutes: the 5 min window is clean, the 1 h one still burns.
        for _ in 0..5 {
            minute(&s, &clock, &metrics, 100, 0);
        }
        clock.advance_ms(-BUCKET_MS);
        let status = s.status();
        let hour = status.slos[0].windows.iter().find(|w| w.window == "1h").expect("1h");
        assert!(hour.burn_rate > 14.4);
        assert_eq!(pages(&status)[0], ("1h/5m".into(), false));
        assert_eq!(metrics.slo_burn_rate.with_label_values(&["avail", "5m"]).get(), 0.0);
    }

    #[test]
    fn no_traffic_burns_nothing_and_keeps_the_budget() {
        let (s, clock, _) = service(0.999);
        clock.advance_ms(3 * 60 * BUCKET_MS);
        let status = s.status();
        assert!(status.slos[0].firing.is_empty());
        assert_eq!(status.slos[0].error_budget_remaining_ratio, 1.0);
        assert!(status.slos[0].windows.iter().all(|w| w.burn_rate == 0.0 && w.sli.is_none()));
    }

    #[test]
    fn the_error_budget_shrinks_with_errors_over_the_slo_window() {
        let (s, clock, metrics) = service(0.99);
        minute(&s, &clock, &metrics, 995, 5);
        clock.advance_ms(-BUCKET_MS);
        let status = s.status();
        assert!((status.slos[0].error_budget_remaining_ratio - 0.5).abs() < 1e-9);
        assert!((metrics.slo_error_budget_remaining_ratio.with_label_values(&["avail"]).get() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn routes_outside_the_prefix_do_not_count_and_the_ring_is_bounded() {
        let (s, clock, metrics) = service(0.999);
        metrics.http_requests_total.with_label_values(&["/metrics", "GET", "500"]).inc_by(7);
        minute(&s, &clock, &metrics, 1, 0);
        clock.advance_ms(-BUCKET_MS);
        assert_eq!(s.status().slos[0].windows[0].total, 1);
        // 31 days later, the ring holds at most its window.
        for _ in 0..3 {
            clock.advance_ms(i64::from(WINDOW_DAYS_MAX) * 24 * 60 * BUCKET_MS);
            minute(&s, &clock, &metrics, 1, 0);
        }
        let len = s.with_tracked(|t, _| t[0].ring.buckets.len());
        assert!(len <= 2, "{len}");
    }

    #[test]
    fn latency_slos_count_requests_within_the_threshold() {
        let clock = ManualClock::new(T0);
        let metrics = Metrics::new();
        let spec = SloSpec {
            name: "fast".into(),
            sli: SliKind::Latency,
            objective: 0.9,
            window_days: 1,
            route_prefix: None,
            exclude_routes: vec!["/api/v1/slow".into()],
            threshold_ms: Some(250.0),
        };
        let config = SloConfig { slos: vec![spec], ..SloConfig::default() };
        config.validate().expect("valid");
        let s = SloService::new(config, Arc::new(clock.clone()), metrics.clone());
        let h = metrics.http_request_duration_seconds.with_label_values(&["/api/v1/agents", "GET"]);
        for secs in [0.001, 0.2, 0.25, 0.3, 3.0] {
            h.observe(secs);
        }
        metrics.http_request_duration_seconds.with_label_values(&["/api/v1/slow", "GET"]).observe(9.0);
        let w = &s.status().slos[0].windows[0];
        assert_eq!((w.good, w.total), (3, 5));
    }

    #[test]
    fn bad_configurations_are_refused_with_a_clear_message() {
        let base = SloConfig::default();
        let mut bad = base.clone();
        bad.slos[1].threshold_ms = Some(300.0);
        let err = bad.validate().expect_err("300 ms is no bucket bound");
        assert!(err.contains("not a bound") && err.contains("250"), "{err}");
        for (edit, needle) in [
            ((|c: &mut SloConfig| c.slos[0].objective = 1.0) as fn(&mut SloConfig), "objective"),
            (|c| c.slos[0].window_days = 0, "window_days"),
            (|c| c.slos[0].name = "Bad Name".into(), "name"),
            (|c| c.slos[1].name = "api-availability".into(), "twice"),
            (|c| c.slos[0].threshold_ms = Some(250.0), "latency SLOs only"),
            (|c| c.slos[1].threshold_ms = None, "needs threshold_ms"),
            (|c| c.alerts[0].short_window_minutes = 60, "short_window_minutes"),
            (|c| c.alerts[0].burn_rate = 0.0, "burn_rate"),
        ] {
            let mut c = base.clone();
            edit(&mut c);
            let err = c.validate().expect_err(needle);
            assert!(err.contains(needle), "{needle}: {err}");
        }
        assert_eq!(base.validate(), Ok(()));
    }
}
