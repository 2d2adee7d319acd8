//! The broker (feature `server`). Its API is the items re-exported here; the folders below
//! are private to the crate:
//!
//! * `domain`: the queue state machine, the topic log, deduplication, names, limits and
//!   time. Pure data structures that take `now` as an argument; no tonic, protobuf, HTTP,
//!   locks or I/O.
//! * `engine`: where queues and topics live, behind one interface, [`Engine`]. `local` is
//!   the in-process [`Broker`]: the domain objects behind locks, each change journaled to
//!   the store, background tasks (expiry ticker, compactor, stats). `redis` is the
//!   [`RedisEngine`]: the same semantics as Lua scripts over Redis (standalone or cluster),
//!   so several stateless nodes serve one state. `checks` holds the request checks both
//!   run first.
//! * `store`: durability. The write-ahead log (records, group commit, recovery,
//!   compaction, manifest) over a pluggable [`Storage`].
//! * `auth`: bearer tokens and their grants, and the re-check of open streams on reload.
//! * `grpc`: the transport. Server assembly, the accept loop, the service, the one
//!   proto <-> domain conversion module, the error -> `tonic::Status` mapping and the
//!   hand-written encoders of the hot responses.
//! * `ops`: the operations HTTP server: `/metrics`, `/healthz` and the live dashboard.
//!
//! The `sluice` binary (clap configuration, `main`, the admin CLI) lives in `broker/bin/`
//! and uses this API like any other program. `testing` (hidden) exposes internals to the
//! tests and fuzz targets; it is not API.

mod auth;
mod domain;
mod engine;
mod grpc;
mod ops;
mod store;
mod sync;
#[doc(hidden)]
pub mod testing;

// Serving: gRPC, and the operations HTTP server next to it.
pub use self::grpc::server::{MAX_FRAME_BYTES, ServeOptions, TlsSettings, serve};
pub use self::ops::{HttpOptions, serve_http, serve_http_with};

// The shared handle both servers take, its settings and its error.
pub use self::domain::error::BrokerError;
pub use self::domain::limits::Limits;
pub use self::engine::Engine;
pub use self::engine::local::{Broker, BrokerConfig};
pub use self::engine::redis::{RedisCommit, RedisConfig, RedisEngine, redacted_seeds};

// Pluggable storage: the write-ahead log over a `Storage`, and what recovery reports.
pub use self::store::{
    DirStorage, FileOp, FileSyncer, FsyncPolicy, ManifestDefect, RecoveryError, RecoveryReport,
    Storage, StorageFile, StoreConfig, StoreError,
};

// Bearer tokens.
pub use self::auth::{Authenticator, Tokens, generate_token, hash_token};

// What the broker writes that clients read: the header of a dead-lettered job, and the
// clock of every `*_ms` timestamp it reports.
pub use self::domain::queue::HEADER_LAST_ERROR;
pub use self::domain::time::now_ms;
