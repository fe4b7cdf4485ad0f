//! The HTTP port (`--http-listen`): probes for orchestrators that do not speak gRPC
//! (`/healthz`: the process answers; `/readyz`: it takes calls), Prometheus `/metrics`, and the
//! web page (`web`). Metrics and the page's data need a token with the read role when the
//! server has tokens, as gRPC calls do.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::ApiError;
use super::auth::{Role, TokenSource, authorize_role};
use super::web;
use crate::telemetry;
use crate::usecase::UseCases;

/// What the HTTP port serves from.
#[derive(Clone)]
pub struct HttpState {
    /// The same use cases, and so the same limits, as the gRPC service.
    pub cases: UseCases,
    pub tokens: TokenSource,
    /// The largest request body (an image the page queries by): the gRPC message bound.
    pub max_body_bytes: usize,
    /// Page queries running at once; more wait.
    pub max_calls: usize,
    /// `None` where no recorder could be installed (another one holds the process).
    pub metrics: Option<PrometheusHandle>,
    pub shutdown: CancellationToken,
}

/// Serves until `shutdown`.
pub async fn serve_http(listener: TcpListener, state: HttpState) -> Result<(), ApiError> {
    let shutdown = state.shutdown.clone();
    let api = axum::Router::new()
        .route("/api/indexes", get(web::list))
        .route("/api/indexes/{name}/query", post(web::query))
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(state.max_calls.max(1)));
    let router = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(web::search_page))
        .route("/indexes", get(web::indexes_page))
        .route("/static/page.js", get(web::script))
        .route("/static/page.css", get(web::style))
        .merge(api)
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
    let sizes = state.cases.sizes().await.unwrap_or_default();
    for size in sizes {
        metrics::gauge!(telemetry::INDEX_ITEMS, "index" => size.name.clone()).set(size.items as f64);
        metrics::gauge!(telemetry::LOG_LAG_ITEMS, "index" => size.name).set(size.unapplied as f64);
    }
    if let Ok(pipeline) = state.cases.pipeline() {
        metrics::gauge!(telemetry::BATCHER_QUEUE_DEPTH).set(pipeline.queue_depth() as f64);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}
