//! Arbitrary bytes as an uploaded image: decoded within small limits, or refused.
#![no_main]

use imagelsh::pipeline::{DecodeLimits, decode_rgb};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits { max_side: 512, max_pixels: 512 * 512, max_alloc: 64 << 20, ..DecodeLimits::default() };
    if let Ok(rgb) = decode_rgb(data, &limits) {
        assert!(rgb.width() <= 512 && rgb.height() <= 512);
    }
});
