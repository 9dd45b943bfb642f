//! Compiles drover/v1/*.proto with protox (pure Rust: no protoc needed), and writes the encoded file
//! descriptor set that gRPC server reflection serves.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "drover/v1/common.proto",
        "drover/v1/agent.proto",
        "drover/v1/control.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    // prost-build writes `file_descriptor_set_path` only when it runs protoc itself, so with protox the
    // descriptor set is encoded here.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("drover_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Every rpc gets a default `UNIMPLEMENTED` body and server streams are boxed (`BoxStream<T>`), so
        // adding an rpc to the contract does not break other implementations (test doubles).
        .generate_default_stubs(true)
        // A log chunk's bytes are shared, not copied: the agent sends slices of the buffers its spool
        // writer already holds, and the coordinator's decoder hands out slices of its receive buffer.
        .bytes(".drover.v1.LogChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
