//! The dynamic batcher: items from every stream and call share one bounded queue in front of
//! the model. A batch goes to the model when it holds `max_batch` items or when its oldest item
//! has waited `max_delay`. At most `queue_capacity + 4 × max_batch` decoded images exist at once
//! (queued; being collected, handed to the model, in the model — with its input copy — or
//! answered but not yet picked up): each is ~600 KB for a 224×224 model. A full queue makes callers wait (and so, through HTTP/2 flow
//! control, the clients); a caller that cannot enqueue within `queue_timeout` gets an error.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::embed::Embedder;

#[derive(Debug, Clone)]
pub struct BatcherConfig {
    pub max_batch: usize,
    pub max_delay: Duration,
    /// Items waiting for the model, at most.
    pub queue_capacity: usize,
    pub queue_timeout: Duration,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BatchError {
    #[error("the model's queue stayed full for {0:?}; retry later")]
    QueueFull(Duration),
    #[error("the batcher has stopped")]
    Stopped,
    #[error("inference failed: {0}")]
    Inference(String),
}

/// Counters for operators and tests.
#[derive(Debug, Default)]
pub struct BatcherStats {
    pub batches: AtomicU64,
    pub items: AtomicU64,
    pub largest_batch: AtomicU64,
    /// Time the model spent on batches, nanoseconds.
    pub busy_nanos: AtomicU64,
}

struct Job {
    input: Vec<f32>,
    reply: oneshot::Sender<Result<Vec<f32>, BatchError>>,
    queued: Instant,
}

#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Job>,
    queue_timeout: Duration,
    stats: Arc<BatcherStats>,
}

impl Batcher {
    /// Starts the worker on the current tokio runtime.
    pub fn start(embedder: Arc<dyn Embedder>, config: BatcherConfig) -> Self {
        let (queue, jobs) = mpsc::channel(config.queue_capacity.max(1));
        let stats = Arc::new(BatcherStats::default());
        tokio::spawn(run(embedder, config.clone(), jobs, stats.clone()));
        Self { queue, queue_timeout: config.queue_timeout, stats }
    }

    pub fn stats(&self) -> &BatcherStats {
        &self.stats
    }

