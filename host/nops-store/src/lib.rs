//! SQLite and PostgreSQL adapters of the kernel's store traits.
//!
//! One [`SqlStore`] serves both databases with the same SQL text: each operation is written
//! once and expanded for each backend's concrete pool by the `with_pool!` macro, so the two
//! adapters cannot drift apart. SQLite gets a single-connection write pool (SQLite serialises
//! writers anyway; one writer avoids `SQLITE_BUSY` upgrades) beside a read pool; PostgreSQL
//! gets one bounded pool. Transient failures (lost connections, pool timeouts, serialization
//! failures, `SQLITE_BUSY`) are retried with exponential backoff and full jitter.

use std::collections::BTreeMap;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use nops_core::agent::{Agent, AgentEvent, AgentEventKind, AgentId, AgentStatus, Capability, Load};
use nops_core::auth::{ApiKeyRecord, Role, Scopes};
use nops_core::plugin::{
    ChainAction, ChainEntry, Manifest, PluginChange, PluginKind, PluginState, PluginVersion, ShadowDiff,
};
use nops_core::store::{
    AgentFilter, AgentLiveSeed, AgentStore, HeartbeatRecord, KeyStore, OutboxEvent, PluginKv, PluginStore, PoolStats,
    StatusChange, StoreError, StoreHealth,
};
use nops_core::tenant::TenantId;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::types::Json;
use sqlx::{ConnectOptions, QueryBuilder};
use uuid::Uuid;

/// Settings of the store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `sqlite://path` or `postgres://…`.
    pub database_url: String,
    /// Most open connections (PostgreSQL; SQLite's read pool).
    pub pool_connections_max: u32,
    /// How long a caller waits for a free connection.
    pub pool_acquire_timeout_ms: u64,
    /// Attempts to reach the database at start before giving up.
    pub connect_attempts_max: usize,
    /// Longest wait between two start attempts.
    pub connect_backoff_ms_max: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            database_url: "sqlite://.nops/nops.db".into(),
            pool_connections_max: 16,
            pool_acquire_timeout_ms: 5_000,
            connect_attempts_max: 8,
            connect_backoff_ms_max: 2_000,
        }
    }
}

/// Attempts per store operation on transient errors (the first try included).
const OPERATION_ATTEMPTS_MAX: usize = 4;
/// First backoff of an operation retry.
const OPERATION_BACKOFF_MS_MIN: u64 = 10;
/// Longest backoff of an operation retry.
const OPERATION_BACKOFF_MS_MAX: u64 = 500;
/// How long SQLite waits on a locked database before reporting `SQLITE_BUSY`.
const SQLITE_BUSY_TIMEOUT_MS: u64 = 5_000;
/// Most SQLite reader connections: readers are blocking threads, more than a few per core
/// only add page caches (each connection has its own).
const SQLITE_READERS_MAX: u32 = 4;
/// Rows per multi-row statement when a batch is written to SQLite (bind-parameter budget).
const SQLITE_ROWS_PER_STATEMENT_MAX: usize = 200;
/// How often the checkpointer copies SQLite's write-ahead log into the database, from a
/// connection of its own. A checkpoint syncs the log, then the database: done by the one
/// writer (SQLite's default), every write waits for those syncs. At 1,000 tasks/s the log
/// grows by about 12,000 pages a second, and checkpoints at every 200 pages kept the writer
/// in `fsync` 15 % of the time (about 3.5 ms a checkpoint, 60 a second); with the syncs on
/// the checkpointer's connection, the end-to-end p50 halved (`docs/benchmarks.md`).
const SQLITE_CHECKPOINT_INTERVAL_MS: u64 = 50;
/// Pages SQLite's write-ahead log grows to before the writer checkpoints it itself: only
/// when the checkpointer falls behind (or stopped). It bounds the log at about 16 MiB.
const SQLITE_WAL_AUTOCHECKPOINT_PAGES: u32 = 4_000;

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The URL names no supported database.
    #[error("unsupported database URL (expected sqlite://… or postgres://…): {0}")]
    UnsupportedUrl(String),
    /// The URL could not be parsed.
    #[error("invalid database URL {url}: {source}")]
    InvalidUrl {
        /// The URL with any password removed.
        url: String,
        /// Why.
        source: sqlx::Error,
    },
    /// The database stayed unreachable.
    #[error("cannot reach the database at {url} after {attempts} attempts: {source}")]
    Unreachable {
        /// The URL with any password removed.
        url: String,
        /// Attempts made.
        attempts: usize,
        /// The last error.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("migrating {url} failed: {source}")]
    Migrate {
        /// The URL with any password removed.
        url: String,
        /// Why.
        source: sqlx::migrate::MigrateError,
    },
}

#[derive(Clone)]
enum Pools {
    Sqlite {
        write: SqlitePool,
        read: SqlitePool,
        /// The checkpointer's connection (none for an in-memory database).
        checkpoint: Option<SqlitePool>,
    },
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the write (or read) pool of whichever backend is open.
/// The body is compiled once per backend, against that backend's concrete types.
macro_rules! with_pool {
    ($self:ident, write, |$pool:ident| $body:expr) => {
        match &$self.pools {
            Pools::Sqlite { write: $pool, .. } => $body,
            Pools::Postgres($pool) => $body,
        }
    };
    ($self:ident, read, |$pool:ident| $body:expr) => {
        match &$self.pools {
            Pools::Sqlite { read: $pool, .. } => $body,
            Pools::Postgres($pool) => $body,
        }
    };
}

/// The kernel's store over SQLite or PostgreSQL.
#[derive(Clone)]
pub struct SqlStore {
    pools: Pools,
    pool_connections_max: u32,
    /// The group committer of task writes (SQLite), shared by every clone.
    task_writes: std::sync::Arc<tasks::TaskWriteQueue>,
    /// Stops the checkpointer (SQLite) when the last clone is dropped.
    _checkpoints: Option<std::sync::Arc<tokio::sync::watch::Sender<()>>>,
}

impl std::fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore").field("backend", &self.backend()).finish()
    }
}

/// `url` without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

