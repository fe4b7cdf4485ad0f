//! The HTTP port (`--http-listen`): probes for orchestrators that do not speak gRPC
//! (`/healthz`: the process answers; `/readyz`: it takes calls) and Prometheus `/metrics`.
//! Metrics need a token with the read role when the server has tokens, as gRPC calls do.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::ApiError;
use super::auth::{Role, TokenSource, authorize_role};
use crate::index::Engine;
use crate::pipeline::ImagePipeline;
use crate::telemetry;

/// What the HTTP port serves from.
#[derive(Clone)]
pub struct HttpState {
    pub engine: Arc<Engine>,
    pub pipeline: Option<Arc<ImagePipeline>>,
    pub tokens: TokenSource,
    /// `None` where no recorder could be installed (another one holds the process).
    pub metrics: Option<PrometheusHandle>,
    pub shutdown: CancellationToken,
}

/// Serves until `shutdown`.
pub async fn serve_http(listener: TcpListener, state: HttpState) -> Result<(), ApiError> {
    let shutdown = state.shutdown.clone();
    let router = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Arc::new(state));
    axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await.map_err(ApiError::Http)
}

async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    "ready\n".into_response()
}

/// 401 or 403 for a request whose token does not carry `role`.
pub(super) fn refused(tokens: &TokenSource, role: Role, headers: &HeaderMap) -> Option<Response> {
    let status = authorize_role(&tokens.tokens(), role, headers).err()?;
    let code = match status.code() {
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        _ => StatusCode::UNAUTHORIZED,
    };
    Some((code, [(header::WWW_AUTHENTICATE, "Bearer")], format!("{}\n", status.message())).into_response())
}

async fn metrics(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refused(&state.tokens, Role::Read, &headers) {
        return refusal;
    }
    let Some(handle) = &state.metrics else {
        return (StatusCode::SERVICE_UNAVAILABLE, "metrics are not recorded in this process\n").into_response();
    };
    // Gauges read at the scrape: sizes and lag from memory, the model's queue.
    let engine = state.engine.clone();
    let sizes = tokio::task::spawn_blocking(move || engine.sizes()).await.unwrap_or_default();
    for size in sizes {
        metrics::gauge!(telemetry::INDEX_ITEMS, "index" => size.name.clone()).set(size.items as f64);
        metrics::gauge!(telemetry::LOG_LAG_ITEMS, "index" => size.name).set(size.unapplied as f64);
    }
    if let Some(pipeline) = &state.pipeline {
        metrics::gauge!(telemetry::BATCHER_QUEUE_DEPTH).set(pipeline.queue_depth() as f64);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}
