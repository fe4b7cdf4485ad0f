//! The `imagelsh.v1.ImageIndex` service: validates requests, turns them into pipeline and
//! domain calls (blocking work on blocking threads), and maps results back. No storage,
//! hashing or decoding logic lives here.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::index::{Engine, Index, IndexError, IndexSpec, ItemFailure, QueryBy, QueryOptions, VectorItem};
use crate::pipeline::{ImageError, ImagePipeline};
use crate::proto::image_index_server::ImageIndex;
use crate::proto::{self, item::Content, query_request};

/// Responses a stream may have queued before the server waits for the client to read them.
const STREAM_RESPONSE_BUFFER: usize = 4;

#[derive(Clone)]
pub struct ImageIndexService {
    engine: Arc<Engine>,
    /// `None` when the server runs without a model (embeddings only).
    pipeline: Option<Arc<ImagePipeline>>,
    shutdown: CancellationToken,
}

impl ImageIndexService {
    pub fn new(engine: Arc<Engine>, pipeline: Option<Arc<ImagePipeline>>, shutdown: CancellationToken) -> Self {
        Self { engine, pipeline, shutdown }
    }

    fn pipeline(&self) -> Result<&Arc<ImagePipeline>, Status> {
        self.pipeline.as_ref().ok_or_else(|| Status::failed_precondition(NO_MODEL))
    }

    async fn index(&self, name: String) -> Result<Arc<Index>, Status> {
        let engine = self.engine.clone();
        blocking(move || engine.index(&name)).await
    }

    /// The model's embeddings fit the index, or INVALID_ARGUMENT.
    fn check_model(pipeline: &ImagePipeline, index: &Index) -> Result<(), Status> {
        let card = pipeline.card();
        index.accepts_model(&card.name, card.dim).map_err(Status::from)
    }

    async fn ingest_batch(&self, request: proto::IngestRequest) -> Result<proto::IngestResponse, Status> {
        let index = self.index(request.index).await?;
        let mut vectors = Vec::with_capacity(request.items.len());
        let mut failures = Vec::new();
        let mut images = Vec::new();
        for (position, item) in (0u32..).zip(request.items) {
            let proto::Item { id, label, metadata, content } = item;
            match content {
                Some(Content::Embedding(e)) => {
                    vectors.push((position, VectorItem { id, label, metadata, vector: e.values }))
                }
                Some(Content::Image(bytes)) => {
                    images.push((position, VectorItem { id, label, metadata, vector: Vec::new() }, bytes))
                }
                None => failures.push(ItemFailure {
                    position,
                    id,
                    message: "item has neither an image nor an embedding".into(),
                }),
            }
        }
        if !images.is_empty() {
            let usable = match &self.pipeline {
                None => Err(NO_MODEL.to_string()),
                Some(p) => Self::check_model(p, &index).map(|()| p).map_err(|s| s.message().to_string()),
            };
            match usable {
                Err(message) => failures.extend(images.into_iter().map(|(position, item, _)| ItemFailure {
                    position,
                    id: item.id,
                    message: message.clone(),
                })),
                Ok(pipeline) => {
                    let (meta, bytes): (Vec<_>, Vec<_>) = images.into_iter().map(|(p, item, b)| ((p, item), b)).unzip();
                    for ((position, mut item), embedded) in meta.into_iter().zip(pipeline.embed_all(bytes).await) {
                        match embedded {
                            Ok(vector) => {
                                item.vector = vector;
                                vectors.push((position, item));
                            }
                            Err(ImageError::Decode(e)) => {
                                failures.push(ItemFailure { position, id: item.id, message: e.to_string() })
                            }
                            Err(ImageError::Batch(e)) => return Err(e.into()),
                        }
                    }
                }
            }
        }
        // Request order decides which of two items with one id wins.
        vectors.sort_by_key(|(position, _)| *position);
        let outcome = blocking(move || index.ingest(vectors)).await?;
        failures.extend(outcome.failures);
        failures.sort_by_key(|f| f.position);
        Ok(proto::IngestResponse {
            batch_id: request.batch_id,
            indexed: outcome.indexed,
            errors: failures.into_iter().map(Into::into).collect(),
        })
    }

    async fn embed_batch(&self, request: proto::EmbedRequest) -> Result<proto::EmbedResponse, Status> {
        let pipeline = self.pipeline()?;
        let mut embeddings = Vec::with_capacity(request.images.len());
        let mut errors = Vec::new();
        for (position, result) in (0u32..).zip(pipeline.embed_all(request.images).await) {
            match result {
                Ok(values) => embeddings.push(proto::Embedding { values }),
                Err(ImageError::Decode(e)) => {
                    embeddings.push(proto::Embedding::default());
                    errors.push(proto::ItemError { position, id: String::new(), message: e.to_string() });
                }
                Err(ImageError::Batch(e)) => return Err(e.into()),
            }
        }
        Ok(proto::EmbedResponse { batch_id: request.batch_id, embeddings, errors })
    }
}

const NO_MODEL: &str = "this server runs without an embedding model (--no-model); send embeddings";

/// Runs blocking domain work off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, IndexError> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(Status::from),
        Err(e) => {
            tracing::error!(error = %e, "blocking task failed");
            Err(Status::internal("internal error"))
        }
    }
}

