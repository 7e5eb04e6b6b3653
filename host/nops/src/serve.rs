//! `nops serve`: wires the store, registry and HTTP edge together and runs them until a
//! shutdown signal.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use nops_api::{AppState, router};
use nops_core::auth::{ApiKeyAuthenticator, KeyHasher, RoleAuthorizer, ensure_bootstrap_key};
use nops_core::clock::{Clock, SystemClock};
use nops_core::metrics::Metrics;
use nops_core::registry::Registry;
use nops_core::store::Store;
use nops_store::SqlStore;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Runs the kernel until SIGINT or SIGTERM.
pub fn run(config: Config) -> anyhow::Result<()> {
    init_logging(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(config))
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.log)
        .with_context(|| format!("invalid log filter {:?}", config.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("initialising logs: {e}"))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let started_at = Instant::now();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let metrics = Metrics::new();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    let sql = SqlStore::open(&config.store).await?;
    let store: Arc<dyn Store> = Arc::new(sql.clone());
    let hasher = KeyHasher::new(config.api_key_pepper.as_deref().map(str::as_bytes))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(key) = ensure_bootstrap_key(store.as_ref(), &hasher, clock.now_ms()).await? {
        // Printed once, on the first start with an empty store; only its hash is stored.
        eprintln!(
            "\nnops: created the bootstrap admin API key. It is shown only this once; store it now:\n\n    {}\n\nUse it as `Authorization: Bearer <key>`.\n",
            key.secret
        );
    }
    let registry = Arc::new(
        Registry::new(
            store.clone(),
            clock.clone(),
            metrics.clone(),
            config.registry.clone(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let agents = registry
        .load()
        .await
        .context("loading the agent registry")?;
    let state = AppState {
        registry: registry.clone(),
        store: store.clone(),
        authenticator: Arc::new(ApiKeyAuthenticator::new(
            store.clone(),
            hasher,
            clock.clone(),
        )),
        authorizer: Arc::new(RoleAuthorizer),
        metrics,
        http: config.http.clone(),
        started_at,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let background = tokio::spawn(registry.clone().run_background(shutdown_rx));
    tracing::info!(
        listen = %config.listen,
        backend = store.backend(),
        agents,
        config_file = config.config_file.as_ref().map(|p| p.display().to_string()),
        "nops kernel serving"
    );
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving HTTP")?;
    tracing::info!("shutting down: flushing heartbeats");
    let _ = shutdown_tx.send(true);
    if let Err(err) = background.await {
        tracing::error!(error = %err, "background task failed");
    }
    sql.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
