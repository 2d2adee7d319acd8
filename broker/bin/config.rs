//! Command-line configuration of the `sluice` binary: one clap struct, every flag also an
//! environment variable `SLUICE_*`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::cli;
use sluice::broker::{
    Authenticator, BrokerConfig, FsyncPolicy, HttpOptions, Limits, RedisConfig, ServeOptions,
    StoreConfig, TlsSettings,
};

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
    /// Delete one job of a queue, whatever its state (its lease, if any, becomes stale).
    DeleteJob(cli::DeleteJobArgs),
    /// Set or remove a queue's rate and in-flight limits.
    Limit(cli::LimitArgs),
    /// List the workers seen on a queue.
    Consumers(cli::ConsumersArgs),
    /// Make a new random bearer token and print it with the SHA-256 line for the tokens
    /// file (`--hash` prints the hash of a token read from stdin instead).
    Token(cli::TokenArgs),
    /// Manage recurring schedules: list, create, update, delete, pause, resume.
    Schedules(cli::schedules::SchedulesArgs),
    /// Set, show or delete a queue's or topic's message schema (JSON Schema or protobuf).
    Schema(cli::schema::SchemaArgs),
}

/// Where the broker keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StorageKind {
    /// A write-ahead log in `--data-dir`: state survives restarts and crashes.
    Wal,
    /// Memory only: everything is lost when the process stops.
    Memory,
    /// Redis (`--redis`, a standalone server or a Redis Cluster): several `sluice serve`
    /// nodes on the same Redis serve the same queues and topics.
    Redis,
}

/// `--max-memory-bytes`: `auto`, or a byte count (0: no budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryBudgetArg {
    /// Half of the memory the process may use (see [`auto_memory_budget`]).
    Auto,
    /// This many bytes; 0 is no budget.
    Bytes(u64),
}

fn parse_memory_budget(s: &str) -> Result<MemoryBudgetArg, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(MemoryBudgetArg::Auto);
    }
    s.parse()
        .map(MemoryBudgetArg::Bytes)
        .map_err(|e| format!("{s:?} is neither `auto` nor a number of bytes: {e}"))
}