impl SqlStore {
    /// Opens (creating if needed, for SQLite) and migrates the database at `config.database_url`,
    /// retrying with backoff while it is unreachable.
    pub async fn open(config: &StoreConfig) -> Result<Self, OpenError> {
        let url = config.database_url.as_str();
        let shown = redact_url(url);
        let acquire = Duration::from_millis(config.pool_acquire_timeout_ms);
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_millis(config.connect_backoff_ms_max))
            .with_max_times(config.connect_attempts_max.saturating_sub(1))
            .with_jitter();
        let notify = |err: &sqlx::Error, wait: Duration| {
            tracing::warn!(url = %shown, error = %err, retry_in_ms = wait.as_millis() as u64, "database unreachable; retrying");
        };
        let unreachable =
            |source| OpenError::Unreachable { url: shown.clone(), attempts: config.connect_attempts_max, source };
        let store = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|source| OpenError::InvalidUrl { url: shown.clone(), source })?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // In WAL mode NORMAL survives a crash of the process (not of the machine).
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_millis(SQLITE_BUSY_TIMEOUT_MS))
                .pragma("wal_autocheckpoint", SQLITE_WAL_AUTOCHECKPOINT_PAGES.to_string())
                .foreign_keys(true)
                .disable_statement_logging();
            if let Some(dir) = options.get_filename().parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir).map_err(|e| unreachable(sqlx::Error::Io(e)))?;
            }
            let connect = |max: u32| {
                let options = options.clone();
                // No ping before each acquire: a connection to a local file does not go stale,
                // and the ping is one more round trip to the connection's thread per statement.
                move || {
                    SqlitePoolOptions::new()
                        .max_connections(max)
                        .acquire_timeout(acquire)
                        .test_before_acquire(false)
                        .connect_with(options.clone())
                }
            };
            let write = connect(1).retry(backoff).notify(notify).await.map_err(unreachable)?;
            // SQLite has no advisory locks: two kernels opening one file at once would both
            // apply migration 1. An exclusive lock on a file beside the database serialises them.
            let filename = options.get_filename();
            let on_disk = !filename.as_os_str().is_empty() && filename != std::path::Path::new(":memory:");
            let migration_lock = if !on_disk {
                None
            } else {
                let mut lock_path = filename.as_os_str().to_owned();
                lock_path.push(".migrate-lock");
                let lock_file = tokio::task::spawn_blocking(move || {
                    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path)?;
                    file.lock()?;
                    Ok::<_, std::io::Error>(file)
                })
                .await
                .map_err(|e| unreachable(sqlx::Error::Io(std::io::Error::other(e))))?
                .map_err(|e| unreachable(sqlx::Error::Io(e)))?;
                Some(lock_file)
            };
            sqlx::migrate!("../../migrations/sqlite")
                .run(&write)
                .await
                .map_err(|source| OpenError::Migrate { url: shown.clone(), source })?;
            drop(migration_lock);
            let readers = config.pool_connections_max.clamp(1, SQLITE_READERS_MAX);
            let read = connect(readers).retry(backoff).notify(notify).await.map_err(unreachable)?;
            let (checkpoint, checkpoints) = if !on_disk {
                (None, None)
            } else {
                let pool = connect(1).retry(backoff).notify(notify).await.map_err(unreachable)?;
                let (stop, stopped) = tokio::sync::watch::channel(());
                tokio::spawn(run_checkpoints(pool.clone(), stopped));
                (Some(pool), Some(std::sync::Arc::new(stop)))
            };
            Self {
                pools: Pools::Sqlite { write, read, checkpoint },
                pool_connections_max: readers + 1,
                task_writes: std::sync::Arc::default(),
                _checkpoints: checkpoints,
            }
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let options = PgConnectOptions::from_str(url)
                .map_err(|source| OpenError::InvalidUrl { url: shown.clone(), source })?
                .disable_statement_logging();
            let pool = (|| {
                PgPoolOptions::new()
                    .max_connections(config.pool_connections_max.max(1))
                    .acquire_timeout(acquire)
                    .connect_with(options.clone())
            })
            .retry(backoff)
            .notify(notify)
            .await
            .map_err(unreachable)?;
            // Migrations take an advisory lock, so replicas starting together apply them once.
            sqlx::migrate!("../../migrations/postgres")
                .run(&pool)
                .await
                .map_err(|source| OpenError::Migrate { url: shown.clone(), source })?;
            Self {
                pools: Pools::Postgres(pool),
                pool_connections_max: config.pool_connections_max.max(1),
                task_writes: std::sync::Arc::default(),
                _checkpoints: None,
            }
        } else {
            return Err(OpenError::UnsupportedUrl(shown));
        };
        Ok(store)
    }

    /// Closes every connection.
    pub async fn close(&self) {
        match &self.pools {
            Pools::Sqlite { write, read, checkpoint } => {
                if let Some(checkpoint) = checkpoint {
                    checkpoint.close().await;
                }
                read.close().await;
                write.close().await;
            }
            Pools::Postgres(pool) => pool.close().await,
        }
    }

    /// Runs `op`, retrying transient failures with exponential backoff and full jitter.
    async fn retrying<T, F, Fut>(&self, what: &'static str, op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        retry_transient(what, op).await.map_err(|err| store_error(what, err))
    }
}

/// Checkpoints SQLite's write-ahead log on `pool`'s connection every
/// [`SQLITE_CHECKPOINT_INTERVAL_MS`], until `stop`'s sender is dropped or the pool closed. A
/// passive checkpoint copies what no reader still needs and never blocks the writer; the log
/// restarts from its beginning at the first write after a complete one.
async fn run_checkpoints(pool: SqlitePool, mut stop: tokio::sync::watch::Receiver<()>) {
    let mut tick = tokio::time::interval(Duration::from_millis(SQLITE_CHECKPOINT_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Logged when checkpoints start and stop failing, not every tick.
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if pool.is_closed() {
                    break;
                }
                match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
                    // The writer checkpoints past SQLITE_WAL_AUTOCHECKPOINT_PAGES meanwhile.
                    Err(err) if !failing => {
                        failing = true;
                        tracing::warn!(error = %err, "checkpointing the SQLite log failed; retrying");
                    }
                    Ok(_) if failing => {
                        failing = false;
                        tracing::info!("checkpointing the SQLite log works again");
                    }
                    _ => {}
                }
            }
            _ = stop.changed() => break,
        }
    }
    pool.close().await;
}

/// Runs `op`, retrying transient failures (lost connections, lock timeouts, serialization
/// failures) with exponential backoff and full jitter; returns the last error as it is.
pub(crate) async fn retry_transient<T, F, Fut>(what: &'static str, op: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(OPERATION_BACKOFF_MS_MIN))
        .with_max_delay(Duration::from_millis(OPERATION_BACKOFF_MS_MAX))
        .with_max_times(OPERATION_ATTEMPTS_MAX - 1)
        .with_jitter();
    op.retry(backoff)
        .when(is_transient)
        .notify(|err, wait| {
            tracing::warn!(op = what, error = %err, retry_in_ms = wait.as_millis() as u64, "transient database error; retrying");
        })
        .await
}

/// Errors worth retrying: the connection, the pool, lock contention, serialization failures.
fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            // PostgreSQL: serialization_failure, deadlock_detected, admin_shutdown,
            // cannot_connect_now, connection exceptions (class 08).
            // SQLite: SQLITE_BUSY (5), SQLITE_LOCKED (6) and their extended codes.
            matches!(code, "40001" | "40P01" | "57P01" | "57P03" | "5" | "6" | "261" | "262" | "517")
                || code.starts_with("08")
        }
        _ => false,
    }
}

fn store_error(what: &'static str, err: sqlx::Error) -> StoreError {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::UniqueViolation(db.message().to_string()),
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StoreError::Corrupt(format!("{what}: {err}")),
        _ => StoreError::Backend(format!("{what}: {err}")),
    }
}

/// An `agents` row.
#[derive(sqlx::FromRow)]
struct AgentRow {
    id: Uuid,
    tenant: String,
    name: String,
    endpoint: Option<String>,
    labels: Json<BTreeMap<String, String>>,
    capabilities: Json<Vec<Capability>>,
    status: String,
    created_at_ms: i64,
    updated_at_ms: i64,
    last_heartbeat_at_ms: Option<i64>,
    load: Option<Json<Load>>,
    revision: i64,
}

impl TryFrom<AgentRow> for Agent {
    type Error = StoreError;

    fn try_from(row: AgentRow) -> Result<Self, StoreError> {
        Ok(Agent {
            id: AgentId(row.id),
            tenant: parse_tenant(&row.tenant)?,
            name: row.name,
            endpoint: row.endpoint,
            labels: row.labels.0,
            capabilities: row.capabilities.0,
            status: parse_status(&row.status)?,
            created_at_ms: row.created_at_ms,
            updated_at_ms: row.updated_at_ms,
            last_heartbeat_at_ms: row.last_heartbeat_at_ms,
            load: row.load.map(|j| j.0),
            revision: row.revision,
        })
    }
}

#[derive(sqlx::FromRow)]
struct SeedRow {
    id: Uuid,
    tenant: String,
    status: String,
    last_seen_ms: i64,
}

impl TryFrom<SeedRow> for AgentLiveSeed {
    type Error = StoreError;

    fn try_from(row: SeedRow) -> Result<Self, StoreError> {
        Ok(AgentLiveSeed {
            id: AgentId(row.id),
            tenant: parse_tenant(&row.tenant)?,
            status: parse_status(&row.status)?,
            last_seen_ms: row.last_seen_ms,
        })
    }
}

#[derive(sqlx::FromRow)]
struct EventRow {
    seq: i64,
    tenant: String,
    agent_id: Uuid,
    kind: String,
    from_status: Option<String>,
    to_status: Option<String>,
    at_ms: i64,
}

impl TryFrom<EventRow> for AgentEvent {
    type Error = StoreError;

    fn try_from(row: EventRow) -> Result<Self, StoreError> {
        Ok(AgentEvent {
            seq: row.seq,
            tenant: parse_tenant(&row.tenant)?,
            agent_id: AgentId(row.agent_id),
            kind: AgentEventKind::from_str(&row.kind).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            from_status: row.from_status.as_deref().map(parse_status).transpose()?,
            to_status: row.to_status.as_deref().map(parse_status).transpose()?,
            at_ms: row.at_ms,
        })
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    name: String,
    hash: Vec<u8>,
    tenant: Option<String>,
    role: String,
    subject: Option<String>,
    scopes: String,
    created_at_ms: i64,
    expires_at_ms: Option<i64>,
    revoked_at_ms: Option<i64>,
    last_used_at_ms: Option<i64>,
    replaced_by: Option<Uuid>,
    replaces: Option<Uuid>,
}

const KEY_COLUMNS: &str = "id, name, hash, tenant, role, subject, scopes, created_at_ms, expires_at_ms, \
                           revoked_at_ms, last_used_at_ms, replaced_by, replaces";

impl TryFrom<KeyRow> for ApiKeyRecord {
    type Error = StoreError;

