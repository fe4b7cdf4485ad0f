//! What a bulk ingest reads: folders (the label is the first sub-folder's name), CSV and JSONL
//! manifests, and IDX image/label pairs (as Fashion-MNIST ships). Planning lists every item
//! with its id, label, metadata and where its bytes are; reading them happens later, in
//! parallel with sending.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The metadata key that names where an item came from.
pub const SOURCE_KEY: &str = "source";

/// Files a folder source takes, by extension (what the server decodes).
const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {reason}")]
    Format { path: String, reason: String },
    #[error("{0}: not a folder, a .csv or .jsonl manifest, or an IDX image file (*-idx3-ubyte[.gz])")]
    Unknown(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Io { path: path.display().to_string(), source }
}

fn format(path: &Path, reason: impl Into<String>) -> SourceError {
    SourceError::Format { path: path.display().to_string(), reason: reason.into() }
}

/// Where an item's bytes are.
#[derive(Debug, Clone)]
pub enum Payload {
    /// An encoded image file, sent as it is.
    File(PathBuf),
    /// Image `index` of an IDX file, encoded as PNG when read.
    Idx { images: Arc<IdxImages>, index: usize },
}

/// One item to ingest.
#[derive(Debug, Clone)]
pub struct PlannedItem {
    pub id: String,
    pub label: String,
    /// Includes `SOURCE_KEY`.
    pub metadata: HashMap<String, String>,
    pub payload: Payload,
}

impl PlannedItem {
    /// Where the item came from, as the refusal list and the metadata name it.
    pub fn source(&self) -> &str {
        self.metadata.get(SOURCE_KEY).map_or("", String::as_str)
    }

    /// The item's encoded image.
    pub fn read(&self) -> Result<Vec<u8>, String> {
        match &self.payload {
            Payload::File(path) => std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display())),
            Payload::Idx { images, index } => images.png(*index),
        }
    }

    /// The size of the bytes `read` gives, without reading them (IDX: the raw pixels).
    pub fn size_hint(&self) -> u64 {
        match &self.payload {
            Payload::File(path) => std::fs::metadata(path).map_or(0, |m| m.len()),
            Payload::Idx { images, .. } => (images.rows * images.cols) as u64,
        }
    }
}

/// The items of every source, in order. An id seen twice is kept the first time; the later
/// ones are returned as duplicates (refused, with their sources).
pub fn plan_sources(
    sources: &[PathBuf],
    class_names: &[String],
) -> Result<(Vec<PlannedItem>, Vec<PlannedItem>), SourceError> {
    let mut items = Vec::new();
    for source in sources {
        let name = source.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        if source.is_dir() {
            plan_folder(source, &mut items)?;
        } else if name.ends_with(".csv") {
            plan_csv(source, &mut items)?;
        } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
            plan_jsonl(source, &mut items)?;
        } else if name.contains("idx3-ubyte") {
            plan_idx(source, class_names, &mut items)?;
        } else if !source.exists() {
            return Err(io(source)(std::io::Error::from(std::io::ErrorKind::NotFound)));
        } else {
            return Err(SourceError::Unknown(source.display().to_string()));
        }
    }
    let mut seen = HashSet::with_capacity(items.len());
    let (unique, duplicates): (Vec<_>, Vec<_>) = items.into_iter().partition(|item| seen.insert(item.id.clone()));
    Ok((unique, duplicates))
}

fn item(
    id: String,
    label: String,
    source: String,
    mut metadata: HashMap<String, String>,
    payload: Payload,
) -> PlannedItem {
    metadata.insert(SOURCE_KEY.into(), source);
    PlannedItem { id, label, metadata, payload }
}

/// Every image file under `root`, sorted; the id is the path below `root`, the label the first
/// folder below `root` (none for files directly in it).
fn plan_folder(root: &Path, items: &mut Vec<PlannedItem>) -> Result<(), SourceError> {
    for entry in walkdir::WalkDir::new(root).follow_links(true).sort_by_file_name() {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(root).to_path_buf();
            match e.into_io_error() {
                Some(source) => SourceError::Io { path: path.display().to_string(), source },
                None => format(&path, "the folder links back to one of its parents"),
            }
        })?;
        let path = entry.path();
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        if !entry.file_type().is_file() || !is_image {
            continue;
        }
        let Ok(relative) = path.strip_prefix(root) else { continue };
        let parts: Vec<String> = relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
        let label = if parts.len() > 1 { parts[0].clone() } else { String::new() };
        let source = path.display().to_string();
        items.push(item(parts.join("/"), label, source, HashMap::new(), Payload::File(path.to_path_buf())));
    }
    Ok(())
}

