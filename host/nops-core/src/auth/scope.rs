//! Service-to-service scopes: hierarchical permissions carried by a credential.
//!
//! A scope is `segment(:segment)*` where every segment is lowercase ASCII letters, digits,
//! `-` or `_`; the last segment may be `*`. A granted scope covers a required one when they are
//! equal, or when the granted one ends in `:*` and the required one starts with what precedes
//! it, or when the granted scope is `*`: `agents:read` ⊂ `agents:*` ⊂ `*`.
//!
//! Every endpoint declares the scope it requires (its ABAC action, e.g. `agents:read`); the
//! router refuses a credential whose scopes do not cover it before any policy runs.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{CoreError, CoreResult};

/// Longest scope, in bytes.
pub const SCOPE_BYTES_MAX: usize = 128;
/// Most scopes one credential carries.
pub const SCOPES_PER_CREDENTIAL_MAX: usize = 64;

/// One validated scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Scope(Arc<str>);

impl Scope {
    /// The scope that covers everything.
    pub fn all() -> Self {
        Self(Arc::from("*"))
    }

    /// The scope as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when holding this scope allows an endpoint that requires `required`.
    pub fn covers(&self, required: &str) -> bool {
        let granted: &str = &self.0;
        if granted == "*" {
            return true;
        }
        match granted.strip_suffix(":*") {
            Some(prefix) => {
                required.len() > prefix.len() + 1
                    && required.starts_with(prefix)
                    && required.as_bytes()[prefix.len()] == b':'
            }
            None => granted == required,
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = CoreError;

    fn from_str(s: &str) -> CoreResult<Self> {
        let invalid = |why: &str| CoreError::invalid("invalid_scope", format!("scope `{}`: {why}", truncate(s)));
        if s.is_empty() || s.len() > SCOPE_BYTES_MAX {
            return Err(invalid(&format!("must be 1 to {SCOPE_BYTES_MAX} bytes")));
        }
        if s == "*" {
            return Ok(Self::all());
        }
        let segments: Vec<&str> = s.split(':').collect();
        for (i, segment) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            let ok = if *segment == "*" {
                last && i > 0
            } else {
                !segment.is_empty()
                    && segment.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            };
            if !ok {
                return Err(invalid(
                    "segments are lowercase letters, digits, `-` and `_`, separated by `:`; only the last may be `*`",
                ));
            }
        }
        Ok(Self(Arc::from(s)))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

impl TryFrom<String> for Scope {
    type Error = CoreError;

    fn try_from(s: String) -> CoreResult<Self> {
        s.parse()
    }
}

impl From<Scope> for String {
    fn from(s: Scope) -> Self {
        s.0.to_string()
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The scopes a credential carries. Cheap to clone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Scope>", into = "Vec<Scope>")]
pub struct Scopes(Arc<[Scope]>);

impl Scopes {
    /// Every scope (`*`).
    pub fn all() -> Self {
        Self(Arc::from(vec![Scope::all()]))
    }

    /// No scope at all: every scoped endpoint refuses the credential.
    pub fn none() -> Self {
        Self::default()
    }

    /// Scopes from a list, at most [`SCOPES_PER_CREDENTIAL_MAX`].
    pub fn new(scopes: Vec<Scope>) -> CoreResult<Self> {
        if scopes.len() > SCOPES_PER_CREDENTIAL_MAX {
            return Err(CoreError::invalid(
                "invalid_scope",
                format!("at most {SCOPES_PER_CREDENTIAL_MAX} scopes per credential"),
            ));
        }
        Ok(Self(Arc::from(scopes)))
    }

    /// Parses a space-separated list, as in an OAuth `scope` claim.
    pub fn parse_list(list: &str) -> CoreResult<Self> {
        Self::new(list.split_ascii_whitespace().map(str::parse).collect::<CoreResult<_>>()?)
    }

    /// True when one of the scopes covers `required`.
    pub fn covers(&self, required: &str) -> bool {
        self.0.iter().any(|s| s.covers(required))
    }

    /// True when every scope of `other` is covered by one of these: a credential may only
    /// hand out (e.g. to a key it creates) what it holds itself.
    pub fn includes(&self, other: &Scopes) -> bool {
        // `covers` takes the wanted scope literally, so `agents:*` covers `agents:labels:*`
        // and only `*` covers `*`.
        other.0.iter().all(|wanted| self.0.iter().any(|held| held.covers(wanted.as_str())))
    }

    /// The scopes, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    /// True when there is no scope.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The scopes, space-separated.
    pub fn to_list(&self) -> String {
        self.0.iter().map(Scope::as_str).collect::<Vec<_>>().join(" ")
    }
}

impl TryFrom<Vec<Scope>> for Scopes {
    type Error = CoreError;

    fn try_from(v: Vec<Scope>) -> CoreResult<Self> {
        Self::new(v)
    }
}

impl From<Scopes> for Vec<Scope> {
    fn from(s: Scopes) -> Self {
        s.0.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(s: &str) -> Scope {
        s.parse().expect("valid scope")
    }

    #[test]
    fn hierarchy_covers_downwards_only() {
        assert!(scope("*").covers("agents:read"));
        assert!(scope("agents:*").covers("agents:read"));
        assert!(scope("agents:*").covers("agents:labels:set"));
        assert!(scope("agents:read").covers("agents:read"));
        assert!(!scope("agents:read").covers("agents:write"));
        assert!(!scope("agents:read").covers("agents:*"));
        assert!(!scope("agents:*").covers("agentsx:read"));
        assert!(!scope("agents:*").covers("agents"));
        assert!(!scope("agents:*").covers("plugins:read"));
        assert!(!scope("agents:read").covers("agents:read:more"));
    }

    #[test]
    fn malformed_scopes_are_refused() {
        for bad in ["", "Agents:read", "agents::read", ":read", "agents:", "*:read", "a:*:b", "agents read", ":*"] {
            assert!(bad.parse::<Scope>().is_err(), "{bad:?} parsed");
        }
        assert!("x".repeat(SCOPE_BYTES_MAX + 1).parse::<Scope>().is_err());
    }

    #[test]
    fn a_credential_hands_out_only_what_it_holds() {
        let held = Scopes::parse_list("agents:* plugins:read").expect("scopes");
        assert!(held.includes(&Scopes::parse_list("agents:read agents:*").expect("scopes")));
        assert!(held.includes(&Scopes::parse_list("plugins:read").expect("scopes")));
        assert!(!held.includes(&Scopes::parse_list("plugins:write").expect("scopes")));
        assert!(!held.includes(&Scopes::parse_list("plugins:*").expect("scopes")));
        assert!(!held.includes(&Scopes::all()));
        assert!(Scopes::all().includes(&Scopes::all()));
        assert!(Scopes::parse_list(&vec!["a:b"; SCOPES_PER_CREDENTIAL_MAX + 1].join(" ")).is_err());
    }
}
