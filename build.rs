//! Compiles `proto/` with protox (no system `protoc`), generates the tonic/prost code and
//! writes the encoded file descriptor set that server reflection serves.
//!
//! The server trait is generated a second time, into `server/`, with every message
//! mapped to the types of the first pass except the hot responses, which map to types that
//! write the wire format directly: `SubscribeResponse` (a topic message is then encoded to
//! protobuf once, however many subscribers receive it), `LeaseResponse` and
//! `ConsumeResponse` (leased jobs are written from the queue's deliveries) and
//! `EnqueueResponse` and `EnqueueStreamResponse` (job ids are formatted into the output
//! buffer); and one request,
//! `ConsumeRequest`, whose acks keep their lease ids as slices of the received buffer.
//!
//! Client and server stubs use `proto/codec.rs` (`crate::pb::codec`) instead of `tonic_prost::ProstCodec`.
//!
//! The internal WAL records (`broker/store/wal.proto`, beside the code that writes them) are compiled separately,
//! without gRPC stubs, and kept out of the descriptor set: they are not part of the API.
//!
//! Without the `server` feature only the first pass runs: the rest is the broker's.

use prost::Message as _;

/// Both sides' gRPC codec: prost's, reserving each message's length before writing it.
const CODEC: &str = "crate::pb::codec::Codec";

/// The messages that derive `serde::Serialize` (with the `server` feature).
const SERIALIZED: [&str; 5] = [
    ".sluice.v1.QueueStats",
    ".sluice.v1.TopicStats",
    ".sluice.v1.StorageStats",
    ".sluice.v1.RecoveryStats",
    ".sluice.v1.ConsumerInfo",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/sluice/v1/sluice.proto"];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("sluice_descriptor.bin"), fds.encode_to_vec())?;
    let mut messages = tonic_prost_build::configure()
        .bytes(".")
        .build_server(false)
        .codec_path(CODEC);
    // The admin CLI (`server`) prints these with `--json` field for field, so they serialize
    // as they are; `pb` is built without serde too.
    for message in SERIALIZED {
        messages = messages.type_attribute(
            message,
            "#[cfg_attr(feature = \"server\", derive(serde::Serialize))]",
        );
    }
    messages.compile_fds(fds.clone())?;

    // The rest is the broker's (included only by `broker/grpc/wire` and `broker/store`),
    // and a client-only build has no broker.
    if std::env::var_os("CARGO_FEATURE_SERVER").is_none() {
        return Ok(());
    }

    let server_dir = out_dir.join("server");
    std::fs::create_dir_all(&server_dir)?;
    tonic_prost_build::configure()
        .build_client(false)
        .codec_path(CODEC)
        .out_dir(&server_dir)
        .extern_path(
            ".sluice.v1.SubscribeResponse",
            "crate::broker::grpc::wire::EncodedSubscribeResponse",
        )
        .extern_path(
            ".sluice.v1.EnqueueResponse",
            "crate::broker::grpc::wire::EncodedEnqueueResponse",
        )
        .extern_path(
            ".sluice.v1.EnqueueStreamResponse",
            "crate::broker::grpc::wire::EncodedEnqueueStreamResponse",
        )
        .extern_path(
            ".sluice.v1.LeaseResponse",
            "crate::broker::grpc::wire::EncodedLeaseResponse",
        )
        .extern_path(
            ".sluice.v1.ConsumeResponse",
            "crate::broker::grpc::wire::EncodedConsumeResponse",
        )
        .extern_path(
            ".sluice.v1.ConsumeRequest",
            "crate::broker::grpc::wire::ReceivedConsumeRequest",
        )
        .extern_path(".sluice.v1", "crate::pb")
        .compile_fds(fds)?;

    println!("cargo:rerun-if-changed=broker/store/wal.proto");
    let internal = protox::compile(["broker/store/wal.proto"], ["broker/store"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .bytes(".")
        .compile_fds(internal)?;
    Ok(())
}
