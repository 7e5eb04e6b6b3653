//! Plugins as domain objects: manifests, kinds, grants, limits, signatures and the hash chain
//! of each plugin's version history.
//!
//! The wasm runtime (`nops-runtime`) runs plugins; this module decides what may be loaded and
//! records what happened. Everything here is pure: no I/O, no WebAssembly.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use blake2::{Blake2b, Digest, digest::consts::U32};
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::tenant::TenantId;
use crate::{CoreError, CoreResult};

pub mod call;
pub mod service;

/// Longest plugin name, in bytes.
pub const PLUGIN_NAME_BYTES_MAX: usize = 64;
/// Largest component accepted, in bytes.
pub const WASM_BYTES_MAX: usize = 32 << 20;
/// Largest configuration document accepted, in bytes.
pub const CONFIG_BYTES_MAX: usize = 1 << 20;
/// Largest manifest accepted, in bytes.
pub const MANIFEST_BYTES_MAX: usize = 16 * 1024;
/// Most bus subject patterns one manifest may ask for.
pub const BUS_GRANTS_MAX: usize = 32;
/// Longest bus subject or subject pattern, in bytes.
pub const SUBJECT_BYTES_MAX: usize = 256;
/// Most versions one plugin keeps.
pub const VERSIONS_PER_PLUGIN_MAX: usize = 256;
/// Prefix of digests in manifests: the hash function is part of the value.
pub const DIGEST_PREFIX: &str = "blake2b256:";
/// Domain separation of manifest signatures: the bytes signed start with this line.
pub const SIGNATURE_DOMAIN: &str = "nops-plugin-signature-v1\n";
/// The hash of the entry before the first one of a chain.
pub const CHAIN_GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a plugin does: one WIT world each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    /// Ranks candidate agents for a task.
    Scorer,
    /// Decides access requests.
    Policy,
    /// Transforms stored records between schema versions.
    Migration,
    /// A tool exposed over MCP.
    McpTool,
    /// A tenant's governance contract, metered by fuel.
    Contract,
}

impl PluginKind {
    /// Every kind.
    pub const ALL: [PluginKind; 5] = [Self::Scorer, Self::Policy, Self::Migration, Self::McpTool, Self::Contract];

    /// The WIT world name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scorer => "scorer",
            Self::Policy => "policy",
            Self::Migration => "migration",
            Self::McpTool => "mcp-tool",
            Self::Contract => "contract",
        }
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PluginKind {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            CoreError::invalid("invalid_kind", "kind must be one of scorer, policy, migration, mcp-tool, contract")
        })
    }
}

/// What a plugin asks to reach. Everything is off unless asked for; the operator's ceilings
/// ([`GrantCeilings`]) decide what may be asked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Key-value storage in the plugin's namespace (per plugin and tenant).
    #[serde(default)]
    pub storage: bool,
    /// Subjects the plugin may publish to: exact subjects or patterns where `*` matches one
    /// token and a final `>` matches one or more.
    #[serde(default)]
    pub bus: Vec<String>,
    /// The caller's principal through `identity`.
    #[serde(default)]
    pub identity: bool,
    /// Real wall and monotonic clocks and secure randomness. Without it a plugin sees a clock
    /// fixed at the Unix epoch and a seeded generator. Never granted to contracts.
    #[serde(default)]
    pub clock: bool,
}

/// The limits a plugin runs under, within the operator's ceilings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest linear memory, in bytes.
    #[serde(default = "Limits::default_memory")]
    pub memory_bytes_max: u64,
    /// Longest one call may run, in milliseconds.
    #[serde(default = "Limits::default_deadline")]
    pub deadline_ms: u64,
    /// Fuel one contract call may burn (contracts only; required for them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel_max: Option<u64>,
}

impl Limits {
    fn default_memory() -> u64 {
        32 << 20
    }
    fn default_deadline() -> u64 {
        50
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self { memory_bytes_max: Self::default_memory(), deadline_ms: Self::default_deadline(), fuel_max: None }
    }
}

/// An ed25519 signature of a manifest. Both fields are required: a manifest with a partial
/// signature does not parse, so no missing field can make verification skip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ManifestSignature {
    /// Which trusted key signed (a name from the operator's `trusted_keys`).
    pub key_id: String,
    /// The 64-byte signature, base64.
    pub ed25519: String,
}

