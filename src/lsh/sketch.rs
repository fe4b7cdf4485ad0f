//! Binary sketches: `bits` sign bits of an item's (centred) projections on hyperplanes of their
//! own, packed into `bits / 64` words. The Hamming distance of two sketches estimates the angle
//! between the vectors (P[bit differs] = θ/π), so a query ranks thousands of LSH candidates (or
//! every item) by a few popcounts each, re-scores the nearest few hundred against its own
//! projections ([`AsymmetricQuery`]) and compares only the best hundred or so exactly.
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
/// One pass, no distance array: a bounded buffer whose cut-off distance rejects almost every
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
    // The buffer never holds more than 2 × keep, nor more than there are items.
    nearest.kept.reserve(keep.saturating_mul(2).min(sketches.len() / words));
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
///
/// Sketches nearer than the bound go into a buffer of up to `2 × keep`; a full buffer is cut
/// back to its `keep` nearest, whose farthest distance becomes the bound. Each accepted sketch
/// costs O(1) amortised, where a heap of `keep` paid a sift of ~log keep steps for
/// each, which showed in profiles once the re-score asked for 4 × depth.
struct Nearest<'a> {
    live: &'a [u64],
    skip: Option<u32>,
    keep: usize,
    /// `(distance, item)`, in no order.
    kept: Vec<(u32, u32)>,
    /// A sketch must be nearer than this to enter: the `keep`-th distance at the last cut.
    bound: u32,
}

impl<'a> Nearest<'a> {
    fn new(live: &'a [u64], skip: Option<u32>, keep: usize) -> Self {
        Self { live, skip, keep, kept: Vec::new(), bound: u32::MAX }
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
        self.kept.push((distance, item as u32));
        if self.kept.len() >= self.keep.saturating_mul(2) {
            self.cut();
        }
    }

    /// Keeps the `keep` nearest, ties to the lower items; later items at the bound's distance
    /// lose to those kept (items come in ascending order), so the bound excludes it.
    fn cut(&mut self) {
        if self.kept.len() > self.keep {
            self.kept.select_nth_unstable(self.keep - 1);
            self.kept.truncate(self.keep);
            self.bound = self.kept.iter().map(|&(distance, _)| distance).max().unwrap_or(u32::MAX);
        }
    }

