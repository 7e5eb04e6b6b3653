//! `nops serve`: runs a [`Kernel`] until a shutdown signal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use nops::config::{Config, LogFormat};
use nops::kernel::Kernel;
use nops_api::HttpConfig;
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
    let shutdown = shutdown_signal();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let dispatch_sweeper = tokio::spawn(kernel.dispatch.clone().run_background(shutdown_rx.clone()));
    let degraded_watch = tokio::spawn(kernel.degraded.clone().run(Arc::new(kernel.store.clone()), shutdown_rx.clone()));
    let idempotency_sweeper = tokio::spawn(nops_api::run_idempotency_sweeper(
        kernel.state.store.clone(),
        kernel.state.clock.clone(),
        kernel.state.metrics.clone(),
        config.http.idempotency.clone(),
        shutdown_rx.clone(),
    ));
    let relay = tokio::spawn(kernel.relay.clone().run(shutdown_rx.clone()));
    let bus_probe = kernel
        .embedded_bus
        .is_none()
        .then(|| tokio::spawn(kernel.degraded.clone().run_bus_probe(kernel.bus.clone(), shutdown_rx.clone())));
    let bus_sweeper = kernel.embedded_bus.clone().map(|bus| tokio::spawn(sweep_bus(bus, shutdown_rx.clone())));
    let background = tokio::spawn(kernel.registry.clone().run_background(shutdown_rx));
    let plugin_sync = tokio::spawn(kernel.plugins.clone().run_sync());
    let chaos_expiry = tokio::spawn(kernel.state.chaos.clone().run_expiry());
    let slo_sampler = tokio::spawn(kernel.state.slo.clone().run_sampler());
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
    serve_http(listener, kernel.router(), &config.http, shutdown).await;
    tracing::info!("shutting down: flushing heartbeats");
    let _ = shutdown_tx.send(true);
    plugin_sync.abort();
    chaos_expiry.abort();
    slo_sampler.abort();
    if let Some(task) = plugin_dir {
        task.abort();
    }
    if let Err(err) = background.await {
        tracing::error!(error = %err, "background task failed");
    }
    if let Err(err) = dispatch_sweeper.await {
        tracing::error!(error = %err, "dispatch sweeper failed");
    }
    if let Err(err) = idempotency_sweeper.await {
        tracing::error!(error = %err, "idempotency key sweeper failed");
    }
    if let Some(task) = bus_probe
        && let Err(err) = task.await
    {
        tracing::error!(error = %err, "bus probe failed");
    }
    if let Err(err) = relay.await {
        tracing::error!(error = %err, "outbox relay failed");
    }
    if let Some(task) = bus_sweeper
        && let Err(err) = task.await
    {
        tracing::error!(error = %err, "bus sweeper failed");
    }
    if let Err(err) = degraded_watch.await {
        tracing::error!(error = %err, "store watch failed");
    }
    kernel.store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// How often the embedded bus applies retention and moves expired deliveries to the DLQ.
const BUS_SWEEP_INTERVAL_MS: u64 = 5_000;

/// Runs the embedded bus's sweep until shutdown.
async fn sweep_bus(bus: nops_store::bus::EmbeddedBus, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(BUS_SWEEP_INTERVAL_MS)) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(err) = bus.sweep().await {
            tracing::warn!(error = %err, "bus sweep failed; retrying");
        }
    }
}

/// Most refusals (503 to a connection past `connections_max`) written at once; past it a
/// connection is closed without an answer.
const REFUSALS_MAX: usize = 256;
/// Longest a refusal takes: reading the request head, answering, letting the client read it.
const REFUSAL_MS_MAX: u64 = 2_000;
/// The HTTP/2 connection preface, which a client without TLS sends first to speak HTTP/2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves `router` on `listener` until `shutdown` completes, then lets the connections finish
/// their requests (at most `request_timeout_ms` and 5 s more).
///
/// hyper-util's server rather than `axum::serve`, for what a kernel facing many clients
/// needs: a client must send its request headers within `header_read_timeout_ms` (so slow
/// clients cannot hold connections open; it also closes idle keep-alive connections), at most
/// `connections_max` connections are open (more are answered 503 and closed), and each
/// request carries the client's address (`ConnectInfo`) for the access policies.
async fn serve_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    http: &HttpConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let header_read_timeout = Duration::from_millis(http.header_read_timeout_ms);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(http.headers_bytes_max.saturating_mul(2)).unwrap_or(u32::MAX));
    let connections = Arc::new(tokio::sync::Semaphore::new(http.connections_max.max(1)));
    let refusals = Arc::new(tokio::sync::Semaphore::new(REFUSALS_MAX));
    let graceful = GracefulShutdown::new();
    // Tells connections still waiting for their first bytes to give up.
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    accept_failed(&err).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            match refusals.clone().try_acquire_owned() {
                Ok(refusal) => {
                    tokio::spawn(async move {
                        refuse_connection(stream).await;
                        drop(refusal);
                    });
                }
                Err(_) => drop(stream),
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service =
            TowerToHyperService::new(tower::Layer::layer(&axum::Extension(ConnectInfo(remote)), router.clone()));
        let connection = builder.clone();
        let watcher = graceful.watcher();
        let mut stopping = stopping_rx.clone();
        tokio::spawn(async move {
            let started = tokio::select! {
                started = request_started(&stream, header_read_timeout) => started,
                _ = stopping.wait_for(|s| *s) => false,
            };
            if started {
                let served = watcher.watch(connection.serve_connection_with_upgrades(TokioIo::new(stream), service));
                if let Err(err) = served.await {
                    tracing::debug!(%remote, error = %err, "connection closed with an error");
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    let drain = Duration::from_millis(http.request_timeout_ms.saturating_add(5_000));
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(drain_ms = drain.as_millis() as u64, "connections still open after the drain; closing them");
    }
}

/// Waits until the client has sent enough to choose the protocol: a first byte that does not
/// begin the HTTP/2 preface, or the whole preface. From there hyper's header read timeout
/// applies; before it (a client that sends nothing) this wait does. False when the client sent
/// nothing in time, or left.
async fn request_started(stream: &tokio::net::TcpStream, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 24];
    loop {
        match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                if n >= H2_PREFACE.len() || buf[..n] != H2_PREFACE[..n] {
                    return true;
                }
                // Part of the preface: wait for the rest (peek does not wait for more bytes).
                if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(10))).await.is_err() {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// Answers a connection past `connections_max` with 503 `overloaded` and closes it: reads the
/// request head first (so the client is not reset while it writes), then writes, then drains
/// briefly so the answer is not lost to a reset.
async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request_id = uuid::Uuid::now_v7().hyphenated().to_string();
    let response = nops_api::connection_refusal(&request_id);
    let _ = tokio::time::timeout(Duration::from_millis(REFUSAL_MS_MAX), async {
        let mut head = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        while head.len() < 16 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => head.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        while stream.read(&mut chunk).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// An accept error: per-connection ones are ignored; others (out of file descriptors) are
/// logged and the loop waits a little, so it does not spin.
async fn accept_failed(err: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(err.kind(), ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused) {
        return;
    }
    tracing::warn!(error = %err, "accepting a connection failed; retrying in 50 ms");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is called, not when
/// it is first polled, so a signal that arrives as the kernel starts serving is not lost (the
/// default action would kill the process without draining).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        let wait = |signal: std::io::Result<tokio::signal::unix::Signal>| async move {
            match signal {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = wait(interrupt) => {},
            () = wait(terminate) => {},
        }
    }
}
