//! Service configuration: command-line flags, each also settable from an `IMAGELSH_*`
//! environment variable, and for `serve` from a TOML file (`config_file`: flags > variables >
//! file > defaults).

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args};

use crate::embed::{BatchSizes, ConvSearch, CudaOptions, Device, Embedder, OrtOptions};
use crate::limits::RequestLimits;
use crate::pipeline::{BatcherConfig, DecodeLimits};
use crate::store::cluster::{AckLevel, AckPolicy};

/// Embedding size of the default model (EfficientNet-Lite0): the `dim` of an index created
/// with `dim = 0`.
pub const DEFAULT_MODEL_DIM: u32 = 1280;

#[derive(Debug, Clone, Args)]
pub struct StorageConfig {
    /// Directory of the database and vector files; created if missing.
    #[arg(long, env = "IMAGELSH_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
}

/// The shared store, when indexes live on a Valkey/Redis Cluster rather than in --data-dir.
#[derive(Debug, Clone, Args)]
pub struct ClusterConfig {
    /// Keep the indexes on a Valkey/Redis Cluster shared by every replica, given by seed nodes:
    /// `redis://host:port,host:port,…`. Unset: the embedded sled database in --data-dir.
    #[arg(long, env = "IMAGELSH_STORE", value_name = "URL")]
    pub store: Option<String>,

    /// What a write's acknowledgement waits for on the cluster store: `local` (the primaries'
    /// memory; a failover or power cut can lose it), `replica` (WAIT: also in a replica's
    /// memory), `replica-fsync` (WAITAOF: fsynced on the primary and a replica; Valkey or
    /// Redis 7.2+, and fast only with `appendfsync always`). A batch short of it is refused
    /// UNAVAILABLE and the clients retry.
    #[arg(long, env = "IMAGELSH_ACK", default_value_t = AckLevel::Replica, value_parser = ack_level)]
    pub ack: AckLevel,

    /// How long the acknowledgement waits for replicas before the batch is refused.
    #[arg(long, env = "IMAGELSH_ACK_TIMEOUT_MS", default_value_t = 2000)]
    pub ack_timeout_ms: u64,
}

/// `--ack`'s values (the store's type knows nothing of the command line).
fn ack_level(s: &str) -> Result<AckLevel, String> {
    s.parse()
}

