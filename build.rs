//! Compiles `proto/` with protox (no system `protoc`), generates the tonic/prost code and
//! writes the encoded file descriptor set that server reflection serves.
//!
//! The internal WAL records (`proto/sluice/internal/wal.proto`) are compiled separately,
//! without gRPC stubs, and kept out of the descriptor set: they are not part of the API.

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/sluice/v1/sluice.proto"];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("sluice_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;

    let internal = protox::compile(["proto/sluice/internal/wal.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .bytes(".")
        .compile_fds(internal)?;
    Ok(())
}
