//! Merging bucket hits into votes: an item's votes are the number of tables in which it
//! shares the query's bucket.

/// Accumulates votes over the buckets a query visits.
///
/// An item sits in exactly one bucket of each table, so adding every visited bucket of a table
/// counts it at most once per table, multi-probe included.
///
/// Votes live in a dense array indexed by item number (item numbers are dense): one increment
/// per bucket entry, no hashing. `clear` resets only what was touched, so one counter is reused
/// across queries whatever the size of the index.
#[derive(Debug, Default)]
pub struct VoteCounter {
    /// Indexed by item number; grows by doubling, so only `..end` is ever written.
    votes: Vec<u16>,
    /// One past the largest item number seen since the counter was created.
    end: usize,
    /// Items with a vote, in the order first seen (removed ones stay, with 0 votes).
    touched: Vec<u32>,
}

impl VoteCounter {
    /// Forgets all votes, keeping the memory.
    pub fn clear(&mut self) {
        for &item in &self.touched {
            self.votes[item as usize] = 0;
        }
        self.touched.clear();
    }

    pub fn add_bucket(&mut self, items: &[u32]) {
        for &item in items {
            let i = item as usize;
            if i >= self.votes.len() {
                self.votes.resize((i + 1).max(self.votes.len() * 2), 0);
            }
            self.end = self.end.max(i + 1);
            let votes = &mut self.votes[i];
            if *votes == 0 {
                self.touched.push(item);
            }
            *votes = votes.saturating_add(1);
        }
    }

    pub fn remove(&mut self, item: u32) {
        if let Some(votes) = self.votes.get_mut(item as usize) {
            *votes = 0;
        }
    }

    pub fn votes(&self, item: u32) -> u32 {
        self.votes.get(item as usize).map_or(0, |&v| u32::from(v))
    }

    fn iter(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.touched.iter().map(|&i| (i, u32::from(self.votes[i as usize]))).filter(|&(_, v)| v > 0)
    }

    /// Distinct items seen so far.
    pub fn candidates(&self) -> usize {
        self.iter().count()
    }

    /// Every `(item, votes)` pair with at least `min_votes` votes (and at least one), in
    /// ascending item order.
    pub fn at_least(&mut self, min_votes: u32) -> Vec<(u32, u32)> {
        let mut pairs = Vec::new();
        self.for_each_at_least(min_votes, |item, votes| pairs.push((item, votes)));
        pairs
    }

    /// Calls `f(item, votes)` for every item with at least `min_votes` votes (and at least one),
    /// in ascending item order: whatever is looked up per candidate next (sketches, embeddings)
    /// is laid out by item number, and reading it in order lets the prefetcher work.
    pub fn for_each_at_least(&mut self, min_votes: u32, mut f: impl FnMut(u32, u32)) {
        let min_votes = min_votes.max(1);
        if self.touched.len() * 8 >= self.end {
            // Dense enough that one pass over the counts beats sorting.
            for (item, &votes) in self.votes[..self.end].iter().enumerate() {
                if u32::from(votes) >= min_votes {
                    f(item as u32, u32::from(votes));
                }
            }
        } else {
            // `clear` does not care about the order of `touched`.
            self.touched.sort_unstable();
            for &item in &self.touched {
                let votes = u32::from(self.votes[item as usize]);
                if votes >= min_votes {
                    f(item, votes);
                }
            }
        }
    }

    /// The `(item, votes)` pairs that could be among the `top_k` best once ties are broken,
    /// leaving out items with fewer than `min_votes` votes: every item with more votes than
    /// the `top_k`-th best, and all items tied with it.
    pub fn contenders(&self, top_k: usize, min_votes: u32) -> Vec<(u32, u32)> {
        let mut votes: Vec<u32> = self.iter().map(|(_, v)| v).filter(|&v| v >= min_votes).collect();
        let Some(threshold) = vote_threshold(&mut votes, top_k) else {
            return Vec::new();
        };
        self.iter().filter(|&(_, v)| v >= threshold.max(min_votes)).collect()
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
    fn cleared_counter_starts_afresh() {
        let mut counter = VoteCounter::default();
        counter.add_bucket(&[5, 1000]);
        counter.clear();
        assert_eq!(counter.candidates(), 0);
        counter.add_bucket(&[5]);
        assert_eq!((counter.votes(5), counter.votes(1000)), (1, 0));
    }

    #[test]
    fn removed_items_are_not_contenders() {
        let mut counter = VoteCounter::default();
        counter.add_bucket(&[7, 8]);
        counter.remove(7);
        assert_eq!(counter.contenders(10, 0), vec![(8, 1)]);
    }

    /// A counter fed `buckets`, and the votes a map counts for the same buckets.
    fn counted(buckets: &[std::collections::BTreeSet<u32>]) -> (VoteCounter, std::collections::BTreeMap<u32, u32>) {
        let mut counter = VoteCounter::default();
        let mut reference = std::collections::BTreeMap::new();
        for b in buckets {
            let items: Vec<u32> = b.iter().copied().collect();
            counter.add_bucket(&items);
            items.iter().for_each(|&i| *reference.entry(i).or_default() += 1);
        }
        (counter, reference)
    }

    proptest! {
        #[test]
        fn at_least_lists_items_in_order(buckets in prop::collection::vec(prop::collection::btree_set(0u32..300, 0..100), 1..8), min in 0u32..4) {
            let (mut counter, reference) = counted(&buckets);
            let expected: Vec<(u32, u32)> = reference.into_iter().filter(|&(_, v)| v >= min.max(1)).collect();
            prop_assert_eq!(counter.at_least(min), expected);
        }

        #[test]
        fn threshold_is_kth_largest(mut votes in prop::collection::vec(0u32..20, 1..50), k in 1usize..60) {
            let mut sorted = votes.clone();
            sorted.sort_by(|a, b| b.cmp(a));
            let expected = sorted[k.min(sorted.len()) - 1];
            prop_assert_eq!(vote_threshold(&mut votes, k), Some(expected));
        }

        #[test]
        fn contenders_contain_exact_top_k(buckets in prop::collection::vec(prop::collection::btree_set(0u32..30, 0..15), 1..8), k in 1usize..10) {
            let (counter, reference) = counted(&buckets);
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
