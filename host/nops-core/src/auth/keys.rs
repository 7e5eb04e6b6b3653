//! API key management: create, list, show, rotate with a grace period, revoke.
//!
//! Every change writes its event to the outbox in the same transaction (subject
//! `nops.keys.<event>`), emits one structured audit record (tracing target `nops::audit`) and
//! counts in the key metrics. Secrets exist only in the value returned by `create` and
//! `rotate`; the store keeps their keyed BLAKE2b hashes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    ApiKeyAuthenticator, ApiKeyRecord, GeneratedKey, KeyHasher, KeyStatus, Principal, Role, Scopes, generate_api_key,
};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::store::{OutboxEvent, Store, StoreError};
use crate::tenant::TenantId;
use crate::{CoreError, CoreResult};

/// Longest key name, in bytes.
pub const KEY_NAME_BYTES_MAX: usize = 128;
/// Longest key subject, in bytes.
pub const KEY_SUBJECT_BYTES_MAX: usize = 256;
/// Grace period of a rotation when the caller names none: one day.
pub const ROTATION_GRACE_S_DEFAULT: u64 = 86_400;
/// Longest grace period of a rotation: 30 days.
pub const ROTATION_GRACE_S_MAX: u64 = 30 * 86_400;
/// Longest lifetime of a key: ten years.
pub const KEY_TTL_S_MAX: u64 = 10 * 365 * 86_400;

/// Settings of key management.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    /// Most live (neither revoked nor expired) keys per tenant, and kernel-wide.
    pub keys_per_tenant_max: u32,
}

impl Default for KeyConfig {
    fn default() -> Self {
        Self { keys_per_tenant_max: 1_000 }
    }
}

/// What a caller asks for when creating a key.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// A human name, e.g. `ci-deployer`.
    pub name: String,
    /// The role of the principal the key authenticates.
    pub role: Role,
    /// Who the key speaks for (e.g. an agent's id); the key id when omitted.
    #[serde(default)]
    pub subject: Option<String>,
    /// What the key may do; the creator's own scopes cap them. Default: every scope the
    /// creator holds.
    #[serde(default)]
    #[schema(value_type = Option<Vec<String>>, example = json!(["agents:read", "agents:heartbeat"]))]
    pub scopes: Option<Scopes>,
    /// Lifetime in seconds; the key never expires when omitted.
    #[serde(default)]
    pub expires_in_s: Option<u64>,
    /// A kernel-wide key (no tenant). Only a kernel-wide admin may create one.
    #[serde(default)]
    pub kernel_wide: bool,
}

/// A key as the API shows it: never the secret, never the hash.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct KeyView {
    /// Key id.
    #[schema(value_type = String, format = Uuid)]
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its tenant; absent for a kernel-wide key.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub tenant: Option<TenantId>,
    /// Its role.
    pub role: Role,
    /// Who it speaks for, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Its scopes.
    #[schema(value_type = Vec<String>)]
    pub scopes: Scopes,
    /// Where it is in its life.
    pub status: KeyStatus,
    /// Creation (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// Expiry, or the end of its rotation grace period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
    /// Revocation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<i64>,
    /// Last use, to the minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used_at_ms: Option<i64>,
    /// The key that replaced it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid)]
    pub replaced_by: Option<Uuid>,
    /// The key it replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid)]
    pub replaces: Option<Uuid>,
}

impl KeyView {
    fn of(record: ApiKeyRecord, now_ms: i64) -> Self {
        Self {
            status: record.status(now_ms),
            id: record.id,
            name: record.name,
            tenant: record.tenant,
            role: record.role,
            subject: record.subject,
            scopes: record.scopes,
            created_at_ms: record.created_at_ms,
            expires_at_ms: record.expires_at_ms,
            revoked_at_ms: record.revoked_at_ms,
            last_used_at_ms: record.last_used_at_ms,
            replaced_by: record.replaced_by,
            replaces: record.replaces,
        }
    }
}

/// A key just made: its view and, once, its secret.
#[derive(Debug)]
pub struct IssuedKey {
    /// The key.
    pub key: KeyView,
    /// The secret, to show once.
    pub secret: GeneratedKey,
}

