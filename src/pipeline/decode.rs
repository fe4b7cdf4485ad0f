//! Encoded image bytes → the model's input tensor: decode (JPEG, PNG, WebP) within limits,
//! apply EXIF orientation, convert to RGB, resize the shorter side and centre-crop (one
//! resampling of just the crop box), scale and normalise.

use std::io::Cursor;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::embed::{Layout, ModelCard};

/// Bounds on what one image may cost.
#[derive(Debug, Clone)]
pub struct DecodeLimits {
    pub max_encoded_bytes: usize,
    /// Largest width and height accepted; checked from the header, before any allocation.
    pub max_side: u32,
    /// Largest width × height accepted; checked from the header, before any allocation.
    pub max_pixels: u64,
    /// Largest decoding allocation, bytes.
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_encoded_bytes: 32 << 20, max_side: 12_000, max_pixels: 50_000_000, max_alloc: 512 << 20 }
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("image is empty")]
    Empty,
    #[error("image is {bytes} bytes, the limit is {limit}")]
    TooManyBytes { bytes: usize, limit: usize },
    #[error("image format not recognised or not accepted (JPEG, PNG and WebP are)")]
    UnsupportedFormat,
    #[error("image exceeds the limits (at most {max_side}×{max_side} pixels): {detail}")]
    TooLarge { max_side: u32, detail: String },
    #[error("image has {pixels} pixels, the limit is {limit} (--max-image-pixels)")]
    TooManyPixels { pixels: u64, limit: u64 },
    #[error("image is truncated: {0}")]
    Truncated(&'static str),
    #[error("image cannot be decoded: {0}")]
    Corrupt(String),
    #[error("image cannot be resized: {0}")]
    Resize(String),
}

/// Preprocessing as a model card describes it.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    card: ModelCard,
    limits: DecodeLimits,
}

impl Preprocessor {
    pub fn new(card: ModelCard, limits: DecodeLimits) -> Self {
        Self { card, limits }
    }

    pub fn input_len(&self) -> usize {
        self.card.input_len()
    }

    /// The model input of one encoded image.
    pub fn preprocess(&self, bytes: &[u8]) -> Result<Vec<f32>, DecodeError> {
        Ok(self.preprocess_with_thumbnail(bytes, false)?.0)
    }

    /// The model input of one encoded image, and its thumbnail when `thumbnail` is asked for.
    pub fn preprocess_with_thumbnail(
        &self,
        bytes: &[u8],
        thumbnail: bool,
    ) -> Result<(Vec<f32>, Option<Vec<u8>>), DecodeError> {
        let rgb = decode_rgb(bytes, &self.limits)?;
        let pixels = self.resize_crop(&rgb)?;
        let thumbnail = thumbnail.then(|| super::thumbnail::thumbnail(&rgb)).flatten();
        Ok((self.to_tensor(&pixels), thumbnail))
    }

    /// `width × height` RGB8 pixels: the centre crop of the image scaled so that its shorter side
    /// is `resize_shorter_side`. Resampling only the crop box gives the same pixels as resizing
    /// the whole image and cropping, at a fraction of the cost.
    pub fn resize_crop(&self, rgb: &RgbImage) -> Result<Vec<u8>, DecodeError> {
        let (w, h) = rgb.dimensions();
        let scale = f64::from(self.card.resize_shorter_side) / f64::from(w.min(h));
        let crop_w = f64::from(self.card.width) / scale;
        let crop_h = f64::from(self.card.height) / scale;
        let left = (f64::from(w) - crop_w) / 2.0;
        let top = (f64::from(h) - crop_h) / 2.0;
        let src = ImageRef::new(w, h, rgb.as_raw(), PixelType::U8x3).map_err(|e| DecodeError::Resize(e.to_string()))?;
        let mut dst = Image::new(self.card.width, self.card.height, PixelType::U8x3);
        let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)).crop(
            left.max(0.0),
            top.max(0.0),
            crop_w.min(f64::from(w)),
            crop_h.min(f64::from(h)),
        );
        Resizer::new().resize(&src, &mut dst, &options).map_err(|e| DecodeError::Resize(e.to_string()))?;
        Ok(dst.into_vec())
    }

    fn to_tensor(&self, pixels: &[u8]) -> Vec<f32> {
        let c = &self.card;
        let plane = c.width as usize * c.height as usize;
        let mut out = vec![0f32; 3 * plane];
        let norm = |x: u8, ch: usize| (f32::from(x) * c.scale - c.mean[ch]) / c.std[ch];
        for (i, px) in pixels.chunks_exact(3).enumerate() {
            for (ch, &value) in px.iter().enumerate() {
                let at = match c.layout {
                    Layout::Nchw => ch * plane + i,
                    Layout::Nhwc => i * 3 + ch,
                };
                out[at] = norm(value, ch);
            }
        }
        out
    }
}

