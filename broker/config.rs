//! Command-line configuration of the `sluice` binary: one clap struct, every flag also an
//! environment variable `SLUICE_*`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::broker::cli;
use crate::broker::core::BrokerConfig;
use crate::broker::http::HttpOptions;
use crate::broker::limits::Limits;
use crate::broker::server::ServeOptions;

/// Sluice: a message broker served over gRPC.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands: `serve` runs a broker; the others are admin commands, gRPC clients of a
/// running broker (`--server`, env `SLUICE_SERVER`). Only the connection and output flags
/// of admin commands have environment variables: a stray variable must never change what
/// a command does to a queue.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// List queues with their policy and counts.
    Queues(cli::QueuesArgs),
    /// Show queue and topic figures, once or continuously (`--watch`).
    Stats(cli::StatsArgs),
    /// Enqueue one job.
    Enqueue(cli::EnqueueArgs),
    /// Lease jobs (and optionally ack them at once).
    Lease(cli::LeaseArgs),
    /// Publish one message to a topic.
    Publish(cli::PublishArgs),
    /// Print messages of matching topics as they arrive.
    Subscribe(cli::SubscribeArgs),
    /// List a queue's jobs in one state without leasing them.
    Jobs(cli::JobsArgs),
    /// Move dead jobs from a dead-letter queue back to their queues, showing progress.
    Redrive(cli::RedriveArgs),
    /// Remove every job of a queue that is not leased.
    Purge(cli::PurgeArgs),
    /// List the workers seen on a queue.
    Consumers(cli::ConsumersArgs),
}

/// `sluice serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// gRPC listen address. Binding a non-loopback address needs `--insecure` until auth
    /// lands, so a broker is never exposed by accident.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Allow a non-loopback listen address without authentication.
    #[arg(long, env = "SLUICE_INSECURE")]
    pub insecure: bool,
    /// Largest message or job payload, bytes.
    #[arg(long, env = "SLUICE_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,
    /// Largest gRPC request, bytes (a whole batch).
    #[arg(long, env = "SLUICE_MAX_REQUEST_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Most open subscriptions.
    #[arg(long, env = "SLUICE_MAX_SUBSCRIPTIONS", default_value_t = 10_000)]
    pub max_subscriptions: usize,
    /// Most queues.
    #[arg(long, env = "SLUICE_MAX_QUEUES", default_value_t = 10_000)]
    pub max_queues: usize,
    /// Most concurrent streams per HTTP/2 connection.
    #[arg(
        long,
        env = "SLUICE_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 1_024
    )]
    pub max_streams_per_connection: u32,
    /// How often leases are expired when nobody is leasing, ms.
    #[arg(long, env = "SLUICE_TICK_MS", default_value_t = 10)]
    pub tick_ms: u64,
    /// How long open requests may take to finish after a shutdown signal, ms.
    #[arg(long, env = "SLUICE_DRAIN_TIMEOUT_MS", default_value_t = 5_000)]
    pub drain_timeout_ms: u64,
    /// Address of the operations HTTP server (`/metrics`, `/healthz`, dashboard at `/`);
    /// off when unset. Like `--listen`, a non-loopback address needs `--insecure`.
    #[arg(long, env = "SLUICE_HTTP", value_name = "ADDR")]
    pub http: Option<SocketAddr>,
}

impl ServeArgs {
    /// Refuses settings that are unsafe or inconsistent.
    pub fn check(&self) -> Result<(), String> {
        if !self.listen.ip().is_loopback() && !self.insecure {
            return Err(format!(
                "--listen {} is not a loopback address and authentication is not configured: pass --insecure (SLUICE_INSECURE=true) to serve it anyway",
                self.listen
            ));
        }
        if let Some(http) = self.http
            && !http.ip().is_loopback()
            && !self.insecure
        {
            return Err(format!(
                "--http {http} is not a loopback address and authentication is not configured: pass --insecure (SLUICE_INSECURE=true) to serve it anyway"
            ));
        }
        if self.max_request_bytes < self.max_payload_bytes + 64 * 1024 {
            return Err(format!(
                "--max-request-bytes {} must exceed --max-payload-bytes {} by at least 65536",
                self.max_request_bytes, self.max_payload_bytes
            ));
        }
        Ok(())
    }

    /// The broker's settings.
    pub fn broker_config(&self) -> BrokerConfig {
        BrokerConfig {
            limits: Limits {
                max_payload_bytes: self.max_payload_bytes,
                max_subscriptions: self.max_subscriptions,
                max_queues: self.max_queues,
                ..Limits::default()
            },
            tick_interval: Duration::from_millis(self.tick_ms.max(1)),
            ..BrokerConfig::default()
        }
    }

    /// The operations HTTP server's settings.
    pub fn http_options(&self) -> HttpOptions {
        HttpOptions {
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            ..HttpOptions::default()
        }
    }

    /// The server's settings.
    pub fn serve_options(&self) -> ServeOptions {
        ServeOptions {
            max_request_bytes: self.max_request_bytes,
            max_streams_per_connection: self.max_streams_per_connection,
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
        }
    }
}