/// A manifest row: a path (relative to the manifest's folder), and optionally an id (default:
/// the path), a label and metadata.
#[derive(Debug, serde::Deserialize)]
struct ManifestRow {
    path: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

fn manifest_item(manifest: &Path, row: ManifestRow) -> PlannedItem {
    let base = manifest.parent().unwrap_or(Path::new("."));
    let path = base.join(&row.path);
    let id = row.id.filter(|id| !id.is_empty()).unwrap_or_else(|| row.path.clone());
    item(id, row.label.unwrap_or_default(), path.display().to_string(), row.metadata, Payload::File(path))
}

/// A CSV manifest with a header: `path` (required), `id`, `label`; every other column is
/// metadata.
fn plan_csv(manifest: &Path, items: &mut Vec<PlannedItem>) -> Result<(), SourceError> {
    let mut reader = csv::Reader::from_path(manifest).map_err(|e| format(manifest, e.to_string()))?;
    let headers = reader.headers().map_err(|e| format(manifest, e.to_string()))?.clone();
    let column = |name: &str| headers.iter().position(|h| h.trim() == name);
    let path = column("path").ok_or_else(|| format(manifest, "the header has no `path` column"))?;
    let (id, label) = (column("id"), column("label"));
    for (line, record) in reader.records().enumerate() {
        let record = record.map_err(|e| format(manifest, e.to_string()))?;
        let field = |i: Option<usize>| i.and_then(|i| record.get(i)).map(str::to_string);
        let metadata = headers
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != id && Some(*i) != label && *i != path)
            .filter_map(|(i, h)| record.get(i).filter(|v| !v.is_empty()).map(|v| (h.trim().to_string(), v.to_string())))
            .collect();
        let row = ManifestRow {
            path: field(Some(path))
                .filter(|p| !p.is_empty())
                .ok_or_else(|| format(manifest, format!("row {}: no path", line + 1)))?,
            id: field(id),
            label: field(label),
            metadata,
        };
        items.push(manifest_item(manifest, row));
    }
    Ok(())
}

/// A JSONL manifest: one object per line, `{"path": …, "id": …, "label": …, "metadata": {…}}`.
fn plan_jsonl(manifest: &Path, items: &mut Vec<PlannedItem>) -> Result<(), SourceError> {
    let text = std::fs::read_to_string(manifest).map_err(io(manifest))?;
    for (line, row) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row: ManifestRow =
            serde_json::from_str(row).map_err(|e| format(manifest, format!("line {}: {e}", line + 1)))?;
        items.push(manifest_item(manifest, row));
    }
    Ok(())
}

/// The images of an IDX file (big-endian header: magic 0x803, count, rows, columns; then one
/// byte per pixel).
#[derive(Debug)]
pub struct IdxImages {
    pixels: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

impl IdxImages {
    fn png(&self, index: usize) -> Result<Vec<u8>, String> {
        let size = self.rows * self.cols;
        let pixels = self.pixels.get(16 + index * size..16 + (index + 1) * size).ok_or("no such IDX image")?;
        let image = image::GrayImage::from_raw(self.cols as u32, self.rows as u32, pixels.to_vec())
            .ok_or("IDX image of the wrong size")?;
        let mut png = std::io::Cursor::new(Vec::new());
        image.write_to(&mut png, image::ImageFormat::Png).map_err(|e| e.to_string())?;
        Ok(png.into_inner())
    }
}

/// A file, gunzipped when its name ends in `.gz`.
fn read_maybe_gzipped(path: &Path) -> Result<Vec<u8>, SourceError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    if path.extension().is_none_or(|e| e != "gz") {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes.as_slice()).read_to_end(&mut out).map_err(io(path))?;
    Ok(out)
}

