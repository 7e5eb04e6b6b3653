//! Agents, their typed capabilities, heartbeats and lifecycle status.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::tenant::TenantId;
use crate::{CoreError, CoreResult};

/// Longest agent name, in bytes.
pub const AGENT_NAME_BYTES_MAX: usize = 128;
/// Longest endpoint URL, in bytes.
pub const ENDPOINT_BYTES_MAX: usize = 2048;
/// Most labels on one agent.
pub const LABELS_MAX: usize = 64;
/// Longest label key, in bytes.
pub const LABEL_KEY_BYTES_MAX: usize = 63;
/// Longest label value, in bytes.
pub const LABEL_VALUE_BYTES_MAX: usize = 256;
/// Most capabilities on one agent.
pub const CAPABILITIES_MAX: usize = 64;
/// Longest capability name, in bytes.
pub const CAPABILITY_NAME_BYTES_MAX: usize = 128;
/// Largest capability parameter object, serialized, in bytes.
pub const CAPABILITY_PARAMS_BYTES_MAX: usize = 4096;
/// Most free-form telemetry entries in one heartbeat.
pub const TELEMETRY_ENTRIES_MAX: usize = 32;
/// Longest telemetry key, in bytes.
pub const TELEMETRY_KEY_BYTES_MAX: usize = 63;

/// An agent's id: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, format = Uuid, example = "01a228a3-2abf-74fc-ac42-0a493533179a")]
pub struct AgentId(pub Uuid);

impl AgentId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for AgentId {
    fn default() -> Self {
        Self::new()
    }
}

impl FromStr for AgentId {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(s).map(Self).map_err(|_| CoreError::invalid("invalid_id", "agent id must be a UUID"))
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where an agent is in its TTL lifecycle.
///
/// `healthy` → `stale` → `zombie` → removed, driven by the time since the last heartbeat (or
/// since registration, for an agent that never sent one). A heartbeat makes it `healthy` again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Heard from within the stale threshold.
    Healthy,
    /// Silent past the stale threshold: routing should avoid it.
    Stale,
    /// Silent past the zombie threshold: presumed dead, removed at the removal threshold.
    Zombie,
}

impl AgentStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [AgentStatus; 3] = [Self::Healthy, Self::Stale, Self::Zombie];

    /// The status as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Stale => "stale",
            Self::Zombie => "zombie",
        }
    }
}

impl FromStr for AgentStatus {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "healthy" => Ok(Self::Healthy),
            "stale" => Ok(Self::Stale),
            "zombie" => Ok(Self::Zombie),
            _ => Err(CoreError::invalid("invalid_status", "status must be one of healthy, stale, zombie")),
        }
    }
}

/// A typed, versioned capability an agent provides, e.g. `inference.llm` `1.4.0`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Capability {
    /// Dotted name: lowercase segments of letters, digits, `-` and `_`, e.g. `inference.llm`.
    pub name: String,
    /// The version the agent implements.
    #[schema(value_type = String, example = "1.4.0")]
    pub version: semver::Version,
    /// Parameters of this capability (a JSON object), e.g. `{"model": "llama-3-8b"}`.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

impl Capability {
    /// Checks the name and the size and shape of the parameters.
    pub fn validate(&self) -> CoreResult<()> {
        validate_capability_name(&self.name)?;
        if !self.params.is_object() {
            return Err(CoreError::invalid("invalid_capability", "capability params must be a JSON object"));
        }
        let params_bytes = serde_json::to_vec(&self.params).map_or(usize::MAX, |v| v.len());
        if params_bytes > CAPABILITY_PARAMS_BYTES_MAX {
            return Err(CoreError::invalid(
                "invalid_capability",
                format!("capability params must serialize to at most {CAPABILITY_PARAMS_BYTES_MAX} bytes"),
            ));
        }
        Ok(())
    }
}

/// Checks a capability name: 1 to 128 bytes, dot-separated non-empty segments of lowercase
/// ASCII letters, digits, `-` and `_`.
pub fn validate_capability_name(name: &str) -> CoreResult<()> {
    let segment_ok = |s: &str| {
        !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    };
    if name.is_empty() || name.len() > CAPABILITY_NAME_BYTES_MAX || !name.split('.').all(segment_ok) {
        return Err(CoreError::invalid(
            "invalid_capability",
            format!(
                "capability name must be 1 to {CAPABILITY_NAME_BYTES_MAX} bytes of dot-separated lowercase segments, e.g. inference.llm"
            ),
        ));
    }
    Ok(())
}

