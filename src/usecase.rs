//! The service's use cases, below the transport: what an ingest, an embed, a query by image and
//! a create mean when the server runs a model (`pipeline`) over the indexes (`index`). The api
//! layer only converts messages and maps `UseCaseError` to gRPC status codes.

use std::collections::HashMap;
use std::sync::Arc;

use crate::index::{
    BackupReport, Engine, Index, IndexError, IndexInfo, IndexShape, IndexSize, IndexSpec, IngestOutcome, ItemFailure,
    Lookup, LookupFields, QueryBy, QueryOptions, QueryResult, RefusalReason, SharedEngine, SharedIndex, VectorItem,
};
use crate::limits::{OverLimit, RequestLimits};
use crate::pipeline::{BatchError, ImageError, ImagePipeline};
use crate::store::IndexDef;
use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum UseCaseError {
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The model cannot take the work now.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// The server runs no model and the call needs one.
    #[error("this server runs without an embedding model (--no-model); send embeddings")]
    NoModel,
    #[error("{0}")]
    InvalidArgument(String),
    /// A request over a bound on what one call may cost (items in a batch, an index's planes).
    #[error(transparent)]
    TooLarge(OverLimit),
    /// The call is not one this server's kind of store can answer.
    #[error("{0}")]
    NotSupported(String),
    /// Blocking work could not run (its thread panicked or the runtime is going away).
    #[error("internal error: {0}")]
    Internal(String),
}

/// What an item to ingest carries.
#[derive(Debug, Clone)]
pub enum ItemContent {
    Embedding(Vec<f32>),
    Image(Vec<u8>),
    /// Neither: refused alone.
    Missing,
}

/// An item to ingest, as a client sent it.
#[derive(Debug, Clone)]
pub struct IncomingItem {
    pub id: String,
    pub label: String,
    pub metadata: HashMap<String, String>,
    pub content: ItemContent,
}

/// What a query by image, embedding or id asks for before it reaches the index.
#[derive(Debug, Clone)]
pub enum QueryInput {
    Embedding(Vec<f32>),
    Image(Vec<u8>),
    Id(String),
}

/// A new index as a client describes it; `UseCases::create` fills in the defaults.
#[derive(Debug, Clone, Default)]
pub struct NewIndex {
    pub name: String,
    pub dim: u32,
    pub hash_bits: u32,
    pub tables: u32,
    pub seed: u64,
    /// Empty: the model's center where the index holds the model's embeddings.
    pub center: Vec<f32>,
    pub no_center: bool,
    pub sketch_bits: u32,
    pub store_embeddings: Option<bool>,
    pub thumbnails: bool,
}

/// The indexes a server serves: a data directory's (embedded sled, with its write-ahead log),
/// or a cluster store's (shared with other replicas). The use cases below are the same for both.
#[derive(Clone)]
pub enum Indexes {
    Local(Arc<Engine>),
    Shared(Arc<SharedEngine>),
}

impl From<Arc<Engine>> for Indexes {
    fn from(engine: Arc<Engine>) -> Self {
        Indexes::Local(engine)
    }
}

impl From<Arc<SharedEngine>> for Indexes {
    fn from(engine: Arc<SharedEngine>) -> Self {
        Indexes::Shared(engine)
    }
}

/// One open index of either kind.
#[derive(Clone)]
pub enum OpenIndex {
    Local(Arc<Index>),
    Shared(Arc<SharedIndex>),
}

impl OpenIndex {
    pub fn def(&self) -> &IndexDef {
        match self {
            OpenIndex::Local(index) => index.def(),
            OpenIndex::Shared(index) => index.def(),
        }
    }

    fn accepts_model(&self, model: &str, dim: u32) -> Result<(), IndexError> {
        match self {
            OpenIndex::Local(index) => index.accepts_model(model, dim),
            OpenIndex::Shared(index) => index.accepts_model(model, dim),
        }
    }

    async fn ingest(self, items: Vec<(u32, VectorItem)>) -> Result<IngestOutcome, UseCaseError> {
        match self {
            OpenIndex::Local(index) => blocking(move || index.ingest(items)).await,
            OpenIndex::Shared(index) => Ok(index.ingest(items).await?),
        }
    }

    async fn query(self, by: QueryBy, options: QueryOptions) -> Result<QueryResult, UseCaseError> {
        match self {
            OpenIndex::Local(index) => blocking(move || index.query(by, &options)).await,
            OpenIndex::Shared(index) => Ok(index.query(by, &options).await?),
        }
    }