/// The manifest that travels beside a `.wasm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The plugin's name, unique within its tenant.
    pub name: String,
    /// Its semantic version.
    #[schema(value_type = String, example = "1.2.0")]
    pub version: semver::Version,
    /// Its kind: the WIT world the component must implement.
    pub kind: PluginKind,
    /// `blake2b256:<hex>` of the component's bytes.
    pub digest: String,
    /// File name of the configuration document beside the manifest (for directory loading
    /// and the CLI); uploads send the document itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// `blake2b256:<hex>` of the configuration document, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// What the plugin asks to reach.
    #[serde(default)]
    pub grants: Grants,
    /// The limits it asks to run under.
    #[serde(default)]
    pub limits: Limits,
    /// Optional signature (mandatory when the operator requires signed plugins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<ManifestSignature>,
}

/// The fields a signature covers, in a fixed order.
#[derive(Serialize)]
struct SignedFields<'a> {
    name: &'a str,
    version: String,
    kind: PluginKind,
    digest: &'a str,
    config_digest: Option<&'a str>,
    grants: &'a Grants,
    limits: &'a Limits,
}

impl Manifest {
    /// Parses a TOML manifest.
    pub fn from_toml(text: &str) -> CoreResult<Self> {
        if text.len() > MANIFEST_BYTES_MAX {
            return Err(CoreError::invalid(
                "invalid_manifest",
                format!("manifests are at most {MANIFEST_BYTES_MAX} bytes"),
            ));
        }
        toml::from_str(text).map_err(|e| CoreError::invalid("invalid_manifest", format!("manifest: {}", e.message())))
    }

    /// The manifest as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// The exact bytes an ed25519 signature covers: [`SIGNATURE_DOMAIN`] followed by the
    /// JSON of name, version, kind, digest, config digest, grants and limits in that order.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let fields = SignedFields {
            name: &self.name,
            version: self.version.to_string(),
            kind: self.kind,
            digest: &self.digest,
            config_digest: self.config_digest.as_deref(),
            grants: &self.grants,
            limits: &self.limits,
        };
        let mut bytes = SIGNATURE_DOMAIN.as_bytes().to_vec();
        bytes.extend(serde_json::to_vec(&fields).unwrap_or_default());
        bytes
    }

    /// Checks the manifest's own rules (name, grants shape, kind-specific limits) and that
    /// the component and configuration match their digests.
    pub fn check(&self, wasm: &[u8], config: Option<&[u8]>, ceilings: &Ceilings) -> CoreResult<()> {
        validate_plugin_name(&self.name)?;
        if wasm.len() > WASM_BYTES_MAX {
            return Err(CoreError::LimitExceeded {
                message: format!("components are at most {WASM_BYTES_MAX} bytes").into(),
            });
        }
        if self.digest != digest(wasm) {
            return Err(CoreError::invalid(
                "digest_mismatch",
                "the component's BLAKE2b-256 digest does not match the manifest",
            ));
        }
        match (config, &self.config_digest) {
            (Some(bytes), Some(expected)) => {
                if bytes.len() > CONFIG_BYTES_MAX {
                    return Err(CoreError::LimitExceeded {
                        message: format!("configuration documents are at most {CONFIG_BYTES_MAX} bytes").into(),
                    });
                }
                if *expected != digest(bytes) {
                    return Err(CoreError::invalid(
                        "digest_mismatch",
                        "the configuration's digest does not match the manifest",
                    ));
                }
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(CoreError::invalid(
                    "invalid_manifest",
                    "a configuration was sent but the manifest has no config_digest",
                ));
            }
            (None, Some(_)) => {
                return Err(CoreError::invalid(
                    "invalid_manifest",
                    "the manifest names a config_digest but no configuration was sent",
                ));
            }
        }
        if self.grants.bus.len() > BUS_GRANTS_MAX {
            return Err(CoreError::invalid("invalid_grants", format!("at most {BUS_GRANTS_MAX} bus subjects")));
        }
        for pattern in &self.grants.bus {
            validate_subject(pattern, true)?;
        }
        if self.kind == PluginKind::Contract {
            if self.grants.clock {
                return Err(CoreError::invalid(
                    "invalid_grants",
                    "contracts are deterministic: they cannot be granted a clock",
                ));
            }
            if self.limits.fuel_max.is_none() {
                return Err(CoreError::invalid("invalid_limits", "contracts must declare limits.fuel_max"));
            }
        } else if self.limits.fuel_max.is_some() {
            return Err(CoreError::invalid("invalid_limits", "only contracts are metered by fuel"));
        }
        ceilings.check(self)
    }
}

