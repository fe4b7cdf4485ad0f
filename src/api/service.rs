//! The `imagelsh.v1.ImageIndex` service: validates requests, turns them into domain calls on a
//! blocking thread, and maps results back. No storage or hashing logic lives here.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::index::{Engine, IndexError, IndexSpec, ItemFailure, QueryBy, QueryOptions, VectorItem};
use crate::proto::image_index_server::ImageIndex;
use crate::proto::{self, item::Content, query_request};

/// Responses a stream may have queued before the server waits for the client to read them.
const STREAM_RESPONSE_BUFFER: usize = 4;

#[derive(Clone)]
pub struct ImageIndexService {
    engine: Arc<Engine>,
    shutdown: CancellationToken,
}

impl ImageIndexService {
    pub fn new(engine: Arc<Engine>, shutdown: CancellationToken) -> Self {
        Self { engine, shutdown }
    }
}

/// Runs blocking domain work off the async runtime.
async fn run_blocking<T: Send + 'static>(
    engine: &Arc<Engine>,
    work: impl FnOnce(&Engine) -> Result<T, IndexError> + Send + 'static,
) -> Result<T, Status> {
    let engine = engine.clone();
    match tokio::task::spawn_blocking(move || work(&engine)).await {
        Ok(result) => result.map_err(Status::from),
        Err(e) => {
            tracing::error!(error = %e, "blocking task failed");
            Err(Status::internal("internal error"))
        }
    }
}

fn unavailable() -> Status {
    Status::unavailable("the server is shutting down")
}

/// Splits a batch's items into embeddings to index and items refused before indexing.
fn vector_items(items: Vec<proto::Item>) -> (Vec<(u32, VectorItem)>, Vec<ItemFailure>) {
    let mut vectors = Vec::with_capacity(items.len());
    let mut failures = Vec::new();
    for (position, item) in (0u32..).zip(items) {
        let refuse = |message: &str| ItemFailure { position, id: item.id.clone(), message: message.to_string() };
        match item.content {
            Some(Content::Embedding(e)) => vectors.push((
                position,
                VectorItem { id: item.id, label: item.label, metadata: item.metadata, vector: e.values },
            )),
            Some(Content::Image(_)) => {
                failures.push(refuse("image items are not supported by this server yet; send embeddings"))
            }
            None => failures.push(refuse("item has neither an image nor an embedding")),
        }
    }
    (vectors, failures)
}

async fn ingest_batch(engine: &Arc<Engine>, request: proto::IngestRequest) -> Result<proto::IngestResponse, Status> {
    let (vectors, mut failures) = vector_items(request.items);
    let index = request.index;
    let outcome = run_blocking(engine, move |e| e.index(&index)?.ingest(vectors)).await?;
    failures.extend(outcome.failures);
    failures.sort_by_key(|f| f.position);
    Ok(proto::IngestResponse {
        batch_id: request.batch_id,
        indexed: outcome.indexed,
        errors: failures.into_iter().map(Into::into).collect(),
    })
}

#[tonic::async_trait]
impl ImageIndex for ImageIndexService {
    async fn create_index(
        &self,
        request: Request<proto::CreateIndexRequest>,
    ) -> Result<Response<proto::IndexInfo>, Status> {
        let r = request.into_inner();
        let spec = IndexSpec {
            name: r.name,
            dim: r.dim,
            hash_bits: r.hash_bits,
            tables: r.tables,
            seed: r.seed,
            model: String::new(),
        };
        let info = run_blocking(&self.engine, move |e| e.create(spec)).await?;
        tracing::info!(index = %info.def.name, dim = info.def.dim, k = info.def.hash_bits, l = info.def.tables, "index created");
        Ok(Response::new(info.into()))
    }

    async fn get_index(&self, request: Request<proto::GetIndexRequest>) -> Result<Response<proto::IndexInfo>, Status> {
        let name = request.into_inner().name;
        let info = run_blocking(&self.engine, move |e| e.index(&name)?.info()).await?;
        Ok(Response::new(info.into()))
    }

    async fn list_indexes(
        &self,
        _: Request<proto::ListIndexesRequest>,
    ) -> Result<Response<proto::ListIndexesResponse>, Status> {
        let infos = run_blocking(&self.engine, |e| e.list()).await?;
        Ok(Response::new(proto::ListIndexesResponse { indexes: infos.into_iter().map(Into::into).collect() }))
    }

    async fn drop_index(
        &self,
        request: Request<proto::DropIndexRequest>,
    ) -> Result<Response<proto::DropIndexResponse>, Status> {
        let name = request.into_inner().name;
        let dropped = name.clone();
        run_blocking(&self.engine, move |e| e.drop_index(&name)).await?;
        tracing::info!(index = %dropped, "index dropped");
        Ok(Response::new(proto::DropIndexResponse {}))
    }

    type IngestStream = ReceiverStream<Result<proto::IngestResponse, Status>>;

    /// Batches of one stream are handled one after another, so responses come in order and a
    /// client that sends faster than the index writes is held back by HTTP/2 flow control.
    async fn ingest(
        &self,
        request: Request<Streaming<proto::IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_RESPONSE_BUFFER);
        let engine = self.engine.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => Err(unavailable()),
                    next = inbound.message() => next,
                };
                let response = match next {
                    Ok(Some(batch)) => ingest_batch(&engine, batch).await,
                    Ok(None) => break,
                    Err(status) => Err(super::map_decode_status(status)),
                };
                let failed = response.is_err();
                if tx.send(response).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn query(&self, request: Request<proto::QueryRequest>) -> Result<Response<proto::QueryResponse>, Status> {
        let r = request.into_inner();
        let by = match r.query {
            Some(query_request::Query::Embedding(e)) => QueryBy::Vector(e.values),
            Some(query_request::Query::Id(id)) => QueryBy::Id(id),
            Some(query_request::Query::Image(_)) => {
                return Err(Status::invalid_argument(
                    "image queries are not supported by this server yet; send an embedding",
                ));
            }
            None => return Err(Status::invalid_argument("a query needs an image, an embedding or an id")),
        };
        let options = QueryOptions { top_k: r.top_k, min_votes: r.min_votes };
        let index = r.index;
        let result = run_blocking(&self.engine, move |e| e.index(&index)?.query(by, &options)).await?;
        Ok(Response::new(proto::QueryResponse {
            hits: result.hits.into_iter().map(Into::into).collect(),
            candidates: result.candidates,
        }))
    }

    async fn delete(&self, request: Request<proto::DeleteRequest>) -> Result<Response<proto::DeleteResponse>, Status> {
        let r = request.into_inner();
        let index = r.index;
        let deleted = run_blocking(&self.engine, move |e| e.index(&index)?.delete(&r.ids)).await?;
        Ok(Response::new(proto::DeleteResponse { deleted: deleted as u32 }))
    }

    type EmbedStream = ReceiverStream<Result<proto::EmbedResponse, Status>>;

    async fn embed(&self, _: Request<Streaming<proto::EmbedRequest>>) -> Result<Response<Self::EmbedStream>, Status> {
        Err(Status::unimplemented("Embed needs an embedding model, which this server does not load yet"))
    }
}
