//! The engine: every index of a data directory, their shared log, and its threads.

use super::*;

impl Engine {
    /// Opens every index of `catalog` with the log in `log_dir`. `default_dim` is the dimension a
    /// create with `dim = 0` gets (the default model's).
    pub fn open(catalog: Arc<dyn Catalog>, log_dir: &Path, default_dim: u32) -> Result<Self, IndexError> {
        Self::open_with(catalog, log_dir, default_dim, EngineOptions::default()).map(|(engine, _)| engine)
    }

    pub fn open_with(
        catalog: Arc<dyn Catalog>,
        log_dir: &Path,
        default_dim: u32,
        options: EngineOptions,
    ) -> Result<(Self, Recovery), IndexError> {
        let started = std::time::Instant::now();
        let mut stores = Vec::new();
        let mut applied_by_uid = HashMap::new();
        for def in catalog.list()? {
            let store = catalog.open(&def.name)?.ok_or_else(|| IndexError::NotFound(def.name.clone()))?;
            applied_by_uid.insert(store.uid(), store.applied_position()?);
            stores.push(store);
        }
        // The log is read a segment at a time, and only the batches past their index's applied
        // position are kept: the memory a start takes is bounded by the log lag, not by the
        // segments the log retains.
        let (mut records, mut tail) = (0usize, Vec::new());
        let wal = Wal::open_streaming(log_dir, options.write.segment_bytes, options.repair_log, &mut |record| {
            records += 1;
            let (uid, batch) = commit::decode(&record)?;
            if applied_by_uid.get(&uid).is_some_and(|&applied| record.position > applied) {
                tail.push((record.position, uid, batch));
            }
            Ok(())
        })?;
        tracing::info!(records, kept = tail.len(), ms = started.elapsed().as_millis() as u64, "log read");
        let log = Arc::new(LogShared::new(catalog.clone(), wal, options.write.clone()));
        let mut open = HashMap::new();
        let mut by_uid = HashMap::new();
        for store in stores {
            let (index, applied) = Index::open(store, log.clone(), options.full_scan_threshold)?;
            by_uid.insert(index.store.uid(), (index.clone(), applied));
            open.insert(index.def().name.clone(), index);
        }
        // A log whose positions restarted below what the store applied (its `wal/` lost or
        // replaced) would have its new records skipped at the next replay: refuse, or with
        // `repair_log` continue after the store's positions.
        let behind = by_uid.values().map(|(index, applied)| (*applied, index)).max_by_key(|(applied, _)| *applied);
        if let Some((applied, index)) = behind.filter(|(applied, _)| *applied >= log.next_position()) {
            if !options.repair_log {
                return Err(StoreError::LogBehindStore {
                    index: index.def().name.clone(),
                    applied,
                    log_next: log.next_position(),
                }
                .into());
            }
            if records > 0 {
                // Records numbered below the store's positions: which of them were applied is
                // unknowable, so no repair can be sure to keep them.
                return Err(StoreError::Corrupt(format!(
                    "the write-ahead log holds {} records numbered at or below position {applied} that index {:?} \
                     has applied: restore a backup",
                    records,
                    index.def().name
                ))
                .into());
            }
            tracing::warn!(applied, log_next = log.next_position(), "the log restarts after the store's positions");
            log.restart_log_at(applied + 1)?;
        }
        tracing::info!(indexes = open.len(), ms = started.elapsed().as_millis() as u64, "query state loaded");
        let replayed = commit::replay(tail, &by_uid)?;
        for index in open.values() {
            log.register(index.clone());
        }
        let (sender, submissions) = std::sync::mpsc::channel();
        log.set_sender(Some(sender));
        let writer = {
            let log = log.clone();
            std::thread::Builder::new()
                .name("imagelsh-log".into())
                .spawn(move || commit::run_writer(log, submissions))
                .map_err(StoreError::Io)?
        };
        let applier = {
            let log = log.clone();
            std::thread::Builder::new()
                .name("imagelsh-apply".into())
                .spawn(move || apply::run_applier(log))
                .map_err(StoreError::Io)?
        };
        let engine = Self {
            catalog,
            open: Mutex::new(open),
            log,
            writer: Mutex::new(Some(writer)),
            applier: Mutex::new(Some(applier)),
            default_dim,
            full_scan_threshold: options.full_scan_threshold,
        };
        Ok((engine, Recovery { replayed }))
    }

    pub(super) fn open_indexes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Index>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn create(&self, spec: IndexSpec) -> Result<IndexInfo, IndexError> {
        let resolved = self.shape_for(spec.dim, spec.hash_bits, spec.tables, spec.sketch_bits);
        let drawn = DrawnIndex::draw(spec, resolved)?;
        let mut open = self.open_indexes();
        let store = self.catalog.create(&drawn.def, drawn.params())?;
        let (index, _) = Index::open(store, self.log.clone(), self.full_scan_threshold)?;
        self.log.register(index.clone());
        open.insert(drawn.def.name, index.clone());
        index.info()
    }

    /// A new index's shape, each 0 replaced by its default (the dimension by the default
    /// model's).
    pub fn shape_for(&self, dim: u32, hash_bits: u32, tables: u32, sketch_bits: u32) -> IndexShape {
        IndexShape::with_defaults(dim, hash_bits, tables, sketch_bits, self.default_dim)
    }

    /// The open index of that name.
    pub fn index(&self, name: &str) -> Result<Arc<Index>, IndexError> {
        self.open_indexes().get(name).cloned().ok_or_else(|| IndexError::NotFound(name.to_string()))
    }

