//! The broker: domain modules, and the gRPC service that exposes them.
//!
//! Domain modules ([`queue`], [`topic`], [`dedup`], [`subscription`], [`consume`], [`core`],
//! [`names`], [`limits`], [`observe`], [`auth`], [`stats`], and `memory`, the budget for
//! retained payloads) know nothing of tonic, protobuf or HTTP. [`service`] alone maps
//! proto <-> domain and [`error`] alone maps [`BrokerError`] to `tonic::Status`. [`server`]
//! assembles the gRPC server (with health and reflection) around a [`Broker`]; [`http`]
//! serves `/metrics`, `/healthz` and the live dashboard; [`cli`] is the admin command line,
//! a gRPC client of a running broker. [`store`] makes the state durable: a write-ahead log
//! with group commit, recovery and compaction, driven by hooks in [`core`] that append each
//! change's records under the lock of what it changed.

pub mod auth;
pub mod cli;
pub mod config;
pub mod consume;
pub mod core;
pub mod dedup;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod limits;
pub(crate) mod memory;
pub mod names;
pub mod observe;
pub mod queue;
pub mod rate;
pub mod server;
pub mod service;
pub mod stats;
pub mod store;
pub mod subscription;
pub(crate) mod sync;
pub mod time;
pub mod topic;
pub mod wire;

pub use self::core::{Broker, BrokerConfig};
pub use self::error::BrokerError;
pub use self::server::{MAX_FRAME_BYTES, ServeOptions, TlsSettings, serve};