/// The operator's ceilings on what a manifest may ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ceilings {
    /// Largest linear memory a plugin may ask for, in bytes.
    pub memory_bytes_max: u64,
    /// Longest deadline, in milliseconds.
    pub deadline_ms_max: u64,
    /// Most fuel one contract call may ask for.
    pub fuel_max: u64,
    /// Whether plugins may ask for storage.
    pub storage: bool,
    /// Whether plugins may ask for the caller's identity.
    pub identity: bool,
    /// Whether plugins may ask for real clocks and randomness.
    pub clock: bool,
    /// Subject patterns within which plugins may ask to publish.
    pub bus: Vec<String>,
}

impl Default for Ceilings {
    fn default() -> Self {
        Self {
            memory_bytes_max: 256 << 20,
            deadline_ms_max: 10_000,
            fuel_max: 1_000_000_000,
            storage: true,
            identity: true,
            clock: false,
            bus: vec!["plugins.>".into(), "contract.>".into()],
        }
    }
}

impl Ceilings {
    fn check(&self, m: &Manifest) -> CoreResult<()> {
        let limits = &m.limits;
        if limits.memory_bytes_max == 0 || limits.memory_bytes_max > self.memory_bytes_max {
            return Err(CoreError::invalid(
                "limits_refused",
                format!("limits.memory_bytes_max must be between 1 and {}", self.memory_bytes_max),
            ));
        }
        if limits.deadline_ms == 0 || limits.deadline_ms > self.deadline_ms_max {
            return Err(CoreError::invalid(
                "limits_refused",
                format!("limits.deadline_ms must be between 1 and {}", self.deadline_ms_max),
            ));
        }
        if let Some(fuel) = limits.fuel_max
            && (fuel == 0 || fuel > self.fuel_max)
        {
            return Err(CoreError::invalid(
                "limits_refused",
                format!("limits.fuel_max must be between 1 and {}", self.fuel_max),
            ));
        }
        let refused = |what: &str| CoreError::invalid("grant_refused", format!("the operator does not grant {what}"));
        if m.grants.storage && !self.storage {
            return Err(refused("storage"));
        }
        if m.grants.identity && !self.identity {
            return Err(refused("identity"));
        }
        if m.grants.clock && !self.clock {
            return Err(refused("clock"));
        }
        for pattern in &m.grants.bus {
            if !self.bus.iter().any(|ceiling| pattern_within(pattern, ceiling)) {
                return Err(refused(&format!("publishing to `{pattern}`")));
            }
        }
        Ok(())
    }
}

/// How uploads are checked for signatures.
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    /// Refuse unsigned manifests.
    pub require_signed: bool,
    /// Trusted public keys by key id.
    pub keys: BTreeMap<String, VerifyingKey>,
}

impl TrustPolicy {
    /// Builds the policy from base64-encoded 32-byte public keys.
    pub fn from_base64(require_signed: bool, keys: &BTreeMap<String, String>) -> CoreResult<Self> {
        let mut parsed = BTreeMap::new();
        for (id, encoded) in keys {
            let bytes =
                BASE64.decode(encoded.trim()).ok().and_then(|b| <[u8; 32]>::try_from(b).ok()).ok_or_else(|| {
                    CoreError::invalid(
                        "invalid_key",
                        format!("trusted key `{id}` is not a base64 32-byte ed25519 public key"),
                    )
                })?;
            let key = VerifyingKey::from_bytes(&bytes).map_err(|_| {
                CoreError::invalid("invalid_key", format!("trusted key `{id}` is not a valid ed25519 point"))
            })?;
            parsed.insert(id.clone(), key);
        }
        Ok(Self { require_signed, keys: parsed })
    }

