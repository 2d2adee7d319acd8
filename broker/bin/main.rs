//! The `sluice` binary: `sluice serve` runs the broker (gRPC, and the operations HTTP
//! server with `--http`); every other subcommand is an admin client of a running broker.

mod cli;
mod config;

use clap::Parser;
use std::io::IsTerminal as _;
use std::sync::Arc;

use crate::config::{Cli, Command, ServeArgs, StorageKind};
use sluice::broker::{Broker, DirStorage, Engine, RedisEngine, serve, serve_http_with};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Admin commands print their results on stdout (often parsed as JSON), so their logs,
    // warnings only, go to stderr.
    let (default_level, writer, to_terminal) = match cli.command {
        Command::Serve(_) => (
            "info",
            BoxMakeWriter::new(std::io::stdout),
            std::io::stdout().is_terminal(),
        ),
        _ => (
            "warn",
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
        ),
    };
    let filter =
        EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt::layer().with_writer(writer);
    // Colour codes only on a terminal: a log redirected to a file or read by a collector
    // must be plain text. On a terminal the library's default stays (it honours NO_COLOR).
    let logs = if to_terminal {
        logs
    } else {
        logs.with_ansi(false)
    };
    let exporter = match &cli.command {
        Command::Serve(args) => match args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
            None => None,
            Some(endpoint) => match sluice::otlp::Exporter::start("sluice", endpoint) {
                Ok(exporter) => Some(exporter),
                Err(e) => {
                    eprintln!("sluice: --otlp-endpoint: {e}");
                    return std::process::ExitCode::from(2);
                }
            },
        },
        _ => None,
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(exporter.as_ref().map(|e| e.layer()))
        .init();
    let code = command(cli).await;
    if let Some(exporter) = exporter {
        exporter.shutdown().await;
    }
    code
}

/// Runs the command line's command once logging is set up.
async fn command(cli: Cli) -> std::process::ExitCode {
    match cli.command {
        command @ (Command::Queues(_)
        | Command::Stats(_)
        | Command::Enqueue(_)
        | Command::Lease(_)
        | Command::Publish(_)
        | Command::Subscribe(_)
        | Command::Jobs(_)
        | Command::Redrive(_)
        | Command::Purge(_)
        | Command::DeleteJob(_)
        | Command::Limit(_)
        | Command::Consumers(_)
        | Command::Token(_)
        | Command::Schedules(_)
        | Command::Schema(_)) => crate::cli::run(command).await,
        Command::Serve(args) => {
            if let Err(e) = args.check() {
                eprintln!("sluice: {e}");
                return std::process::ExitCode::from(2);
            }
            let options = match args.serve_options() {
                Ok(options) => options,
                Err(e) => {
                    eprintln!("sluice: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            if let Some(auth) = &options.auth {
                tokio::spawn(reload_tokens_on_hangup(auth.clone()));
            }
            let listener = match tokio::net::TcpListener::bind(args.listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("sluice: cannot listen on {}: {e}", args.listen);
                    return std::process::ExitCode::from(1);
                }
            };
            let http_listener = match args.http {
                None => None,
                Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => Some(l),
                    Err(e) => {
                        eprintln!("sluice: cannot listen on {addr} (--http): {e}");
                        return std::process::ExitCode::from(1);
                    }
                },
            };
            match args.storage {
                StorageKind::Memory => {
                    let broker = Broker::new(args.broker_config());
                    run(broker, listener, http_listener, options, &args).await
                }
                StorageKind::Wal => match open_wal(&args) {
                    Ok(broker) => run(broker, listener, http_listener, options, &args).await,
                    Err(e) => {
                        tracing::error!("{e}");
                        eprintln!("sluice: {e}");
                        std::process::ExitCode::from(1)
                    }
                },
                StorageKind::Redis => match RedisEngine::connect(args.redis_config()).await {
                    Ok(engine) => {
                        tracing::info!(
                            redis = %sluice::broker::redacted_seeds(&args.redis),
                            cluster = engine.is_cluster(),
                            replicas = args.redis_replicas,
                            "state in Redis"
                        );
                        run(engine, listener, http_listener, options, &args).await
                    }
                    Err(e) => {
                        tracing::error!("{e}");
                        eprintln!(
                            "sluice: cannot use --redis {}: {e}",
                            sluice::broker::redacted_seeds(&args.redis)
                        );
                        std::process::ExitCode::from(1)
                    }
                },
            }
        }
    }
}

/// Serves `engine` over gRPC (and HTTP with `--http`) until a shutdown signal.
async fn run<E: Engine>(
    engine: E,
    listener: tokio::net::TcpListener,
    http_listener: Option<tokio::net::TcpListener>,
    options: sluice::broker::ServeOptions,
    args: &ServeArgs,
) -> std::process::ExitCode {
    // The HTTP server stops with the engine's token, which `serve` cancels on shutdown,
    // so both end together.
    let http = http_listener.map(|listener| {
        let token = engine.shutdown_token();
        tokio::spawn(serve_http_with(
            listener,
            engine.clone(),
            // The console checks the same tokens as gRPC.
            sluice::broker::HttpOptions {
                auth: options.auth.clone(),
                ..args.http_options()
            },
            token.cancelled_owned(),
        ))
    });
    let served = serve(listener, engine.clone(), options, shutdown_signal()).await;
    // If gRPC failed on its own, the HTTP server must not keep the process alive.
    engine.close();
    let http_result = match http {
        Some(task) => match task.await {
            Ok(r) => r.map_err(|e| format!("HTTP server: {e}")),
            Err(e) => Err(format!("HTTP server task: {e}")),
        },
        None => Ok(()),
    };
    match (served, http_result) {
        (Ok(()), Ok(())) => std::process::ExitCode::SUCCESS,
        (Err(e), _) => {
            eprintln!("sluice: {e}");
            std::process::ExitCode::from(1)
        }
        (Ok(()), Err(e)) => {
            eprintln!("sluice: {e}");
            std::process::ExitCode::from(1)
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
        torn_tail_bytes = report.torn_tail_bytes,
        torn_tail_records = report.torn_tail_records,
        files_repaired = report.files_repaired,
        ignored_records = report.anomalies,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovered state from the write-ahead log"
    );
    Ok(broker)
}

/// Reads the tokens file again on each SIGHUP (to rotate tokens without a restart); a
/// file that does not parse is logged and the tokens in use stay.
async fn reload_tokens_on_hangup(auth: sluice::broker::Authenticator) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            return;
        };
        while hangups.recv().await.is_some() {
            match auth.reload() {
                Ok(n) => tracing::info!(hashes = n, "tokens file reloaded"),
                Err(e) => tracing::error!("tokens file not reloaded, the old tokens stay: {e}"),
            }
        }
    }
    #[cfg(not(unix))]
    drop(auth);
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