/// Which keys a request sees: those of the tenant it acts in and, for a kernel-wide
/// principal, the kernel-wide keys too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyScope {
    /// The tenant the request acts in.
    pub tenant: TenantId,
    /// Whether kernel-wide keys are visible (the caller is kernel-wide itself).
    pub kernel_wide: bool,
}

impl KeyScope {
    /// The keys `principal` sees when acting in `tenant`.
    pub fn of(principal: &Principal, tenant: &TenantId) -> Self {
        Self { tenant: tenant.clone(), kernel_wide: principal.tenant.is_none() }
    }

    fn holds(&self, record: &ApiKeyRecord) -> bool {
        match &record.tenant {
            Some(t) => *t == self.tenant,
            None => self.kernel_wide,
        }
    }
}

/// The key management service.
pub struct KeyService {
    store: Arc<dyn Store>,
    authenticator: Arc<ApiKeyAuthenticator>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    config: KeyConfig,
}

impl std::fmt::Debug for KeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyService").field("config", &self.config).finish_non_exhaustive()
    }
}

fn store_error(err: StoreError) -> CoreError {
    match err {
        StoreError::LimitExceeded(message) => CoreError::LimitExceeded { message: message.into() },
        StoreError::Conflict(message) => CoreError::Conflict { code: "key_changed", message: message.into() },
        other => CoreError::Store(other),
    }
}

impl KeyService {
    /// A service over `store`, sharing the authenticator's hasher and cache.
    pub fn new(
        store: Arc<dyn Store>,
        authenticator: Arc<ApiKeyAuthenticator>,
        clock: Arc<dyn Clock>,
        metrics: Metrics,
        config: KeyConfig,
    ) -> Self {
        Self { store, authenticator, clock, metrics, config }
    }

    fn hasher(&self) -> &KeyHasher {
        self.authenticator.hasher()
    }

    /// Refreshes the `api_keys_active` gauge from the store.
    pub async fn refresh_metrics(&self) -> CoreResult<()> {
        let live = self.store.live_api_key_count(self.clock.now_ms()).await?;
        self.metrics.api_keys_active.set(i64::try_from(live).unwrap_or(i64::MAX));
        Ok(())
    }

    /// Creates a key in `tenant` (or kernel-wide) for `actor`.
    pub async fn create(&self, actor: &Principal, tenant: &TenantId, new: NewKey) -> CoreResult<IssuedKey> {
        validate_name(&new.name)?;
        if let Some(subject) = &new.subject {
            validate_subject(subject)?;
        }
        let key_tenant = if new.kernel_wide {
            if actor.tenant.is_some() || actor.role != Role::Admin {
                return Err(CoreError::Forbidden);
            }
            None
        } else {
            Some(tenant.clone())
        };
        if new.role == Role::Admin && actor.role != Role::Admin {
            return Err(CoreError::Forbidden);
        }
        let scopes = new.scopes.unwrap_or_else(|| actor.scopes.clone());
        check_scopes(actor, &scopes)?;
        let now_ms = self.clock.now_ms();
        let expires_at_ms = expiry(now_ms, new.expires_in_s)?;
        let secret = generate_api_key();
        let record = ApiKeyRecord {
            id: Uuid::now_v7(),
            name: new.name,
            hash: self.hasher().hash(&secret.secret).to_vec(),
            tenant: key_tenant,
            role: new.role,
            subject: new.subject,
            scopes,
            created_at_ms: now_ms,
            expires_at_ms,
            revoked_at_ms: None,
            last_used_at_ms: None,
            replaced_by: None,
            replaces: None,
        };
        let event = self.event("created", &record, actor, now_ms, serde_json::json!({}));
        self.store
            .insert_api_key(&record, &event, self.config.keys_per_tenant_max, now_ms)
            .await
            .map_err(store_error)?;
        self.after_change("created", &record, actor, serde_json::json!({})).await;
        Ok(IssuedKey { key: KeyView::of(record, now_ms), secret })
    }

