//! The domain: named indexes of embeddings, hashed by random-hyperplane LSH over a store.
//! Blocking code (matrix products and store I/O): async callers run it on a blocking thread.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ndarray::Array2;

use crate::lsh::{Hyperplanes, LshError, LshShape, VoteCounter, cosine, probe_codes};
use crate::store::{Catalog, IndexDef, IndexStore, NewItem, StoreError, StoredItem};

/// The original notebook's K and L.
pub const DEFAULT_HASH_BITS: u32 = 8;
pub const DEFAULT_TABLES: u32 = 10;
pub const DEFAULT_TOP_K: u32 = 10;
pub const MAX_TOP_K: u32 = 10_000;
pub const MAX_ID_BYTES: usize = 1024;
pub const MAX_NAME_BYTES: usize = 128;
/// Extra buckets per table a query may visit.
pub const MAX_PROBES: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index {0:?} not found")]
    NotFound(String),
    #[error("item {id:?} not found in index {index:?}")]
    ItemNotFound { index: String, id: String },
    #[error("index {0:?} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for IndexError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists(name) => Self::AlreadyExists(name),
            StoreError::Dropped(name) => Self::NotFound(name),
            other => Self::Store(other),
        }
    }
}

impl From<LshError> for IndexError {
    fn from(e: LshError) -> Self {
        Self::InvalidArgument(e.to_string())
    }
}

/// A create request; zeros mean defaults.
#[derive(Debug, Clone, Default)]
pub struct IndexSpec {
    pub name: String,
    pub dim: u32,
    pub hash_bits: u32,
    pub tables: u32,
    pub seed: u64,
    pub model: String,
    /// Subtracted from every vector before hashing.
    pub center: Option<Vec<f32>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IndexInfo {
    pub def: IndexDef,
    pub items: u64,
    pub centered: bool,
}

/// An item with its embedding, as it arrives.
#[derive(Debug, Clone, Default)]
pub struct VectorItem {
    pub id: String,
    pub label: String,
    pub metadata: HashMap<String, String>,
    pub vector: Vec<f32>,
}

/// An item refused while the rest of its batch goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemFailure {
    pub position: u32,
    pub id: String,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct IngestOutcome {
    pub indexed: u32,
    pub failures: Vec<ItemFailure>,
}

#[derive(Debug, Clone)]
pub enum QueryBy {
    Vector(Vec<f32>),
    /// A stored item's embedding; the item itself is left out of the hits.
    Id(String),
}

#[derive(Debug, Clone, Default)]
pub struct QueryOptions {
    /// 0 means `DEFAULT_TOP_K`.
    pub top_k: u32,
    pub min_votes: u32,
    /// Extra buckets to visit in every table (multi-probe).
    pub probes: u32,
    /// Rank the candidates by exact cosine similarity with their stored embeddings.
    pub rerank: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: String,
    pub label: String,
    pub votes: u32,
    /// votes / L.
    pub score: f32,
    pub similarity: f32,
    pub metadata: HashMap<String, String>,
}

#[derive(Debug, Default)]
pub struct QueryResult {
    pub hits: Vec<Hit>,
    pub candidates: u32,
}

/// All indexes of one data directory.
pub struct Engine {
    catalog: Arc<dyn Catalog>,
    open: Mutex<HashMap<String, Arc<Index>>>,
    default_dim: u32,
}

impl Engine {
    /// `default_dim` is the dimension a create with `dim = 0` gets (the default model's).
    pub fn new(catalog: Arc<dyn Catalog>, default_dim: u32) -> Self {
        Self { catalog, open: Mutex::new(HashMap::new()), default_dim }
    }

    fn open_indexes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Index>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn create(&self, spec: IndexSpec) -> Result<IndexInfo, IndexError> {
        validate_name(&spec.name)?;
        let shape = LshShape {
            dim: if spec.dim == 0 { self.default_dim } else { spec.dim } as usize,
            hash_bits: if spec.hash_bits == 0 { DEFAULT_HASH_BITS } else { spec.hash_bits },
            tables: if spec.tables == 0 { DEFAULT_TABLES } else { spec.tables },
        };
        let mut planes = Hyperplanes::draw(shape, spec.seed)?;
        if let Some(center) = &spec.center {
            planes = planes.with_center(center)?;
        }
        let def = IndexDef {
            name: spec.name.clone(),
            dim: shape.dim as u32,
            hash_bits: shape.hash_bits,
            tables: shape.tables,
            seed: spec.seed,
            model: spec.model,
            created_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        };
        let mut open = self.open_indexes();
        let store = self.catalog.create(&def, &planes.to_row_major(), spec.center.as_deref())?;
        let index = Arc::new(Index { store, planes });
        open.insert(spec.name, index.clone());
        index.info()
    }

