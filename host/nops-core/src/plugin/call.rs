//! Calling plugins: what the kernel asks of each kind, what it gets back, and the capability
//! trait the wasm runtime implements ([`PluginRuntime`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{Grants, Limits, PluginKind};
use crate::tenant::TenantId;

/// A typed attribute value (the WIT `value` variant). In JSON: a string, an integer, a
/// number, a boolean or a list of strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
#[schema(as = AttributeValue)]
pub enum Value {
    /// Text.
    Text(String),
    /// A whole number.
    Integer(i64),
    /// A real number.
    Number(f64),
    /// True or false.
    Boolean(bool),
    /// A list of texts.
    Texts(Vec<String>),
}

/// [`Value`] under its OpenAPI name: a field typed `Value` would read as "any JSON" to the
/// schema derive, which special-cases that type name.
pub type AttributeValue = Value;

/// A named attribute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Attribute {
    /// The attribute's name.
    pub name: String,
    /// Its value.
    #[schema(value_type = AttributeValue)]
    pub value: Value,
}

/// One candidate agent for a scorer: compact numbers only.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    /// Position in the kernel's list.
    pub index: u32,
    /// Health in [0, 1].
    pub health: f32,
    /// Tasks in flight.
    pub in_flight: u32,
    /// CPU use in cores.
    pub cpu_ratio: f32,
    /// Peak-EWMA latency, in milliseconds.
    pub latency_ms: f32,
    /// Errors over requests, in [0, 1].
    pub error_rate: f32,
    /// Time since the last heartbeat, in milliseconds.
    pub silence_ms: u32,
    /// Version of the best-matching capability.
    pub version: (u32, u32, u32),
}

/// What a task asks for, as a scorer sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScoreTask {
    /// Required capability names.
    pub capabilities: Vec<String>,
    /// Routing hints.
    #[serde(default)]
    pub hints: Vec<(String, String)>,
}

/// An access request for a policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessRequest {
    /// Attributes of who is asking.
    #[serde(default)]
    pub principal: Vec<Attribute>,
    /// What they want to do, e.g. `agents:read`.
    pub action: String,
    /// Attributes of what they want to do it to.
    #[serde(default)]
    pub resource: Vec<Attribute>,
    /// Attributes of the circumstances (tenant, source address, time).
    #[serde(default)]
    pub context: Vec<Attribute>,
}

/// A policy's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Decision {
    /// Allowed or not.
    pub allow: bool,
    /// Why, for the decision log.
    pub reasons: Vec<String>,
    /// Conditions the kernel applies when it allows.
    pub obligations: Vec<(String, String)>,
}

/// Which way a migration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From schema version N to N+1.
    Up,
    /// From N+1 back to N.
    Down,
}

/// What a tool says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ToolDescription {
    /// Its name.
    pub name: String,
    /// What it does.
    pub description: String,
    /// JSON Schema of its arguments.
    pub input_schema: String,
}

/// An event a contract evaluates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContractEvent {
    /// What happened, e.g. `spend`.
    pub kind: String,
    /// Its attributes.
    #[serde(default)]
    pub attributes: Vec<Attribute>,
}

/// A contract's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Verdict {
    /// Accepted or not.
    pub accept: bool,
    /// Why.
    pub reason: String,
}

/// One call into a plugin. In JSON, one key naming the call, e.g. `{"authorize": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Invocation {
    /// Score candidates for a task (scorer).
    Score {
        /// The task.
        task: ScoreTask,
        /// The candidates, in the kernel's order.
        candidates: Vec<Candidate>,
    },
    /// Decide an access request (policy).
    Authorize(AccessRequest),
    /// The schema version a migration starts from (migration).
    FromVersion,
    /// Transform one record (migration).
    Migrate {
        /// Which way.
        direction: Direction,
        /// The record (JSON).
        data: serde_json::Value,
    },
    /// Describe the tool (mcp-tool).
    Describe,
    /// Run the tool with JSON arguments (mcp-tool).
    CallTool {
        /// The arguments.
        arguments: serde_json::Value,
    },
    /// Evaluate an event (contract).
    Govern(ContractEvent),
}

impl Invocation {
    /// The plugin kind that answers this call.
    pub fn kind(&self) -> PluginKind {
        match self {
            Self::Score { .. } => PluginKind::Scorer,
            Self::Authorize(_) => PluginKind::Policy,
            Self::FromVersion | Self::Migrate { .. } => PluginKind::Migration,
            Self::Describe | Self::CallTool { .. } => PluginKind::McpTool,
            Self::Govern(_) => PluginKind::Contract,
        }
    }
}