/// Decodes to RGB8 with the orientation its EXIF data asks for. Grey, grey+alpha, RGBA, CMYK
/// and 16-bit images all become 8-bit RGB (alpha is dropped).
pub fn decode_rgb(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if bytes.len() > limits.max_encoded_bytes {
        return Err(DecodeError::TooManyBytes { bytes: bytes.len(), limit: limits.max_encoded_bytes });
    }
    let mut reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let Some(format @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP)) = reader.format() else {
        return Err(DecodeError::UnsupportedFormat);
    };
    // Decoders pad what is missing (zune-jpeg fills the absent rows): a cut upload would be
    // indexed as a different image. Each format says where it ends; check that it does.
    super::complete::check(bytes, format)?;
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(limits.max_side);
    image_limits.max_image_height = Some(limits.max_side);
    image_limits.max_alloc = Some(limits.max_alloc);
    reader.limits(image_limits);
    let mut decoder = reader.into_decoder().map_err(|e| classify(e, limits))?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(DecodeError::TooManyPixels { pixels, limit: limits.max_pixels });
    }
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| classify(e, limits))?;
    image.apply_orientation(orientation);
    if image.width() == 0 || image.height() == 0 {
        return Err(DecodeError::Corrupt("image has no pixels".into()));
    }
    Ok(image.into_rgb8())
}

