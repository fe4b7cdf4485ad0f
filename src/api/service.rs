//! The `imagelsh.v1.ImageIndex` service: converts messages into use-case and domain calls
//! (`crate::usecase`) and their results back; errors map to status codes in `status`. No
//! storage, hashing, decoding or ingest logic lives here.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::index::LookupFields;
use crate::limits::RequestLimits;
use crate::pipeline::ImagePipeline;
use crate::proto;
use crate::proto::image_index_server::ImageIndex;
use crate::usecase::{IncomingItem, Indexes, NewIndex, UseCaseError, UseCases, blocking};

/// Responses a stream may have queued before the server waits for the client to read them.
const STREAM_RESPONSE_BUFFER: usize = 4;

#[derive(Clone)]
pub struct ImageIndexService {
    cases: UseCases,
    shutdown: CancellationToken,
    /// A stream that sends nothing for this long is ended (DEADLINE_EXCEEDED): it would hold
    /// its stream permit for ever.
    stream_idle: Duration,
    /// Where backups are copied before they are streamed (in the data directory: the same
    /// file system, so the copy is fast and the pause on writes short).
    backup_staging: PathBuf,
}

/// Bytes of one backup chunk: far under any message bound.
const BACKUP_CHUNK_BYTES: usize = 1 << 20;

impl ImageIndexService {
    pub fn new(
        indexes: Indexes,
        pipeline: Option<Arc<ImagePipeline>>,
        limits: RequestLimits,
        stream_idle: Duration,
        shutdown: CancellationToken,
        backup_staging: PathBuf,
    ) -> Self {
        Self { cases: UseCases::new(indexes, pipeline, limits), shutdown, stream_idle, backup_staging }
    }

    async fn ingest_batch(&self, request: proto::IngestRequest) -> Result<proto::IngestResponse, Status> {
        self.cases.limits().check_batch(request.items.len()).map_err(UseCaseError::TooLarge)?;
        let items = request.items.into_iter().map(IncomingItem::from).collect();
        let outcome = self.cases.ingest(&request.index, items).await?;
        tracing::debug!(indexed = outcome.indexed, refused = outcome.failures.len(), "batch acknowledged");
        Ok(proto::IngestResponse {
            batch_id: request.batch_id,
            indexed: outcome.indexed,
            errors: outcome.failures.into_iter().map(Into::into).collect(),
        })
    }

    async fn embed_batch(&self, request: proto::EmbedRequest) -> Result<proto::EmbedResponse, Status> {
        self.cases.limits().check_batch(request.images.len()).map_err(UseCaseError::TooLarge)?;
        let mut embeddings = Vec::with_capacity(request.images.len());
        let mut errors = Vec::new();
        for (position, result) in (0u32..).zip(self.cases.embed(request.images).await?) {
            match result {
                Ok(values) => embeddings.push(proto::Embedding { values }),
                Err(message) => {
                    embeddings.push(proto::Embedding::default());
                    errors.push(proto::ItemError { position, id: String::new(), message });
                }
            }
        }
        Ok(proto::EmbedResponse { batch_id: request.batch_id, embeddings, errors })
    }
}

/// The span of one stream message, below its call's: traces and logs name the batch.
fn batch_span(batch_id: u64, items: usize) -> tracing::Span {
    tracing::info_span!("batch", batch_id, items)
}

