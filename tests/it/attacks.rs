//! The attack catalogue (`tests/attacks/catalogue.py`) against a live `nops serve`: tokens
//! minted by an outside library (PyJWT) for a JWKS issuer and a SPIFFE trust domain, forged,
//! expired, confused and escalated; keys revoked, look-alike and rotated mid-load; tenants
//! crossed. Every attack must get its 401/403 and leave no trace.

use std::path::PathBuf;

use crate::process::Process;
use crate::support::{Backend, TestDb, backends};

/// The Python of the project's `.venv` (made by scripts/setup.sh), if it exists. Under
/// `CI=true` a missing interpreter fails the test instead of skipping it.
pub(crate) fn venv_python() -> Option<PathBuf> {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    if python.exists() {
        return Some(python);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but {} is missing: run scripts/setup.sh",
        python.display()
    );
    eprintln!("skipping: {} is missing (run scripts/setup.sh)", python.display());
    None
}

fn catalogue() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/attacks/catalogue.py")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attack_catalogue_fails_against_a_live_kernel() {
    let Some(python) = venv_python() else { return };
    for backend in backends() {
        run(&python, backend).await;
    }
}

async fn run(python: &PathBuf, backend: Backend) {
    let db = TestDb::new(backend).await;
    let keys = db.dir.path().join("keys");
    let status = std::process::Command::new(python)
        .arg(catalogue())
        .args(["keys", keys.to_str().expect("utf-8 path")])
        .status()
        .expect("run the catalogue");
    assert!(status.success(), "writing the test keys failed");
    let config = db.dir.path().join("nops.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[auth.issuers]]
issuer = "https://idp.test"
audiences = ["nops"]
jwks_file = "{keys}/jwks.json"
leeway_s = 5

[[auth.issuers]]
kind = "spiffe"
trust_domain = "edge.test"
audiences = ["nops"]
bundle_file = "{keys}/bundle.json"
tenant = "acme"
default_scopes = ["agents:read", "self:read"]
"#,
            keys = keys.display()
        ),
    )
    .expect("write nops.toml");
    let kernel =
        Process::start(&db, &[("NOPS_CONFIG", config.to_str().expect("utf-8")), ("NOPS_RATE_LIMITS_ENABLED", "false")])
            .await;
    let key = kernel.bootstrap_key().expect("bootstrap key");
    let out = tokio::process::Command::new(python)
        .arg(catalogue())
        .args(["attack", &kernel.base, &key, keys.to_str().expect("utf-8")])
        .output()
        .await
        .expect("run the catalogue");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{backend:?}:\n{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{backend:?}: attacks succeeded or cases failed:\n{report}");
    assert!(report.lines().filter(|l| l.starts_with("ok ")).count() >= 40, "too few cases ran:\n{report}");
    // Nothing the attacks sent leaks into the logs.
    let logs = kernel.stderr.lock().expect("lock").clone();
    assert!(!logs.contains("eyJ"), "a token reached the logs");
}
