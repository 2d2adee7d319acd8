//! Sluice: a message broker served over gRPC.
//!
//! One binary serves **topics** (publish / subscribe with wildcards and replay) and **work
//! queues** (enqueue, lease / ack with visibility timeouts, retries with backoff,
//! priorities, delays, ordering keys, dead-letter queues, job inspection).
//!
//! # Cargo features
//!
//! * `server` (default): the broker ([`broker`]) and the `sluice` binary; implies `client`.
//! * `client`: the typed client ([`client`]). A program that only talks to a broker depends
//!   on `sluice = { version = "0.1", default-features = false, features = ["client"] }`,
//!   which leaves out the broker and what only it needs (axum, clap, prometheus-client,
//!   the write-ahead log's and the TLS server's crates).
//! * `otlp` (implied by `server`): [`otlp`], exporting a process's `tracing` spans to an
//!   OpenTelemetry collector over OTLP/gRPC.
//!
//! [`pb`] is always built.
//!
//! # Public API
//!
//! * [`client`]: all of it ([`client::Client`], the workers, producers and subscriptions,
//!   and [`client::trace`], the W3C trace context messages and jobs carry).
//! * [`otlp`]: [`otlp::Exporter`], the OTLP span exporter.
//! * [`pb`]: the messages and gRPC stubs generated from `proto/sluice/v1/sluice.proto`,
//!   and the codec both sides use.
//! * [`broker`], the items it lists at its top level:
//!   * serving: `serve`, `ServeOptions`, `TlsSettings`, `MAX_FRAME_BYTES` (gRPC) and
//!     `serve_http`, `serve_http_with`, `HttpOptions` (metrics, health, dashboard);
//!   * the engines both take, behind the sealed `Engine` trait: `Broker` (in this process:
//!     `Broker::new` in memory, `Broker::open` over a storage), `BrokerConfig`, and
//!     `RedisEngine` (state in Redis, shared by several nodes: `RedisEngine::connect`),
//!     `RedisConfig`, `RedisCommit`; `Limits`, `BrokerError`;
//!   * pluggable storage: the `Storage` and `StorageFile` traits, `DirStorage` (a
//!     directory), `StoreConfig`, `FsyncPolicy`, and what recovery reports:
//!     `RecoveryReport`, `RecoveryError`, `StoreError` (`FileOp`, `ManifestDefect`);
//!   * bearer tokens: `Authenticator`, `Tokens`, `hash_token`, `generate_token`;
//!   * what the broker writes that clients read: `HEADER_LAST_ERROR`, `now_ms`.
//!
//! Everything else is private to the crate. The hidden `broker::testing` module hands
//! internals to the tests, fuzz targets and benchmarks; it is not API and changes freely.
//!
//! # Layout
//!
//! * `proto/`: `sluice/v1/sluice.proto` is the wire contract, `proto/mod.rs` and
//!   `proto/codec.rs` are [`pb`].
//! * `client/`: the typed client; it never imports `broker`. `client/trace.rs` is the
//!   trace context (`traceparent`) both sides read and write; `otlp.rs` the exporter.
//! * `broker/domain/`: pure state machines (queue, topic log, dedup, names, limits, time)
//!   that take `now` as an argument. A change to lease expiry goes in `domain/queue/`
//!   (`deadlines.rs` groups the deadlines, `Queue::tick` expires them).
//! * `broker/engine/`: the `Engine` interface the transport calls (`mod.rs`) and the
//!   request checks every engine runs first (`checks.rs`). `engine/local/` is the
//!   in-process `Broker` handle: locks, journaling, background tasks (the ticker that
//!   drives expiry is `background.rs`), stats, consume streams, subscriptions.
//!   `engine/redis/` is the Redis engine: each queue operation one Lua script in the
//!   queue's slot (`queue.rs`, `queue/*.lua`), topics as Streams (`topic.rs`), pub/sub
//!   wake-ups (`wake.rs`), replica `WAIT`s (`replication.rs`), the nodes' sweep.
//! * `broker/store/`: the write-ahead log. A change to the WAL format goes in `record.rs`
//!   (framing, record conversion) and `wal.proto` (the records, never on the wire); replay in
//!   `recovery.rs`.
//! * `broker/auth/`: tokens, grants, the re-check of open streams.
//! * `broker/grpc/`: the transport. A change to an RPC goes in `service.rs` (access checks,
//!   the broker call) and `convert.rs` (every proto <-> domain conversion, each mapped
//!   once); errors become statuses in `status.rs` only; `wire/` writes the hot responses
//!   by hand.
//! * `broker/ops/`: the HTTP server: `metrics.rs`, and the dashboard (`dashboard.rs`, the
//!   page `dashboard.html`).
//! * `broker/bin/`: the `sluice` binary (clap config, `main`, admin CLI), a program using
//!   this library's API.
//! * `tests/`: integration tests over real gRPC on `127.0.0.1:0`; `tests/fuzz/` the fuzz
//!   targets; `benches/compare/` the comparison harness.

// Everything that is not the documented API above is `pub(crate)`, so the compiler finds
// dead code.
#![warn(unreachable_pub)]

#[path = "proto/mod.rs"]
pub mod pb;

#[cfg(feature = "server")]
pub mod broker;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "otlp")]
pub mod otlp;

/// Compiles the README's Rust examples as doc tests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("README.md")]
pub struct ReadmeDoctests;