    pub fn list(&self) -> Result<Vec<IndexInfo>, IndexError> {
        let defs = self.catalog.list()?;
        defs.iter().map(|def| self.index(&def.name)?.info()).collect()
    }

    /// Each open index's size and log lag, from memory (for the metrics, at every scrape).
    pub fn sizes(&self) -> Vec<IndexSize> {
        self.open_indexes()
            .values()
            .map(|index| {
                let state = index.state();
                IndexSize { name: index.def().name.clone(), items: state.count(), unapplied: state.pending() as u64 }
            })
            .collect()
    }

    pub fn drop_index(&self, name: &str) -> Result<(), IndexError> {
        let mut open = self.open_indexes();
        let index = open.get(name).cloned().ok_or_else(|| IndexError::NotFound(name.to_string()))?;
        index.dropped.store(true, Ordering::Release);
        // The catalog's removal durable first: until then a crash brings the index back, and
        // its unapplied batches must still be in the log (an unregistered index no longer holds
        // log segments back).
        index.store.destroy()?;
        crate::failpoint::crash_point("index-destroyed");
        self.log.unregister(index.store.uid());
        crate::failpoint::test_hook("index-log-released");
        open.remove(name);
        Ok(())
    }

    /// Applies every logged batch to the store now (tests, benchmarks, backups).
    pub fn apply_now(&self) -> Result<(), IndexError> {
        while self.log.pending() > 0 {
            apply::apply_pending(&self.log)?;
        }
        Ok(())
    }

    /// Stops as a crash would leave the store: logged batches not yet applied stay in the log
    /// only (tests of recovery within one process, which cannot kill itself).
    #[cfg(test)]
    pub(super) fn abandon(self) {
        self.log.signal().abandon = true;
        drop(self);
    }

    /// Stops taking writes, applies everything logged to the store, syncs it and stops the
    /// threads; later writes fail with `Unavailable`. Also run (errors ignored) on drop.
    pub fn close(&self) -> Result<(), IndexError> {
        self.log.set_sender(None);
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
        self.log.signal().stop = true;
        self.log.work.notify_all();
        self.log.room.notify_all();
        let applier = self.applier.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(applier) = applier {
            let _ = applier.join();
        }
        let result = self.catalog.sync().map_err(IndexError::from);
        let pending = if self.log.signal().abandon { 0 } else { self.log.pending() };
        self.log.clear();
        result?;
        if pending > 0 {
            return Err(IndexError::Unavailable(format!(
                "{pending} logged writes were not applied; the next start takes them from the log"
            )));
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(error) = self.close() {
            tracing::warn!(%error, "closing the engine");
        }
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
            "index name must be 1 to {MAX_NAME_BYTES} characters of A-Z a-z 0-9 _ - . (got {})",
            crate::limits::quote(name)
        )))
    }
}

/// A new index's definition and matrices, drawn from a create request (both engines).
pub(super) struct DrawnIndex {
    pub(super) def: IndexDef,
    pub(super) hyperplanes: Vec<f32>,
    pub(super) center: Option<Vec<f32>>,
    pub(super) sketch_planes: Vec<f32>,
}

impl DrawnIndex {
    /// Validates the name and the shape (`resolved`: the request's with defaults), then draws.
    pub(super) fn draw(spec: IndexSpec, resolved: IndexShape) -> Result<Self, IndexError> {
        validate_name(&spec.name)?;
        // Before anything is drawn: a shape from a request must never size an allocation the
        // process cannot make (the service's configurable limits are below these).
        if resolved.dim > MAX_DIM || resolved.plane_bytes() > MAX_PLANE_BYTES {
            return Err(IndexError::InvalidArgument(format!(
                "an index of dimension {} with these planes would take {} bytes; the limits are dimension \
                 {MAX_DIM} and {MAX_PLANE_BYTES} bytes",
                resolved.dim,
                resolved.plane_bytes()
            )));
        }
        let shape = LshShape { dim: resolved.dim as usize, hash_bits: resolved.hash_bits, tables: resolved.tables };
        let sketch_bits = resolved.sketch_bits;
        let mut planes = Hyperplanes::draw(shape, spec.seed)?;
        let mut sketch = draw_sketch_planes(shape.dim, sketch_bits, spec.seed)?;
        if let Some(center) = &spec.center {
            planes = planes.with_center(center)?;
            sketch = sketch.with_center(center)?;
        }
        let def = IndexDef {
            name: spec.name.clone(),
            dim: shape.dim as u32,
            hash_bits: shape.hash_bits,
            tables: shape.tables,
            seed: spec.seed,
            model: spec.model,
            created_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            sketch_bits,
            stores_vectors: spec.store_vectors.unwrap_or(true),
            thumbnails: spec.thumbnails,
        };
        Ok(Self { def, hyperplanes: planes.to_row_major(), center: spec.center, sketch_planes: sketch.to_row_major() })
    }

    pub(super) fn params(&self) -> IndexParams<'_> {
        IndexParams {
            hyperplanes: &self.hyperplanes,
            center: self.center.as_deref(),
            sketch_planes: Some(&self.sketch_planes),
        }
    }
}

impl IndexShape {
    /// A shape with each 0 replaced by its default (the dimension by `default_dim`).
    pub fn with_defaults(dim: u32, hash_bits: u32, tables: u32, sketch_bits: u32, default_dim: u32) -> Self {
        let or = |value: u32, default: u32| if value == 0 { default } else { value };
        IndexShape {
            dim: or(dim, default_dim),
            hash_bits: or(hash_bits, DEFAULT_HASH_BITS),
            tables: or(tables, DEFAULT_TABLES),
            sketch_bits: or(sketch_bits, DEFAULT_SKETCH_BITS),
        }
    }
}
