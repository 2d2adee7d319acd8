//! Command-line configuration of the `sluice` binary: one clap struct, every flag also an
//! environment variable `SLUICE_*`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::broker::auth::Authenticator;
use crate::broker::cli;
use crate::broker::core::BrokerConfig;
use crate::broker::http::HttpOptions;
use crate::broker::limits::Limits;
use crate::broker::server::{ServeOptions, TlsSettings};
use crate::broker::store::{FsyncPolicy, StoreConfig};

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
    /// Make a new random bearer token and print it with the SHA-256 line for the tokens
    /// file (`--hash` prints the hash of a token read from stdin instead).
    Token(cli::TokenArgs),
}

/// Where the broker keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StorageKind {
    /// A write-ahead log in `--data-dir`: state survives restarts and crashes.
    Wal,
    /// Memory only: everything is lost when the process stops.
    Memory,
}

/// `sluice serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// gRPC listen address. A non-loopback address needs `--tokens-file` (or `--insecure`),
    /// so a broker is never exposed by accident.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Allow a non-loopback listen address without authentication.
    #[arg(long, env = "SLUICE_INSECURE")]
    pub insecure: bool,
    /// Bearer tokens (TOML: `[[token]]` tables with `name`, `sha256` and the name patterns
    /// each of `publish`, `subscribe`, `enqueue`, `consume`, `admin` may act on). When set,
    /// every broker RPC needs a known token and is denied what its patterns do not cover.
    /// Reloaded on SIGHUP.
    #[arg(long, env = "SLUICE_TOKENS_FILE", value_name = "PATH")]
    pub tokens_file: Option<PathBuf>,
    /// Serve TLS with this PEM certificate chain (needs `--tls-key`).
    #[arg(long, env = "SLUICE_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, env = "SLUICE_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this PEM CA (mutual TLS; needs `--tls-cert`).
    #[arg(long, env = "SLUICE_TLS_CLIENT_CA", value_name = "PATH")]
    pub tls_client_ca: Option<PathBuf>,
    /// Most open client connections; more are closed as they arrive and logged.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
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
    /// Where the write-ahead log lives (created with mode 0700; files are 0600).
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
    pub data_dir: PathBuf,
    /// `wal` (durable, the default) or `memory` (nothing survives a restart).
    #[arg(long, env = "SLUICE_STORAGE", value_enum, default_value_t = StorageKind::Wal)]
    pub storage: StorageKind,
    /// When the log is fsynced: `always` (before answering; concurrent requests share one
    /// fsync) or `interval:<ms>` (answer at once, fsync every <ms>: a machine crash loses
    /// up to that much acknowledged work).
    #[arg(long, env = "SLUICE_FSYNC", default_value = "always")]
    pub fsync: FsyncPolicy,
    /// Size at which a log segment is closed and a new one started, bytes; compaction
    /// runs when the log outgrows a segment and twice the last snapshot.
    #[arg(long, env = "SLUICE_SEGMENT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub segment_bytes: u64,
    /// Start even if the log is damaged outside its torn tail, cutting it at the first
    /// bad record, or misses files its MANIFEST names, starting with those that are there
    /// (what is dropped is logged).
    #[arg(long, env = "SLUICE_REPAIR")]
    pub repair: bool,
}

impl ServeArgs {
    /// Refuses settings that are unsafe or inconsistent.
    pub fn check(&self) -> Result<(), String> {
        if !self.listen.ip().is_loopback() && !self.insecure && self.tokens_file.is_none() {
            return Err(format!(
                "--listen {} is not a loopback address and authentication is not configured: set --tokens-file, or pass --insecure (SLUICE_INSECURE=true) to serve it anyway",
                self.listen
            ));
        }
        // The operations server has no authentication of its own: tokens do not cover it.
        if let Some(http) = self.http
            && !http.ip().is_loopback()
            && !self.insecure
        {
            return Err(format!(
                "--http {http} is not a loopback address and the operations server has no authentication: pass --insecure (SLUICE_INSECURE=true) to serve it anyway"
            ));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return Err("--tls-cert needs --tls-key".into()),
            (None, Some(_)) => return Err("--tls-key needs --tls-cert".into()),
            _ => {}
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(
                "--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked during a TLS handshake".into(),
            );
        }
        if self.max_connections == 0 {
            return Err("--max-connections 0 is below the minimum of 1".into());
        }
        if self.segment_bytes < 4096 {
            return Err(format!(
                "--segment-bytes {} is below the minimum of 4096",
                self.segment_bytes
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
        }
    }

    /// The operations HTTP server's settings.
    pub fn http_options(&self) -> HttpOptions {
        HttpOptions {
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            ..HttpOptions::default()
        }
    }

    /// The write-ahead log's settings.
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            fsync: self.fsync,
            segment_bytes: self.segment_bytes,
            repair: self.repair,
            ..StoreConfig::default()
        }
    }

    /// The server's settings, with the TLS files and the tokens file read.
    pub fn serve_options(&self) -> Result<ServeOptions, String> {
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsSettings {
                cert_pem: read("--tls-cert", cert)?,
                key_pem: read("--tls-key", key)?,
                client_ca_pem: match &self.tls_client_ca {
                    Some(ca) => Some(read("--tls-client-ca", ca)?),
                    None => None,
                },
            }),
            _ => None,
        };
        let auth = match &self.tokens_file {
            Some(path) => Some(Authenticator::from_file(path)?),
            None => None,
        };
        Ok(ServeOptions {
            max_request_bytes: self.max_request_bytes,
            max_streams_per_connection: self.max_streams_per_connection,
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            max_connections: self.max_connections,
            tls,
            auth,
        })
    }
}
