//! Sluice: a message broker served over gRPC.
//!
//! One binary serves **topics** (publish / subscribe with wildcards and replay) and **work
//! queues** (enqueue, lease / ack with visibility timeouts, retries with backoff,
//! priorities, delays, ordering keys, dead-letter queues, job inspection).
//!
//! # Layout
//!
//! * [`pb`]: the generated protobuf and gRPC code of `proto/sluice/v1/sluice.proto`.
//! * [`broker`]: the server. Domain modules (`queue`, `topic`, `subscription`, `core`)
//!   never import tonic or protobuf; `broker::service` maps proto <-> domain and
//!   `broker::error` maps errors to `tonic::Status`. `broker::store` is the write-ahead
//!   log (records in the internal `proto/sluice/internal/wal.proto`, never on the wire).
//! * [`client`]: the typed Rust client; it never imports `broker`.
//! * `broker::http`: the operations HTTP server (`/metrics`, `/healthz`, live dashboard);
//!   `broker::cli`: the admin commands of the binary (a gRPC client).
//! * `broker/main.rs`: the `sluice` binary.
//! * `tests/`: integration tests over real gRPC on `127.0.0.1:0`.

#[path = "proto/mod.rs"]
pub mod pb;

pub mod broker;
pub mod client;

/// Compiles the README's Rust examples as doc tests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("README.md")]
pub struct ReadmeDoctests;
