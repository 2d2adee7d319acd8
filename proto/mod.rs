//! Generated protobuf messages and gRPC stubs for `sluice.v1`, and the codec both sides use.
//!
//! The Rust face of `proto/sluice/v1/sluice.proto`: the client and the server share it.

#![allow(missing_docs, clippy::all)]

tonic::include_proto!("sluice.v1");

pub mod codec;

/// The encoded file descriptor set of `proto/`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));
