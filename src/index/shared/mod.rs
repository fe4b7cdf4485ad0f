//! Indexes on a shared store (`serve --store redis://…`): many stateless replicas serve one
//! set of indexes. A replica keeps only what never changes under an index's uid (definition,
//! planes); which uid a name has, item numbers, liveness, sketches and counts are read from the
//! store at each call, so no replica's writes can make another replica's answers wrong.
//!
//! One job per file: this one the engine (catalog, open indexes); `write` (ingest, delete);
//! `read` (query, lookups).

mod read;
mod write;

use super::engine::DrawnIndex;
use super::*;
use crate::store::cluster::{ClusterIndex, ClusterStore};

/// Every index of a cluster store, as one replica serves them.
pub struct SharedEngine {
    store: ClusterStore,
    default_dim: u32,
    /// Opened indexes by uid (a uid is never reused, so what is cached under it never changes).
    opened: Mutex<HashMap<u64, Arc<SharedIndex>>>,
}

/// One index on the cluster store: its immutable part in memory, its data in the cluster.
pub struct SharedIndex {
    store: ClusterStore,
    def: IndexDef,
    uid: u64,
    planes: Hyperplanes,
    sketch: Option<Hyperplanes>,
}

impl SharedEngine {
    /// `default_dim` is the dimension a create with `dim = 0` gets (the served model's).
    pub fn new(store: ClusterStore, default_dim: u32) -> Self {
        Self { store, default_dim, opened: Mutex::new(HashMap::new()) }
    }

    pub fn shape_for(&self, dim: u32, hash_bits: u32, tables: u32, sketch_bits: u32) -> IndexShape {
        IndexShape::with_defaults(dim, hash_bits, tables, sketch_bits, self.default_dim)
    }

    pub async fn create(&self, spec: IndexSpec) -> Result<IndexInfo, IndexError> {
        let resolved = self.shape_for(spec.dim, spec.hash_bits, spec.tables, spec.sketch_bits);
        let drawn = DrawnIndex::draw(spec, resolved)?;
        let created = self.store.create(&drawn.def, drawn.params()).await?;
        self.open(created).await?.info().await
    }

    /// The index of that name now (another replica may have dropped or re-created it).
    pub async fn index(&self, name: &str) -> Result<Arc<SharedIndex>, IndexError> {
        let found = self.store.find(name).await?.ok_or_else(|| IndexError::NotFound(name.to_string()))?;
        self.open(found).await
    }

    async fn open(&self, found: ClusterIndex) -> Result<Arc<SharedIndex>, IndexError> {
        if let Some(index) = self.opened_indexes().get(&found.uid) {
            return Ok(index.clone());
        }
        let matrices = self.store.matrices(found.uid).await?;
        let (planes, sketch) = planes_of(&found.def, matrices.hyperplanes, matrices.center, matrices.sketch_planes)?;
        let index = Arc::new(SharedIndex { store: self.store.clone(), def: found.def, uid: found.uid, planes, sketch });
        self.opened_indexes().insert(found.uid, index.clone());
        Ok(index)
    }

    fn opened_indexes(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<SharedIndex>>> {
        self.opened.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn list(&self) -> Result<Vec<IndexInfo>, IndexError> {
        let found = self.store.list().await?;
        // Forget indexes dropped meanwhile (by any replica).
        self.opened_indexes().retain(|uid, _| found.iter().any(|f| f.uid == *uid));
        let mut infos = Vec::with_capacity(found.len());
        for index in found {
            infos.push(self.open(index).await?.info().await?);
        }
        Ok(infos)
    }

    /// Each index's size (nothing is ever logged but not applied here).
    pub async fn sizes(&self) -> Result<Vec<IndexSize>, IndexError> {
        let infos = self.list().await?;
        Ok(infos.into_iter().map(|info| IndexSize { name: info.def.name, items: info.items, unapplied: 0 }).collect())
    }

    pub async fn drop_index(&self, name: &str) -> Result<(), IndexError> {
        let found = self.store.find(name).await?.ok_or_else(|| IndexError::NotFound(name.to_string()))?;
        let uid = found.uid;
        if !self.store.drop_index(&found).await? {
            return Err(IndexError::NotFound(name.to_string()));
        }
        self.opened_indexes().remove(&uid);
        Ok(())
    }
}

impl SharedIndex {
    pub fn def(&self) -> &IndexDef {
        &self.def
    }

    pub fn accepts_model(&self, model: &str, dim: u32) -> Result<(), IndexError> {
        accepts_model(&self.def, model, dim)
    }

    pub async fn info(&self) -> Result<IndexInfo, IndexError> {
        let items = self.store.count(self.uid).await?;
        Ok(IndexInfo { def: self.def.clone(), items, centered: self.planes.is_centered() })
    }
}
