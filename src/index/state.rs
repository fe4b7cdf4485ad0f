//! An index's query-time state, in memory: which items are live, every item's sketch, and the
//! batches that are logged (acknowledged) but not yet applied to the store. The store hands over
//! what it has applied at open; the log writer adds each batch once it is durable, and the
//! applier takes batches out once the store holds them. Queries see exactly what was
//! acknowledged: the store's applied part, with this tail over it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use crate::store::{ItemWrite, Position, StoreBatch, StoredState};

#[derive(Debug, Default)]
pub(crate) struct QueryState {
    /// Bit `n % 64` of word `n / 64` is set while item `n` is live.
    live: Vec<u64>,
    count: u64,
    /// The next item number to give out.
    next: u32,
    words_per_item: usize,
    /// Item `n`'s sketch at words `n × words_per_item`; records of dead items stay.
    sketches: Vec<u64>,
    tail: Tail,
}

/// Logged batches not yet applied, and what queries need of them.
#[derive(Debug, Default)]
struct Tail {
    batches: VecDeque<(Position, Arc<StoreBatch>)>,
    items: HashMap<u32, Arc<ItemWrite>>,
    /// The latest logged fate of each id the tail touches: its item, or `None` once deleted.
    ids: HashMap<String, (Option<u32>, Position)>,
    /// Per table, code → the tail's items in that bucket, in ascending number.
    buckets: Vec<HashMap<u64, Vec<u32>>>,
    /// Item writes and removals in `batches`.
    operations: usize,
}

/// What the store knows of an id, as the tail sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TailId {
    /// The tail does not touch the id: ask the store.
    Unknown,
    Live(u32),
    Deleted,
}

impl QueryState {
    pub(crate) fn new(stored: StoredState, tables: usize, words_per_item: usize) -> Self {
        let mut live = stored.live;
        live.resize((stored.next as usize).div_ceil(64), 0);
        let tail = Tail { buckets: vec![HashMap::new(); tables], ..Default::default() };
        Self { live, count: stored.count, next: stored.next, words_per_item, sketches: stored.sketches, tail }
    }

    pub(crate) fn is_live(&self, number: u32) -> bool {
        self.live.get(number as usize / 64).is_some_and(|w| w & (1 << (number % 64)) != 0)
    }

    pub(crate) fn live_words(&self) -> &[u64] {
        &self.live
    }

    pub(crate) fn sketches(&self) -> &[u64] {
        &self.sketches
    }

    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    pub(crate) fn next(&self) -> u32 {
        self.next
    }

    /// Item writes and removals logged but not applied.
    pub(crate) fn pending(&self) -> usize {
        self.tail.operations
    }

    /// The oldest logged batch not yet applied.
    pub(crate) fn first_pending(&self) -> Option<Position> {
        self.tail.batches.front().map(|(p, _)| *p)
    }

    pub(crate) fn id(&self, id: &str) -> TailId {
        match self.tail.ids.get(id) {
            None => TailId::Unknown,
            Some((Some(number), _)) => TailId::Live(*number),
            Some((None, _)) => TailId::Deleted,
        }
    }

    /// A logged item not yet applied.
    pub(crate) fn tail_item(&self, number: u32) -> Option<&Arc<ItemWrite>> {
        self.tail.items.get(&number)
    }

    /// The tail's items in bucket `code` of `table`, in ascending number. Items are applied in
    /// number order, so one of these at or below the highest number in the store's copy of the
    /// bucket is one the store applied after this copy was taken: callers read this first and
    /// the store second, and skip those (listed twice, its vote would count twice).
    pub(crate) fn tail_bucket(&self, table: usize, code: u64) -> &[u32] {
        self.tail.buckets.get(table).and_then(|b| b.get(&code)).map_or(&[], Vec::as_slice)
    }