    /// Images waiting in the queue (or holding a place in it) now.
    pub fn queue_depth(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// A place in the queue, waited for at most `queue_timeout`. Taking it before decoding
    /// bounds the decoded images in memory by the queue, however many streams send.
    pub async fn reserve(&self) -> Result<QueueSlot, BatchError> {
        match tokio::time::timeout(self.queue_timeout, self.queue.clone().reserve_owned()).await {
            Err(_) => Err(BatchError::QueueFull(self.queue_timeout)),
            Ok(Err(_)) => Err(BatchError::Stopped),
            Ok(Ok(permit)) => Ok(QueueSlot(permit)),
        }
    }

    /// The embedding of one preprocessed image.
    pub async fn embed(&self, input: Vec<f32>) -> Result<Vec<f32>, BatchError> {
        self.reserve().await?.embed(input).await
    }
}

/// A reserved place in the batcher's queue.
pub struct QueueSlot(mpsc::OwnedPermit<Job>);

impl QueueSlot {
    pub async fn embed(self, input: Vec<f32>) -> Result<Vec<f32>, BatchError> {
        let (reply, answer) = oneshot::channel();
        self.0.send(Job { input, reply, queued: Instant::now() });
        answer.await.map_err(|_| BatchError::Stopped)?
    }
}

/// Collects batches on the async runtime and hands them to one dedicated inference thread:
/// the model is always called from the same thread, and the runtime's threads never block.
async fn run(
    embedder: Arc<dyn Embedder>,
    config: BatcherConfig,
    mut jobs: mpsc::Receiver<Job>,
    stats: Arc<BatcherStats>,
) {
    let max_batch = config.max_batch.max(1);
    // One batch may wait while the model runs the previous one: collecting overlaps inference.
    let (to_model, batches) = std::sync::mpsc::sync_channel::<Vec<Job>>(1);
    let model_stats = stats.clone();
    let spawned = std::thread::Builder::new().name("imagelsh-inference".into()).spawn(move || {
        for batch in batches {
            let started = std::time::Instant::now();
            run_batch(embedder.as_ref(), batch);
            model_stats.busy_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the inference thread");
        return;
    }
    while let Some(first) = jobs.recv().await {
        let deadline = Instant::now() + config.max_delay;
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match tokio::time::timeout_at(deadline, jobs.recv()).await {
                Ok(Some(job)) => batch.push(job),
                Ok(None) | Err(_) => break,
            }
        }
        tracing::trace!(rows = batch.len(), "batch to the model");
        let formed = Instant::now();
        let waited = metrics::histogram!(crate::telemetry::BATCHER_WAIT);
        batch.iter().for_each(|job| waited.record(formed.duration_since(job.queued).as_secs_f64()));
        metrics::histogram!(crate::telemetry::INFERENCE_BATCH_IMAGES).record(batch.len() as f64);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.items.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.largest_batch.fetch_max(batch.len() as u64, Ordering::Relaxed);
        // Waits (off the runtime's workers) while the model is busy with the previous batch.
        let to_model = to_model.clone();
        let sent = tokio::task::spawn_blocking(move || to_model.send(batch)).await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::error!("the inference thread has stopped");
            return;
        }
    }
}

fn run_batch(embedder: &dyn Embedder, batch: Vec<Job>) {
    let rows = batch.len();
    // Batches gather images from many calls, so this span stands alone (not under a call's).
    let _span = tracing::info_span!("inference", rows).entered();
    let (inputs, replies): (Vec<Vec<f32>>, Vec<_>) = batch.into_iter().map(|j| (j.input, j.reply)).unzip();
    let started = std::time::Instant::now();
    let flat: Vec<f32> = inputs.concat();
    drop(inputs);
    let result = embedder.embed(&flat, rows);
    crate::telemetry::seconds(crate::telemetry::INFERENCE, started.elapsed());
    tracing::trace!(rows, elapsed = ?started.elapsed(), "inference");
    match result {
        Ok(embeddings) => {
            for (reply, row) in replies.into_iter().zip(embeddings.outer_iter()) {
                let _ = reply.send(Ok(row.to_vec()));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, rows, "inference failed");
            for reply in replies {
                let _ = reply.send(Err(BatchError::Inference(e.to_string())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::{EmbedError, ModelCard};
    use ndarray::Array2;
    use std::sync::Mutex;

    /// A stand-in model for the batching logic: each embedding is the sum of its input, and it
    /// records the size of every batch it was given.
    struct Recorder {
        card: ModelCard,
        sizes: Mutex<Vec<usize>>,
        delay: Duration,
    }

    impl Recorder {
        fn new(delay: Duration) -> Arc<Self> {
            let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet_lite0.onnx");
            let card = ModelCard::load(&ModelCard::path_for(&model)).unwrap();
            Arc::new(Self { card, sizes: Mutex::new(Vec::new()), delay })
        }
    }

    impl Embedder for Recorder {
        fn card(&self) -> &ModelCard {
            &self.card
        }
        fn provider(&self) -> &str {
            "test"
        }
        fn embed(&self, batch: &[f32], rows: usize) -> Result<Array2<f32>, EmbedError> {
            std::thread::sleep(self.delay);
            self.sizes.lock().unwrap().push(rows);
            let per = batch.len() / rows;
            Ok(Array2::from_shape_fn((rows, 1), |(r, _)| batch[r * per..][..per].iter().sum()))
        }
    }

    fn config(max_batch: usize, max_delay_ms: u64, queue_capacity: usize) -> BatcherConfig {
        BatcherConfig {
            max_batch,
            max_delay: Duration::from_millis(max_delay_ms),
            queue_capacity,
            queue_timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_batches_and_get_their_own_answers() {
        let model = Recorder::new(Duration::from_millis(5));
        let batcher = Batcher::start(model.clone(), config(8, 50, 64));
        let calls: Vec<_> = (0..32)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.embed(vec![i as f32, 1.0]).await })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), vec![i as f32 + 1.0]);
        }
        let sizes = model.sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 32);
        assert!(sizes.iter().all(|&s| s <= 8));
        assert!(sizes.len() <= 8, "32 concurrent items should fill batches of 8: {sizes:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_item_waits_at_most_max_delay() {
        let model = Recorder::new(Duration::ZERO);
        let batcher = Batcher::start(model.clone(), config(64, 30, 64));
        let start = std::time::Instant::now();
        batcher.embed(vec![1.0]).await.unwrap();
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(30), "sent before its delay: {waited:?}");
        assert!(waited < Duration::from_millis(1000), "held far past its delay: {waited:?}");
        assert_eq!(*model.sizes.lock().unwrap(), vec![1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_queue_holds_callers_back_then_refuses_after_the_timeout() {
        let model = Recorder::new(Duration::from_millis(300));
        let batcher = Batcher::start(
            model.clone(),
            BatcherConfig { queue_timeout: Duration::from_millis(100), ..config(1, 0, 2) },
        );
        // Besides the queue (2), at most three batches of 1 are out of it: one in the model, one
        // handed to it, one being collected. The sixth caller cannot get in.
        let running: Vec<_> = (0..5)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.embed(vec![i as f32]).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(batcher.embed(vec![9.0]).await, Err(BatchError::QueueFull(Duration::from_millis(100))));
        for r in running {
            assert!(r.await.unwrap().is_ok());
        }
    }
}
