//! What the identity layer parses from a request or an identity provider before it trusts
//! anything: bearer credentials (API keys and JWTs of every shape), JWKS documents and SPIFFE
//! bundles fetched from a URL, scopes and SPIFFE IDs. None may panic, whatever the bytes.

#![no_main]

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use libfuzzer_sys::fuzz_target;
use nops_core::auth::jwt::{
    InlineKey, IssuerConfig, IssuerKind, JwksLimits, JwksSource, JwtAuthenticator, JwtIssuer, KeyMaterial, KeySource,
    SpiffeId, SpiffeIssuer, Zeroizing, parse_algorithm,
};
use nops_core::auth::{Authenticator, Role, Scope, Scopes, is_well_formed_api_key};
use nops_core::clock::ManualClock;

/// A key set "fetched" from the identity provider: the fuzzer's bytes.
struct Served(Vec<u8>);

#[async_trait]
impl JwksSource for Served {
    async fn fetch(&self, _url: &str, bytes_max: usize) -> Result<Vec<u8>, String> {
        if self.0.len() > bytes_max { Err("too large".into()) } else { Ok(self.0.clone()) }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

fn issuers() -> Vec<IssuerConfig> {
    let hs256 = parse_algorithm("HS256").expect("HS256");
    vec![
        IssuerConfig {
            kind: IssuerKind::Jwt(JwtIssuer::new("fuzz")),
            audiences: vec!["nops".into()],
            keys: KeySource::Inline(vec![InlineKey {
                kid: Some("k1".into()),
                alg: hs256,
                material: KeyMaterial::HmacSecret(Zeroizing::new(vec![7u8; 32])),
            }]),
            leeway_s: 30,
            jwks: JwksLimits::default(),
        },
        IssuerConfig {
            kind: IssuerKind::Jwt(JwtIssuer::new("https://idp.fuzz")),
            audiences: vec!["nops".into()],
            keys: KeySource::JwksUrl("https://idp.fuzz/jwks.json".into()),
            leeway_s: 30,
            jwks: JwksLimits::default(),
        },
        IssuerConfig {
            kind: IssuerKind::Spiffe(SpiffeIssuer {
                trust_domain: "fuzz.test".into(),
                workload_role: Role::Agent,
                tenant: None,
                default_scopes: Scopes::none(),
            }),
            audiences: vec!["nops".into()],
            keys: KeySource::JwksUrl("https://fuzz.test/bundle.json".into()),
            leeway_s: 30,
            jwks: JwksLimits::default(),
        },
    ]
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    runtime().block_on(async {
        // The same bytes as a key set, then as a bearer token against it.
        let clock = Arc::new(ManualClock::new(1_767_225_600_000));
        if let Ok(auth) = JwtAuthenticator::new(issuers(), clock, Arc::new(Served(data.to_vec()))).await {
            let _ = auth.authenticate(&text).await;
        }
    });
    let _ = is_well_formed_api_key(&text);
    let _ = text.parse::<Scope>();
    if let Ok(scopes) = Scopes::parse_list(&text) {
        let _ = scopes.covers("agents:read");
        let _ = scopes.includes(&Scopes::all());
    }
    let _ = SpiffeId::parse(&text);
});