    /// Keys of the scope's tenant, or (with `kernel_wide`, for a kernel-wide caller) the
    /// kernel-wide keys, by id, after `after`, at most `limit`.
    pub async fn list(
        &self,
        scope: &KeyScope,
        kernel_wide: bool,
        after: Option<Uuid>,
        limit: u32,
    ) -> CoreResult<Vec<KeyView>> {
        if kernel_wide && !scope.kernel_wide {
            return Err(CoreError::Forbidden);
        }
        let tenant = (!kernel_wide).then_some(&scope.tenant);
        let now_ms = self.clock.now_ms();
        let records = self.store.list_api_keys(tenant, after, limit).await?;
        Ok(records.into_iter().filter(|r| scope.holds(r)).map(|r| KeyView::of(r, now_ms)).collect())
    }

    /// One key in `scope`; keys outside it are not found.
    pub async fn show(&self, scope: &KeyScope, id: Uuid) -> CoreResult<KeyView> {
        Ok(KeyView::of(self.find(scope, id).await?, self.clock.now_ms()))
    }

    async fn find(&self, scope: &KeyScope, id: Uuid) -> CoreResult<ApiKeyRecord> {
        self.store.get_api_key(id).await?.filter(|r| scope.holds(r)).ok_or(CoreError::NotFound { what: "API key" })
    }

    /// Rotates key `id`: a new key with the same name, tenant, role, subject and scopes; the
    /// old one keeps working for `grace_s` seconds (default [`ROTATION_GRACE_S_DEFAULT`]) and
    /// then stops. Returns the new key and the old key's view.
    pub async fn rotate(
        &self,
        actor: &Principal,
        scope: &KeyScope,
        id: Uuid,
        grace_s: Option<u64>,
        expires_in_s: Option<u64>,
    ) -> CoreResult<(IssuedKey, KeyView)> {
        let grace_s = grace_s.unwrap_or(ROTATION_GRACE_S_DEFAULT);
        if grace_s > ROTATION_GRACE_S_MAX {
            return Err(CoreError::invalid(
                "invalid_grace",
                format!("grace_s must be at most {ROTATION_GRACE_S_MAX} (30 days)"),
            ));
        }
        let old = self.find(scope, id).await?;
        let now_ms = self.clock.now_ms();
        match old.status(now_ms) {
            KeyStatus::Active => {}
            KeyStatus::Grace => {
                return Err(CoreError::Conflict {
                    code: "already_rotated",
                    message: "the key was already rotated".into(),
                });
            }
            KeyStatus::Expired | KeyStatus::Revoked => {
                return Err(CoreError::Conflict {
                    code: "key_not_active",
                    message: "only an active key can be rotated".into(),
                });
            }
        }
        if old.role == Role::Admin && actor.role != Role::Admin {
            return Err(CoreError::Forbidden);
        }
        check_scopes(actor, &old.scopes)?;
        let expires_at_ms = match expires_in_s {
            Some(_) => expiry(now_ms, expires_in_s)?,
            None => old.expires_at_ms,
        };
        let secret = generate_api_key();
        let next = ApiKeyRecord {
            id: Uuid::now_v7(),
            name: old.name.clone(),
            hash: self.hasher().hash(&secret.secret).to_vec(),
            tenant: old.tenant.clone(),
            role: old.role,
            subject: old.subject.clone(),
            scopes: old.scopes.clone(),
            created_at_ms: now_ms,
            expires_at_ms,
            revoked_at_ms: None,
            last_used_at_ms: None,
            replaced_by: None,
            replaces: Some(old.id),
        };
        let grace_ends_ms = now_ms.saturating_add(i64::try_from(grace_s.saturating_mul(1000)).unwrap_or(i64::MAX));
        let detail = serde_json::json!({ "replaced": old.id, "grace_s": grace_s, "grace_ends_at_ms": grace_ends_ms });
        let event = self.event("rotated", &next, actor, now_ms, detail.clone());
        self.store.rotate_api_key(old.id, grace_ends_ms, &next, &event).await.map_err(store_error)?;
        self.metrics.api_key_rotations_total.inc();
        self.after_change("rotated", &next, actor, detail).await;
        let old_view = self.show(scope, old.id).await?;
        Ok((IssuedKey { key: KeyView::of(next, now_ms), secret }, old_view))
    }

