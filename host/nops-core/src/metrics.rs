//! The kernel's Prometheus metrics, registered once and shared by every layer.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every metric the kernel exports, in one Prometheus registry.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// HTTP requests by matched route, method and status.
    pub http_requests_total: IntCounterVec,
    /// HTTP request latency by matched route and method, in seconds.
    pub http_request_duration_seconds: HistogramVec,
    /// HTTP requests being served now.
    pub http_requests_in_flight: IntGauge,
    /// Agents by lifecycle status.
    pub agents: IntGaugeVec,
    /// Heartbeats accepted.
    pub heartbeats_total: IntCounter,
    /// Heartbeat states written to the store.
    pub heartbeats_flushed_total: IntCounter,
    /// Heartbeat flushes that failed (and will be retried).
    pub heartbeat_flush_errors_total: IntCounter,
    /// Duration of a heartbeat flush, in seconds.
    pub heartbeat_flush_duration_seconds: Histogram,
    /// Heartbeat states waiting to be flushed.
    pub heartbeats_pending: IntGauge,
    /// Lifecycle transitions by target status (`removed` for TTL expiry).
    pub agent_transitions_total: IntCounterVec,
    /// Open store connections.
    pub store_pool_connections: IntGauge,
    /// Idle store connections.
    pub store_pool_idle: IntGauge,
    /// Configured maximum of store connections.
    pub store_pool_max: IntGauge,
    /// Authentication attempts by method (`api_key`, `jwt`, `workload`, `unknown`), outcome
    /// (`success`, `failure`) and reason (`ok` on success).
    pub auth_total: IntCounterVec,
    /// Authorization decisions by decision (`allow`, `deny`) and source (`plugins`, `builtin`,
    /// `scope` for a credential whose scopes do not cover the endpoint).
    pub authz_decisions_total: IntCounterVec,
    /// API keys neither revoked nor expired (as of the last key change or scrape refresh).
    pub api_keys_active: IntGauge,
    /// API key rotations.
    pub api_key_rotations_total: IntCounter,
    /// API key events by kind (`created`, `rotated`, `revoked`).
    pub api_key_events_total: IntCounterVec,
    /// Requests refused by a rate limit, by limit (`key`, `tenant`, `route`).
    pub rate_limited_total: IntCounterVec,
    /// Plugin calls by plugin (`tenant/name`), version and outcome (`ok` or a failure).
    pub plugin_calls_total: IntCounterVec,
    /// Plugin call latency by plugin and version, in seconds.
    pub plugin_call_duration_seconds: HistogramVec,
    /// Fuel burnt by contract calls, by plugin and version.
    pub plugin_fuel_used_total: IntCounterVec,
    /// Largest linear memory of a plugin instance, by plugin and version, in bytes.
    pub plugin_memory_high_water_bytes: IntGaugeVec,
    /// Calls answered by a kind's fallback (deny, built-in scoring, error result).
    pub plugin_fallbacks_total: IntCounterVec,
    /// Active version of each plugin (value 1).
    pub plugin_active: IntGaugeVec,
    /// Swaps of the active plugin set.
    pub plugin_swaps_total: IntCounter,
    /// Shadow calls compared, by plugin.
    pub plugin_shadow_calls_total: IntCounterVec,
    /// Shadow calls whose answer differed from the active version's, by plugin.
    pub plugin_shadow_diffs_total: IntCounterVec,
    /// Shadow calls skipped because too many were running.
    pub plugin_shadow_skipped_total: IntCounter,
    /// Chaos toggle faults on now (value 1), by target, tenant (`*` for kernel-wide) and fault
    /// (`latency`, `error`, `drop`); a series disappears when its toggle goes off.
    pub chaos_toggle: IntGaugeVec,
    /// Faults injected by chaos toggles, by target and fault.
    pub chaos_injections_total: IntCounterVec,
    /// Chaos toggle changes by kind (`created`, `deleted`, `expired`).
    pub chaos_events_total: IntCounterVec,
    /// Burn rate of each SLO's error budget over each alert window (1 = spending exactly the
    /// budget over the SLO window).
    pub slo_burn_rate: prometheus::GaugeVec,
    /// The SLI of each SLO over each alert window (share of good events, 0 to 1).
    pub slo_sli: prometheus::GaugeVec,
    /// Multi-window burn-rate alerts firing now (1) or not (0), by SLO and severity.
    pub slo_alert_firing: IntGaugeVec,
    /// Share of each SLO's error budget left over its window (negative when overspent).
    pub slo_error_budget_remaining_ratio: prometheus::GaugeVec,
    /// Route decisions by who ranked the candidates (`plugin`, `builtin`, `none` when no agent
    /// qualified).
    pub route_decisions_total: IntCounterVec,
    /// Route decisions answered by the built-in power-of-two-choices because the scorer failed
    /// or none is active, by reason (`no_scorer` or the plugin failure's label).
    pub route_fallbacks_total: IntCounterVec,
    /// Duration of one route decision, in seconds.
    pub route_duration_seconds: Histogram,
    /// Health score of each agent in [0, 1] (at most `metrics_agents_max` agents exported).
    pub agent_health: prometheus::GaugeVec,
    /// Dynamic weight of each agent (at most `metrics_agents_max` agents exported).
    pub agent_weight: prometheus::GaugeVec,
    /// Agents by circuit breaker state (`closed`, `open`, `half_open`).
    pub circuit_breaker_state: IntGaugeVec,
    /// Circuit breaker transitions by target state.
    pub circuit_breaker_transitions_total: IntCounterVec,
    /// Tasks that reached a final status, by status (`succeeded`, `failed`).
    pub tasks_total: IntCounterVec,
    /// Task attempts by outcome (`success`, `failure`, `timeout`).
    pub task_attempts_total: IntCounterVec,
    /// Duration of task attempts by delivery mode (`push`, `pull`), in seconds.
    pub task_attempt_duration_seconds: HistogramVec,
    /// Retries of tasks (attempts after the first).
    pub task_retries_total: IntCounter,
    /// Pull attempts waiting in agents' queues (kernel-wide, as of the last sweep).
    pub task_queue_depth: IntGauge,
    /// Results that arrived after their attempt had ended or their task had finished, and were
    /// discarded, by delivery mode.
    pub task_late_results_total: IntCounterVec,
    /// Tasks this kernel is driving now.
    pub tasks_driving: IntGauge,
    /// Task results written to the local spool because the store was unavailable.
    pub task_results_spooled_total: IntCounter,
    /// Events published, by result (`accepted`, `duplicate`).
    pub bus_events_total: IntCounterVec,
    /// Deliveries to consumer groups, by kind (`first`, `redelivery`).
    pub bus_deliveries_total: IntCounterVec,
    /// Acks by kind and status.
    pub bus_acks_total: IntCounterVec,
    /// Dead letters re-driven or purged, by operation.
    pub bus_dead_letter_ops_total: IntCounterVec,
    /// Events queued again to a consumer group by a replay.
    pub bus_replayed_total: IntCounter,
    /// Outbox rows published to the bus.
    pub outbox_relayed_total: IntCounter,
    /// Outbox rows not yet published (as of the relay's last pass).
    pub outbox_pending: IntGauge,
    /// Relay passes that failed (store or bus unavailable).
    pub outbox_relay_errors_total: IntCounter,
    /// 1 while a dependency (`store`) is degraded, else 0.
    pub dependency_degraded: IntGaugeVec,
    /// Writes waiting in the local spool.
    pub spool_records: IntGauge,
    /// Bytes waiting in the local spool.
    pub spool_bytes: IntGauge,
    /// Spooled writes replayed, by result (`applied`, `rejected`).
    pub spool_replayed_total: IntCounterVec,
    /// Requests carrying an `Idempotency-Key`, by outcome: `kept` (ran, response kept),
    /// `not_kept` (ran, response not kept: 5xx, 429 or too large), `replayed`, `key_reused`
    /// (422), `in_flight` (409).
    pub idempotency_requests_total: IntCounterVec,
    /// Expired idempotency records deleted.
    pub idempotency_purged_total: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Latency buckets for plugin calls, in seconds (1 µs to 10 s).