    fn try_from(row: KeyRow) -> Result<Self, StoreError> {
        Ok(ApiKeyRecord {
            id: row.id,
            name: row.name,
            hash: row.hash,
            tenant: row.tenant.as_deref().map(parse_tenant).transpose()?,
            role: Role::parse(&row.role).ok_or_else(|| StoreError::Corrupt(format!("unknown role {}", row.role)))?,
            subject: row.subject,
            scopes: Scopes::parse_list(&row.scopes).map_err(|e| StoreError::Corrupt(format!("key scopes: {e}")))?,
            created_at_ms: row.created_at_ms,
            expires_at_ms: row.expires_at_ms,
            revoked_at_ms: row.revoked_at_ms,
            last_used_at_ms: row.last_used_at_ms,
            replaced_by: row.replaced_by,
            replaces: row.replaces,
        })
    }
}

/// Inserts a key row through an executor (a macro because `with_pool!` hands out a different
/// pool type per database).
macro_rules! insert_key_row {
    ($executor:expr, $record:expr) => {
        sqlx::query(
            "INSERT INTO api_keys (id, name, hash, tenant, role, subject, scopes, created_at_ms, \
             expires_at_ms, revoked_at_ms, last_used_at_ms, replaced_by, replaces) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind($record.id)
        .bind(&$record.name)
        .bind(&$record.hash)
        .bind($record.tenant.as_ref().map(TenantId::as_str))
        .bind($record.role.as_str())
        .bind($record.subject.as_deref())
        .bind($record.scopes.to_list())
        .bind($record.created_at_ms)
        .bind($record.expires_at_ms)
        .bind($record.revoked_at_ms)
        .bind($record.last_used_at_ms)
        .bind($record.replaced_by)
        .bind($record.replaces)
        .execute($executor)
        .await
    };
}

/// Writes one outbox row inside a transaction.
macro_rules! insert_outbox {
    ($tx:expr, $event:expr, $now_ms:expr) => {
        sqlx::query("INSERT INTO outbox (tenant, subject, payload, source, created_at_ms) VALUES ($1, $2, $3, $4, $5)")
            .bind($event.tenant.as_str())
            .bind(&$event.subject)
            .bind(&$event.payload)
            .bind(&$event.source)
            .bind($now_ms)
            .execute(&mut *$tx)
            .await
    };
}

fn parse_tenant(s: &str) -> Result<TenantId, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt(format!("invalid tenant {s:?}")))
}

fn parse_status(s: &str) -> Result<AgentStatus, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt(format!("invalid status {s:?}")))
}

const AGENT_COLUMNS: &str = "id, tenant, name, endpoint, labels, capabilities, status, created_at_ms, \
     updated_at_ms, last_heartbeat_at_ms, load, revision";
const SEED_COLUMNS: &str = "id, tenant, status, COALESCE(last_heartbeat_at_ms, created_at_ms) AS last_seen_ms";
const EVENT_COLUMNS: &str = "seq, tenant, agent_id, kind, from_status, to_status, at_ms";
const INSERT_EVENT: &str = "INSERT INTO agent_events (tenant, agent_id, kind, from_status, to_status, at_ms) \
     VALUES ($1, $2, $3, $4, $5, $6) RETURNING seq";

/// Inserts `$event` within transaction `$tx`, with its outbox row (subject
/// `agents.<kind>`, for the bus relay), and evaluates to its `seq`.
macro_rules! insert_event {
    ($tx:expr, $event:expr) => {
        async {
            let seq = sqlx::query_scalar::<_, i64>(INSERT_EVENT)
                .bind($event.tenant.as_str())
                .bind($event.agent_id.0)
                .bind($event.kind.as_str())
                .bind($event.from_status.map(AgentStatus::as_str))
                .bind($event.to_status.map(AgentStatus::as_str))
                .bind($event.at_ms)
                .fetch_one(&mut *$tx)
                .await?;
            let payload = serde_json::json!({
                "seq": seq,
                "agent_id": $event.agent_id.0,
                "kind": $event.kind.as_str(),
                "from_status": $event.from_status.map(AgentStatus::as_str),
                "to_status": $event.to_status.map(AgentStatus::as_str),
                "at_ms": $event.at_ms,
            });
            let outbox = OutboxEvent {
                tenant: $event.tenant.clone(),
                subject: format!("nops.agents.{}", $event.kind.as_str()),
                payload: payload.to_string().into_bytes(),
                source: "kernel/registry".to_string(),
            };
            insert_outbox!($tx, outbox, $event.at_ms)?;
            Ok::<i64, sqlx::Error>(seq)
        }
        .await
    };
}

/// Writes the capability and label index rows of a new `$agent` within transaction `$tx`.
macro_rules! write_agent_index {
    ($tx:expr, $agent:expr, $DB:ty) => {{
        if !$agent.capabilities.is_empty() {
            let mut q = QueryBuilder::<$DB>::new("INSERT INTO agent_capabilities (agent_id, tenant, name, version) ");
            q.push_values(&$agent.capabilities, |mut row, cap| {
                row.push_bind($agent.id.0)
                    .push_bind($agent.tenant.as_str())
                    .push_bind(cap.name.as_str())
                    .push_bind(cap.version.to_string());
            });
            q.build().execute(&mut *$tx).await?;
        }
        if !$agent.labels.is_empty() {
            let mut q = QueryBuilder::<$DB>::new("INSERT INTO agent_labels (agent_id, tenant, key, value) ");
            q.push_values(&$agent.labels, |mut row, (key, value)| {
                row.push_bind($agent.id.0)
                    .push_bind($agent.tenant.as_str())
                    .push_bind(key.as_str())
                    .push_bind(value.as_str());
            });
            q.build().execute(&mut *$tx).await?;
        }
    }};
}

/// Builds the listing query for `$filter` over database `$DB`.
macro_rules! list_query {
    ($filter:expr, $limit:expr, $DB:ty) => {{
        let filter: &AgentFilter = $filter;
        let mut q = QueryBuilder::<$DB>::new(format!("SELECT {AGENT_COLUMNS} FROM agents a WHERE 1 = 1"));
        if let Some(tenant) = &filter.tenant {
            q.push(" AND a.tenant = ").push_bind(tenant.as_str());
        }
        if let Some(status) = filter.status {
            q.push(" AND a.status = ").push_bind(status.as_str());
        }
        if let Some(after) = filter.after {
            q.push(" AND a.id > ").push_bind(after.0);
        }
        if let Some(capability) = &filter.capability {
            q.push(" AND a.id IN (SELECT c.agent_id FROM agent_capabilities c WHERE c.name = ")
                .push_bind(capability.clone());
            if let Some(tenant) = &filter.tenant {
                q.push(" AND c.tenant = ").push_bind(tenant.as_str());
            }
            q.push(")");
        }
        for (key, value) in &filter.labels {
            q.push(" AND a.id IN (SELECT l.agent_id FROM agent_labels l WHERE l.key = ")
                .push_bind(key.clone())
                .push(" AND l.value = ")
                .push_bind(value.clone());
            if let Some(tenant) = &filter.tenant {
                q.push(" AND l.tenant = ").push_bind(tenant.as_str());
            }
            q.push(")");
        }
        q.push(" ORDER BY a.id LIMIT ").push_bind(i64::from($limit));
        q
    }};
}

/// Builds the capability-version scan for `$filter` over database `$DB`.
macro_rules! capability_versions_query {
    ($filter:expr, $capability:expr, $limit:expr, $DB:ty) => {{
        let filter: &AgentFilter = $filter;
        let mut q = QueryBuilder::<$DB>::new("SELECT c.agent_id, c.version FROM agent_capabilities c");
        if filter.status.is_some() {
            q.push(" JOIN agents a ON a.id = c.agent_id");
        }
        q.push(" WHERE c.name = ").push_bind($capability.to_string());
        if let Some(tenant) = &filter.tenant {
            q.push(" AND c.tenant = ").push_bind(tenant.as_str());
        }
        if let Some(status) = filter.status {
            q.push(" AND a.status = ").push_bind(status.as_str());
        }
        if let Some(after) = filter.after {
            q.push(" AND c.agent_id > ").push_bind(after.0);
        }
        for (key, value) in &filter.labels {
            q.push(" AND c.agent_id IN (SELECT l.agent_id FROM agent_labels l WHERE l.key = ")
                .push_bind(key.clone())
                .push(" AND l.value = ")
                .push_bind(value.clone())
                .push(")");
        }
        q.push(" ORDER BY c.agent_id LIMIT ").push_bind(i64::from($limit));
        q
    }};
}