    async fn delete(self, ids: Vec<String>) -> Result<usize, UseCaseError> {
        match self {
            OpenIndex::Local(index) => blocking(move || index.delete(&ids)).await,
            OpenIndex::Shared(index) => Ok(index.delete(&ids).await?),
        }
    }

    async fn get_items(self, ids: Vec<String>, fields: LookupFields) -> Result<Lookup, UseCaseError> {
        match self {
            OpenIndex::Local(index) => blocking(move || index.get_items(&ids, fields)).await,
            OpenIndex::Shared(index) => Ok(index.get_items(&ids, fields).await?),
        }
    }
}

/// The indexes and the model a server runs, and the limits its clients must stay within.
#[derive(Clone)]
pub struct UseCases {
    indexes: Indexes,
    /// `None` when the server runs without a model (embeddings only).
    pipeline: Option<Arc<ImagePipeline>>,
    limits: Arc<RequestLimits>,
}

impl UseCases {
    pub fn new(indexes: impl Into<Indexes>, pipeline: Option<Arc<ImagePipeline>>, limits: RequestLimits) -> Self {
        Self { indexes: indexes.into(), pipeline, limits: Arc::new(limits) }
    }

    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    pub fn indexes(&self) -> &Indexes {
        &self.indexes
    }

    pub fn pipeline(&self) -> Result<&Arc<ImagePipeline>, UseCaseError> {
        self.pipeline.as_ref().ok_or(UseCaseError::NoModel)
    }

    pub async fn index(&self, name: String) -> Result<OpenIndex, UseCaseError> {
        match &self.indexes {
            Indexes::Local(engine) => {
                let engine = engine.clone();
                blocking(move || engine.index(&name)).await.map(OpenIndex::Local)
            }
            Indexes::Shared(engine) => Ok(OpenIndex::Shared(engine.index(&name).await?)),
        }
    }

    /// An index's definition and size.
    pub async fn info(&self, name: String) -> Result<IndexInfo, UseCaseError> {
        match self.index(name).await? {
            OpenIndex::Local(index) => blocking(move || index.info()).await,
            OpenIndex::Shared(index) => Ok(index.info().await?),
        }
    }

    pub async fn list(&self) -> Result<Vec<IndexInfo>, UseCaseError> {
        match &self.indexes {
            Indexes::Local(engine) => {
                let engine = engine.clone();
                blocking(move || engine.list()).await
            }
            Indexes::Shared(engine) => Ok(engine.list().await?),
        }
    }

    pub async fn drop_index(&self, name: String) -> Result<(), UseCaseError> {
        match &self.indexes {
            Indexes::Local(engine) => {
                let engine = engine.clone();
                blocking(move || engine.drop_index(&name)).await
            }
            Indexes::Shared(engine) => Ok(engine.drop_index(&name).await?),
        }
    }

    /// Each index's size and log lag (for the metrics, at every scrape).
    pub async fn sizes(&self) -> Result<Vec<IndexSize>, UseCaseError> {
        match &self.indexes {
            Indexes::Local(engine) => {
                let engine = engine.clone();
                blocking(move || Ok(engine.sizes())).await
            }
            Indexes::Shared(engine) => Ok(engine.sizes().await?),
        }
    }

    /// A consistent copy of the data directory in `dir`. The cluster store keeps no files of
    /// its own: its servers' snapshots (RDB/AOF) back it up.
    pub async fn backup(&self, dir: std::path::PathBuf) -> Result<BackupReport, UseCaseError> {
        match &self.indexes {
            Indexes::Local(engine) => {
                let engine = engine.clone();
                blocking(move || engine.backup(&dir)).await
            }
            Indexes::Shared(_) => Err(UseCaseError::NotSupported(
                "this server's indexes are on the cluster store: back up its servers (BGSAVE, AOF) instead".into(),
            )),
        }
    }

    fn shape_for(&self, dim: u32, hash_bits: u32, tables: u32, sketch_bits: u32) -> IndexShape {
        match &self.indexes {
            Indexes::Local(engine) => engine.shape_for(dim, hash_bits, tables, sketch_bits),
            Indexes::Shared(engine) => engine.shape_for(dim, hash_bits, tables, sketch_bits),
        }
    }

    /// The served model's embeddings fit `index`.
    fn check_model(pipeline: &ImagePipeline, index: &OpenIndex) -> Result<(), UseCaseError> {
        let card = pipeline.card();
        Ok(index.accepts_model(&card.name, card.dim)?)
    }