    /// Verifies the manifest's signature. A present signature is always verified (also when
    /// signatures are not required); an absent one is refused when they are. Returns the id of
    /// the key that signed.
    pub fn verify(&self, manifest: &Manifest) -> CoreResult<Option<String>> {
        let Some(signature) = &manifest.signature else {
            if self.require_signed {
                return Err(CoreError::invalid(
                    "unsigned",
                    "this kernel requires signed plugins; the manifest has no signature",
                ));
            }
            return Ok(None);
        };
        let key = self.keys.get(&signature.key_id).ok_or_else(|| {
            CoreError::invalid(
                "bad_signature",
                format!("signature key `{}` is not trusted by this kernel", signature.key_id),
            )
        })?;
        let bytes =
            BASE64.decode(signature.ed25519.trim()).ok().and_then(|b| <[u8; 64]>::try_from(b).ok()).ok_or_else(
                || CoreError::invalid("bad_signature", "the signature is not a base64 64-byte ed25519 signature"),
            )?;
        key.verify_strict(&manifest.signing_bytes(), &Signature::from_bytes(&bytes))
            .map_err(|_| CoreError::invalid("bad_signature", "the signature does not verify"))?;
        Ok(Some(signature.key_id.clone()))
    }
}

/// Signs `manifest` in place with an ed25519 secret key (32 bytes).
pub fn sign_manifest(manifest: &mut Manifest, key_id: &str, secret: &[u8; 32]) {
    use ed25519_dalek::Signer;
    let key = ed25519_dalek::SigningKey::from_bytes(secret);
    manifest.signature = None;
    let signature = key.sign(&manifest.signing_bytes());
    manifest.signature =
        Some(ManifestSignature { key_id: key_id.to_string(), ed25519: BASE64.encode(signature.to_bytes()) });
}

/// The base64 public key of an ed25519 secret key.
pub fn public_key_base64(secret: &[u8; 32]) -> String {
    BASE64.encode(ed25519_dalek::SigningKey::from_bytes(secret).verifying_key().to_bytes())
}

/// `blake2b256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("{DIGEST_PREFIX}{}", hex(&Blake2b::<U32>::digest(bytes)))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// Checks a plugin name: 1 to 64 bytes of lowercase letters, digits and `-`, starting with a
/// letter.
pub fn validate_plugin_name(name: &str) -> CoreResult<()> {
    let ok = !name.is_empty()
        && name.len() <= PLUGIN_NAME_BYTES_MAX
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(CoreError::invalid(
            "invalid_name",
            format!("plugin names are 1 to {PLUGIN_NAME_BYTES_MAX} bytes of a-z, 0-9 and '-', starting with a letter"),
        ))
    }
}

/// Checks a bus subject (`pattern` allows `*` and a final `>`).
pub fn validate_subject(subject: &str, pattern: bool) -> CoreResult<()> {
    let tokens: Vec<&str> = subject.split('.').collect();
    let token_ok = |(i, t): (usize, &&str)| {
        let wildcard = pattern && (**t == *"*" || (**t == *">" && i + 1 == tokens.len()));
        wildcard || (!t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    };
    if subject.is_empty() || subject.len() > SUBJECT_BYTES_MAX || !tokens.iter().enumerate().all(token_ok) {
        return Err(CoreError::invalid(
            "invalid_subject",
            format!("`{subject}` is not a subject: dot-separated tokens of letters, digits, '-' and '_'"),
        ));
    }
    Ok(())
}

/// True when `subject` matches `pattern` (`*` one token, final `>` one or more tokens).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when every subject `inner` matches is also matched by `outer`.
fn pattern_within(inner: &str, outer: &str) -> bool {
    let inner: Vec<&str> = inner.split('.').collect();
    let outer: Vec<&str> = outer.split('.').collect();
    for (i, o) in outer.iter().enumerate() {
        match (*o, inner.get(i)) {
            (">", Some(_)) => return true,
            (_, None) => return false,
            ("*", Some(t)) if *t != ">" => {}
            (o, Some(t)) if o == *t => {}
            _ => return false,
        }
    }
    inner.len() == outer.len()
}

/// One stored version of a plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PluginVersion {
    /// The tenant that owns the plugin.
    #[schema(value_type = String, example = "default")]
    pub tenant: TenantId,
    /// The manifest, as uploaded.
    pub manifest: Manifest,
    /// The trusted key that signed it, if signed.
    pub signed_by: Option<String>,
    /// When it was uploaded (ms since the Unix epoch).
    pub uploaded_at_ms: i64,
    /// Who uploaded it.
    pub uploaded_by: String,
}

