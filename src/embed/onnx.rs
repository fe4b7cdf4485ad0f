//! ONNX Runtime through `ort`, loaded at run time from a library file (`load-dynamic`), with
//! the CUDA execution provider when asked for or available and the CPU provider otherwise.
//!
//! Every run has one of a few fixed batch shapes (`BatchSizes`), all warmed at load. On CUDA
//! each shape gets sessions of its own, built for that batch size: a session then never sees a
//! second shape, whatever the provider caches per shape, and its input arrives through IO
//! binding from pinned host memory that the batcher filled while the previous batch ran.
//! Several sessions (instances) run at once, so that one batch's copy and launch overlap
//! another's compute.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use ndarray::Array2;
use ort::environment::Environment;
use ort::ep;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::{Tensor, ValueType};

use super::input::InputBatch;
use super::{BatchSizes, EmbedError, Embedder, Layout, ModelCard};

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// CUDA if it registers, else CPU (with one warning saying why).
    Auto,
    Cpu,
    /// CUDA or a start-up error.
    Cuda,
}

/// How cuDNN picks a convolution algorithm for a new shape (ONNX Runtime's
/// `cudnn_conv_algo_search`). Shapes are fixed and warmed at start, so the search is paid once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvSearch {
    /// Time every algorithm (slowest start, fastest runs).
    Exhaustive,
    /// cuDNN's heuristics.
    Heuristic,
    /// The implicit-GEMM default, no search.
    Default,
}

/// Options of the CUDA execution provider.
#[derive(Debug, Clone)]
pub struct CudaOptions {
    pub device_id: i32,
    pub conv_search: ConvSearch,
    /// TensorFloat-32 for convolutions and matrix products (Ampere and later).
    pub tf32: bool,
    /// Channels-last convolutions.
    pub prefer_nhwc: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self { device_id: 0, conv_search: ConvSearch::Exhaustive, tf32: false, prefer_nhwc: false }
    }
}

#[derive(Debug, Clone)]
pub struct OrtOptions {
    /// `libonnxruntime.so` (the versioned file of a wheel or release).
    pub library: PathBuf,
    pub device: Device,
    /// Threads inside one operator, per instance; `None`: the provider's default.
    pub intra_threads: Option<usize>,
    /// Let idle intra-op threads spin: lower latency per call, but they burn the cores that
    /// decoding and the server need.
    pub spinning: bool,
    /// The batch shapes; `None`: the provider's defaults up to `max_batch`.
    pub batch_sizes: Option<BatchSizes>,
    pub max_batch: Option<usize>,
    /// Batches that may run at once; `None`: the provider's default.
    pub instances: Option<usize>,
    pub cuda: CudaOptions,
    /// Sessions built for one batch size each; `None`: on CUDA only, where a shape's plans are
    /// costly (the CPU provider runs every size on one session).
    pub session_per_size: Option<bool>,
    /// Write ONNX Runtime's profile (JSON) of each session under this path prefix.
    pub profile: Option<PathBuf>,
}

impl OrtOptions {
    /// Options with every default, on `device`.
    pub fn new(library: PathBuf, device: Device) -> Self {
        Self {
            library,
            device,
            intra_threads: None,
            spinning: false,
            batch_sizes: None,
            max_batch: None,
            instances: None,
            cuda: CudaOptions::default(),
            session_per_size: None,
            profile: None,
        }
    }
}

/// What each provider runs with when not told otherwise; the reasons are measured
/// (BENCHMARKS.md, "GPU pipeline").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderDefaults {
    pub batch_sizes: BatchSizes,
    pub instances: usize,
    pub intra_threads: usize,
}

impl ProviderDefaults {
    pub fn for_provider(provider: &str, cores: usize, max_batch: Option<usize>) -> Result<Self, EmbedError> {
        let sizes = |e: super::BatchSizesError| EmbedError::Model(format!("--max-batch: {e}"));
        let cores = cores.max(1);
        if provider == "CUDA" {
            // Batches of 64 run the default model at 7,225 images/s from host memory on an H200
            // (256: 6,463); padding stays under 4× the rows. Two instances: one batch is copied
            // and launched while the other computes. The CPU threads only launch kernels.
            let batch_sizes = BatchSizes::geometric(max_batch.unwrap_or(64), 4).map_err(sizes)?;
            Ok(Self { batch_sizes, instances: 2, intra_threads: 1 })
        } else {
            // On the CPU a padded row costs as much as a real one and a new shape nothing: every
            // size up to 8 (larger batches are no faster per image). Batches run side by side on
            // instances of one or two threads rather than one batch over every thread: on 2 cores,
            // two instances of one thread ingest ~10 % more than one of two (BENCHMARKS.md), and
            // a run spread over many threads spends its time waking them.
            let batch_sizes = BatchSizes::every_up_to(max_batch.unwrap_or(8)).map_err(sizes)?;
            let intra_threads = if cores >= 8 { 2 } else { 1 };
            Ok(Self { batch_sizes, instances: (cores / intra_threads).max(1), intra_threads })
        }
    }
}

