//! Bearer JWTs from configured issuers, and SPIFFE JWT-SVIDs from configured trust domains.
//!
//! [`JwtAuthenticator`] verifies a token in this order, and stops at the first failure:
//!
//! 1. Shape: three base64url parts, a JSON header without `crit`/`b64`, a JSON claims object.
//! 2. Algorithm: the header's `alg` must be one this module knows (`none` never is).
//! 3. Issuer: chosen from the *unverified* claims — a `kind = "jwt"` issuer by `iss`, a SPIFFE
//!    trust domain by the trust domain of `sub`. The unverified claims pick the keys and nothing
//!    else; every claim is checked again once the signature is verified.
//! 4. Key: the header's `kid` selects one of that issuer's keys (a token without `kid` is accepted
//!    only when the issuer has exactly one key). An unknown `kid` makes the issuer refetch its key
//!    set, at most once per `refetch_interval_ms`, so forged `kid`s cannot hammer a JWKS endpoint.
//! 5. Algorithm pinning: every key has exactly one algorithm (configured, the JWK's `alg`, or
//!    derived from its `kty`/`crv`), and the header's `alg` must equal it. An RS256 public key
//!    can therefore never be used as an HS256 secret.
//! 6. Signature, with `jsonwebtoken`.
//! 7. Claims, against the injected [`Clock`] rather than the system time (so `jsonwebtoken`'s own
//!    `exp`/`nbf`/`aud`/`iss` checks are disabled and done here): `exp` required, `nbf` and `iat`
//!    honoured, `leeway_s` each way; `aud` required and intersecting the issuer's audiences; `iss`
//!    equal to the issuer (not checked for SVIDs, per the JWT-SVID spec); `sub` required.
//!
//! Failures are [`CoreError::Unauthenticated`] with one of the short reasons in [`reason`]. No
//! token, claim value or secret is ever logged.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

pub use jsonwebtoken::Algorithm;
pub use zeroize::Zeroizing;

use super::{AuthMethod, Authenticator, Principal, Role, Scope, Scopes};
use crate::clock::Clock;
use crate::tenant::TenantId;
use crate::{CoreError, CoreResult};

/// Why a token was refused: the `reason` of [`CoreError::Unauthenticated`], a metric label.
pub mod reason {
    /// Not a JWS compact token, or its header or claims are not JSON objects.
    pub const MALFORMED: &str = "malformed";
    /// The signature does not verify with the selected key.
    pub const BAD_SIGNATURE: &str = "bad_signature";
    /// No key of the issuer has the token's `kid` (even after a refetch), or the token has no
    /// `kid` and the issuer more than one key.
    pub const UNKNOWN_KID: &str = "unknown_kid";
    /// `alg` is `none`, unknown, not allowed for SVIDs, or not the one pinned for the key.
    pub const ALG_NOT_ALLOWED: &str = "alg_not_allowed";
    /// `exp` is past (beyond the leeway).
    pub const EXPIRED: &str = "expired";
    /// `nbf` or `iat` is in the future (beyond the leeway).
    pub const NOT_YET_VALID: &str = "not_yet_valid";
    /// `aud` is missing or names none of the issuer's audiences.
    pub const WRONG_AUDIENCE: &str = "wrong_audience";
    /// No configured issuer or trust domain matches the token.
    pub const WRONG_ISSUER: &str = "wrong_issuer";
    /// A claim is missing or has the wrong type or value (`exp`, `sub`, role, tenant, scopes,
    /// SPIFFE ID).
    pub const BAD_CLAIMS: &str = "bad_claims";
}

/// Default clock-skew allowance, in seconds.
pub const LEEWAY_S_DEFAULT: u64 = 30;
/// Largest clock-skew allowance accepted, in seconds.
pub const LEEWAY_S_MAX: u64 = 300;
/// Default for [`JwksLimits::refetch_interval_ms`].
pub const JWKS_REFETCH_INTERVAL_MS_DEFAULT: u64 = 30_000;
/// Default for [`JwksLimits::max_age_ms`].
pub const JWKS_MAX_AGE_MS_DEFAULT: u64 = 300_000;
/// Default for [`JwksLimits::fetch_timeout_ms`].
pub const JWKS_FETCH_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Default for [`JwksLimits::bytes_max`].
pub const JWKS_BYTES_MAX_DEFAULT: usize = 256 * 1024;
/// Default for [`JwksLimits::keys_max`].
pub const JWKS_KEYS_MAX_DEFAULT: usize = 64;
/// Default claim naming the principal's tenant.
pub const TENANT_CLAIM_DEFAULT: &str = "nops_tenant";
/// Default claim naming the principal's role.
pub const ROLE_CLAIM_DEFAULT: &str = "nops_role";
/// Shortest RSA modulus accepted, in bits.
pub const RSA_MODULUS_BITS_MIN: usize = 2048;
/// Longest RSA modulus accepted, in bits (bounds the cost of one verification).
pub const RSA_MODULUS_BITS_MAX: usize = 8192;
/// Longest `kid` looked up; a longer one is unknown without a refetch.
pub const KID_BYTES_MAX: usize = 256;
/// Longest `sub` accepted, in bytes (the SPIFFE ID limit).
pub const SUBJECT_BYTES_MAX: usize = 2048;
/// Longest SPIFFE ID, in bytes.
pub const SPIFFE_ID_BYTES_MAX: usize = 2048;
/// Longest SPIFFE trust domain name, in bytes.
pub const TRUST_DOMAIN_BYTES_MAX: usize = 255;
/// Most audiences one issuer accepts, and most `aud` entries one token may carry.
pub const AUDIENCES_MAX: usize = 32;

/// The algorithms a JWT-SVID may be signed with (JWT-SVID spec §3), less ES512, which the
/// verifier does not implement. HMAC and EdDSA are refused.
pub const SVID_ALGORITHMS: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// Parses a JOSE algorithm name (`HS256`, `RS256`, `ES256`, `EdDSA`, …). `none` and unknown names
/// are `None`.
pub fn parse_algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// Shortest HMAC secret for `alg`, in bytes: the hash size (RFC 7518 §3.2); `None` for
/// asymmetric algorithms.
pub fn hmac_secret_bytes_min(alg: Algorithm) -> Option<usize> {
    match alg {
        Algorithm::HS256 => Some(32),
        Algorithm::HS384 => Some(48),
        Algorithm::HS512 => Some(64),
        _ => None,
    }
}

/// Fetches a JWK set (or SPIFFE bundle) document by URL: the outside-world port of this module,
/// implemented over HTTP by the binary.
#[async_trait]
pub trait JwksSource: Send + Sync + 'static {
    /// The document at `url`, or why it could not be had. Implementations must stop reading
    /// (and fail) past `bytes_max` bytes.
    async fn fetch(&self, url: &str, bytes_max: usize) -> Result<Vec<u8>, String>;
}

/// One issuer (or SPIFFE trust domain) whose tokens the kernel accepts.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// What kind of tokens, and how claims become a principal.
    pub kind: IssuerKind,
    /// Accepted audiences; a token's `aud` must name at least one.
    pub audiences: Vec<String>,
    /// Where the verification keys come from.
    pub keys: KeySource,
    /// Clock-skew allowance for `exp`, `nbf` and `iat`, in seconds (at most [`LEEWAY_S_MAX`]).
    pub leeway_s: u64,
    /// Bounds on fetching key sets.
    pub jwks: JwksLimits,
}

/// The kind of an issuer.
#[derive(Debug, Clone)]
pub enum IssuerKind {
    /// An OAuth/OIDC-style issuer of bearer JWTs.
    Jwt(JwtIssuer),
    /// A SPIFFE trust domain whose workloads present JWT-SVIDs.
    Spiffe(SpiffeIssuer),
}

/// Settings of a `kind = "jwt"` issuer.
#[derive(Debug, Clone)]
pub struct JwtIssuer {
    /// The exact `iss` value.
    pub issuer: String,
    /// Claim holding the principal's tenant; absent claim → no tenant.
    pub tenant_claim: String,
    /// Claim holding the principal's role; absent claim → `default_role`.
    pub role_claim: String,
    /// Role of a token without a role claim.
    pub default_role: Role,
}

impl JwtIssuer {
    /// An issuer with the default claim names and role `viewer`.
    pub fn new(issuer: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            tenant_claim: TENANT_CLAIM_DEFAULT.into(),
            role_claim: ROLE_CLAIM_DEFAULT.into(),
            default_role: Role::Viewer,
        }
    }
}

/// Settings of a SPIFFE trust domain.
#[derive(Debug, Clone)]
pub struct SpiffeIssuer {
    /// The trust domain name, e.g. `example.org`.
    pub trust_domain: String,
    /// Role of every workload of the trust domain.
    pub workload_role: Role,
    /// Tenant of every workload of the trust domain, if any.
    pub tenant: Option<TenantId>,
    /// Scopes of an SVID without a `scope`/`scp` claim.
    pub default_scopes: Scopes,
}

/// Where an issuer's verification keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// Keys given in the configuration; never refreshed.
    Inline(Vec<InlineKey>),
    /// A JWK set (or SPIFFE bundle) in a local file, re-read when a refresh is due.
    JwksFile(PathBuf),
    /// A JWK set (or SPIFFE bundle) at a URL, fetched through the [`JwksSource`].
    JwksUrl(String),
}

impl KeySource {
    fn refreshable(&self) -> bool {
        !matches!(self, Self::Inline(_))
    }
}

/// A key given in the configuration.
#[derive(Debug, Clone)]
pub struct InlineKey {
    /// The key id tokens name in their header; required when the issuer has several keys.
    pub kid: Option<String>,
    /// The one algorithm this key verifies.
    pub alg: Algorithm,
    /// The key itself.
    pub material: KeyMaterial,
}

/// Key bytes. The secret variant is wiped on drop and never printed.
#[derive(Clone)]
pub enum KeyMaterial {
    /// An HMAC secret (HS256/384/512), at least the hash size long.
    HmacSecret(Zeroizing<Vec<u8>>),
    /// A public key in PEM (SPKI `PUBLIC KEY`, or PKCS#1 `RSA PUBLIC KEY`).
    PublicKeyPem(Vec<u8>),
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HmacSecret(_) => f.write_str("HmacSecret(<redacted>)"),
            Self::PublicKeyPem(pem) => write!(f, "PublicKeyPem({} bytes)", pem.len()),
        }
    }
}