/// Builds the fetch of `$ids` in `$tenant` over database `$DB`.
macro_rules! agents_by_ids_query {
    ($tenant:expr, $ids:expr, $DB:ty) => {{
        let mut q = QueryBuilder::<$DB>::new(format!("SELECT {AGENT_COLUMNS} FROM agents WHERE tenant = "));
        q.push_bind($tenant.as_str()).push(" AND id IN (");
        let mut list = q.separated(", ");
        for id in $ids {
            list.push_bind(id.0);
        }
        q.push(") ORDER BY id");
        q
    }};
}

#[async_trait]
impl AgentStore for SqlStore {
    async fn insert_agent(&self, agent: &Agent, event: &AgentEvent) -> Result<(), StoreError> {
        self.retrying("insert_agent", || async {
            with_pool!(self, write, |pool| {
                let mut tx = pool.begin().await?;
                sqlx::query(
                    "INSERT INTO agents (id, tenant, name, endpoint, labels, capabilities, status, created_at_ms, \
                     updated_at_ms, last_heartbeat_at_ms, load, revision) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                )
                .bind(agent.id.0)
                .bind(agent.tenant.as_str())
                .bind(&agent.name)
                .bind(agent.endpoint.as_deref())
                .bind(Json(&agent.labels))
                .bind(Json(&agent.capabilities))
                .bind(agent.status.as_str())
                .bind(agent.created_at_ms)
                .bind(agent.updated_at_ms)
                .bind(agent.last_heartbeat_at_ms)
                .bind(agent.load.as_ref().map(Json))
                .bind(agent.revision)
                .execute(&mut *tx)
                .await?;
                write_agent_index!(tx, agent, _);
                insert_event!(tx, event)?;
                tx.commit().await
            })
        })
        .await
    }

    async fn get_agent(&self, tenant: &TenantId, id: AgentId) -> Result<Option<Agent>, StoreError> {
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1 AND tenant = $2");
        let row = self
            .retrying("get_agent", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_as::<_, AgentRow>(&sql).bind(id.0).bind(tenant.as_str()).fetch_optional(pool).await
                })
            })
            .await?;
        row.map(Agent::try_from).transpose()
    }

    async fn get_live_seed(&self, id: AgentId) -> Result<Option<AgentLiveSeed>, StoreError> {
        let sql = format!("SELECT {SEED_COLUMNS} FROM agents WHERE id = $1");
        let row = self
            .retrying("get_live_seed", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_as::<_, SeedRow>(&sql).bind(id.0).fetch_optional(pool).await
                })
            })
            .await?;
        row.map(AgentLiveSeed::try_from).transpose()
    }

    async fn load_live_seeds(&self) -> Result<Vec<AgentLiveSeed>, StoreError> {
        let sql = format!("SELECT {SEED_COLUMNS} FROM agents ORDER BY id");
        let rows = self
            .retrying("load_live_seeds", || async {
                with_pool!(self, read, |pool| sqlx::query_as::<_, SeedRow>(&sql).fetch_all(pool).await)
            })
            .await?;
        rows.into_iter().map(AgentLiveSeed::try_from).collect()
    }

    async fn update_agent(
        &self,
        agent: &Agent,
        expected_revision: i64,
        event: &AgentEvent,
    ) -> Result<bool, StoreError> {
        self.retrying("update_agent", || async {
            with_pool!(self, write, |pool| {
                let mut tx = pool.begin().await?;
                let updated = sqlx::query(
                    "UPDATE agents SET name = $1, endpoint = $2, labels = $3, capabilities = $4, updated_at_ms = $5, \
                     revision = $6 WHERE id = $7 AND tenant = $8 AND revision = $9",
                )
                .bind(&agent.name)
                .bind(agent.endpoint.as_deref())
                .bind(Json(&agent.labels))
                .bind(Json(&agent.capabilities))
                .bind(agent.updated_at_ms)
                .bind(agent.revision)
                .bind(agent.id.0)
                .bind(agent.tenant.as_str())
                .bind(expected_revision)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if updated == 0 {
                    return Ok(false);
                }
                sqlx::query("DELETE FROM agent_capabilities WHERE agent_id = $1")
                    .bind(agent.id.0)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM agent_labels WHERE agent_id = $1").bind(agent.id.0).execute(&mut *tx).await?;
                write_agent_index!(tx, agent, _);
                insert_event!(tx, event)?;
                tx.commit().await?;
                Ok(true)
            })
        })
        .await
    }

    async fn delete_agent(&self, tenant: &TenantId, id: AgentId, event: &AgentEvent) -> Result<bool, StoreError> {
        self.retrying("delete_agent", || async {
            with_pool!(self, write, |pool| {
                let mut tx = pool.begin().await?;
                let deleted = sqlx::query("DELETE FROM agents WHERE id = $1 AND tenant = $2")
                    .bind(id.0)
                    .bind(tenant.as_str())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if deleted == 0 {
                    return Ok(false);
                }
                insert_event!(tx, event)?;
                tx.commit().await?;
                Ok(true)
            })
        })
        .await
    }

    async fn list_agents(&self, filter: &AgentFilter, limit: u32) -> Result<Vec<Agent>, StoreError> {
        let rows = self
            .retrying("list_agents", || async {
                match &self.pools {
                    Pools::Sqlite { read, .. } => {
                        list_query!(filter, limit, sqlx::Sqlite).build_query_as::<AgentRow>().fetch_all(read).await
                    }
                    Pools::Postgres(pool) => {
                        list_query!(filter, limit, sqlx::Postgres).build_query_as::<AgentRow>().fetch_all(pool).await
                    }
                }
            })
            .await?;
        rows.into_iter().map(Agent::try_from).collect()
    }

    async fn list_capability_versions(
        &self,
        filter: &AgentFilter,
        limit: u32,
    ) -> Result<Vec<(AgentId, String)>, StoreError> {
        let Some(capability) = filter.capability.as_deref() else {
            return Ok(Vec::new());
        };
        let rows: Vec<(Uuid, String)> = self
            .retrying("list_capability_versions", || async {
                match &self.pools {
                    Pools::Sqlite { read, .. } => {
                        capability_versions_query!(filter, capability, limit, sqlx::Sqlite)
                            .build_query_as()
                            .fetch_all(read)
                            .await
                    }
                    Pools::Postgres(pool) => {
                        capability_versions_query!(filter, capability, limit, sqlx::Postgres)
                            .build_query_as()
                            .fetch_all(pool)
                            .await
                    }
                }
            })
            .await?;
        Ok(rows.into_iter().map(|(id, version)| (AgentId(id), version)).collect())
    }

    async fn get_agents(&self, tenant: &TenantId, ids: &[AgentId]) -> Result<Vec<Agent>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .retrying("get_agents", || async {
                match &self.pools {
                    Pools::Sqlite { read, .. } => {
                        agents_by_ids_query!(tenant, ids, sqlx::Sqlite)
                            .build_query_as::<AgentRow>()
                            .fetch_all(read)
                            .await
                    }
                    Pools::Postgres(pool) => {
                        agents_by_ids_query!(tenant, ids, sqlx::Postgres)
                            .build_query_as::<AgentRow>()
                            .fetch_all(pool)
                            .await
                    }
                }
            })
            .await?;
        rows.into_iter().map(Agent::try_from).collect()
    }

    async fn write_heartbeats(&self, batch: &[HeartbeatRecord]) -> Result<u64, StoreError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let loads: Vec<String> = batch
            .iter()
            .map(|r| serde_json::to_string(&r.load))
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.retrying("write_heartbeats", || async {
            match &self.pools {
                Pools::Sqlite { write, .. } => {
                    // One UPDATE … FROM (VALUES …) per chunk keeps the bind count bounded.
                    let mut tx = write.begin().await?;
                    let mut written = 0;
                    for (records, loads) in
                        batch.chunks(SQLITE_ROWS_PER_STATEMENT_MAX).zip(loads.chunks(SQLITE_ROWS_PER_STATEMENT_MAX))
                    {
                        let mut q = QueryBuilder::<sqlx::Sqlite>::new("WITH v(id, at_ms, load) AS (");
                        q.push_values(records.iter().zip(loads), |mut row, (r, load)| {
                            row.push_bind(r.id.0).push_bind(r.at_ms).push_bind(load.as_str());
                        });
                        q.push(
                            ") UPDATE agents SET last_heartbeat_at_ms = v.at_ms, load = v.load FROM v \
                             WHERE agents.id = v.id AND (agents.last_heartbeat_at_ms IS NULL \
                             OR agents.last_heartbeat_at_ms <= v.at_ms)",
                        );
                        written += q.build().execute(&mut *tx).await?.rows_affected();
                    }
                    tx.commit().await?;
                    Ok(written)
                }
                Pools::Postgres(pool) => {
                    let ids: Vec<Uuid> = batch.iter().map(|r| r.id.0).collect();
                    let ats: Vec<i64> = batch.iter().map(|r| r.at_ms).collect();
                    Ok(sqlx::query(
                        "UPDATE agents AS a SET last_heartbeat_at_ms = v.at_ms, load = v.load::jsonb \
                         FROM UNNEST($1::uuid[], $2::bigint[], $3::text[]) AS v(id, at_ms, load) \
                         WHERE a.id = v.id AND (a.last_heartbeat_at_ms IS NULL OR a.last_heartbeat_at_ms <= v.at_ms)",
                    )
                    .bind(&ids)
                    .bind(&ats)
                    .bind(&loads)
                    .execute(pool)
                    .await?
                    .rows_affected())
                }
            }
        })
        .await
    }

    async fn apply_status_changes(&self, changes: &[StatusChange]) -> Result<Vec<AgentEvent>, StoreError> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        self.retrying("apply_status_changes", || async {
            with_pool!(self, write, |pool| {
                let mut tx = pool.begin().await?;
                let mut applied = Vec::with_capacity(changes.len());
                for change in changes {
                    let event = &change.event;
                    let affected = if change.remove {
                        sqlx::query(
                            "DELETE FROM agents WHERE id = $1 AND COALESCE(last_heartbeat_at_ms, created_at_ms) <= $2",
                        )
                        .bind(event.agent_id.0)
                        .bind(change.last_seen_at_or_before_ms)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                    } else {
                        sqlx::query(
                            "UPDATE agents SET status = $1 WHERE id = $2 \
                             AND COALESCE(last_heartbeat_at_ms, created_at_ms) <= $3",
                        )
                        .bind(event.to_status.map_or("healthy", AgentStatus::as_str))
                        .bind(event.agent_id.0)
                        .bind(change.last_seen_at_or_before_ms)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                    };
                    if affected == 1 {
                        let seq = insert_event!(tx, event)?;
                        applied.push(AgentEvent { seq, ..event.clone() });
                    }
                }
                tx.commit().await?;
                Ok(applied)
            })
        })
        .await
    }

    async fn list_agent_events(
        &self,
        tenant: &TenantId,
        agent: Option<AgentId>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AgentEvent>, StoreError> {
        let sql = match agent {
            Some(_) => format!(
                "SELECT {EVENT_COLUMNS} FROM agent_events WHERE tenant = $1 AND seq > $2 AND agent_id = $4 \
                 ORDER BY seq LIMIT $3"
            ),
            None => {
                format!("SELECT {EVENT_COLUMNS} FROM agent_events WHERE tenant = $1 AND seq > $2 ORDER BY seq LIMIT $3")
            }
        };
        let rows = self
            .retrying("list_agent_events", || async {
                with_pool!(self, read, |pool| {
                    let q = sqlx::query_as::<_, EventRow>(&sql)
                        .bind(tenant.as_str())
                        .bind(after_seq)
                        .bind(i64::from(limit));
                    match agent {
                        Some(id) => q.bind(id.0).fetch_all(pool).await,
                        None => q.fetch_all(pool).await,
                    }
                })
            })
            .await?;
        rows.into_iter().map(AgentEvent::try_from).collect()
    }

    async fn agent_events_head(&self) -> Result<i64, StoreError> {
        self.retrying("agent_events_head", || async {
            with_pool!(self, read, |pool| {
                sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(seq), 0) FROM agent_events").fetch_one(pool).await
            })
        })
        .await
    }

    async fn list_agent_changes(&self, after_seq: i64, limit: u32) -> Result<Vec<AgentEvent>, StoreError> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM agent_events WHERE seq > $1 ORDER BY seq LIMIT $2");
        let rows = self
            .retrying("list_agent_changes", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_as::<_, EventRow>(&sql).bind(after_seq).bind(i64::from(limit)).fetch_all(pool).await
                })
            })
            .await?;
        rows.into_iter().map(AgentEvent::try_from).collect()
    }
}

