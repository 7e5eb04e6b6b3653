//! Principals and API keys: who is calling, and how a key is made, recognised and stored.
//!
//! The HTTP edge asks an [`Authenticator`] who a bearer credential belongs to; the
//! [`BearerAuthenticator`] sends API keys to [`ApiKeyAuthenticator`] and tokens to
//! [`jwt::JwtAuthenticator`]. Whether the principal may act is decided by [`crate::authz`].

use std::sync::Arc;

use async_trait::async_trait;
use blake2::digest::{FixedOutput, Mac, Update};
use blake2::{Blake2b, Blake2bMac, digest::consts::U32};
use rand::Rng;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::clock::Clock;
use crate::store::Store;
use crate::tenant::TenantId;
use crate::{CoreError, CoreResult};

pub mod jwt;
pub mod keys;
pub mod scope;

pub use scope::{Scope, Scopes};

/// Every API key starts with this, so scanners and people recognise it.
pub const API_KEY_PREFIX: &str = "nops_";
/// Length of the random part, in base62 characters (190 bits).
const API_KEY_RANDOM_CHARS: usize = 32;
/// Length of the checksum, in base62 characters (a CRC-32 fits in 6).
const API_KEY_CHECKSUM_CHARS: usize = 6;
/// Total length of an API key.
pub const API_KEY_CHARS: usize = API_KEY_PREFIX.len() + API_KEY_RANDOM_CHARS + API_KEY_CHECKSUM_CHARS;
/// Longest pepper accepted, in bytes (BLAKE2b's key size).
pub const PEPPER_BYTES_MAX: usize = 64;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A newly generated API key. The secret exists only in this value; the store keeps its hash.
pub struct GeneratedKey {
    /// The full key, to show once.
    pub secret: String,
}

impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GeneratedKey(<redacted>)")
    }
}

/// Generates a key `nops_<32 random base62><6 base62 CRC-32 of the random part>`.
pub fn generate_api_key() -> GeneratedKey {
    let mut rng = rand::rng();
    let random: String =
        (0..API_KEY_RANDOM_CHARS).map(|_| char::from(BASE62[rng.random_range(0..BASE62.len())])).collect();
    let checksum = base62_fixed(crc32fast::hash(random.as_bytes()), API_KEY_CHECKSUM_CHARS);
    GeneratedKey { secret: format!("{API_KEY_PREFIX}{random}{checksum}") }
}

fn base62_fixed(mut value: u32, width: usize) -> String {
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    String::from_utf8(out).unwrap_or_default()
}

/// True when `candidate` has the shape and checksum of a key this kernel generates. Lets the
/// edge (and secret scanners) reject look-alikes without touching the store.
pub fn is_well_formed_api_key(candidate: &str) -> bool {
    let Some(body) = candidate.strip_prefix(API_KEY_PREFIX) else {
        return false;
    };
    if body.len() != API_KEY_RANDOM_CHARS + API_KEY_CHECKSUM_CHARS || !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return false;
    }
    let (random, checksum) = body.split_at(API_KEY_RANDOM_CHARS);
    base62_fixed(crc32fast::hash(random.as_bytes()), API_KEY_CHECKSUM_CHARS) == checksum
}

/// Hashes API keys for storage: BLAKE2b-256, keyed with the operator's pepper when one is
/// configured, so a stolen database alone does not allow offline guessing.
#[derive(Clone)]
pub struct KeyHasher {
    pepper: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyHasher").field("peppered", &self.pepper.is_some()).finish()
    }
}

impl KeyHasher {
    /// A hasher with an optional pepper of 1 to 64 bytes.
    pub fn new(pepper: Option<&[u8]>) -> CoreResult<Self> {
        match pepper {
            Some(p) if p.is_empty() || p.len() > PEPPER_BYTES_MAX => Err(CoreError::invalid(
                "invalid_pepper",
                format!("the API key pepper must be 1 to {PEPPER_BYTES_MAX} bytes"),
            )),
            _ => Ok(Self { pepper: pepper.map(Arc::from) }),
        }
    }

    /// The 32-byte hash stored for `secret`.
    pub fn hash(&self, secret: &str) -> [u8; 32] {
        match &self.pepper {
            Some(pepper) => {
                // A 1..=64-byte key is always accepted by BLAKE2b; checked in `new`.
                let mut mac = <Blake2bMac<U32> as Mac>::new_from_slice(pepper)
                    .unwrap_or_else(|_| unreachable!("pepper length is checked in KeyHasher::new"));
                Mac::update(&mut mac, secret.as_bytes());
                mac.finalize().into_bytes().into()
            }
            None => {
                let mut hasher = Blake2b::<U32>::default();
                Update::update(&mut hasher, secret.as_bytes());
                hasher.finalize_fixed().into()
            }
        }
    }
}

