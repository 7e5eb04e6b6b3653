//! The OpenAPI document at `/openapi.json`: valid OpenAPI 3.1 (checked by the real
//! `openapi-spec-validator`), in step with the router in both directions, one scope per
//! `/api/v1` operation, and the access table the middleware enforces read from it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use axum::body::Body;
use http::{Request, StatusCode};
use serde_json::{Value, json};

use crate::support::{Backend, TestKernel};

/// Every public (unauthenticated) operation. A new public endpoint must be added here on
/// purpose; everything else must live under `/api/v1` and declare a scope.
const PUBLIC: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/health/extended"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
];

/// The methods probed for routes the document does not declare.
const PROBED_METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

const OPERATION_KEYS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// The repository root (the `it` binary belongs to `host/nops`).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

async fn served_document(k: &TestKernel) -> Value {
    // Public: no credential.
    let request = Request::builder().uri("/openapi.json").body(Body::empty()).expect("request");
    let (status, headers, doc) = k.send(request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    assert!(doc.is_object(), "the document is JSON");
    doc
}

/// `(METHOD, path, operation)` for every operation of the document.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for key in OPERATION_KEYS {
            if let Some(op) = item.get(*key) {
                out.push((key.to_uppercase(), path.clone(), op.clone()));
            }
        }
    }
    out
}

/// The scopes of every security requirement of `op`, by scheme.
fn requirements(op: &Value) -> Vec<BTreeMap<String, Vec<String>>> {
    op.get("security").map_or_else(Vec::new, |s| serde_json::from_value(s.clone()).expect("security requirements"))
}

/// `path` with its parameters filled with plausible values.
fn fill(path: &str) -> String {
    path.replace("{id}", &uuid::Uuid::now_v7().to_string()).replace("{name}", "probe").replace("{version}", "1.0.0")
}

/// True when the response is the router's own answer for an unknown route or method.
fn is_fallback(status: StatusCode, body: &Value) -> bool {
    (status == StatusCode::NOT_FOUND && body["error"]["message"] == "no such route")
        || body["error"]["code"] == "method_not_allowed"
        || status == StatusCode::METHOD_NOT_ALLOWED
}

fn request(k: &TestKernel, method: &str, path: &str, op: Option<&Value>) -> Request<Body> {
    let json_body = op.is_some_and(|op| op["requestBody"]["content"].get("application/json").is_some());
    k.request(method, path, json_body.then(|| json!({})))
}

#[tokio::test]
async fn the_document_is_valid_openapi_3_1() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let doc = served_document(&k).await;
    assert_eq!(doc["openapi"], "3.1.0");

    let python = repo_root().join(".venv/bin/python");
    if !python.exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but {} is missing: run scripts/setup.sh",
            python.display()
        );
        eprintln!("SKIPPED the openapi-spec-validator check: no {} (run scripts/setup.sh)", python.display());
        return;
    }
    let validate = |document: &Value| {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), serde_json::to_vec_pretty(document).expect("json")).expect("write");
        let output = Command::new(&python)
            .args(["-m", "openapi_spec_validator", "--schema", "3.1"])
            .arg(file.path())
            .output()
            .expect("run openapi-spec-validator");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        (output.status.success(), text)
    };
    let (ok, text) = validate(&doc);
    assert!(ok, "openapi-spec-validator refuses the document:\n{text}");
    assert!(text.contains("OK"), "the validator ran and said OK: {text}");

    // The validator is not a rubber stamp: a broken copy of the document fails.
    let mut broken = doc.clone();
    broken["paths"]["/api/v1/agents/{id}"]["get"]["responses"] = json!("none");
    let (ok, text) = validate(&broken);
    assert!(!ok, "the validator accepts a broken document: {text}");
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_documented_paths_serve_no_other_method() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let doc = served_document(&k).await;
    let ops = operations(&doc);
    assert!(ops.len() >= 25, "the document lists every operation: {}", ops.len());

    // The check can fail: an unknown route and an unknown method are the fallback.
    let (status, _, body) = k.send(k.request("GET", "/api/v1/no-such-route", None)).await;
    assert!(is_fallback(status, &body), "{status} {body}");
    let (status, _, body) = k.send(k.request("PUT", "/health", None)).await;
    assert!(is_fallback(status, &body), "{status} {body}");

    let mut methods_by_path: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (method, path, op) in &ops {
        methods_by_path.entry(path).or_default().insert(method);
        let (status, _, body) = k.send(request(&k, method, &fill(path), Some(op))).await;
        assert!(!is_fallback(status, &body), "{method} {path} is documented but not routed: {status} {body}");
        assert_ne!(status, StatusCode::FORBIDDEN, "{method} {path}: the bootstrap key is refused: {body}");
        assert!(
            op["responses"].get(status.as_str()).is_some(),
            "{method} {path} answered {status}, which its operation does not document: {body}"
        );
        if status.is_client_error() || status.is_server_error() {
            assert!(body["error"]["code"].is_string() || path == "/health/extended", "{method} {path}: {body}");
        }
    }
    // Reverse direction, per path: every method the router serves there is documented.
    for (path, documented) in &methods_by_path {
        for method in PROBED_METHODS.iter().filter(|m| !documented.contains(*m)) {
            let (status, _, body) = k.send(request(&k, method, &fill(path), None)).await;
            assert!(
                is_fallback(status, &body) && status == StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is routed but not documented: {status} {body}"
            );
        }
    }
}

