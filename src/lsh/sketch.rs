//! Binary sketches: `bits` sign bits of an item's (centred) projections on hyperplanes of their
//! own, packed into `bits / 64` words. The Hamming distance of two sketches estimates the angle
//! between the vectors (P[bit differs] = θ/π), so a query ranks thousands of LSH candidates by a
//! few popcounts each and re-ranks only the best few hundred exactly.
//!
//! A sketch family is a [`Hyperplanes`] of 64-bit "tables": table `w`'s code is word `w`.

use super::{Hyperplanes, LshError, LshShape};

/// Bits per sketch word.
pub const WORD_BITS: u32 = 64;
/// Largest sketch: beyond this the estimate improves less than the popcounts cost.
pub const MAX_SKETCH_BITS: u32 = 4096;

/// The shape of a sketch family of `bits` bits over vectors of `dim` values.
pub fn sketch_shape(dim: usize, bits: u32) -> Result<LshShape, LshError> {
    if bits == 0 || !bits.is_multiple_of(WORD_BITS) || bits > MAX_SKETCH_BITS {
        return Err(LshError::SketchBits(bits));
    }
    Ok(LshShape { dim, hash_bits: WORD_BITS, tables: bits / WORD_BITS })
}

/// Draws the hyperplanes of a sketch family. Its seed is derived from the index's so that the
/// sketch bits are independent of the table bits.
pub fn draw_sketch_planes(dim: usize, bits: u32, index_seed: u64) -> Result<Hyperplanes, LshError> {
    Hyperplanes::draw(sketch_shape(dim, bits)?, index_seed ^ 0x9e37_79b9_7f4a_7c15)
}

/// Bits that differ between two sketches of the same family.
pub fn hamming(a: &[u64], b: &[u64]) -> u32 {
    // The x86-64 baseline has no POPCNT instruction, and count_ones then costs ~15 instructions
    // a word; a query ranks tens of thousands of sketches, so use POPCNT where the CPU has it.
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("popcnt") {
        // SAFETY: the CPU supports POPCNT, checked just above.
        return unsafe { hamming_popcnt(a, b) };
    }
    hamming_portable(a, b)
}

#[inline(always)]
fn hamming_portable(a: &[u64], b: &[u64]) -> u32 {
    a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
fn hamming_popcnt(a: &[u64], b: &[u64]) -> u32 {
    hamming_portable(a, b)
}

/// The cosine that a Hamming distance of `distance` out of `bits` estimates: cos(π·d/bits).
pub fn estimated_cosine(distance: u32, bits: u32) -> f32 {
    (std::f64::consts::PI * f64::from(distance) / f64::from(bits)).cos() as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    #[test]
    fn shape_must_be_whole_words() {
        assert!(sketch_shape(8, 0).is_err());
        assert!(sketch_shape(8, 100).is_err());
        assert!(sketch_shape(8, 8192).is_err());
        assert_eq!(sketch_shape(8, 512).unwrap().tables, 8);
    }

    #[test]
    fn hamming_counts_differing_bits() {
        assert_eq!(hamming(&[0b1011, 0], &[0b0001, u64::MAX]), 2 + 64);
        assert_eq!(hamming(&[7, 7], &[7, 7]), 0);
        let a: Vec<u64> = (0..8).map(|i| 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 1)).collect();
        let b: Vec<u64> = a.iter().map(|w| w.rotate_left(7)).collect();
        assert_eq!(hamming(&a, &b), hamming_portable(&a, &b));
    }

    #[test]
    fn estimated_cosine_ends() {
        assert!((estimated_cosine(0, 512) - 1.0).abs() < 1e-6);
        assert!(estimated_cosine(256, 512).abs() < 1e-6);
        assert!((estimated_cosine(512, 512) + 1.0).abs() < 1e-6);
    }

    /// The estimate tracks the true cosine: with 1024 bits its standard error is ~0.05 rad.
    #[test]
    fn hamming_estimates_the_angle() {
        let dim = 64;
        let planes = draw_sketch_planes(dim, 1024, 3).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut sample = || -> Vec<f32> { (0..dim).map(|_| StandardNormal.sample(&mut rng)).collect() };
        for mix in [0.0f32, 0.3, 0.6, 0.9] {
            let a = sample();
            let noise = sample();
            let b: Vec<f32> = a.iter().zip(&noise).map(|(x, n)| mix * x + (1.0 - mix) * n).collect();
            let batch = Array2::from_shape_vec((2, dim), [a.clone(), b.clone()].concat()).unwrap();
            let words = planes.codes(batch.view()).unwrap();
            let d = hamming(words.row(0).as_slice().unwrap(), words.row(1).as_slice().unwrap());
            let estimate = estimated_cosine(d, 1024);
            let exact = super::super::cosine(&a, &b);
            assert!((estimate - exact).abs() < 0.15, "mix {mix}: estimate {estimate} exact {exact}");
        }
    }
}
