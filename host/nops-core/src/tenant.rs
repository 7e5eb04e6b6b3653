//! Tenants: the unit of isolation for every resource in the kernel.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::CoreError;

/// Longest tenant id accepted, in bytes.
pub const TENANT_ID_BYTES_MAX: usize = 63;

/// A tenant id: 1 to 63 bytes of lowercase ASCII letters, digits, `-` and `_`, starting with a
/// letter or digit. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

impl TenantId {
    /// The tenant that requests without an explicit tenant act in.
    pub const DEFAULT: &'static str = "default";

    /// The `default` tenant.
    pub fn default_tenant() -> Self {
        Self(Arc::from(Self::DEFAULT))
    }

    /// The tenant id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TenantId {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
        let first_ok = s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if s.is_empty() || s.len() > TENANT_ID_BYTES_MAX || !first_ok || !s.chars().all(valid_char) {
            return Err(CoreError::invalid(
                "invalid_tenant",
                format!(
                    "tenant id must be 1 to {TENANT_ID_BYTES_MAX} lowercase letters, digits, '-' or '_', starting with a letter or digit"
                ),
            ));
        }
        Ok(Self(Arc::from(s)))
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", self.0)
    }
}

impl Serialize for TenantId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TenantId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_are_validated() {
        for ok in ["default", "acme", "a", "tenant-1", "t_2", "0abc"] {
            assert!(ok.parse::<TenantId>().is_ok(), "{ok} should be valid");
        }
        let long = "a".repeat(TENANT_ID_BYTES_MAX + 1);
        for bad in ["", "Acme", "-a", "_a", "a b", "a/b", "é", long.as_str()] {
            assert!(bad.parse::<TenantId>().is_err(), "{bad:?} should be invalid");
        }
    }
}