    /// Revokes key `id` at once.
    pub async fn revoke(&self, actor: &Principal, scope: &KeyScope, id: Uuid) -> CoreResult<KeyView> {
        let record = self.find(scope, id).await?;
        if record.role == Role::Admin && actor.role != Role::Admin {
            return Err(CoreError::Forbidden);
        }
        let now_ms = self.clock.now_ms();
        let event = self.event("revoked", &record, actor, now_ms, serde_json::json!({}));
        if !self.store.revoke_api_key(id, now_ms, &event).await? {
            return Err(CoreError::Conflict { code: "already_revoked", message: "the key is already revoked".into() });
        }
        self.after_change("revoked", &record, actor, serde_json::json!({})).await;
        self.show(scope, id).await
    }

    fn event(
        &self,
        kind: &str,
        record: &ApiKeyRecord,
        actor: &Principal,
        now_ms: i64,
        detail: serde_json::Value,
    ) -> OutboxEvent {
        let payload = serde_json::json!({
            "event": format!("api_key.{kind}"),
            "key_id": record.id,
            "key_name": record.name,
            "tenant": record.tenant,
            "role": record.role,
            "actor": actor.credential.as_ref(),
            "actor_method": actor.method.as_str(),
            "at_ms": now_ms,
            "detail": detail,
        });
        OutboxEvent {
            tenant: record.tenant.clone().unwrap_or_else(TenantId::default_tenant),
            subject: format!("nops.keys.{kind}"),
            payload: serde_json::to_vec(&payload).unwrap_or_default(),
            source: "kernel/keys".into(),
        }
    }

    async fn after_change(
        &self,
        kind: &'static str,
        record: &ApiKeyRecord,
        actor: &Principal,
        detail: serde_json::Value,
    ) {
        self.authenticator.forget_cached();
        self.metrics.api_key_events_total.with_label_values(&[kind]).inc();
        tracing::info!(
            target: "nops::audit",
            event = format!("api_key.{kind}"),
            key_id = %record.id,
            key_name = %record.name,
            tenant = record.tenant.as_ref().map_or("", |t| t.as_str()),
            role = record.role.as_str(),
            scopes = %record.scopes.to_list(),
            actor = %actor.credential,
            actor_method = actor.method.as_str(),
            detail = %detail,
            "API key {kind}"
        );
        if let Err(err) = self.refresh_metrics().await {
            tracing::debug!(error = %err, "refreshing the key gauge failed");
        }
    }
}

fn check_scopes(actor: &Principal, wanted: &Scopes) -> CoreResult<()> {
    if actor.scopes.includes(wanted) {
        Ok(())
    } else {
        Err(CoreError::Invalid {
            code: "scope_escalation",
            message: "a key can only carry scopes its creator holds".into(),
        })
    }
}

fn expiry(now_ms: i64, expires_in_s: Option<u64>) -> CoreResult<Option<i64>> {
    match expires_in_s {
        None => Ok(None),
        Some(0) => Err(CoreError::invalid("invalid_expiry", "expires_in_s must be at least 1")),
        Some(s) if s > KEY_TTL_S_MAX => {
            Err(CoreError::invalid("invalid_expiry", format!("expires_in_s must be at most {KEY_TTL_S_MAX}")))
        }
        Some(s) => Ok(Some(now_ms.saturating_add(i64::try_from(s * 1000).unwrap_or(i64::MAX)))),
    }
}

fn validate_name(name: &str) -> CoreResult<()> {
    let ok = !name.is_empty()
        && name.len() <= KEY_NAME_BYTES_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b' '));
    if ok {
        Ok(())
    } else {
        Err(CoreError::invalid(
            "invalid_name",
            format!("a key name is 1 to {KEY_NAME_BYTES_MAX} bytes of letters, digits, spaces and `-_.`"),
        ))
    }
}

fn validate_subject(subject: &str) -> CoreResult<()> {
    let ok =
        !subject.is_empty() && subject.len() <= KEY_SUBJECT_BYTES_MAX && subject.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(CoreError::invalid(
            "invalid_subject",
            format!("a key subject is 1 to {KEY_SUBJECT_BYTES_MAX} printable ASCII bytes without spaces"),
        ))
    }
}