impl ClusterConfig {
    pub fn ack_policy(&self) -> AckPolicy {
        AckPolicy { level: self.ack, timeout: Duration::from_millis(self.ack_timeout_ms.max(1)) }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// A TOML file of settings (keys: these flags' long names); flags and IMAGELSH_* variables
    /// override it, and it overrides the defaults.
    #[arg(long, env = crate::config_file::CONFIG_ENV, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration (as TOML, each value's source in a comment) and exit.
    #[arg(long)]
    pub print_config: bool,

    #[command(flatten)]
    pub storage: StorageConfig,

    #[command(flatten)]
    pub cluster: ClusterConfig,

    #[command(flatten)]
    pub model: ModelConfig,

    #[command(flatten)]
    pub pipeline: PipelineConfig,

    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "IMAGELSH_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,

    /// Address of the HTTP port: /metrics (Prometheus), /healthz, /readyz; `off` for none.
    /// Loopback by default: metrics name the indexes.
    #[arg(long, env = "IMAGELSH_HTTP_LISTEN", default_value = "127.0.0.1:50052")]
    pub http_listen: String,

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

    /// At a clean shutdown, reopen the database once so that sled records a snapshot: the next
    /// start then replays no log (sled 0.34 snapshots only when opening). Costs the stop what
    /// it saves the start.
    #[arg(long, env = "IMAGELSH_CHECKPOINT_ON_SHUTDOWN", default_value_t = true, action = ArgAction::Set)]
    pub checkpoint_on_shutdown: bool,

    /// Indexes whose sketches take at most this many KiB answer default (AUTO) queries by
    /// scanning every sketch instead of reading bucket tables (0: never). Measured crossover:
    /// BENCHMARKS.md.
    #[arg(long, env = "IMAGELSH_FULL_SCAN_THRESHOLD_KB", default_value_t = crate::index::DEFAULT_FULL_SCAN_THRESHOLD_BYTES / 1024)]
    pub full_scan_threshold_kb: u64,

    #[command(flatten)]
    pub write: WriteConfig,

    #[command(flatten)]
    pub limits: LimitsConfig,

    #[command(flatten)]
    pub security: SecurityConfig,
}

/// Bounds on what one client may ask; each refusal names its flag. Defaults:
/// `limits::RequestLimits`.
#[derive(Debug, Clone, Args)]
pub struct LimitsConfig {
    /// Items in one ingest batch, images in one embed batch, ids in one delete.
    #[arg(long, env = "IMAGELSH_MAX_BATCH_ITEMS", default_value_t = RequestLimits::default().max_batch_items)]
    pub max_batch_items: usize,
    /// Length of an item id, bytes.
    #[arg(long, env = "IMAGELSH_MAX_ID_BYTES", default_value_t = RequestLimits::default().max_id_bytes)]
    pub max_id_bytes: usize,
    /// Length of a label, bytes.
    #[arg(long, env = "IMAGELSH_MAX_LABEL_BYTES", default_value_t = RequestLimits::default().max_label_bytes)]
    pub max_label_bytes: usize,
    /// Metadata entries per item.
    #[arg(long, env = "IMAGELSH_MAX_METADATA_ENTRIES", default_value_t = RequestLimits::default().max_metadata_entries)]
    pub max_metadata_entries: usize,
    /// Metadata keys and values of one item together, bytes.
    #[arg(long, env = "IMAGELSH_MAX_METADATA_BYTES", default_value_t = RequestLimits::default().max_metadata_bytes)]
    pub max_metadata_bytes: usize,
    #[arg(long, env = "IMAGELSH_MAX_TOP_K", default_value_t = RequestLimits::default().max_top_k)]
    pub max_top_k: u32,
    #[arg(long, env = "IMAGELSH_MAX_RERANK_DEPTH", default_value_t = RequestLimits::default().max_rerank_depth)]
    pub max_rerank_depth: u32,
    #[arg(long, env = "IMAGELSH_MAX_PROBES", default_value_t = RequestLimits::default().max_probes)]
    pub max_probes: u32,
    /// Embedding dimension of a new index.
    #[arg(long, env = "IMAGELSH_MAX_DIM", default_value_t = RequestLimits::default().max_dim)]
    pub max_dim: u32,
    /// Memory of a new index's hyperplanes and sketch planes, MiB.
    #[arg(long, env = "IMAGELSH_MAX_PLANE_MB", default_value_t = RequestLimits::default().max_plane_bytes >> 20)]
    pub max_plane_mb: u64,
    /// Calls in progress at once over all connections (streams included); more are refused
    /// with RESOURCE_EXHAUSTED. Per connection, --max-concurrent-streams applies too.
    #[arg(long, env = "IMAGELSH_MAX_CALLS", default_value_t = 1024)]
    pub max_calls: usize,
    /// Ingest and embed streams open at once over all connections.
    #[arg(long, env = "IMAGELSH_MAX_STREAMS", default_value_t = 256)]
    pub max_streams: usize,
    /// The longest a unary call may run, seconds; a client's shorter grpc-timeout wins.
    /// Streams run as long as their client's deadline allows (a bulk ingest may take hours).
    #[arg(long, env = "IMAGELSH_MAX_CALL_SECS", default_value_t = 60)]
    pub max_call_secs: u64,
    /// An ingest or embed stream that sends no message for this long is ended with
    /// DEADLINE_EXCEEDED (it would hold its place among --max-streams for ever).
    #[arg(long, env = "IMAGELSH_STREAM_IDLE_SECS", default_value_t = crate::api::DEFAULT_STREAM_IDLE.as_secs())]
    pub stream_idle_secs: u64,
}

impl LimitsConfig {
    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            max_batch_items: self.max_batch_items,
            max_id_bytes: self.max_id_bytes.min(crate::index::MAX_ID_BYTES),
            max_label_bytes: self.max_label_bytes,
            max_metadata_entries: self.max_metadata_entries,
            max_metadata_bytes: self.max_metadata_bytes,
            max_top_k: self.max_top_k,
            max_rerank_depth: self.max_rerank_depth,
            max_probes: self.max_probes,
            max_dim: self.max_dim,
            max_plane_bytes: self.max_plane_mb.saturating_mul(1 << 20),
        }
    }
}

