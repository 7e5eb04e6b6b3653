//! The effects of a plugin call (a contract's storage writes, published events), applied in
//! one transaction.

use async_trait::async_trait;
use nops_core::store::{PluginCommit, PluginEffects, StoreError};

use crate::{Pools, SqlStore};

#[async_trait]
impl PluginCommit for SqlStore {
    async fn commit_plugin_effects(
        &self,
        namespace: &str,
        effects: &PluginEffects,
        keys_max: u32,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let within_limit = self
            .retrying("commit_plugin_effects", || async {
                with_pool!(self, write, |pool| {
                    let mut tx = pool.begin().await?;
                    for (key, value) in &effects.writes {
                        match value {
                            Some(value) => {
                                // The same rule as a single `kv_set`: a new key only while the
                                // namespace is under its limit.
                                let written = sqlx::query(
                                    "INSERT INTO plugin_kv (namespace, key, value, updated_at_ms) \
                                     SELECT $1, $2, $3, $4 \
                                     WHERE EXISTS (SELECT 1 FROM plugin_kv WHERE namespace = $1 AND key = $2) \
                                        OR (SELECT COUNT(*) FROM plugin_kv WHERE namespace = $1) < $5 \
                                     ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, \
                                     updated_at_ms = excluded.updated_at_ms",
                                )
                                .bind(namespace)
                                .bind(key)
                                .bind(value)
                                .bind(now_ms)
                                .bind(i64::from(keys_max))
                                .execute(&mut *tx)
                                .await?
                                .rows_affected();
                                if written == 0 {
                                    tx.rollback().await?;
                                    return Ok(false);
                                }
                            }
                            None => {
                                sqlx::query("DELETE FROM plugin_kv WHERE namespace = $1 AND key = $2")
                                    .bind(namespace)
                                    .bind(key)
                                    .execute(&mut *tx)
                                    .await?;
                            }
                        }
                    }
                    for event in &effects.events {
                        sqlx::query(
                            "INSERT INTO outbox (tenant, subject, payload, source, created_at_ms) \
                             VALUES ($1, $2, $3, $4, $5)",
                        )
                        .bind(event.tenant.as_str())
                        .bind(&event.subject)
                        .bind(&event.payload)
                        .bind(&event.source)
                        .bind(now_ms)
                        .execute(&mut *tx)
                        .await?;
                    }
                    tx.commit().await?;
                    Ok(true)
                })
            })
            .await?;
        if within_limit {
            Ok(())
        } else {
            Err(StoreError::LimitExceeded(format!("a plugin namespace holds at most {keys_max} keys")))
        }
    }
}
