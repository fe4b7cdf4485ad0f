//! One session run with `Session::run` on ordinary host memory, at whatever batch shape it is
//! given: how imagelsh ran its model before fixed shapes, pinned buffers and instances. Only
//! `imagelsh bench-model --plain` uses it, to measure the serving path against it.

use std::path::Path;
use std::sync::Mutex;

use ndarray::{Array2, ArrayView4, Ix2};
use ort::session::Session;
use ort::value::TensorRef;

use super::onnx::{SessionShape, build_session_with, environment, resolve_provider};
use super::{EmbedError, Layout, ModelCard, OrtOptions};

pub struct PlainSession {
    session: Mutex<Session>,
    card: ModelCard,
    provider: &'static str,
}

impl PlainSession {
    /// One session with every core as intra-op threads (unless `options` says otherwise) and
    /// the CPU provider's arena off, as before.
    pub fn load(model: &Path, card: ModelCard, options: &OrtOptions) -> Result<Self, EmbedError> {
        let env = environment(&options.library)?;
        let provider = resolve_provider(env, options.device)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = options.intra_threads.unwrap_or(cores);
        // As before: ort's default CPU provider, whose arena is off.
        let shape = SessionShape { threads, batch_override: None, number: 0, cpu_arena: false };
        let session = build_session_with(env, model, provider, options, shape)?;
        Ok(Self { session: Mutex::new(session), card, provider })
    }

    pub fn provider(&self) -> &'static str {
        self.provider
    }

    /// Embeddings of `rows` images back to back, as the pre-fixed-shape embedder computed them:
    /// a view over host memory, both outputs fetched, the embedding copied out.
    pub fn embed(&self, images: &[f32], rows: usize) -> Result<Array2<f32>, EmbedError> {
        let c = &self.card;
        let (h, w) = (c.height as usize, c.width as usize);
        let shape = match c.layout {
            Layout::Nchw => (rows, 3, h, w),
            Layout::Nhwc => (rows, h, w, 3),
        };
        let failed = |e: ort::Error| EmbedError::Inference(e.to_string());
        let input = ArrayView4::from_shape(shape, images).map_err(|e| EmbedError::Inference(e.to_string()))?;
        let tensor = TensorRef::from_array_view(input).map_err(failed)?;
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let outputs = session.run(ort::inputs![c.input.as_str() => tensor]).map_err(failed)?;
        let value = outputs
            .get(&c.embedding_output)
            .ok_or_else(|| EmbedError::Inference(format!("no output {:?}", c.embedding_output)))?;
        let array = value.try_extract_array::<f32>().map_err(failed)?;
        array.to_owned().into_dimensionality::<Ix2>().map_err(|e| EmbedError::Inference(e.to_string()))
    }
}