#[tokio::test]
async fn api_operations_declare_one_scope_and_public_ones_are_allow_listed() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let doc = served_document(&k).await;
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!((scheme["type"].as_str(), scheme["scheme"].as_str()), (Some("http"), Some("bearer")), "{scheme}");

    let mut operation_ids = BTreeSet::new();
    let mut public = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        let what = format!("{method} {path}");
        let id = op["operationId"].as_str().unwrap_or_else(|| panic!("{what}: operationId"));
        assert!(operation_ids.insert(id.to_string()), "{what}: operationId `{id}` is not unique");
        assert!(op["summary"].as_str().is_some_and(|s| !s.is_empty()), "{what}: summary");
        assert_eq!(op["tags"].as_array().map(Vec::len), Some(1), "{what}: exactly one tag");
        let responses = op["responses"].as_object().unwrap_or_else(|| panic!("{what}: responses"));
        assert!(responses.keys().any(|s| s.starts_with('2')), "{what}: a success response");
        for (status, response) in responses {
            assert!(response["description"].as_str().is_some_and(|d| !d.is_empty()), "{what} {status}");
            let is_error = status.starts_with('4') || status.starts_with('5');
            if is_error && path != "/health/extended" {
                assert_eq!(
                    response["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/ErrorBody",
                    "{what} {status}: the error envelope"
                );
            }
        }
        let parameters = op["parameters"].as_array().cloned().unwrap_or_default();
        for name in path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))) {
            assert!(
                parameters.iter().any(|p| p["name"] == name && p["in"] == "path" && p["required"] == true),
                "{what}: path parameter `{name}`"
            );
        }
        let security = requirements(&op);
        if path.starts_with("/api/v1/") {
            assert_eq!(security.len(), 1, "{what}: exactly one security requirement: {security:?}");
            let scopes = security[0].get("bearer").unwrap_or_else(|| panic!("{what}: the bearer scheme"));
            assert_eq!(scopes.len(), 1, "{what}: exactly one scope: {scopes:?}");
            assert!(
                scopes[0].parse::<nops_core::auth::scope::Scope>().is_ok() && !scopes[0].contains('*'),
                "{what}: `{}` is a concrete scope",
                scopes[0]
            );
            assert!(
                parameters.iter().any(|p| p["name"] == "X-Nops-Tenant" && p["in"] == "header"),
                "{what}: the tenant header"
            );
            for status in ["400", "401", "403"] {
                assert!(responses.contains_key(status), "{what}: {status}");
            }
        } else {
            assert!(security.is_empty(), "{what} is public and declares no security: {security:?}");
            assert!(PUBLIC.contains(&(method.as_str(), path.as_str())), "{what} is public but not in PUBLIC");
            public.insert((method, path));
        }
    }
    let expected: BTreeSet<(String, String)> = PUBLIC.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(public, expected, "every public endpoint is documented");
}

