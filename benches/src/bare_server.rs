//! The baseline of the heartbeat benchmark: a bare axum server whose only handler reads the
//! request body and returns 200. It runs on the same runtime settings as the kernel, so the
//! ratio kernel/bare measures what the kernel's own work costs.

use clap::Parser;

/// The same allocator as the kernel, so the ratio compares the work, not the allocators.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7499")]
    listen: std::net::SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = axum::Router::new().fallback(|body: axum::body::Bytes| async move {
        std::hint::black_box(body);
        axum::http::StatusCode::OK
    });
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("bare-server listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
