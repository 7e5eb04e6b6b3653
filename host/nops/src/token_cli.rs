//! `nops token …`: development tokens. `mint` signs an HS256 JWT with the same secret the kernel's
//! development issuer (`NOPS_JWT_HS256_SECRET`) or an inline `[[auth.issuers]]` HMAC key verifies.

use std::path::PathBuf;

use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand};
use jsonwebtoken::{EncodingKey, Header, encode};
use nops::config::read_secret_file;
use nops_core::auth::jwt::{Algorithm, ROLE_CLAIM_DEFAULT, TENANT_CLAIM_DEFAULT, Zeroizing, hmac_secret_bytes_min};
use nops_core::auth::{Role, Scopes};
use nops_core::clock::{Clock, SystemClock};
use nops_core::tenant::TenantId;
use serde_json::{Map, Value};

/// Longest lifetime `mint` gives a token, in seconds (30 days).
const TTL_S_MAX: u64 = 30 * 24 * 3600;

/// Token commands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print an HS256 development JWT (claims `nops_tenant`, `nops_role`, `scope`)
    Mint(MintArgs),
}

/// What `nops token mint` signs.
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("secret").required(true).args(["secret_env", "secret_file"])))]
pub struct MintArgs {
    /// Environment variable holding the HS256 secret (e.g. NOPS_JWT_HS256_SECRET)
    #[arg(long, value_name = "VAR")]
    secret_env: Option<String>,
    /// File holding the HS256 secret (one trailing newline is dropped)
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// `iss`: the issuer the kernel is configured with
    #[arg(long)]
    issuer: String,
    /// `aud`: one of the issuer's audiences
    #[arg(long)]
    audience: String,
    /// `sub`: who the token speaks for
    #[arg(long)]
    subject: String,
    /// Tenant (claim `nops_tenant`); without it the principal is kernel-wide
    #[arg(long)]
    tenant: Option<String>,
    /// Role (claim `nops_role`): admin, operator, viewer or agent [kernel default: viewer]
    #[arg(long)]
    role: Option<String>,
    /// Space-separated scopes (claim `scope`), e.g. "agents:read plugins:*"
    #[arg(long)]
    scope: Option<String>,
    /// Lifetime in seconds (1 to 2592000)
    #[arg(long, default_value_t = 3600)]
    ttl_s: u64,
    /// Key id for the header (only when the issuer's key has this kid)
    #[arg(long)]
    kid: Option<String>,
}

/// Runs a token command.
pub fn run(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Mint(args) => {
            let token = mint(&args, SystemClock.now_ms() / 1000)?;
            println!("{token}");
            Ok(())
        }
    }
}

