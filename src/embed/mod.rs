//! Embedding models: the `Embedder` trait the pipeline depends on, and its ONNX Runtime
//! implementation.

mod card;
mod onnx;

pub use card::{Layout, ModelCard};
pub use onnx::{Device, OnnxEmbedder, OrtOptions};

use ndarray::Array2;

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

/// Turns preprocessed images into embeddings.
pub trait Embedder: Send + Sync {
    fn card(&self) -> &ModelCard;
    /// The execution provider serving inference ("CUDA", "CPU").
    fn provider(&self) -> &str;
    /// Embeddings of `rows` images laid out back to back as the card says
    /// (`rows × card.input_len()` values): `rows × dim`.
    fn embed(&self, batch: &[f32], rows: usize) -> Result<Array2<f32>, EmbedError>;
}
