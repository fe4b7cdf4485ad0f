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

/// Draws the hyperplanes of a sketch family, orthonormal in blocks of `dim`. Its seed is derived
/// from the index's so that the sketch bits are independent of the table bits.
pub fn draw_sketch_planes(dim: usize, bits: u32, index_seed: u64) -> Result<Hyperplanes, LshError> {
    Hyperplanes::draw_orthogonal(sketch_shape(dim, bits)?, index_seed ^ 0x9e37_79b9_7f4a_7c15)
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

/// The `keep` live sketches nearest to `query` by Hamming distance, as `(item number,
/// distance)` in item order: the full-scan plan's kernel. `sketches` holds consecutive runs of
/// `query.len()` words, item `n` the `n`-th; `live` is a bit set (item `n` is bit `n % 64` of
/// word `n / 64`); `skip` is left out. Ties go to the lower item numbers.
///
/// One pass, no distance array: a bounded max-heap whose worst distance rejects almost every
/// sketch after the first few thousand with one predictable comparison, so the scan runs at
/// the speed of reading the sketches.
pub fn nearest_sketches(
    query: &[u64],
    sketches: &[u64],
    live: &[u64],
    skip: Option<u32>,
    keep: usize,
) -> Vec<(u32, u32)> {
    let words = query.len();
    let mut nearest = Nearest::new(live, skip, keep);
    if words == 0 || keep == 0 {
        return Vec::new();
    }
    #[cfg(target_arch = "x86_64")]
    {
        // One 512-bit XOR and VPOPCNTQ per 8 words: a 512-bit sketch in three instructions.
        if words.is_multiple_of(8)
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vpopcntdq")
        {
            // SAFETY: the CPU supports both features, checked just above.
            unsafe { scan_avx512(query, sketches, &mut nearest) };
            return nearest.into_item_order();
        }
        if std::is_x86_feature_detected!("popcnt") {
            // SAFETY: the CPU supports POPCNT, checked just above.
            unsafe { scan_popcnt(query, sketches, &mut nearest) };
            return nearest.into_item_order();
        }
    }
    scan_portable(query, sketches, &mut nearest);
    nearest.into_item_order()
}

/// The nearest sketches seen so far.
struct Nearest<'a> {
    live: &'a [u64],
    skip: Option<u32>,
    keep: usize,
    /// Max-heap on (distance, item): the top is the first to go.
    heap: std::collections::BinaryHeap<(u32, u32)>,
    /// A sketch must be nearer than this to enter: the top's distance once the heap is full.
    bound: u32,
}

impl<'a> Nearest<'a> {
    fn new(live: &'a [u64], skip: Option<u32>, keep: usize) -> Self {
        Self { live, skip, keep, heap: std::collections::BinaryHeap::with_capacity(keep + 1), bound: u32::MAX }
    }

    #[inline(always)]
    fn is_live(&self, item: usize) -> bool {
        self.live.get(item / 64).is_some_and(|w| w >> (item % 64) & 1 == 1)
    }

    #[inline(always)]
    fn offer(&mut self, item: usize, distance: u32) {
        if distance >= self.bound || !self.is_live(item) || self.skip == Some(item as u32) {
            return;
        }
        // Items come in ascending order: an equal distance never displaces an earlier item.
        self.heap.push((distance, item as u32));
        if self.heap.len() > self.keep {
            self.heap.pop();
        }
        if self.heap.len() == self.keep {
            self.bound = self.heap.peek().map_or(u32::MAX, |top| top.0);
        }
    }

    fn into_item_order(self) -> Vec<(u32, u32)> {
        let mut kept: Vec<(u32, u32)> = self.heap.into_iter().map(|(distance, item)| (item, distance)).collect();
        kept.sort_unstable();
        kept
    }
}

