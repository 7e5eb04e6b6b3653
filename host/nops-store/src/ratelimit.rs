//! Rate limits shared by every kernel on one database: GCRA in one statement.
//!
//! The in-process limits use the `governor` crate; governor keeps its state in memory and has
//! no distributed backend, so the shared variant is written here by hand, with the same
//! algorithm (the generic cell rate algorithm, as governor implements it):
//!
//! - a key has a theoretical arrival time `tat` (absent = long past);
//! - with `T` the emission interval and `tau = T * (burst - 1)` the tolerance, a request at
//!   `now` is allowed when `now >= tat - tau`, and then `tat` becomes `max(tat, now) + T`;
//! - a refused request changes nothing.
//!
//! One `INSERT … ON CONFLICT DO UPDATE … WHERE … RETURNING` decides and advances the TAT
//! atomically on both SQLite and PostgreSQL: a new key is inserted already counted; an
//! existing key is updated only when allowed, and a refused request returns no row. Refused
//! requests therefore cost one statement too; their retry time is bounded instead of read back
//! (after a refusal `tat - now` lies in `(tau, tau + T]`, so the next request is allowed within
//! one emission interval).

use async_trait::async_trait;
use nops_core::store::{GcraOutcome, RateLimitStore, StoreError};

use crate::{Pools, SqlStore, store_error};

/// Decides and, when allowed, advances the TAT: `$1` key, `$2` now, `$3` emission interval,
/// `$4` tolerance. `CASE` rather than `MAX`/`GREATEST` so one text serves both databases.
const GCRA_SQL: &str = "INSERT INTO rate_limits (key, tat_ms) VALUES ($1, $2 + $3) \
     ON CONFLICT (key) DO UPDATE \
     SET tat_ms = (CASE WHEN rate_limits.tat_ms > $2 THEN rate_limits.tat_ms ELSE $2 END) + $3 \
     WHERE rate_limits.tat_ms - $4 <= $2 \
     RETURNING tat_ms";

#[async_trait]
impl RateLimitStore for SqlStore {
    async fn gcra_check(
        &self,
        key: &str,
        emission_interval_ms: i64,
        burst: u32,
        now_ms: i64,
    ) -> Result<GcraOutcome, StoreError> {
        let t = emission_interval_ms.max(1);
        let tau = t.saturating_mul(i64::from(burst.max(1) - 1));
        // One attempt, no retries: the caller is a request waiting at the edge, and it decides
        // what a failure means (`on_store_error`).
        let tat: Option<i64> = with_pool!(self, write, |pool| {
            sqlx::query_scalar::<_, i64>(GCRA_SQL).bind(key).bind(now_ms).bind(t).bind(tau).fetch_optional(pool).await
        })
        .map_err(|err| store_error("gcra_check", err))?;
        Ok(outcome(tat, t, tau, burst, now_ms))
    }

    async fn gcra_purge_expired(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.retrying("gcra_purge_expired", || async {
            with_pool!(self, write, |pool| {
                sqlx::query("DELETE FROM rate_limits WHERE tat_ms < $1")
                    .bind(now_ms)
                    .execute(pool)
                    .await
                    .map(|done| done.rows_affected())
            })
        })
        .await
    }
}

/// The outcome from the TAT the statement returned (`None`: refused).
fn outcome(tat: Option<i64>, t: i64, tau: i64, burst: u32, now_ms: i64) -> GcraOutcome {
    match tat {
        Some(tat) => {
            let left = (now_ms + tau + t - tat).max(0) / t;
            GcraOutcome {
                allowed: true,
                remaining: u32::try_from(left).unwrap_or(u32::MAX).min(burst.saturating_sub(1)),
                retry_after_ms: 0,
                reset_ms: (tat - now_ms).max(0),
            }
        }
        None => GcraOutcome { allowed: false, remaining: 0, retry_after_ms: t, reset_ms: tau + t },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outcome_follows_the_tat() {
        // burst 3, T = 100: a fresh key leaves 2.
        let first = outcome(Some(1_100), 100, 200, 3, 1_000);
        assert_eq!(first, GcraOutcome { allowed: true, remaining: 2, retry_after_ms: 0, reset_ms: 100 });
        let third = outcome(Some(1_300), 100, 200, 3, 1_000);
        assert_eq!(third.remaining, 0);
        assert_eq!(third.reset_ms, 300);
        let refused = outcome(None, 100, 200, 3, 1_000);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ms, 100);
    }
}
