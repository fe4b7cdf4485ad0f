//! The dynamic batcher: items from every stream and call share one bounded queue in front of
//! the model. When a model instance is free, the batcher takes what is queued, up to the
//! largest batch size, waiting at most `max_delay` (from the first item) for more; the batch is
//! padded to the smallest fixed size that holds it (`embed::BatchSizes`), so the device only
//! sees shapes warmed at start. Each instance has a thread of its own that copies its batch into
//! its input buffer (pinned memory on CUDA) while the other instances run theirs.
//!
//! At most `queue_capacity + (instances + 2) × largest batch` decoded images exist at once
//! (queued; being collected; on an instance, input copy included; answered but not yet picked
//! up): each is ~600 KB for a 224×224 model. A full queue makes callers wait (and so, through
//! HTTP/2 flow control, the clients); a caller that cannot enqueue within `queue_timeout` gets
//! an error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::embed::{Embedder, InputBatch};

#[derive(Debug, Clone)]
pub struct BatcherConfig {
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
    /// Rows run that were padding, not images.
    pub padded_rows: AtomicU64,
    /// Time at least one batch was on the model, nanoseconds (the device's busy time).
    pub busy_nanos: AtomicU64,
    /// Model time summed over instances, nanoseconds.
    pub instance_nanos: AtomicU64,
}

struct Job {
    input: Vec<f32>,
    reply: oneshot::Sender<Result<Vec<f32>, BatchError>>,
    queued: Instant,
}

/// A batch for an instance, with the instance's turn (released when its run ends).
struct Work {
    jobs: Vec<Job>,
    turn: OwnedSemaphorePermit,
}

#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Job>,
    queue_timeout: Duration,
    stats: Arc<BatcherStats>,
}

impl Batcher {
    /// Starts the collector on the current tokio runtime and one thread per model instance.
    pub fn start(embedder: Arc<dyn Embedder>, config: BatcherConfig) -> Self {
        let (queue, jobs) = mpsc::channel(config.queue_capacity.max(1));
        let stats = Arc::new(BatcherStats::default());
        tokio::spawn(collect(embedder, config.clone(), jobs, stats.clone()));
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

/// Forms batches on the async runtime, one whenever an instance is free, and hands them to
/// the instances' threads: the runtime's threads never copy or run the model.
async fn collect(
    embedder: Arc<dyn Embedder>,
    config: BatcherConfig,
    mut jobs: mpsc::Receiver<Job>,
    stats: Arc<BatcherStats>,
) {
    let largest = embedder.batch_sizes().largest();
    let instances = embedder.instances().max(1);
    let free = Arc::new(Semaphore::new(instances));
    let (to_instances, work) = mpsc::channel::<Work>(instances);
    let work = Arc::new(Mutex::new(work));
    let device = Arc::new(DeviceClock::default());
    for number in 0..instances {
        let (embedder, work, stats, device) = (embedder.clone(), work.clone(), stats.clone(), device.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("imagelsh-model-{number}"))
            .spawn(move || run_instance(embedder.as_ref(), &work, &stats, &device));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start an inference thread");
            return;
        }
    }
    loop {
        // Waiting for a free instance first lets the queue fill the next batch meanwhile.
        let Ok(turn) = free.clone().acquire_owned().await else { return };
        let Some(first) = jobs.recv().await else { return };
        let deadline = Instant::now() + config.max_delay;
        let mut batch = vec![first];
        while batch.len() < largest {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => match tokio::time::timeout_at(deadline, jobs.recv()).await {
                    Ok(Some(job)) => batch.push(job),
                    Ok(None) | Err(_) => break,
                },
            }
        }
        let formed = Instant::now();
        let waited = metrics::histogram!(crate::telemetry::BATCHER_WAIT);
        batch.iter().for_each(|job| waited.record(formed.duration_since(job.queued).as_secs_f64()));
        metrics::histogram!(crate::telemetry::INFERENCE_BATCH_IMAGES).record(batch.len() as f64);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.items.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.largest_batch.fetch_max(batch.len() as u64, Ordering::Relaxed);
        if to_instances.send(Work { jobs: batch, turn }).await.is_err() {
            tracing::error!("the inference threads have stopped");
            return;
        }
    }
}

/// The time at least one instance is running: the device's busy time, whatever the instances.
#[derive(Default)]
struct DeviceClock {
    running: Mutex<(usize, Option<std::time::Instant>)>,
}

impl DeviceClock {
    fn start(&self) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.0 == 0 {
            running.1 = Some(std::time::Instant::now());
        }
        running.0 += 1;
    }

    fn stop(&self, stats: &BatcherStats) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.0 = running.0.saturating_sub(1);
        if running.0 == 0
            && let Some(since) = running.1.take()
        {
            let busy = since.elapsed();
            stats.busy_nanos.fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
            metrics::gauge!(crate::telemetry::MODEL_BUSY).increment(busy.as_secs_f64());
        }
    }
}

