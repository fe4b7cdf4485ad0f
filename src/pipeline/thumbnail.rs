//! Thumbnails: a small JPEG of a decoded image, made while it is decoded for the model (the
//! pixels are at hand then; decoding again later would cost more than the thumbnail itself).

use std::io::Cursor;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use image::codecs::jpeg::JpegEncoder;

/// The largest thumbnail kept, bytes.
pub const MAX_THUMBNAIL_BYTES: usize = 4096;
/// The longest side of a thumbnail, pixels (smaller images keep their size).
pub const THUMBNAIL_SIDE: u32 = 96;

/// Sides tried in turn, then qualities at each side, until the JPEG fits: a detailed 96-pixel
/// image needs a lower quality, noise a smaller side.
const SIDES: [u32; 4] = [THUMBNAIL_SIDE, 72, 48, 32];
const QUALITIES: [u8; 4] = [85, 70, 50, 30];

/// A JPEG of at most `MAX_THUMBNAIL_BYTES` with `image` scaled to fit `THUMBNAIL_SIDE`
/// (aspect kept); `None` if even the smallest try does not fit (it always does in practice).
pub fn thumbnail(image: &RgbImage) -> Option<Vec<u8>> {
    for side in SIDES {
        let scaled = fit(image, side)?;
        for quality in QUALITIES {
            let mut out = Cursor::new(Vec::with_capacity(MAX_THUMBNAIL_BYTES));
            JpegEncoder::new_with_quality(&mut out, quality).encode_image(&scaled).ok()?;
            let jpeg = out.into_inner();
            if jpeg.len() <= MAX_THUMBNAIL_BYTES {
                return Some(jpeg);
            }
        }
    }
    None
}

/// `image` scaled down so that its longer side is at most `side`.
fn fit(image: &RgbImage, side: u32) -> Option<RgbImage> {
    let (w, h) = image.dimensions();
    if w.max(h) <= side {
        return Some(image.clone());
    }
    let scale = f64::from(side) / f64::from(w.max(h));
    let (tw, th) = (((f64::from(w) * scale).round() as u32).max(1), ((f64::from(h) * scale).round() as u32).max(1));
    let src = ImageRef::new(w, h, image.as_raw(), PixelType::U8x3).ok()?;
    let mut dst = Image::new(tw, th, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    Resizer::new().resize(&src, &mut dst, &options).ok()?;
    RgbImage::from_raw(tw, th, dst.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decoded(jpeg: &[u8]) -> RgbImage {
        image::load_from_memory(jpeg).unwrap().into_rgb8()
    }

    #[test]
    fn a_photo_becomes_a_small_jpeg_of_the_same_shape() {
        let photo =
            RgbImage::from_fn(640, 480, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) / 5) as u8]));
        let jpeg = thumbnail(&photo).unwrap();
        assert!(jpeg.len() <= MAX_THUMBNAIL_BYTES, "{}", jpeg.len());
        assert_eq!(decoded(&jpeg).dimensions(), (96, 72));
    }

    #[test]
    fn a_small_image_keeps_its_size() {
        let small = RgbImage::from_pixel(28, 28, image::Rgb([200, 10, 10]));
        assert_eq!(decoded(&thumbnail(&small).unwrap()).dimensions(), (28, 28));
    }

    proptest! {
        /// Noise is the worst case for JPEG: it still fits, by a lower quality or a smaller side.
        #[test]
        fn any_image_fits_the_bound(w in 1u32..400, h in 1u32..400, seed in any::<u64>()) {
            let mut state = seed | 1;
            let noise = RgbImage::from_fn(w, h, |_, _| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
            });
            let jpeg = thumbnail(&noise).unwrap();
            prop_assert!(jpeg.len() <= MAX_THUMBNAIL_BYTES);
            let (tw, th) = decoded(&jpeg).dimensions();
            prop_assert!(tw.max(th) <= THUMBNAIL_SIDE);
        }
    }
}