/// What a plugin answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// One score per candidate, in order.
    Scores(Vec<f32>),
    /// A policy decision.
    Decision(Decision),
    /// A migration's starting schema version.
    FromVersion(u32),
    /// A migrated record.
    Migrated(serde_json::Value),
    /// A tool's description.
    Description(ToolDescription),
    /// A tool's result: JSON content, or an error message shown as an MCP error result
    /// (`{"Ok": <JSON>}` or `{"Err": "<message>"}`).
    #[schema(value_type = Object)]
    ToolResult(Result<serde_json::Value, String>),
    /// A contract's verdict.
    Verdict(Verdict),
}

/// Who a call runs for, as `identity.caller` reports it (only with the `identity` grant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Caller {
    /// The principal's subject.
    pub subject: String,
    /// Its tenant.
    pub tenant: Option<String>,
    /// Other attributes (role, scopes).
    pub attributes: Vec<Attribute>,
}

/// The circumstances of one call.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The tenant the plugin runs for: it selects the storage namespace.
    pub tenant: TenantId,
    /// The caller, if the call has one.
    pub caller: Option<Arc<Caller>>,
}

/// Why a call failed. The kernel keeps serving in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, utoipa::ToSchema)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
#[non_exhaustive]
pub enum CallError {
    /// The call ran past its deadline and was interrupted.
    #[error("deadline of {0} ms exceeded")]
    Timeout(u64),
    /// A contract burnt all its fuel.
    #[error("fuel of {0} exhausted")]
    OutOfFuel(u64),
    /// The guest trapped (including memory growth past its cap).
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// The guest returned an error value.
    #[error("plugin returned an error: {0}")]
    Guest(String),
    /// The guest returned something the host refuses (too large, wrong count, not finite).
    #[error("plugin output refused: {0}")]
    BadOutput(String),
    /// The call does not fit the plugin's kind.
    #[error("a {plugin} plugin cannot answer a {call} call")]
    WrongKind {
        /// The plugin's kind.
        plugin: PluginKind,
        /// The kind the call needs.
        call: PluginKind,
    },
    /// The kernel could not run or commit the call (store down, no instance slot free).
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl CallError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::OutOfFuel(_) => "out_of_fuel",
            Self::Trap(_) => "trap",
            Self::Guest(_) => "guest_error",
            Self::BadOutput(_) => "bad_output",
            Self::WrongKind { .. } => "wrong_kind",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

/// What one call cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallReport {
    /// Wall time of the call.
    pub elapsed: Duration,
    /// Fuel burnt (contracts).
    pub fuel_used: Option<u64>,
    /// Linear memory of the instance after the call, in bytes.
    pub memory_bytes: u64,
}

/// Everything the runtime needs to load one plugin version.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The owning tenant.
    pub tenant: TenantId,
    /// The plugin's name.
    pub name: String,
    /// The version.
    pub version: semver::Version,
    /// Its kind.
    pub kind: PluginKind,
    /// What it may reach.
    pub grants: Grants,
    /// Its limits.
    pub limits: Limits,
    /// Its configuration document (empty when none).
    pub config: Arc<[u8]>,
}

/// Why a component could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The bytes are not a valid WebAssembly component.
    #[error("not a valid WebAssembly component: {0}")]
    Invalid(String),
    /// The component does not implement the world of its declared kind.
    #[error("the component does not implement the `{kind}` world: {detail}")]
    WorldMismatch {
        /// The declared kind.
        kind: PluginKind,
        /// What did not match.
        detail: String,
    },
}

/// A loaded, pre-instantiated plugin version.
#[async_trait]
pub trait LoadedPlugin: Send + Sync + 'static {
    /// Runs one call within the plugin's limits.
    async fn invoke(&self, ctx: &CallContext, call: &Invocation) -> (Result<Output, CallError>, CallReport);
}

/// The wasm runtime, as the kernel sees it.
pub trait PluginRuntime: Send + Sync + 'static {
    /// Compiles (or loads from the on-disk cache) and pre-instantiates a component, checking
    /// that it implements the world of `spec.kind`.
    fn load(&self, spec: LoadSpec, wasm: &[u8]) -> Result<Arc<dyn LoadedPlugin>, LoadError>;
}