/// Compares two hashes in constant time.
pub fn hashes_equal(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// A stored API key (its hash, never the secret).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiKeyRecord {
    /// Key id.
    pub id: Uuid,
    /// A human name, e.g. `bootstrap-admin`.
    pub name: String,
    /// Hash of the secret (see [`KeyHasher`]).
    #[serde(skip)]
    pub hash: Vec<u8>,
    /// The tenant the key is bound to; `None` for a kernel-wide operator key.
    pub tenant: Option<TenantId>,
    /// Role of the principal the key authenticates.
    pub role: Role,
    /// Who the key speaks for (e.g. an agent's id); the key id when `None`.
    pub subject: Option<String>,
    /// What the key may do.
    pub scopes: Scopes,
    /// Creation time (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// Expiry (ms since the Unix epoch), if any. A rotation sets it to the end of the grace.
    pub expires_at_ms: Option<i64>,
    /// Revocation time (ms since the Unix epoch), if revoked.
    pub revoked_at_ms: Option<i64>,
    /// Last successful authentication (ms since the Unix epoch), recorded at most once per
    /// [`LAST_USED_RESOLUTION_MS`] per key.
    pub last_used_at_ms: Option<i64>,
    /// The key that replaced this one in a rotation.
    pub replaced_by: Option<Uuid>,
    /// The key this one replaced in a rotation.
    pub replaces: Option<Uuid>,
}

impl ApiKeyRecord {
    /// Whether the key authenticates at `now_ms`.
    pub fn status(&self, now_ms: i64) -> KeyStatus {
        if self.revoked_at_ms.is_some() {
            KeyStatus::Revoked
        } else if self.expires_at_ms.is_some_and(|exp| exp <= now_ms) {
            KeyStatus::Expired
        } else if self.replaced_by.is_some() {
            KeyStatus::Grace
        } else {
            KeyStatus::Active
        }
    }
}

/// Where a key is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    /// Authenticates.
    Active,
    /// Rotated: authenticates until its grace period ends.
    Grace,
    /// Past its expiry (or its grace period).
    Expired,
    /// Revoked.
    Revoked,
}

/// How often, at most, a key's `last_used_at_ms` is written: a hot key is not a write per
/// request.
pub const LAST_USED_RESOLUTION_MS: i64 = 60_000;

/// What a principal is: the role policies reason about (`principal.role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Operates the whole kernel (without a tenant) or everything within its tenant.
    Admin,
    /// Manages agents and reads plugins and key metadata within its tenant.
    Operator,
    /// Reads.
    Viewer,
    /// An edge agent: its own record and heartbeats.
    Agent,
}

impl Role {
    /// Every role, for help texts and validation.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Viewer, Role::Agent];

    /// The role as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Operator => "operator",
            Self::Viewer => "viewer",
            Self::Agent => "agent",
        }
    }

    /// Parses a stored role.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// One of the kernel's API keys.
    ApiKey,
    /// A JWT from a configured issuer.
    Jwt,
    /// A SPIFFE JWT-SVID from a configured trust domain.
    Workload,
}

impl AuthMethod {
    /// The method as a metric label and policy attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ApiKey => "api_key",
            Self::Jwt => "jwt",
            Self::Workload => "workload",
        }
    }
}

/// Who is calling: the result of authentication, input to authorization.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// Who the credential speaks for: the key's subject (else the key id), the token's `sub`,
    /// or the workload's SPIFFE ID. Policies compare it with `resource.id` for agents.
    pub subject: Arc<str>,
    /// The tenant the principal is bound to, or `None` for a kernel-wide operator.
    pub tenant: Option<TenantId>,
    /// The principal's role.
    pub role: Role,
    /// How it authenticated.
    pub method: AuthMethod,
    /// The scopes its credential carries.
    pub scopes: Scopes,
    /// The credential itself, for rate limits and audit: the key id, or `issuer#subject`.
    /// Never a secret.
    pub credential: Arc<str>,
}

impl Principal {
    /// A principal with every scope, for tests and the kernel's own calls.
    pub fn new(subject: &str, tenant: Option<TenantId>, role: Role, method: AuthMethod) -> Self {
        Self {
            subject: Arc::from(subject),
            tenant,
            role,
            method,
            scopes: Scopes::all(),
            credential: Arc::from(subject),
        }
    }
}