const PLUGIN_LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 1.0, 10.0,
];

/// Latency buckets for HTTP and store calls, in seconds (50 µs to 10 s).
pub const LATENCY_BUCKETS_SECONDS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

impl Metrics {
    /// Creates and registers every metric under the `nops_` prefix.
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("nops".into()), None)
            .unwrap_or_else(|_| unreachable!("a static prefix is a valid registry"));
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).unwrap_or_else(|e| unreachable!("metric names are static and unique: {e}"));
        };
        // Metric definitions are static; construction fails only on a programming error.
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let m = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
            reg(Box::new(m.clone()));
            m
        };
        let counter = |name: &str, help: &str| {
            let m = IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
            reg(Box::new(m.clone()));
            m
        };
        let gauge = |name: &str, help: &str| {
            let m = IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
            reg(Box::new(m.clone()));
            m
        };
        let http_request_duration_seconds = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency in seconds")
                .buckets(LATENCY_BUCKETS_SECONDS.to_vec()),
            &["route", "method"],
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        reg(Box::new(http_request_duration_seconds.clone()));
        let heartbeat_flush_duration_seconds = Histogram::with_opts(
            HistogramOpts::new("heartbeat_flush_duration_seconds", "Duration of one heartbeat flush in seconds")
                .buckets(LATENCY_BUCKETS_SECONDS.to_vec()),
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        reg(Box::new(heartbeat_flush_duration_seconds.clone()));
        let agents = IntGaugeVec::new(Opts::new("agents", "Agents by lifecycle status"), &["status"])
            .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        reg(Box::new(agents.clone()));
        let plugin_call_duration_seconds = HistogramVec::new(
            HistogramOpts::new("plugin_call_duration_seconds", "Plugin call latency in seconds")
                .buckets(PLUGIN_LATENCY_BUCKETS_SECONDS.to_vec()),
            &["plugin", "version"],
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        reg(Box::new(plugin_call_duration_seconds.clone()));
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let m = IntGaugeVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
            reg(Box::new(m.clone()));
            m
        };
        let route_duration_seconds = Histogram::with_opts(
            HistogramOpts::new("route_duration_seconds", "Duration of one route decision in seconds")
                .buckets(PLUGIN_LATENCY_BUCKETS_SECONDS.to_vec()),
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        reg(Box::new(route_duration_seconds.clone()));
        let float_gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let m = prometheus::GaugeVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
            reg(Box::new(m.clone()));
            m
        };
        Self {
            plugin_calls_total: counter_vec(
                "plugin_calls_total",
                "Plugin calls by plugin, version and outcome",
                &["plugin", "version", "outcome"],
            ),
            plugin_call_duration_seconds,
            plugin_fuel_used_total: counter_vec(
                "plugin_fuel_used_total",
                "Fuel burnt by contract calls",
                &["plugin", "version"],
            ),
            plugin_memory_high_water_bytes: gauge_vec(
                "plugin_memory_high_water_bytes",
                "Largest linear memory of a plugin instance in bytes",
                &["plugin", "version"],
            ),
            plugin_fallbacks_total: counter_vec(
                "plugin_fallbacks_total",
                "Plugin calls answered by the kind's fallback",
                &["plugin", "kind"],
            ),
            plugin_active: gauge_vec("plugin_active", "Active version of each plugin", &["plugin", "version"]),
            plugin_swaps_total: counter("plugin_swaps_total", "Swaps of the active plugin set"),
            plugin_shadow_calls_total: counter_vec("plugin_shadow_calls_total", "Shadow calls compared", &["plugin"]),
            plugin_shadow_diffs_total: counter_vec(
                "plugin_shadow_diffs_total",
                "Shadow calls whose answer differed from the active version",
                &["plugin"],
            ),
            plugin_shadow_skipped_total: counter(
                "plugin_shadow_skipped_total",
                "Shadow calls skipped because too many were running",
            ),
            http_requests_total: counter_vec(
                "http_requests_total",
                "HTTP requests by matched route, method and status",
                &["route", "method", "status"],
            ),
            http_request_duration_seconds,
            http_requests_in_flight: gauge("http_requests_in_flight", "HTTP requests being served"),
            agents,
            heartbeats_total: counter("heartbeats_total", "Heartbeats accepted"),
            heartbeats_flushed_total: counter("heartbeats_flushed_total", "Heartbeat states written to the store"),
            heartbeat_flush_errors_total: counter(
                "heartbeat_flush_errors_total",
                "Heartbeat flushes that failed and will be retried",
            ),
            heartbeat_flush_duration_seconds,
            heartbeats_pending: gauge("heartbeats_pending", "Heartbeat states waiting to be flushed"),
            agent_transitions_total: counter_vec(
                "agent_transitions_total",
                "Agent lifecycle transitions by target status",
                &["to"],
            ),
            store_pool_connections: gauge("store_pool_connections", "Open store connections"),
            store_pool_idle: gauge("store_pool_idle_connections", "Idle store connections"),
            store_pool_max: gauge("store_pool_max_connections", "Configured maximum of store connections"),
            auth_total: counter_vec(
                "auth_total",
                "Authentication attempts by method, outcome and reason",
                &["method", "outcome", "reason"],
            ),
            authz_decisions_total: counter_vec(
                "authz_decisions_total",
                "Authorization decisions by decision and source",
                &["decision", "source"],
            ),
            api_keys_active: gauge("api_keys_active", "API keys neither revoked nor expired"),
            api_key_rotations_total: counter("api_key_rotations_total", "API key rotations"),
            api_key_events_total: counter_vec("api_key_events_total", "API key events by kind", &["event"]),
            rate_limited_total: counter_vec("rate_limited_total", "Requests refused by a rate limit", &["limit"]),
            chaos_toggle: gauge_vec(
                "chaos_toggle",
                "Chaos toggle faults on now, by target, tenant and fault",
                &["target", "tenant", "fault"],
            ),
            chaos_injections_total: counter_vec(
                "chaos_injections_total",
                "Faults injected by chaos toggles, by target and fault",
                &["target", "fault"],
            ),
            chaos_events_total: counter_vec("chaos_events_total", "Chaos toggle changes by kind", &["event"]),
            slo_burn_rate: float_gauge_vec(
                "slo_burn_rate",
                "Error budget burn rate of each SLO over each alert window",
                &["slo", "window"],
            ),
            slo_sli: float_gauge_vec("slo_sli", "SLI of each SLO over each alert window", &["slo", "window"]),
            slo_alert_firing: gauge_vec(
                "slo_alert_firing",
                "Multi-window burn-rate alerts firing, by SLO and severity",
                &["slo", "severity"],
            ),
            slo_error_budget_remaining_ratio: float_gauge_vec(
                "slo_error_budget_remaining_ratio",
                "Share of each SLO's error budget left over its window",
                &["slo"],
            ),
            route_decisions_total: counter_vec(
                "route_decisions_total",
                "Route decisions by who ranked the candidates",
                &["source"],
            ),
            route_fallbacks_total: counter_vec(
                "route_fallbacks_total",
                "Route decisions answered by the built-in fallback, by reason",
                &["reason"],
            ),
            route_duration_seconds,
            agent_health: float_gauge_vec("agent_health", "Health score of an agent in [0, 1]", &["agent"]),
            agent_weight: float_gauge_vec("agent_weight", "Dynamic weight of an agent", &["agent"]),
            circuit_breaker_state: gauge_vec("circuit_breaker_state", "Agents by circuit breaker state", &["state"]),
            circuit_breaker_transitions_total: counter_vec(
                "circuit_breaker_transitions_total",
                "Circuit breaker transitions by target state",
                &["to"],
            ),
            tasks_total: counter_vec("tasks_total", "Tasks that reached a final status", &["status"]),
            task_attempts_total: counter_vec("task_attempts_total", "Task attempts by outcome", &["outcome"]),
            task_attempt_duration_seconds: {
                let m = HistogramVec::new(
                    HistogramOpts::new("task_attempt_duration_seconds", "Duration of task attempts in seconds")
                        .buckets(LATENCY_BUCKETS_SECONDS.iter().copied().chain([30.0, 60.0, 300.0]).collect()),
                    &["mode"],
                )
                .unwrap_or_else(|e| unreachable!("static metric: {e}"));
                reg(Box::new(m.clone()));
                m
            },
            task_retries_total: counter("task_retries_total", "Task attempts after the first"),
            task_queue_depth: gauge("task_queue_depth", "Pull attempts waiting in agents' queues"),
            task_late_results_total: counter_vec(
                "task_late_results_total",
                "Results that arrived after their attempt ended and were discarded",
                &["mode"],
            ),
            tasks_driving: gauge("tasks_driving", "Tasks this kernel is driving"),
            task_results_spooled_total: counter(
                "task_results_spooled_total",
                "Task results written to the local spool because the store was unavailable",
            ),
            bus_events_total: counter_vec("bus_events_total", "Events published, by result", &["result"]),
            bus_deliveries_total: counter_vec("bus_deliveries_total", "Deliveries to consumer groups", &["kind"]),
            bus_acks_total: counter_vec("bus_acks_total", "Acks by kind and status", &["kind", "status"]),
            bus_dead_letter_ops_total: counter_vec(
                "bus_dead_letter_ops_total",
                "Dead letters re-driven or purged",
                &["op"],
            ),
            bus_replayed_total: counter("bus_replayed_total", "Events queued again to a consumer group by a replay"),
            outbox_relayed_total: counter("outbox_relayed_total", "Outbox rows published to the bus"),
            outbox_pending: gauge("outbox_pending", "Outbox rows not yet published"),
            outbox_relay_errors_total: counter("outbox_relay_errors_total", "Outbox relay passes that failed"),
            dependency_degraded: gauge_vec(
                "dependency_degraded",
                "1 while a dependency is degraded (unreachable), else 0",
                &["dependency"],
            ),
            spool_records: gauge("spool_records", "Writes waiting in the local spool"),
            spool_bytes: gauge("spool_bytes", "Bytes waiting in the local spool"),
            spool_replayed_total: counter_vec(
                "spool_replayed_total",
                "Spooled writes replayed when their dependency returned, by result",
                &["result"],
            ),
            idempotency_requests_total: counter_vec(
                "idempotency_requests_total",
                "Requests carrying an Idempotency-Key, by outcome",
                &["outcome"],
            ),
            idempotency_purged_total: counter("idempotency_purged_total", "Expired idempotency records deleted"),
            registry,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