fn be32(bytes: &[u8], at: usize) -> usize {
    bytes.get(at..at + 4).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// IDX images and, where a labels file sits beside them (`…-labels-idx1-ubyte[.gz]`), their
/// classes as labels (named by `class_names` where given). Ids are `<file stem>/<position>`.
fn plan_idx(path: &Path, class_names: &[String], items: &mut Vec<PlannedItem>) -> Result<(), SourceError> {
    let pixels = read_maybe_gzipped(path)?;
    let (count, rows, cols) = (be32(&pixels, 4), be32(&pixels, 8), be32(&pixels, 12));
    if be32(&pixels, 0) != 0x803 || rows == 0 || cols == 0 || rows * cols > 1 << 24 {
        return Err(format(path, "not an IDX image file (magic 0x00000803, rows × columns)"));
    }
    if pixels.len() < 16 + count.saturating_mul(rows * cols) {
        return Err(format(path, format!("holds fewer than the {count} images its header announces")));
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let labels_path = path.with_file_name(name.replace("images-idx3", "labels-idx1"));
    let labels = if labels_path != path && labels_path.exists() {
        let labels = read_maybe_gzipped(&labels_path)?;
        if be32(&labels, 0) != 0x801 || be32(&labels, 4) != count || labels.len() < 8 + count {
            return Err(format(&labels_path, format!("not an IDX label file for {count} images")));
        }
        Some(labels)
    } else {
        None
    };
    let stem = name.split("-images-idx3").next().unwrap_or(&name).split("-idx3").next().unwrap_or(&name).to_string();
    let images = Arc::new(IdxImages { pixels, rows, cols });
    for index in 0..count {
        let label = labels.as_ref().map_or(String::new(), |l| {
            let class = l[8 + index] as usize;
            class_names.get(class).cloned().unwrap_or_else(|| class.to_string())
        });
        let source = format!("{}#{index}", path.display());
        items.push(item(
            format!("{stem}/{index}"),
            label,
            source,
            HashMap::new(),
            Payload::Idx { images: images.clone(), index },
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png() -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        image::GrayImage::new(4, 4).write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_folder_gives_sorted_images_labelled_by_their_first_sub_folder() {
        let dir = tempfile::tempdir().unwrap();
        for path in ["cats/b.png", "cats/a.JPG", "dogs/young/c.webp", "loose.png", "notes.txt", "dogs/d.gif"] {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, png()).unwrap();
        }
        let (items, duplicates) = plan_sources(&[dir.path().to_path_buf()], &[]).unwrap();
        let seen: Vec<(&str, &str)> = items.iter().map(|i| (i.id.as_str(), i.label.as_str())).collect();
        assert_eq!(
            seen,
            [("cats/a.JPG", "cats"), ("cats/b.png", "cats"), ("dogs/young/c.webp", "dogs"), ("loose.png", "")]
        );
        assert!(duplicates.is_empty());
        assert_eq!(items[1].source(), dir.path().join("cats/b.png").display().to_string());
        assert_eq!(items[1].read().unwrap(), png());
        // The same folder twice: every item a duplicate the second time.
        let (again, duplicates) = plan_sources(&[dir.path().into(), dir.path().into()], &[]).unwrap();
        assert_eq!((again.len(), duplicates.len()), (4, 4));
    }

    #[test]
    fn manifests_give_ids_labels_metadata_and_paths_relative_to_themselves() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.png"), png()).unwrap();
        std::fs::write(
            dir.path().join("m.csv"),
            "path,id,label,colour,note\nx.png,first,cat,\"black, white\",\nx.png,,dog,brown,old\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("m.jsonl"),
            "{\"path\":\"x.png\",\"id\":\"j1\",\"label\":\"bird\",\"metadata\":{\"k\":\"v\"}}\n\n{\"path\":\"x.png\"}\n",
        )
        .unwrap();
        let (items, duplicates) = plan_sources(&[dir.path().join("m.csv"), dir.path().join("m.jsonl")], &[]).unwrap();
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["first", "x.png", "j1"]);
        assert_eq!(duplicates.len(), 1, "the last row's id (its path) repeats the second's");
        assert_eq!(items[0].metadata.get("colour").map(String::as_str), Some("black, white"));
        assert!(!items[0].metadata.contains_key("note"), "empty cells are left out");
        assert!(!items[0].metadata.contains_key("path") && !items[0].metadata.contains_key("label"));
        assert_eq!(items[1].metadata.get("note").map(String::as_str), Some("old"));
        assert_eq!((items[2].label.as_str(), items[2].metadata.get("k").map(String::as_str)), ("bird", Some("v")));
        assert_eq!(items[2].read().unwrap(), png());
        std::fs::write(dir.path().join("bad.csv"), "id,label\na,b\n").unwrap();
        assert!(matches!(plan_sources(&[dir.path().join("bad.csv")], &[]), Err(SourceError::Format { .. })));
        std::fs::write(dir.path().join("bad.jsonl"), "{\"id\": 3}\n").unwrap();
        assert!(matches!(plan_sources(&[dir.path().join("bad.jsonl")], &[]), Err(SourceError::Format { .. })));
    }

    #[test]
    fn idx_files_give_pngs_labelled_by_class() {
        let dir = tempfile::tempdir().unwrap();
        let mut images = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 2];
        images.extend((0..12u8).map(|p| p * 20));
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), &images).unwrap();
        std::fs::write(dir.path().join("train-labels-idx1-ubyte"), [0, 0, 8, 1, 0, 0, 0, 3, 2, 0, 1]).unwrap();
        let names = vec!["zero".to_string(), "one".to_string()];
        let (items, _) = plan_sources(&[dir.path().join("train-images-idx3-ubyte")], &names).unwrap();
        let seen: Vec<(&str, &str)> = items.iter().map(|i| (i.id.as_str(), i.label.as_str())).collect();
        assert_eq!(seen, [("train/0", "2"), ("train/1", "zero"), ("train/2", "one")]);
        let decoded = image::load_from_memory(&items[2].read().unwrap()).unwrap().to_luma8();
        assert_eq!(decoded.into_raw(), [160, 180, 200, 220]);
        // A header that announces more images than the file holds is refused, not read past.
        images[7] = 200;
        std::fs::write(dir.path().join("short-images-idx3-ubyte"), &images).unwrap();
        assert!(plan_sources(&[dir.path().join("short-images-idx3-ubyte")], &[]).is_err());
    }

    #[test]
    fn unknown_and_missing_sources_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "x").unwrap();
        assert!(matches!(plan_sources(&[dir.path().join("a.txt")], &[]), Err(SourceError::Unknown(_))));
        assert!(matches!(plan_sources(&[dir.path().join("none")], &[]), Err(SourceError::Io { .. })));
    }
}