/// The process-wide ONNX Runtime environment: the library can be loaded once only.
static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

pub(super) fn environment(library: &Path) -> Result<&'static Environment, EmbedError> {
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

/// The batch dimension of the model's input: its symbol (for a per-size session) or its fixed size.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BatchDimension {
    Symbolic(String),
    Unnamed,
    Fixed(usize),
}

/// One session and what it serves.
struct Instance {
    /// The one batch size this session was built for, or `None`: every size (CPU).
    size: Option<usize>,
    session: Mutex<Session>,
}

/// One ONNX Runtime model, its sessions and their fixed shapes.
pub struct OnnxEmbedder {
    instances: Vec<Instance>,
    card: ModelCard,
    provider: &'static str,
    sizes: BatchSizes,
    parallel: usize,
    threads: usize,
    /// Input batches live in page-locked memory that the device copies from directly.
    pinned: bool,
    warmup: Vec<ShapeWarmup>,
}

/// The first run of one shape on one session, at load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShapeWarmup {
    pub size: usize,
    pub first_run: Duration,
}

impl OnnxEmbedder {
    pub fn load(model: &Path, card: ModelCard, options: &OrtOptions) -> Result<Self, EmbedError> {
        let env = environment(&options.library)?;
        if !model.is_file() {
            return Err(EmbedError::Model(format!("{} does not exist", model.display())));
        }
        let started = Instant::now();
        let dimension = probe_batch_dimension(env, model, &card)?;
        let provider = resolve_provider(env, options.device)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let defaults = ProviderDefaults::for_provider(provider, cores, options.max_batch)?;
        let sizes = options.batch_sizes.clone().unwrap_or(defaults.batch_sizes);
        if let BatchDimension::Fixed(fixed) = dimension
            && sizes.iter().any(|s| s != fixed)
        {
            return Err(EmbedError::Model(format!(
                "{}: input {:?} has a fixed batch dimension of {fixed}; run it with --batch-sizes {fixed}",
                model.display(),
                card.input
            )));
        }
        let parallel = options.instances.unwrap_or(defaults.instances).max(1);
        let threads = options.intra_threads.unwrap_or(defaults.intra_threads).max(1);
        // CUDA: sessions of one shape each (built for it when the dimension has a name).
        // CPU: sessions that run every size.
        let plan: Vec<Option<usize>> = if options.session_per_size.unwrap_or(provider == "CUDA") {
            sizes.iter().flat_map(|size| std::iter::repeat_n(Some(size), parallel)).collect()
        } else {
            vec![None; parallel]
        };
        let built: Vec<Result<(Instance, Vec<ShapeWarmup>), EmbedError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = plan
                .iter()
                .enumerate()
                .map(|(number, &size)| {
                    let (dimension, sizes, card) = (&dimension, &sizes, &card);
                    scope.spawn(move || {
                        let override_size = match (dimension, size) {
                            (BatchDimension::Symbolic(name), Some(size)) => Some((name.as_str(), size)),
                            _ => None,
                        };
                        let session = build_session(env, model, provider, options, threads, override_size, number)?;
                        let instance = Instance { size, session: Mutex::new(session) };
                        let warmup = warm(&instance, card, sizes)?;
                        Ok((instance, warmup))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(EmbedError::Model("a session failed to build".into()))))
                .collect()
        });
        let mut instances = Vec::with_capacity(built.len());
        let mut warmup = Vec::new();
        for result in built {
            let (instance, shapes) = result?;
            instances.push(instance);
            warmup.extend(shapes);
        }
        let mut embedder =
            Self { instances, card, provider, sizes, parallel, threads, pinned: provider == "CUDA", warmup };
        // Tried once here: a provider without page-locked memory is said at start, not found slow.
        if embedder.pinned
            && let Err(e) = embedder.input_batch(embedder.sizes.largest())
        {
            tracing::warn!(error = %e, "no page-locked host memory: input batches are copied from ordinary memory");
            embedder.pinned = false;
        }
        tracing::info!(
            model = %model.display(),
            provider,
            batch_sizes = %embedder.sizes,
            instances = parallel,
            sessions = embedder.instances.len(),
            pinned = embedder.pinned,
            threads,
            ms = started.elapsed().as_millis(),
            "embedding model loaded, every batch shape warmed"
        );
        Ok(embedder)
    }

