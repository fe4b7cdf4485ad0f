//! The bulk-ingest job: planned items → (resume: ask which ids the index already holds) →
//! batches read in parallel → several ingest streams, each with a bounded window of
//! unacknowledged batches. A stream that breaks on a transient error is reopened after a
//! backoff and its unacknowledged batches sent again (ingesting an id again replaces the item,
//! so a batch sent twice leaves the index as if sent once). An interrupted job stops taking
//! new batches and waits for the acknowledgements of those in flight, so that its summary is
//! exact and a rerun skips exactly what was acknowledged.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use super::{Backoff, Client, ClientError, PlannedItem, Progress, is_retryable};
use crate::proto;

/// How a bulk ingest runs.
#[derive(Debug, Clone)]
pub struct IngestJob {
    pub index: String,
    /// Concurrent ingest streams.
    pub streams: usize,
    /// Items per batch (the server refuses more than its --max-batch-items).
    pub batch_items: usize,
    /// Bytes of images per batch (the server refuses messages over its --max-message-bytes).
    pub batch_bytes: u64,
    /// Unacknowledged batches per stream.
    pub in_flight: usize,
    /// Batches read (and IDX images encoded) at once.
    pub readers: usize,
    pub backoff: Backoff,
    /// Skip the ids the index already holds.
    pub resume: bool,
    /// Create the index with the server's defaults when it does not exist.
    pub create_missing: bool,
    /// Keep thumbnails in an index this job creates (for `query --sheet` and the web page).
    pub thumbnails: bool,
    /// Files larger than this are refused without being read.
    pub max_item_bytes: u64,
}

impl IngestJob {
    pub fn new(index: impl Into<String>) -> Self {
        Self {
            index: index.into(),
            streams: 4,
            batch_items: 64,
            batch_bytes: 4 << 20,
            in_flight: 4,
            readers: 2,
            backoff: Backoff::default(),
            resume: true,
            create_missing: true,
            thumbnails: true,
            max_item_bytes: 32 << 20,
        }
    }
}

/// An item not indexed, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Refusal {
    pub id: String,
    pub source: String,
    pub reason: String,
}

/// What a job did.
#[derive(Debug, Clone, Default)]
pub struct IngestSummary {
    /// Items the sources hold.
    pub planned: u64,
    /// Items acknowledged as indexed by this run.
    pub indexed: u64,
    /// Items the index already held (resume).
    pub skipped: u64,
    pub refused: Vec<Refusal>,
    /// Calls and streams tried again after a transient error.
    pub retries: u64,
    pub elapsed: Duration,
    /// The job was stopped before it sent everything.
    pub interrupted: bool,
}

impl IngestSummary {
    /// Items neither indexed, skipped nor refused (an interrupted job's rest).
    pub fn remaining(&self) -> u64 {
        self.planned.saturating_sub(self.indexed + self.skipped + self.refused.len() as u64)
    }
}

/// Ids asked for per GetItems call when resuming (well under the server's --max-batch-items).
const LOOKUP_IDS: usize = 1000;

/// A batch read and ready to send, with what is needed to send it again and to name its items.
struct ReadyBatch {
    request: proto::IngestRequest,
    sources: Vec<String>,
}

/// Shared by the stages: refusals as they come.
#[derive(Default)]
struct Tally {
    refused: Mutex<Vec<Refusal>>,
}

impl Tally {
    fn refuse(&self, progress: &Progress, refusals: Vec<Refusal>) {
        progress.refused(refusals.len() as u64);
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).extend(refusals);
    }
}

