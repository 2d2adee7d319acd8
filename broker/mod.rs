//! The broker: domain modules, and the gRPC service that exposes them.
//!
//! Domain modules ([`queue`], [`topic`], [`subscription`], [`core`], [`names`], [`limits`])
//! know nothing of tonic or protobuf. [`service`] alone maps proto <-> domain and
//! [`error`] alone maps [`BrokerError`] to `tonic::Status`. [`server`] assembles the gRPC
//! server (with health and reflection) around a [`Broker`].

pub mod config;
pub mod consume;
pub mod core;
pub mod error;
pub mod limits;
pub mod names;
pub mod queue;
pub mod rate;
pub mod server;
pub mod service;
pub mod subscription;
pub mod time;
pub mod topic;
pub mod wire;

pub use self::core::{Broker, BrokerConfig};
pub use self::error::BrokerError;
pub use self::server::{ServeOptions, serve};