    /// Whether input batches live in page-locked memory (CUDA).
    pub fn pinned(&self) -> bool {
        self.pinned
    }

    /// Intra-op threads of each instance.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Each shape's first run at load, per session.
    pub fn warmup(&self) -> &[ShapeWarmup] {
        &self.warmup
    }

    /// Embeddings and, when the card names one, the class scores (diagnostics and tests).
    pub fn embed_with_logits(
        &self,
        images: &[f32],
        rows: usize,
    ) -> Result<(Array2<f32>, Option<Array2<f32>>), EmbedError> {
        let mut input = self.input_batch(self.sizes.fitting(rows))?;
        if rows > input.size() || images.len() != rows * self.card.input_len() {
            return Err(EmbedError::Inference(format!(
                "{rows} images of {} values do not fit one batch of {}",
                self.card.input_len(),
                input.size()
            )));
        }
        for (row, image) in images.chunks_exact(self.card.input_len()).enumerate() {
            input.row_mut(row).copy_from_slice(image);
        }
        self.run_outputs(&input, rows, true)
    }

    fn instance_for(&self, size: usize) -> Result<MutexGuard<'_, Session>, EmbedError> {
        let serving = || self.instances.iter().filter(|i| i.size.is_none_or(|s| s == size));
        for instance in serving() {
            if let Ok(session) = instance.session.try_lock() {
                return Ok(session);
            }
        }
        let instance = serving().next().ok_or_else(|| {
            EmbedError::Inference(format!("no session runs batches of {size} (sizes {})", self.sizes))
        })?;
        Ok(instance.session.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn run_outputs(
        &self,
        input: &InputBatch,
        rows: usize,
        with_logits: bool,
    ) -> Result<(Array2<f32>, Option<Array2<f32>>), EmbedError> {
        let c = &self.card;
        let size = input.size();
        if rows == 0 || rows > size || input.row_len() != c.input_len() {
            return Err(EmbedError::Inference(format!("{rows} rows of a batch of {size}")));
        }
        let failed = |e: ort::Error| EmbedError::Inference(e.to_string());
        let mut session = self.instance_for(size)?;
        let mut binding = session.create_binding().map_err(failed)?;
        match input.tensor() {
            Some(tensor) => binding.bind_input(c.input.as_str(), tensor).map_err(failed)?,
            None => {
                let copy = Tensor::from_array((input_shape(c, size), input.values().to_vec().into_boxed_slice()));
                binding.bind_input(c.input.as_str(), &copy.map_err(failed)?).map_err(failed)?
            }
        }
        let cpu =
            MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::CPUOutput).map_err(failed)?;
        binding.bind_output_to_device(c.embedding_output.as_str(), &cpu).map_err(failed)?;
        let logits_name = c.logits_output.as_deref().filter(|_| with_logits);
        if let Some(name) = logits_name {
            binding.bind_output_to_device(name, &cpu).map_err(failed)?;
        }
        let outputs = session.run_binding(&binding).map_err(failed)?;
        let extract = |name: &str, width: Option<usize>| -> Result<Array2<f32>, EmbedError> {
            let value = outputs.get(name).ok_or_else(|| EmbedError::Inference(format!("no output {name:?}")))?;
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(failed)?;
            let cols = shape.get(1).map_or(0, |&d| d.max(0) as usize);
            if shape.len() != 2 || shape[0] as usize != size || width.is_some_and(|w| w != cols) {
                return Err(EmbedError::Inference(format!(
                    "model returned {name:?} of shape {shape:?}, the card says {size} × {}",
                    width.map_or("?".to_string(), |w| w.to_string())
                )));
            }
            // The padded rows' outputs are dropped here.
            Array2::from_shape_vec((rows, cols), data[..rows * cols].to_vec())
                .map_err(|e| EmbedError::Inference(e.to_string()))
        };
        let embeddings = extract(&c.embedding_output, Some(c.dim as usize))?;
        let logits = logits_name.map(|name| extract(name, None)).transpose()?;
        Ok((embeddings, logits))
    }

