//! Whether an encoded image is whole: each accepted format says where it ends, and a decoder
//! that pads what is missing (zune-jpeg fills absent rows with the last ones) would otherwise
//! turn a cut upload into a different image. Only the container is walked; no pixel is decoded.

use image::ImageFormat;

use super::DecodeError;

pub(crate) fn check(bytes: &[u8], format: ImageFormat) -> Result<(), DecodeError> {
    match format {
        ImageFormat::Jpeg => jpeg(bytes),
        ImageFormat::Png => png(bytes),
        ImageFormat::WebP => webp(bytes),
        _ => Ok(()),
    }
}

/// A JPEG ends with EOI (FF D9) after its last start of scan (FF DA). Neither marker can occur
/// inside entropy-coded data (an FF there is always followed by 00 or a restart marker), so
/// the last SOS is the last scan's, and a cut anywhere in it loses the EOI.
fn jpeg(bytes: &[u8]) -> Result<(), DecodeError> {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let Some(scan) = last_scan else {
        return Err(DecodeError::Truncated("the JPEG has no scan (start-of-scan marker)"));
    };
    if !bytes[scan..].windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err(DecodeError::Truncated("the JPEG's end-of-image marker is missing"));
    }
    Ok(())
}

/// A PNG is a chain of chunks (length, type, data, CRC) ending with IEND: walk it, and a
/// chunk that runs past the end (a short IDAT) or a missing IEND means the file was cut.
fn png(bytes: &[u8]) -> Result<(), DecodeError> {
    const SIGNATURE: usize = 8;
    let mut at = SIGNATURE;
    loop {
        let Some(header) = bytes.get(at..at + 8) else {
            return Err(DecodeError::Truncated("the PNG ends before its IEND chunk"));
        };
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = &header[4..8];
        let end = at.checked_add(12).and_then(|n| n.checked_add(length));
        match end {
            Some(end) if end <= bytes.len() => {
                if kind == b"IEND" {
                    return Ok(());
                }
                at = end;
            }
            _ if kind == b"IDAT" => return Err(DecodeError::Truncated("the PNG's image data (IDAT) is cut short")),
            _ => return Err(DecodeError::Truncated("a PNG chunk runs past the end of the file")),
        }
    }
}

/// A WebP is a RIFF container: its header gives the size of what follows, and each chunk its
/// own (padded to even).
fn webp(bytes: &[u8]) -> Result<(), DecodeError> {
    let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let Some(riff) = u32_at(4) else {
        return Err(DecodeError::Truncated("the WebP header is cut"));
    };
    let end = riff.saturating_add(8);
    if end > bytes.len() {
        return Err(DecodeError::Truncated("the WebP is shorter than its RIFF header says"));
    }
    let mut at = 12;
    while at < end {
        let Some(size) = u32_at(at + 4) else {
            return Err(DecodeError::Truncated("a WebP chunk header is cut"));
        };
        let next = at.saturating_add(8).saturating_add(size).saturating_add(size & 1);
        if next > end {
            return Err(DecodeError::Truncated("a WebP chunk runs past the end of the file"));
        }
        at = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, RgbImage};
    use proptest::prelude::*;
    use std::io::Cursor;

    fn encoded(format: ImageFormat) -> Vec<u8> {
        let image =
            DynamicImage::ImageRgb8(RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 77])));
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn whole_images_pass_and_every_cut_is_caught() {
        for format in [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP] {
            let bytes = encoded(format);
            check(&bytes, format).unwrap();
            // Trailing bytes after the end are tolerated (cameras append them).
            let mut padded = bytes.clone();
            padded.extend_from_slice(&[0; 16]);
            check(&padded, format).unwrap();
            for cut in 1..bytes.len() {
                assert!(check(&bytes[..cut], format).is_err(), "{format:?} cut at {cut} of {} passed", bytes.len());
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_give_an_answer_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for format in [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP] {
                let _ = check(&bytes, format);
            }
        }
    }
}