    /// Takes in a batch that is now durable in the log at `position`.
    pub(crate) fn logged(&mut self, position: Position, batch: Arc<StoreBatch>) {
        for removal in &batch.removals {
            if self.is_live(removal.number) {
                self.live[removal.number as usize / 64] &= !(1 << (removal.number % 64));
                self.count = self.count.saturating_sub(1);
            }
            if let Some(id) = &removal.deleted_id {
                self.tail.ids.insert(id.clone(), (None, position));
            }
        }
        for item in &batch.items {
            let n = item.number;
            let words = self.words_per_item;
            let start = n as usize * words;
            if self.sketches.len() < start + words && item.sketch.len() == words {
                self.sketches.resize(start, 0);
                self.sketches.extend_from_slice(&item.sketch);
            }
            self.live.resize(self.live.len().max((n as usize + 1).div_ceil(64)), 0);
            self.live[n as usize / 64] |= 1 << (n % 64);
            self.count += 1;
            self.next = self.next.max(n + 1);
            self.tail.items.insert(n, item.clone());
            self.tail.ids.insert(item.id.clone(), (Some(n), position));
            for (table, &code) in item.codes.iter().enumerate() {
                if let Some(buckets) = self.tail.buckets.get_mut(table) {
                    buckets.entry(code).or_default().push(n);
                }
            }
        }
        self.tail.operations += batch.items.len() + batch.removals.len();
        self.tail.batches.push_back((position, batch));
    }

    /// The logged batches not yet applied, with their positions, oldest first, at most about
    /// `max_operations` item writes and removals (never none when any are pending).
    pub(crate) fn unapplied(&self, max_operations: usize) -> Vec<(Position, Arc<StoreBatch>)> {
        let mut taken = 0;
        let mut out = Vec::new();
        for (position, batch) in &self.tail.batches {
            if !out.is_empty() && taken + batch.items.len() + batch.removals.len() > max_operations {
                break;
            }
            taken += batch.items.len() + batch.removals.len();
            out.push((*position, batch.clone()));
        }
        out
    }

    /// Forgets the batches up to `position`: the store holds them now.
    pub(crate) fn applied(&mut self, position: Position) {
        // Each touched bucket is filtered once, not once per item leaving it: a group of 131k
        // items would otherwise scan each bucket's tail list once per member (measured: 8% of
        // the applier's time, under the state's write lock, which queries wait on).
        let mut touched: HashSet<(usize, u64)> = HashSet::new();
        while let Some((p, _)) = self.tail.batches.front()
            && *p <= position
        {
            let Some((_, batch)) = self.tail.batches.pop_front() else { break };
            self.tail.operations -= batch.items.len() + batch.removals.len();
            for item in &batch.items {
                self.tail.items.remove(&item.number);
                self.forget_id(&item.id, position);
                touched.extend(item.codes.iter().enumerate().map(|(table, &code)| (table, code)));
            }
            for removal in &batch.removals {
                if let Some(id) = &removal.deleted_id {
                    self.forget_id(id, position);
                }
            }
        }
        for (table, code) in touched {
            let Some(buckets) = self.tail.buckets.get_mut(table) else { continue };
            if let Some(members) = buckets.get_mut(&code) {
                members.retain(|m| self.tail.items.contains_key(m));
                if members.is_empty() {
                    buckets.remove(&code);
                }
            }
        }
    }

    /// Maximal runs of items that the store holds as removed, around each of `removed` (items
    /// just removed by an applied batch), reaching at most `reach` items to either side: the
    /// records whose space can be given back. Items that only a logged, unapplied batch
    /// removes are left out (after a crash the store holds them live until the batch is
    /// applied again), as are items not yet applied.
    pub(crate) fn reclaimable(&self, removed: &[u32], reach: u32) -> Vec<Range<u32>> {
        let dead = self.removed_in_store();
        let mut removed = removed.to_vec();
        removed.sort_unstable();
        removed.dedup();
        let mut runs: Vec<Range<u32>> = Vec::new();
        for n in removed {
            if !dead(n) || runs.last().is_some_and(|r| r.contains(&n)) {
                continue;
            }
            let mut start = n;
            while start > 0 && n - start < reach && dead(start - 1) {
                start -= 1;
            }
            let mut end = n + 1;
            while end - n <= reach && dead(end) {
                end += 1;
            }
            match runs.last_mut() {
                Some(last) if last.end >= start => last.end = last.end.max(end),
                _ => runs.push(start..end),
            }
        }
        runs
    }

    /// Every maximal run of items that the store holds as removed (what an interrupted or
    /// earlier reclaim may have left).
    pub(crate) fn all_reclaimable(&self) -> Vec<Range<u32>> {
        let dead = self.removed_in_store();
        let mut runs: Vec<Range<u32>> = Vec::new();
        for n in 0..self.applied_next() {
            if !dead(n) {
                continue;
            }
            match runs.last_mut() {
                Some(last) if last.end == n => last.end = n + 1,
                _ => runs.push(n..n + 1),
            }
        }
        runs
    }