    /// ONNX Runtime's profile of each session (when `OrtOptions::profile` was set): the files written.
    pub fn end_profiling(&self) -> Vec<String> {
        self.instances
            .iter()
            .filter_map(|i| i.session.lock().unwrap_or_else(|e| e.into_inner()).end_profiling().ok())
            .collect()
    }
}

impl Embedder for OnnxEmbedder {
    fn card(&self) -> &ModelCard {
        &self.card
    }

    fn provider(&self) -> &str {
        self.provider
    }

    fn batch_sizes(&self) -> &BatchSizes {
        &self.sizes
    }

    fn instances(&self) -> usize {
        self.parallel
    }

    fn input_batch(&self, size: usize) -> Result<InputBatch, EmbedError> {
        let c = &self.card;
        let shape = input_shape(c, size);
        let failed = |e: ort::Error| EmbedError::Provider(format!("input buffer of {size} images: {e}"));
        let tensor = if self.pinned {
            // The CUDA provider's page-locked host allocator: the copy to the device is one DMA.
            let session = self.instance_for(size)?;
            let pinned = MemoryInfo::new(AllocationDevice::CUDA_PINNED, 0, AllocatorType::Device, MemoryType::CPUInput)
                .map_err(failed)?;
            let allocator = Allocator::new(&session, pinned).map_err(failed)?;
            Tensor::<f32>::new(&allocator, shape).map_err(failed)?
        } else {
            Tensor::<f32>::new(&Allocator::default(), shape).map_err(failed)?
        };
        Ok(InputBatch::ort(tensor, size, c.input_len()))
    }

    fn run(&self, input: &InputBatch, rows: usize) -> Result<Array2<f32>, EmbedError> {
        self.run_outputs(input, rows, false).map(|(embeddings, _)| embeddings)
    }
}

/// Reads the input's batch dimension from a plain CPU session (a few tens of ms).
fn probe_batch_dimension(env: &Environment, model: &Path, card: &ModelCard) -> Result<BatchDimension, EmbedError> {
    let rt = |e: ort::Error<SessionBuilder>| EmbedError::Model(e.to_string());
    let session = Session::builder(env)
        .map_err(|e| EmbedError::Model(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::Disable)
        .map_err(rt)?
        .with_intra_threads(1)
        .map_err(rt)?
        .commit_from_file(model)
        .map_err(|e| EmbedError::Model(format!("{}: {e}", model.display())))?;
    check_card(&session, card)?;
    let input = session.inputs().iter().find(|i| i.name() == card.input);
    let Some(ValueType::Tensor { shape, dimension_symbols, .. }) = input.map(|i| i.dtype()) else {
        return Err(EmbedError::Card(format!("input {:?} is not a tensor", card.input)));
    };
    if shape.len() != 4 {
        return Err(EmbedError::Card(format!(
            "input {:?} has shape {shape:?}; an image batch has 4 dimensions",
            card.input
        )));
    }
    Ok(match (shape[0], dimension_symbols.first()) {
        (fixed, _) if fixed > 0 => BatchDimension::Fixed(fixed as usize),
        (_, Some(name)) if !name.is_empty() => BatchDimension::Symbolic(name.clone()),
        _ => BatchDimension::Unnamed,
    })
}

fn check_card(session: &Session, card: &ModelCard) -> Result<(), EmbedError> {
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
    Ok(())
}

/// Which provider `device` gives on this machine: CUDA registration is tried once, on a
/// session that is then dropped, so that a failure under `--device auto` warns once.
pub(super) fn resolve_provider(env: &Environment, device: Device) -> Result<&'static str, EmbedError> {
    match device {
        Device::Cpu => Ok("CPU"),
        Device::Cuda => {
            Session::builder(env)
                .map_err(|e| EmbedError::Provider(e.to_string()))?
                .with_execution_providers([ep::CUDA::default().build().error_on_failure()])
                .map_err(|e| EmbedError::Provider(format!("--device cuda: CUDA could not be registered: {e}")))?;
            Ok("CUDA")
        }
        Device::Auto => {
            let builder = Session::builder(env).map_err(|e| EmbedError::Provider(e.to_string()))?;
            match builder.with_execution_providers([ep::CUDA::default().build().error_on_failure()]) {
                Ok(_) => Ok("CUDA"),
                Err(e) => {
                    tracing::warn!(reason = %e, "CUDA execution provider unavailable; running on CPU");
                    Ok("CPU")
                }
            }
        }
    }
}

