//! The reference ABAC policy: decides access requests with the rule document the operator
//! attached to this plugin version as its configuration (`config::get()`, JSON; the format
//! is described in `policies/README.md`, and `policies/tenant-isolation.json` is the default).
//!
//! The document is parsed and compiled on the first call and kept in a `static` for the calls
//! that follow on the same instance: the document cannot change while a plugin version is
//! active. Parsing is the expensive part (a few hundred microseconds for 100 rules); a
//! compiled document decides a request in microseconds.
//!
//! The plugin fails closed. An empty or invalid document is not an error it could trap on:
//! every request is denied, with a reason that says why, and a warning is logged.

wit_bindgen::generate!({ world: "policy", path: "../../wit" });

use std::sync::OnceLock;

use abac_engine::{Policy, Request, ValueRef};
use exports::nops::plugin::authorization::{AccessRequest, Decision, Guest};
use nops::plugin::config;
use nops::plugin::log::{self, Level};
use nops::plugin::types::{Attribute, Value};

/// The compiled document, or why there is none (a deny reason).
static POLICY: OnceLock<Result<Policy, String>> = OnceLock::new();

/// Loads and compiles the configured document, once.
fn policy() -> &'static Result<Policy, String> {
    POLICY.get_or_init(|| {
        let document = config::get();
        let loaded = if document.iter().all(u8::is_ascii_whitespace) {
            Err("no policy document is configured: every request is denied".to_string())
        } else {
            Policy::from_json(&document)
                .map_err(|e| format!("the policy document is invalid, every request is denied: {e}"))
        };
        if let Err(reason) = &loaded {
            log::write(Level::Warn, reason);
        }
        loaded
    })
}

/// The request's attributes as the engine reads them, without copying.
struct Attributes<'a>(&'a [Attribute]);

impl abac_engine::Attributes for Attributes<'_> {
    /// The first attribute named `name`.
    fn lookup(&self, name: &str) -> Option<ValueRef<'_>> {
        self.0.iter().find(|a| a.name == name).map(|a| match &a.value {
            Value::Text(s) => ValueRef::Text(s),
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Number(n) => ValueRef::Number(*n),
            Value::Boolean(b) => ValueRef::Boolean(*b),
            Value::Texts(list) => ValueRef::Texts(list),
        })
    }
}

struct Abac;

impl Guest for Abac {
    fn evaluate(request: AccessRequest) -> Decision {
        let policy = match policy() {
            Ok(policy) => policy,
            Err(reason) => return Decision { allow: false, reasons: vec![reason.clone()], obligations: Vec::new() },
        };
        let (principal, resource, context) =
            (Attributes(&request.principal), Attributes(&request.resource), Attributes(&request.context));
        let decision = policy.evaluate(&Request {
            principal: &principal,
            action: &request.action,
            resource: &resource,
            context: &context,
        });
        Decision {
            allow: decision.allow,
            reasons: decision.reasons.into_iter().map(String::from).collect(),
            obligations: decision.obligations.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }
}

export!(Abac);