/// Bounds on fetching an issuer's key set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwksLimits {
    /// At most one fetch (or file read) per this many milliseconds per issuer, whatever causes
    /// it (unknown `kid`, age).
    pub refetch_interval_ms: u64,
    /// Keys older than this are refreshed in the background (so a key removed from the set stops
    /// being accepted), in milliseconds.
    pub max_age_ms: u64,
    /// Longest one fetch may take, in milliseconds.
    pub fetch_timeout_ms: u64,
    /// Largest document accepted, in bytes.
    pub bytes_max: usize,
    /// Most usable keys in one document; a larger set is refused whole.
    pub keys_max: usize,
}

impl Default for JwksLimits {
    fn default() -> Self {
        Self {
            refetch_interval_ms: JWKS_REFETCH_INTERVAL_MS_DEFAULT,
            max_age_ms: JWKS_MAX_AGE_MS_DEFAULT,
            fetch_timeout_ms: JWKS_FETCH_TIMEOUT_MS_DEFAULT,
            bytes_max: JWKS_BYTES_MAX_DEFAULT,
            keys_max: JWKS_KEYS_MAX_DEFAULT,
        }
    }
}

fn config_error(name: &str, message: impl fmt::Display) -> CoreError {
    CoreError::invalid("invalid_auth_config", format!("issuer `{name}`: {message}"))
}

impl IssuerConfig {
    /// The issuer (`iss`) or trust domain, for messages.
    pub fn name(&self) -> &str {
        match &self.kind {
            IssuerKind::Jwt(jwt) => &jwt.issuer,
            IssuerKind::Spiffe(spiffe) => &spiffe.trust_domain,
        }
    }

    fn is_spiffe(&self) -> bool {
        matches!(self.kind, IssuerKind::Spiffe(_))
    }

    /// Checks every setting and, for inline keys, that each key parses and fits its algorithm.
    /// Error messages name the offending field.
    pub fn validate(&self) -> CoreResult<()> {
        self.check_settings()?;
        if let KeySource::Inline(keys) = &self.keys {
            inline_key_set(keys).map_err(|e| config_error(self.name(), e))?;
        }
        Ok(())
    }

    fn check_settings(&self) -> CoreResult<()> {
        let name = self.name();
        let err = |message: String| config_error(name, message);
        match &self.kind {
            IssuerKind::Jwt(jwt) => {
                if jwt.issuer.is_empty() {
                    return Err(err("issuer must not be empty".into()));
                }
                if jwt.tenant_claim.is_empty() || jwt.role_claim.is_empty() {
                    return Err(err("tenant_claim and role_claim must not be empty".into()));
                }
            }
            IssuerKind::Spiffe(spiffe) => {
                validate_trust_domain(&spiffe.trust_domain).map_err(|why| err(format!("trust_domain: {why}")))?;
                if matches!(self.keys, KeySource::Inline(_)) {
                    return Err(err("a SPIFFE trust domain takes its keys from bundle_file or bundle_url".into()));
                }
            }
        }
        if self.audiences.is_empty() || self.audiences.len() > AUDIENCES_MAX {
            return Err(err(format!("audiences must list 1 to {AUDIENCES_MAX} audiences")));
        }
        if self.audiences.iter().any(String::is_empty) {
            return Err(err("audiences must not contain an empty string".into()));
        }
        if self.leeway_s > LEEWAY_S_MAX {
            return Err(err(format!("leeway_s must be at most {LEEWAY_S_MAX}")));
        }
        let limits = &self.jwks;
        if !(1_000..=86_400_000).contains(&limits.refetch_interval_ms) {
            return Err(err("jwks_refetch_interval_ms must be 1000 to 86400000".into()));
        }
        if !(limits.refetch_interval_ms..=604_800_000).contains(&limits.max_age_ms) {
            return Err(err("jwks_max_age_ms must be at least jwks_refetch_interval_ms and at most 604800000".into()));
        }
        if !(100..=60_000).contains(&limits.fetch_timeout_ms) {
            return Err(err("jwks_fetch_timeout_ms must be 100 to 60000".into()));
        }
        if !(1024..=4 * 1024 * 1024).contains(&limits.bytes_max) {
            return Err(err("jwks_bytes_max must be 1024 to 4194304".into()));
        }
        if !(1..=1024).contains(&limits.keys_max) {
            return Err(err("jwks_keys_max must be 1 to 1024".into()));
        }
        match &self.keys {
            KeySource::Inline(keys) => {
                if keys.is_empty() {
                    return Err(err("keys must list at least one key".into()));
                }
                if keys.len() > limits.keys_max {
                    return Err(err("keys lists more than jwks_keys_max keys".into()));
                }
            }
            KeySource::JwksFile(path) => {
                if path.as_os_str().is_empty() {
                    return Err(err("the key set file path must not be empty".into()));
                }
            }
            KeySource::JwksUrl(url) => validate_jwks_url(url).map_err(|why| err(format!("key set URL: {why}")))?,
        }
        Ok(())
    }
}

/// A key set URL must be `https`, except on a loopback host (for development).
fn validate_jwks_url(raw: &str) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials".into());
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err("has no host".into()),
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err("must use https (http only on a loopback host)".into()),
    }
}

/// A validated SPIFFE ID of a workload: `spiffe://<trust domain>/<path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeId {
    id: String,
    trust_domain_end: usize,
}

impl SpiffeId {
    const SCHEME: &'static str = "spiffe://";

    /// Parses a workload SPIFFE ID per the SPIFFE ID spec: lowercase `spiffe` scheme; a trust
    /// domain of lowercase letters, digits, `.`, `-`, `_` (so no port, userinfo or
    /// percent-encoding); a non-empty path of non-empty segments of letters, digits, `.`, `-`,
    /// `_`, none `.` or `..`, no trailing `/`; no query or fragment.
    pub fn parse(id: &str) -> Result<Self, &'static str> {
        if id.len() > SPIFFE_ID_BYTES_MAX {
            return Err("longer than 2048 bytes");
        }
        let rest = id.strip_prefix(Self::SCHEME).ok_or("does not start with spiffe://")?;
        let slash = rest.find('/').ok_or("has no path")?;
        let (trust_domain, path) = rest.split_at(slash);
        validate_trust_domain(trust_domain)?;
        for segment in path[1..].split('/') {
            if segment.is_empty() {
                return Err("has an empty path segment");
            }
            if segment == "." || segment == ".." {
                return Err("has a `.` or `..` path segment");
            }
            if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_') {
                return Err("has a path character outside letters, digits, `.`, `-` and `_`");
            }
        }
        Ok(Self { id: id.to_owned(), trust_domain_end: Self::SCHEME.len() + trust_domain.len() })
    }

    /// The trust domain name.
    pub fn trust_domain(&self) -> &str {
        &self.id[Self::SCHEME.len()..self.trust_domain_end]
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.trust_domain_end..]
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

/// Checks a SPIFFE trust domain name: 1 to 255 bytes of lowercase letters, digits, `.`, `-`, `_`.
pub fn validate_trust_domain(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("the trust domain is empty");
    }
    if name.len() > TRUST_DOMAIN_BYTES_MAX {
        return Err("the trust domain is longer than 255 bytes");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_') {
        return Err("the trust domain has a character outside lowercase letters, digits, `.`, `-` and `_`");
    }
    Ok(())
}

/// A verification key with its one algorithm.
struct VerifyKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// An issuer's keys at one moment.
#[derive(Default)]
struct KeySet {
    keys: Vec<Arc<VerifyKey>>,
    by_kid: HashMap<String, Arc<VerifyKey>>,
}

impl KeySet {
    /// A set of `keys`; every key whose `kid` appears more than once is dropped (ambiguous).
    fn new(keys: Vec<VerifyKey>, issuer: &str) -> Self {
        let mut seen = HashSet::new();
        let mut duplicated = HashSet::new();
        for kid in keys.iter().filter_map(|k| k.kid.as_deref()) {
            if !seen.insert(kid) {
                duplicated.insert(kid.to_owned());
            }
        }
        for kid in &duplicated {
            tracing::warn!(issuer, kid = %kid, "ignoring every key with this kid: it appears more than once");
        }
        let keys: Vec<Arc<VerifyKey>> = keys
            .into_iter()
            .filter(|k| k.kid.as_ref().is_none_or(|kid| !duplicated.contains(kid)))
            .map(Arc::new)
            .collect();
        let by_kid = keys.iter().filter_map(|k| Some((k.kid.clone()?, k.clone()))).collect();
        Self { keys, by_kid }
    }

    /// The key for a token's `kid`; a token without `kid` gets the issuer's only key.
    fn select(&self, kid: Option<&str>) -> Option<Arc<VerifyKey>> {
        match kid {
            Some(kid) => self.by_kid.get(kid).cloned(),
            None if self.keys.len() == 1 => self.keys.first().cloned(),
            None => None,
        }
    }
}

fn b64(field: &str, value: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD.decode(value).map_err(|_| format!("`{field}` is not base64url"))
}

/// Fails unless the crypto backend accepts `key` for `alg` (parses the curve point, checks the
/// family).
fn check_usable(alg: Algorithm, key: &DecodingKey) -> Result<(), String> {
    let provider = jsonwebtoken::crypto::CryptoProvider::try_get_default()
        .ok_or_else(|| "no JWT crypto provider is available".to_owned())?;
    (provider.verifier_factory)(&alg, key).map(|_| ()).map_err(|e| format!("the key is not usable for {alg:?}: {e}"))
}

