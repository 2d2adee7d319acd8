//! The broker: domain modules, and the gRPC service that exposes them.
//!
//! Domain modules ([`queue`], [`topic`], [`subscription`], [`core`], [`names`], [`limits`])
//! know nothing of tonic or protobuf. [`service`] alone maps proto <-> domain and
//! [`error`] alone maps [`BrokerError`] to `tonic::Status`. [`server`] assembles the gRPC
//! server (with health and reflection) around a [`Broker`]. [`store`] makes the state
//! durable: a write-ahead log with group commit, recovery and compaction, driven by hooks
//! in [`core`] that append each change's records under the lock of what it changed.

pub mod config;
pub mod core;
pub mod error;
pub mod limits;
pub mod names;
pub mod queue;
pub mod rate;
pub mod server;
pub mod service;
pub mod store;
pub mod subscription;
pub mod time;
pub mod topic;

pub use self::core::{Broker, BrokerConfig};
pub use self::error::BrokerError;
pub use self::server::{ServeOptions, serve};