/// Who may connect and call what.
#[derive(Debug, Clone, Args)]
pub struct SecurityConfig {
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "IMAGELSH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM).
    #[arg(long, env = "IMAGELSH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "IMAGELSH_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Bearer tokens, one `ROLE TOKEN` per line (roles: read, write, admin; `#` comments),
    /// reloaded on SIGHUP. Without tokens (here or in IMAGELSH_TOKENS) every call is allowed.
    #[arg(long, env = "IMAGELSH_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Serve gRPC reflection (it lists the API to anyone allowed to read).
    #[arg(long, env = "IMAGELSH_REFLECTION", default_value_t = true, action = ArgAction::Set)]
    pub reflection: bool,
}

/// The write path: the write-ahead log and how far the store may lag behind it. Defaults and
/// their measured reasons: `index::WriteOptions`.
#[derive(Debug, Clone, Args)]
pub struct WriteConfig {
    /// A log segment is closed past this size (KiB); applied segments are deleted whole.
    #[arg(long, env = "IMAGELSH_LOG_SEGMENT_KB", default_value_t = crate::index::WriteOptions::default().segment_bytes / 1024)]
    pub log_segment_kb: u64,

    /// Logged item writes and removals that start a group apply into the store.
    #[arg(long, env = "IMAGELSH_APPLY_AFTER_ITEMS", default_value_t = crate::index::WriteOptions::default().apply_after_operations)]
    pub apply_after_items: usize,

    /// The longest a logged batch waits before a group apply starts, ms.
    #[arg(long, env = "IMAGELSH_APPLY_DELAY_MS", default_value_t = crate::index::WriteOptions::default().apply_delay.as_millis() as u64)]
    pub apply_delay_ms: u64,

    /// Item writes and removals in one group apply at most.
    #[arg(long, env = "IMAGELSH_MAX_APPLY_ITEMS", default_value_t = crate::index::WriteOptions::default().max_apply_operations)]
    pub max_apply_items: usize,

    /// Bytes applied to sled after which it is checkpointed (closed and reopened, KiB; 0:
    /// never): bounds what sled replays after a crash. Reads and writes wait while it runs.
    #[arg(long, env = "IMAGELSH_CHECKPOINT_KB", default_value_t = crate::store::SledOptions::default().checkpoint_bytes / 1024)]
    pub checkpoint_kb: u64,

    /// Writers wait while this many logged item writes and removals are not yet applied: it
    /// bounds what a start replays from the log.
    #[arg(long, env = "IMAGELSH_MAX_LOG_LAG_ITEMS", default_value_t = crate::index::WriteOptions::default().max_lag_operations)]
    pub max_log_lag_items: usize,

    /// sled's files are rewritten (copied into a fresh database, swapped in) once the items
    /// removed since the last rewrite reach this share of the live items (0: never while
    /// serving; `imagelsh compact` does it offline). Writes wait during the copy.
    #[arg(long, env = "IMAGELSH_COMPACT_REMOVED_SHARE", default_value_t = crate::index::WriteOptions::default().compact_removed_share)]
    pub compact_removed_share: f64,

    /// …and at least this many items were removed.
    #[arg(long, env = "IMAGELSH_COMPACT_MIN_REMOVED", default_value_t = crate::index::WriteOptions::default().compact_min_removed)]
    pub compact_min_removed: u64,
}

