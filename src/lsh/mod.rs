//! Random-hyperplane LSH (Charikar, 2002): pure math, no I/O.
//!
//! An index has `tables` (L) hash tables of `hash_bits` (K) bits each. Bit `i` of table `t`
//! is set when the (centred) embedding has a positive projection on hyperplane `t·K + i`.
//! All L·K projections of a batch come from one matrix product `[B×D]·[D×(L·K)]`.

mod probe;
mod sketch;
mod votes;

pub use probe::probe_codes;
pub use sketch::{
    AsymmetricQuery, MAX_SKETCH_BITS, WORD_BITS, draw_sketch_planes, estimated_cosine, hamming, nearest_sketches,
    rescore_nearest, sketch_shape,
};
pub use votes::{VoteCounter, vote_threshold};

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Largest K: a table code is a `u64`.
pub const MAX_HASH_BITS: u32 = 64;
/// Largest L: table ids are stored as `u16`, and more tables than this buy nothing measurable.
pub const MAX_TABLES: u32 = 256;

/// The shape of an LSH family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LshShape {
    pub dim: usize,
    pub hash_bits: u32,
    pub tables: u32,
}

impl LshShape {
    /// Number of hyperplanes, L·K.
    pub fn planes(&self) -> usize {
        self.hash_bits as usize * self.tables as usize
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LshError {
    #[error("hash_bits must be in 1..={MAX_HASH_BITS}, got {0}")]
    HashBits(u32),
    #[error("tables must be in 1..={MAX_TABLES}, got {0}")]
    Tables(u32),
    #[error("dim must be positive")]
    Dim,
    #[error("hyperplane matrix has {got} values, expected {expected}")]
    MatrixSize { got: usize, expected: usize },
    #[error("vectors have dimension {got}, the hyperplanes expect {expected}")]
    VectorDim { got: usize, expected: usize },
    #[error("the center has {got} values, expected {expected}, all finite")]
    Center { got: usize, expected: usize },
    #[error("sketch_bits must be a multiple of {WORD_BITS} in {WORD_BITS}..={MAX_SKETCH_BITS}, got {0}")]
    SketchBits(u32),
}

impl LshShape {
    pub fn validate(&self) -> Result<(), LshError> {
        if self.dim == 0 {
            return Err(LshError::Dim);
        }
        if !(1..=MAX_HASH_BITS).contains(&self.hash_bits) {
            return Err(LshError::HashBits(self.hash_bits));
        }
        if !(1..=MAX_TABLES).contains(&self.tables) {
            return Err(LshError::Tables(self.tables));
        }
        Ok(())
    }
}

/// The hyperplanes of one index: a `dim × (L·K)` matrix whose column `t·K + i` is the normal
/// of hyperplane `i` of table `t`. Drawn once and then stored as is: regenerating from a seed
/// would silently change every code if the RNG's output ever changed.
///
/// With a center `c`, vectors are hashed as `x − c`: post-ReLU embeddings all sit in one
/// orthant, and hyperplanes through the origin split them badly. The projections of `c` are
/// computed once, so centring costs one subtraction per projection.
#[derive(Debug, Clone)]
pub struct Hyperplanes {
    shape: LshShape,
    matrix: Array2<f32>,
    /// `c · matrix`, subtracted from every row of projections.
    center_projection: Option<Array1<f32>>,
}

impl Hyperplanes {
    /// Draws standard-normal hyperplanes from a ChaCha8 stream seeded with `seed`.
    pub fn draw(shape: LshShape, seed: u64) -> Result<Self, LshError> {
        shape.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let matrix = Array2::from_shape_simple_fn((shape.dim, shape.planes()), || StandardNormal.sample(&mut rng));
        Ok(Self { shape, matrix, center_projection: None })
    }

    /// Like `draw`, with the planes' normals orthonormalised in blocks of `dim` (Gram–Schmidt):
    /// orthogonal projections estimate angles with less variance than independent ones
    /// (Ji et al., 2012, "Super-Bit Locality-Sensitive Hashing"), which is what a sketch's
    /// Hamming distance is used for.
    pub fn draw_orthogonal(shape: LshShape, seed: u64) -> Result<Self, LshError> {
        let mut planes = Self::draw(shape, seed)?;
        // One normal per row, in f64: rounding would leave them slightly oblique.
        let mut normals = Array2::from_shape_fn((shape.planes(), shape.dim), |(p, d)| f64::from(planes.matrix[[d, p]]));
        for start in (0..normals.nrows()).step_by(shape.dim.max(1)) {
            let end = (start + shape.dim).min(normals.nrows());
            for j in start..end {
                let (done, mut rest) = normals.view_mut().split_at(Axis(0), j);
                let mut normal = rest.row_mut(0);
                for basis in done.slice(ndarray::s![start.., ..]).rows() {
                    let along = basis.dot(&normal);
                    normal.scaled_add(-along, &basis);
                }
                let norm = normal.dot(&normal).sqrt();
                // A Gaussian draw is linearly independent of fewer than `dim` others almost surely.
                if norm > 0.0 {
                    normal.mapv_inplace(|n| n / norm);
                }
            }
        }
        planes.matrix.assign(&normals.t().mapv(|n| n as f32));
        Ok(planes)
    }

    /// Rebuilds hyperplanes from their stored row-major matrix.
    pub fn from_row_major(shape: LshShape, values: Vec<f32>) -> Result<Self, LshError> {
        shape.validate()?;
        let expected = shape.dim * shape.planes();
        if values.len() != expected {
            return Err(LshError::MatrixSize { got: values.len(), expected });
        }
        let matrix = Array2::from_shape_vec((shape.dim, shape.planes()), values)
            .map_err(|_| LshError::MatrixSize { got: 0, expected })?;
        Ok(Self { shape, matrix, center_projection: None })
    }

    /// Hashes vectors relative to `center` from now on.
    pub fn with_center(mut self, center: &[f32]) -> Result<Self, LshError> {
        if center.len() != self.shape.dim || center.iter().any(|x| !x.is_finite()) {
            return Err(LshError::Center { got: center.len(), expected: self.shape.dim });
        }
        self.center_projection = Some(ArrayView1::from(center).dot(&self.matrix));
        Ok(self)
    }

    pub fn is_centered(&self) -> bool {
        self.center_projection.is_some()
    }

    pub fn shape(&self) -> LshShape {
        self.shape
    }

    /// The matrix in row-major order, for storage.
    pub fn to_row_major(&self) -> Vec<f32> {
        self.matrix.iter().copied().collect()
    }

    /// Projections of every row of `batch` (`B × dim`) on every hyperplane: `B × (L·K)`.
    pub fn project(&self, batch: ArrayView2<'_, f32>) -> Result<Array2<f32>, LshError> {
        if batch.ncols() != self.shape.dim {
            return Err(LshError::VectorDim { got: batch.ncols(), expected: self.shape.dim });
        }
        let mut projections = batch.dot(&self.matrix);
        if let Some(offset) = &self.center_projection {
            projections -= offset;
        }
        Ok(projections)
    }

    /// Projections of one vector on every hyperplane (a query). A matrix product with one row
    /// would pack the whole plane matrix first; summing `x[d] × row d` reads it once, in order,
    /// and skips the zeros that post-ReLU embeddings are full of.
    pub fn project_one(&self, vector: &[f32]) -> Result<Array2<f32>, LshError> {
        let planes = self.shape.planes();
        if vector.len() != self.shape.dim {
            return Err(LshError::VectorDim { got: vector.len(), expected: self.shape.dim });
        }
        let Some(matrix) = self.matrix.as_slice() else {
            return self.project(ArrayView2::from_shape((1, vector.len()), vector).map_err(|_| LshError::Dim)?);
        };
        let mut out = match &self.center_projection {
            Some(offset) => offset.iter().map(|c| -c).collect(),
            None => vec![0f32; planes],
        };
        accumulate_rows(&mut out, vector, matrix);
        Array2::from_shape_vec((1, planes), out).map_err(|_| LshError::Dim)
    }

    /// The L table codes of every row of `batch`, row-major `B × L`.
    pub fn codes(&self, batch: ArrayView2<'_, f32>) -> Result<Array2<u64>, LshError> {
        Ok(self.codes_of(self.project(batch)?.view()))
    }

    /// The L table codes of rows of projections (from `project`).
    pub fn codes_of(&self, projections: ArrayView2<'_, f32>) -> Array2<u64> {
        let tables = self.shape.tables as usize;
        let mut codes = Array2::zeros((projections.nrows(), tables));
        for (row, mut out) in projections.axis_iter(Axis(0)).zip(codes.axis_iter_mut(Axis(0))) {
            for (t, code) in out.iter_mut().enumerate() {
                *code = table_code(row, t, self.shape.hash_bits);
            }
        }
        codes
    }
}

/// Code of table `t` from one row of projections: bit `i` is set when projection `t·K + i` > 0.
pub fn table_code(projections: ArrayView1<'_, f32>, table: usize, hash_bits: u32) -> u64 {
    let k = hash_bits as usize;
    let start = table * k;
    let mut code = 0u64;
    for i in 0..k {
        if projections[start + i] > 0.0 {
            code |= 1 << i;
        }
    }
    code
}

/// `out += Σ_i vector[i] · row_i` over the rows of `matrix` (row-major, `out.len()` wide),
/// skipping zero features (common after a ReLU). A query's projection is this loop: a
/// one-row matrix product would pack the whole matrix first.
fn accumulate_rows(out: &mut [f32], vector: &[f32], matrix: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA, checked just above.
        return unsafe { accumulate_rows_avx2(out, vector, matrix) };
    }
    accumulate_rows_portable(out, vector, matrix);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn accumulate_rows_avx2(out: &mut [f32], vector: &[f32], matrix: &[f32]) {
    accumulate_rows_portable(out, vector, matrix);
}

#[inline(always)]
fn accumulate_rows_portable(out: &mut [f32], vector: &[f32], matrix: &[f32]) {
    for (&x, row) in vector.iter().zip(matrix.chunks_exact(out.len())) {
        if x != 0.0 {
            out.iter_mut().zip(row).for_each(|(o, m)| *o += x * m);
        }
    }
}

/// Cosine similarity; 0 when either vector is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    // Re-ranking is this loop. The x86-64 baseline stops at SSE2; with AVX2 and FMA (checked at
    // run time) the same code runs on 8-lane registers.
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA, checked just above.
        return unsafe { cosine_avx2(a, b) };
    }
    cosine_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn cosine_avx2(a: &[f32], b: &[f32]) -> f32 {
    cosine_portable(a, b)
}

#[inline(always)]
fn cosine_portable(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators: float addition is not associative, so the compiler keeps
    // one serial sum per variable; eight let it fill SIMD lanes.
    const LANES: usize = 8;
    let (mut dot, mut na, mut nb) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_rest, b_rest) = (a_chunks.remainder(), b_chunks.remainder());
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..LANES {
            dot[i] += x[i] * y[i];
            na[i] += x[i] * x[i];
            nb[i] += y[i] * y[i];
        }
    }
    let (mut dot, mut na, mut nb) = (dot.iter().sum::<f32>(), na.iter().sum::<f32>(), nb.iter().sum::<f32>());
    for (x, y) in a_rest.iter().zip(b_rest) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na.sqrt() * nb.sqrt()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;
    use proptest::prelude::*;

    fn shape(dim: usize, hash_bits: u32, tables: u32) -> LshShape {
        LshShape { dim, hash_bits, tables }
    }

    /// Code of one vector computed plane by plane in f64, with the planes whose projection is
    /// too close to zero to have a reliable sign reported in `unsure`.
    fn brute_force(planes: &Hyperplanes, v: &[f32]) -> (Vec<u64>, Vec<u64>) {
        let s = planes.shape();
        let (mut codes, mut unsure) = (vec![0u64; s.tables as usize], vec![0u64; s.tables as usize]);
        for t in 0..s.tables as usize {
            for i in 0..s.hash_bits as usize {
                let col = t * s.hash_bits as usize + i;
                let p: f64 = (0..s.dim).map(|d| v[d] as f64 * planes.matrix[[d, col]] as f64).sum();
                if p > 0.0 {
                    codes[t] |= 1 << i;
                }
                if p.abs() < 1e-3 {
                    unsure[t] |= 1 << i;
                }
            }
        }
        (codes, unsure)
    }

    proptest! {
        #[test]
        fn codes_match_brute_force(
            dim in 1usize..40,
            hash_bits in 1u32..=64,
            tables in 1u32..6,
            seed in any::<u64>(),
            rows in prop::collection::vec(prop::collection::vec(-10f32..10f32, 40), 1..5),
        ) {
            let planes = Hyperplanes::draw(shape(dim, hash_bits, tables), seed).unwrap();
            let batch = Array2::from_shape_fn((rows.len(), dim), |(r, c)| rows[r][c]);
            let codes = planes.codes(batch.view()).unwrap();
            for (r, row) in rows.iter().enumerate() {
                let (expected, unsure) = brute_force(&planes, &row[..dim]);
                for t in 0..tables as usize {
                    prop_assert_eq!(codes[[r, t]] & !unsure[t], expected[t] & !unsure[t]);
                }
            }
        }

        #[test]
        fn stored_matrix_round_trips(dim in 1usize..20, hash_bits in 1u32..=64, tables in 1u32..4, seed in any::<u64>()) {
            let s = shape(dim, hash_bits, tables);
            let planes = Hyperplanes::draw(s, seed).unwrap();
            let back = Hyperplanes::from_row_major(s, planes.to_row_major()).unwrap();
            prop_assert_eq!(back.matrix, planes.matrix);
        }
    }

    proptest! {
        #[test]
        fn centring_hashes_the_difference(
            seed in any::<u64>(),
            v in prop::collection::vec(-5f32..5f32, 12),
            c in prop::collection::vec(-5f32..5f32, 12),
        ) {
            let s = shape(12, 16, 3);
            let centered = Hyperplanes::draw(s, seed).unwrap().with_center(&c).unwrap();
            let plain = Hyperplanes::draw(s, seed).unwrap();
            let diff: Vec<f32> = v.iter().zip(&c).map(|(a, b)| a - b).collect();
            let (expected, unsure) = brute_force(&plain, &diff);
            let codes = centered.codes(Array2::from_shape_vec((1, 12), v).unwrap().view()).unwrap();
            for t in 0..3 {
                prop_assert_eq!(codes[[0, t]] & !unsure[t], expected[t] & !unsure[t]);
            }
        }
    }

    #[test]
    fn center_must_fit() {
        let planes = Hyperplanes::draw(shape(4, 8, 2), 1).unwrap();
        assert!(planes.clone().with_center(&[0.0; 3]).is_err());
        assert!(planes.clone().with_center(&[0.0, f32::NAN, 0.0, 0.0]).is_err());
        assert!(planes.with_center(&[0.5; 4]).unwrap().is_centered());
    }

    #[test]
    fn same_seed_same_planes_other_seed_other_planes() {
        let s = shape(16, 8, 4);
        let a = Hyperplanes::draw(s, 7).unwrap();
        assert_eq!(a.matrix, Hyperplanes::draw(s, 7).unwrap().matrix);
        assert_ne!(a.matrix, Hyperplanes::draw(s, 8).unwrap().matrix);
    }

    #[test]
    fn bit_agreement_tracks_angle() {
        // P[bit agrees] = 1 − θ/π for a random hyperplane; with 64×256 planes the empirical
        // rate is within a few hundredths of it (fixed seed, so this cannot flake).
        let s = shape(8, 64, 256);
        let planes = Hyperplanes::draw(s, 42).unwrap();
        let a = [1f32, 0., 0., 0., 0., 0., 0., 0.];
        for theta in [0.1f32, 0.5, 1.0, 2.0] {
            let b = [theta.cos(), theta.sin(), 0., 0., 0., 0., 0., 0.];
            let batch = Array2::from_shape_vec((2, 8), a.iter().chain(&b).copied().collect()).unwrap();
            let codes = planes.codes(batch.view()).unwrap();
            let agree: u32 = (0..256).map(|t| 64 - (codes[[0, t]] ^ codes[[1, t]]).count_ones()).sum();
            let rate = agree as f32 / (64.0 * 256.0);
            let expected = 1.0 - theta / std::f32::consts::PI;
            assert!((rate - expected).abs() < 0.03, "theta {theta}: {rate} vs {expected}");
        }
    }

    #[test]
    fn shape_limits_are_enforced() {
        assert_eq!(shape(4, 0, 1).validate(), Err(LshError::HashBits(0)));
        assert_eq!(shape(4, 65, 1).validate(), Err(LshError::HashBits(65)));
        assert_eq!(shape(4, 8, 0).validate(), Err(LshError::Tables(0)));
        assert_eq!(shape(4, 8, 257).validate(), Err(LshError::Tables(257)));
        assert_eq!(shape(0, 8, 1).validate(), Err(LshError::Dim));
        assert!(shape(4, 64, 256).validate().is_ok());
    }

    #[test]
    fn wrong_dimension_is_an_error_not_a_panic() {
        let planes = Hyperplanes::draw(shape(4, 8, 2), 1).unwrap();
        let batch = Array2::<f32>::zeros((1, 5));
        assert_eq!(planes.codes(batch.view()).unwrap_err(), LshError::VectorDim { got: 5, expected: 4 });
    }

    #[test]
    fn one_vector_projects_as_in_a_batch() {
        let shape = LshShape { dim: 40, hash_bits: 7, tables: 3 };
        let center: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin()).collect();
        for planes in
            [Hyperplanes::draw(shape, 4).unwrap(), Hyperplanes::draw(shape, 4).unwrap().with_center(&center).unwrap()]
        {
            // Zeros included: the single-vector path skips them.
            let x: Vec<f32> = (0..40).map(|i| if i % 3 == 0 { 0.0 } else { (i as f32 * 0.91).cos() }).collect();
            let one = planes.project_one(&x).unwrap();
            let batch = planes.project(ArrayView2::from_shape((1, 40), &x).unwrap()).unwrap();
            for (a, b) in one.iter().zip(batch.iter()) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
        assert!(planes_err(&Hyperplanes::draw(shape, 4).unwrap()));
    }

    fn planes_err(planes: &Hyperplanes) -> bool {
        matches!(planes.project_one(&[0.0; 3]), Err(LshError::VectorDim { got: 3, expected: 40 }))
    }

    #[test]
    fn orthogonal_planes_are_orthonormal_within_blocks_of_dim() {
        let shape = LshShape { dim: 16, hash_bits: 8, tables: 5 };
        let planes = Hyperplanes::draw_orthogonal(shape, 3).unwrap();
        assert_eq!(planes.to_row_major(), Hyperplanes::draw_orthogonal(shape, 3).unwrap().to_row_major());
        let columns: Vec<Vec<f32>> = planes.matrix.columns().into_iter().map(|c| c.to_vec()).collect();
        assert_eq!(columns.len(), 40);
        for (i, a) in columns.iter().enumerate() {
            for (j, b) in columns.iter().enumerate() {
                let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                if i == j {
                    assert!((dot - 1.0).abs() < 1e-5, "norm of {i}: {dot}");
                } else if i / 16 == j / 16 {
                    assert!(dot.abs() < 1e-5, "{i}·{j} = {dot}");
                }
            }
        }
    }

    #[test]
    fn cosine_of_zero_vector_is_zero() {
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        assert!((cosine(&[1.0, 1.0], &[2.0, 2.0]) - 1.0).abs() < 1e-6);
    }

    proptest! {
        /// The lane-split (and, where the CPU has it, AVX2) cosine against an f64 reference, at
        /// lengths that are and are not multiples of the lane count.
        #[test]
        fn cosine_matches_f64_reference(pairs in prop::collection::vec((-10f32..10.0, -10f32..10.0), 1..70)) {
            let (a, b): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            let dot: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
            let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            let expected = if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na * nb) };
            prop_assert!((f64::from(cosine(&a, &b)) - expected).abs() < 1e-4);
        }
    }
}
