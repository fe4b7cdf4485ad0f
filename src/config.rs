//! Service configuration: command-line flags, each also settable from an `IMAGELSH_*`
//! environment variable.

use std::path::PathBuf;

use clap::{ArgAction, Args};

/// Embedding size of the default model (EfficientNet-Lite0): the `dim` of an index created
/// with `dim = 0`.
pub const DEFAULT_MODEL_DIM: u32 = 1280;

#[derive(Debug, Clone, Args)]
pub struct StorageConfig {
    /// Directory of the database and vector files; created if missing.
    #[arg(long, env = "IMAGELSH_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    #[command(flatten)]
    pub storage: StorageConfig,

    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "IMAGELSH_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,

    /// Largest gRPC message, bytes.
    #[arg(long, env = "IMAGELSH_MAX_MESSAGE_BYTES", default_value_t = 64 << 20)]
    pub max_message_bytes: usize,

    /// Concurrent calls per connection.
    #[arg(long, env = "IMAGELSH_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// fsync after every acknowledged write (survives power loss, not only a crash).
    #[arg(long, env = "IMAGELSH_FSYNC", default_value_t = true, action = ArgAction::Set)]
    pub fsync: bool,

    /// sled page cache, MiB.
    #[arg(long, env = "IMAGELSH_CACHE_MB", default_value_t = 512)]
    pub cache_mb: u64,

    /// After SIGTERM, how long running calls may take before the process exits anyway.
    #[arg(long, env = "IMAGELSH_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
}
