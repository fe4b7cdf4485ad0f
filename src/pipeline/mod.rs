//! Images → embeddings: parallel decoding on a bounded pool, then the dynamic batcher in
//! front of the model. Knows nothing of gRPC or of indexes.

mod batcher;
mod complete;
mod decode;
mod thumbnail;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::join_all;
use tokio::sync::Semaphore;

pub use batcher::{BatchError, Batcher, BatcherConfig, BatcherStats, QueueSlot};
pub use decode::{DecodeError, DecodeLimits, Preprocessor, decode_rgb};
pub use thumbnail::{MAX_THUMBNAIL_BYTES, THUMBNAIL_SIDE, thumbnail};

/// An image through the model: its embedding, and its thumbnail when one was asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    pub vector: Vec<f32>,
    pub thumbnail: Option<Vec<u8>>,
}

use crate::embed::{Embedder, ModelCard};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ImageError {
    /// This image is bad; others go on.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The pipeline cannot take the work now.
    #[error(transparent)]
    Batch(#[from] BatchError),
}

/// Decoded images held in memory, for operators and tests of the memory bound.
#[derive(Debug, Default)]
pub struct DecodedGauge {
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl DecodedGauge {
    fn add(&self) {
        let live = self.live.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(live, Ordering::Relaxed);
    }

    fn remove(&self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }

    /// Decoded images alive now (decoded, not yet through the model).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// The most alive at once since start.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

pub struct ImagePipeline {
    decoded: DecodedGauge,
    preprocessor: Arc<Preprocessor>,
    decode_slots: Arc<Semaphore>,
    batcher: Batcher,
    card: ModelCard,
    provider: String,
}

impl ImagePipeline {
    /// Must be called inside a tokio runtime (it starts the batcher).
    pub fn start(
        embedder: Arc<dyn Embedder>,
        limits: DecodeLimits,
        decode_workers: usize,
        batcher: BatcherConfig,
    ) -> Self {
        let card = embedder.card().clone();
        let provider = embedder.provider().to_string();
        Self {
            decoded: DecodedGauge::default(),
            preprocessor: Arc::new(Preprocessor::new(card.clone(), limits)),
            decode_slots: Arc::new(Semaphore::new(decode_workers.max(1))),
            batcher: Batcher::start(embedder, batcher),
            card,
            provider,
        }
    }

    pub fn card(&self) -> &ModelCard {
        &self.card
    }

    pub fn provider(&self) -> &str {
        &self.provider
    }

    pub fn batcher_stats(&self) -> &BatcherStats {
        self.batcher.stats()
    }

    /// Images waiting for the model now.
    pub fn queue_depth(&self) -> usize {
        self.batcher.queue_depth()
    }

    pub fn decoded(&self) -> &DecodedGauge {
        &self.decoded
    }

    /// Decodes and resizes on a blocking thread, at most `decode_workers` at once (and makes
    /// the thumbnail there, when asked for).
    pub async fn preprocess(&self, image: Vec<u8>, thumbnail: bool) -> Result<(Vec<f32>, Option<Vec<u8>>), ImageError> {
        let _slot = self.decode_slots.acquire().await.map_err(|_| BatchError::Stopped)?;
        let preprocessor = self.preprocessor.clone();
        tokio::task::spawn_blocking(move || preprocessor.preprocess_with_thumbnail(&image, thumbnail))
            .await
            .map_err(|e| DecodeError::Corrupt(format!("decoder failed: {e}")))?
            .map_err(ImageError::from)
    }

    /// The embedding of one image. Its place in the model's queue is taken before decoding,
    /// so that a flood of requests waits as encoded bytes, not as decoded tensors.
    pub async fn embed(&self, image: Vec<u8>) -> Result<Vec<f32>, ImageError> {
        Ok(self.embed_one(image, false).await?.vector)
    }

    async fn embed_one(&self, image: Vec<u8>, thumbnail: bool) -> Result<Embedded, ImageError> {
        let slot = self.batcher.reserve().await?;
        let (input, thumbnail) = self.preprocess(image, thumbnail).await?;
        self.decoded.add();
        let embedded = slot.embed(input).await;
        self.decoded.remove();
        Ok(Embedded { vector: embedded?, thumbnail })
    }

    /// Embeddings of many images (with thumbnails when `thumbnails`), in order; each image
    /// succeeds or fails alone.
    pub async fn embed_all(&self, images: Vec<Vec<u8>>, thumbnails: bool) -> Vec<Result<Embedded, ImageError>> {
        join_all(images.into_iter().map(|image| self.embed_one(image, thumbnails))).await
    }
}
