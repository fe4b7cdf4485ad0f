//! imagelsh: images in, embeddings and similar images out, over a persistent LSH index.
//!
//! Layers, from the wire inwards: `api` (gRPC) → `usecase` (ingest, embed, query by image,
//! create: the model and the indexes together) → `index` (the domain) → `lsh` (pure math)
//! and `store` (sled). Each layer has its own error type; `api::status` maps them to gRPC.

pub mod api;
pub mod client;
pub mod config;
pub mod config_file;
pub mod demo;
pub mod embed;
pub mod failpoint;
pub mod index;
pub mod limits;
pub mod lsh;
pub mod pipeline;
pub mod sparse;
pub mod store;
pub mod telemetry;
pub mod usecase;

/// The public wire contract, `imagelsh.v1`.
pub mod proto {
    tonic::include_proto!("imagelsh.v1");

    /// Serialized descriptors of the contract, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("imagelsh_descriptor");
}

/// Records of the on-disk layout (not part of the wire contract).
pub(crate) mod storage_proto {
    tonic::include_proto!("imagelsh.storage.v1");
}