/// The load and telemetry an agent reports with a heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// Tasks the agent is running now.
    #[serde(default)]
    pub in_flight_tasks: u32,
    /// CPU use as a fraction of one core (may exceed 1 on several cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ratio: Option<f64>,
    /// Resident memory, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Recent task latency, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Errors since the agent started.
    #[serde(default)]
    pub error_count: u64,
    /// Requests since the agent started.
    #[serde(default)]
    pub request_count: u64,
    /// Free-form numeric telemetry, e.g. `{"gpu_ratio": 0.7}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub telemetry: BTreeMap<String, f64>,
}

/// Most CPU ratio accepted (1024 fully used cores).
const CPU_RATIO_MAX: f64 = 1024.0;

impl Load {
    /// Checks ranges and sizes.
    pub fn validate(&self) -> CoreResult<()> {
        let bad = |message: String| Err(CoreError::invalid("invalid_heartbeat", message));
        if let Some(cpu) = self.cpu_ratio
            && !(cpu.is_finite() && (0.0..=CPU_RATIO_MAX).contains(&cpu))
        {
            return bad(format!("cpu_ratio must be between 0 and {CPU_RATIO_MAX}"));
        }
        if let Some(latency) = self.latency_ms
            && !(latency.is_finite() && latency >= 0.0)
        {
            return bad("latency_ms must be a finite number >= 0".into());
        }
        if self.error_count > self.request_count && self.request_count > 0 {
            return bad("error_count cannot exceed request_count".into());
        }
        if self.telemetry.len() > TELEMETRY_ENTRIES_MAX {
            return bad(format!("telemetry has at most {TELEMETRY_ENTRIES_MAX} entries"));
        }
        for (key, value) in &self.telemetry {
            if key.is_empty() || key.len() > TELEMETRY_KEY_BYTES_MAX || !value.is_finite() {
                return bad(format!(
                    "telemetry keys are 1 to {TELEMETRY_KEY_BYTES_MAX} bytes and values finite numbers"
                ));
            }
        }
        Ok(())
    }
}

/// A registered agent as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Agent {
    /// Unique id, assigned by the kernel.
    pub id: AgentId,
    /// The tenant that owns the agent.
    #[schema(value_type = String, example = "default")]
    pub tenant: TenantId,
    /// Name, unique within the tenant.
    pub name: String,
    /// Where the kernel can reach the agent, if it accepts pushed work.
    pub endpoint: Option<String>,
    /// Free-form labels for selection, e.g. `{"zone": "eu-1"}`.
    pub labels: BTreeMap<String, String>,
    /// What the agent can do.
    pub capabilities: Vec<Capability>,
    /// Lifecycle status.
    pub status: AgentStatus,
    /// Registration time (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// Last change to the agent's definition (ms since the Unix epoch).
    pub updated_at_ms: i64,
    /// Last heartbeat (ms since the Unix epoch), if any.
    pub last_heartbeat_at_ms: Option<i64>,
    /// Load reported with the last heartbeat.
    pub load: Option<Load>,
    /// Incremented on every change to the definition; for optimistic concurrency.
    pub revision: i64,
}

impl Agent {
    /// When the agent was last heard from: its last heartbeat, or its registration.
    pub fn last_seen_ms(&self) -> i64 {
        self.last_heartbeat_at_ms.unwrap_or(self.created_at_ms)
    }
}

/// What a client sends to register an agent.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAgent {
    /// Name, unique within the tenant.
    pub name: String,
    /// Optional `http` or `https` URL where the agent takes pushed work.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Capabilities.
    #[serde(default)]
    pub capabilities: Vec<Capability>,
}

/// A partial update: fields that are present replace the stored ones.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentPatch {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New endpoint; `null` removes it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub endpoint: Option<Option<String>>,
    /// New labels (replace all).
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// New capabilities (replace all).
    #[serde(default)]
    pub capabilities: Option<Vec<Capability>>,
    /// If present, the update applies only when the stored revision equals it.
    #[serde(default)]
    pub revision: Option<i64>,
}