pub(super) fn build_session(
    env: &Environment,
    model: &Path,
    provider: &str,
    options: &OrtOptions,
    threads: usize,
    batch_override: Option<(&str, usize)>,
    number: usize,
) -> Result<Session, EmbedError> {
    build_session_with(env, model, provider, options, SessionShape { threads, batch_override, number, cpu_arena: true })
}

/// How one session is built beyond `OrtOptions`.
pub(super) struct SessionShape<'a> {
    pub threads: usize,
    /// The batch dimension's symbol and the one size this session runs.
    pub batch_override: Option<(&'a str, usize)>,
    /// Numbers the session's profile file.
    pub number: usize,
    /// ONNX Runtime's CPU arena: without it, every run allocates its activations afresh
    /// (ort's `ep::CPU::default()` turns it off; measured: batch 8 at 0.64× the speed on 2 cores).
    pub cpu_arena: bool,
}

pub(super) fn build_session_with(
    env: &Environment,
    model: &Path,
    provider: &str,
    options: &OrtOptions,
    shape: SessionShape<'_>,
) -> Result<Session, EmbedError> {
    let SessionShape { threads, batch_override, number, cpu_arena } = shape;
    let rt = |e: ort::Error<SessionBuilder>| EmbedError::Model(e.to_string());
    let mut builder = Session::builder(env)
        .map_err(|e| EmbedError::Model(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(rt)?
        .with_intra_threads(threads)
        .map_err(rt)?
        .with_intra_op_spinning(options.spinning)
        .map_err(rt)?;
    if let Some((name, size)) = batch_override {
        builder = builder.with_dimension_override(name, size as i64).map_err(rt)?;
    }
    if let Some(prefix) = &options.profile {
        let mut path = prefix.as_os_str().to_owned();
        path.push(format!("-{number}"));
        builder = builder.with_profiling(PathBuf::from(path)).map_err(rt)?;
    }
    let builder = if provider == "CUDA" {
        let cuda = &options.cuda;
        let search = match cuda.conv_search {
            ConvSearch::Exhaustive => ep::cuda::ConvAlgorithmSearch::Exhaustive,
            ConvSearch::Heuristic => ep::cuda::ConvAlgorithmSearch::Heuristic,
            ConvSearch::Default => ep::cuda::ConvAlgorithmSearch::Default,
        };
        let ep = ep::CUDA::default()
            .with_device_id(cuda.device_id)
            .with_conv_algorithm_search(search)
            .with_tf32(cuda.tf32)
            .with_prefer_nhwc(cuda.prefer_nhwc)
            .build()
            .error_on_failure();
        builder
            .with_execution_providers([ep])
            .map_err(|e| EmbedError::Provider(format!("--device cuda: CUDA could not be registered: {e}")))?
    } else {
        builder
            .with_execution_providers([ep::CPU::default().with_arena_allocator(cpu_arena).build()])
            .map_err(|e| EmbedError::Provider(e.to_string()))?
    };
    let mut builder = builder;
    builder.commit_from_file(model).map_err(|e| EmbedError::Model(format!("{}: {e}", model.display())))
}

fn input_shape(card: &ModelCard, size: usize) -> [usize; 4] {
    let (h, w) = (card.height as usize, card.width as usize);
    match card.layout {
        Layout::Nchw => [size, 3, h, w],
        Layout::Nhwc => [size, h, w, 3],
    }
}

/// Runs each shape the instance serves once, so that no request pays for a shape's first run.
fn warm(instance: &Instance, card: &ModelCard, sizes: &BatchSizes) -> Result<Vec<ShapeWarmup>, EmbedError> {
    let shapes: Vec<usize> = match instance.size {
        Some(size) => vec![size],
        None => sizes.iter().collect(),
    };
    let mut session = instance.session.lock().unwrap_or_else(|e| e.into_inner());
    let failed = |e: ort::Error| EmbedError::Inference(format!("warming up: {e}"));
    let mut warmed = Vec::with_capacity(shapes.len());
    for size in shapes {
        let shape = input_shape(card, size);
        let zeros = vec![0f32; shape.iter().product()].into_boxed_slice();
        let input = Tensor::from_array((shape, zeros)).map_err(failed)?;
        let started = Instant::now();
        session.run(ort::inputs![card.input.as_str() => input]).map_err(failed)?;
        let first_run = started.elapsed();
        tracing::debug!(size, ms = first_run.as_millis(), "batch shape warmed");
        warmed.push(ShapeWarmup { size, first_run });
    }
    Ok(warmed)
}
