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

/// A JPEG is a chain of marker segments up to EOI (FF D9): walk it from SOI, segments by
/// their lengths and each scan's entropy-coded data up to the next marker (inside it an FF is
/// followed by 00, a restart marker or fill), and stop at the first EOI. What follows it
/// (a phone's appended video, a vendor trailer) is not looked at. Running out of bytes
/// anywhere before the EOI means the file was cut.
fn jpeg(bytes: &[u8]) -> Result<(), DecodeError> {
    let cut = || DecodeError::Truncated("the JPEG ends before its end-of-image marker");
    let mut at = 2; // past SOI: the format was recognised by it
    loop {
        // The next marker; stray bytes between segments are skipped, as libjpeg does.
        at += bytes.get(at..).and_then(|rest| rest.iter().position(|&b| b == 0xFF)).ok_or_else(cut)?;
        while bytes.get(at) == Some(&0xFF) {
            at += 1;
        }
        let marker = *bytes.get(at).ok_or_else(cut)?;
        at += 1;
        match marker {
            0xD9 => return Ok(()),
            // Standalone markers: no length.
            0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        let length = bytes.get(at..at + 2).ok_or_else(cut)?;
        let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
        if length < 2 {
            return Err(DecodeError::Corrupt(format!("a JPEG segment (marker {marker:#04x}) has length {length}")));
        }
        at += length;
        if at > bytes.len() {
            return Err(cut());
        }
        if marker == 0xDA {
            // Entropy-coded data: up to an FF that starts a real marker.
            loop {
                at += bytes.get(at..).and_then(|rest| rest.iter().position(|&b| b == 0xFF)).ok_or_else(cut)?;
                match bytes.get(at + 1) {
                    None => return Err(cut()),
                    Some(0x00 | 0xD0..=0xD7) => at += 2,
                    Some(0xFF) => at += 1,
                    Some(_) => break,
                }
            }
        }
    }
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
/// own, padded to even. libwebp accepts a last chunk of odd size without its pad byte (and a
/// RIFF size that counts that missing byte); so does this.
fn webp(bytes: &[u8]) -> Result<(), DecodeError> {
    let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let Some(riff) = u32_at(4) else {
        return Err(DecodeError::Truncated("the WebP header is cut"));
    };
    let end = riff.saturating_add(8);
    if end > bytes.len().saturating_add(1) {
        return Err(DecodeError::Truncated("the WebP is shorter than its RIFF header says"));
    }
    let end = end.min(bytes.len());
    let mut at = 12;
    while at < end {
        let Some(size) = u32_at(at + 4) else {
            return Err(DecodeError::Truncated("a WebP chunk header is cut"));
        };
        let data_end = at.saturating_add(8).saturating_add(size);
        if data_end > end {
            return Err(DecodeError::Truncated("a WebP chunk runs past the end of the file"));
        }
        // The pad byte of an odd-sized chunk; only the last may go without it.
        at = data_end + (size & 1);
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
            // Trailing bytes after the end are tolerated (cameras and phones append them,
            // markers included).
            let mut padded = bytes.clone();
            padded.extend_from_slice(b"\0\0\xff\xda\x00\x10junk\xff\xd8");
            check(&padded, format).unwrap();
            // (A WebP whose last chunk is odd-sized may lose its pad byte: the data is whole.)
            let whole_without_pad = usize::from(format == ImageFormat::WebP);
            for cut in 1..bytes.len() - whole_without_pad {
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