    /// The index of that name, opened on first use.
    pub fn index(&self, name: &str) -> Result<Arc<Index>, IndexError> {
        let mut open = self.open_indexes();
        if let Some(index) = open.get(name) {
            return Ok(index.clone());
        }
        let store = self.catalog.open(name)?.ok_or_else(|| IndexError::NotFound(name.to_string()))?;
        let def = store.def().clone();
        let shape = LshShape { dim: def.dim as usize, hash_bits: def.hash_bits, tables: def.tables };
        let corrupt = |e: LshError| StoreError::Corrupt(format!("hyperplanes of index {name:?}: {e}"));
        let mut planes = Hyperplanes::from_row_major(shape, store.hyperplanes()?).map_err(corrupt)?;
        if let Some(center) = store.center()? {
            planes = planes.with_center(&center).map_err(corrupt)?;
        }
        let index = Arc::new(Index { store, planes });
        open.insert(name.to_string(), index.clone());
        Ok(index)
    }

    pub fn list(&self) -> Result<Vec<IndexInfo>, IndexError> {
        let defs = self.catalog.list()?;
        defs.iter().map(|def| self.index(&def.name)?.info()).collect()
    }

    pub fn drop_index(&self, name: &str) -> Result<(), IndexError> {
        let index = self.index(name)?;
        let mut open = self.open_indexes();
        index.store.destroy()?;
        open.remove(name);
        Ok(())
    }

    pub fn flush(&self) -> Result<(), IndexError> {
        Ok(self.catalog.flush()?)
    }
}

fn validate_name(name: &str) -> Result<(), IndexError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(IndexError::InvalidArgument(format!(
            "index name must be 1 to {MAX_NAME_BYTES} characters of A-Z a-z 0-9 _ - . (got {name:?})"
        )))
    }
}

/// One open index: its hyperplanes in memory, its data in the store.
pub struct Index {
    store: Arc<dyn IndexStore>,
    planes: Hyperplanes,
}

impl Index {
    pub fn def(&self) -> &IndexDef {
        self.store.def()
    }

    pub fn info(&self) -> Result<IndexInfo, IndexError> {
        Ok(IndexInfo { def: self.def().clone(), items: self.store.len()?, centered: self.planes.is_centered() })
    }

    /// Whether embeddings of `model` (of dimension `dim`) belong in this index.
    pub fn accepts_model(&self, model: &str, dim: u32) -> Result<(), IndexError> {
        let def = self.def();
        if def.dim != dim {
            return Err(IndexError::InvalidArgument(format!(
                "index {:?} has dimension {}, the model {model:?} produces {dim}",
                def.name, def.dim
            )));
        }
        if !def.model.is_empty() && def.model != model {
            return Err(IndexError::InvalidArgument(format!(
                "index {:?} holds embeddings of model {:?}, this server runs {model:?}",
                def.name, def.model
            )));
        }
        Ok(())
    }

    fn check_vector(&self, vector: &[f32]) -> Result<(), String> {
        let dim = self.def().dim as usize;
        if vector.len() != dim {
            return Err(format!(
                "embedding has {} values, index {:?} has dimension {dim}",
                vector.len(),
                self.def().name
            ));
        }
        if let Some(i) = vector.iter().position(|x| !x.is_finite()) {
            return Err(format!("embedding value {i} is {}, not a finite number", vector[i]));
        }
        Ok(())
    }

    fn check_item(&self, item: &VectorItem) -> Result<(), String> {
        if item.id.is_empty() {
            return Err("item id is empty".into());
        }
        if item.id.len() > MAX_ID_BYTES {
            return Err(format!("item id is {} bytes, the limit is {MAX_ID_BYTES}", item.id.len()));
        }
        self.check_vector(&item.vector)
    }