/// An RSA key from its big-endian modulus and exponent, refusing weak or oversized moduli.
fn rsa_key(n: &[u8], e: &[u8]) -> Result<DecodingKey, String> {
    let n = &n[n.iter().take_while(|b| **b == 0).count()..];
    let e = &e[e.iter().take_while(|b| **b == 0).count()..];
    let bits = n.first().map_or(0, |first| n.len() * 8 - first.leading_zeros() as usize);
    if !(RSA_MODULUS_BITS_MIN..=RSA_MODULUS_BITS_MAX).contains(&bits) {
        return Err(format!(
            "the RSA modulus has {bits} bits; {RSA_MODULUS_BITS_MIN} to {RSA_MODULUS_BITS_MAX} are accepted"
        ));
    }
    if e.is_empty() || e.len() > 8 || e.last().is_some_and(|b| b % 2 == 0) || e == [1] {
        return Err("the RSA exponent is invalid".into());
    }
    Ok(DecodingKey::from_rsa_raw_components(n, e))
}

/// The curve and coordinate size `alg` needs.
fn ec_curve(alg: Algorithm) -> Option<(EllipticCurve, usize)> {
    match alg {
        Algorithm::ES256 => Some((EllipticCurve::P256, 32)),
        Algorithm::ES384 => Some((EllipticCurve::P384, 48)),
        _ => None,
    }
}

/// A configured key, checked against its algorithm.
fn inline_key(key: &InlineKey) -> Result<VerifyKey, String> {
    let alg = key.alg;
    let decoding = match (&key.material, alg.family()) {
        (KeyMaterial::HmacSecret(secret), AlgorithmFamily::Hmac) => {
            let min = hmac_secret_bytes_min(alg).unwrap_or(usize::MAX);
            if secret.len() < min {
                return Err(format!("an {alg:?} secret must be at least {min} bytes"));
            }
            DecodingKey::from_secret(secret).map_err(|e| format!("the secret is not usable: {e}"))?
        }
        (KeyMaterial::HmacSecret(_), _) => {
            return Err(format!("{alg:?} verifies with a public key (public_key_pem_file), not a secret"));
        }
        (KeyMaterial::PublicKeyPem(_), AlgorithmFamily::Hmac) => {
            return Err(format!("{alg:?} verifies with a secret (secret_env or secret_file), not a public key"));
        }
        (KeyMaterial::PublicKeyPem(pem), AlgorithmFamily::Rsa) => {
            let key = DecodingKey::from_rsa_pem(pem).map_err(|e| format!("not an RSA public key PEM: {e}"))?;
            match Jwk::from_decoding_key(&key, None).map(|jwk| jwk.algorithm) {
                Ok(AlgorithmParameters::RSA(params)) => rsa_key(&b64("n", &params.n)?, &b64("e", &params.e)?)?,
                _ => return Err("not an RSA public key".into()),
            }
        }
        (KeyMaterial::PublicKeyPem(pem), AlgorithmFamily::Ec) => {
            let key = DecodingKey::from_ec_pem(pem).map_err(|e| format!("not an EC public key PEM: {e}"))?;
            let curve = match Jwk::from_decoding_key(&key, None).map(|jwk| jwk.algorithm) {
                Ok(AlgorithmParameters::EllipticCurve(params)) => params.curve,
                _ => return Err("not an EC public key".into()),
            };
            if ec_curve(alg).is_none_or(|(expected, _)| expected != curve) {
                return Err(format!("a {curve:?} key does not fit {alg:?}"));
            }
            key
        }
        (KeyMaterial::PublicKeyPem(pem), AlgorithmFamily::Ed) => {
            let key = DecodingKey::from_ed_pem(pem).map_err(|e| format!("not an Ed25519 public key PEM: {e}"))?;
            if key.try_get_as_bytes().map(<[u8]>::len).ok() != Some(32) {
                return Err("not an Ed25519 public key".into());
            }
            key
        }
    };
    if key.kid.as_ref().is_some_and(|kid| kid.is_empty() || kid.len() > KID_BYTES_MAX) {
        return Err(format!("a kid must be 1 to {KID_BYTES_MAX} bytes"));
    }
    check_usable(alg, &decoding)?;
    Ok(VerifyKey { kid: key.kid.clone(), alg, key: decoding })
}

fn inline_key_set(keys: &[InlineKey]) -> Result<KeySet, String> {
    if keys.len() > 1 && keys.iter().any(|k| k.kid.is_none()) {
        return Err("with several keys, every key needs a kid".into());
    }
    let mut kids = HashSet::new();
    let mut out = Vec::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        if let Some(kid) = &key.kid
            && !kids.insert(kid.as_str())
        {
            return Err(format!("keys[{i}]: kid `{kid}` appears twice"));
        }
        out.push(inline_key(key).map_err(|e| format!("keys[{i}]: {e}"))?);
    }
    Ok(KeySet::new(out, ""))
}

/// One key of a JWK set: `Ok(None)` when it is not meant for us (its `use`), `Err` when it is
/// but cannot be used (logged and skipped).
fn jwk_key(value: &Value, spiffe: bool) -> Result<Option<VerifyKey>, String> {
    let key_use = value.get("use");
    if spiffe {
        // SPIFFE bundle spec: JWT authorities carry `"use": "jwt-svid"`; others (x509-svid) are
        // not for us.
        if key_use.and_then(Value::as_str) != Some("jwt-svid") {
            return Ok(None);
        }
    } else {
        if key_use.is_some_and(|u| u.as_str() != Some("sig")) {
            return Ok(None);
        }
        if let Some(ops) = value.get("key_ops")
            && !ops.as_array().is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")))
        {
            return Ok(None);
        }
    }
    match value.get("kty").and_then(Value::as_str) {
        Some("oct") => return Err("symmetric (`oct`) keys are never accepted from a key set".into()),
        Some("RSA" | "EC" | "OKP") => {}
        _ => return Err("unsupported `kty`".into()),
    }
    let jwk: Jwk = serde_json::from_value(value.clone()).map_err(|e| format!("not a JWK: {e}"))?;
    let kid = jwk.common.key_id.clone();
    if kid.as_ref().is_some_and(|kid| kid.is_empty() || kid.len() > KID_BYTES_MAX) {
        return Err(format!("a kid must be 1 to {KID_BYTES_MAX} bytes"));
    }
    if spiffe && kid.is_none() {
        return Err("a JWT-SVID key must have a kid".into());
    }
    let alg = match (jwk.common.key_algorithm, &jwk.algorithm) {
        (Some(declared), _) => Algorithm::try_from(declared).map_err(|_| format!("unsupported alg {declared}"))?,
        (None, AlgorithmParameters::EllipticCurve(p)) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        (None, AlgorithmParameters::EllipticCurve(p)) if p.curve == EllipticCurve::P384 => Algorithm::ES384,
        (None, AlgorithmParameters::OctetKeyPair(p)) if p.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
        (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
        (None, _) => return Err("no alg, and none follows from the key type and curve".into()),
    };
    if spiffe && !SVID_ALGORITHMS.contains(&alg) {
        return Err(format!("{alg:?} is not allowed for JWT-SVIDs"));
    }
    let key = match (&jwk.algorithm, alg.family()) {
        (AlgorithmParameters::RSA(p), AlgorithmFamily::Rsa) => rsa_key(&b64("n", &p.n)?, &b64("e", &p.e)?)?,
        (AlgorithmParameters::EllipticCurve(p), AlgorithmFamily::Ec) => {
            let Some((curve, size)) = ec_curve(alg).filter(|(curve, _)| *curve == p.curve) else {
                return Err(format!("curve {:?} does not fit {alg:?}", p.curve));
            };
            if b64("x", &p.x)?.len() != size || b64("y", &p.y)?.len() != size {
                return Err(format!("the coordinates do not fit {curve:?}"));
            }
            DecodingKey::from_ec_components(&p.x, &p.y).map_err(|e| e.to_string())?
        }
        (AlgorithmParameters::OctetKeyPair(p), AlgorithmFamily::Ed) => {
            if p.curve != EllipticCurve::Ed25519 || b64("x", &p.x)?.len() != 32 {
                return Err("only Ed25519 OKP keys are accepted".into());
            }
            DecodingKey::from_ed_components(&p.x).map_err(|e| e.to_string())?
        }
        _ => return Err(format!("alg {alg:?} does not fit the key type")),
    };
    check_usable(alg, &key)?;
    Ok(Some(VerifyKey { kid, alg, key }))
}

#[derive(Deserialize)]
struct JwksDocument {
    keys: Vec<Value>,
}

/// Parses a JWK set (or, for `spiffe`, a SPIFFE bundle: only `"use": "jwt-svid"` keys count).
fn parse_key_set(bytes: &[u8], spiffe: bool, keys_max: usize, issuer: &str) -> Result<KeySet, String> {
    let doc: JwksDocument = serde_json::from_slice(bytes).map_err(|e| format!("not a JWK set: {e}"))?;
    let mut keys = Vec::new();
    for value in &doc.keys {
        match jwk_key(value, spiffe) {
            Ok(Some(key)) => keys.push(key),
            Ok(None) => {}
            Err(why) => {
                let kid = value.get("kid").and_then(Value::as_str).map(|k| k.chars().take(64).collect::<String>());
                tracing::warn!(issuer, kid = kid.as_deref().unwrap_or("-"), "ignoring a key of the key set: {why}");
            }
        }
        if keys.len() > keys_max {
            return Err(format!("the key set has more than {keys_max} usable keys (jwks_keys_max)"));
        }
    }
    Ok(KeySet::new(keys, issuer))
}

/// Reads at most `bytes_max` bytes of a file, off the async threads.
async fn read_file_capped(path: PathBuf, bytes_max: usize) -> Result<Vec<u8>, String> {
    let shown = path.display().to_string();
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        std::fs::File::open(&path)?.take(bytes_max as u64 + 1).read_to_end(&mut bytes)?;
        Ok(bytes)
    })
    .await
    .map_err(|e| format!("reading {shown}: {e}"))?;
    let bytes = read.map_err(|e| format!("reading {shown}: {e}"))?;
    if bytes.len() > bytes_max {
        return Err(format!("{shown} is larger than {bytes_max} bytes (jwks_bytes_max)"));
    }
    Ok(bytes)
}