    /// Creates an index. It holds the served model's embeddings when its dimension is the
    /// model's (or unset), and then takes the model's center unless told otherwise.
    pub async fn create(&self, new: NewIndex) -> Result<IndexInfo, UseCaseError> {
        let shape = self.shape_for(new.dim, new.hash_bits, new.tables, new.sketch_bits);
        shape.check_fixed_maxima()?;
        self.limits.check_dim(shape.dim).map_err(|over| UseCaseError::InvalidArgument(over.to_string()))?;
        self.limits.check_plane_memory(&shape).map_err(UseCaseError::TooLarge)?;
        let served = self.pipeline.as_ref().map(|p| p.card()).filter(|card| new.dim == 0 || new.dim == card.dim);
        let model = served.map(|card| card.name.clone()).unwrap_or_default();
        let center = match (new.center.is_empty(), new.no_center) {
            (false, _) => Some(new.center),
            (true, true) => None,
            (true, false) => served.and_then(|card| card.center.clone()),
        };
        let spec = IndexSpec {
            name: new.name,
            dim: new.dim,
            hash_bits: new.hash_bits,
            tables: new.tables,
            seed: new.seed,
            model,
            center,
            sketch_bits: new.sketch_bits,
            store_vectors: new.store_embeddings,
            thumbnails: new.thumbnails,
        };
        match &self.indexes {
            Indexes::Local(engine) => {
                let engine = engine.clone();
                blocking(move || engine.create(spec)).await
            }
            Indexes::Shared(engine) => Ok(engine.create(spec).await?),
        }
    }

    /// Ingests one batch: embeddings as they are, images through the model; an item that
    /// cannot be indexed is refused alone (in `failures`, by its position in the batch), and
    /// the rest is indexed durably in request order (the later of two items with one id wins).
    pub async fn ingest(&self, index: &str, items: Vec<IncomingItem>) -> Result<IngestOutcome, UseCaseError> {
        self.limits.check_batch(items.len()).map_err(UseCaseError::TooLarge)?;
        let index = self.index(index.to_string()).await?;
        let mut vectors = Vec::with_capacity(items.len());
        let mut failures = Vec::new();
        let mut images = Vec::new();
        for (position, item) in (0u32..).zip(items) {
            let IncomingItem { id, label, metadata, content } = item;
            if let Err(over) = self.limits.check_item_fields(&id, &label, &metadata) {
                let id = crate::limits::prefix(&id).to_string();
                failures.push(ItemFailure { position, id, message: over.to_string(), reason: RefusalReason::Limit });
                continue;
            }
            match content {
                ItemContent::Embedding(vector) => {
                    vectors.push((position, VectorItem { id, label, metadata, vector, thumbnail: None }))
                }
                ItemContent::Image(bytes) => {
                    images.push((position, VectorItem { id, label, metadata, ..Default::default() }, bytes))
                }
                ItemContent::Missing => failures.push(ItemFailure {
                    position,
                    id,
                    message: "item has neither an image nor an embedding".into(),
                    reason: RefusalReason::NoContent,
                }),
            }
        }
        if !images.is_empty() {
            let usable = self.pipeline().and_then(|p| Self::check_model(p, &index).map(|()| p));
            match usable {
                Err(UseCaseError::Batch(e)) => return Err(e.into()),
                Err(refusal) => {
                    let message = refusal.to_string();
                    failures.extend(images.into_iter().map(|(position, item, _)| ItemFailure {
                        position,
                        id: item.id,
                        message: message.clone(),
                        reason: RefusalReason::Model,
                    }))
                }
                Ok(pipeline) => {
                    let (meta, bytes): (Vec<_>, Vec<_>) = images.into_iter().map(|(p, item, b)| ((p, item), b)).unzip();
                    let thumbnails = index.def().thumbnails;
                    let embedded_all = pipeline.embed_all(bytes, thumbnails).await;
                    for ((position, mut item), embedded) in meta.into_iter().zip(embedded_all) {
                        match embedded {
                            Ok(embedded) => {
                                item.vector = embedded.vector;
                                item.thumbnail = embedded.thumbnail;
                                vectors.push((position, item));
                            }
                            Err(ImageError::Decode(e)) => failures.push(ItemFailure {
                                position,
                                id: item.id,
                                message: e.to_string(),
                                reason: RefusalReason::Image,
                            }),
                            Err(ImageError::Batch(e)) => return Err(e.into()),
                        }
                    }
                }
            }
        }
        vectors.sort_by_key(|(position, _)| *position);
        let name = index.def().name.clone();
        let mut outcome = index.ingest(vectors).await?;
        failures.append(&mut outcome.failures);
        failures.sort_by_key(|f| f.position);
        outcome.failures = failures;
        record_ingest(&name, &outcome);
        Ok(outcome)
    }