    /// Indexes the valid items (with their positions in the request) in one atomic, durable
    /// write; invalid ones come back as failures.
    pub fn ingest(&self, items: Vec<(u32, VectorItem)>) -> Result<IngestOutcome, IndexError> {
        let mut outcome = IngestOutcome::default();
        let mut valid = Vec::with_capacity(items.len());
        for (position, item) in items {
            match self.check_item(&item) {
                Ok(()) => valid.push(item),
                Err(message) => outcome.failures.push(ItemFailure { position, id: item.id, message }),
            }
        }
        if valid.is_empty() {
            return Ok(outcome);
        }
        let codes = self.codes(valid.iter().map(|i| i.vector.as_slice()), valid.len())?;
        let new_items: Vec<NewItem> = valid
            .into_iter()
            .zip(codes.outer_iter())
            .map(|(item, codes)| NewItem {
                id: item.id,
                label: item.label,
                metadata: item.metadata,
                codes: codes.to_vec(),
                vector: item.vector,
            })
            .collect();
        self.store.upsert(&new_items)?;
        outcome.indexed = new_items.len() as u32;
        Ok(outcome)
    }

    fn codes<'a>(&self, vectors: impl Iterator<Item = &'a [f32]>, rows: usize) -> Result<Array2<u64>, IndexError> {
        Ok(self.planes.codes_of(self.projections(vectors, rows)?.view()))
    }

    /// Projections (centred, if the index has a center) of `rows` vectors on every hyperplane.
    fn projections<'a>(
        &self,
        vectors: impl Iterator<Item = &'a [f32]>,
        rows: usize,
    ) -> Result<Array2<f32>, IndexError> {
        let dim = self.def().dim as usize;
        let mut flat = Vec::with_capacity(rows * dim);
        vectors.for_each(|v| flat.extend_from_slice(v));
        let batch =
            Array2::from_shape_vec((rows, dim), flat).map_err(|e| IndexError::InvalidArgument(e.to_string()))?;
        Ok(self.planes.project(batch.view())?)
    }

    pub fn delete(&self, ids: &[String]) -> Result<usize, IndexError> {
        Ok(self.store.delete(ids)?)
    }

    pub fn query(&self, by: QueryBy, options: &QueryOptions) -> Result<QueryResult, IndexError> {
        let top_k = match options.top_k {
            0 => DEFAULT_TOP_K,
            k if k > MAX_TOP_K => {
                return Err(IndexError::InvalidArgument(format!("top_k {k} is over the limit of {MAX_TOP_K}")));
            }
            k => k,
        } as usize;
        let (vector, exclude) = match by {
            QueryBy::Vector(v) => {
                self.check_vector(&v).map_err(IndexError::InvalidArgument)?;
                (v, None)
            }
            QueryBy::Id(id) => {
                let number = self
                    .store
                    .item_number(&id)?
                    .ok_or_else(|| IndexError::ItemNotFound { index: self.def().name.clone(), id: id.clone() })?;
                (self.store.vector(number)?, Some(number))
            }
        };
        if options.probes > MAX_PROBES {
            return Err(IndexError::InvalidArgument(format!(
                "probes {} is over the limit of {MAX_PROBES}",
                options.probes
            )));
        }
        let projections = self.projections(std::iter::once(vector.as_slice()), 1)?;
        let codes = self.planes.codes_of(projections.view());
        let k = self.def().hash_bits as usize;

        let mut votes = VoteCounter::default();
        let mut bucket = Vec::new();
        for (table, &code) in codes.row(0).iter().enumerate() {
            let table_projections = projections.row(0).slice(ndarray::s![table * k..(table + 1) * k]).to_vec();
            let probes = probe_codes(&table_projections, code, options.probes as usize);
            // An item is in one bucket per table, so visiting several counts it at most once.
            for code in std::iter::once(code).chain(probes) {
                bucket.clear();
                self.store.bucket(table as u16, code, &mut bucket)?;
                votes.add_bucket(&bucket);
            }
        }
        if let Some(number) = exclude {
            votes.remove(number);
        }

        let tables = self.def().tables as f32;
        let hit = |item: StoredItem, votes: u32, similarity: f32| Hit {
            id: item.id,
            label: item.label,
            votes,
            score: votes as f32 / tables,
            similarity,
            metadata: item.metadata,
        };
        let hits = if options.rerank {
            // Exact cosine over every candidate; votes only filter (min_votes).
            let mut scored = Vec::new();
            for (number, v) in votes.at_least(options.min_votes) {
                scored.push((cosine(&vector, &self.store.vector(number)?), v, number));
            }
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
            scored.truncate(top_k);
            let numbers: Vec<u32> = scored.iter().map(|s| s.2).collect();
            let by_number: HashMap<u32, (f32, u32)> = scored.iter().map(|&(sim, v, n)| (n, (sim, v))).collect();
            let mut hits: Vec<Hit> = self
                .store
                .items(&numbers)?
                .into_iter()
                .map(|item| {
                    let (sim, v) = by_number[&item.number];
                    hit(item, v, sim)
                })
                .collect();
            hits.sort_by(|a, b| b.similarity.total_cmp(&a.similarity).then_with(|| a.id.cmp(&b.id)));
            hits
        } else {
            let contenders: HashMap<u32, u32> = votes.contenders(top_k, options.min_votes).into_iter().collect();
            let numbers: Vec<u32> = contenders.keys().copied().collect();
            let mut items = self.store.items(&numbers)?;
            items.sort_by(|a, b| contenders[&b.number].cmp(&contenders[&a.number]).then_with(|| a.id.cmp(&b.id)));
            items.truncate(top_k);
            items
                .into_iter()
                .map(|item| {
                    let v = contenders[&item.number];
                    hit(item, v, 0.0)
                })
                .collect()
        };
        Ok(QueryResult { hits, candidates: votes.candidates() as u32 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SledCatalog, SledOptions};

    fn engine(dir: &std::path::Path) -> Engine {
        Engine::new(Arc::new(SledCatalog::open(dir, &SledOptions { fsync: false, ..Default::default() }).unwrap()), 4)
    }

    fn vec_item(id: &str, v: &[f32]) -> VectorItem {
        VectorItem { id: id.into(), vector: v.to_vec(), ..Default::default() }
    }

    #[test]
    fn defaults_are_the_notebooks_and_dim_of_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let info = engine(dir.path()).create(IndexSpec { name: "a".into(), ..Default::default() }).unwrap();
        assert_eq!((info.def.dim, info.def.hash_bits, info.def.tables, info.items), (4, 8, 10, 0));
    }

    #[test]
    fn bad_names_and_shapes_are_invalid_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        for name in ["", "a b", "é", &"x".repeat(129)] {
            assert!(matches!(
                e.create(IndexSpec { name: name.into(), ..Default::default() }),
                Err(IndexError::InvalidArgument(_))
            ));
        }
        assert!(matches!(
            e.create(IndexSpec { name: "a".into(), hash_bits: 65, ..Default::default() }),
            Err(IndexError::InvalidArgument(_))
        ));
        assert!(matches!(
            e.create(IndexSpec { name: "a".into(), tables: 257, ..Default::default() }),
            Err(IndexError::InvalidArgument(_))
        ));
    }

    #[test]
    fn bad_items_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        e.create(IndexSpec { name: "a".into(), ..Default::default() }).unwrap();
        let index = e.index("a").unwrap();
        let outcome = index
            .ingest(vec![
                (0, vec_item("ok", &[1., 2., 3., 4.])),
                (1, vec_item("", &[1., 2., 3., 4.])),
                (2, vec_item("short", &[1., 2.])),
                (3, vec_item("nan", &[1., f32::NAN, 3., 4.])),
                (4, vec_item("inf", &[1., 2., f32::INFINITY, 4.])),
                (5, vec_item("ok2", &[4., 3., 2., 1.])),
            ])
            .unwrap();
        assert_eq!(outcome.indexed, 2);
        assert_eq!(outcome.failures.iter().map(|f| f.position).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(index.info().unwrap().items, 2);
    }

    #[test]
    fn query_orders_by_votes_then_id_and_excludes_itself() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 8, seed: 3, ..Default::default() }).unwrap();
        let index = e.index("a").unwrap();
        let q = [1.0, 0.2, 0.1, 0.0];
        index
            .ingest(vec![
                (0, vec_item("same-b", &q)),
                (1, vec_item("same-a", &q)),
                (2, vec_item("near", &[1.0, 0.25, 0.1, 0.05])),
                (3, vec_item("opposite", &[-1.0, -0.2, -0.1, 0.0])),
            ])
            .unwrap();
        let result = index.query(QueryBy::Vector(q.to_vec()), &QueryOptions::default()).unwrap();
        let ids: Vec<&str> = result.hits.iter().map(|h| h.id.as_str()).collect();
        assert_eq!(&ids[..2], ["same-a", "same-b"]);
        assert_eq!(result.hits[0].votes, 8);
        assert_eq!(result.hits[0].score, 1.0);
        assert!(!ids.contains(&"opposite"), "the opposite vector shares no bucket");
        let by_id = index.query(QueryBy::Id("same-a".into()), &QueryOptions::default()).unwrap();
        assert_eq!(by_id.hits[0].id, "same-b");
        assert!(by_id.hits.iter().all(|h| h.id != "same-a"));
        let strict = index
            .query(QueryBy::Vector(q.to_vec()), &QueryOptions { top_k: 1, min_votes: 8, ..Default::default() })
            .unwrap();
        assert_eq!(strict.hits.len(), 1);
        assert!(matches!(
            index.query(QueryBy::Id("nope".into()), &QueryOptions::default()),
            Err(IndexError::ItemNotFound { .. })
        ));
    }

    #[test]
    fn probes_widen_the_candidates_and_keep_votes_per_table() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        e.create(IndexSpec { name: "a".into(), hash_bits: 16, tables: 4, seed: 5, ..Default::default() }).unwrap();
        let index = e.index("a").unwrap();
        let items = (0..200)
            .map(|i| (i, vec_item(&format!("{i}"), &[(i as f32).sin(), (i as f32 * 0.7).cos(), 0.3, -0.2])))
            .collect();
        index.ingest(items).unwrap();
        let q = vec![0.4, 0.5, 0.3, -0.2];
        let plain =
            index.query(QueryBy::Vector(q.clone()), &QueryOptions { top_k: 200, ..Default::default() }).unwrap();
        let probed =
            index.query(QueryBy::Vector(q), &QueryOptions { top_k: 200, probes: 8, ..Default::default() }).unwrap();
        assert!(probed.candidates > plain.candidates, "{} vs {}", probed.candidates, plain.candidates);
        assert!(probed.hits.iter().all(|h| h.votes <= 4));
    }

    #[test]
    fn centered_index_keeps_its_center_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let spec = IndexSpec {
            name: "c".into(),
            hash_bits: 8,
            tables: 4,
            center: Some(vec![1.0, 1.0, 1.0, 1.0]),
            ..Default::default()
        };
        let first = {
            let e = engine(dir.path());
            assert!(e.create(spec).unwrap().centered);
            let index = e.index("c").unwrap();
            index
                .ingest(vec![(0, vec_item("x", &[1.1, 0.9, 1.2, 0.8])), (1, vec_item("y", &[0.9, 1.1, 0.8, 1.2]))])
                .unwrap();
            index.query(QueryBy::Vector(vec![1.1, 0.9, 1.2, 0.8]), &QueryOptions::default()).unwrap().hits
        };
        let e = engine(dir.path());
        let index = e.index("c").unwrap();
        assert!(index.info().unwrap().centered);
        assert_eq!(
            index.query(QueryBy::Vector(vec![1.1, 0.9, 1.2, 0.8]), &QueryOptions::default()).unwrap().hits,
            first
        );
        let bad = IndexSpec { name: "d".into(), center: Some(vec![0.0; 3]), ..Default::default() };
        assert!(matches!(e.create(bad), Err(IndexError::InvalidArgument(_))));
    }

    #[test]
    fn dropped_index_is_not_found_and_name_is_reusable() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        e.create(IndexSpec { name: "a".into(), ..Default::default() }).unwrap();
        assert!(matches!(
            e.create(IndexSpec { name: "a".into(), ..Default::default() }),
            Err(IndexError::AlreadyExists(_))
        ));
        let old = e.index("a").unwrap();
        e.drop_index("a").unwrap();
        assert!(matches!(e.index("a"), Err(IndexError::NotFound(_))));
        assert!(matches!(old.ingest(vec![(0, vec_item("x", &[1., 2., 3., 4.]))]), Err(IndexError::NotFound(_))));
        e.create(IndexSpec { name: "a".into(), ..Default::default() }).unwrap();
        assert_eq!(e.list().unwrap().len(), 1);
    }
}