/// Loads an issuer's key set from its source.
async fn load_key_set(config: &IssuerConfig, source: &dyn JwksSource) -> Result<KeySet, String> {
    let limits = &config.jwks;
    let bytes = match &config.keys {
        KeySource::Inline(keys) => return inline_key_set(keys),
        KeySource::JwksFile(path) => read_file_capped(path.clone(), limits.bytes_max).await?,
        KeySource::JwksUrl(url) => {
            let fetch = source.fetch(url, limits.bytes_max);
            let bytes = tokio::time::timeout(Duration::from_millis(limits.fetch_timeout_ms), fetch)
                .await
                .map_err(|_| format!("fetching {url} timed out"))?
                .map_err(|e| format!("fetching {url}: {e}"))?;
            if bytes.len() > limits.bytes_max {
                return Err(format!("{url} returned more than {} bytes (jwks_bytes_max)", limits.bytes_max));
            }
            bytes
        }
    };
    parse_key_set(&bytes, config.is_spiffe(), limits.keys_max, config.name())
}

/// Never, for the timestamps below.
const NEVER_MS: i64 = i64::MIN;

/// An issuer and its current keys.
struct Issuer {
    config: IssuerConfig,
    keys: ArcSwap<KeySet>,
    /// Serialises refreshes of this issuer.
    refresh_lock: tokio::sync::Mutex<()>,
    /// When the last fetch (or file read) started, successful or not.
    last_attempt_ms: AtomicI64,
    /// When the current keys were loaded.
    loaded_at_ms: AtomicI64,
}

impl Issuer {
    fn refresh_due(&self, now_ms: i64) -> bool {
        let last = self.last_attempt_ms.load(Ordering::Acquire);
        last == NEVER_MS || now_ms.saturating_sub(last) >= self.config.jwks.refetch_interval_ms as i64
    }

    fn stale(&self, now_ms: i64) -> bool {
        let loaded = self.loaded_at_ms.load(Ordering::Acquire);
        loaded == NEVER_MS || now_ms.saturating_sub(loaded) >= self.config.jwks.max_age_ms as i64
    }
}

/// Refreshes `issuer`'s keys if the refetch interval allows. With `wait`, waits for a refresh
/// in progress (then usually finds none due); without, returns at once if one is in progress.
async fn refresh(issuer: &Issuer, source: &dyn JwksSource, clock: &dyn Clock, wait: bool) {
    let _guard = if wait {
        issuer.refresh_lock.lock().await
    } else {
        match issuer.refresh_lock.try_lock() {
            Ok(guard) => guard,
            Err(_) => return,
        }
    };
    let now_ms = clock.now_ms();
    if !issuer.refresh_due(now_ms) {
        return;
    }
    issuer.last_attempt_ms.store(now_ms, Ordering::Release);
    match load_key_set(&issuer.config, source).await {
        Ok(set) => {
            if set.keys.is_empty() {
                tracing::warn!(issuer = issuer.config.name(), "the issuer's key set has no usable key");
            }
            tracing::debug!(issuer = issuer.config.name(), keys = set.keys.len(), "refreshed the issuer's keys");
            issuer.keys.store(Arc::new(set));
            issuer.loaded_at_ms.store(now_ms, Ordering::Release);
        }
        Err(error) => {
            tracing::warn!(issuer = issuer.config.name(), %error, "refreshing the issuer's keys failed; keeping the previous keys");
        }
    }
}

/// The parts of a JOSE header this module reads. Unknown members are ignored; `jku`, `jwk`,
/// `x5u` and `x5c` are never used to find a key.
#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
    #[serde(default)]
    b64: Option<Value>,
}

fn decode_part<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
}

/// Verifies bearer JWTs and JWT-SVIDs against the configured issuers; see the module docs.
pub struct JwtAuthenticator {
    issuers: Vec<Arc<Issuer>>,
    by_iss: HashMap<String, usize>,
    by_trust_domain: HashMap<String, usize>,
    clock: Arc<dyn Clock>,
    source: Arc<dyn JwksSource>,
    /// Tokens already verified, by BLAKE2b-256 of the token: a client that presents the same
    /// token on every request pays for one parse and one signature check.
    verified: dashmap::DashMap<[u8; 32], VerifiedToken>,
}

/// Most verified tokens remembered; the cache is emptied when it is full.
pub const VERIFIED_TOKENS_MAX: usize = 10_000;

/// A token that passed every check, and what makes that answer still true.
struct VerifiedToken {
    principal: Principal,
    issuer: Arc<Issuer>,
    /// The issuer's key set it was verified with. Held (not just its address), so a refresh
    /// that replaces the set, e.g. to drop a removed key, makes every entry of the old set miss.
    keys: Arc<KeySet>,
    /// `exp` plus the leeway: the first instant the token is refused.
    refused_from_ms: i64,
}

fn token_digest(token: &str) -> [u8; 32] {
    use blake2::digest::{FixedOutput, Update};
    let mut hasher = blake2::Blake2b::<blake2::digest::consts::U32>::default();
    Update::update(&mut hasher, token.as_bytes());
    hasher.finalize_fixed().into()
}

impl fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuthenticator")
            .field("issuers", &self.issuers.iter().map(|i| i.config.name()).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

type Refusal = &'static str;

impl JwtAuthenticator {
    /// An authenticator for `issuers`. Validates every issuer and loads its keys: inline keys
    /// and key set files must load (an error names the issuer); a key set URL that cannot be
    /// fetched now is only logged, and fetched again when a token needs it.
    pub async fn new(
        issuers: Vec<IssuerConfig>,
        clock: Arc<dyn Clock>,
        source: Arc<dyn JwksSource>,
    ) -> CoreResult<Self> {
        if issuers.is_empty() {
            return Err(CoreError::invalid("invalid_auth_config", "no issuer is configured"));
        }
        let mut by_iss = HashMap::new();
        let mut by_trust_domain = HashMap::new();
        let mut states = Vec::with_capacity(issuers.len());
        for (i, config) in issuers.into_iter().enumerate() {
            config.check_settings()?;
            let name = config.name().to_owned();
            let fresh = match &config.kind {
                IssuerKind::Jwt(jwt) => by_iss.insert(jwt.issuer.clone(), i).is_none(),
                IssuerKind::Spiffe(spiffe) => by_trust_domain.insert(spiffe.trust_domain.clone(), i).is_none(),
            };
            if !fresh {
                return Err(config_error(&name, "configured twice"));
            }
            let now_ms = clock.now_ms();
            let keys = match load_key_set(&config, source.as_ref()).await {
                Ok(set) if set.keys.is_empty() && !matches!(config.keys, KeySource::JwksUrl(_)) => {
                    return Err(config_error(&name, "the key set has no usable key"));
                }
                Ok(set) => Some(set),
                Err(error) if matches!(config.keys, KeySource::JwksUrl(_)) => {
                    tracing::warn!(issuer = %name, %error, "fetching the issuer's keys failed; retrying when a token needs them");
                    None
                }
                Err(error) => return Err(config_error(&name, error)),
            };
            let refreshable = config.keys.refreshable();
            states.push(Arc::new(Issuer {
                config,
                loaded_at_ms: AtomicI64::new(if keys.is_some() { now_ms } else { NEVER_MS }),
                keys: ArcSwap::from_pointee(keys.unwrap_or_default()),
                refresh_lock: tokio::sync::Mutex::new(()),
                last_attempt_ms: AtomicI64::new(if refreshable { now_ms } else { NEVER_MS }),
            }));
        }
        Ok(Self { issuers: states, by_iss, by_trust_domain, clock, source, verified: dashmap::DashMap::new() })
    }

    /// The issuer a token claims to come from, by `iss` or else by the trust domain of a SPIFFE
    /// `sub`. The claims are not verified yet: they only choose the keys.
    fn route(&self, claims: &Map<String, Value>) -> Result<&Arc<Issuer>, Refusal> {
        if let Some(iss) = claims.get("iss").and_then(Value::as_str)
            && let Some(&i) = self.by_iss.get(iss)
        {
            return Ok(&self.issuers[i]);
        }
        if !self.by_trust_domain.is_empty()
            && let Some(sub) = claims.get("sub").and_then(Value::as_str)
            && sub.starts_with(SpiffeId::SCHEME)
        {
            let id = SpiffeId::parse(sub).map_err(|_| reason::BAD_CLAIMS)?;
            if let Some(&i) = self.by_trust_domain.get(id.trust_domain()) {
                return Ok(&self.issuers[i]);
            }
        }
        Err(reason::WRONG_ISSUER)
    }

    /// The key for `kid`, refetching the issuer's key set once (within the refetch interval) when
    /// the `kid` is unknown.
    async fn select_key(&self, issuer: &Issuer, kid: Option<&str>) -> Result<Arc<VerifyKey>, Refusal> {
        if let Some(key) = issuer.keys.load().select(kid) {
            return Ok(key);
        }
        let Some(kid) = kid.filter(|kid| kid.len() <= KID_BYTES_MAX) else {
            return Err(reason::UNKNOWN_KID);
        };
        if !issuer.config.keys.refreshable() || !issuer.refresh_due(self.clock.now_ms()) {
            return Err(reason::UNKNOWN_KID);
        }
        refresh(issuer, self.source.as_ref(), self.clock.as_ref(), true).await;
        issuer.keys.load().select(Some(kid)).ok_or(reason::UNKNOWN_KID)
    }

    /// Refreshes an issuer's keys in the background once they are older than `max_age_ms`, so
    /// keys removed from the set stop being accepted.
    fn refresh_if_stale(&self, issuer: &Arc<Issuer>) {
        let now_ms = self.clock.now_ms();
        if !issuer.config.keys.refreshable() || !issuer.stale(now_ms) || !issuer.refresh_due(now_ms) {
            return;
        }
        let (issuer, source, clock) = (issuer.clone(), self.source.clone(), self.clock.clone());
        tokio::spawn(async move { refresh(&issuer, source.as_ref(), clock.as_ref(), false).await });
    }

    async fn verify(&self, token: &str) -> Result<Principal, Refusal> {
        let digest = token_digest(token);
        let now_ms = self.clock.now_ms();
        if let Some(hit) = self.verified.get(&digest) {
            if now_ms < hit.refused_from_ms && Arc::ptr_eq(&hit.keys, &hit.issuer.keys.load()) {
                self.refresh_if_stale(&hit.issuer);
                return Ok(hit.principal.clone());
            }
            drop(hit);
            self.verified.remove(&digest);
        }
        let (principal, issuer, keys, refused_from_ms) = self.verify_uncached(token).await?;
        if self.verified.len() >= VERIFIED_TOKENS_MAX {
            self.verified.clear();
        }
        self.verified.insert(digest, VerifiedToken { principal: principal.clone(), issuer, keys, refused_from_ms });
        Ok(principal)
    }

    /// Every check of a token; also returns what the cache needs to keep the answer true.
    async fn verify_uncached(&self, token: &str) -> Result<(Principal, Arc<Issuer>, Arc<KeySet>, i64), Refusal> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(reason::MALFORMED);
        };
        let header: Header = decode_part(header).ok_or(reason::MALFORMED)?;
        let alg = parse_algorithm(&header.alg).ok_or(reason::ALG_NOT_ALLOWED)?;
        if header.crit.is_some() || header.b64.is_some() {
            return Err(reason::MALFORMED);
        }
        let unverified: Map<String, Value> = decode_part(payload).ok_or(reason::MALFORMED)?;
        let issuer = self.route(&unverified)?;
        if issuer.config.is_spiffe() {
            if !SVID_ALGORITHMS.contains(&alg) {
                return Err(reason::ALG_NOT_ALLOWED);
            }
            if header.typ.as_deref().is_some_and(|typ| typ != "JWT" && typ != "JOSE") {
                return Err(reason::MALFORMED);
            }
        }
        self.refresh_if_stale(issuer);
        // Taken before the key is chosen: if choosing it refetches the set, the cache entry is
        // made against the old set and never hits, which is safe.
        let keys = issuer.keys.load_full();
        let key = self.select_key(issuer, header.kid.as_deref()).await?;
        if key.alg != alg {
            return Err(reason::ALG_NOT_ALLOWED);
        }
        let claims = verify_signature(token, &key)?;
        let principal = principal(&issuer.config, &claims, self.clock.now_ms())?;
        let leeway_ms = i64::try_from(issuer.config.leeway_s).unwrap_or(i64::MAX).saturating_mul(1000);
        // `principal` has checked that `exp` is present and valid.
        let refused_from_ms =
            claims.get("exp").and_then(numeric_date_ms).ok_or(reason::BAD_CLAIMS)?.saturating_add(leeway_ms);
        Ok((principal, issuer.clone(), keys, refused_from_ms))
    }
}

