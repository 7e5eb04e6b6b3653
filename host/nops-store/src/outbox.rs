//! The outbox rows the bus relay publishes (`outbox`, written in the transactions of the
//! changes themselves; see `nops_core::outbox`).

use async_trait::async_trait;
use nops_core::bus::EventIn;
use nops_core::outbox::{OutboxRow, OutboxStore};
use nops_core::store::{OutboxEvent, StoreError};

use crate::{Pools, SqlStore, parse_tenant};

/// An `outbox` row.
#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    event_id: Option<String>,
    tenant: String,
    subject: String,
    payload: Vec<u8>,
    source: String,
    created_at_ms: i64,
}

#[async_trait]
impl OutboxStore for SqlStore {
    async fn pending_outbox(&self, limit: u32) -> Result<Vec<OutboxRow>, StoreError> {
        let rows: Vec<Row> = self
            .retrying("pending_outbox", || async {
                with_pool!(self, write, |pool| {
                    sqlx::query_as(
                        "SELECT id, event_id, tenant, subject, payload, source, created_at_ms FROM outbox \
                         WHERE published_at_ms IS NULL ORDER BY id LIMIT $1",
                    )
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await
                })
            })
            .await?;
        rows.into_iter()
            .map(|r| {
                Ok(OutboxRow {
                    id: r.id,
                    event_id: r.event_id,
                    event: OutboxEvent {
                        tenant: parse_tenant(&r.tenant)?,
                        subject: r.subject,
                        payload: r.payload,
                        source: r.source,
                    },
                    created_at_ms: r.created_at_ms,
                })
            })
            .collect()
    }

    async fn mark_outbox_published(&self, ids: &[i64], at_ms: i64) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.retrying("mark_outbox_published", || async {
            with_pool!(self, write, |pool| {
                let mut q = sqlx::QueryBuilder::new("UPDATE outbox SET published_at_ms = ");
                q.push_bind(at_ms).push(" WHERE published_at_ms IS NULL AND id IN (");
                let mut list = q.separated(", ");
                for id in ids {
                    list.push_bind(*id);
                }
                q.push(")");
                q.build().execute(pool).await.map(|_| ())
            })
        })
        .await
    }

    async fn buffer_events(&self, events: &[EventIn]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        self.retrying("buffer_events", || async {
            with_pool!(self, write, |pool| {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO outbox (event_id, tenant, subject, payload, source, created_at_ms) ",
                );
                q.push_values(events, |mut row, e| {
                    row.push_bind(&e.id)
                        .push_bind(e.tenant.as_str())
                        .push_bind(&e.subject)
                        .push_bind(&e.payload)
                        .push_bind(&e.source)
                        .push_bind(e.time_ms);
                });
                q.build().execute(pool).await.map(|_| ())
            })
        })
        .await
    }

    async fn prune_outbox(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        self.retrying("prune_outbox", || async {
            with_pool!(self, write, |pool| {
                sqlx::query(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox \
                     WHERE published_at_ms IS NOT NULL AND published_at_ms < $1 ORDER BY id LIMIT $2)",
                )
                .bind(before_ms)
                .bind(i64::from(limit))
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
            })
        })
        .await
    }
}