fn classify(e: image::ImageError, limits: &DecodeLimits) -> DecodeError {
    match e {
        image::ImageError::Limits(l) => DecodeError::TooLarge { max_side: limits.max_side, detail: l.to_string() },
        image::ImageError::Unsupported(u) => DecodeError::Corrupt(u.to_string()),
        other => DecodeError::Corrupt(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, ImageEncoder, Luma, LumaA, Rgba};

    fn card() -> ModelCard {
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet_lite0.onnx");
        ModelCard::load(&ModelCard::path_for(&model)).unwrap()
    }

    fn png(image: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// A PNG whose header declares `w × h` pixels (valid CRCs) and holds no pixel data.
    fn png_header_only(w: u32, h: u32) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8], data: &[u8]| {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let mut body = kind.to_vec();
            body.extend_from_slice(data);
            out.extend_from_slice(&body);
            out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        };
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(b"IHDR", &ihdr);
        chunk(b"IEND", &[]);
        out
    }

    #[test]
    fn every_pixel_kind_becomes_rgb_of_the_models_size() {
        let p = Preprocessor::new(card(), DecodeLimits::default());
        let images = [
            DynamicImage::ImageLuma8(ImageBuffer::from_pixel(30, 20, Luma([200]))),
            DynamicImage::ImageLumaA8(ImageBuffer::from_pixel(30, 20, LumaA([200, 10]))),
            DynamicImage::ImageRgba8(ImageBuffer::from_pixel(30, 20, Rgba([1, 2, 3, 4]))),
            DynamicImage::ImageLuma16(ImageBuffer::from_pixel(30, 20, Luma([51400]))),
            DynamicImage::ImageRgb16(ImageBuffer::from_pixel(20, 30, image::Rgb([65535, 0, 32768]))),
        ];
        for image in images {
            let tensor = p.preprocess(&png(&image)).unwrap();
            assert_eq!(tensor.len(), 3 * 224 * 224);
            assert!(tensor.iter().all(|x| (0.0..=1.0).contains(x)));
        }
        // Grey 200 → three equal channels of 200/255.
        let grey = p.preprocess(&png(&DynamicImage::ImageLuma8(ImageBuffer::from_pixel(30, 20, Luma([200]))))).unwrap();
        let plane = 224 * 224;
        assert!((grey[0] - 200.0 / 255.0).abs() < 1e-6 && grey[0] == grey[plane] && grey[0] == grey[2 * plane]);
    }

    #[test]
    fn crop_is_central_and_keeps_the_aspect_ratio() {
        // Left third red, middle third green, right third blue, 600×200: the centre crop of
        // the shorter-side-256 image is all green.
        let image = RgbImage::from_fn(600, 200, |x, _| match x {
            0..200 => image::Rgb([255, 0, 0]),
            200..400 => image::Rgb([0, 255, 0]),
            _ => image::Rgb([0, 0, 255]),
        });
        let p = Preprocessor::new(card(), DecodeLimits::default());
        let pixels = p.resize_crop(&image).unwrap();
        assert!(pixels.chunks_exact(3).all(|px| px[1] > 250 && px[0] < 5 && px[2] < 5));
    }

    #[test]
    fn declared_giant_is_refused_before_allocation() {
        let limits = DecodeLimits::default();
        let start = std::time::Instant::now();
        let err = decode_rgb(&png_header_only(100_000, 100_000), &limits).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { .. }), "{err:?}");
        assert!(start.elapsed() < std::time::Duration::from_millis(100));
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        let limits = DecodeLimits { max_encoded_bytes: 1000, ..Default::default() };
        assert_eq!(decode_rgb(&[], &limits).unwrap_err(), DecodeError::Empty);
        assert!(matches!(decode_rgb(&[0u8; 2000], &limits).unwrap_err(), DecodeError::TooManyBytes { .. }));
        assert_eq!(decode_rgb(b"definitely not an image", &limits).unwrap_err(), DecodeError::UnsupportedFormat);
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        assert_eq!(decode_rgb(gif, &limits).unwrap_err(), DecodeError::UnsupportedFormat);
        let mut truncated = png(&DynamicImage::ImageRgb8(RgbImage::from_pixel(40, 40, image::Rgb([9, 9, 9]))));
        truncated.truncate(truncated.len() / 2);
        assert!(matches!(decode_rgb(&truncated, &limits).unwrap_err(), DecodeError::Truncated(_)));
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 40×20 JPEG whose EXIF says "rotate 90° clockwise": it must come out 20×40.
        let image = RgbImage::from_pixel(40, 20, image::Rgb([128, 64, 32]));
        let mut jpeg = Vec::new();
        let mut encoder = image::codecs::jpeg::JpegEncoder::new(&mut jpeg);
        // Minimal big-endian TIFF: one IFD entry, Orientation (0x0112) = 6.
        let exif = [
            b"MM\x00\x2a\x00\x00\x00\x08".as_slice(),
            &[0, 1],
            &[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0],
            &[0, 0, 0, 0],
        ]
        .concat();
        encoder.set_exif_metadata(exif).unwrap();
        encoder.write_image(image.as_raw(), 40, 20, image::ExtendedColorType::Rgb8).unwrap();
        let decoded = decode_rgb(&jpeg, &DecodeLimits::default()).unwrap();
        assert_eq!(decoded.dimensions(), (20, 40));
    }

    fn encoded(format: ImageFormat) -> Vec<u8> {
        let image =
            DynamicImage::ImageRgb8(RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 13, 5])));
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    proptest::proptest! {
        /// Arbitrary bytes, and valid images with bytes flipped, cut or spliced, decode to an
        /// image or an error: never a panic, never more than the limits allow.
        #[test]
        fn damaged_and_arbitrary_images_are_errors_not_panics(
            format in proptest::sample::select(vec![ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP]),
            flips in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 0..6),
            keep in proptest::prelude::any::<proptest::sample::Index>(),
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let limits = DecodeLimits { max_side: 64, max_pixels: 64 * 64, ..DecodeLimits::default() };
            let _ = decode_rgb(&noise, &limits);
            let mut bytes = encoded(format);
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= value;
            }
            bytes.truncate(keep.index(bytes.len()) + 1);
            if let Ok(rgb) = decode_rgb(&bytes, &limits) {
                proptest::prop_assert!(rgb.width() <= 64 && rgb.height() <= 64);
            }
        }
    }
}