/// Checks the signature with `key` and its one algorithm. `jsonwebtoken`'s claim checks are
/// turned off: they read the system clock, and [`principal`] checks every claim against the
/// injected one.
fn verify_signature(token: &str, key: &VerifyKey) -> Result<Map<String, Value>, Refusal> {
    use jsonwebtoken::errors::ErrorKind;
    let mut validation = Validation::new(key.alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
        Ok(data) => Ok(data.claims),
        Err(err) => Err(match err.kind() {
            ErrorKind::InvalidAlgorithm
            | ErrorKind::MissingAlgorithm
            | ErrorKind::UnsupportedAlgorithm
            | ErrorKind::InvalidAlgorithmName => reason::ALG_NOT_ALLOWED,
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_)
            | ErrorKind::InvalidClaimFormat(_) => reason::MALFORMED,
            _ => reason::BAD_SIGNATURE,
        }),
    }
}

/// A NumericDate (seconds since the epoch; fractions are truncated) in milliseconds.
fn numeric_date_ms(value: &Value) -> Option<i64> {
    let seconds = match value.as_i64() {
        Some(s) => s,
        None => {
            let f = value.as_f64().filter(|f| f.is_finite() && f.abs() < 1e15)?;
            f.trunc() as i64
        }
    };
    Some(seconds.saturating_mul(1000))
}

fn check_times(claims: &Map<String, Value>, now_ms: i64, leeway_s: u64) -> Result<(), Refusal> {
    let leeway_ms = (leeway_s as i64).saturating_mul(1000);
    let exp = claims.get("exp").and_then(numeric_date_ms).ok_or(reason::BAD_CLAIMS)?;
    if now_ms >= exp.saturating_add(leeway_ms) {
        return Err(reason::EXPIRED);
    }
    for claim in ["nbf", "iat"] {
        if let Some(value) = claims.get(claim) {
            let at = numeric_date_ms(value).ok_or(reason::BAD_CLAIMS)?;
            if at > now_ms.saturating_add(leeway_ms) {
                return Err(reason::NOT_YET_VALID);
            }
        }
    }
    Ok(())
}

fn check_audience(claims: &Map<String, Value>, audiences: &[String]) -> Result<(), Refusal> {
    let accepted = |aud: &Value| aud.as_str().is_some_and(|aud| audiences.iter().any(|a| a == aud));
    let ok = match claims.get("aud") {
        None => false,
        Some(aud @ Value::String(_)) => accepted(aud),
        Some(Value::Array(list))
            if !list.is_empty() && list.len() <= AUDIENCES_MAX && list.iter().all(Value::is_string) =>
        {
            list.iter().any(accepted)
        }
        Some(_) => return Err(reason::BAD_CLAIMS),
    };
    if ok { Ok(()) } else { Err(reason::WRONG_AUDIENCE) }
}

/// Scopes from `scope` (space-separated) or else `scp` (an array, or space-separated); `None`
/// when neither is present. Any invalid scope refuses the token: a credential is either
/// understood whole or not accepted.
fn scopes_claim(claims: &Map<String, Value>) -> Result<Option<Scopes>, Refusal> {
    let scopes = match (claims.get("scope"), claims.get("scp")) {
        (Some(Value::String(list)), _) | (None, Some(Value::String(list))) => Scopes::parse_list(list).ok(),
        (None, Some(Value::Array(list))) => list
            .iter()
            .map(|s| s.as_str().and_then(|s| s.parse::<Scope>().ok()))
            .collect::<Option<Vec<_>>>()
            .and_then(|scopes| Scopes::new(scopes).ok()),
        (None, None) => return Ok(None),
        _ => None,
    };
    scopes.map(Some).ok_or(reason::BAD_CLAIMS)
}

fn subject(claims: &Map<String, Value>) -> Result<&str, Refusal> {
    claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|sub| !sub.is_empty() && sub.len() <= SUBJECT_BYTES_MAX)
        .ok_or(reason::BAD_CLAIMS)
}

/// The principal behind verified `claims`.
fn principal(config: &IssuerConfig, claims: &Map<String, Value>, now_ms: i64) -> Result<Principal, Refusal> {
    check_times(claims, now_ms, config.leeway_s)?;
    match &config.kind {
        IssuerKind::Jwt(jwt) => {
            if claims.get("iss").and_then(Value::as_str) != Some(jwt.issuer.as_str()) {
                return Err(reason::WRONG_ISSUER);
            }
            check_audience(claims, &config.audiences)?;
            let sub = subject(claims)?;
            let tenant = match claims.get(&jwt.tenant_claim) {
                None => None,
                Some(Value::String(t)) => Some(t.parse::<TenantId>().map_err(|_| reason::BAD_CLAIMS)?),
                Some(_) => return Err(reason::BAD_CLAIMS),
            };
            let role = match claims.get(&jwt.role_claim) {
                None => jwt.default_role,
                Some(Value::String(r)) => Role::parse(r).ok_or(reason::BAD_CLAIMS)?,
                Some(_) => return Err(reason::BAD_CLAIMS),
            };
            Ok(Principal {
                subject: Arc::from(sub),
                tenant,
                role,
                method: AuthMethod::Jwt,
                scopes: scopes_claim(claims)?.unwrap_or_else(Scopes::none),
                credential: Arc::from(format!("{}#{sub}", jwt.issuer)),
            })
        }
        IssuerKind::Spiffe(spiffe) => {
            check_audience(claims, &config.audiences)?;
            let id = SpiffeId::parse(subject(claims)?).map_err(|_| reason::BAD_CLAIMS)?;
            if id.trust_domain() != spiffe.trust_domain {
                return Err(reason::WRONG_ISSUER);
            }
            let id: Arc<str> = Arc::from(id.as_str());
            Ok(Principal {
                subject: id.clone(),
                tenant: spiffe.tenant.clone(),
                role: spiffe.workload_role,
                method: AuthMethod::Workload,
                scopes: scopes_claim(claims)?.unwrap_or_else(|| spiffe.default_scopes.clone()),
                credential: id,
            })
        }
    }
}

