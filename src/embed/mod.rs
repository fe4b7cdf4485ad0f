//! Embedding models: the `Embedder` trait the pipeline depends on, and its ONNX Runtime
//! implementation.

mod card;
mod input;
mod onnx;
mod plain;
mod sizes;

pub use card::{Layout, ModelCard};
pub use input::InputBatch;
pub use onnx::{ConvSearch, CudaOptions, Device, OnnxEmbedder, OrtOptions, ProviderDefaults, ShapeWarmup};
pub use plain::PlainSession;
pub use sizes::{BatchSizes, BatchSizesError, MAX_BATCH_SIZE};

use ndarray::{Array2, concatenate};

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("ONNX Runtime library: {0}")]
    Library(String),
    #[error("model card: {0}")]
    Card(String),
    #[error("model: {0}")]
    Model(String),
    #[error("execution provider: {0}")]
    Provider(String),
    #[error("inference: {0}")]
    Inference(String),
}

/// Turns preprocessed images into embeddings, in batches of fixed sizes.
pub trait Embedder: Send + Sync {
    fn card(&self) -> &ModelCard;
    /// The execution provider serving inference ("CUDA", "CPU").
    fn provider(&self) -> &str;
    /// The batch shapes the model runs at; a batch is padded to the smallest that holds it.
    fn batch_sizes(&self) -> &BatchSizes;
    /// Batches that may run at once.
    fn instances(&self) -> usize;
    /// An empty batch of `size` rows (one of `batch_sizes`) in the memory the model reads.
    fn input_batch(&self, size: usize) -> Result<InputBatch, EmbedError>;
    /// Embeddings of the first `rows` rows of `input` (the rest is padding): `rows × dim`.
    fn run(&self, input: &InputBatch, rows: usize) -> Result<Array2<f32>, EmbedError>;

    /// Embeddings of `rows` images laid out back to back (`rows × card.input_len()` values),
    /// in batches of the largest size: for tools and tests, not the serving path.
    fn embed(&self, images: &[f32], rows: usize) -> Result<Array2<f32>, EmbedError> {
        let len = self.card().input_len();
        if images.len() != rows * len || rows == 0 {
            return Err(EmbedError::Inference(format!("{} values are not {rows} images of {len}", images.len())));
        }
        let largest = self.batch_sizes().largest();
        let mut parts = Vec::new();
        for chunk in images.chunks(largest * len) {
            let chunk_rows = chunk.len() / len;
            let mut input = self.input_batch(self.batch_sizes().fitting(chunk_rows))?;
            for (row, image) in chunk.chunks_exact(len).enumerate() {
                input.row_mut(row).copy_from_slice(image);
            }
            parts.push(self.run(&input, chunk_rows)?);
        }
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        concatenate(ndarray::Axis(0), &views).map_err(|e| EmbedError::Inference(e.to_string()))
    }
}