/// Half of the memory this process may use: the machine's (`MemTotal` of
/// `/proc/meminfo`) or its cgroup's limit (v2 `memory.max`, v1 `memory.limit_in_bytes`),
/// whichever is lower; 0 (no budget) where neither can be read. Half, because payloads
/// are not all a broker holds (indexes, per-job records, buffers, the log's batches).
pub fn auto_memory_budget() -> u64 {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let machine = read("/proc/meminfo").and_then(|info| {
        let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib.saturating_mul(1024))
    });
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| read(p)?.trim().parse::<u64>().ok());
    let total = match (machine, cgroup) {
        (Some(m), Some(c)) => m.min(c),
        (m, c) => m.or(c).unwrap_or(0),
    };
    total / 2
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
    /// Longest a connection may take from its TCP accept to the HTTP/2 client preface
    /// (TLS handshake included), ms; a connection still silent then is closed and its
    /// slot freed.
    #[arg(long, env = "SLUICE_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// A connection with no open call or stream for this long is closed, ms; 0: never.
    #[arg(long, env = "SLUICE_IDLE_TIMEOUT_MS", default_value_t = 300_000)]
    pub idle_timeout_ms: u64,
    /// How often an HTTP/2 PING checks that a connection's peer is alive, ms; 0: never.
    #[arg(long, env = "SLUICE_KEEPALIVE_INTERVAL_MS", default_value_t = 60_000)]
    pub keepalive_interval_ms: u64,
    /// How long a keepalive PING may go unanswered before the connection is closed, ms.
    #[arg(long, env = "SLUICE_KEEPALIVE_TIMEOUT_MS", default_value_t = 20_000)]
    pub keepalive_timeout_ms: u64,
    /// Largest message or job payload, bytes.
    #[arg(long, env = "SLUICE_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,
    /// Largest gRPC request, bytes (a whole batch).
    #[arg(long, env = "SLUICE_MAX_REQUEST_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Most open subscriptions.
    #[arg(long, env = "SLUICE_MAX_SUBSCRIPTIONS", default_value_t = 10_000)]
    pub max_subscriptions: usize,
    /// Most queues. Dead-letter queues count, also one a policy names before its first
    /// dead letter creates it.
    #[arg(long, env = "SLUICE_MAX_QUEUES", default_value_t = 10_000)]
    pub max_queues: usize,
    /// Most topics; creating one more (by Publish or CreateTopic) is RESOURCE_EXHAUSTED.
    #[arg(long, env = "SLUICE_MAX_TOPICS", default_value_t = 10_000)]
    pub max_topics: usize,
    /// Lease and Consume on a queue that does not exist answer NOT_FOUND (naming the queue
    /// and the closest existing name) instead of creating it. Off: the queue is created,
    /// logged as a warning and flagged `created_by_consumer` in Stats until a producer,
    /// policy or binding names it (workers may start before the first enqueue).
    #[arg(long, env = "SLUICE_STRICT_QUEUES")]
    pub strict_queues: bool,
    /// Budget for retained payload bytes across the broker (topic logs, and queued, held
    /// and finished-but-in-history jobs); past it Publish and Enqueue are
    /// RESOURCE_EXHAUSTED. `auto` (the default): half of the machine's memory, or of the
    /// cgroup's memory limit if lower (no budget where neither is known); `0`: no budget.
    #[arg(long, env = "SLUICE_MAX_MEMORY_BYTES", default_value = "auto", value_parser = parse_memory_budget)]
    pub max_memory_bytes: MemoryBudgetArg,
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
    /// OpenTelemetry collector to export the broker's spans to, over OTLP/gRPC
    /// (`http://127.0.0.1:4317`); off when unset. The broker traces the messages and jobs
    /// that carry a W3C `traceparent` header (or requests with `traceparent` metadata).
    #[arg(long, env = "SLUICE_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Where the write-ahead log lives (created with mode 0700; files are 0600).
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
    pub data_dir: PathBuf,
    /// `wal` (durable, the default), `memory` (nothing survives a restart) or `redis`
    /// (state in Redis, shared by every node started on it).
    #[arg(long, env = "SLUICE_STORAGE", value_enum, default_value_t = StorageKind::Wal)]
    pub storage: StorageKind,
    /// With `--storage redis`: `redis://host:port` of a standalone server, or
    /// comma-separated seed nodes of a Redis Cluster. A password goes in the URL
    /// (`redis://:password@host:port`), so `--help` does not show the variable's value.
    #[arg(
        long,
        env = "SLUICE_REDIS",
        value_name = "URLS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub redis: Vec<String>,
    /// With `--storage redis`: replicas every change must reach before it is answered
    /// (Redis `WAIT`); 0 answers once the primary has it.
    #[arg(long, env = "SLUICE_REDIS_REPLICAS", default_value_t = 0)]
    pub redis_replicas: u32,
    /// With `--storage redis`: how long an answer waits for `--redis-replicas`, ms; past
    /// it the request is UNAVAILABLE with its outcome unknown.
    #[arg(long, env = "SLUICE_REDIS_TIMEOUT_MS", default_value_t = 1_000)]
    pub redis_timeout_ms: u64,
    /// With `--storage redis`: most jobs a Consume stream leases ahead of its worker's
    /// credits while the worker keeps up, so its next job needs no Redis round trip; 0
    /// leases only what the credits ask for. Held jobs that wait 50 ms go back unleased.
    #[arg(long, env = "SLUICE_REDIS_LEASE_AHEAD", default_value_t = RedisConfig::DEFAULT_LEASE_AHEAD)]
    pub redis_lease_ahead: usize,
    /// When the log is fsynced: `always` (before answering; concurrent requests share one
    /// fsync) or `interval:<ms>` (answer once written to the kernel, fsync every <ms>: a
    /// process crash loses nothing acknowledged, a machine crash up to that much).
    #[arg(long, env = "SLUICE_FSYNC", default_value = "always")]
    pub fsync: FsyncPolicy,
    /// Size at which a log segment is closed and a new one started, bytes; compaction
    /// runs when the log outgrows a segment and twice the last snapshot.
    #[arg(long, env = "SLUICE_SEGMENT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub segment_bytes: u64,
    /// With `--fsync always`: how many fsyncs of the log may run at once. Above 1 the
    /// writer keeps writing while each sync thread syncs a group written before it
    /// started, so a request waits for about one sync instead of up to two, at the cost
    /// of a thread hand-off per group; 1 (the default) syncs one group at a time.
    #[arg(long, env = "SLUICE_WAL_SYNC_THREADS", default_value_t = StoreConfig::DEFAULT_SYNC_THREADS)]
    pub wal_sync_threads: usize,
    /// Start even if the log is damaged outside its torn tail, cutting it at the first
    /// bad record, or misses files its MANIFEST names, starting with those that are there
    /// (what is dropped is logged).
    #[arg(long, env = "SLUICE_REPAIR")]
    pub repair: bool,
}

