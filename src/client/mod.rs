//! Clients of a running server, as the command line runs them: connecting (TLS, tokens), and
//! the bulk-ingest job (sources, retries, resume, progress). They use only the public wire
//! contract, as any other service would.

mod backup;
mod connect;
mod ingest;
mod pictures;
mod progress;
mod retry;
pub mod sheet;
mod source;

pub use backup::{BackupManifest, MANIFEST, backup_server};
pub use connect::{Client, ConnectOptions, connect, connect_all};
pub use ingest::{IngestJob, IngestSummary, Refusal, run_ingest};
pub use pictures::{decode_picture, match_tiles, picture_file};
pub use progress::Progress;
pub use retry::{Backoff, is_retryable, retry_after};
pub use source::{Payload, PlannedItem, SOURCE_KEY, SourceError, plan_sources};

/// What stops a client job.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("TLS files: {0}")]
    Tls(String),
    #[error("cannot reach the server at {address}: {source}")]
    Connect { address: String, source: tonic::transport::Error },
    #[error("the token is not a valid header value (printable ASCII only)")]
    Token,
    #[error("{context}: {status}")]
    Rpc { context: String, status: tonic::Status },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}
