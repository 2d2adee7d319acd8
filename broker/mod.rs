//! The broker, one folder per concern:
//!
//! * [`domain`]: the queue state machine, the topic log, deduplication, names, limits and
//!   time. Pure data structures that take `now` as an argument; no tonic, protobuf, HTTP,
//!   locks or I/O.
//! * [`engine`]: the shared [`Broker`] handle that holds the domain objects behind locks,
//!   journals each change to the store, and runs the background tasks (expiry ticker,
//!   compactor, stats). Split by concern: queues, topics, admin, consume, subscriptions.
//! * [`store`]: durability. The write-ahead log (records, group commit, recovery,
//!   compaction, manifest).
//! * [`auth`]: bearer tokens and their grants, and the re-check of open streams on reload.
//! * [`grpc`]: the transport. Server assembly, the accept loop, the service, the one
//!   proto <-> domain conversion module, the error -> `tonic::Status` mapping and the
//!   hand-written encoders of the hot responses.
//! * [`ops`]: the operations HTTP server: `/metrics`, `/healthz` and the live dashboard.
//!
//! The `sluice` binary (clap configuration, `main`, the admin CLI) lives in `broker/bin/`
//! and uses this library like any other program.

pub mod auth;
pub mod domain;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod ops;
pub mod store;
pub(crate) mod sync;

pub use self::domain::error::BrokerError;
pub use self::engine::{Broker, BrokerConfig};
pub use self::grpc::server::{MAX_FRAME_BYTES, ServeOptions, TlsSettings, serve};
