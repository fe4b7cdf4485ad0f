//! The model card: what the service needs to know to feed an ONNX image model and read its
//! embedding. It sits beside the model (`model.onnx` → `model.json`), so another model can be
//! served without code changes.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::EmbedError;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    /// Recorded in indexes whose vectors this model produces.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Hex SHA-256 of the model file (informational).
    #[serde(default)]
    pub sha256: String,
    /// Name of the image input.
    pub input: String,
    pub layout: Layout,
    pub width: u32,
    pub height: u32,
    /// Resize so that the shorter side has this length, then centre-crop `width × height`.
    pub resize_shorter_side: u32,
    /// Pixel values (0–255) are multiplied by this, then `(x − mean) / std` per channel.
    pub scale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Name of the embedding output, `[batch, dim]`.
    pub embedding_output: String,
    pub dim: u32,
    /// Name of the class-score output, if any (diagnostics only).
    #[serde(default)]
    pub logits_output: Option<String>,
    /// File beside the card with the mean embedding of a calibration set (dim × f32 LE),
    /// the default center of indexes of this model's embeddings.
    #[serde(default)]
    pub center_file: Option<String>,
    /// What the center was computed from.
    #[serde(default)]
    pub center_source: String,
    /// Loaded from `center_file`.
    #[serde(skip)]
    pub center: Option<Vec<f32>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Layout {
    /// `[batch, channel, height, width]`, RGB.
    #[serde(rename = "NCHW")]
    Nchw,
    /// `[batch, height, width, channel]`, RGB.
    #[serde(rename = "NHWC")]
    Nhwc,
}

impl ModelCard {
    /// The card beside a model file: same path with the extension `.json`.
    pub fn path_for(model: &Path) -> PathBuf {
        model.with_extension("json")
    }

    pub fn load(path: &Path) -> Result<Self, EmbedError> {
        let text = std::fs::read_to_string(path).map_err(|e| EmbedError::Card(format!("{}: {e}", path.display())))?;
        let mut card: Self =
            serde_json::from_str(&text).map_err(|e| EmbedError::Card(format!("{}: {e}", path.display())))?;
        card.validate().map_err(|e| EmbedError::Card(format!("{}: {e}", path.display())))?;
        if let Some(file) = &card.center_file {
            let center_path = path.parent().unwrap_or(Path::new(".")).join(file);
            let bytes =
                std::fs::read(&center_path).map_err(|e| EmbedError::Card(format!("{}: {e}", center_path.display())))?;
            let center: Vec<f32> =
                bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            if center.len() != card.dim as usize || center.iter().any(|x| !x.is_finite()) {
                return Err(EmbedError::Card(format!("{}: not {} finite f32 values", center_path.display(), card.dim)));
            }
            card.center = Some(center);
        }
        Ok(card)
    }

    fn validate(&self) -> Result<(), String> {
        if self.width == 0 || self.height == 0 || self.dim == 0 {
            return Err("width, height and dim must be positive".into());
        }
        if self.resize_shorter_side < self.width.max(self.height) {
            return Err("resize_shorter_side must be at least the crop size".into());
        }
        if self.std.contains(&0.0) || !self.scale.is_finite() {
            return Err("std must be non-zero and scale finite".into());
        }
        Ok(())
    }

    /// Values of one preprocessed image.
    pub fn input_len(&self) -> usize {
        3 * self.width as usize * self.height as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_models_card_loads() {
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet_lite0.onnx");
        let card = ModelCard::load(&ModelCard::path_for(&model)).unwrap();
        assert_eq!((card.width, card.height, card.dim, card.layout), (224, 224, 1280, Layout::Nchw));
        assert_eq!(card.input_len(), 3 * 224 * 224);
        let center = card.center.expect("the default model has a calibrated center");
        assert_eq!(center.len(), 1280);
        assert!(center.iter().all(|x| *x >= 0.0) && center.iter().any(|x| *x > 0.0), "a mean of post-ReLU features");
    }

    #[test]
    fn unknown_fields_and_bad_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        std::fs::write(&path, r#"{"name":"m","input":"x","layout":"NCHW","width":0,"height":4,"resize_shorter_side":4,"scale":1,"mean":[0,0,0],"std":[1,1,1],"embedding_output":"e","dim":3}"#).unwrap();
        assert!(matches!(ModelCard::load(&path), Err(EmbedError::Card(_))));
        std::fs::write(&path, r#"{"name":"m","surprise":1}"#).unwrap();
        assert!(matches!(ModelCard::load(&path), Err(EmbedError::Card(_))));
    }
}