#[async_trait]
impl KeyStore for SqlStore {
    async fn api_key_count(&self) -> Result<u64, StoreError> {
        let count = self
            .retrying("api_key_count", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM api_keys").fetch_one(pool).await
                })
            })
            .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn insert_bootstrap_key(&self, record: &ApiKeyRecord) -> Result<bool, StoreError> {
        self.retrying("insert_bootstrap_key", || async {
            with_pool!(self, write, |pool| {
                let mut tx = pool.begin().await?;
                let claimed = sqlx::query(
                    "INSERT INTO kernel_meta (key, value) VALUES ('bootstrap_key_id', $1) ON CONFLICT (key) DO NOTHING",
                )
                .bind(record.id.to_string())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if claimed == 0 {
                    return Ok(false);
                }
                insert_key_row!(&mut *tx, record)?;
                tx.commit().await?;
                Ok(true)
            })
        })
        .await
    }

    async fn find_api_key(&self, hash: &[u8]) -> Result<Option<ApiKeyRecord>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = $1");
        let row = self
            .retrying("find_api_key", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_as::<_, KeyRow>(&sql).bind(hash).fetch_optional(pool).await
                })
            })
            .await?;
        row.map(ApiKeyRecord::try_from).transpose()
    }

    async fn get_api_key(&self, id: Uuid) -> Result<Option<ApiKeyRecord>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1");
        let row = self
            .retrying("get_api_key", || async {
                with_pool!(self, read, |pool| { sqlx::query_as::<_, KeyRow>(&sql).bind(id).fetch_optional(pool).await })
            })
            .await?;
        row.map(ApiKeyRecord::try_from).transpose()
    }

    async fn list_api_keys(
        &self,
        tenant: Option<&TenantId>,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<ApiKeyRecord>, StoreError> {
        // `$1 IS NULL` with an untyped NULL needs a cast on PostgreSQL; the branches keep
        // both databases on plain SQL.
        let sql = match tenant {
            Some(_) => format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant = $1 AND ($2 = 0 OR id > $3) ORDER BY id LIMIT $4"
            ),
            None => {
                format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE $1 = '' AND ($2 = 0 OR id > $3) ORDER BY id LIMIT $4")
            }
        };
        let tenant = tenant.map_or("", TenantId::as_str);
        let has_after = i64::from(after.is_some());
        let after = after.unwrap_or_else(Uuid::nil);
        let rows = self
            .retrying("list_api_keys", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_as::<_, KeyRow>(&sql)
                        .bind(tenant)
                        .bind(has_after)
                        .bind(after)
                        .bind(i64::from(limit))
                        .fetch_all(pool)
                        .await
                })
            })
            .await?;
        rows.into_iter().map(ApiKeyRecord::try_from).collect()
    }

    async fn insert_api_key(
        &self,
        record: &ApiKeyRecord,
        event: &OutboxEvent,
        keys_max: u32,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let inserted = self
            .retrying("insert_api_key", || async {
                with_pool!(self, write, |pool| {
                    let mut tx = pool.begin().await?;
                    let live: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM api_keys WHERE COALESCE(tenant, '') = $1 \
                         AND revoked_at_ms IS NULL AND (expires_at_ms IS NULL OR expires_at_ms > $2)",
                    )
                    .bind(record.tenant.as_ref().map_or("", TenantId::as_str))
                    .bind(now_ms)
                    .fetch_one(&mut *tx)
                    .await?;
                    if live >= i64::from(keys_max) {
                        return Ok(false);
                    }
                    insert_key_row!(&mut *tx, record)?;
                    insert_outbox!(tx, event, now_ms)?;
                    tx.commit().await?;
                    Ok(true)
                })
            })
            .await?;
        if inserted {
            Ok(())
        } else {
            Err(StoreError::LimitExceeded(format!("at most {keys_max} live API keys per tenant")))
        }
    }

    async fn rotate_api_key(
        &self,
        old: Uuid,
        old_expires_at_ms: i64,
        next: &ApiKeyRecord,
        event: &OutboxEvent,
    ) -> Result<(), StoreError> {
        let rotated = self
            .retrying("rotate_api_key", || async {
                with_pool!(self, write, |pool| {
                    let mut tx = pool.begin().await?;
                    insert_key_row!(&mut *tx, next)?;
                    let changed = sqlx::query(
                        "UPDATE api_keys SET replaced_by = $1, \
                         expires_at_ms = CASE WHEN expires_at_ms IS NULL OR expires_at_ms > $2 THEN $2 ELSE expires_at_ms END \
                         WHERE id = $3 AND revoked_at_ms IS NULL AND replaced_by IS NULL",
                    )
                    .bind(next.id)
                    .bind(old_expires_at_ms)
                    .bind(old)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if changed != 1 {
                        return Ok(false);
                    }
                    insert_outbox!(tx, event, next.created_at_ms)?;
                    tx.commit().await?;
                    Ok(true)
                })
            })
            .await?;
        if rotated { Ok(()) } else { Err(StoreError::Conflict("the key is revoked or was already rotated".into())) }
    }

    async fn revoke_api_key(&self, id: Uuid, at_ms: i64, event: &OutboxEvent) -> Result<bool, StoreError> {
        self.retrying("revoke_api_key", || async {
            with_pool!(self, write, |pool| {
                let mut tx = pool.begin().await?;
                let changed =
                    sqlx::query("UPDATE api_keys SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms IS NULL")
                        .bind(at_ms)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                if changed != 1 {
                    return Ok(false);
                }
                insert_outbox!(tx, event, at_ms)?;
                tx.commit().await?;
                Ok(true)
            })
        })
        .await
    }

    async fn live_api_key_count(&self, now_ms: i64) -> Result<u64, StoreError> {
        let count = self
            .retrying("live_api_key_count", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_scalar::<_, i64>(
                        "SELECT COUNT(*) FROM api_keys WHERE revoked_at_ms IS NULL \
                         AND (expires_at_ms IS NULL OR expires_at_ms > $1)",
                    )
                    .bind(now_ms)
                    .fetch_one(pool)
                    .await
                })
            })
            .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn touch_api_keys(&self, used: &[(Uuid, i64)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        self.retrying("touch_api_keys", || async {
            with_pool!(self, write, |pool| {
                let mut tx = pool.begin().await?;
                for (id, at_ms) in used {
                    sqlx::query(
                        "UPDATE api_keys SET last_used_at_ms = $1 \
                         WHERE id = $2 AND (last_used_at_ms IS NULL OR last_used_at_ms < $1)",
                    )
                    .bind(at_ms)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            })
        })
        .await
    }
}

/// Escapes `%`, `_` and `\\` so a plugin's prefix matches literally in `LIKE`.
fn like_prefix(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

#[async_trait]
impl PluginKv for SqlStore {
    async fn kv_get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.retrying("kv_get", || async {
            with_pool!(self, read, |pool| {
                sqlx::query_scalar::<_, Vec<u8>>("SELECT value FROM plugin_kv WHERE namespace = $1 AND key = $2")
                    .bind(namespace)
                    .bind(key)
                    .fetch_optional(pool)
                    .await
            })
        })
        .await
    }

    async fn kv_set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        keys_max: u32,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let written = self
            .retrying("kv_set", || async {
                with_pool!(self, write, |pool| {
                    // One statement: update an existing key, or insert a new one only while
                    // the namespace is under its key limit.
                    sqlx::query(
                        "INSERT INTO plugin_kv (namespace, key, value, updated_at_ms) \
                         SELECT $1, $2, $3, $4 \
                         WHERE EXISTS (SELECT 1 FROM plugin_kv WHERE namespace = $1 AND key = $2) \
                            OR (SELECT COUNT(*) FROM plugin_kv WHERE namespace = $1) < $5 \
                         ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, updated_at_ms = excluded.updated_at_ms",
                    )
                    .bind(namespace)
                    .bind(key)
                    .bind(value)
                    .bind(now_ms)
                    .bind(i64::from(keys_max))
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected())
                })
            })
            .await?;
        if written == 0 {
            return Err(StoreError::LimitExceeded(format!("a plugin namespace holds at most {keys_max} keys")));
        }
        Ok(())
    }

    async fn kv_delete(&self, namespace: &str, key: &str) -> Result<bool, StoreError> {
        self.retrying("kv_delete", || async {
            with_pool!(self, write, |pool| {
                sqlx::query("DELETE FROM plugin_kv WHERE namespace = $1 AND key = $2")
                    .bind(namespace)
                    .bind(key)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected() > 0)
            })
        })
        .await
    }

    async fn kv_list(&self, namespace: &str, prefix: &str, limit: u32) -> Result<Vec<String>, StoreError> {
        let pattern = like_prefix(prefix);
        self.retrying("kv_list", || async {
            with_pool!(self, read, |pool| {
                sqlx::query_scalar::<_, String>(
                    "SELECT key FROM plugin_kv WHERE namespace = $1 AND key LIKE $2 ESCAPE '\\' ORDER BY key LIMIT $3",
                )
                .bind(namespace)
                .bind(&pattern)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
            })
        })
        .await
    }
}