    fn into_item_order(mut self) -> Vec<(u32, u32)> {
        self.cut();
        let mut kept: Vec<(u32, u32)> = self.kept.into_iter().map(|(distance, item)| (item, distance)).collect();
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

/// A query's side of the asymmetric comparison of sketches (Dong et al., 2008, "Asymmetric
/// distance estimation with sketches"; Gordo et al., 2014): the query keeps its real-valued
/// projections and scores a sketch by `Σ_i p_i · s_i` (`s_i = ±1`, the sketch's sign bits), a
/// dot product with the item's sign vector. A sign bit throws away its projection's size on
/// both sides of a Hamming distance; here only on the item's, so a bit the query barely leans
/// on counts little. On Fashion-MNIST, 512 bits, re-scoring the 4 × depth Hamming-nearest this
/// way before the exact re-rank takes recall at depth 50 from 0.83 to 0.93.
///
/// The sum is read from one table per sketch byte (`Σ p_i` over the byte's set bits, for all
/// 256 values): a sketch costs one load and add per byte, whatever its bits.
pub struct AsymmetricQuery {
    /// `byte_sums[b * 256 + v]`: the sum of the projections of byte `b`'s set bits in value `v`.
    byte_sums: Vec<f32>,
    /// `Σ_i p_i`: `Σ p_i·s_i = 2·Σ_{set} p_i − Σ_i p_i`.
    total: f32,
}

impl AsymmetricQuery {
    /// From the query's projections on the sketch planes (one per bit, bit `i` of word `w` is
    /// projection `64·w + i`).
    pub fn new(projections: &[f32]) -> Self {
        let mut byte_sums = vec![0f32; projections.len().div_ceil(8) * 256];
        for (sums, bits) in byte_sums.chunks_exact_mut(256).zip(projections.chunks(8)) {
            // The values with bit `b` set are those below 2^b plus projection `b`: 8 runs of
            // independent adds that vectorise, where one value at a time would chain them. A
            // bit past the projections (never set in a sketch) adds nothing.
            for b in 0..8 {
                let projection = bits.get(b).copied().unwrap_or(0.0);
                let (low, high) = sums.split_at_mut(1 << b);
                high[..low.len()].iter_mut().zip(&*low).for_each(|(h, l)| *h = l + projection);
            }
        }
        Self { byte_sums, total: projections.iter().sum() }
    }

    /// `Σ_i p_i · s_i`: larger is nearer. `sketch` has as many bits as the query projections.
    pub fn score(&self, sketch: &[u64]) -> f32 {
        debug_assert_eq!(sketch.len() * 8, self.byte_sums.len() / 256, "a sketch of another size");
        let mut set = [0f32; 4];
        let bytes = sketch.iter().flat_map(|w| w.to_le_bytes());
        for (i, (sums, byte)) in self.byte_sums.chunks_exact(256).zip(bytes).enumerate() {
            // Four partial sums, so that the adds do not wait on each other.
            set[i % 4] += sums[byte as usize];
        }
        2.0 * set.iter().sum::<f32>() - self.total
    }
}

/// The `keep` of `entries` whose items' sketches score highest against `query`, in item order;
/// ties go to the lower item numbers. `number` gives an entry's item, `sketches` holds every
/// item's sketch, `words` each.
pub fn rescore_nearest<E: Copy>(
    query: &AsymmetricQuery,
    sketches: &[u64],
    words: usize,
    entries: &[E],
    number: impl Fn(&E) -> u32,
    keep: usize,
) -> Vec<E> {
    let mut scored: Vec<(f32, u32, usize)> = entries
        .iter()
        .enumerate()
        .map(|(at, entry)| {
            let start = number(entry) as usize * words;
            // An item without a sketch (not expected) scores last rather than failing the query.
            let score = sketches.get(start..start + words).map_or(f32::NEG_INFINITY, |s| query.score(s));
            // NaN (from projections that overflowed) would rank first under total_cmp.
            (if score.is_nan() { f32::NEG_INFINITY } else { score }, number(entry), at)
        })
        .collect();
    if keep < scored.len() {
        let best_first = |a: &(f32, u32, usize), b: &(f32, u32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        match keep.checked_sub(1) {
            Some(last) => {
                scored.select_nth_unstable_by(last, best_first);
                scored.truncate(keep);
            }
            None => scored.clear(),
        }
    }
    scored.sort_unstable_by_key(|&(_, number, _)| number);
    scored.into_iter().map(|(_, _, at)| entries[at]).collect()
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

    proptest::proptest! {
        /// The byte tables give `Σ p_i · s_i` of the bits one by one.
        #[test]
        fn asymmetric_score_is_the_dot_product_with_the_signs(
            words in 1usize..9,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let projections: Vec<f32> = (0..words * 64).map(|_| StandardNormal.sample(&mut rng)).collect();
            let sketch: Vec<u64> = (0..words).map(|_| rand::RngExt::random(&mut rng)).collect();
            let expected: f64 = projections
                .iter()
                .enumerate()
                .map(|(i, &p)| if sketch[i / 64] >> (i % 64) & 1 == 1 { f64::from(p) } else { -f64::from(p) })
                .sum();
            let score = AsymmetricQuery::new(&projections).score(&sketch);
            proptest::prop_assert!((f64::from(score) - expected).abs() < 1e-3, "{score} vs {expected}");
        }

        /// The re-score keeps the best-scoring entries (ties to lower items), in item order.
        #[test]
        fn rescore_keeps_the_best_scores(
            items in 0usize..200,
            keep in 0usize..60,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let words = 2;
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            // Few distinct sketches, so that scores tie.
            let sketches: Vec<u64> = (0..items * words).map(|_| rand::RngExt::random::<u64>(&mut rng) % 4).collect();
            let projections: Vec<f32> = (0..words * 64).map(|_| StandardNormal.sample(&mut rng)).collect();
            let query = AsymmetricQuery::new(&projections);
            // Every other item, as (number, payload).
            let entries: Vec<(u32, u32)> = (0..items as u32).step_by(2).map(|n| (n, n * 10)).collect();
            let kept = rescore_nearest(&query, &sketches, words, &entries, |&(n, _)| n, keep);
            let mut reference: Vec<(f32, u32)> = entries
                .iter()
                .map(|&(n, _)| (query.score(&sketches[n as usize * words..][..words]), n))
                .collect();
            reference.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut expected: Vec<(u32, u32)> = reference.iter().take(keep).map(|&(_, n)| (n, n * 10)).collect();
            expected.sort_unstable();
            proptest::prop_assert_eq!(kept, expected);
        }
    }

    /// What the re-score is for: among the Hamming-nearest, the asymmetric estimate finds the
    /// true nearest neighbours more often than the Hamming distance that preselected them.
    #[test]
    fn asymmetric_estimate_ranks_better_than_hamming() {
        let (dim, bits, items) = (64, 512, 2000);
        let planes = draw_sketch_planes(dim, bits, 5).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut sample = || -> Vec<f32> { (0..dim).map(|_| StandardNormal.sample(&mut rng)).collect() };
        let (mut found_hamming, mut found_asymmetric) = (0, 0);
        for _ in 0..20 {
            let query = sample();
            // Items at all angles to the query.
            let vectors: Vec<Vec<f32>> = (0..items)
                .map(|i| {
                    let mix = i as f32 / items as f32;
                    query.iter().zip(sample()).map(|(q, n)| mix * q + (1.0 - mix) * n).collect()
                })
                .collect();
            let batch = Array2::from_shape_vec((items, dim), vectors.concat()).unwrap();
            let sketches: Vec<u64> = planes.codes(batch.view()).unwrap().into_iter().collect();
            let projections = planes.project_one(&query).unwrap();
            let words = planes.codes_of(projections.view()).row(0).to_vec();
            let mut truth: Vec<(f32, u32)> =
                vectors.iter().enumerate().map(|(n, v)| (super::super::cosine(&query, v), n as u32)).collect();
            truth.sort_by(|a, b| b.0.total_cmp(&a.0));
            let truth: Vec<u32> = truth.iter().take(10).map(|&(_, n)| n).collect();
            let preselected = nearest_sketches(&words, &sketches, &[u64::MAX; 32], None, 80);
            let by_hamming = nearest_sketches(&words, &sketches, &[u64::MAX; 32], None, 10);
            let asymmetric = AsymmetricQuery::new(projections.as_slice().unwrap());
            let by_asymmetric = rescore_nearest(&asymmetric, &sketches, words.len(), &preselected, |e| e.0, 10);
            found_hamming += by_hamming.iter().filter(|(n, _)| truth.contains(n)).count();
            found_asymmetric += by_asymmetric.iter().filter(|(n, _)| truth.contains(n)).count();
        }
        // Measured: 88 against 72 (seeded, so every run alike).
        assert!(
            found_asymmetric >= found_hamming + 10,
            "asymmetric {found_asymmetric} vs Hamming {found_hamming} of 200"
        );
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