/// Runs `job` over `items` (and reports `duplicates` as refused) until done, `stop` is
/// cancelled (then in-flight batches are still acknowledged), or an error that retries do
/// not cure.
///
/// With several `clients` (replicas of one store), stream `i` starts on client `i mod n`, and
/// a stream that breaks is sent again through the next one: a replica that dies hands its
/// streams to the others.
pub async fn run_ingest(
    clients: Vec<Client>,
    job: &IngestJob,
    items: Vec<PlannedItem>,
    duplicates: Vec<PlannedItem>,
    progress: &Arc<Progress>,
    stop: CancellationToken,
) -> Result<IngestSummary, ClientError> {
    let started = Instant::now();
    let clients = Arc::new(clients);
    let Some(client) = clients.first().cloned() else {
        return Err(ClientError::Address { address: String::new(), reason: "no server given".into() });
    };
    let planned = (items.len() + duplicates.len()) as u64;
    let tally = Arc::new(Tally::default());
    tally.refuse(
        progress,
        duplicates
            .iter()
            .map(|d| Refusal {
                id: d.id.clone(),
                source: d.source().into(),
                reason: "an earlier item has this id".into(),
            })
            .collect(),
    );
    ensure_index(&client, job, progress).await?;

    // A failure in one stage stops the others.
    let abort = stop.child_token();
    let capacity = job.streams.max(1) * job.in_flight.max(1);
    let (plan_tx, plan_rx) = mpsc::channel::<Vec<PlannedItem>>(capacity);
    let (ready_tx, ready_rx) = mpsc::channel::<ReadyBatch>(capacity);
    let planner =
        tokio::spawn(plan_batches(client.clone(), job.clone(), items, plan_tx, progress.clone(), abort.clone()));
    let reader = tokio::spawn(read_batches(job.clone(), plan_rx, ready_tx, tally.clone(), progress.clone()));
    let queue = Arc::new(tokio::sync::Mutex::new(ready_rx));
    let workers: Vec<_> = (0..job.streams.max(1))
        .map(|n| {
            let stream = StreamWorker {
                clients: clients.clone(),
                first: n,
                job: job.clone(),
                queue: queue.clone(),
                tally: tally.clone(),
                progress: progress.clone(),
                stop: abort.clone(),
            };
            tokio::spawn(stream.run())
        })
        .collect();

    let mut first_error = None;
    for worker in workers {
        if let Err(error) = joined(worker.await) {
            abort.cancel();
            first_error.get_or_insert(error);
        }
    }
    // The workers are done: nothing reads the queue any more.
    drop(queue);
    for result in [joined(planner.await), joined(reader.await)] {
        if let Err(error) = result {
            first_error.get_or_insert(error);
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    let refused = std::mem::take(&mut *tally.refused.lock().unwrap_or_else(|e| e.into_inner()));
    let (indexed, skipped) = progress.indexed_and_skipped();
    Ok(IngestSummary {
        planned,
        indexed,
        skipped,
        refused,
        retries: progress.retries(),
        elapsed: started.elapsed(),
        interrupted: stop.is_cancelled(),
    })
}

fn joined(result: Result<Result<(), ClientError>, tokio::task::JoinError>) -> Result<(), ClientError> {
    match result {
        Ok(result) => result,
        Err(e) => {
            Err(ClientError::Rpc { context: "a job task failed".into(), status: Status::internal(e.to_string()) })
        }
    }
}

/// Calls `call` until it succeeds, fails for good, or the retries run out.
async fn with_retries<T, F, Fut>(
    backoff: &Backoff,
    progress: &Progress,
    context: &str,
    mut call: F,
) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if is_retryable(&status) && attempt < backoff.retries => {
                tracing::debug!(%status, attempt, "{context}: retrying");
                progress.retried();
                tokio::time::sleep(backoff.delay_after(attempt, &status)).await;
                attempt += 1;
            }
            Err(status) => return Err(ClientError::Rpc { context: context.into(), status }),
        }
    }
}

/// The index exists, or is created with the server's defaults.
async fn ensure_index(client: &Client, job: &IngestJob, progress: &Progress) -> Result<(), ClientError> {
    let name = job.index.clone();
    let get = with_retries(&job.backoff, progress, "looking up the index", || {
        let (mut client, name) = (client.clone(), name.clone());
        async move { client.get_index(proto::GetIndexRequest { name }).await }
    })
    .await;
    match get {
        Ok(_) => Ok(()),
        Err(ClientError::Rpc { status, .. }) if status.code() == Code::NotFound && job.create_missing => {
            let create =
                proto::CreateIndexRequest { name: name.clone(), thumbnails: job.thumbnails, ..Default::default() };
            match with_retries(&job.backoff, progress, "creating the index", || {
                let (mut client, create) = (client.clone(), create.clone());
                async move { client.create_index(create).await }
            })
            .await
            {
                Ok(info) => {
                    tracing::info!(index = %info.name, dim = info.dim, k = info.hash_bits, l = info.tables, "index created");
                    Ok(())
                }
                // Another job created it meanwhile.
                Err(ClientError::Rpc { status, .. }) if status.code() == Code::AlreadyExists => Ok(()),
                Err(error) => Err(error),
            }
        }
        Err(error) => Err(error),
    }
}

