//! The physical floor of durable ingest on this machine: a gRPC server with imagelsh's Ingest
//! contract that only appends the embeddings it receives to one file, one fdatasync per group
//! of batches from all streams (the cadence of imagelsh's log writer), and acknowledges them.
//! No hashing, no indexing, no log records: what any durable ingest must at least pay here.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;

use imagelsh::proto::image_index_server::{ImageIndex, ImageIndexServer};
use imagelsh::proto::{self, item::Content};
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

struct Floor {
    writes: mpsc::Sender<(Vec<u8>, oneshot::Sender<()>)>,
}

/// Starts the floor server on a free loopback port, writing to `path`; returns its address.
pub async fn start(path: PathBuf) -> String {
    let (writes, queue) = mpsc::channel::<(Vec<u8>, oneshot::Sender<()>)>();
    std::thread::spawn(move || {
        let mut file = std::fs::File::create(&path).unwrap();
        while let Ok(first) = queue.recv() {
            let mut group = vec![first];
            group.extend(queue.try_iter());
            for (bytes, _) in &group {
                file.write_all(bytes).unwrap();
            }
            file.sync_data().unwrap();
            for (_, done) in group {
                let _ = done.send(());
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let service = ImageIndexServer::new(Floor { writes }).max_decoding_message_size(64 << 20);
    tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
    addr
}

type Acks = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::IngestResponse, Status>> + Send>>;
type Embeddings = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::EmbedResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ImageIndex for Floor {
    type IngestStream = Acks;
    type EmbedStream = Embeddings;
    type BackupStream = tokio_stream::Empty<Result<proto::BackupChunk, Status>>;

    async fn backup(&self, _: Request<proto::BackupRequest>) -> Result<Response<Self::BackupStream>, Status> {
        Err(Status::unimplemented("floor"))
    }

    async fn ingest(&self, request: Request<Streaming<proto::IngestRequest>>) -> Result<Response<Acks>, Status> {
        let mut batches = request.into_inner();
        let writes = self.writes.clone();
        let acks =
            async_stream_acks(move |tx: tokio::sync::mpsc::Sender<Result<proto::IngestResponse, Status>>| async move {
                while let Some(Ok(batch)) = batches.next().await {
                    let mut bytes = Vec::new();
                    let mut indexed = 0;
                    for item in &batch.items {
                        if let Some(Content::Embedding(e)) = &item.content {
                            e.values.iter().for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
                            indexed += 1;
                        }
                    }
                    let (done, durable) = oneshot::channel();
                    if writes.send((bytes, done)).is_err() || durable.await.is_err() {
                        return;
                    }
                    let ack = proto::IngestResponse { batch_id: batch.batch_id, indexed, errors: vec![] };
                    if tx.send(Ok(ack)).await.is_err() {
                        return;
                    }
                }
            });
        Ok(Response::new(acks))
    }

    async fn create_index(&self, _: Request<proto::CreateIndexRequest>) -> Result<Response<proto::IndexInfo>, Status> {
        Err(Status::unimplemented("floor"))
    }
    async fn get_index(&self, _: Request<proto::GetIndexRequest>) -> Result<Response<proto::IndexInfo>, Status> {
        Err(Status::unimplemented("floor"))
    }
    async fn list_indexes(
        &self,
        _: Request<proto::ListIndexesRequest>,
    ) -> Result<Response<proto::ListIndexesResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }
    async fn drop_index(
        &self,
        _: Request<proto::DropIndexRequest>,
    ) -> Result<Response<proto::DropIndexResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }
    async fn query(&self, _: Request<proto::QueryRequest>) -> Result<Response<proto::QueryResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }
    async fn delete(&self, _: Request<proto::DeleteRequest>) -> Result<Response<proto::DeleteResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }
    async fn get_items(&self, _: Request<proto::GetItemsRequest>) -> Result<Response<proto::GetItemsResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }
    async fn embed(&self, _: Request<Streaming<proto::EmbedRequest>>) -> Result<Response<Embeddings>, Status> {
        Err(Status::unimplemented("floor"))
    }
}

/// A response stream fed by a task: `body(tx)` sends the acks.
fn async_stream_acks<F, Fut>(body: F) -> Acks
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<proto::IngestResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
