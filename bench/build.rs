//! Compiles the bench's own echo service (the raw-tonic floor) with protox: no protoc needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["drover/bench/v1/echo.proto"];
    for f in files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