fn double_option<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// Validates the fields every agent definition must satisfy.
pub fn validate_definition(
    name: &str,
    endpoint: Option<&str>,
    labels: &BTreeMap<String, String>,
    capabilities: &[Capability],
) -> CoreResult<()> {
    if name.trim().is_empty() || name.len() > AGENT_NAME_BYTES_MAX || name.chars().any(char::is_control) {
        return Err(CoreError::invalid(
            "invalid_name",
            format!("name must be 1 to {AGENT_NAME_BYTES_MAX} bytes without control characters"),
        ));
    }
    if let Some(endpoint) = endpoint {
        let parsed = url::Url::parse(endpoint).ok().filter(|u| {
            matches!(u.scheme(), "http" | "https") && u.host().is_some() && endpoint.len() <= ENDPOINT_BYTES_MAX
        });
        if parsed.is_none() {
            return Err(CoreError::invalid(
                "invalid_endpoint",
                format!("endpoint must be an absolute http or https URL of at most {ENDPOINT_BYTES_MAX} bytes"),
            ));
        }
    }
    validate_labels(labels)?;
    if capabilities.len() > CAPABILITIES_MAX {
        return Err(CoreError::invalid(
            "invalid_capability",
            format!("an agent has at most {CAPABILITIES_MAX} capabilities"),
        ));
    }
    for (i, cap) in capabilities.iter().enumerate() {
        cap.validate()?;
        if capabilities[..i].iter().any(|c| c.name == cap.name) {
            return Err(CoreError::invalid("invalid_capability", format!("capability {} is listed twice", cap.name)));
        }
    }
    Ok(())
}

/// Checks label count and key/value sizes. Keys follow the capability-name alphabet plus `/`.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> CoreResult<()> {
    if labels.len() > LABELS_MAX {
        return Err(CoreError::invalid("invalid_label", format!("an agent has at most {LABELS_MAX} labels")));
    }
    for (key, value) in labels {
        validate_label(key, value)?;
    }
    Ok(())
}

/// Checks one label.
pub fn validate_label(key: &str, value: &str) -> CoreResult<()> {
    let key_ok = !key.is_empty()
        && key.len() <= LABEL_KEY_BYTES_MAX
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if !key_ok {
        return Err(CoreError::invalid(
            "invalid_label",
            format!("label keys are 1 to {LABEL_KEY_BYTES_MAX} bytes of ASCII letters, digits, '-', '_', '.' or '/'"),
        ));
    }
    if value.len() > LABEL_VALUE_BYTES_MAX || value.chars().any(char::is_control) {
        return Err(CoreError::invalid(
            "invalid_label",
            format!("label values are at most {LABEL_VALUE_BYTES_MAX} bytes without control characters"),
        ));
    }
    Ok(())
}

/// Most `key=value` pairs one label selector may hold.
pub const LABEL_SELECTOR_PAIRS_MAX: usize = 16;

/// Parses a label selector `key=value[,key=value…]`: agents must carry every pair.
pub fn parse_label_selector(raw: &str) -> CoreResult<BTreeMap<String, String>> {
    let bad = |message: String| CoreError::invalid("invalid_query", message);
    let mut labels = BTreeMap::new();
    for pair in raw.split(',') {
        let (key, value) = pair.split_once('=').ok_or_else(|| bad("label must be key=value[,key=value…]".into()))?;
        validate_label(key, value).map_err(|e| bad(e.to_string()))?;
        labels.insert(key.to_string(), value.to_string());
        if labels.len() > LABEL_SELECTOR_PAIRS_MAX {
            return Err(bad(format!("at most {LABEL_SELECTOR_PAIRS_MAX} label pairs")));
        }
    }
    Ok(labels)
}

/// A record of something that happened to an agent, readable by operators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentEvent {
    /// Monotonic id assigned by the store (0 before it is stored).
    pub seq: i64,
    /// The agent's tenant.
    #[schema(value_type = String, example = "default")]
    pub tenant: TenantId,
    /// The agent.
    pub agent_id: AgentId,
    /// What happened.
    pub kind: AgentEventKind,
    /// Status before, for status changes.
    pub from_status: Option<AgentStatus>,
    /// Status after, for status changes.
    pub to_status: Option<AgentStatus>,
    /// When (ms since the Unix epoch).
    pub at_ms: i64,
}