/// The current state of a plugin: which version runs, which runs in shadow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PluginState {
    /// The tenant that owns the plugin.
    #[schema(value_type = String, example = "default")]
    pub tenant: TenantId,
    /// The plugin's name.
    pub name: String,
    /// Its kind (the same for every version).
    pub kind: PluginKind,
    /// The version serving calls.
    #[schema(value_type = Option<String>, example = "1.2.0")]
    pub active: Option<semver::Version>,
    /// A staged version run beside the active one, its differences recorded.
    #[schema(value_type = Option<String>, example = "1.2.0")]
    pub shadow: Option<semver::Version>,
    /// When this state was set (ms since the Unix epoch).
    pub updated_at_ms: i64,
}

/// What a chain entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChainAction {
    /// A version was uploaded.
    Upload,
    /// A version was activated.
    Activate,
    /// An earlier version was activated again.
    Rollback,
    /// A version started running in shadow.
    ShadowStart,
    /// Shadowing stopped.
    ShadowStop,
    /// The active version was deactivated.
    Deactivate,
    /// A version was deleted.
    Delete,
}

/// One link of a plugin's hash chain. `hash` is BLAKE2b-256 over `prev_hash` and the JSON of
/// every other field, so changing, removing or reordering any entry breaks every later link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChainEntry {
    /// The tenant that owns the plugin.
    #[schema(value_type = String, example = "default")]
    pub tenant: TenantId,
    /// The plugin's name.
    pub name: String,
    /// Position in the chain, from 1.
    pub seq: i64,
    /// What happened.
    pub action: ChainAction,
    /// The version concerned.
    #[schema(value_type = String, example = "1.2.0")]
    pub version: semver::Version,
    /// The component's digest.
    pub digest: String,
    /// BLAKE2b-256 of the manifest's JSON, so a changed grant or limit breaks the chain.
    pub manifest_digest: String,
    /// When (ms since the Unix epoch).
    pub at_ms: i64,
    /// Who did it.
    pub actor: String,
    /// The previous entry's hash ([`CHAIN_GENESIS`] for the first).
    pub prev_hash: String,
    /// This entry's hash.
    pub hash: String,
}

#[derive(Serialize)]
struct ChainFields<'a> {
    tenant: &'a str,
    name: &'a str,
    seq: i64,
    action: ChainAction,
    version: String,
    digest: &'a str,
    manifest_digest: &'a str,
    at_ms: i64,
    actor: &'a str,
}

impl ChainEntry {
    /// The hash this entry must carry.
    pub fn compute_hash(&self) -> String {
        let fields = ChainFields {
            tenant: self.tenant.as_str(),
            name: &self.name,
            seq: self.seq,
            action: self.action,
            version: self.version.to_string(),
            digest: &self.digest,
            manifest_digest: &self.manifest_digest,
            at_ms: self.at_ms,
            actor: &self.actor,
        };
        let mut hasher = Blake2b::<U32>::new();
        hasher.update(self.prev_hash.as_bytes());
        hasher.update(serde_json::to_vec(&fields).unwrap_or_default());
        hex(&hasher.finalize())
    }

    /// The entry following `prev` (or the first one), with its hash computed.
    #[allow(clippy::too_many_arguments)]
    pub fn next(
        prev: Option<&ChainEntry>,
        tenant: &TenantId,
        name: &str,
        action: ChainAction,
        manifest: &Manifest,
        at_ms: i64,
        actor: &str,
    ) -> Self {
        let mut entry = Self {
            tenant: tenant.clone(),
            name: name.to_string(),
            seq: prev.map_or(1, |p| p.seq + 1),
            action,
            version: manifest.version.clone(),
            digest: manifest.digest.clone(),
            manifest_digest: manifest_digest(manifest),
            at_ms,
            actor: actor.to_string(),
            prev_hash: prev.map_or_else(|| CHAIN_GENESIS.to_string(), |p| p.hash.clone()),
            hash: String::new(),
        };
        entry.hash = entry.compute_hash();
        entry
    }
}

/// BLAKE2b-256 of a manifest's JSON.
pub fn manifest_digest(manifest: &Manifest) -> String {
    digest(&serde_json::to_vec(manifest).unwrap_or_default())
}

/// Why a chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plugin `{tenant}/{name}`: hash chain broken at entry {seq}: {reason}")]
pub struct ChainBroken {
    /// The plugin's tenant.
    pub tenant: String,
    /// The plugin's name.
    pub name: String,
    /// The first entry that does not verify.
    pub seq: i64,
    /// What is wrong.
    pub reason: String,
}

