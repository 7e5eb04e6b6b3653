//! Idempotency keys (`idempotency_keys`), shared by every kernel on one database.
//!
//! The claim is one `INSERT … ON CONFLICT DO UPDATE … WHERE … RETURNING` statement: the
//! primary key on (scope, key) lets exactly one execution insert a new key, and the conflict
//! branch takes a record over only when it expired, or when it is still in flight with the
//! same fingerprint past its lock (its kernel stopped). Any other conflict returns no row and
//! leaves the record as it was; the record is then read back for the caller. On PostgreSQL a
//! concurrent claimer waits for the winner's row lock and then sees its row; on SQLite the
//! single writer serialises them.
//!
//! Completing and releasing are conditional on the execution's token, so an execution whose
//! key was taken over changes nothing.

use async_trait::async_trait;
use nops_core::store::{
    ClaimOutcome, IdempotencyClaim, IdempotencyRecord, IdempotencyStore, IdempotentResponse, StoreError,
};
use uuid::Uuid;

use crate::{Pools, SqlStore};

/// Claims a key: `$1` scope, `$2` key, `$3` fingerprint, `$4` token, `$5` now, `$6` locked
/// until, `$7` expires at.
const CLAIM_SQL: &str = "INSERT INTO idempotency_keys \
     (scope, key, fingerprint, token, status, headers, body, created_at_ms, locked_until_ms, expires_at_ms) \
     VALUES ($1, $2, $3, $4, NULL, NULL, NULL, $5, $6, $7) \
     ON CONFLICT (scope, key) DO UPDATE \
     SET fingerprint = excluded.fingerprint, token = excluded.token, status = NULL, headers = NULL, body = NULL, \
         created_at_ms = excluded.created_at_ms, locked_until_ms = excluded.locked_until_ms, \
         expires_at_ms = excluded.expires_at_ms \
     WHERE idempotency_keys.expires_at_ms <= $5 \
        OR (idempotency_keys.status IS NULL AND idempotency_keys.locked_until_ms <= $5 \
            AND idempotency_keys.fingerprint = $3) \
     RETURNING token";

/// Claims retried when the conflicting record vanished before it could be read (released by
/// its owner meanwhile).
const CLAIM_TRIES_MAX: usize = 4;

/// An `idempotency_keys` row without its key columns.
#[derive(sqlx::FromRow)]
struct RecordRow {
    fingerprint: Vec<u8>,
    token: Uuid,
    status: Option<i32>,
    headers: Option<String>,
    body: Option<Vec<u8>>,
    locked_until_ms: i64,
    expires_at_ms: i64,
}

impl TryFrom<RecordRow> for IdempotencyRecord {
    type Error = StoreError;

    fn try_from(row: RecordRow) -> Result<Self, StoreError> {
        let corrupt =
            |what: &str, err: &dyn std::fmt::Display| StoreError::Corrupt(format!("idempotency_keys.{what}: {err}"));
        let response = match row.status {
            None => None,
            Some(status) => Some(IdempotentResponse {
                status: u16::try_from(status).map_err(|e| corrupt("status", &e))?,
                headers: match row.headers.as_deref() {
                    Some(text) => serde_json::from_str(text).map_err(|e| corrupt("headers", &e))?,
                    None => Vec::new(),
                },
                body: row.body.unwrap_or_default(),
            }),
        };
        Ok(IdempotencyRecord {
            fingerprint: row.fingerprint,
            token: row.token,
            locked_until_ms: row.locked_until_ms,
            expires_at_ms: row.expires_at_ms,
            response,
        })
    }
}

#[async_trait]
impl IdempotencyStore for SqlStore {
    async fn idempotency_claim(&self, claim: &IdempotencyClaim<'_>) -> Result<ClaimOutcome, StoreError> {
        for _ in 0..CLAIM_TRIES_MAX {
            let won: Option<Uuid> = self
                .retrying("idempotency_claim", || async {
                    with_pool!(self, write, |pool| {
                        sqlx::query_scalar::<_, Uuid>(CLAIM_SQL)
                            .bind(claim.scope)
                            .bind(claim.key)
                            .bind(claim.fingerprint)
                            .bind(claim.token)
                            .bind(claim.now_ms)
                            .bind(claim.locked_until_ms)
                            .bind(claim.expires_at_ms)
                            .fetch_optional(pool)
                            .await
                    })
                })
                .await?;
            if won == Some(claim.token) {
                return Ok(ClaimOutcome::Claimed);
            }
            // Read on the write pool: the conflicting row was just seen there.
            let row: Option<RecordRow> = self
                .retrying("idempotency_claim", || async {
                    with_pool!(self, write, |pool| {
                        sqlx::query_as::<_, RecordRow>(
                            "SELECT fingerprint, token, status, headers, body, locked_until_ms, expires_at_ms \
                             FROM idempotency_keys WHERE scope = $1 AND key = $2",
                        )
                        .bind(claim.scope)
                        .bind(claim.key)
                        .fetch_optional(pool)
                        .await
                    })
                })
                .await?;
            if let Some(row) = row {
                // A retried insert that had committed before its connection failed finds its
                // own row.
                if row.token == claim.token {
                    return Ok(ClaimOutcome::Claimed);
                }
                return Ok(ClaimOutcome::Existing(row.try_into()?));
            }
        }
        Err(StoreError::Conflict(format!("idempotency key claimed and released {CLAIM_TRIES_MAX} times in a row")))
    }

    async fn idempotency_complete(
        &self,
        scope: &str,
        key: &str,
        token: Uuid,
        response: &IdempotentResponse,
    ) -> Result<bool, StoreError> {
        let headers = serde_json::to_string(&response.headers)
            .map_err(|e| StoreError::Backend(format!("idempotency_complete: encoding headers: {e}")))?;
        let status = i32::from(response.status);
        self.retrying("idempotency_complete", || async {
            with_pool!(self, write, |pool| {
                sqlx::query(
                    "UPDATE idempotency_keys SET status = $1, headers = $2, body = $3 \
                     WHERE scope = $4 AND key = $5 AND token = $6 AND status IS NULL",
                )
                .bind(status)
                .bind(&headers)
                .bind(&response.body)
                .bind(scope)
                .bind(key)
                .bind(token)
                .execute(pool)
                .await
                .map(|done| done.rows_affected() == 1)
            })
        })
        .await
    }

    async fn idempotency_release(&self, scope: &str, key: &str, token: Uuid) -> Result<bool, StoreError> {
        self.retrying("idempotency_release", || async {
            with_pool!(self, write, |pool| {
                sqlx::query(
                    "DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND token = $3 AND status IS NULL",
                )
                .bind(scope)
                .bind(key)
                .bind(token)
                .execute(pool)
                .await
                .map(|done| done.rows_affected() == 1)
            })
        })
        .await
    }

    async fn idempotency_purge_expired(&self, now_ms: i64, limit: u32) -> Result<u64, StoreError> {
        self.retrying("idempotency_purge_expired", || async {
            with_pool!(self, write, |pool| {
                sqlx::query(
                    "DELETE FROM idempotency_keys WHERE (scope, key) IN (\
                         SELECT scope, key FROM idempotency_keys \
                         WHERE expires_at_ms <= $1 AND (status IS NOT NULL OR locked_until_ms <= $1) \
                         ORDER BY expires_at_ms LIMIT $2)",
                )
                .bind(now_ms)
                .bind(i64::from(limit))
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
            })
        })
        .await
    }
}