/// Turns a bearer credential into a principal.
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// The principal behind `bearer`, or [`CoreError::Unauthenticated`].
    async fn authenticate(&self, bearer: &str) -> CoreResult<Principal>;
}

/// Most key records the authenticator caches; the cache is emptied when it is full.
const KEY_CACHE_ENTRIES_MAX: usize = 10_000;
/// How long a cached key record is trusted before the store is asked again. A key revoked
/// in the store stops working within this time.
pub const KEY_CACHE_TTL_MS: i64 = 5_000;
/// How long a cached key record keeps working while the store cannot be reached (degraded
/// mode). Keys never seen within this time are refused with `503 store_unavailable`.
pub const KEY_STALE_IF_ERROR_MS: i64 = 15 * 60 * 1000;

/// What the authenticator remembers of a key: enough to decide without the store.
#[derive(Debug, Clone)]
struct CachedKey {
    id: Uuid,
    principal: Principal,
    expires_at_ms: Option<i64>,
    revoked: bool,
    cached_at_ms: i64,
}

/// Authenticates the kernel's API keys against the store, with a short-lived cache of key
/// records so that a hot path (heartbeats) does not read the store on every request.
pub struct ApiKeyAuthenticator {
    store: Arc<dyn Store>,
    hasher: KeyHasher,
    clock: Arc<dyn Clock>,
    cache: dashmap::DashMap<[u8; 32], CachedKey>,
    /// When each key's use was last written, so a hot key costs one write a minute.
    touched: dashmap::DashMap<Uuid, i64>,
}

impl ApiKeyAuthenticator {
    /// An authenticator over `store`.
    pub fn new(store: Arc<dyn Store>, hasher: KeyHasher, clock: Arc<dyn Clock>) -> Self {
        Self { store, hasher, clock, cache: dashmap::DashMap::new(), touched: dashmap::DashMap::new() }
    }

    /// The hasher, shared with key management.
    pub fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    /// Forgets every cached key record: the next use of each key reads the store. Key
    /// management calls it after a change made on this kernel; other replicas see the change
    /// within [`KEY_CACHE_TTL_MS`].
    pub fn forget_cached(&self) {
        self.cache.clear();
    }

    async fn lookup(&self, hash: [u8; 32], now_ms: i64) -> CoreResult<Option<CachedKey>> {
        if let Some(cached) = self.cache.get(&hash)
            && now_ms - cached.cached_at_ms < KEY_CACHE_TTL_MS
        {
            return Ok(Some(cached.clone()));
        }
        let found = match self.store.find_api_key(&hash).await {
            Ok(found) => found,
            Err(err) => {
                // Degraded mode: while the store is down, a key seen recently keeps working
                // (its revocation or expiry as last read still applies), so agents keep
                // heartbeating and routing keeps answering through a database outage.
                if let Some(cached) = self.cache.get(&hash)
                    && now_ms - cached.cached_at_ms < KEY_STALE_IF_ERROR_MS
                {
                    tracing::debug!(error = %err, "store unavailable: using the last known key record");
                    return Ok(Some(cached.clone()));
                }
                return Err(err.into());
            }
        };
        let Some(record) = found.filter(|r| hashes_equal(&r.hash, &hash)) else {
            return Ok(None);
        };
        let id_text = record.id.to_string();
        let cached = CachedKey {
            id: record.id,
            principal: Principal {
                subject: Arc::from(record.subject.as_deref().unwrap_or(&id_text)),
                tenant: record.tenant,
                role: record.role,
                method: AuthMethod::ApiKey,
                scopes: record.scopes,
                credential: Arc::from(id_text),
            },
            expires_at_ms: record.expires_at_ms,
            revoked: record.revoked_at_ms.is_some(),
            cached_at_ms: now_ms,
        };
        if self.cache.len() >= KEY_CACHE_ENTRIES_MAX {
            self.cache.clear();
        }
        self.cache.insert(hash, cached.clone());
        Ok(Some(cached))
    }

    /// Records the key's use, at most once per [`LAST_USED_RESOLUTION_MS`], off the request
    /// path.
    fn touch(&self, id: Uuid, now_ms: i64) {
        let due = self.touched.get(&id).is_none_or(|at| now_ms - *at >= LAST_USED_RESOLUTION_MS);
        if !due {
            return;
        }
        if self.touched.len() >= KEY_CACHE_ENTRIES_MAX {
            self.touched.clear();
        }
        self.touched.insert(id, now_ms);
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(err) = store.touch_api_keys(&[(id, now_ms)]).await {
                tracing::debug!(error = %err, "recording a key's last use failed");
            }
        });
    }
}