fn parse_version(s: &str) -> Result<semver::Version, StoreError> {
    semver::Version::parse(s).map_err(|e| StoreError::Corrupt(format!("invalid version {s:?}: {e}")))
}

fn parse_kind(s: &str) -> Result<PluginKind, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt(format!("invalid plugin kind {s:?}")))
}

/// The action's serialized name: the one its entry's hash covers.
fn action_str(action: ChainAction) -> Result<String, StoreError> {
    match serde_json::to_value(action) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        other => Err(StoreError::Corrupt(format!("chain action {action:?} does not serialize to a string: {other:?}"))),
    }
}

fn parse_action(s: &str) -> Result<ChainAction, StoreError> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| StoreError::Corrupt(format!("invalid chain action {s:?}")))
}

fn parse_json(what: &str, s: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// A `plugin_versions` row.
#[derive(sqlx::FromRow)]
struct PluginVersionRow {
    tenant: String,
    name: String,
    version: String,
    manifest: String,
    signed_by: Option<String>,
    uploaded_at_ms: i64,
    uploaded_by: String,
}

impl TryFrom<PluginVersionRow> for PluginVersion {
    type Error = StoreError;

    fn try_from(row: PluginVersionRow) -> Result<Self, StoreError> {
        let manifest: Manifest = serde_json::from_str(&row.manifest).map_err(|e| {
            StoreError::Corrupt(format!("manifest of {}/{}@{}: {e}", row.tenant, row.name, row.version))
        })?;
        if manifest.name != row.name || manifest.version != parse_version(&row.version)? {
            return Err(StoreError::Corrupt(format!(
                "plugin version {}/{}@{} holds the manifest of {}@{}",
                row.tenant, row.name, row.version, manifest.name, manifest.version
            )));
        }
        Ok(PluginVersion {
            tenant: parse_tenant(&row.tenant)?,
            manifest,
            signed_by: row.signed_by,
            uploaded_at_ms: row.uploaded_at_ms,
            uploaded_by: row.uploaded_by,
        })
    }
}

/// A `plugin_states` row.
#[derive(sqlx::FromRow)]
struct PluginStateRow {
    tenant: String,
    name: String,
    kind: String,
    active: Option<String>,
    shadow: Option<String>,
    updated_at_ms: i64,
}

impl TryFrom<PluginStateRow> for PluginState {
    type Error = StoreError;

    fn try_from(row: PluginStateRow) -> Result<Self, StoreError> {
        Ok(PluginState {
            tenant: parse_tenant(&row.tenant)?,
            name: row.name,
            kind: parse_kind(&row.kind)?,
            active: row.active.as_deref().map(parse_version).transpose()?,
            shadow: row.shadow.as_deref().map(parse_version).transpose()?,
            updated_at_ms: row.updated_at_ms,
        })
    }
}

/// A `plugin_chain` row.
#[derive(sqlx::FromRow)]
struct ChainRow {
    tenant: String,
    name: String,
    seq: i64,
    action: String,
    version: String,
    digest: String,
    manifest_digest: String,
    at_ms: i64,
    actor: String,
    prev_hash: String,
    hash: String,
}

impl TryFrom<ChainRow> for ChainEntry {
    type Error = StoreError;

    fn try_from(row: ChainRow) -> Result<Self, StoreError> {
        Ok(ChainEntry {
            tenant: parse_tenant(&row.tenant)?,
            name: row.name,
            seq: row.seq,
            action: parse_action(&row.action)?,
            version: parse_version(&row.version)?,
            digest: row.digest,
            manifest_digest: row.manifest_digest,
            at_ms: row.at_ms,
            actor: row.actor,
            prev_hash: row.prev_hash,
            hash: row.hash,
        })
    }
}

/// A `plugin_shadow_diffs` row.
#[derive(sqlx::FromRow)]
struct ShadowDiffRow {
    tenant: String,
    name: String,
    active: String,
    shadow: String,
    input: String,
    active_output: String,
    shadow_output: String,
    at_ms: i64,
}

impl TryFrom<ShadowDiffRow> for ShadowDiff {
    type Error = StoreError;

    fn try_from(row: ShadowDiffRow) -> Result<Self, StoreError> {
        Ok(ShadowDiff {
            tenant: parse_tenant(&row.tenant)?,
            name: row.name,
            active: parse_version(&row.active)?,
            shadow: parse_version(&row.shadow)?,
            input: parse_json("shadow diff input", &row.input)?,
            active_output: parse_json("shadow diff active output", &row.active_output)?,
            shadow_output: parse_json("shadow diff shadow output", &row.shadow_output)?,
            at_ms: row.at_ms,
        })
    }
}

const PLUGIN_VERSION_COLUMNS: &str = "tenant, name, version, manifest, signed_by, uploaded_at_ms, uploaded_by";
const PLUGIN_STATE_COLUMNS: &str = "tenant, name, kind, active, shadow, updated_at_ms";
const CHAIN_COLUMNS: &str =
    "tenant, name, seq, action, version, digest, manifest_digest, at_ms, actor, prev_hash, hash";
const SHADOW_DIFF_COLUMNS: &str = "tenant, name, active, shadow, input, active_output, shadow_output, at_ms";

/// How a plugin change ended; the conflicts roll the whole change back.
enum ChangeOutcome {
    Applied,
    /// The chain already has an entry with this change's `seq`.
    SeqTaken,
    /// The version to insert exists.
    VersionExists,
}

#[async_trait]
impl PluginStore for SqlStore {
    async fn put_plugin_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let size = i64::try_from(bytes.len()).unwrap_or(i64::MAX);
        self.retrying("put_plugin_blob", || async {
            with_pool!(self, write, |pool| {
                sqlx::query(
                    "INSERT INTO plugin_blobs (digest, bytes, size) VALUES ($1, $2, $3) ON CONFLICT (digest) DO NOTHING",
                )
                .bind(digest)
                .bind(bytes)
                .bind(size)
                .execute(pool)
                .await
                .map(|_| ())
            })
        })
        .await
    }

    async fn get_plugin_blob(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.retrying("get_plugin_blob", || async {
            with_pool!(self, read, |pool| {
                sqlx::query_scalar::<_, Vec<u8>>("SELECT bytes FROM plugin_blobs WHERE digest = $1")
                    .bind(digest)
                    .fetch_optional(pool)
                    .await
            })
        })
        .await
    }

    async fn apply_plugin_change(&self, change: &PluginChange) -> Result<(), StoreError> {
        let entry = &change.entry;
        let action = action_str(entry.action)?;
        let entry_version = entry.version.to_string();
        let insert = match &change.insert {
            Some(v) => {
                let manifest = serde_json::to_string(&v.manifest).map_err(|e| {
                    StoreError::Corrupt(format!("manifest of {}@{}: {e}", v.manifest.name, v.manifest.version))
                })?;
                Some((v, v.manifest.version.to_string(), manifest))
            }
            None => None,
        };
        let state = change
            .state
            .as_ref()
            .map(|s| (s, s.active.as_ref().map(ToString::to_string), s.shadow.as_ref().map(ToString::to_string)));
        let delete = change.delete.as_ref().map(ToString::to_string);
        let outcome = self
            .retrying("apply_plugin_change", || async {
                with_pool!(self, write, |pool| {
                    let mut tx = pool.begin().await?;
                    // DO NOTHING rather than an error: a conflict is an expected outcome (a
                    // concurrent change won), and it leaves the transaction usable.
                    let appended = sqlx::query(
                        "INSERT INTO plugin_chain (tenant, name, seq, action, version, digest, manifest_digest, \
                         at_ms, actor, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
                         ON CONFLICT (tenant, name, seq) DO NOTHING",
                    )
                    .bind(entry.tenant.as_str())
                    .bind(&entry.name)
                    .bind(entry.seq)
                    .bind(&action)
                    .bind(&entry_version)
                    .bind(&entry.digest)
                    .bind(&entry.manifest_digest)
                    .bind(entry.at_ms)
                    .bind(&entry.actor)
                    .bind(&entry.prev_hash)
                    .bind(&entry.hash)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if appended == 0 {
                        return Ok(ChangeOutcome::SeqTaken);
                    }
                    if let Some((version, version_str, manifest)) = &insert {
                        let m = &version.manifest;
                        let inserted = sqlx::query(
                            "INSERT INTO plugin_versions (tenant, name, version, kind, digest, config_digest, manifest, \
                             signed_by, uploaded_at_ms, uploaded_by, chain_seq) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
                             ON CONFLICT (tenant, name, version) DO NOTHING",
                        )
                        .bind(version.tenant.as_str())
                        .bind(&m.name)
                        .bind(version_str)
                        .bind(m.kind.as_str())
                        .bind(&m.digest)
                        .bind(m.config_digest.as_deref())
                        .bind(manifest)
                        .bind(version.signed_by.as_deref())
                        .bind(version.uploaded_at_ms)
                        .bind(&version.uploaded_by)
                        .bind(entry.seq)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        if inserted == 0 {
                            return Ok(ChangeOutcome::VersionExists);
                        }
                    }
                    if let Some((state, active, shadow)) = &state {
                        sqlx::query(
                            "INSERT INTO plugin_states (tenant, name, kind, active, shadow, updated_at_ms) \
                             VALUES ($1, $2, $3, $4, $5, $6) \
                             ON CONFLICT (tenant, name) DO UPDATE SET kind = excluded.kind, active = excluded.active, \
                             shadow = excluded.shadow, updated_at_ms = excluded.updated_at_ms",
                        )
                        .bind(state.tenant.as_str())
                        .bind(&state.name)
                        .bind(state.kind.as_str())
                        .bind(active.as_deref())
                        .bind(shadow.as_deref())
                        .bind(state.updated_at_ms)
                        .execute(&mut *tx)
                        .await?;
                    }
                    if let Some(version) = &delete {
                        // The blobs stay: other versions may name the same digests.
                        sqlx::query("DELETE FROM plugin_versions WHERE tenant = $1 AND name = $2 AND version = $3")
                            .bind(entry.tenant.as_str())
                            .bind(&entry.name)
                            .bind(version)
                            .execute(&mut *tx)
                            .await?;
                    }
                    // The change's event, in the same transaction, for the bus relay.
                    let event = OutboxEvent {
                        tenant: entry.tenant.clone(),
                        subject: format!("nops.plugins.{}", action.replace('-', "_")),
                        payload: serde_json::json!({
                            "name": &entry.name,
                            "seq": entry.seq,
                            "action": &action,
                            "version": &entry_version,
                            "digest": &entry.digest,
                            "actor": &entry.actor,
                            "at_ms": entry.at_ms,
                            "active": state.as_ref().and_then(|(_, a, _)| a.clone()),
                            "shadow": state.as_ref().and_then(|(_, _, s)| s.clone()),
                        })
                        .to_string()
                        .into_bytes(),
                        source: "kernel/plugins".to_string(),
                    };
                    insert_outbox!(tx, event, entry.at_ms)?;
                    sqlx::query(
                        "INSERT INTO plugin_generation (id, generation) VALUES (1, 1) \
                         ON CONFLICT (id) DO UPDATE SET generation = plugin_generation.generation + 1",
                    )
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok(ChangeOutcome::Applied)
                })
            })
            .await?;
        match outcome {
            ChangeOutcome::Applied => Ok(()),
            ChangeOutcome::SeqTaken => Err(StoreError::UniqueViolation(format!(
                "plugin {}/{} already has chain entry {}",
                entry.tenant, entry.name, entry.seq
            ))),
            ChangeOutcome::VersionExists => {
                let version = change.insert.as_ref().map(|v| v.manifest.version.to_string()).unwrap_or_default();
                Err(StoreError::UniqueViolation(format!(
                    "plugin {}/{} already has version {version}",
                    entry.tenant, entry.name
                )))
            }
        }
    }

    async fn list_plugin_states(&self, tenant: Option<&TenantId>) -> Result<Vec<PluginState>, StoreError> {
        let sql = match tenant {
            Some(_) => {
                format!("SELECT {PLUGIN_STATE_COLUMNS} FROM plugin_states WHERE tenant = $1 ORDER BY tenant, name")
            }
            None => format!("SELECT {PLUGIN_STATE_COLUMNS} FROM plugin_states ORDER BY tenant, name"),
        };
        let rows = self
            .retrying("list_plugin_states", || async {
                with_pool!(self, read, |pool| {
                    let q = sqlx::query_as::<_, PluginStateRow>(&sql);
                    match tenant {
                        Some(tenant) => q.bind(tenant.as_str()).fetch_all(pool).await,
                        None => q.fetch_all(pool).await,
                    }
                })
            })
            .await?;
        rows.into_iter().map(PluginState::try_from).collect()
    }

    async fn get_plugin_state(&self, tenant: &TenantId, name: &str) -> Result<Option<PluginState>, StoreError> {
        let sql = format!("SELECT {PLUGIN_STATE_COLUMNS} FROM plugin_states WHERE tenant = $1 AND name = $2");
        let row = self
            .retrying("get_plugin_state", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_as::<_, PluginStateRow>(&sql)
                        .bind(tenant.as_str())
                        .bind(name)
                        .fetch_optional(pool)
                        .await
                })
            })
            .await?;
        row.map(PluginState::try_from).transpose()
    }

    async fn list_plugin_versions(&self, tenant: &TenantId, name: &str) -> Result<Vec<PluginVersion>, StoreError> {
        let sql = format!(
            "SELECT {PLUGIN_VERSION_COLUMNS} FROM plugin_versions WHERE tenant = $1 AND name = $2 \
             ORDER BY uploaded_at_ms, chain_seq"
        );
        let rows = self
            .retrying("list_plugin_versions", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_as::<_, PluginVersionRow>(&sql).bind(tenant.as_str()).bind(name).fetch_all(pool).await
                })
            })
            .await?;
        rows.into_iter().map(PluginVersion::try_from).collect()
    }

    async fn plugin_chain(&self, tenant: &TenantId, name: &str) -> Result<Vec<ChainEntry>, StoreError> {
        let sql = format!("SELECT {CHAIN_COLUMNS} FROM plugin_chain WHERE tenant = $1 AND name = $2 ORDER BY seq");
        let rows = self
            .retrying("plugin_chain", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_as::<_, ChainRow>(&sql).bind(tenant.as_str()).bind(name).fetch_all(pool).await
                })
            })
            .await?;
        rows.into_iter().map(ChainEntry::try_from).collect()
    }

    async fn list_plugin_chains(&self) -> Result<Vec<(TenantId, String)>, StoreError> {
        let rows: Vec<(String, String)> = self
            .retrying("list_plugin_chains", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_as("SELECT DISTINCT tenant, name FROM plugin_chain ORDER BY tenant, name")
                        .fetch_all(pool)
                        .await
                })
            })
            .await?;
        rows.into_iter().map(|(tenant, name)| Ok((parse_tenant(&tenant)?, name))).collect()
    }

    async fn plugin_generation(&self) -> Result<i64, StoreError> {
        let generation = self
            .retrying("plugin_generation", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_scalar::<_, i64>("SELECT generation FROM plugin_generation WHERE id = 1")
                        .fetch_optional(pool)
                        .await
                })
            })
            .await?;
        Ok(generation.unwrap_or(0))
    }

    async fn insert_shadow_diff(&self, diff: &ShadowDiff, keep_max: u32) -> Result<(), StoreError> {
        let active = diff.active.to_string();
        let shadow = diff.shadow.to_string();
        let input = diff.input.to_string();
        let active_output = diff.active_output.to_string();
        let shadow_output = diff.shadow_output.to_string();
        self.retrying("insert_shadow_diff", || async {
            with_pool!(self, write, |pool| {
                let mut tx = pool.begin().await?;
                sqlx::query(
                    "INSERT INTO plugin_shadow_diffs (tenant, name, active, shadow, input, active_output, \
                     shadow_output, at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(diff.tenant.as_str())
                .bind(&diff.name)
                .bind(&active)
                .bind(&shadow)
                .bind(&input)
                .bind(&active_output)
                .bind(&shadow_output)
                .bind(diff.at_ms)
                .execute(&mut *tx)
                .await?;
                // Everything from the (keep_max + 1)-th newest row down; nothing when there
                // are at most keep_max rows (the subquery is then NULL).
                sqlx::query(
                    "DELETE FROM plugin_shadow_diffs WHERE tenant = $1 AND name = $2 AND id <= \
                     (SELECT id FROM plugin_shadow_diffs WHERE tenant = $1 AND name = $2 \
                     ORDER BY id DESC LIMIT 1 OFFSET $3)",
                )
                .bind(diff.tenant.as_str())
                .bind(&diff.name)
                .bind(i64::from(keep_max))
                .execute(&mut *tx)
                .await?;
                tx.commit().await
            })
        })
        .await
    }

    async fn list_shadow_diffs(
        &self,
        tenant: &TenantId,
        name: &str,
        limit: u32,
    ) -> Result<Vec<ShadowDiff>, StoreError> {
        let sql = format!(
            "SELECT {SHADOW_DIFF_COLUMNS} FROM plugin_shadow_diffs WHERE tenant = $1 AND name = $2 \
             ORDER BY id DESC LIMIT $3"
        );
        let rows = self
            .retrying("list_shadow_diffs", || async {
                with_pool!(self, read, |pool| {
                    sqlx::query_as::<_, ShadowDiffRow>(&sql)
                        .bind(tenant.as_str())
                        .bind(name)
                        .bind(i64::from(limit))
                        .fetch_all(pool)
                        .await
                })
            })
            .await?;
        rows.into_iter().map(ShadowDiff::try_from).collect()
    }
}