/// One instance's thread: fills its own input buffer (one per batch size) and runs the model.
fn run_instance(
    embedder: &dyn Embedder,
    work: &Mutex<mpsc::Receiver<Work>>,
    stats: &BatcherStats,
    device: &DeviceClock,
) {
    let mut buffers: HashMap<usize, InputBatch> = HashMap::new();
    loop {
        // One thread waits for work at a time; the others wait for the lock.
        let next = work.lock().unwrap_or_else(|e| e.into_inner()).blocking_recv();
        let Some(Work { jobs, turn }) = next else { return };
        run_batch(embedder, &mut buffers, jobs, stats, device);
        drop(turn);
    }
}

fn run_batch(
    embedder: &dyn Embedder,
    buffers: &mut HashMap<usize, InputBatch>,
    jobs: Vec<Job>,
    stats: &BatcherStats,
    device: &DeviceClock,
) {
    let rows = jobs.len();
    let size = embedder.batch_sizes().fitting(rows);
    // Batches gather images from many calls, so this span stands alone (not under a call's).
    let _span = tracing::info_span!("inference", rows, size).entered();
    let input = match buffers.entry(size) {
        std::collections::hash_map::Entry::Occupied(buffer) => buffer.into_mut(),
        std::collections::hash_map::Entry::Vacant(slot) => match embedder.input_batch(size) {
            Ok(buffer) => slot.insert(buffer),
            Err(e) => return fail(jobs, &e.to_string()),
        },
    };
    let mut replies = Vec::with_capacity(rows);
    for (row, job) in jobs.into_iter().enumerate() {
        if job.input.len() != input.row_len() {
            let _ = job.reply.send(Err(BatchError::Inference(format!(
                "an input of {} values, the model takes {}",
                job.input.len(),
                input.row_len()
            ))));
            continue;
        }
        input.row_mut(row).copy_from_slice(&job.input);
        replies.push((row, job.reply));
    }
    stats.padded_rows.fetch_add((size - rows) as u64, Ordering::Relaxed);
    metrics::counter!(crate::telemetry::INFERENCE_PADDED_ROWS).increment((size - rows) as u64);
    let started = std::time::Instant::now();
    device.start();
    let result = embedder.run(input, rows);
    device.stop(stats);
    let elapsed = started.elapsed();
    stats.instance_nanos.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    crate::telemetry::seconds(crate::telemetry::INFERENCE, elapsed);
    // One line per batch at debug level: `scripts/bench-gpu` reads them for the slowest batch.
    tracing::debug!(rows, size, ms = elapsed.as_secs_f64() * 1e3, "batch ran");
    match result {
        Ok(embeddings) => {
            for (row, reply) in replies {
                let _ = reply.send(Ok(embeddings.row(row).to_vec()));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, rows, "inference failed");
            for (_, reply) in replies {
                let _ = reply.send(Err(BatchError::Inference(e.to_string())));
            }
        }
    }
}

