//! Merging bucket hits into votes: an item's votes are the number of tables in which it
//! shares the query's bucket.

use std::collections::HashMap;

/// Accumulates votes over the buckets a query visits.
///
/// An item sits in exactly one bucket of each table, so adding every visited bucket of a table
/// counts it at most once per table, multi-probe included.
#[derive(Debug, Default)]
pub struct VoteCounter {
    votes: HashMap<u32, u32>,
}

impl VoteCounter {
    pub fn add_bucket(&mut self, items: &[u32]) {
        for &item in items {
            *self.votes.entry(item).or_insert(0) += 1;
        }
    }

    pub fn remove(&mut self, item: u32) {
        self.votes.remove(&item);
    }

    /// Distinct items seen so far.
    pub fn candidates(&self) -> usize {
        self.votes.len()
    }

    /// Every `(item, votes)` pair with at least `min_votes` votes.
    pub fn at_least(&self, min_votes: u32) -> Vec<(u32, u32)> {
        self.votes.iter().filter(|&(_, &v)| v >= min_votes).map(|(&i, &v)| (i, v)).collect()
    }

    /// The `(item, votes)` pairs that could be among the `top_k` best once ties are broken,
    /// leaving out items with fewer than `min_votes` votes: every item with more votes than
    /// the `top_k`-th best, and all items tied with it.
    pub fn contenders(&self, top_k: usize, min_votes: u32) -> Vec<(u32, u32)> {
        let mut votes: Vec<u32> = self.votes.values().copied().filter(|&v| v >= min_votes).collect();
        let Some(threshold) = vote_threshold(&mut votes, top_k) else {
            return Vec::new();
        };
        self.votes.iter().filter(|&(_, &v)| v >= threshold.max(min_votes)).map(|(&i, &v)| (i, v)).collect()
    }
}

/// The `k`-th largest value of `votes` (or the smallest if there are fewer than `k`);
/// `None` when there is nothing to rank. Reorders `votes`.
pub fn vote_threshold(votes: &mut [u32], k: usize) -> Option<u32> {
    if votes.is_empty() || k == 0 {
        return None;
    }
    let nth = k.min(votes.len()) - 1;
    let (_, kth, _) = votes.select_nth_unstable_by(nth, |a, b| b.cmp(a));
    Some(*kth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn votes_count_tables_in_which_items_collide() {
        let mut counter = VoteCounter::default();
        counter.add_bucket(&[1, 2, 3]);
        counter.add_bucket(&[2, 3]);
        counter.add_bucket(&[3]);
        assert_eq!(counter.candidates(), 3);
        let mut all = counter.contenders(10, 0);
        all.sort();
        assert_eq!(all, vec![(1, 1), (2, 2), (3, 3)]);
    }

    #[test]
    fn contenders_keep_ties_at_the_threshold() {
        let mut counter = VoteCounter::default();
        counter.add_bucket(&[1, 2, 3, 4]);
        counter.add_bucket(&[1, 2, 3]);
        let mut top = counter.contenders(2, 0);
        top.sort();
        // The 2nd best has 2 votes and three items share it.
        assert_eq!(top, vec![(1, 2), (2, 2), (3, 2)]);
    }

    #[test]
    fn min_votes_filters() {
        let mut counter = VoteCounter::default();
        counter.add_bucket(&[1, 2]);
        counter.add_bucket(&[1]);
        assert_eq!(counter.contenders(10, 2), vec![(1, 2)]);
        assert!(counter.contenders(10, 3).is_empty());
    }

    #[test]
    fn removed_items_are_not_contenders() {
        let mut counter = VoteCounter::default();
        counter.add_bucket(&[7, 8]);
        counter.remove(7);
        assert_eq!(counter.contenders(10, 0), vec![(8, 1)]);
    }

    proptest! {
        #[test]
        fn threshold_is_kth_largest(mut votes in prop::collection::vec(0u32..20, 1..50), k in 1usize..60) {
            let mut sorted = votes.clone();
            sorted.sort_by(|a, b| b.cmp(a));
            let expected = sorted[k.min(sorted.len()) - 1];
            prop_assert_eq!(vote_threshold(&mut votes, k), Some(expected));
        }

        #[test]
        fn contenders_contain_exact_top_k(buckets in prop::collection::vec(prop::collection::btree_set(0u32..30, 0..15), 1..8), k in 1usize..10) {
            let mut counter = VoteCounter::default();
            let mut reference: std::collections::BTreeMap<u32, u32> = Default::default();
            for b in &buckets {
                let items: Vec<u32> = b.iter().copied().collect();
                counter.add_bucket(&items);
                for i in items { *reference.entry(i).or_default() += 1; }
            }
            // Top k by (votes desc, item asc) from the reference must be within the contenders.
            let mut ranked: Vec<(u32, u32)> = reference.into_iter().collect();
            ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let contenders = counter.contenders(k, 0);
            for hit in ranked.iter().take(k) {
                prop_assert!(contenders.contains(hit));
            }
        }
    }
}