/// Resume: leaves out the ids the index holds. Then cuts batches of at most `batch_items`
/// items and (by file size) `batch_bytes`.
async fn plan_batches(
    client: Client,
    job: IngestJob,
    items: Vec<PlannedItem>,
    out: mpsc::Sender<Vec<PlannedItem>>,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> Result<(), ClientError> {
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        if stop.is_cancelled() {
            return Ok(());
        }
        let mut chunk: Vec<PlannedItem> = items.by_ref().take(LOOKUP_IDS).collect();
        if job.resume {
            let request = proto::GetItemsRequest {
                index: job.index.clone(),
                ids: chunk.iter().map(|i| i.id.clone()).collect(),
                ..Default::default()
            };
            let lookup = with_retries(&job.backoff, &progress, "asking which items the index holds", || {
                let (mut client, request) = (client.clone(), request.clone());
                async move { client.get_items(request).await }
            })
            .await?;
            let missing: HashSet<String> = lookup.missing.into_iter().collect();
            let before = chunk.len();
            chunk.retain(|item| missing.contains(&item.id));
            progress.skipped((before - chunk.len()) as u64);
        }
        let mut batch = Vec::new();
        let mut bytes = 0;
        for item in chunk {
            let size = item.size_hint();
            if !batch.is_empty() && (batch.len() >= job.batch_items.max(1) || bytes + size > job.batch_bytes) {
                if out.send(std::mem::take(&mut batch)).await.is_err() {
                    return Ok(());
                }
                bytes = 0;
            }
            bytes += size;
            batch.push(item);
        }
        if !batch.is_empty() && out.send(batch).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads the planned batches' images, `readers` batches at once, in order.
async fn read_batches(
    job: IngestJob,
    planned: mpsc::Receiver<Vec<PlannedItem>>,
    out: mpsc::Sender<ReadyBatch>,
    tally: Arc<Tally>,
    progress: Arc<Progress>,
) -> Result<(), ClientError> {
    let next_id = std::sync::atomic::AtomicU64::new(1);
    let mut reads = ReceiverStream::new(planned)
        .map(|batch| {
            let limit = job.max_item_bytes;
            tokio::task::spawn_blocking(move || read_batch(batch, limit))
        })
        .buffered(job.readers.max(1));
    while let Some(read) = reads.next().await {
        let (items, sources, refusals) = read.map_err(|e| ClientError::Rpc {
            context: "reading images".into(),
            status: Status::internal(e.to_string()),
        })?;
        if !refusals.is_empty() {
            tally.refuse(&progress, refusals);
        }
        if items.is_empty() {
            continue;
        }
        let batch_id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let request = proto::IngestRequest { index: job.index.clone(), batch_id, items };
        if out.send(ReadyBatch { request, sources }).await.is_err() {
            // The streams stopped (interrupted or failed): the rest is not sent.
            return Ok(());
        }
    }
    Ok(())
}

type ReadBatch = (Vec<proto::Item>, Vec<String>, Vec<Refusal>);

fn read_batch(batch: Vec<PlannedItem>, max_item_bytes: u64) -> ReadBatch {
    let mut items = Vec::with_capacity(batch.len());
    let mut sources = Vec::with_capacity(batch.len());
    let mut refusals = Vec::new();
    for planned in batch {
        let refuse = |reason: String| Refusal { id: planned.id.clone(), source: planned.source().into(), reason };
        let size = planned.size_hint();
        if size > max_item_bytes {
            refusals.push(refuse(format!("{size} bytes, more than --max-item-bytes ({max_item_bytes})")));
            continue;
        }
        match planned.read() {
            Ok(bytes) => {
                sources.push(planned.source().to_string());
                items.push(proto::Item {
                    id: planned.id,
                    label: planned.label,
                    metadata: planned.metadata,
                    content: Some(proto::item::Content::Image(bytes)),
                });
            }
            Err(reason) => refusals.push(refuse(reason)),
        }
    }
    (items, sources, refusals)
}

/// One ingest stream and its window of unacknowledged batches.
struct StreamWorker {
    /// The servers; the stream opens on `first` (mod their number), then the next after each
    /// break.
    clients: Arc<Vec<Client>>,
    first: usize,
    job: IngestJob,
    queue: Arc<tokio::sync::Mutex<mpsc::Receiver<ReadyBatch>>>,
    tally: Arc<Tally>,
    progress: Arc<Progress>,
    stop: CancellationToken,
}

/// How a stream ended.
enum StreamEnd {
    /// Every batch it took is acknowledged and no more will come.
    Done,
    Failed(Status),
}

impl StreamWorker {
    async fn run(self) -> Result<(), ClientError> {
        let mut pending: VecDeque<ReadyBatch> = VecDeque::new();
        let mut taking = true;
        // Failures in a row without an acknowledgement in between.
        let mut failures = 0u32;
        let mut server = self.first;
        loop {
            let client = self.clients[server % self.clients.len()].clone();
            match self.stream(client, &mut pending, &mut taking, &mut failures).await {
                StreamEnd::Done => return Ok(()),
                StreamEnd::Failed(status) if is_retryable(&status) && failures < self.job.backoff.retries => {
                    let wait = self.job.backoff.delay_after(failures, &status);
                    tracing::warn!(%status, unacknowledged = pending.len(), ?wait, "ingest stream broke; sending its batches again");
                    self.progress.retried();
                    failures += 1;
                    server += 1;
                    tokio::time::sleep(wait).await;
                }
                StreamEnd::Failed(status) => {
                    return Err(ClientError::Rpc { context: format!("ingesting into {:?}", self.job.index), status });
                }
            }
        }
    }

    /// Opens a stream, sends the unacknowledged batches again, then takes new ones while the
    /// window has room, until the queue ends (or `stop`) and everything is acknowledged.
    async fn stream(
        &self,
        mut client: Client,
        pending: &mut VecDeque<ReadyBatch>,
        taking: &mut bool,
        failures: &mut u32,
    ) -> StreamEnd {
        let window = self.job.in_flight.max(1);
        // Room for the whole window: sending never waits on the server.
        let (tx, rx) = mpsc::channel(window + 1);
        for batch in pending.iter() {
            let _ = tx.try_send(batch.request.clone());
        }
        let mut responses = match client.ingest(ReceiverStream::new(rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => return StreamEnd::Failed(status),
        };
        loop {
            if !*taking && pending.is_empty() {
                return StreamEnd::Done;
            }
            let room = *taking && pending.len() < window;
            tokio::select! {
                biased;
                response = responses.message() => match response {
                    Ok(Some(ack)) => {
                        if let Err(status) = self.acknowledged(pending, ack) {
                            return StreamEnd::Failed(status);
                        }
                        *failures = 0;
                    }
                    Ok(None) => return StreamEnd::Failed(Status::unavailable("the server ended the stream early")),
                    Err(status) => return StreamEnd::Failed(status),
                },
                _ = self.stop.cancelled(), if *taking => *taking = false,
                next = async { self.queue.lock().await.recv().await }, if room => match next {
                    Some(batch) => {
                        let _ = tx.try_send(batch.request.clone());
                        pending.push_back(batch);
                    }
                    None => *taking = false,
                },
            }
        }
    }

    /// Books the acknowledgement of the oldest unacknowledged batch.
    fn acknowledged(&self, pending: &mut VecDeque<ReadyBatch>, ack: proto::IngestResponse) -> Result<(), Status> {
        let Some(batch) = pending.pop_front() else {
            return Err(Status::internal("an acknowledgement for a batch not sent"));
        };
        if ack.batch_id != batch.request.batch_id {
            return Err(Status::internal(format!(
                "acknowledgement for batch {} where {} was next",
                ack.batch_id, batch.request.batch_id
            )));
        }
        self.progress.indexed(u64::from(ack.indexed));
        if !ack.errors.is_empty() {
            let refusals = ack
                .errors
                .into_iter()
                .map(|e| Refusal {
                    source: batch.sources.get(e.position as usize).cloned().unwrap_or_default(),
                    id: e.id,
                    reason: e.message,
                })
                .collect();
            self.tally.refuse(&self.progress, refusals);
        }
        Ok(())
    }
}