#[async_trait]
impl Authenticator for JwtAuthenticator {
    async fn authenticate(&self, bearer: &str) -> CoreResult<Principal> {
        self.verify(bearer).await.map_err(|reason| CoreError::Unauthenticated { reason })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use jsonwebtoken::{EncodingKey, encode};
    use serde_json::json;

    use super::*;
    use crate::clock::ManualClock;

    const NOW_MS: i64 = 1_800_000_000_000;
    const NOW_S: i64 = NOW_MS / 1000;
    const SECRET: &[u8] = b"test-only-hs256-secret-of-40-bytes-long!";
    const ISS: &str = "https://idp.example.com/";
    const AUD: &str = "nops";
    const TD: &str = "example.org";

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/../../tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn signing_key(alg: Algorithm) -> EncodingKey {
        match alg {
            Algorithm::HS256 => EncodingKey::from_secret(SECRET),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&fixture("ec_private.pem")),
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&fixture("ed25519_private.pem")),
            _ => unreachable!(),
        }
        .expect("signing key")
    }

    fn public_pem(alg: Algorithm) -> Vec<u8> {
        fixture(match alg {
            Algorithm::ES256 => "ec_public.pem",
            Algorithm::RS256 => "rsa_public.pem",
            Algorithm::EdDSA => "ed25519_public.pem",
            _ => unreachable!(),
        })
    }

    /// A JWK of a fixture public key, with `kid` and optionally `use`.
    fn jwk(pem: &str, kid: &str, key_use: Option<&str>) -> Value {
        let bytes = fixture(pem);
        let key = if pem.starts_with("rsa") {
            DecodingKey::from_rsa_pem(&bytes)
        } else if pem.starts_with("ed") {
            DecodingKey::from_ed_pem(&bytes)
        } else {
            DecodingKey::from_ec_pem(&bytes)
        }
        .expect("public key");
        let mut value = serde_json::to_value(Jwk::from_decoding_key(&key, None).expect("jwk")).expect("json");
        value["kid"] = json!(kid);
        if let Some(key_use) = key_use {
            value["use"] = json!(key_use);
        }
        value
    }

    fn sign_with(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = kid.map(str::to_owned);
        encode(&header, claims, key).expect("encode")
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        sign_with(alg, &signing_key(alg), kid, claims)
    }

    fn claims() -> Value {
        json!({ "iss": ISS, "aud": AUD, "sub": "alice", "exp": NOW_S + 600, "iat": NOW_S })
    }

    fn with(mut base: Value, patch: Value) -> Value {
        for (k, v) in patch.as_object().expect("object") {
            if v.is_null() {
                base.as_object_mut().expect("object").remove(k);
            } else {
                base[k] = v.clone();
            }
        }
        base
    }

    fn issuer(keys: KeySource) -> IssuerConfig {
        IssuerConfig {
            kind: IssuerKind::Jwt(JwtIssuer::new(ISS)),
            audiences: vec![AUD.into(), "other".into()],
            keys,
            leeway_s: LEEWAY_S_DEFAULT,
            jwks: JwksLimits::default(),
        }
    }

    fn hs256_issuer() -> IssuerConfig {
        issuer(KeySource::Inline(vec![InlineKey {
            kid: None,
            alg: Algorithm::HS256,
            material: KeyMaterial::HmacSecret(Zeroizing::new(SECRET.to_vec())),
        }]))
    }

    fn pem_key(kid: &str, alg: Algorithm) -> InlineKey {
        InlineKey { kid: Some(kid.into()), alg, material: KeyMaterial::PublicKeyPem(public_pem(alg)) }
    }

    fn spiffe_issuer(url: &str) -> IssuerConfig {
        IssuerConfig {
            kind: IssuerKind::Spiffe(SpiffeIssuer {
                trust_domain: TD.into(),
                workload_role: Role::Agent,
                tenant: Some("acme".parse().expect("tenant")),
                default_scopes: Scopes::parse_list("agents:heartbeat").expect("scopes"),
            }),
            audiences: vec![AUD.into()],
            keys: KeySource::JwksUrl(url.into()),
            leeway_s: LEEWAY_S_DEFAULT,
            jwks: JwksLimits::default(),
        }
    }

    /// A key set server that counts its fetches.
    #[derive(Default)]
    struct FakeSource {
        doc: Mutex<Value>,
        fetches: AtomicUsize,
    }

    impl FakeSource {
        fn serving(keys: Vec<Value>) -> Arc<Self> {
            Arc::new(Self { doc: Mutex::new(json!({ "keys": keys })), fetches: AtomicUsize::new(0) })
        }

        fn set(&self, keys: Vec<Value>) {
            *self.doc.lock().expect("lock") = json!({ "keys": keys });
        }

        fn fetches(&self) -> usize {
            self.fetches.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl JwksSource for FakeSource {
        async fn fetch(&self, _url: &str, _bytes_max: usize) -> Result<Vec<u8>, String> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            Ok(serde_json::to_vec(&*self.doc.lock().expect("lock")).expect("json"))
        }
    }

    async fn build(issuers: Vec<IssuerConfig>, clock: &ManualClock, source: Arc<FakeSource>) -> JwtAuthenticator {
        JwtAuthenticator::new(issuers, Arc::new(clock.clone()), source).await.expect("authenticator")
    }

    async fn hs256() -> (JwtAuthenticator, ManualClock) {
        let clock = ManualClock::new(NOW_MS);
        (build(vec![hs256_issuer()], &clock, FakeSource::serving(vec![])).await, clock)
    }

    async fn refused(auth: &JwtAuthenticator, token: &str) -> &'static str {
        match auth.authenticate(token).await {
            Err(CoreError::Unauthenticated { reason }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn unsigned(header: &Value, claims: &Value) -> String {
        let part = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"));
        format!("{}.{}.", part(header), part(claims))
    }

    #[tokio::test]
    async fn a_valid_token_maps_its_claims() {
        let (auth, _) = hs256().await;
        let token = sign(
            Algorithm::HS256,
            None,
            &with(
                claims(),
                json!({ "nops_tenant": "acme", "nops_role": "operator", "scope": "agents:read plugins:*" }),
            ),
        );
        let p = auth.authenticate(&token).await.expect("accepted");
        assert_eq!(&*p.subject, "alice");
        assert_eq!(p.tenant.as_ref().map(TenantId::as_str), Some("acme"));
        assert_eq!(p.role, Role::Operator);
        assert_eq!(p.method, AuthMethod::Jwt);
        assert_eq!(&*p.credential, "https://idp.example.com/#alice");
        assert!(p.scopes.covers("agents:read") && p.scopes.covers("plugins:activate"));
        assert!(!p.scopes.covers("agents:write"));

        let defaults = auth.authenticate(&sign(Algorithm::HS256, None, &claims())).await.expect("accepted");
        assert_eq!((defaults.tenant, defaults.role, defaults.scopes), (None, Role::Viewer, Scopes::none()));

        let scp = with(claims(), json!({ "scp": ["agents:read", "keys:*"], "aud": ["x", AUD] }));
        let p = auth.authenticate(&sign(Algorithm::HS256, None, &scp)).await.expect("accepted");
        assert!(p.scopes.covers("keys:create") && !p.scopes.covers("agents:write"));
    }

    #[tokio::test]
    async fn bad_claim_values_are_refused() {
        let (auth, _) = hs256().await;
        for patch in [
            json!({ "nops_role": "root" }),
            json!({ "nops_role": 1 }),
            json!({ "nops_tenant": "Not A Tenant" }),
            json!({ "scope": "agents:READ" }),
            json!({ "scp": ["agents:read", 3] }),
            json!({ "scope": ["agents:read"] }),
            json!({ "sub": null }),
            json!({ "sub": "" }),
            json!({ "sub": 42 }),
            json!({ "exp": null }),
            json!({ "exp": "soon" }),
            json!({ "nbf": "now" }),
            json!({ "aud": 7 }),
        ] {
            let token = sign(Algorithm::HS256, None, &with(claims(), patch.clone()));
            assert_eq!(refused(&auth, &token).await, reason::BAD_CLAIMS, "{patch}");
        }
    }

    #[tokio::test]
    async fn es256_rs256_and_eddsa_keys_verify_only_their_own_algorithm() {
        let clock = ManualClock::new(NOW_MS);
        let keys =
            vec![pem_key("ec", Algorithm::ES256), pem_key("rsa", Algorithm::RS256), pem_key("ed", Algorithm::EdDSA)];
        let auth = build(vec![issuer(KeySource::Inline(keys))], &clock, FakeSource::serving(vec![])).await;
        for (alg, kid) in [(Algorithm::ES256, "ec"), (Algorithm::RS256, "rsa"), (Algorithm::EdDSA, "ed")] {
            let p = auth.authenticate(&sign(alg, Some(kid), &claims())).await.expect("accepted");
            assert_eq!(&*p.subject, "alice");
        }
        // Pinning: a good ES256 signature presented under the RSA key's kid.
        assert_eq!(refused(&auth, &sign(Algorithm::ES256, Some("rsa"), &claims())).await, reason::ALG_NOT_ALLOWED);
        // Several keys: a token must say which.
        assert_eq!(refused(&auth, &sign(Algorithm::ES256, None, &claims())).await, reason::UNKNOWN_KID);
        // Another P-256 key under the right kid.
        let other = EncodingKey::from_ec_pem(&fixture("ec2_private.pem")).expect("key");
        assert_eq!(
            refused(&auth, &sign_with(Algorithm::ES256, &other, Some("ec"), &claims())).await,
            reason::BAD_SIGNATURE
        );
        // A payload changed after signing.
        let token = sign(Algorithm::EdDSA, Some("ed"), &claims());
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&with(claims(), json!({ "sub": "root" }))).expect("json"));
        assert_eq!(refused(&auth, &parts.join(".")).await, reason::BAD_SIGNATURE);
    }

    #[tokio::test]
    async fn expiry_not_before_and_leeway_follow_the_injected_clock() {
        let (auth, clock) = hs256().await;
        let token = |patch: Value| sign(Algorithm::HS256, None, &with(claims(), patch));
        assert!(auth.authenticate(&token(json!({ "exp": NOW_S - 29 }))).await.is_ok(), "within the leeway");
        assert_eq!(refused(&auth, &token(json!({ "exp": NOW_S - 30 }))).await, reason::EXPIRED);
        assert_eq!(refused(&auth, &token(json!({ "exp": NOW_S - 3600 }))).await, reason::EXPIRED);
        assert!(auth.authenticate(&token(json!({ "nbf": NOW_S + 30 }))).await.is_ok(), "within the leeway");
        assert_eq!(refused(&auth, &token(json!({ "nbf": NOW_S + 31 }))).await, reason::NOT_YET_VALID);
        assert_eq!(refused(&auth, &token(json!({ "iat": NOW_S + 600 }))).await, reason::NOT_YET_VALID);
        assert!(auth.authenticate(&token(json!({ "iat": null, "exp": NOW_S + 1 }))).await.is_ok(), "iat is optional");

        let live = token(json!({ "exp": NOW_S + 60 }));
        assert!(auth.authenticate(&live).await.is_ok());
        clock.advance_ms(90_000);
        assert_eq!(refused(&auth, &live).await, reason::EXPIRED);

        let mut strict = hs256_issuer();
        strict.leeway_s = 0;
        let clock = ManualClock::new(NOW_MS);
        let auth = build(vec![strict], &clock, FakeSource::serving(vec![])).await;
        assert_eq!(refused(&auth, &token(json!({ "exp": NOW_S }))).await, reason::EXPIRED);
        assert!(auth.authenticate(&token(json!({ "exp": NOW_S + 1 }))).await.is_ok());
    }

    #[tokio::test]
    async fn audience_and_issuer_must_match() {
        let (auth, _) = hs256().await;
        let token = |patch: Value| sign(Algorithm::HS256, None, &with(claims(), patch));
        assert_eq!(refused(&auth, &token(json!({ "aud": "someone-else" }))).await, reason::WRONG_AUDIENCE);
        assert_eq!(refused(&auth, &token(json!({ "aud": ["a", "b"] }))).await, reason::WRONG_AUDIENCE);
        assert_eq!(refused(&auth, &token(json!({ "aud": null }))).await, reason::WRONG_AUDIENCE);
        assert!(auth.authenticate(&token(json!({ "aud": ["a", "other"] }))).await.is_ok());
        assert_eq!(refused(&auth, &token(json!({ "iss": "https://evil.example/" }))).await, reason::WRONG_ISSUER);
        assert_eq!(refused(&auth, &token(json!({ "iss": null }))).await, reason::WRONG_ISSUER);
    }

    #[tokio::test]
    async fn malformed_and_unsigned_tokens_are_refused() {
        let (auth, _) = hs256().await;
        for token in ["", "a.b", "a.b.c.d", "!!.??.**", "e30.e30.", "bm90IGpzb24.e30.sig"] {
            assert_eq!(refused(&auth, token).await, reason::MALFORMED, "{token:?}");
        }
        for alg in ["none", "None", "NONE", "nOnE", "HS1", ""] {
            let token = unsigned(&json!({ "alg": alg, "typ": "JWT" }), &claims());
            assert_eq!(refused(&auth, &token).await, reason::ALG_NOT_ALLOWED, "alg {alg:?}");
        }
        // A forged empty signature under the real algorithm.
        let token = unsigned(&json!({ "alg": "HS256" }), &claims());
        assert_eq!(refused(&auth, &token).await, reason::BAD_SIGNATURE);
        // Critical extensions are not supported.
        let signed = sign(Algorithm::HS256, None, &claims());
        let sig = signed.rsplit('.').next().expect("signature");
        let crit = unsigned(&json!({ "alg": "HS256", "crit": ["exp"], "exp": 1 }), &claims());
        assert_eq!(refused(&auth, &format!("{crit}{sig}")).await, reason::MALFORMED);
    }

    #[tokio::test]
    async fn an_rs256_public_key_is_never_an_hmac_secret() {
        let clock = ManualClock::new(NOW_MS);
        let auth = build(
            vec![issuer(KeySource::Inline(vec![pem_key("rsa", Algorithm::RS256)]))],
            &clock,
            FakeSource::serving(vec![]),
        )
        .await;
        let public = EncodingKey::from_secret(&public_pem(Algorithm::RS256)).expect("key");
        for kid in [Some("rsa"), None] {
            let forged = sign_with(Algorithm::HS256, &public, kid, &claims());
            assert_eq!(refused(&auth, &forged).await, reason::ALG_NOT_ALLOWED);
        }
        // The same from a key set: the RSA key keeps RS256 even if the document says otherwise.
        let mut lying = jwk("rsa_public.pem", "rsa", None);
        lying["alg"] = json!("HS256");
        let source = FakeSource::serving(vec![lying, jwk("rsa_public.pem", "rsa2", None)]);
        let auth = build(vec![issuer(KeySource::JwksUrl("https://idp.example.com/jwks".into()))], &clock, source).await;
        let forged = sign_with(Algorithm::HS256, &public, Some("rsa"), &claims());
        assert_eq!(refused(&auth, &forged).await, reason::UNKNOWN_KID, "the lying key was ignored");
        let forged = sign_with(Algorithm::HS256, &public, Some("rsa2"), &claims());
        assert_eq!(refused(&auth, &forged).await, reason::ALG_NOT_ALLOWED);
        assert!(auth.authenticate(&sign(Algorithm::RS256, Some("rsa2"), &claims())).await.is_ok());
    }

    #[tokio::test]
    async fn forged_kids_cause_at_most_one_fetch_per_interval() {
        let clock = ManualClock::new(NOW_MS);
        let source = FakeSource::serving(vec![jwk("ec_public.pem", "k1", Some("sig"))]);
        let auth = Arc::new(
            build(vec![issuer(KeySource::JwksUrl("https://idp.example.com/jwks".into()))], &clock, source.clone())
                .await,
        );
        assert_eq!(source.fetches(), 1, "the initial load");
        assert!(auth.authenticate(&sign(Algorithm::ES256, Some("k1"), &claims())).await.is_ok());
        for _ in 0..100 {
            let kid = uuid::Uuid::now_v7().to_string();
            assert_eq!(refused(&auth, &sign(Algorithm::ES256, Some(&kid), &claims())).await, reason::UNKNOWN_KID);
        }
        assert_eq!(source.fetches(), 1, "no refetch within the interval");

        clock.advance_ms(JWKS_REFETCH_INTERVAL_MS_DEFAULT as i64);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let auth = auth.clone();
            let token = sign(Algorithm::ES256, Some(&uuid::Uuid::now_v7().to_string()), &claims());
            tasks.spawn(async move { auth.authenticate(&token).await.is_err() });
        }
        while let Some(refused) = tasks.join_next().await {
            assert!(refused.expect("task"));
        }
        assert_eq!(source.fetches(), 2, "one refetch for 100 concurrent forged kids");
        assert!(auth.authenticate(&sign(Algorithm::ES256, Some("k1"), &claims())).await.is_ok());
    }

    #[tokio::test]
    async fn a_rotated_key_is_accepted_after_the_refetch() {
        let clock = ManualClock::new(NOW_MS);
        let source = FakeSource::serving(vec![jwk("rsa_public.pem", "old", None)]);
        let auth =
            build(vec![issuer(KeySource::JwksUrl("http://127.0.0.1:9/jwks".into()))], &clock, source.clone()).await;
        let new_token = sign(Algorithm::ES256, Some("new"), &claims());
        source.set(vec![jwk("rsa_public.pem", "old", None), jwk("ec_public.pem", "new", None)]);
        assert_eq!(refused(&auth, &new_token).await, reason::UNKNOWN_KID, "not due yet");
        clock.advance_ms(30_000);
        assert!(auth.authenticate(&new_token).await.is_ok());
        assert_eq!(source.fetches(), 2);
        assert!(auth.authenticate(&sign(Algorithm::RS256, Some("old"), &claims())).await.is_ok());
    }

    #[tokio::test]
    async fn a_verified_token_is_remembered_until_it_expires_and_a_refused_one_never() {
        let (auth, clock) = hs256().await;
        let live = sign(Algorithm::HS256, None, &with(claims(), json!({ "exp": NOW_S + 60 })));
        let first = auth.authenticate(&live).await.expect("valid");
        assert_eq!(auth.authenticate(&live).await.expect("cached"), first);
        assert_eq!(auth.verified.len(), 1);
        let forged = format!("{}x", &live[..live.len() - 1]);
        assert!(auth.authenticate(&forged).await.is_err());
        assert!(auth.authenticate(&forged).await.is_err());
        assert_eq!(auth.verified.len(), 1, "refusals are not remembered");
        clock.advance_ms(60_000 + 30_000);
        assert_eq!(refused(&auth, &live).await, reason::EXPIRED, "the leeway ends the cached answer too");
        assert!(auth.verified.is_empty());
    }

    #[tokio::test]
    async fn keys_removed_from_the_set_stop_working_after_max_age() {
        let clock = ManualClock::new(NOW_MS);
        let source = FakeSource::serving(vec![jwk("ec_public.pem", "k1", None)]);
        let auth =
            build(vec![issuer(KeySource::JwksUrl("https://idp.example.com/jwks".into()))], &clock, source.clone())
                .await;
        let token = sign(Algorithm::ES256, Some("k1"), &with(claims(), json!({ "exp": NOW_S + 3600 })));
        source.set(vec![jwk("ed25519_public.pem", "k2", None)]);
        clock.advance_ms(JWKS_MAX_AGE_MS_DEFAULT as i64);
        assert!(auth.authenticate(&token).await.is_ok(), "served from the current keys while refreshing");
        for _ in 0..1000 {
            if source.fetches() == 2 && auth.issuers[0].keys.load().select(Some("k2")).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(refused(&auth, &token).await, reason::UNKNOWN_KID);
    }

    #[tokio::test]
    async fn a_key_set_file_is_reread_when_a_refetch_is_due() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jwks.json");
        let write = |keys: Vec<Value>| std::fs::write(&path, json!({ "keys": keys }).to_string()).expect("write");
        write(vec![jwk("ec_public.pem", "k1", None)]);
        let clock = ManualClock::new(NOW_MS);
        let auth = build(vec![issuer(KeySource::JwksFile(path.clone()))], &clock, FakeSource::serving(vec![])).await;
        let rotated = sign(Algorithm::EdDSA, Some("k2"), &claims());
        write(vec![jwk("ed25519_public.pem", "k2", None)]);
        assert_eq!(refused(&auth, &rotated).await, reason::UNKNOWN_KID);
        clock.advance_ms(30_000);
        assert!(auth.authenticate(&rotated).await.is_ok());

        // A file that breaks keeps the previous keys.
        std::fs::write(&path, "{ not json").expect("write");
        clock.advance_ms(30_000);
        assert_eq!(refused(&auth, &sign(Algorithm::ES256, Some("k9"), &claims())).await, reason::UNKNOWN_KID);
        assert!(auth.authenticate(&rotated).await.is_ok());
    }

    #[tokio::test]
    async fn key_sets_refuse_symmetric_keys_and_bound_their_size() {
        let clock = ManualClock::new(NOW_MS);
        let oct = json!({ "kty": "oct", "kid": "hmac", "k": URL_SAFE_NO_PAD.encode(SECRET), "alg": "HS256" });
        let source = FakeSource::serving(vec![oct, jwk("ec_public.pem", "k1", None)]);
        let auth = build(vec![issuer(KeySource::JwksUrl("https://idp.example.com/jwks".into()))], &clock, source).await;
        assert_eq!(refused(&auth, &sign(Algorithm::HS256, Some("hmac"), &claims())).await, reason::UNKNOWN_KID);

        let keys: Vec<Value> = (0..5).map(|i| jwk("ec_public.pem", &format!("k{i}"), None)).collect();
        let err = parse_key_set(&serde_json::to_vec(&json!({ "keys": keys })).expect("json"), false, 4, ISS)
            .err()
            .expect("too many keys");
        assert!(err.contains("jwks_keys_max"), "{err}");
        let dup = vec![jwk("ec_public.pem", "same", None), jwk("rsa_public.pem", "same", None)];
        let set =
            parse_key_set(&serde_json::to_vec(&json!({ "keys": dup })).expect("json"), false, 4, ISS).expect("set");
        assert!(set.select(Some("same")).is_none(), "an ambiguous kid selects nothing");
        let mut weak = jwk("rsa1024_public.pem", "weak", None);
        weak["alg"] = json!("RS256");
        let mut wrong_curve = jwk("ec384_public.pem", "p384", None);
        wrong_curve["alg"] = json!("ES256");
        let encryption = jwk("ec_public.pem", "enc", Some("enc"));
        let set = parse_key_set(
            &serde_json::to_vec(&json!({ "keys": [weak, wrong_curve, encryption] })).expect("json"),
            false,
            4,
            ISS,
        )
        .expect("set");
        assert!(set.keys.is_empty());
        let p384 = parse_key_set(
            &serde_json::to_vec(&json!({ "keys": [jwk("ec384_public.pem", "p384", None)] })).expect("json"),
            false,
            4,
            ISS,
        )
        .expect("set");
        assert_eq!(p384.select(Some("p384")).map(|k| k.alg), Some(Algorithm::ES384), "alg from the curve");
    }

    fn svid_claims(sub: &str) -> Value {
        json!({ "sub": sub, "aud": [AUD], "exp": NOW_S + 300 })
    }

    async fn spiffe() -> (JwtAuthenticator, Arc<FakeSource>) {
        let clock = ManualClock::new(NOW_MS);
        let source = FakeSource::serving(vec![
            jwk("ec_public.pem", "svid-ec", Some("jwt-svid")),
            jwk("rsa_public.pem", "x509", Some("x509-svid")),
            jwk("ed25519_public.pem", "svid-ed", Some("jwt-svid")),
        ]);
        let auth =
            build(vec![hs256_issuer(), spiffe_issuer("https://spire.example.org/bundle")], &clock, source.clone())
                .await;
        (auth, source)
    }

    #[tokio::test]
    async fn a_valid_svid_is_a_workload() {
        let (auth, _) = spiffe().await;
        let id = "spiffe://example.org/ns/prod/sa/edge-agent";
        let p = auth.authenticate(&sign(Algorithm::ES256, Some("svid-ec"), &svid_claims(id))).await.expect("accepted");
        assert_eq!((&*p.subject, &*p.credential), (id, id));
        assert_eq!((p.method, p.role), (AuthMethod::Workload, Role::Agent));
        assert_eq!(p.tenant.as_ref().map(TenantId::as_str), Some("acme"));
        assert!(p.scopes.covers("agents:heartbeat") && !p.scopes.covers("agents:read"));
        // `iss` is not checked for SVIDs; a `scope` claim replaces the default scopes.
        let scoped = with(svid_claims(id), json!({ "iss": "https://spire.example.org", "scope": "agents:read" }));
        let p = auth.authenticate(&sign(Algorithm::ES256, Some("svid-ec"), &scoped)).await.expect("accepted");
        assert!(p.scopes.covers("agents:read") && !p.scopes.covers("agents:heartbeat"));
        // The other issuer is unaffected.
        assert!(auth.authenticate(&sign(Algorithm::HS256, None, &claims())).await.is_ok());
    }

    #[tokio::test]
    async fn svids_are_refused_for_the_wrong_domain_id_algorithm_or_use() {
        let (auth, source) = spiffe().await;
        let id = "spiffe://example.org/agent";
        let es = |claims: &Value| sign(Algorithm::ES256, Some("svid-ec"), claims);
        assert_eq!(refused(&auth, &es(&svid_claims("spiffe://other.org/agent"))).await, reason::WRONG_ISSUER);
        for bad in [
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/./a",
            "spiffe://Example.org/a",
            "spiffe://example.org:8443/a",
            "spiffe://user@example.org/a",
            "spiffe://example.org/a?x=1",
            "spiffe://example.org/a#frag",
            "spiffe://example.org/a%2Fb",
            "spiffe:///a",
        ] {
            assert_eq!(refused(&auth, &es(&svid_claims(bad))).await, reason::BAD_CLAIMS, "{bad}");
        }
        assert_eq!(refused(&auth, &es(&svid_claims("SPIFFE://example.org/a"))).await, reason::WRONG_ISSUER);
        assert_eq!(refused(&auth, &es(&with(svid_claims(id), json!({ "aud": null })))).await, reason::WRONG_AUDIENCE);
        assert_eq!(refused(&auth, &es(&with(svid_claims(id), json!({ "aud": "x" })))).await, reason::WRONG_AUDIENCE);
        assert_eq!(refused(&auth, &es(&with(svid_claims(id), json!({ "exp": null })))).await, reason::BAD_CLAIMS);
        // HS256 (even with the dev issuer's secret) and EdDSA are not SVID algorithms.
        let hs = sign(Algorithm::HS256, None, &svid_claims(id));
        assert_eq!(refused(&auth, &hs).await, reason::ALG_NOT_ALLOWED);
        let ed = sign(Algorithm::EdDSA, Some("svid-ed"), &svid_claims(id));
        assert_eq!(refused(&auth, &ed).await, reason::ALG_NOT_ALLOWED);
        // The x509-svid key of the bundle does not verify JWT-SVIDs.
        let fetches = source.fetches();
        let x509 = sign(Algorithm::RS256, Some("x509"), &svid_claims(id));
        assert_eq!(refused(&auth, &x509).await, reason::UNKNOWN_KID);
        assert_eq!(source.fetches(), fetches, "within the refetch interval");
        let mut typed = jsonwebtoken::Header::new(Algorithm::ES256);
        typed.kid = Some("svid-ec".into());
        typed.typ = Some("at+jwt".into());
        let token = encode(&typed, &svid_claims(id), &signing_key(Algorithm::ES256)).expect("encode");
        assert_eq!(refused(&auth, &token).await, reason::MALFORMED);
    }

    #[test]
    fn spiffe_ids_parse_per_the_spec() {
        let id = SpiffeId::parse("spiffe://prod.example-1_x.org/ns/Default/sa/a.b-c_d").expect("valid");
        assert_eq!(id.trust_domain(), "prod.example-1_x.org");
        assert_eq!(id.path(), "/ns/Default/sa/a.b-c_d");
        assert!(SpiffeId::parse(&format!("spiffe://example.org/{}", "a".repeat(2048))).is_err());
        assert!(SpiffeId::parse("http://example.org/a").is_err());
        assert!(SpiffeId::parse("spiffe://exa mple.org/a").is_err());
        assert!(SpiffeId::parse("spiffe://example.org/a b").is_err());
        assert!(validate_trust_domain("example.org").is_ok());
        assert!(validate_trust_domain("Example.org").is_err());
        assert!(validate_trust_domain(&"a".repeat(256)).is_err());
    }

    #[tokio::test]
    async fn bad_configurations_are_refused_naming_the_field() {
        let check = |config: IssuerConfig, field: &str| {
            let err = config.validate().expect_err("refused").to_string();
            assert!(err.contains(field), "{err} should name {field}");
        };
        let mut c = hs256_issuer();
        c.leeway_s = LEEWAY_S_MAX + 1;
        check(c, "leeway_s");
        let mut c = hs256_issuer();
        c.audiences.clear();
        check(c, "audiences");
        let short = InlineKey {
            kid: None,
            alg: Algorithm::HS256,
            material: KeyMaterial::HmacSecret(Zeroizing::new(b"too short".to_vec())),
        };
        check(issuer(KeySource::Inline(vec![short])), "at least 32 bytes");
        let secret_as_rsa = InlineKey {
            kid: None,
            alg: Algorithm::RS256,
            material: KeyMaterial::HmacSecret(Zeroizing::new(SECRET.to_vec())),
        };
        check(issuer(KeySource::Inline(vec![secret_as_rsa])), "public_key_pem_file");
        let pem_as_hmac = InlineKey {
            kid: None,
            alg: Algorithm::HS256,
            material: KeyMaterial::PublicKeyPem(public_pem(Algorithm::RS256)),
        };
        check(issuer(KeySource::Inline(vec![pem_as_hmac])), "secret_env");
        let weak = InlineKey {
            kid: None,
            alg: Algorithm::RS256,
            material: KeyMaterial::PublicKeyPem(fixture("rsa1024_public.pem")),
        };
        check(issuer(KeySource::Inline(vec![weak])), "1024 bits");
        let p384 = InlineKey {
            kid: None,
            alg: Algorithm::ES256,
            material: KeyMaterial::PublicKeyPem(fixture("ec384_public.pem")),
        };
        check(issuer(KeySource::Inline(vec![p384])), "ES256");
        let mut two = vec![pem_key("a", Algorithm::ES256), pem_key("b", Algorithm::RS256)];
        two[1].kid = None;
        check(issuer(KeySource::Inline(two)), "every key needs a kid");
        check(issuer(KeySource::JwksUrl("http://idp.example.com/jwks".into())), "https");
        let mut c = spiffe_issuer("https://spire.example.org/bundle");
        c.keys = KeySource::Inline(vec![pem_key("a", Algorithm::ES256)]);
        check(c, "bundle_file");
        let mut c = spiffe_issuer("https://spire.example.org/bundle");
        if let IssuerKind::Spiffe(s) = &mut c.kind {
            s.trust_domain = "Example.org".into();
        }
        check(c, "trust_domain");

        let clock = Arc::new(ManualClock::new(NOW_MS));
        let twice =
            JwtAuthenticator::new(vec![hs256_issuer(), hs256_issuer()], clock.clone(), FakeSource::serving(vec![]))
                .await;
        assert!(twice.expect_err("refused").to_string().contains("configured twice"));
        let missing = issuer(KeySource::JwksFile("/nonexistent/jwks.json".into()));
        let err = JwtAuthenticator::new(vec![missing], clock, FakeSource::serving(vec![])).await.expect_err("refused");
        assert!(err.to_string().contains("/nonexistent/jwks.json"), "{err}");
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let text = format!("{:?}", hs256_issuer());
        assert!(!text.contains(std::str::from_utf8(SECRET).expect("utf8")), "{text}");
        assert!(text.contains("<redacted>"));
    }
}
