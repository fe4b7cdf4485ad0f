//! Transport: the gRPC server, its standard health and reflection services, and the limits and
//! shutdown behaviour around them. Knows the domain (`crate::index`), not the store.

pub mod auth;
pub mod codec;
mod convert;
pub mod guard;
mod http_port;
mod metered;
mod service;
mod status;
mod web;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::limits::RequestLimits;
use crate::pipeline::ImagePipeline;
use crate::proto::image_index_server::ImageIndexServer;
use crate::usecase::Indexes;
pub use auth::{Role, TokenSource, Tokens, TokensError};
pub use convert::query_call;
pub use guard::GuardLimits;
pub use http_port::{HttpState, serve_http};
pub use service::ImageIndexService;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("HTTP port: {0}")]
    Http(std::io::Error),
    #[error("reading {path}: {source}")]
    TlsFile { path: std::path::PathBuf, source: std::io::Error },
    #[error("clearing {path}: {source}")]
    BackupStaging { path: std::path::PathBuf, source: std::io::Error },
}

/// PEM files of the server's TLS identity, and of the CA its clients' certificates must come
/// from (mutual TLS) when given.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: Option<std::path::PathBuf>,
}

impl TlsFiles {
    fn config(&self) -> Result<tonic::transport::ServerTlsConfig, ApiError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| ApiError::TlsFile { path: path.to_path_buf(), source })
        };
        let identity = tonic::transport::Identity::from_pem(read(&self.cert)?, read(&self.key)?);
        let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        Ok(config)
    }
}

/// Everything about how the server meets its clients. The default: no TLS, no tokens (every
/// call allowed), the default limits, no reflection: for tests and embedded use.
#[derive(Clone)]
pub struct ServeOptions {
    pub limits: Limits,
    pub requests: RequestLimits,
    pub guard: GuardLimits,
    pub tls: Option<TlsFiles>,
    pub tokens: TokenSource,
    pub reflection: bool,
    /// An ingest or embed stream that sends nothing for this long is ended.
    pub stream_idle: Duration,
    /// Where Backup copies the data directory before streaming it (emptied at start: what is
    /// there is left by a backup a crash interrupted).
    pub backup_staging: std::path::PathBuf,
}

/// Bounds on what clients may ask of the server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request or response message, bytes. Larger requests get RESOURCE_EXHAUSTED.
    pub max_message_bytes: usize,
    /// Concurrent HTTP/2 streams (calls) per connection.
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_message_bytes: 64 << 20, max_concurrent_streams: 256 }
    }
}

/// Serves until `shutdown` is cancelled: then new calls get UNAVAILABLE, ingest streams finish
/// the batch in hand and end, and this returns once every call has completed.
///
/// Around every service, outermost first: the status rewrite (tonic's codes → the contract's),
/// authentication, then the call limits and deadlines (`guard`); message sizes are tonic's.
pub async fn serve(
    indexes: impl Into<Indexes>,
    pipeline: Option<Arc<ImagePipeline>>,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> Result<(), ApiError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    type Served = InterceptedService<ImageIndexServer<ImageIndexService>, RefuseWhenShuttingDown>;
    health.set_serving::<Served>().await;

    let reflection = if options.reflection {
        Some(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .build_v1()?,
        )
    } else {
        None
    };

    let limits = &options.limits;
    if options.backup_staging.exists() {
        std::fs::remove_dir_all(&options.backup_staging)
            .map_err(|source| ApiError::BackupStaging { path: options.backup_staging.clone(), source })?;
    }
    let service = ImageIndexService::new(
        indexes.into(),
        pipeline,
        options.requests.clone(),
        options.stream_idle,
        shutdown.clone(),
        options.backup_staging.clone(),
    );
    let image_index = ImageIndexServer::new(service)
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
    let image_index = InterceptedService::new(image_index, RefuseWhenShuttingDown(shutdown.clone()));

    let layers = tower::ServiceBuilder::new()
        .layer(metered::MeteredLayer)
        .layer(tower::util::MapResponseLayer::new(too_large_is_resource_exhausted))
        .layer(auth::AuthLayer::new(options.tokens.clone()))
        .layer(guard::GuardLayer::new(options.guard.clone()))
        .into_inner();
    let mut builder = Server::builder();
    if let Some(tls) = &options.tls {
        builder = builder.tls_config(tls.config()?)?;
    }
    // tcp_nodelay on the builder applies only to listeners tonic binds itself: without it on
    // ours, Nagle's algorithm held 1% of responses back by a delayed-ACK period (40 ms).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    builder
        .layer(layers)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_optional_service(reflection)
        .add_service(image_index)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.cancelled().await;
            health.set_not_serving::<Served>().await;
        })
        .await?;
    Ok(())
}

/// The service a Tower layer calls next: `inner` was polled ready, and the clone left in its
/// place is polled anew for the next call (tower's rule for services called from a future).
fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            requests: RequestLimits::default(),
            guard: GuardLimits::default(),
            tls: None,
            tokens: TokenSource::default(),
            reflection: false,
            stream_idle: DEFAULT_STREAM_IDLE,
            // The default data directory's.
            backup_staging: std::path::PathBuf::from("./data/backup-staging"),
        }
    }
}

/// How long an ingest or embed stream may send nothing: a bulk job between files, a client
/// waiting on its own disk; not a client that went away without closing.
pub const DEFAULT_STREAM_IDLE: Duration = Duration::from_secs(300);

/// Answers UNAVAILABLE to calls that arrive once shutdown has begun.
#[derive(Clone)]
pub struct RefuseWhenShuttingDown(CancellationToken);

impl tonic::service::Interceptor for RefuseWhenShuttingDown {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.0.is_cancelled() {
            return Err(tonic::Status::unavailable("the server is shutting down"));
        }
        Ok(request)
    }
}

/// tonic answers a request larger than the message limit with OUT_OF_RANGE; the contract says
/// RESOURCE_EXHAUSTED for every bound a client hits. Unary calls carry that status in the
/// response headers (streams are mapped where their messages are read).
fn too_large_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let out_of_range = headers.get("grpc-status").is_some_and(|s| s.as_bytes() == b"11");
    if out_of_range && headers.get("grpc-message").is_some_and(|m| is_too_large_message(m.as_bytes())) {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

/// Whether a (possibly percent-encoded) grpc-message is tonic's "message length too large".
fn is_too_large_message(message: &[u8]) -> bool {
    let text = String::from_utf8_lossy(message).replace("%20", " ");
    text.contains("message length too large")
}

/// The same rewrite for a status read from a request stream.
pub(crate) fn map_decode_status(status: tonic::Status) -> tonic::Status {
    if status.code() == tonic::Code::OutOfRange && is_too_large_message(status.message().as_bytes()) {
        return tonic::Status::resource_exhausted(status.message().to_string());
    }
    status
}