#[tokio::test]
async fn the_access_table_is_read_from_the_document() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let doc = served_document(&k).await;
    let mut documented = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        if path.starts_with("/api/v1/") {
            let security = requirements(&op);
            documented.insert((method, path, security[0]["bearer"][0].clone()));
        }
    }
    let table: BTreeSet<(String, String, String)> =
        nops_api::access_table().entries().map(|(m, p, s)| (m.to_string(), p.to_string(), s.to_string())).collect();
    assert!(!table.is_empty());
    assert_eq!(table, documented);
    // Spot checks of what the annotations declare.
    for (method, path, scope) in [
        ("GET", "/api/v1/agents", "agents:list"),
        ("DELETE", "/api/v1/agents/{id}", "agents:delete"),
        ("POST", "/api/v1/agents/{id}/heartbeat", "agents:heartbeat"),
        ("POST", "/api/v1/plugins/{name}/invoke", "plugins:invoke"),
    ] {
        assert!(table.contains(&(method.into(), path.into(), scope.into())), "{method} {path} {scope}");
    }
}

#[tokio::test]
async fn the_error_envelope_matches_its_schema() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let doc = served_document(&k).await;
    let schemas = &doc["components"]["schemas"];
    let keys = |schema: &Value| -> BTreeSet<String> {
        schema["properties"].as_object().expect("properties").keys().cloned().collect()
    };
    let (status, _, body) = k.send(k.request("GET", "/api/v1/agents/not-a-uuid", None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let actual: BTreeSet<String> = body.as_object().expect("envelope").keys().cloned().collect();
    assert_eq!(actual, keys(&schemas["ErrorBody"]));
    let actual: BTreeSet<String> = body["error"].as_object().expect("detail").keys().cloned().collect();
    assert_eq!(actual, keys(&schemas["ErrorDetail"]));
}

/// Routes are registered only through `utoipa_axum::routes!` (so only documented): nothing in
/// the HTTP crates (outside unit tests) routes with plain axum calls, which would serve a path
/// the document, the access table and the probes above never see.
#[test]
fn nothing_routes_around_the_document() {
    const BYPASSES: &[&str] = &[".route(", ".route_service(", ".nest_service(", "axum::routing"];
    let mut offenders = Vec::new();
    let mut stack = vec![repo_root().join("host/nops-api/src"), repo_root().join("host/nops/src")];
    let mut files = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files += 1;
                let text = std::fs::read_to_string(&path).expect("read");
                // Unit tests (at the end of a file) may serve mock HTTP servers.
                let text = text.split("#[cfg(test)]").next().unwrap_or_default();
                for (n, line) in text.lines().enumerate() {
                    let code = line.trim_start();
                    if !code.starts_with("//") && BYPASSES.iter().any(|b| code.contains(b)) {
                        offenders.push(format!("{}:{}: {}", path.display(), n + 1, code));
                    }
                }
            }
        }
    }
    assert!(files > 10, "the sources were found ({files} files)");
    assert!(offenders.is_empty(), "routes registered without `routes!`:\n{}", offenders.join("\n"));
}

/// The scope table of `docs/api.md` is the document's.
#[tokio::test]
async fn the_scope_table_in_the_api_docs_is_the_documents() {
    let k = TestKernel::start(Backend::Sqlite).await;
    let doc = served_document(&k).await;
    let documented: BTreeSet<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(method, path, op)| {
            let scope = requirements(&op).first().map_or("public".to_string(), |r| format!("`{}`", r["bearer"][0]));
            (format!("`{method} {path}`"), scope)
        })
        .collect();
    let text = std::fs::read_to_string(repo_root().join("docs/api.md")).expect("docs/api.md");
    let table = text
        .split("<!-- scopes:begin")
        .nth(1)
        .and_then(|rest| rest.split("<!-- scopes:end -->").next())
        .expect("the scope table markers");
    let listed: BTreeSet<(String, String)> = table
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            (cells[1].to_string(), cells[2].to_string())
        })
        .collect();
    assert_eq!(listed, documented, "docs/api.md's scope table differs from /openapi.json: update the table");
}
