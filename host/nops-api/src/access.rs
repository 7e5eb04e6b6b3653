//! Which scope each endpoint requires.
//!
//! Every endpoint under `/api/v1` declares one scope, which is also the action its ABAC
//! request names (`agents:read`). The authentication middleware looks the matched route up
//! here: a credential whose scopes do not cover the endpoint's is refused with 403 before any
//! policy runs, and an endpoint that declares nothing is refused outright (fail closed).

use std::collections::HashMap;

use http::Method;

/// Required scope by method and route pattern (as axum's `MatchedPath` reports it, e.g.
/// `/api/v1/agents/{id}`).
#[derive(Debug, Clone, Default)]
pub struct AccessTable {
    scopes: HashMap<(Method, String), String>,
}

impl AccessTable {
    /// A table from `(method, route, scope)` triples.
    pub fn new(entries: impl IntoIterator<Item = (Method, String, String)>) -> Self {
        Self { scopes: entries.into_iter().map(|(m, path, scope)| ((m, path), scope)).collect() }
    }

    /// The scope `method` on `route` requires, if it declares one.
    pub fn required(&self, method: &Method, route: &str) -> Option<&str> {
        let method = if *method == Method::HEAD { &Method::GET } else { method };
        self.scopes.get(&(method.clone(), route.to_string())).map(String::as_str)
    }

    /// Every entry, for the test that keeps the table and the routes in step.
    pub fn entries(&self) -> impl Iterator<Item = (&Method, &str, &str)> {
        self.scopes.iter().map(|((m, p), s)| (m, p.as_str(), s.as_str()))
    }
}