/// The kinds of [`AgentEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentEventKind {
    /// Created through the API.
    Registered,
    /// Definition changed through the API.
    Updated,
    /// Deleted through the API.
    Deleted,
    /// Moved between lifecycle statuses (TTL or heartbeat).
    StatusChanged,
    /// Removed by the TTL sweeper after the removal threshold.
    Expired,
}

impl AgentEventKind {
    /// The kind as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::Updated => "updated",
            Self::Deleted => "deleted",
            Self::StatusChanged => "status_changed",
            Self::Expired => "expired",
        }
    }
}

impl FromStr for AgentEventKind {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "registered" => Self::Registered,
            "updated" => Self::Updated,
            "deleted" => Self::Deleted,
            "status_changed" => Self::StatusChanged,
            "expired" => Self::Expired,
            _ => {
                return Err(CoreError::invalid("invalid_event_kind", "unknown agent event kind"));
            }
        })
    }
}

impl AgentEvent {
    /// An event not yet stored.
    pub fn new(agent: &Agent, kind: AgentEventKind, at_ms: i64) -> Self {
        Self {
            seq: 0,
            tenant: agent.tenant.clone(),
            agent_id: agent.id,
            kind,
            from_status: None,
            to_status: None,
            at_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cap(name: &str, version: &str) -> Capability {
        Capability { name: name.into(), version: version.parse().expect("version"), params: json!({}) }
    }

    #[test]
    fn capability_names_are_dotted_lowercase() {
        for ok in ["inference.llm", "a", "gpu.cuda-12", "x_y.z"] {
            assert!(validate_capability_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".a", "a.", "a..b", "Inference", "a b", "a/b"] {
            assert!(validate_capability_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn definitions_reject_bad_endpoints_duplicates_and_oversized_params() {
        let labels = BTreeMap::new();
        assert!(validate_definition("a", Some("http://10.0.0.1:8080/x"), &labels, &[]).is_ok());
        for bad in ["ftp://x", "not a url", "http://", "/relative"] {
            assert!(validate_definition("a", Some(bad), &labels, &[]).is_err(), "{bad}");
        }
        let dup = [cap("a.b", "1.0.0"), cap("a.b", "2.0.0")];
        assert!(validate_definition("a", None, &labels, &dup).is_err());
        let mut big = cap("a.b", "1.0.0");
        big.params = json!({"blob": "x".repeat(CAPABILITY_PARAMS_BYTES_MAX)});
        assert!(validate_definition("a", None, &labels, &[big]).is_err());
        let mut not_object = cap("a.b", "1.0.0");
        not_object.params = json!([1, 2]);
        assert!(validate_definition("a", None, &labels, &[not_object]).is_err());
        assert!(validate_definition("", None, &labels, &[]).is_err());
        assert!(validate_definition("a\nb", None, &labels, &[]).is_err());
    }

    #[test]
    fn label_selectors_parse_pairs() {
        let parsed = parse_label_selector("zone=eu,tier=gold").expect("valid");
        assert_eq!(parsed.get("zone").map(String::as_str), Some("eu"));
        assert_eq!(parsed.len(), 2);
        assert_eq!(parse_label_selector("empty=").expect("empty value").get("empty").map(String::as_str), Some(""));
        let too_many = (0..=LABEL_SELECTOR_PAIRS_MAX).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        for bad in ["novalue", "=v", "a=b,", "a b=c", too_many.as_str()] {
            assert!(parse_label_selector(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn load_ranges_are_checked() {
        assert!(Load::default().validate().is_ok());
        let bad = [
            Load { cpu_ratio: Some(f64::NAN), ..Load::default() },
            Load { cpu_ratio: Some(-1.0), ..Load::default() },
            Load { latency_ms: Some(f64::INFINITY), ..Load::default() },
            Load { error_count: 5, request_count: 2, ..Load::default() },
        ];
        for load in bad {
            assert!(load.validate().is_err(), "{load:?}");
        }
    }
}
