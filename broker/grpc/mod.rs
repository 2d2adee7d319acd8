//! The gRPC transport: everything that knows tonic and protobuf.
//!
//! [`server`] assembles the server (accept loop, TLS, health, reflection) around a
//! [`Broker`](crate::broker::Broker); [`service`] implements the RPCs, with every proto <->
//! domain conversion in `convert`; [`status`] maps
//! [`BrokerError`](crate::broker::BrokerError) to `tonic::Status`, in one place; [`wire`]
//! holds the hand-written encoders of the hot responses.

mod convert;
pub(super) mod server;
pub(super) mod service;
pub(super) mod status;
mod trace;
pub(super) mod wire;
