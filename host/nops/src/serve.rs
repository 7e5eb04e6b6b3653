//! `nops serve`: runs a [`Kernel`] until a shutdown signal.

use std::sync::Arc;

use anyhow::Context;
use nops::config::{Config, LogFormat};
use nops::kernel::Kernel;
use nops_core::clock::SystemClock;
use nops_core::store::StoreHealth;
use tracing_subscriber::EnvFilter;

/// Runs the kernel until SIGINT or SIGTERM.
pub fn run(config: Config) -> anyhow::Result<()> {
    init_logging(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(serve(config))
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.log).with_context(|| format!("invalid log filter {:?}", config.log))?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let result = match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("initialising logs: {e}"))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let kernel = Kernel::open(&config, Arc::new(SystemClock)).await?;
    if let Some(key) = &kernel.bootstrap_key {
        // Printed once, on the first start with an empty store; only its hash is stored.
        eprintln!(
            "\nnops: created the bootstrap admin API key. It is shown only this once; store it now:\n\n    {}\n\nUse it as `Authorization: Bearer <key>`.\n",
            key.secret
        );
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let background = tokio::spawn(kernel.registry.clone().run_background(shutdown_rx));
    let plugin_sync = tokio::spawn(kernel.plugins.clone().run_sync());
    let plugin_dir = config.plugins.dir.clone().map(|dir| {
        tracing::info!(dir = %dir.display(), "watching the plugins directory");
        tokio::spawn(nops::plugins_dir::watch(dir, kernel.plugins.clone()))
    });
    tracing::info!(
        listen = %listener.local_addr().unwrap_or(config.listen),
        backend = kernel.store.backend(),
        agents = kernel.agents_loaded,
        config_file = config.config_file.as_ref().map(|p| p.display().to_string()),
        "nops kernel serving"
    );
    axum::serve(listener, kernel.router()).with_graceful_shutdown(shutdown_signal()).await.context("serving HTTP")?;
    tracing::info!("shutting down: flushing heartbeats");
    let _ = shutdown_tx.send(true);
    plugin_sync.abort();
    if let Some(task) = plugin_dir {
        task.abort();
    }
    if let Err(err) = background.await {
        tracing::error!(error = %err, "background task failed");
    }
    kernel.store.close().await;
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
