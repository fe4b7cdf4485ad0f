//! The fixed batch sizes a model runs at. A GPU provider pays for every input shape it has not
//! seen (ONNX Runtime's CUDA provider: 0.4–1.8 s to choose and build convolution plans), so the
//! batcher pads each batch to the smallest of a few sizes, all warmed at start: the device never
//! sees a new shape while serving. Triton's preferred batch sizes are the model.

use std::fmt;
use std::str::FromStr;

/// Batch sizes, ascending and distinct, at least one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSizes(Vec<usize>);

/// The largest batch size accepted: 4096 images of 224×224 are 2.4 GB of input.
pub const MAX_BATCH_SIZE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchSizesError {
    #[error("no batch size given")]
    Empty,
    #[error("batch size {0} is not between 1 and {MAX_BATCH_SIZE}")]
    OutOfRange(usize),
    #[error("{0:?} is not a batch size")]
    NotANumber(String),
}

impl BatchSizes {
    pub fn new(sizes: impl IntoIterator<Item = usize>) -> Result<Self, BatchSizesError> {
        let mut sizes: Vec<usize> = sizes.into_iter().collect();
        if let Some(&bad) = sizes.iter().find(|&&s| s == 0 || s > MAX_BATCH_SIZE) {
            return Err(BatchSizesError::OutOfRange(bad));
        }
        sizes.sort_unstable();
        sizes.dedup();
        if sizes.is_empty() {
            return Err(BatchSizesError::Empty);
        }
        Ok(Self(sizes))
    }

    /// Every size from 1 to `max`: no padding. For the CPU provider, where a new shape costs
    /// nothing worth avoiding but padded rows cost their full compute.
    pub fn every_up_to(max: usize) -> Result<Self, BatchSizesError> {
        Self::new(1..=max)
    }

    /// 1 and the powers of `step` up to `max` (`max` included): each batch is padded by less
    /// than `step`× its rows. For GPU providers.
    pub fn geometric(max: usize, step: usize) -> Result<Self, BatchSizesError> {
        let step = step.max(2);
        let mut sizes = vec![max];
        let mut size = 1;
        while size < max {
            sizes.push(size);
            size = size.saturating_mul(step);
        }
        Self::new(sizes)
    }

    pub fn largest(&self) -> usize {
        self.0[self.0.len() - 1]
    }

    /// The size a batch of `rows` runs at: the smallest that holds it (the largest when none
    /// does; the batcher never forms batches larger than that).
    pub fn fitting(&self, rows: usize) -> usize {
        self.0.iter().copied().find(|&s| s >= rows).unwrap_or_else(|| self.largest())
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for BatchSizes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let texts: Vec<String> = self.0.iter().map(usize::to_string).collect();
        f.write_str(&texts.join(","))
    }
}

impl FromStr for BatchSizes {
    type Err = BatchSizesError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let sizes = text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<usize>().map_err(|_| BatchSizesError::NotANumber(s.chars().take(32).collect())))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_sorts_and_deduplicates() {
        assert_eq!("64, 1,8,8".parse::<BatchSizes>().unwrap(), BatchSizes(vec![1, 8, 64]));
        assert_eq!("".parse::<BatchSizes>(), Err(BatchSizesError::Empty));
        assert_eq!("0,8".parse::<BatchSizes>(), Err(BatchSizesError::OutOfRange(0)));
        assert!(matches!("8,x".parse::<BatchSizes>(), Err(BatchSizesError::NotANumber(_))));
        assert_eq!("1,8,64".parse::<BatchSizes>().unwrap().to_string(), "1,8,64");
    }

    #[test]
    fn geometric_sizes_end_at_the_largest() {
        assert_eq!(BatchSizes::geometric(64, 4).unwrap(), BatchSizes(vec![1, 4, 16, 64]));
        assert_eq!(BatchSizes::geometric(100, 4).unwrap(), BatchSizes(vec![1, 4, 16, 64, 100]));
        assert_eq!(BatchSizes::geometric(1, 4).unwrap(), BatchSizes(vec![1]));
        assert_eq!(BatchSizes::every_up_to(3).unwrap(), BatchSizes(vec![1, 2, 3]));
    }

    proptest! {
        #[test]
        fn a_batch_runs_at_the_smallest_size_that_holds_it(
            sizes in proptest::collection::vec(1usize..300, 1..6),
            rows in 1usize..300,
        ) {
            let sizes = BatchSizes::new(sizes).unwrap();
            let rows = rows.min(sizes.largest());
            let size = sizes.fitting(rows);
            prop_assert!(size >= rows);
            prop_assert!(sizes.iter().any(|s| s == size));
            prop_assert!(sizes.iter().filter(|&s| s >= rows).all(|s| s >= size));
        }
    }
}