impl WriteConfig {
    pub fn options(&self, fsync: bool) -> crate::index::WriteOptions {
        crate::index::WriteOptions {
            segment_bytes: self.log_segment_kb.saturating_mul(1024).max(1),
            apply_after_operations: self.apply_after_items.max(1),
            apply_delay: Duration::from_millis(self.apply_delay_ms),
            max_apply_operations: self.max_apply_items.max(1),
            max_lag_operations: self.max_log_lag_items.max(1),
            fsync,
            compact_removed_share: self.compact_removed_share,
            compact_min_removed: self.compact_min_removed,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ModelConfig {
    /// The ONNX image model; its card is the `.json` file beside it.
    #[arg(long, env = "IMAGELSH_MODEL", default_value = "models/efficientnet_lite0.onnx")]
    pub model: PathBuf,

    /// ONNX Runtime's `libonnxruntime.so.*`. Default: the one `scripts/setup-ort` installs in `./.venv`.
    #[arg(long = "ort-lib", env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,

    /// Where inference runs: `auto` tries CUDA and falls back to CPU.
    #[arg(long, env = "IMAGELSH_DEVICE", value_enum, default_value_t = Device::Auto)]
    pub device: Device,

    /// Threads per inference instance (CPU provider). Default: the cores available divided
    /// among the instances.
    #[arg(long, env = "IMAGELSH_INTRA_THREADS")]
    pub intra_threads: Option<usize>,

    /// Let idle inference threads spin (faster inference, less CPU for everything else).
    #[arg(long, env = "IMAGELSH_INTRA_SPINNING", default_value_t = false, action = ArgAction::Set)]
    pub intra_spinning: bool,

    /// The batch sizes the model runs at (comma-separated), each warmed at start; a batch is
    /// padded to the smallest that holds it. Default: 1,4,16,64 on CUDA (up to --max-batch in
    /// steps of 4), every size up to 8 on the CPU.
    #[arg(long, env = "IMAGELSH_BATCH_SIZES", value_name = "SIZES")]
    pub batch_sizes: Option<BatchSizes>,

    /// Largest batch, when --batch-sizes is not given (the sizes below it follow the provider's
    /// rule). Default: 64 on CUDA, 8 on the CPU.
    #[arg(long, env = "IMAGELSH_MAX_BATCH")]
    pub max_batch: Option<usize>,

    /// Batches the model runs at once (sessions of each batch size). Default: 2 on CUDA (one
    /// batch is copied and launched while the other computes); on the CPU one per 4 cores.
    #[arg(long, env = "IMAGELSH_MODEL_INSTANCES")]
    pub model_instances: Option<usize>,

    /// CUDA device number.
    #[arg(long, env = "IMAGELSH_CUDA_DEVICE", default_value_t = 0)]
    pub cuda_device: i32,

    /// How cuDNN chooses convolution algorithms (paid once per batch size, at start).
    #[arg(long, env = "IMAGELSH_CUDA_CONV_SEARCH", value_enum, default_value_t = ConvSearch::Exhaustive)]
    pub cuda_conv_search: ConvSearch,

    /// TensorFloat-32 convolutions and matrix products on CUDA (Ampere and later): faster,
    /// embeddings within cosine 0.999 of fp32 (BENCHMARKS.md).
    #[arg(long, env = "IMAGELSH_CUDA_TF32", default_value_t = false, action = ArgAction::Set)]
    pub cuda_tf32: bool,

    /// Channels-last (NHWC) convolutions on CUDA.
    #[arg(long, env = "IMAGELSH_CUDA_NHWC", default_value_t = false, action = ArgAction::Set)]
    pub cuda_nhwc: bool,

    /// Serve embeddings only (no model, no ONNX Runtime): image items and queries are refused.
    #[arg(long, env = "IMAGELSH_NO_MODEL")]
    pub no_model: bool,
}

impl ModelConfig {
    /// The ONNX Runtime library: the flag or variable, else the one in `./.venv`.
    pub fn ort_library(&self) -> Result<PathBuf, String> {
        if let Some(path) = &self.ort_lib {
            return Ok(path.clone());
        }
        venv_ort_library(std::path::Path::new(".")).ok_or_else(|| {
            "no ONNX Runtime library: run scripts/setup-ort, or pass --ort-lib / ORT_DYLIB_PATH \
             (or --no-model to serve embeddings only)"
                .to_string()
        })
    }

    /// ONNX Runtime's options from these flags.
    pub fn ort_options(&self) -> Result<OrtOptions, String> {
        let library = self.ort_library()?;
        let batch_sizes = match (&self.batch_sizes, self.max_batch) {
            (Some(sizes), _) => Some(sizes.clone()),
            (None, Some(0)) => return Err("--max-batch must be at least 1".into()),
            (None, _) => None,
        };
        Ok(OrtOptions {
            library,
            device: self.device,
            intra_threads: self.intra_threads,
            spinning: self.intra_spinning,
            batch_sizes,
            max_batch: self.max_batch,
            instances: self.model_instances,
            cuda: CudaOptions {
                device_id: self.cuda_device,
                conv_search: self.cuda_conv_search,
                tf32: self.cuda_tf32,
                prefer_nhwc: self.cuda_nhwc,
            },
            session_per_size: None,
            profile: None,
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct PipelineConfig {
    /// How long a free model instance waits for its batch to fill, milliseconds. Default: 5 on
    /// CUDA, 2 on the CPU.
    #[arg(long, env = "IMAGELSH_MAX_DELAY_MS")]
    pub max_delay_ms: Option<u64>,

    /// Images waiting for the model, at most. Decoded images in memory stay under
    /// queue-capacity + (instances + 2) × the largest batch (~600 KB each for the default
    /// model). Default: 4 batches per instance, at least 128.
    #[arg(long, env = "IMAGELSH_QUEUE_CAPACITY")]
    pub queue_capacity: Option<usize>,

    /// How long a request may wait for room in the queue before RESOURCE_EXHAUSTED, milliseconds.
    #[arg(long, env = "IMAGELSH_QUEUE_TIMEOUT_MS", default_value_t = 10_000)]
    pub queue_timeout_ms: u64,

    /// Parallel decoders. Default: the cores available.
    #[arg(long, env = "IMAGELSH_DECODE_WORKERS")]
    pub decode_workers: Option<usize>,

    /// Largest encoded image, bytes.
    #[arg(long, env = "IMAGELSH_MAX_IMAGE_BYTES", default_value_t = 32 << 20)]
    pub max_image_bytes: usize,

    /// Largest image width or height, pixels (checked before decoding).
    #[arg(long, env = "IMAGELSH_MAX_IMAGE_SIDE", default_value_t = 12_000)]
    pub max_image_side: u32,

    /// Largest image width × height, pixels (checked before decoding).
    #[arg(long, env = "IMAGELSH_MAX_IMAGE_PIXELS", default_value_t = DecodeLimits::default().max_pixels)]
    pub max_image_pixels: u64,
}

impl PipelineConfig {
    /// The batcher in front of `embedder`: its defaults follow the provider and the batch shapes.
    pub fn batcher(&self, embedder: &dyn Embedder) -> BatcherConfig {
        let cuda = embedder.provider() == "CUDA";
        let batches = embedder.batch_sizes().largest() * embedder.instances().max(1);
        BatcherConfig {
            max_delay: Duration::from_millis(self.max_delay_ms.unwrap_or(if cuda { 5 } else { 2 })),
            queue_capacity: self.queue_capacity.unwrap_or((4 * batches).max(128)),
            queue_timeout: Duration::from_millis(self.queue_timeout_ms),
        }
    }

    pub fn limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_encoded_bytes: self.max_image_bytes,
            max_side: self.max_image_side,
            max_pixels: self.max_image_pixels,
            ..DecodeLimits::default()
        }
    }

    pub fn decoders(&self) -> usize {
        self.decode_workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// `libonnxruntime.so.*` of the `onnxruntime` wheel in `root/.venv` (what `scripts/setup-ort`
/// installs), if there is one.
pub fn venv_ort_library(root: &std::path::Path) -> Option<PathBuf> {
    let pythons = std::fs::read_dir(root.join(".venv/lib")).ok()?;
    pythons.flatten().find_map(|python| {
        let capi = python.path().join("site-packages/onnxruntime/capi");
        std::fs::read_dir(capi)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so.")))
    })
}