    /// Embeds images one by one in a batch: each an embedding or a decode error.
    pub async fn embed(&self, images: Vec<Vec<u8>>) -> Result<Vec<Result<Vec<f32>, String>>, UseCaseError> {
        let pipeline = self.pipeline()?;
        self.limits.check_batch(images.len()).map_err(UseCaseError::TooLarge)?;
        let mut out = Vec::with_capacity(images.len());
        for result in pipeline.embed_all(images, false).await {
            match result {
                Ok(embedded) => out.push(Ok(embedded.vector)),
                Err(ImageError::Decode(e)) => out.push(Err(e.to_string())),
                Err(ImageError::Batch(e)) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// A query within the limits: an image is embedded first.
    pub async fn query(
        &self,
        index: String,
        input: QueryInput,
        options: QueryOptions,
    ) -> Result<QueryResult, UseCaseError> {
        self.limits
            .check_query(options.top_k, options.rerank_depth, options.probes)
            .map_err(|over| UseCaseError::InvalidArgument(over.to_string()))?;
        if let QueryInput::Id(id) = &input {
            self.check_id(id)?;
        }
        let index = self.index(index).await?;
        let by = self.query_by(&index, input).await?;
        let started = std::time::Instant::now();
        let result = index.query(by, options).await?;
        let plan = match result.plan {
            crate::index::SearchPlan::Scan => "scan",
            _ => "tables",
        };
        metrics::histogram!(telemetry::QUERY, "plan" => plan).record(started.elapsed().as_secs_f64());
        metrics::histogram!(telemetry::QUERY_CANDIDATES).record(f64::from(result.candidates));
        Ok(result)
    }

    /// Deletes items by id; returns how many existed.
    pub async fn delete(&self, index: String, ids: Vec<String>) -> Result<usize, UseCaseError> {
        self.limits.check_batch(ids.len()).map_err(UseCaseError::TooLarge)?;
        ids.iter().try_for_each(|id| self.check_id(id))?;
        let index = self.index(index).await?;
        index.delete(ids).await
    }

    /// The stored items with these ids, and the ids the index does not hold.
    pub async fn get_items(
        &self,
        index: String,
        ids: Vec<String>,
        fields: LookupFields,
    ) -> Result<Lookup, UseCaseError> {
        self.limits.check_batch(ids.len()).map_err(UseCaseError::TooLarge)?;
        ids.iter().try_for_each(|id| self.check_id(id))?;
        let index = self.index(index).await?;
        index.get_items(ids, fields).await
    }

    fn check_id(&self, id: &str) -> Result<(), UseCaseError> {
        if id.len() > self.limits.max_id_bytes {
            let over = OverLimit {
                what: "the id's length in bytes",
                value: id.len() as u64,
                limit: self.limits.max_id_bytes as u64,
                flag: "--max-id-bytes",
            };
            return Err(UseCaseError::InvalidArgument(over.to_string()));
        }
        Ok(())
    }

    /// What to look up in `index`: an image becomes the model's embedding of it.
    async fn query_by(&self, index: &OpenIndex, input: QueryInput) -> Result<QueryBy, UseCaseError> {
        Ok(match input {
            QueryInput::Embedding(values) => QueryBy::Vector(values),
            QueryInput::Id(id) => QueryBy::Id(id),
            QueryInput::Image(bytes) => {
                let pipeline = self.pipeline()?;
                Self::check_model(pipeline, index)?;
                match pipeline.embed(bytes).await {
                    Ok(vector) => QueryBy::Vector(vector),
                    Err(ImageError::Decode(e)) => return Err(UseCaseError::InvalidArgument(e.to_string())),
                    Err(ImageError::Batch(e)) => return Err(e.into()),
                }
            }
        })
    }
}

/// An acknowledged batch in the metrics: items indexed (by index), refused (by reason).
fn record_ingest(index: &str, outcome: &IngestOutcome) {
    metrics::counter!(telemetry::INGEST_BATCHES).increment(1);
    let items = u64::from(outcome.indexed) + outcome.failures.len() as u64;
    metrics::histogram!(telemetry::INGEST_BATCH_ITEMS).record(items as f64);
    metrics::counter!(telemetry::ITEMS_INGESTED, "index" => index.to_string()).increment(u64::from(outcome.indexed));
    for failure in &outcome.failures {
        metrics::counter!(telemetry::ITEMS_REFUSED, "reason" => failure.reason.as_str()).increment(1);
    }
}

/// Runs blocking domain work off the async runtime.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, IndexError> + Send + 'static,
) -> Result<T, UseCaseError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => Ok(result?),
        Err(e) => Err(UseCaseError::Internal(e.to_string())),
    }
}
