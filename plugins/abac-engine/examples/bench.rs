//! Times decisions against a rule document (by default `policies/bench-100-rules.json`).
//!
//! ```sh
//! cd plugins && CARGO_TARGET_DIR=$PWD/../target/wasm \
//!     cargo run --release -p abac-engine --example bench [-- path/to/rules.json]
//! ```
//!
//! Prints the time per decision for a few representative requests, with
//! [`Policy::evaluate`] (reasons and obligations) and [`Policy::is_allowed`] (no allocation).

use std::hint::black_box;
use std::time::Instant;

use abac_engine::{Attribute, Policy, Request, Value};

const ITERATIONS: u32 = 200_000;

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies/bench-100-rules.json").into());
    let document = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));

    let started = Instant::now();
    let policy = Policy::from_json(&document).unwrap_or_else(|e| panic!("{path}: {e}"));
    println!("{path}: {} rules, parsed in {:?}", policy.rule_count(), started.elapsed());

    let principal = [
        Attribute::new("subject", text("k-42")),
        Attribute::new("tenant", text("acme")),
        Attribute::new("role", text("operator")),
        Attribute::new("team", text("edge")),
        Attribute::new("level", Value::Integer(3)),
        Attribute::new("mfa", Value::Boolean(true)),
    ];
    let resource = [
        Attribute::new("tenant", text("acme")),
        Attribute::new("team", text("edge")),
        Attribute::new("env", text("staging")),
        Attribute::new("region", text("eu-west-1")),
        Attribute::new("labels", Value::Texts(vec!["team=edge".into(), "zone=eu-1".into()])),
        Attribute::new("in_flight", Value::Integer(0)),
    ];
    let context = [
        Attribute::new("hour", Value::Integer(14)),
        Attribute::new("risk_score", Value::Number(0.1)),
        Attribute::new("network", text("corp:hq")),
    ];
    let foreign = [Attribute::new("tenant", text("globex"))];

    let cases: [(&str, &str, &[Attribute]); 4] = [
        ("permit (operator agents:write)", "agents:write", &resource),
        ("default deny (operator keys:create)", "keys:create", &resource),
        ("forbid (other tenant)", "agents:read", &foreign),
        ("no rule names the action", "unknown:action", &resource),
    ];
    for (label, action, resource) in cases {
        let request = Request { principal: &principal[..], action, resource, context: &context[..] };
        let decision = policy.evaluate(&request);
        let started = Instant::now();
        for _ in 0..ITERATIONS {
            black_box(policy.evaluate(black_box(&request)));
        }
        let evaluate = started.elapsed() / ITERATIONS;
        let started = Instant::now();
        for _ in 0..ITERATIONS {
            black_box(policy.is_allowed(black_box(&request)));
        }
        let is_allowed = started.elapsed() / ITERATIONS;
        println!(
            "{label:38} allow={:5} evaluate {evaluate:>8?}  is_allowed {is_allowed:>8?}  reasons {:?}",
            decision.allow, decision.reasons
        );
    }
}
