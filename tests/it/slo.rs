//! SLOs over the real router: 5xx responses (caused by a store chaos toggle) fire the
//! availability SLO's page alert at `/api/v1/slo` and in `/metrics`, and it clears once the
//! short windows are clean; configuration errors stop the kernel at start; and the Prometheus
//! rules an operator loads pass `promtool check rules` and `promtool test rules`.

use std::path::PathBuf;
use std::process::Command;

use axum::body::Body;
use http::{Request, StatusCode};
use nops::config::{Config, ServeArgs};
use serde_json::{Value, json};

use crate::support::{TestKernel, agent_json, test_args};

const MINUTE_MS: i64 = 60_000;

fn slo<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["slos"].as_array().and_then(|s| s.iter().find(|s| s["name"] == name)).unwrap_or_else(|| panic!("{status}"))
}

fn window<'a>(slo: &'a Value, window: &str) -> &'a Value {
    slo["windows"].as_array().and_then(|w| w.iter().find(|w| w["window"] == window)).unwrap_or_else(|| panic!("{slo}"))
}

/// `n` requests that succeed, in the current minute.
async fn good_traffic(k: &TestKernel, n: usize) {
    for _ in 0..n {
        let (status, _) = k.call("GET", "/api/v1/agents", None).await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test]
async fn store_errors_fire_the_availability_page_alert_and_it_clears() {
    for k in TestKernel::all().await {
        let (status, report) = k.call("GET", "/api/v1/slo", None).await;
        assert_eq!(status, StatusCode::OK, "{report}");
        assert_eq!(slo(&report, "api-availability")["objective"], 0.999);
        assert_eq!(slo(&report, "api-latency")["threshold_ms"], 250.0);
        assert_eq!(slo(&report, "api-availability")["firing"], json!([]));

        // Ten minutes of healthy traffic.
        for _ in 0..10 {
            good_traffic(&k, 20).await;
            k.kernel.state.slo.sample();
            k.clock.advance_ms(MINUTE_MS);
        }
        let (_, report) = k.call("GET", "/api/v1/slo", None).await;
        let availability = slo(&report, "api-availability");
        assert_eq!(availability["firing"], json!([]), "{availability}");
        assert_eq!(window(availability, "1h")["burn_rate"], 0.0);
        assert_eq!(availability["error_budget_remaining_ratio"], 1.0);

        // The store fails: every registration is a 503.
        let (status, toggle) =
            k.call("POST", "/api/v1/admin/chaos", Some(json!({ "target": "store", "error_ratio": 1.0 }))).await;
        assert_eq!(status, StatusCode::CREATED, "{toggle}");
        for i in 0..20 {
            let (status, _) =
                k.call("POST", "/api/v1/agents", Some(agent_json(&format!("a{i}"), "gpu", "1.0.0"))).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        }
        let (status, report) = k.call("GET", "/api/v1/slo", None).await;
        assert_eq!(status, StatusCode::OK);
        let availability = slo(&report, "api-availability");
        assert_eq!(availability["firing"], json!(["page", "ticket"]), "{availability}");
        let five = window(availability, "5m");
        assert_eq!(five["total"].as_u64().map(|t| t >= 20), Some(true), "{five}");
        assert!(five["burn_rate"].as_f64().is_some_and(|b| b > 14.4), "{five}");
        assert!(window(availability, "1h")["burn_rate"].as_f64().is_some_and(|b| b > 14.4));
        let page = &availability["alerts"][0];
        assert_eq!(
            (page["severity"].as_str(), page["long_window"].as_str(), page["firing"].as_bool()),
            (Some("page"), Some("1h"), Some(true))
        );
        assert!(availability["error_budget_remaining_ratio"].as_f64().is_some_and(|r| r < 0.0), "overspent");
        let text = k.send_text(k.request("GET", "/metrics", None)).await.1;
        for line in [
            r#"nops_slo_alert_firing{severity="page",slo="api-availability"} 1"#,
            r#"nops_slo_alert_firing{severity="page",slo="api-latency"} 0"#,
            r#"nops_slo_burn_rate{slo="api-availability",window="5m"}"#,
            r#"nops_slo_error_budget_remaining_ratio{slo="api-availability"}"#,
        ] {
            assert!(text.contains(line), "missing {line}");
        }

        // The store recovers; once the 30 min window holds no error the page stops (the
        // ticket, over 1 d and 2 h, keeps going).
        let id = toggle["id"].as_str().expect("id");
        let (status, _) = k.call("DELETE", &format!("/api/v1/admin/chaos/{id}"), None).await;
        assert_eq!(status, StatusCode::OK);
        k.create_agent(agent_json("back", "gpu", "1.0.0")).await;
        k.clock.advance_ms(31 * MINUTE_MS);
        good_traffic(&k, 20).await;
        let (_, report) = k.call("GET", "/api/v1/slo", None).await;
        let availability = slo(&report, "api-availability");
        assert_eq!(availability["firing"], json!(["ticket"]), "{availability}");
        let text = k.send_text(k.request("GET", "/metrics", None)).await.1;
        assert!(text.contains(r#"nops_slo_alert_firing{severity="page",slo="api-availability"} 0"#));
    }
}

#[tokio::test]
async fn viewers_read_slos_and_agents_do_not() {
    let k = TestKernel::start(crate::support::Backend::Sqlite).await;
    for (role, expected) in [("viewer", StatusCode::OK), ("operator", StatusCode::OK), ("agent", StatusCode::FORBIDDEN)]
    {
        let (status, created) =
            k.call("POST", "/api/v1/admin/api-keys", Some(json!({ "name": role, "role": role, "subject": "x" }))).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let secret = created["secret"].as_str().expect("secret");
        let request = Request::builder()
            .uri("/api/v1/slo")
            .header("authorization", format!("Bearer {secret}"))
            .body(Body::empty())
            .expect("request");
        let (status, _, body) = k.send(request).await;
        assert_eq!(status, expected, "{role}: {body}");
    }
}

fn config_with(toml: &str) -> anyhow::Result<Config> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nops.toml");
    std::fs::write(&path, toml).expect("write nops.toml");
    let args = ServeArgs { config: Some(path), ..test_args(&format!("sqlite://{}/nops.db", dir.path().display())) };
    Config::resolve(&args)
}

#[test]
fn slo_configuration_is_checked_at_start() {
    let err = config_with("[[slo]]\nname = \"fast\"\nsli = \"latency\"\nobjective = 0.99\nthreshold_ms = 300\n")
        .expect_err("300 ms is not a histogram bound");
    let message = format!("{err:#}");
    assert!(message.contains("threshold_ms = 300 is not a bound") && message.contains("250"), "{message}");
    for (toml, needle) in [
        ("[[slo]]\nname = \"a\"\nsli = \"availability\"\nobjective = 1.5\n", "objective"),
        ("[[slo]]\nname = \"a\"\nsli = \"availability\"\nobjective = 0.9\nwindow_days = 90\n", "window_days"),
        ("[[slo]]\nname = \"a\"\nsli = \"uptime\"\nobjective = 0.9\n", "uptime"),
        (
            "[[slo_alert]]\nseverity = \"page\"\nlong_window_minutes = 5\nshort_window_minutes = 60\nburn_rate = 14.4\n",
            "short_window_minutes",
        ),
        ("[chaos]\ntoggles_max = 0\n", "toggles_max"),
    ] {
        let message = format!("{:#}", config_with(toml).expect_err(needle));
        assert!(message.contains(needle), "{needle}: {message}");
    }
    let config = config_with(
        "[[slo]]\nname = \"all-fast\"\nsli = \"latency\"\nobjective = 0.95\nwindow_days = 7\nthreshold_ms = 100\n\n\
         [[slo_alert]]\nseverity = \"page\"\nlong_window_minutes = 60\nshort_window_minutes = 5\nburn_rate = 10\n",
    )
    .expect("valid");
    assert_eq!(config.slo.slos.len(), 1);
    assert_eq!(config.slo.alerts.len(), 1);
    let shown = config.to_toml().expect("toml");
    assert!(shown.contains("[[slo]]") && shown.contains("all-fast") && shown.contains("[[slo_alert]]"), "{shown}");
}

fn rules_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus")
}

/// `promtool`, or `None` (with a notice) when it is missing outside CI. Under `CI=true` a
/// missing promtool fails the test.
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("promtool"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but promtool is not installed (scripts/setup.sh installs Debian's `prometheus` package)"
        );
        eprintln!("NOTICE: promtool not found; skipping the Prometheus rules check (install the `prometheus` package)");
    }
    found
}