fn mint(args: &MintArgs, now_s: i64) -> anyhow::Result<String> {
    let secret = match (&args.secret_env, &args.secret_file) {
        (Some(var), _) => Zeroizing::new(
            std::env::var(var)
                .ok()
                .filter(|s| !s.is_empty())
                .with_context(|| format!("--secret-env: the environment variable {var} is not set"))?
                .into_bytes(),
        ),
        (None, Some(path)) => read_secret_file(path).context("--secret-file")?,
        (None, None) => anyhow::bail!("one of --secret-env and --secret-file is required"),
    };
    let min = hmac_secret_bytes_min(Algorithm::HS256).unwrap_or(32);
    if secret.len() < min {
        anyhow::bail!("the HS256 secret must be at least {min} bytes");
    }
    if !(1..=TTL_S_MAX).contains(&args.ttl_s) {
        anyhow::bail!("--ttl-s must be 1 to {TTL_S_MAX}");
    }
    for (flag, value) in [("--issuer", &args.issuer), ("--audience", &args.audience), ("--subject", &args.subject)] {
        if value.is_empty() {
            anyhow::bail!("{flag} must not be empty");
        }
    }
    let mut claims = Map::new();
    claims.insert("iss".into(), args.issuer.clone().into());
    claims.insert("aud".into(), args.audience.clone().into());
    claims.insert("sub".into(), args.subject.clone().into());
    claims.insert("iat".into(), now_s.into());
    claims.insert("nbf".into(), now_s.into());
    claims.insert("exp".into(), now_s.saturating_add(args.ttl_s as i64).into());
    if let Some(tenant) = &args.tenant {
        let tenant: TenantId = tenant.parse().map_err(|e| anyhow::anyhow!("--tenant: {e}"))?;
        claims.insert(TENANT_CLAIM_DEFAULT.into(), tenant.as_str().into());
    }
    if let Some(role) = &args.role {
        let role =
            Role::parse(role).with_context(|| format!("--role `{role}` is not admin, operator, viewer or agent"))?;
        claims.insert(ROLE_CLAIM_DEFAULT.into(), role.as_str().into());
    }
    if let Some(scope) = &args.scope {
        Scopes::parse_list(scope).map_err(|e| anyhow::anyhow!("--scope: {e}"))?;
        claims.insert("scope".into(), scope.split_ascii_whitespace().collect::<Vec<_>>().join(" ").into());
    }
    let mut header = Header::new(Algorithm::HS256);
    header.typ = Some("JWT".into());
    header.kid = args.kid.clone();
    let key = EncodingKey::from_secret(&secret).context("the HS256 secret")?;
    encode(&header, &Value::Object(claims), &key).context("signing the token")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use nops_core::auth::jwt::{
        InlineKey, IssuerConfig, IssuerKind, JwksLimits, JwksSource, JwtAuthenticator, JwtIssuer, KeyMaterial,
        KeySource,
    };
    use nops_core::auth::{AuthMethod, Authenticator};
    use nops_core::clock::ManualClock;

    use super::*;

    struct NoSource;

    #[async_trait::async_trait]
    impl JwksSource for NoSource {
        async fn fetch(&self, _url: &str, _bytes_max: usize) -> Result<Vec<u8>, String> {
            Err("no network in tests".into())
        }
    }

    #[tokio::test]
    async fn minted_tokens_verify_with_the_development_issuer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, "a-development-secret-of-32-bytes-or-more\n").expect("write");
        let args = MintArgs {
            secret_env: None,
            secret_file: Some(secret_file),
            issuer: "dev".into(),
            audience: "nops".into(),
            subject: "alice".into(),
            tenant: Some("acme".into()),
            role: Some("operator".into()),
            scope: Some("agents:read  plugins:*".into()),
            ttl_s: 600,
            kid: None,
        };
        let now_s = 1_800_000_000;
        let token = mint(&args, now_s).expect("minted");
        let issuer = IssuerConfig {
            kind: IssuerKind::Jwt(JwtIssuer::new("dev")),
            audiences: vec!["nops".into()],
            keys: KeySource::Inline(vec![InlineKey {
                kid: None,
                alg: Algorithm::HS256,
                material: KeyMaterial::HmacSecret(Zeroizing::new(b"a-development-secret-of-32-bytes-or-more".to_vec())),
            }]),
            leeway_s: 30,
            jwks: JwksLimits::default(),
        };
        let clock = Arc::new(ManualClock::new(now_s * 1000));
        let auth = JwtAuthenticator::new(vec![issuer], clock, Arc::new(NoSource)).await.expect("authenticator");
        let p = auth.authenticate(&token).await.expect("accepted");
        assert_eq!((&*p.subject, p.role, p.method), ("alice", Role::Operator, AuthMethod::Jwt));
        assert_eq!(p.tenant.as_ref().map(TenantId::as_str), Some("acme"));
        assert!(p.scopes.covers("plugins:activate"));

        let bad = |f: fn(&mut MintArgs)| {
            let mut args = args.clone();
            f(&mut args);
            mint(&args, now_s).expect_err("refused")
        };
        assert!(bad(|a| a.role = Some("root".into())).to_string().contains("--role"));
        assert!(bad(|a| a.tenant = Some("Bad Tenant".into())).to_string().contains("--tenant"));
        assert!(bad(|a| a.scope = Some("agents:READ".into())).to_string().contains("--scope"));
        assert!(bad(|a| a.ttl_s = 0).to_string().contains("--ttl-s"));
    }
}
