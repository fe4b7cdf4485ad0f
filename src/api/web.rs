//! The web page on the HTTP port: `/` (drop an image, see its best matches as a grid) and
//! `/indexes` (the indexes and their sizes). The pages are static shells; what they show comes
//! from `/api/…` with the same bearer tokens and roles as gRPC (the page keeps the token the
//! person types in this tab's session storage), through the same use cases and limits.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::auth::Role;
use super::http_port::{HttpState, refused};
use crate::index::{LookupFields, QueryOptions};
use crate::usecase::{QueryInput, UseCaseError};

pub const SEARCH_PAGE: &str = include_str!("web/search.html");
pub const INDEXES_PAGE: &str = include_str!("web/indexes.html");
pub const SCRIPT: &str = include_str!("web/page.js");
pub const STYLE: &str = include_str!("web/page.css");

pub async fn search_page() -> Html<&'static str> {
    Html(SEARCH_PAGE)
}

pub async fn indexes_page() -> Html<&'static str> {
    Html(INDEXES_PAGE)
}

pub async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT).into_response()
}

pub async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}

#[derive(Debug, Serialize)]
struct IndexRow {
    name: String,
    items: u64,
    dim: u32,
    hash_bits: u32,
    tables: u32,
    model: String,
    thumbnails: bool,
    stores_embeddings: bool,
}

/// `GET /api/indexes`: every index and its size (read role).
pub async fn list(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refused(&state.tokens, Role::Read, &headers) {
        return refusal;
    }
    match state.cases.list().await {
        Ok(infos) => Json(
            infos
                .into_iter()
                .map(|info| IndexRow {
                    name: info.def.name,
                    items: info.items,
                    dim: info.def.dim,
                    hash_bits: info.def.hash_bits,
                    tables: info.def.tables,
                    model: info.def.model,
                    thumbnails: info.def.thumbnails,
                    stores_embeddings: info.def.stores_vectors,
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(error) => error_response(error),
    }
}

#[derive(Debug, Deserialize)]
pub struct QueryParams {
    /// Matches to return; 0 or absent: the server's default.
    #[serde(default)]
    top_k: u32,
}

#[derive(Debug, Serialize)]
struct PageHit {
    id: String,
    label: String,
    votes: u32,
    similarity: f32,
    /// A `data:` URL of the thumbnail, where the index keeps one for this item.
    thumbnail: Option<String>,
    source: Option<String>,
}

#[derive(Debug, Serialize)]
struct PageAnswer {
    hits: Vec<PageHit>,
    candidates: u32,
    ms: f64,
}

/// `POST /api/indexes/{name}/query?top_k=N` with the image as the body (read role): the best
/// matches, with thumbnails.
pub async fn query(
    State(state): State<Arc<HttpState>>,
    Path(index): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refusal) = refused(&state.tokens, Role::Read, &headers) {
        return refusal;
    }
    if body.is_empty() {
        return (StatusCode::BAD_REQUEST, "send the image as the request body\n").into_response();
    }
    let started = std::time::Instant::now();
    let options = QueryOptions { top_k: params.top_k, ..Default::default() };
    let result = match state.cases.query(index.clone(), QueryInput::Image(body.to_vec()), options).await {
        Ok(result) => result,
        Err(error) => return error_response(error),
    };
    let ids: Vec<String> = result.hits.iter().map(|h| h.id.clone()).collect();
    let fields = LookupFields { thumbnails: true, ..Default::default() };
    let mut thumbnails: std::collections::HashMap<String, Vec<u8>> =
        match state.cases.get_items(index, ids, fields).await {
            Ok(lookup) => lookup.found.into_iter().filter_map(|f| Some((f.id, f.thumbnail?))).collect(),
            Err(error) => return error_response(error),
        };
    let hits = result
        .hits
        .into_iter()
        .map(|hit| PageHit {
            thumbnail: thumbnails.remove(&hit.id).map(|jpeg| {
                format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(jpeg))
            }),
            source: hit.metadata.get(crate::client::SOURCE_KEY).cloned(),
            id: hit.id,
            label: hit.label,
            votes: hit.votes,
            similarity: hit.similarity,
        })
        .collect();
    let ms = started.elapsed().as_secs_f64() * 1e3;
    Json(PageAnswer { hits, candidates: result.candidates, ms }).into_response()
}

/// The use case's error as gRPC would report it, with the matching HTTP status.
fn error_response(error: UseCaseError) -> Response {
    let status = tonic::Status::from(error);
    let code = match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition | tonic::Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::AlreadyExists => StatusCode::CONFLICT,
        tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, format!("{}\n", status.message())).into_response()
}
