//! ONNX Runtime through `ort`, loaded at run time from a library file (`load-dynamic`), with
//! the CUDA execution provider when asked for or available and the CPU provider otherwise.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ndarray::{Array2, ArrayView4, Ix2};
use ort::environment::Environment;
use ort::ep;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::TensorRef;

use super::{EmbedError, Embedder, Layout, ModelCard};

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// CUDA if it registers, else CPU (with one warning saying why).
    Auto,
    Cpu,
    /// CUDA or a start-up error.
    Cuda,
}

#[derive(Debug, Clone)]
pub struct OrtOptions {
    /// `libonnxruntime.so` (the versioned file of a wheel or release).
    pub library: PathBuf,
    pub device: Device,
    /// Threads inside one operator (CPU provider).
    pub intra_threads: usize,
    /// Let idle intra-op threads spin: lower latency per call, but they burn the cores that
    /// decoding and the server need.
    pub spinning: bool,
}

/// The process-wide ONNX Runtime environment: the library can be loaded once only.
static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

fn environment(library: &Path) -> Result<&'static Environment, EmbedError> {
    let env = ENVIRONMENT.get_or_init(|| {
        if !library.is_file() {
            return Err(format!(
                "{} does not exist; install it with scripts/setup-ort and pass --ort-lib or ORT_DYLIB_PATH",
                library.display()
            ));
        }
        let builder = ort::init_from(library).map_err(|e| format!("loading {}: {e}", library.display()))?;
        builder.with_name("imagelsh").build().map_err(|e| format!("initialising {}: {e}", library.display()))
    });
    env.as_ref().map_err(|e| EmbedError::Library(e.clone()))
}

/// One ONNX Runtime session of an image model.
pub struct OnnxEmbedder {
    /// `Session::run` needs `&mut`: one inference at a time per session, which is also what
    /// a batcher feeding one device wants.
    session: Mutex<Session>,
    card: ModelCard,
    provider: &'static str,
}

impl OnnxEmbedder {
    pub fn load(model: &Path, card: ModelCard, options: &OrtOptions) -> Result<Self, EmbedError> {
        let env = environment(&options.library)?;
        if !model.is_file() {
            return Err(EmbedError::Model(format!("{} does not exist", model.display())));
        }
        let rt = |e: ort::Error<SessionBuilder>| EmbedError::Model(e.to_string());
        let builder = Session::builder(env)
            .map_err(|e| EmbedError::Model(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(rt)?
            .with_intra_threads(options.intra_threads.max(1))
            .map_err(rt)?
            .with_intra_op_spinning(options.spinning)
            .map_err(rt)?;
        let (builder, provider) = register_provider(builder, options.device)?;
        let mut builder = builder;
        let session =
            builder.commit_from_file(model).map_err(|e| EmbedError::Model(format!("{}: {e}", model.display())))?;

        let has_input = session.inputs().iter().any(|i| i.name() == card.input);
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        if !has_input || !outputs.contains(&card.embedding_output.as_str()) {
            return Err(EmbedError::Card(format!(
                "the card names input {:?} and output {:?}; the model has inputs {:?} and outputs {outputs:?}",
                card.input,
                card.embedding_output,
                session.inputs().iter().map(|i| i.name()).collect::<Vec<_>>()
            )));
        }
        tracing::info!(model = %model.display(), provider, threads = options.intra_threads, "embedding model loaded");
        Ok(Self { session: Mutex::new(session), card, provider })
    }

    /// Embeddings and, when the card names one, the class scores (diagnostics and tests).
    pub fn embed_with_logits(
        &self,
        batch: &[f32],
        rows: usize,
    ) -> Result<(Array2<f32>, Option<Array2<f32>>), EmbedError> {
        let c = &self.card;
        let (h, w) = (c.height as usize, c.width as usize);
        let shape = match c.layout {
            Layout::Nchw => (rows, 3, h, w),
            Layout::Nhwc => (rows, h, w, 3),
        };
        let input = ArrayView4::from_shape(shape, batch).map_err(|e| EmbedError::Inference(e.to_string()))?;
        let tensor = TensorRef::from_array_view(input).map_err(|e| EmbedError::Inference(e.to_string()))?;
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let outputs =
            session.run(ort::inputs![c.input.as_str() => tensor]).map_err(|e| EmbedError::Inference(e.to_string()))?;
        let extract = |name: &str| -> Result<Array2<f32>, EmbedError> {
            let value = outputs.get(name).ok_or_else(|| EmbedError::Inference(format!("no output {name:?}")))?;
            let array = value.try_extract_array::<f32>().map_err(|e| EmbedError::Inference(e.to_string()))?;
            array
                .to_owned()
                .into_dimensionality::<Ix2>()
                .map_err(|e| EmbedError::Inference(format!("output {name:?}: {e}")))
        };
        let embeddings = extract(&c.embedding_output)?;
        if embeddings.nrows() != rows || embeddings.ncols() != c.dim as usize {
            return Err(EmbedError::Inference(format!(
                "model returned {:?} embeddings, the card says {rows} × {}",
                embeddings.shape(),
                c.dim
            )));
        }
        let logits = c.logits_output.as_deref().map(extract).transpose()?;
        Ok((embeddings, logits))
    }
}

fn register_provider(builder: SessionBuilder, device: Device) -> Result<(SessionBuilder, &'static str), EmbedError> {
    let cpu = || ep::CPU::default().build();
    match device {
        Device::Cpu => {
            let b = builder.with_execution_providers([cpu()]).map_err(|e| EmbedError::Provider(e.to_string()))?;
            Ok((b, "CPU"))
        }
        Device::Cuda => {
            let b = builder
                .with_execution_providers([ep::CUDA::default().build().error_on_failure()])
                .map_err(|e| EmbedError::Provider(format!("--device cuda: CUDA could not be registered: {e}")))?;
            Ok((b, "CUDA"))
        }
        Device::Auto => match builder.with_execution_providers([ep::CUDA::default().build().error_on_failure()]) {
            Ok(b) => Ok((b, "CUDA")),
            Err(e) => {
                tracing::warn!(reason = %e, "CUDA execution provider unavailable; running on CPU");
                let b =
                    e.recover().with_execution_providers([cpu()]).map_err(|e| EmbedError::Provider(e.to_string()))?;
                Ok((b, "CPU"))
            }
        },
    }
}

impl Embedder for OnnxEmbedder {
    fn card(&self) -> &ModelCard {
        &self.card
    }

    fn provider(&self) -> &str {
        self.provider
    }

    fn embed(&self, batch: &[f32], rows: usize) -> Result<Array2<f32>, EmbedError> {
        self.embed_with_logits(batch, rows).map(|(embeddings, _)| embeddings)
    }
}
