//! Generates the gRPC server and client from `proto/` and a file descriptor set for reflection.
//! `protoc` comes from the vendored crate unless `PROTOC` points elsewhere (offline builds).
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("imagelsh_descriptor.bin"))
        // Prost's codec with a bound on what a request expands to when decoded (src/api/codec.rs).
        .codec_path("crate::api::codec::BoundedCodec")
        .compile_protos(&["proto/imagelsh/v1/imagelsh.proto"], &["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .compile_protos(&["proto/imagelsh/storage/v1/storage.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