#[inline(always)]
fn scan_portable(query: &[u64], sketches: &[u64], nearest: &mut Nearest<'_>) {
    for (item, sketch) in sketches.chunks_exact(query.len()).enumerate() {
        nearest.offer(item, hamming_portable(query, sketch));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
fn scan_popcnt(query: &[u64], sketches: &[u64], nearest: &mut Nearest<'_>) {
    scan_portable(query, sketches, nearest);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vpopcntdq")]
fn scan_avx512(query: &[u64], sketches: &[u64], nearest: &mut Nearest<'_>) {
    use std::arch::x86_64::*;
    let words = query.len();
    // SAFETY (all loads and stores): each pointer is to 8 in-bounds words of a slice (`words` is
    // a multiple of 8, `chunks_exact` yields whole sketches, `sums` has 8); unaligned accesses
    // need no alignment.
    let query_lanes: Vec<__m512i> =
        query.chunks_exact(8).map(|q| unsafe { _mm512_loadu_si512(q.as_ptr().cast()) }).collect();
    // Per-lane bit counts of one sketch's difference with the query; 512-bit sketches (the
    // default) in one load, without the loop.
    let single = (words == 8).then(|| query_lanes[0]);
    let counts = |sketch: &[u64]| {
        if let Some(lane) = single {
            return _mm512_popcnt_epi64(_mm512_xor_si512(lane, unsafe { _mm512_loadu_si512(sketch.as_ptr().cast()) }));
        }
        let mut counts = _mm512_setzero_si512();
        for (lane, s) in query_lanes.iter().zip(sketch.chunks_exact(8)) {
            let x = _mm512_xor_si512(*lane, unsafe { _mm512_loadu_si512(s.as_ptr().cast()) });
            counts = _mm512_add_epi64(counts, _mm512_popcnt_epi64(x));
        }
        counts
    };
    // Eight sketches at a time: summing each one's 8 lanes apart costs ~7 shuffles and adds;
    // summing eight together (pairs within 128-bit lanes, then across lanes twice) ~3 each,
    // and one comparison with the bound then rejects all eight.
    let octets = sketches.chunks_exact(8 * words);
    let rest = octets.remainder();
    let mut sums = [0u64; 8];
    for (octet, block) in octets.enumerate() {
        let c: [__m512i; 8] = std::array::from_fn(|i| counts(&block[i * words..(i + 1) * words]));
        let pair = |a, b| _mm512_add_epi64(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
        let halves = |x, y| _mm512_add_epi64(_mm512_shuffle_i64x2::<0x88>(x, y), _mm512_shuffle_i64x2::<0xDD>(x, y));
        let (ab, cd, ef, gh) = (pair(c[0], c[1]), pair(c[2], c[3]), pair(c[4], c[5]), pair(c[6], c[7]));
        // Lane i of `total` is sketch i's distance.
        let total = halves(halves(ab, cd), halves(ef, gh));
        let nearer = _mm512_cmplt_epu64_mask(total, _mm512_set1_epi64(i64::from(nearest.bound)));
        if nearer != 0 {
            unsafe { _mm512_storeu_si512(sums.as_mut_ptr().cast(), total) };
            for (i, &sum) in sums.iter().enumerate().filter(|&(i, _)| nearer >> i & 1 == 1) {
                nearest.offer(octet * 8 + i, sum as u32);
            }
        }
    }
    let first = (sketches.len() - rest.len()) / words;
    for (item, sketch) in rest.chunks_exact(words).enumerate() {
        nearest.offer(first + item, _mm512_reduce_add_epi64(counts(sketch)) as u32);
    }
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

    proptest::proptest! {
        #[test]
        fn nearest_sketches_are_the_smallest_live_distances(
            words in 1usize..20,
            items in proptest::collection::vec(proptest::prelude::any::<bool>(), 0..300),
            keep in 0usize..100,
            skip in 0u32..300,
            seed in proptest::prelude::any::<u64>(),
        ) {
            // Few distinct bits, so that many distances tie.
            let word = |i: u64| (seed ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15) & 0x0101_0101_0101_0101;
            let query: Vec<u64> = (0..words as u64).map(word).collect();
            let sketches: Vec<u64> = (0..(items.len() * words) as u64).map(|i| word(i + 1000)).collect();
            let mut live = vec![0u64; items.len().div_ceil(64)];
            items.iter().enumerate().filter(|(_, l)| **l).for_each(|(n, _)| live[n / 64] |= 1 << (n % 64));
            let kept = nearest_sketches(&query, &sketches, &live, Some(skip), keep);
            let mut reference: Vec<(u32, u32)> = sketches
                .chunks_exact(words)
                .enumerate()
                .filter(|&(n, _)| items[n] && n as u32 != skip)
                .map(|(n, s)| (hamming_portable(&query, s), n as u32))
                .collect();
            reference.sort_unstable();
            reference.truncate(keep);
            let mut expected: Vec<(u32, u32)> = reference.into_iter().map(|(d, n)| (n, d)).collect();
            expected.sort_unstable();
            proptest::prop_assert_eq!(kept, expected);
        }
    }

    /// 512- and 1024-bit sketches (the vectorised path, eight at a time and the rest one by one).
    #[test]
    fn nearest_sketches_of_whole_512_bit_lanes() {
        for words in [8usize, 16] {
            let word = |i: u64| i.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left((i % 61) as u32);
            let query: Vec<u64> = (0..words as u64).map(word).collect();
            let sketches: Vec<u64> = (0..(203 * words) as u64).map(|i| word(i + 77)).collect();
            let live = vec![u64::MAX; 4];
            let mut reference: Vec<(u32, u32)> = sketches
                .chunks_exact(words)
                .enumerate()
                .map(|(n, s)| (hamming_portable(&query, s), n as u32))
                .collect();
            reference.sort_unstable();
            for keep in [1, 8, 30, 203, 500] {
                let mut expected: Vec<(u32, u32)> = reference.iter().take(keep).map(|&(d, n)| (n, d)).collect();
                expected.sort_unstable();
                assert_eq!(
                    nearest_sketches(&query, &sketches, &live, None, keep),
                    expected,
                    "{words} words, keep {keep}"
                );
            }
        }
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