/// Answers each message of a request stream in order, one at a time, so that a client sending
/// faster than the server works is held back by HTTP/2 flow control. Once shutdown begins, the
/// message in hand is finished and the stream ends with UNAVAILABLE; an error ends it too.
fn respond_in_order<Req, Resp, F, Fut>(
    mut inbound: Streaming<Req>,
    shutdown: CancellationToken,
    idle: Duration,
    handle: F,
) -> ReceiverStream<Result<Resp, Status>>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: Fn(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send,
{
    let (tx, rx) = mpsc::channel(STREAM_RESPONSE_BUFFER);
    // The stream's work runs in the call's span (a spawned task would leave it), each message in
    // a span of its own below it.
    let call_span = tracing::Span::current();
    tokio::spawn(
        async move {
            loop {
                let next = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => Err(Status::unavailable("the server is shutting down")),
                    next = tokio::time::timeout(idle, inbound.message()) => next.unwrap_or_else(|_| {
                        Err(Status::deadline_exceeded(format!(
                            "no message for {} s (--stream-idle-secs): the stream is ended",
                            idle.as_secs()
                        )))
                    }),
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
        }
        .instrument(call_span),
    );
    ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl ImageIndex for ImageIndexService {
    async fn create_index(
        &self,
        request: Request<proto::CreateIndexRequest>,
    ) -> Result<Response<proto::IndexInfo>, Status> {
        let info = self.cases.create(NewIndex::from(request.into_inner())).await?;
        tracing::info!(index = %info.def.name, dim = info.def.dim, k = info.def.hash_bits, l = info.def.tables, model = %info.def.model, "index created");
        Ok(Response::new(info.into()))
    }

    async fn get_index(&self, request: Request<proto::GetIndexRequest>) -> Result<Response<proto::IndexInfo>, Status> {
        let info = self.cases.info(request.into_inner().name).await?;
        Ok(Response::new(info.into()))
    }

    async fn list_indexes(
        &self,
        _: Request<proto::ListIndexesRequest>,
    ) -> Result<Response<proto::ListIndexesResponse>, Status> {
        let infos = self.cases.list().await?;
        Ok(Response::new(proto::ListIndexesResponse { indexes: infos.into_iter().map(Into::into).collect() }))
    }

    async fn drop_index(
        &self,
        request: Request<proto::DropIndexRequest>,
    ) -> Result<Response<proto::DropIndexResponse>, Status> {
        let name = request.into_inner().name;
        let dropped = name.clone();
        self.cases.drop_index(name).await?;
        tracing::info!(index = %dropped, "index dropped");
        Ok(Response::new(proto::DropIndexResponse {}))
    }

    type IngestStream = ReceiverStream<Result<proto::IngestResponse, Status>>;

    async fn ingest(
        &self,
        request: Request<Streaming<proto::IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        let this = self.clone();
        let stream = respond_in_order(request.into_inner(), self.shutdown.clone(), self.stream_idle, move |batch| {
            let this = this.clone();
            let span = batch_span(batch.batch_id, batch.items.len());
            async move { this.ingest_batch(batch).await }.instrument(span)
        });
        Ok(Response::new(stream))
    }

    async fn query(&self, request: Request<proto::QueryRequest>) -> Result<Response<proto::QueryResponse>, Status> {
        let (index, input, options) = super::convert::query_call(request.into_inner())?;
        let result = self.cases.query(index, input, options).await?;
        Ok(Response::new(proto::QueryResponse {
            hits: result.hits.into_iter().map(Into::into).collect(),
            candidates: result.candidates,
            plan: proto::SearchPlan::from(result.plan).into(),
        }))
    }

    async fn delete(&self, request: Request<proto::DeleteRequest>) -> Result<Response<proto::DeleteResponse>, Status> {
        let r = request.into_inner();
        let deleted = self.cases.delete(r.index, r.ids).await?;
        Ok(Response::new(proto::DeleteResponse { deleted: deleted as u32 }))
    }

    async fn get_items(
        &self,
        request: Request<proto::GetItemsRequest>,
    ) -> Result<Response<proto::GetItemsResponse>, Status> {
        let r = request.into_inner();
        let fields = LookupFields { embeddings: r.with_embeddings, thumbnails: r.with_thumbnails };
        let lookup = self.cases.get_items(r.index, r.ids, fields).await?;
        Ok(Response::new(lookup.into()))
    }

    type BackupStream = ReceiverStream<Result<proto::BackupChunk, Status>>;

    async fn backup(&self, _: Request<proto::BackupRequest>) -> Result<Response<Self::BackupStream>, Status> {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let staging = self.backup_staging.join(format!("{}-{}", stamp.as_secs(), stamp.subsec_nanos()));
        let report = match self.cases.backup(staging.clone()).await {
            Ok(report) => report,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(error.into());
            }
        };
        tracing::info!(
            files = report.files,
            mb = report.bytes >> 20,
            paused_ms = report.paused.as_millis() as u64,
            "backup copied; streaming it"
        );
        let (tx, rx) = mpsc::channel(STREAM_RESPONSE_BUFFER);
        tokio::spawn(async move {
            if let Err(status) = stream_backup(&report, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
            if let Err(error) = tokio::fs::remove_dir_all(&report.dir).await {
                tracing::warn!(%error, dir = %report.dir.display(), "could not remove a streamed backup");
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type EmbedStream = ReceiverStream<Result<proto::EmbedResponse, Status>>;

    async fn embed(
        &self,
        request: Request<Streaming<proto::EmbedRequest>>,
    ) -> Result<Response<Self::EmbedStream>, Status> {
        self.cases.pipeline()?;
        let this = self.clone();
        let stream = respond_in_order(request.into_inner(), self.shutdown.clone(), self.stream_idle, move |batch| {
            let this = this.clone();
            let span = batch_span(batch.batch_id, batch.images.len());
            async move { this.embed_batch(batch).await }.instrument(span)
        });
        Ok(Response::new(stream))
    }
}

/// Sends every file of the backup in `report.dir` in chunks, then the summary. Stops quietly
/// when the client has gone.
async fn stream_backup(
    report: &crate::index::BackupReport,
    tx: &mpsc::Sender<Result<proto::BackupChunk, Status>>,
) -> Result<(), Status> {
    let io = |e: std::io::Error| Status::internal(format!("reading the backup: {e}"));
    let root = report.dir.clone();
    let files = blocking(move || Ok(crate::index::backup_files(&root)?)).await?;
    for file in files {
        let relative = file.strip_prefix(&report.dir).map_err(|e| Status::internal(e.to_string()))?;
        let path = relative.iter().map(|part| part.to_string_lossy()).collect::<Vec<_>>().join("/");
        let mut reader = tokio::fs::File::open(&file).await.map_err(io)?;
        let mut offset = 0u64;
        loop {
            let mut data = vec![0u8; BACKUP_CHUNK_BYTES];
            let n = read_full(&mut reader, &mut data).await.map_err(io)?;
            data.truncate(n);
            // Every file is sent, the empty ones as one empty chunk.
            if n > 0 || offset == 0 {
                let chunk = proto::BackupChunk { path: path.clone(), offset, data, done: None };
                if tx.send(Ok(chunk)).await.is_err() {
                    return Ok(());
                }
            }
            offset += n as u64;
            if n < BACKUP_CHUNK_BYTES {
                break;
            }
        }
    }
    let done = proto::BackupSummary { files: report.files, bytes: report.bytes, items: report.items };
    let _ = tx.send(Ok(proto::BackupChunk { done: Some(done), ..Default::default() })).await;
    Ok(())
}

/// Reads until `buf` is full or the file ends; the bytes read.
async fn read_full(reader: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