    /// The first item number not yet applied (tail items are numbered from it).
    fn applied_next(&self) -> u32 {
        self.tail.items.keys().min().copied().unwrap_or(self.next)
    }

    /// Whether the store holds item `n` as removed: applied, not live, and not removed only by
    /// a logged batch (after a crash the store would hold that one live until it is reapplied).
    fn removed_in_store(&self) -> impl Fn(u32) -> bool + '_ {
        let applied_next = self.applied_next();
        let pending: HashSet<u32> =
            self.tail.batches.iter().flat_map(|(_, b)| b.removals.iter().map(|r| r.number)).collect();
        move |n| n < applied_next && !self.is_live(n) && !pending.contains(&n)
    }

    fn forget_id(&mut self, id: &str, applied: Position) {
        if self.tail.ids.get(id).is_some_and(|(_, p)| *p <= applied) {
            self.tail.ids.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Removal;

    fn write(number: u32, id: &str, codes: &[u64]) -> Arc<ItemWrite> {
        Arc::new(ItemWrite {
            number,
            id: id.into(),
            label: String::new(),
            metadata: HashMap::new(),
            codes: codes.to_vec(),
            sketch: vec![number as u64],
            thumbnail: None,
        })
    }

    #[test]
    fn the_tail_shows_logged_batches_until_they_are_applied() {
        let stored = StoredState { next: 2, count: 2, applied: 0, live: vec![0b11], sketches: vec![10, 11] };
        let mut state = QueryState::new(stored, 2, 1);
        let first = StoreBatch { removals: vec![], items: vec![write(2, "c", &[5, 6]), write(3, "d", &[5, 7])] };
        state.logged(1, Arc::new(first));
        // "a" (item 0) replaced by item 4, "b" (item 1) deleted.
        let second = StoreBatch {
            removals: vec![
                Removal { number: 0, codes: vec![1, 1], deleted_id: None },
                Removal { number: 1, codes: vec![1, 2], deleted_id: Some("b".into()) },
            ],
            items: vec![write(4, "a", &[5, 8])],
        };
        state.logged(2, Arc::new(second));
        assert_eq!((state.count(), state.next(), state.pending()), (3, 5, 5));
        assert_eq!(state.live_words(), [0b11100]);
        assert_eq!(state.sketches(), [10, 11, 2, 3, 4]);
        assert_eq!(state.tail_bucket(0, 5), [2, 3, 4]);
        assert_eq!((state.id("a"), state.id("b"), state.id("z")), (TailId::Live(4), TailId::Deleted, TailId::Unknown));
        assert_eq!(state.unapplied(1).len(), 1, "at least one batch, then only what fits");
        assert_eq!(state.unapplied(100).len(), 2);
        state.applied(1);
        assert_eq!((state.first_pending(), state.pending()), (Some(2), 3));
        assert_eq!(state.tail_bucket(0, 5), [4]);
        assert!(state.tail_item(2).is_none() && state.tail_item(4).is_some());
        state.applied(2);
        assert_eq!((state.first_pending(), state.pending(), state.id("b")), (None, 0, TailId::Unknown));
        assert_eq!(state.live_words(), [0b11100], "liveness stays");
    }

    #[test]
    fn reclaimable_runs_cover_only_what_the_store_holds_as_removed() {
        // Items 0..10 applied; 1, 2, 3 and 6 removed by applied batches; 7 removed by a batch
        // still in the log; 10 and 11 logged, not applied.
        let mut live = 0b11_1111_1111u64;
        for n in [1, 2, 3, 6, 7] {
            live &= !(1 << n);
        }
        let stored = StoredState { next: 10, count: 5, applied: 0, live: vec![live], sketches: vec![] };
        let mut state = QueryState::new(stored, 1, 0);
        let removal = Removal { number: 7, codes: vec![0], deleted_id: Some("h".into()) };
        state.logged(1, Arc::new(StoreBatch { removals: vec![removal], items: vec![write(10, "k", &[0])] }));
        assert_eq!(state.reclaimable(&[2], 8), vec![1..4]);
        assert_eq!(state.reclaimable(&[2], 0), vec![2..3], "reach bounds the run");
        assert_eq!(state.reclaimable(&[6, 3, 2], 8), [1..4, 6..7], "7 is removed only in the log");
        assert!(state.reclaimable(&[7, 10, 5], 8).is_empty(), "logged, not applied, or live");
        assert_eq!(state.all_reclaimable(), [1..4, 6..7]);
    }
}
