//! Compiles the .proto files with protox, so no system `protoc` is needed.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let protos = [root.join("switchboard/eventbus/v1/eventbus.proto"), root.join("switchboard/agent/v1/agent.proto")];
    let fds = protox::compile(protos, [&root])?;
    std::fs::write(out_dir.join("switchboard_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Payloads are spliced into frames without copies.
        .bytes(".")
        .compile_fds(fds)?;
    // compile_fds emits no rerun-if-changed for its inputs.
    println!("cargo:rerun-if-changed={}", root.join("switchboard").display());
    Ok(())
}