#[async_trait]
impl Authenticator for ApiKeyAuthenticator {
    async fn authenticate(&self, bearer: &str) -> CoreResult<Principal> {
        if !is_well_formed_api_key(bearer) {
            return Err(CoreError::Unauthenticated { reason: "malformed" });
        }
        let hash = self.hasher.hash(bearer);
        let now_ms = self.clock.now_ms();
        let key = self.lookup(hash, now_ms).await?.ok_or(CoreError::Unauthenticated { reason: "unknown_key" })?;
        if key.revoked {
            return Err(CoreError::Unauthenticated { reason: "revoked" });
        }
        if key.expires_at_ms.is_some_and(|exp| exp <= now_ms) {
            return Err(CoreError::Unauthenticated { reason: "expired" });
        }
        self.touch(key.id, now_ms);
        Ok(key.principal)
    }
}

/// Sends each bearer credential to the authenticator for its shape: the kernel's API keys
/// (`nops_…`) to one, JWTs (three dot-separated parts) to the other.
pub struct BearerAuthenticator {
    /// API keys.
    pub api_keys: Arc<ApiKeyAuthenticator>,
    /// JWTs and JWT-SVIDs; `None` when no issuer is configured.
    pub tokens: Option<Arc<dyn Authenticator>>,
}

/// Longest bearer credential accepted, in bytes; longer ones are refused unread.
pub const BEARER_BYTES_MAX: usize = 8 * 1024;

#[async_trait]
impl Authenticator for BearerAuthenticator {
    async fn authenticate(&self, bearer: &str) -> CoreResult<Principal> {
        if bearer.len() > BEARER_BYTES_MAX {
            return Err(CoreError::Unauthenticated { reason: "malformed" });
        }
        if bearer.starts_with(API_KEY_PREFIX) {
            return self.api_keys.authenticate(bearer).await;
        }
        match &self.tokens {
            Some(tokens) if bearer.bytes().filter(|b| *b == b'.').count() == 2 => tokens.authenticate(bearer).await,
            _ => Err(CoreError::Unauthenticated { reason: "malformed" }),
        }
    }
}

/// Creates the bootstrap admin key if the store has no key yet. Returns the secret when this
/// call created it (the caller prints it once) and `None` on every later start. Safe when two
/// kernels start at once on one database: only one of them wins the claim.
pub async fn ensure_bootstrap_key(
    store: &dyn Store,
    hasher: &KeyHasher,
    now_ms: i64,
) -> CoreResult<Option<GeneratedKey>> {
    if store.api_key_count().await? > 0 {
        return Ok(None);
    }
    let key = generate_api_key();
    let record = ApiKeyRecord {
        id: Uuid::now_v7(),
        name: "bootstrap-admin".into(),
        hash: hasher.hash(&key.secret).to_vec(),
        tenant: None,
        role: Role::Admin,
        subject: None,
        scopes: Scopes::all(),
        created_at_ms: now_ms,
        expires_at_ms: None,
        revoked_at_ms: None,
        last_used_at_ms: None,
        replaced_by: None,
        replaces: None,
    };
    let created = store.insert_bootstrap_key(&record).await?;
    Ok(created.then_some(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = generate_api_key();
        let b = generate_api_key();
        assert_eq!(a.secret.len(), API_KEY_CHARS);
        assert!(is_well_formed_api_key(&a.secret));
        assert_ne!(a.secret, b.secret);
    }

    #[test]
    fn look_alikes_fail_the_checksum() {
        let key = generate_api_key().secret;
        let mut bytes = key.clone().into_bytes();
        let i = API_KEY_PREFIX.len() + 3;
        bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
        let tampered = String::from_utf8(bytes).expect("ascii");
        assert!(!is_well_formed_api_key(&tampered));
        assert!(!is_well_formed_api_key(&key[1..]));
        assert!(!is_well_formed_api_key(&format!("{key}x")));
        assert!(!is_well_formed_api_key(""));
    }

    #[test]
    fn pepper_changes_the_hash() {
        let plain = KeyHasher::new(None).expect("hasher");
        let peppered = KeyHasher::new(Some(b"pepper")).expect("hasher");
        assert_ne!(plain.hash("nops_x"), peppered.hash("nops_x"));
        assert_eq!(plain.hash("nops_x"), plain.hash("nops_x"));
        assert!(KeyHasher::new(Some(b"")).is_err());
        assert!(KeyHasher::new(Some(&[0u8; 65])).is_err());
    }
}