fn fail(jobs: Vec<Job>, error: &str) {
    tracing::error!(error, rows = jobs.len(), "no input buffer for a batch");
    for job in jobs {
        let _ = job.reply.send(Err(BatchError::Inference(error.to_string())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::{BatchSizes, EmbedError, ModelCard};
    use ndarray::Array2;
    use std::sync::atomic::AtomicUsize;

    /// A stand-in model for the batching logic: inputs of two values, each embedding the sum of
    /// its input; it records every run (rows, batch size) and the most runs at once.
    struct Recorder {
        card: ModelCard,
        sizes: BatchSizes,
        instances: usize,
        runs: std::sync::Mutex<Vec<(usize, usize)>>,
        delay: Duration,
        running: AtomicUsize,
        most_running: AtomicUsize,
    }

    impl Recorder {
        fn new(delay: Duration, sizes: &str, instances: usize) -> Arc<Self> {
            let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet_lite0.onnx");
            let card = ModelCard::load(&ModelCard::path_for(&model)).unwrap();
            Arc::new(Self {
                card,
                sizes: sizes.parse().unwrap(),
                instances,
                runs: std::sync::Mutex::new(Vec::new()),
                delay,
                running: AtomicUsize::new(0),
                most_running: AtomicUsize::new(0),
            })
        }

        fn runs(&self) -> Vec<(usize, usize)> {
            self.runs.lock().unwrap().clone()
        }
    }

    impl Embedder for Recorder {
        fn card(&self) -> &ModelCard {
            &self.card
        }
        fn provider(&self) -> &str {
            "test"
        }
        fn batch_sizes(&self) -> &BatchSizes {
            &self.sizes
        }
        fn instances(&self) -> usize {
            self.instances
        }
        fn input_batch(&self, size: usize) -> Result<InputBatch, EmbedError> {
            Ok(InputBatch::host(size, 2))
        }
        fn run(&self, input: &InputBatch, rows: usize) -> Result<Array2<f32>, EmbedError> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_running.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            self.running.fetch_sub(1, Ordering::SeqCst);
            self.runs.lock().unwrap().push((rows, input.size()));
            Ok(Array2::from_shape_fn((rows, 1), |(r, _)| input.row(r).iter().sum()))
        }
    }

    fn config(max_delay_ms: u64, queue_capacity: usize) -> BatcherConfig {
        BatcherConfig {
            max_delay: Duration::from_millis(max_delay_ms),
            queue_capacity,
            queue_timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_batches_and_get_their_own_answers() {
        let model = Recorder::new(Duration::from_millis(5), "1,2,3,4,5,6,7,8", 1);
        let batcher = Batcher::start(model.clone(), config(50, 64));
        let calls: Vec<_> = (0..32)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.embed(vec![i as f32, 1.0]).await })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), vec![i as f32 + 1.0]);
        }
        let runs = model.runs();
        assert_eq!(runs.iter().map(|r| r.0).sum::<usize>(), 32);
        assert!(runs.iter().all(|&(rows, size)| rows <= 8 && rows == size), "{runs:?}");
        assert!(runs.len() <= 8, "32 concurrent items should fill batches of 8: {runs:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_run_at_the_fixed_sizes_only() {
        let model = Recorder::new(Duration::from_millis(20), "1,4,16", 1);
        let batcher = Batcher::start(model.clone(), config(5, 256));
        for wave in [1usize, 3, 5, 11, 16, 40] {
            let calls: Vec<_> = (0..wave)
                .map(|i| {
                    let b = batcher.clone();
                    tokio::spawn(async move { b.embed(vec![i as f32, 2.0]).await })
                })
                .collect();
            for (i, call) in calls.into_iter().enumerate() {
                assert_eq!(call.await.unwrap().unwrap(), vec![i as f32 + 2.0], "wave of {wave}");
            }
        }
        let runs = model.runs();
        assert!(runs.iter().all(|&(rows, size)| [1, 4, 16].contains(&size) && rows <= size), "{runs:?}");
        assert!(runs.iter().any(|&(rows, size)| rows < size), "no batch was padded: {runs:?}");
        let padded: usize = runs.iter().map(|&(rows, size)| size - rows).sum();
        assert_eq!(batcher.stats().padded_rows.load(Ordering::Relaxed), padded as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_run_batches_at_once() {
        let model = Recorder::new(Duration::from_millis(100), "4", 2);
        let batcher = Batcher::start(model.clone(), config(1, 64));
        let calls: Vec<_> = (0..8)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.embed(vec![i as f32, 0.0]).await })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), vec![i as f32]);
        }
        assert_eq!(model.most_running.load(Ordering::SeqCst), 2, "runs: {:?}", model.runs());
        // The device clock counts overlapping runs once.
        let stats = batcher.stats();
        assert!(stats.busy_nanos.load(Ordering::Relaxed) < stats.instance_nanos.load(Ordering::Relaxed));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_item_waits_at_most_max_delay() {
        let model = Recorder::new(Duration::ZERO, "64", 1);
        let batcher = Batcher::start(model.clone(), config(30, 64));
        let start = std::time::Instant::now();
        batcher.embed(vec![1.0, 0.0]).await.unwrap();
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(30), "sent before its delay: {waited:?}");
        assert!(waited < Duration::from_millis(1000), "held far past its delay: {waited:?}");
        assert_eq!(model.runs(), vec![(1, 64)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_queue_holds_callers_back_then_refuses_after_the_timeout() {
        let model = Recorder::new(Duration::from_millis(300), "1", 1);
        let batcher =
            Batcher::start(model.clone(), BatcherConfig { queue_timeout: Duration::from_millis(100), ..config(0, 2) });
        // Besides the queue (2), one batch of 1 is out of it, on the one instance. The fourth
        // caller cannot get in.
        let running: Vec<_> = (0..3)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.embed(vec![i as f32, 0.0]).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(batcher.embed(vec![9.0, 0.0]).await, Err(BatchError::QueueFull(Duration::from_millis(100))));
        for r in running {
            assert!(r.await.unwrap().is_ok());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_input_of_the_wrong_length_fails_alone() {
        let model = Recorder::new(Duration::from_millis(20), "1,2,3,4", 1);
        let batcher = Batcher::start(model.clone(), config(20, 64));
        let (b1, b2) = (batcher.clone(), batcher.clone());
        let good = tokio::spawn(async move { b1.embed(vec![1.0, 1.0]).await });
        let bad = tokio::spawn(async move { b2.embed(vec![1.0, 1.0, 1.0]).await });
        assert_eq!(good.await.unwrap(), Ok(vec![2.0]));
        assert!(matches!(bad.await.unwrap(), Err(BatchError::Inference(_))));
    }
}