/// Answers each message of a request stream in order, one at a time, so that a client sending
/// faster than the server works is held back by HTTP/2 flow control. Once shutdown begins, the
/// message in hand is finished and the stream ends with UNAVAILABLE; an error ends it too.
fn respond_in_order<Req, Resp, F, Fut>(
    mut inbound: Streaming<Req>,
    shutdown: CancellationToken,
    handle: F,
) -> ReceiverStream<Result<Resp, Status>>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: Fn(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send,
{
    let (tx, rx) = mpsc::channel(STREAM_RESPONSE_BUFFER);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Err(Status::unavailable("the server is shutting down")),
                next = inbound.message() => next,
            };
            let response = match next {
                Ok(Some(request)) => handle(request).await,
                Ok(None) => break,
                Err(status) => Err(super::map_decode_status(status)),
            };
            let failed = response.is_err();
            if tx.send(response).await.is_err() || failed {
                break;
            }
        }
    });
    ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl ImageIndex for ImageIndexService {
    async fn create_index(
        &self,
        request: Request<proto::CreateIndexRequest>,
    ) -> Result<Response<proto::IndexInfo>, Status> {
        let r = request.into_inner();
        // The index holds the served model's embeddings when its dimension is the model's;
        // it then takes the model's center unless told otherwise.
        let served = self.pipeline.as_ref().map(|p| p.card()).filter(|card| r.dim == 0 || r.dim == card.dim);
        let model = served.map(|card| card.name.clone()).unwrap_or_default();
        let center = if !r.center.is_empty() {
            Some(r.center)
        } else if r.no_center {
            None
        } else {
            served.and_then(|card| card.center.clone())
        };
        let spec = IndexSpec {
            name: r.name,
            dim: r.dim,
            hash_bits: r.hash_bits,
            tables: r.tables,
            seed: r.seed,
            model,
            center,
            sketch_bits: r.sketch_bits,
            store_vectors: r.store_embeddings,
        };
        let engine = self.engine.clone();
        let info = blocking(move || engine.create(spec)).await?;
        tracing::info!(index = %info.def.name, dim = info.def.dim, k = info.def.hash_bits, l = info.def.tables, model = %info.def.model, "index created");
        Ok(Response::new(info.into()))
    }

    async fn get_index(&self, request: Request<proto::GetIndexRequest>) -> Result<Response<proto::IndexInfo>, Status> {
        let index = self.index(request.into_inner().name).await?;
        let info = blocking(move || index.info()).await?;
        Ok(Response::new(info.into()))
    }

    async fn list_indexes(
        &self,
        _: Request<proto::ListIndexesRequest>,
    ) -> Result<Response<proto::ListIndexesResponse>, Status> {
        let engine = self.engine.clone();
        let infos = blocking(move || engine.list()).await?;
        Ok(Response::new(proto::ListIndexesResponse { indexes: infos.into_iter().map(Into::into).collect() }))
    }

    async fn drop_index(
        &self,
        request: Request<proto::DropIndexRequest>,
    ) -> Result<Response<proto::DropIndexResponse>, Status> {
        let name = request.into_inner().name;
        let engine = self.engine.clone();
        let dropped = name.clone();
        blocking(move || engine.drop_index(&name)).await?;
        tracing::info!(index = %dropped, "index dropped");
        Ok(Response::new(proto::DropIndexResponse {}))
    }

    type IngestStream = ReceiverStream<Result<proto::IngestResponse, Status>>;

    async fn ingest(
        &self,
        request: Request<Streaming<proto::IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        let this = self.clone();
        let stream = respond_in_order(request.into_inner(), self.shutdown.clone(), move |batch| {
            let this = this.clone();
            async move { this.ingest_batch(batch).await }
        });
        Ok(Response::new(stream))
    }

    async fn query(&self, request: Request<proto::QueryRequest>) -> Result<Response<proto::QueryResponse>, Status> {
        let r = request.into_inner();
        let plan = proto::SearchPlan::try_from(r.plan)
            .map_err(|_| Status::invalid_argument(format!("unknown search plan {}", r.plan)))?;
        let index = self.index(r.index).await?;
        let by = match r.query {
            Some(query_request::Query::Embedding(e)) => QueryBy::Vector(e.values),
            Some(query_request::Query::Id(id)) => QueryBy::Id(id),
            Some(query_request::Query::Image(bytes)) => {
                let pipeline = self.pipeline()?;
                Self::check_model(pipeline, &index)?;
                match pipeline.embed(bytes).await {
                    Ok(vector) => QueryBy::Vector(vector),
                    Err(ImageError::Decode(e)) => return Err(Status::invalid_argument(e.to_string())),
                    Err(ImageError::Batch(e)) => return Err(e.into()),
                }
            }
            None => return Err(Status::invalid_argument("a query needs an image, an embedding or an id")),
        };
        let options = QueryOptions {
            top_k: r.top_k,
            min_votes: r.min_votes,
            probes: r.probes,
            rerank: r.rerank,
            rerank_depth: r.rerank_depth,
            plan: plan.into(),
        };
        let result = blocking(move || index.query(by, &options)).await?;
        Ok(Response::new(proto::QueryResponse {
            hits: result.hits.into_iter().map(Into::into).collect(),
            candidates: result.candidates,
            plan: proto::SearchPlan::from(result.plan).into(),
        }))
    }

    async fn delete(&self, request: Request<proto::DeleteRequest>) -> Result<Response<proto::DeleteResponse>, Status> {
        let r = request.into_inner();
        let index = self.index(r.index).await?;
        let deleted = blocking(move || index.delete(&r.ids)).await?;
        Ok(Response::new(proto::DeleteResponse { deleted: deleted as u32 }))
    }

    type EmbedStream = ReceiverStream<Result<proto::EmbedResponse, Status>>;

    async fn embed(
        &self,
        request: Request<Streaming<proto::EmbedRequest>>,
    ) -> Result<Response<Self::EmbedStream>, Status> {
        self.pipeline()?;
        let this = self.clone();
        let stream = respond_in_order(request.into_inner(), self.shutdown.clone(), move |batch| {
            let this = this.clone();
            async move { this.embed_batch(batch).await }
        });
        Ok(Response::new(stream))
    }
}