#[test]
fn the_prometheus_rules_pass_promtool() {
    let Some(promtool) = promtool() else { return };
    for args in [["check", "rules", "nops-slo-rules.yml"], ["test", "rules", "nops-slo-rules.test.yml"]] {
        let out = Command::new(&promtool).args(args).current_dir(rules_dir()).output().expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_prometheus_rules_encode_the_kernels_defaults() {
    let rules = std::fs::read_to_string(rules_dir().join("nops-slo-rules.yml")).expect("rules file");
    let defaults = nops_core::slo::SloConfig::default();
    for spec in &defaults.slos {
        assert!(rules.contains(&format!("vector({})\n        labels:\n          slo: {}", spec.objective, spec.name)));
        if let Some(t) = spec.threshold_ms {
            assert!(rules.contains(&format!("le=\"{}\"", t / 1000.0)), "threshold {t} ms");
        }
        for route in &spec.exclude_routes {
            assert!(rules.contains(&format!("route!=\"{route}\"")), "{} leaves out {route}", spec.name);
        }
    }
    for alert in &defaults.alerts {
        let long = nops_core::slo::window_label(alert.long_window_minutes);
        let short = nops_core::slo::window_label(alert.short_window_minutes);
        let factor = format!("({} * (1 - nops_slo:objective))", alert.burn_rate);
        assert!(rules.contains(&format!("nops_slo:error_ratio:rate{long} > on(slo) {factor}")), "{long} {factor}");
        assert!(rules.contains(&format!("nops_slo:error_ratio:rate{short} > on(slo) {factor}")), "{short} {factor}");
    }
}