/// Verifies one plugin's chain (entries in `seq` order) against its stored versions and
/// state: links and hashes, every stored version's manifest recorded by an upload entry, and
/// the active and shadow versions those the chain last set.
pub fn verify_chain(
    entries: &[ChainEntry],
    versions: &[PluginVersion],
    state: Option<&PluginState>,
) -> Result<(), ChainBroken> {
    let Some(first) = entries.first() else {
        return Ok(());
    };
    let broken = |seq: i64, reason: String| ChainBroken {
        tenant: first.tenant.to_string(),
        name: first.name.clone(),
        seq,
        reason,
    };
    let mut prev_hash = CHAIN_GENESIS.to_string();
    let mut uploaded: BTreeMap<semver::Version, String> = BTreeMap::new();
    let (mut active, mut shadow) = (None, None);
    for (i, entry) in entries.iter().enumerate() {
        if entry.seq != i as i64 + 1 {
            return Err(broken(entry.seq, format!("expected sequence {}", i + 1)));
        }
        if entry.prev_hash != prev_hash {
            return Err(broken(entry.seq, "prev_hash does not match the previous entry".into()));
        }
        if entry.hash != entry.compute_hash() {
            return Err(broken(entry.seq, "hash does not match the entry's contents".into()));
        }
        prev_hash = entry.hash.clone();
        match entry.action {
            ChainAction::Upload => {
                uploaded.insert(entry.version.clone(), entry.manifest_digest.clone());
            }
            ChainAction::Activate | ChainAction::Rollback => {
                active = Some(entry.version.clone());
                if shadow.as_ref() == Some(&entry.version) {
                    shadow = None;
                }
            }
            ChainAction::ShadowStart => shadow = Some(entry.version.clone()),
            ChainAction::ShadowStop => shadow = None,
            ChainAction::Deactivate => active = None,
            ChainAction::Delete => {
                uploaded.remove(&entry.version);
            }
        }
    }
    let last_seq = entries.last().map_or(0, |e| e.seq);
    for version in versions {
        let recorded = uploaded.get(&version.manifest.version);
        if recorded != Some(&manifest_digest(&version.manifest)) {
            return Err(broken(
                last_seq,
                format!("stored version {} is not the one the chain recorded", version.manifest.version),
            ));
        }
    }
    if versions.len() != uploaded.len() {
        return Err(broken(last_seq, "a version recorded by the chain is missing from the store".into()));
    }
    let (state_active, state_shadow) = state.map_or((None, None), |s| (s.active.clone(), s.shadow.clone()));
    if state_active != active || state_shadow != shadow {
        return Err(broken(last_seq, "the active or shadow version differs from the one the chain last set".into()));
    }
    Ok(())
}

/// A change to a plugin, applied by the store in one transaction with its chain entry.
#[derive(Debug, Clone)]
pub struct PluginChange {
    /// The chain entry recording the change; the store refuses it if an entry with the same
    /// `seq` exists (a concurrent change won).
    pub entry: ChainEntry,
    /// A version to insert (with its component and configuration stored by digest).
    pub insert: Option<PluginVersion>,
    /// The plugin's new state (`None` leaves it unchanged).
    pub state: Option<PluginState>,
    /// A version to delete.
    pub delete: Option<semver::Version>,
}