/// Most `--redis-timeout-ms` allows (a minute).
const MAX_REDIS_TIMEOUT_MS: u64 = 60_000;

impl ServeArgs {
    /// Refuses settings that are unsafe or inconsistent.
    pub fn check(&self) -> Result<(), String> {
        match (self.storage, self.redis.is_empty()) {
            (StorageKind::Redis, true) => {
                return Err(
                    "--storage redis needs --redis <redis://host:port[,...]> (SLUICE_REDIS)".into(),
                );
            }
            (StorageKind::Wal | StorageKind::Memory, false) => {
                return Err(format!(
                    "--redis is set but --storage is {:?}: pass --storage redis to keep state in Redis",
                    self.storage
                ));
            }
            _ => {}
        }
        if !self.listen.ip().is_loopback() && !self.insecure && self.tokens_file.is_none() {
            return Err(format!(
                "--listen {} is not a loopback address and authentication is not configured: set --tokens-file, or pass --insecure (SLUICE_INSECURE=true) to serve it anyway",
                self.listen
            ));
        }
        // Tokens cover only the console (/console) of the operations server; its metrics,
        // health and dashboard are open, so it stays on loopback unless told otherwise.
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
        for (flag, value) in [
            ("--handshake-timeout-ms", self.handshake_timeout_ms),
            ("--keepalive-timeout-ms", self.keepalive_timeout_ms),
        ] {
            if value == 0 {
                return Err(format!("{flag} 0 is below the minimum of 1"));
            }
        }
        // A request waits this long for its replicas before it is answered UNAVAILABLE:
        // past a minute a client has long given up (and WAIT with 0 would block for
        // good, holding up the node's other commands on that connection).
        if !(1..=MAX_REDIS_TIMEOUT_MS).contains(&self.redis_timeout_ms) {
            return Err(format!(
                "--redis-timeout-ms {} is outside the allowed range 1 to {MAX_REDIS_TIMEOUT_MS}",
                self.redis_timeout_ms
            ));
        }
        if !(1..=16).contains(&self.wal_sync_threads) {
            return Err(format!(
                "--wal-sync-threads {} is outside the allowed range 1 to 16",
                self.wal_sync_threads
            ));
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

    /// The Redis engine's settings.
    pub fn redis_config(&self) -> RedisConfig {
        RedisConfig {
            replicas: self.redis_replicas,
            replica_timeout: Duration::from_millis(self.redis_timeout_ms),
            lease_ahead: self.redis_lease_ahead,
            limits: self.broker_config().limits,
            ..RedisConfig::new(self.redis.clone())
        }
    }

    /// The in-process engine's settings.
    pub fn broker_config(&self) -> BrokerConfig {
        BrokerConfig {
            limits: Limits {
                max_payload_bytes: self.max_payload_bytes,
                max_subscriptions: self.max_subscriptions,
                max_queues: self.max_queues,
                max_topics: self.max_topics,
                strict_queues: self.strict_queues,
                max_memory_bytes: match self.max_memory_bytes {
                    MemoryBudgetArg::Auto => auto_memory_budget(),
                    MemoryBudgetArg::Bytes(n) => n,
                },
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
            preallocate: true,
            sync_threads: self.wal_sync_threads,
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
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            idle_timeout: (self.idle_timeout_ms > 0)
                .then(|| Duration::from_millis(self.idle_timeout_ms)),
            keepalive_interval: (self.keepalive_interval_ms > 0)
                .then(|| Duration::from_millis(self.keepalive_interval_ms)),
            keepalive_timeout: Duration::from_millis(self.keepalive_timeout_ms),
            tls,
            auth,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> ServeArgs {
        let all = ["sluice", "serve"].iter().chain(args).copied();
        match Cli::try_parse_from(all).unwrap().command {
            Command::Serve(serve) => serve,
            _ => unreachable!("a serve command"),
        }
    }

    #[test]
    fn wal_sync_threads_come_from_the_flag_within_their_range() {
        assert_eq!(
            serve(&[]).store_config().sync_threads,
            StoreConfig::DEFAULT_SYNC_THREADS
        );
        assert_eq!(
            serve(&["--wal-sync-threads", "4"])
                .store_config()
                .sync_threads,
            4
        );
        assert!(serve(&["--wal-sync-threads", "16"]).check().is_ok());
        for bad in ["0", "17"] {
            let refused = serve(&["--wal-sync-threads", bad]).check().unwrap_err();
            assert_eq!(
                refused,
                format!("--wal-sync-threads {bad} is outside the allowed range 1 to 16")
            );
        }
    }

    #[test]
    fn the_redis_replica_timeout_is_within_its_range() {
        let redis = ["--storage", "redis", "--redis", "redis://127.0.0.1:6379"];
        let with = |timeout: &str| {
            let mut args = redis.to_vec();
            args.extend(["--redis-timeout-ms", timeout]);
            serve(&args)
        };
        assert!(serve(&redis).check().is_ok(), "the default");
        assert!(with("60000").check().is_ok());
        assert_eq!(
            with("250").redis_config().replica_timeout,
            Duration::from_millis(250)
        );
        for bad in ["0", "60001"] {
            assert_eq!(
                with(bad).check().unwrap_err(),
                format!("--redis-timeout-ms {bad} is outside the allowed range 1 to 60000")
            );
        }
    }

    #[test]
    fn topic_and_memory_limits_come_from_flags() {
        let limits = serve(&["--max-topics", "10", "--max-memory-bytes", "12345"])
            .broker_config()
            .limits;
        assert_eq!((limits.max_topics, limits.max_memory_bytes), (10, 12_345));
        assert_eq!(
            serve(&["--max-memory-bytes", "0"])
                .broker_config()
                .limits
                .max_memory_bytes,
            0
        );
        let defaults = serve(&[]).broker_config().limits;
        assert_eq!(defaults.max_topics, 10_000);
        // `auto`: half of what the machine (or cgroup) has, never more than it has.
        assert_eq!(defaults.max_memory_bytes, auto_memory_budget());
        if cfg!(target_os = "linux") {
            let total = std::fs::read_to_string("/proc/meminfo").unwrap();
            let kib: u64 = total
                .lines()
                .next()
                .unwrap()
                .split_whitespace()
                .nth(1)
                .unwrap()
                .parse()
                .unwrap();
            assert!(defaults.max_memory_bytes > 0);
            assert!(defaults.max_memory_bytes <= kib * 1024 / 2);
        }
        let err = Cli::try_parse_from(["sluice", "serve", "--max-memory-bytes", "lots"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"lots\" is neither `auto` nor a number of bytes"),
            "{err}"
        );
    }
}