#[async_trait]
impl StoreHealth for SqlStore {
    async fn ping(&self) -> Result<(), StoreError> {
        // No retry: readiness must report what it sees now.
        with_pool!(self, read, |pool| sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))
            .map_err(|e| store_error("ping", e))
    }

    fn backend(&self) -> &'static str {
        match self.pools {
            Pools::Sqlite { .. } => "sqlite",
            Pools::Postgres(_) => "postgres",
        }
    }

    fn pool_stats(&self) -> PoolStats {
        match &self.pools {
            Pools::Sqlite { write, read, .. } => PoolStats {
                size: write.size() + read.size(),
                idle: (write.num_idle() + read.num_idle()) as u32,
                max: self.pool_connections_max,
            },
            Pools::Postgres(pool) => {
                PoolStats { size: pool.size(), idle: pool.num_idle() as u32, max: self.pool_connections_max }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("sqlite://.nops/nops.db"), "sqlite://.nops/nops.db");
    }

    /// A write far below the writer's own checkpoint threshold reaches the database file
    /// anyway: the checkpointer copies the log in the background.
    #[tokio::test]
    async fn the_checkpointer_copies_the_log_into_the_database_without_a_writer() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nops.db");
        let url = format!("sqlite://{}", path.display());
        let store = SqlStore::open(&StoreConfig { database_url: url, ..StoreConfig::default() }).await.expect("opens");
        let Pools::Sqlite { write, .. } = &store.pools else { panic!("a SQLite store") };
        sqlx::query("CREATE TABLE probe (x INTEGER)").execute(write).await.expect("create");
        sqlx::query("INSERT INTO probe (x) VALUES (7)").execute(write).await.expect("insert");
        // `immutable` reads the database file alone, never the log.
        let file_only = SqliteConnectOptions::from_str(&format!("sqlite://{}?immutable=1", path.display()))
            .expect("options")
            .read_only(true);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut conn = file_only.connect().await.expect("connects");
            let seen: Option<i64> =
                sqlx::query_scalar("SELECT x FROM probe").fetch_optional(&mut conn).await.ok().flatten();
            if seen == Some(7) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the row never left the log");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        store.close().await;
    }
}
pub mod bus;
mod commit;
mod idempotency;
mod outbox;
mod ratelimit;
pub mod spool;
mod tasks;
