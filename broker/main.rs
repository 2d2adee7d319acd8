//! The `sluice` binary.

use clap::Parser;
use std::sync::Arc;

use sluice::broker::config::{Cli, Command, ServeArgs, StorageKind};
use sluice::broker::store::DirStorage;
use sluice::broker::{Broker, serve};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            if let Err(e) = args.check() {
                eprintln!("sluice: {e}");
                return std::process::ExitCode::from(2);
            }
            let listener = match tokio::net::TcpListener::bind(args.listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("sluice: cannot listen on {}: {e}", args.listen);
                    return std::process::ExitCode::from(1);
                }
            };
            let broker = match args.storage {
                StorageKind::Memory => Broker::new(args.broker_config()),
                StorageKind::Wal => match open_wal(&args) {
                    Ok(broker) => broker,
                    Err(e) => {
                        tracing::error!("{e}");
                        eprintln!("sluice: {e}");
                        return std::process::ExitCode::from(1);
                    }
                },
            };
            let result = serve(
                listener,
                broker.clone(),
                args.serve_options(),
                shutdown_signal(),
            )
            .await;
            broker.close_storage();
            match result {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice: {e}");
                    std::process::ExitCode::from(1)
                }
            }
        }
    }
}

/// Opens the data directory and recovers the broker's state from it.
fn open_wal(args: &ServeArgs) -> Result<Broker, String> {
    let storage = DirStorage::open(&args.data_dir)
        .map_err(|e| format!("cannot open --data-dir {}: {e}", args.data_dir.display()))?;
    let started = std::time::Instant::now();
    let (broker, report) =
        Broker::open(args.broker_config(), Arc::new(storage), args.store_config())
            .map_err(|e| e.to_string())?;
    tracing::info!(
        data_dir = %args.data_dir.display(),
        fsync = %args.fsync,
        snapshot = ?report.snapshot,
        segments = report.segments,
        records = report.entries,
        truncated = report.truncated.len(),
        ignored_records = report.anomalies,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovered state from the write-ahead log"
    );
    Ok(broker)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
}