/// One recorded difference between the active and the shadow version of a plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShadowDiff {
    /// The tenant that owns the plugin.
    #[schema(value_type = String, example = "default")]
    pub tenant: TenantId,
    /// The plugin.
    pub name: String,
    /// The active version.
    #[schema(value_type = String, example = "1.2.0")]
    pub active: semver::Version,
    /// The shadow version.
    #[schema(value_type = String, example = "1.2.0")]
    pub shadow: semver::Version,
    /// What was asked (JSON).
    pub input: serde_json::Value,
    /// What the active version answered (JSON).
    pub active_output: serde_json::Value,
    /// What the shadow version answered (JSON).
    pub shadow_output: serde_json::Value,
    /// When (ms since the Unix epoch).
    pub at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest::from_toml(
            r#"
name = "abac"
version = "1.2.0"
kind = "policy"
digest = "blake2b256:00"
[grants]
storage = true
bus = ["plugins.abac.>"]
"#,
        )
        .expect("manifest")
    }

    fn trust(secret: &[u8; 32]) -> TrustPolicy {
        let keys = BTreeMap::from([("release".to_string(), public_key_base64(secret))]);
        TrustPolicy::from_base64(true, &keys).expect("trust")
    }

    #[test]
    fn signatures_verify_and_tampering_is_refused() {
        let secret = [7u8; 32];
        let trust = trust(&secret);
        let mut m = manifest();
        assert_eq!(
            trust.verify(&m).map_err(|e| e.to_string()),
            Err("this kernel requires signed plugins; the manifest has no signature".into())
        );
        sign_manifest(&mut m, "release", &secret);
        assert_eq!(trust.verify(&m).expect("verifies"), Some("release".into()));

        let mut changed = m.clone();
        changed.grants.clock = true;
        assert!(trust.verify(&changed).is_err(), "grants are covered by the signature");
        let mut other_key = m.clone();
        other_key.signature.as_mut().expect("sig").key_id = "someone".into();
        assert!(trust.verify(&other_key).is_err(), "unknown key id");
        let mut empty_id = m.clone();
        empty_id.signature.as_mut().expect("sig").key_id = String::new();
        assert!(trust.verify(&empty_id).is_err(), "empty key id");
        let mut short = m.clone();
        short.signature.as_mut().expect("sig").ed25519 = BASE64.encode([0u8; 10]);
        assert!(trust.verify(&short).is_err(), "short signature");

        // A signature is verified even when signatures are not required.
        let lenient = TrustPolicy { require_signed: false, ..trust.clone() };
        assert!(lenient.verify(&changed).is_err());
        assert_eq!(lenient.verify(&manifest()).expect("unsigned allowed"), None);
    }

    #[test]
    fn a_partial_signature_does_not_parse() {
        for table in ["[signature]\nkey_id = \"release\"", "[signature]\ned25519 = \"AAAA\"", "[signature]"] {
            let text = format!("name = \"a\"\nversion = \"1.0.0\"\nkind = \"scorer\"\ndigest = \"x\"\n{table}\n");
            assert!(Manifest::from_toml(&text).is_err(), "{table}");
        }
    }

    #[test]
    fn subjects_and_patterns() {
        assert!(subject_matches("plugins.>", "plugins.abac.x"));
        assert!(!subject_matches("plugins.>", "plugins"));
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(!subject_matches("a.*.c", "a.b.d"));
        assert!(pattern_within("plugins.abac.>", "plugins.>"));
        assert!(pattern_within("plugins.*", "plugins.>"));
        assert!(!pattern_within(">", "plugins.>"));
        assert!(!pattern_within("plugins.>", "plugins.*"));
        assert!(validate_subject("a..b", false).is_err());
        assert!(validate_subject("a.>.b", true).is_err());
    }

    #[test]
    fn the_chain_detects_changed_removed_and_reordered_entries() {
        let tenant = TenantId::default_tenant();
        let m = manifest();
        let a = ChainEntry::next(None, &tenant, "abac", ChainAction::Upload, &m, 1, "admin");
        let b = ChainEntry::next(Some(&a), &tenant, "abac", ChainAction::Activate, &m, 2, "admin");
        let version = PluginVersion {
            tenant: tenant.clone(),
            manifest: m.clone(),
            signed_by: None,
            uploaded_at_ms: 1,
            uploaded_by: "admin".into(),
        };
        let state = PluginState {
            tenant: tenant.clone(),
            name: "abac".into(),
            kind: PluginKind::Policy,
            active: Some(m.version.clone()),
            shadow: None,
            updated_at_ms: 2,
        };
        let versions = [version.clone()];
        assert_eq!(verify_chain(&[a.clone(), b.clone()], &versions, Some(&state)), Ok(()));
        let mut changed = a.clone();
        changed.actor = "mallory".into();
        assert!(verify_chain(&[changed, b.clone()], &versions, Some(&state)).is_err());
        assert!(verify_chain(&[b.clone(), a.clone()], &versions, Some(&state)).is_err());
        assert!(verify_chain(std::slice::from_ref(&a), &versions, Some(&state)).is_err(), "the activation is missing");
        let mut granted = version;
        granted.manifest.grants.clock = true;
        assert!(verify_chain(&[a, b], &[granted], Some(&state)).is_err(), "a stored manifest was changed");
    }
}
