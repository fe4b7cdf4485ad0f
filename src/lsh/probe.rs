//! Query-directed multi-probe (Lv et al., 2007, "Multi-probe LSH"): besides the query's own
//! bucket, visit the buckets whose codes differ in the bits the query is least sure of, in
//! order of the total |projection| of the flipped bits (single bits first when they are cheaper
//! than pairs, and so on).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A set of bit positions (indices into the bits sorted by |projection|) and its score.
#[derive(Debug, PartialEq)]
struct Candidate {
    score: f32,
    /// Ascending indices into the sorted bits; the last is the largest.
    set: Vec<usize>,
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        // Min-heap on score.
        other.score.total_cmp(&self.score).then_with(|| other.set.cmp(&self.set))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The `n` codes nearest to `code` for a query with these `projections` (one per bit of the
/// table), nearest first; never `code` itself.
pub fn probe_codes(projections: &[f32], code: u64, n: usize) -> Vec<u64> {
    let k = projections.len();
    if n == 0 || k == 0 {
        return Vec::new();
    }
    // Bits ordered by how cheaply they flip.
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| projections[a].abs().total_cmp(&projections[b].abs()));
    let cost: Vec<f32> = order.iter().map(|&bit| projections[bit].abs()).collect();

    // Every non-empty subset is reached exactly once from {0} by "shift" (replace the largest
    // index j by j+1) and "expand" (add j+1), and both only raise the score.
    let mut heap = BinaryHeap::new();
    heap.push(Candidate { score: cost[0], set: vec![0] });
    let mut codes = Vec::with_capacity(n);
    while let Some(Candidate { score, set }) = heap.pop() {
        let last = *set.last().unwrap_or(&0);
        if last + 1 < k {
            let mut shifted = set.clone();
            *shifted.last_mut().unwrap_or(&mut 0) = last + 1;
            heap.push(Candidate { score: score - cost[last] + cost[last + 1], set: shifted });
            let mut expanded = set.clone();
            expanded.push(last + 1);
            heap.push(Candidate { score: score + cost[last + 1], set: expanded });
        }
        codes.push(set.iter().fold(code, |c, &i| c ^ (1u64 << order[i])));
        if codes.len() == n {
            break;
        }
    }
    codes
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn score(projections: &[f32], code: u64, probe: u64) -> f32 {
        (0..projections.len()).filter(|&i| (code ^ probe) >> i & 1 == 1).map(|i| projections[i].abs()).sum()
    }

    #[test]
    fn cheapest_single_flips_come_first() {
        let projections = [0.9, -0.1, 0.5, -2.0];
        let code = 0b0101;
        let probes = probe_codes(&projections, code, 3);
        // Flip bit 1 (0.1), then bit 2 (0.5), then bits 1+2 (0.6).
        assert_eq!(probes, vec![code ^ 0b0010, code ^ 0b0100, code ^ 0b0110]);
    }

    #[test]
    fn all_other_codes_at_most() {
        let probes = probe_codes(&[0.3, 0.2, 0.1], 0, 100);
        assert_eq!(probes.len(), 7);
        let mut sorted = probes.clone();
        sorted.sort();
        assert_eq!(sorted, (1..8).collect::<Vec<u64>>());
    }

    proptest! {
        #[test]
        fn probes_are_the_n_cheapest_in_order(projections in prop::collection::vec(-3f32..3f32, 1..9), code in any::<u64>(), n in 0usize..40) {
            let k = projections.len();
            let code = code & ((1u64 << k) - 1);
            let probes = probe_codes(&projections, code, n);
            // Brute force: every other code, by score.
            let mut all: Vec<f32> = (0..1u64 << k).filter(|&c| c != code).map(|c| score(&projections, code, c)).collect();
            all.sort_by(f32::total_cmp);
            prop_assert_eq!(probes.len(), n.min(all.len()));
            let got: Vec<f32> = probes.iter().map(|&p| score(&projections, code, p)).collect();
            for (g, want) in got.iter().zip(&all) {
                prop_assert!((g - want).abs() < 1e-4, "{:?} vs {:?}", got, &all[..got.len()]);
            }
            let mut distinct = probes.clone();
            distinct.sort();
            distinct.dedup();
            prop_assert_eq!(distinct.len(), probes.len());
            prop_assert!(!probes.contains(&code));
        }
    }
}
