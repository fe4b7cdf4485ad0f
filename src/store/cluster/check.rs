//! `imagelsh check --store redis://…`: a pass over every key of an index, finding what the
//! write order leaves behind (records no id names, bucket entries of dead items), and what
//! would be damage (an id naming an item without records, an item missing from a bucket).
//!
//! Writers may be running: an item being written has records (and bucket entries) before its
//! id names it. So repair removes a record or an entry only if it is still unnamed after
//! `grace`, read again; ingests commit in milliseconds after their records.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::keys::{self, KeyKind, Part};
use super::{ClusterIndex, ClusterStore};
use crate::store::StoreError;

/// Keys per `MGET` of the pass.
const PAGE: usize = 1000;

/// What a check found (and repaired, with `repair`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterProblems {
    /// Items whose records no id names: left by an ingest that stopped before its commit, or
    /// by a replace or delete that stopped before removing them. Invisible to queries.
    pub orphan_records: u64,
    /// Bucket entries of items that are dead, or whose codes are elsewhere. Invisible too.
    pub stale_entries: u64,
    /// Ids that name an item without records (damage: the item is lost).
    pub dangling_ids: u64,
    /// Live items missing from a bucket of theirs (damage: fewer votes; repair adds them).
    pub missing_entries: u64,
    /// The live count, when it is wrong: (counted, stored).
    pub count: Option<(u64, u64)>,
}

impl ClusterProblems {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone)]
pub struct ClusterCheck {
    pub index: String,
    pub items: u64,
    pub bucket_entries: u64,
    pub problems: ClusterProblems,
    pub repaired: bool,
}

impl ClusterStore {
    /// Checks an index, and with `repair` removes what no query sees and fixes what it can.
    pub async fn check(&self, index: &ClusterIndex, repair: bool, grace: Duration) -> Result<ClusterCheck, StoreError> {
        let (uid, tables, words) = (index.uid, index.def.tables as usize, index.def.sketch_bits as usize / 64);
        let mut ids = Vec::new();
        let mut with_records: HashSet<u32> = HashSet::new();
        let mut buckets: Vec<(u16, u64)> = Vec::new();
        let mut scan = self.scan(uid).await?;
        while let Some(page) = scan.next_page().await? {
            for key in page {
                match keys::parse(uid, &key) {
                    Some(KeyKind::Id(id)) => ids.push(id),
                    Some(KeyKind::Item { number, .. }) => {
                        with_records.insert(number);
                    }
                    Some(KeyKind::Bucket { table, code }) => buckets.push((table, code)),
                    Some(KeyKind::Other) | None => {}
                }
            }
        }
        // Live items: named by an id, with codes.
        let mut live: HashMap<u32, Vec<u64>> = HashMap::new();
        let mut dangling = Vec::new();
        for chunk in ids.chunks(PAGE) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let numbers = self.numbers(uid, &refs).await?;
            let named: Vec<u32> = numbers.iter().flatten().copied().collect();
            let codes = self.codes(uid, &named, tables, words).await?;
            let mut codes = named.iter().zip(codes);
            for (id, number) in chunk.iter().zip(numbers) {
                let Some(number) = number else { continue };
                match codes.next() {
                    Some((_, Some(item))) => {
                        live.insert(number, item.codes);
                    }
                    _ => dangling.push((id.clone(), number)),
                }
            }
        }
        let mut problems = ClusterProblems { dangling_ids: dangling.len() as u64, ..Default::default() };
        let orphans: Vec<u32> = with_records.iter().filter(|n| !live.contains_key(n)).copied().collect();
        problems.orphan_records = orphans.len() as u64;
        // Entries by bucket: stale ones to take out, and which live items each bucket holds.
        let mut stale: Vec<((u16, u64), Vec<StaleEntry>)> = Vec::new();
        let mut present: HashSet<(u16, u32)> = HashSet::new();
        let mut entries = 0u64;
        for chunk in buckets.chunks(PAGE) {
            for (&(table, code), numbers) in chunk.iter().zip(self.buckets(uid, chunk).await?) {
                entries += numbers.len() as u64;
                let mut gone = Vec::new();
                for number in numbers {
                    let belongs = live.get(&number).is_some_and(|codes| codes.get(table as usize) == Some(&code));
                    if belongs && present.insert((table, number)) {
                        continue;
                    }
                    gone.push(StaleEntry { number, duplicate: belongs });
                }
                if !gone.is_empty() {
                    problems.stale_entries += gone.len() as u64;
                    stale.push(((table, code), gone));
                }
            }
        }
        let mut missing: Vec<(u16, u64, u32)> = Vec::new();
        for (&number, codes) in &live {
            for (table, &code) in codes.iter().enumerate() {
                if !present.contains(&(table as u16, number)) {
                    missing.push((table as u16, code, number));
                }
            }
        }
        problems.missing_entries = missing.len() as u64;
        let stored = self.count(uid).await?;
        if stored != live.len() as u64 {
            problems.count = Some((live.len() as u64, stored));
        }
        let mut report = ClusterCheck {
            index: index.def.name.clone(),
            items: live.len() as u64,
            bucket_entries: entries,
            problems,
            repaired: false,
        };
        if repair && !report.problems.is_empty() {
            tokio::time::sleep(grace).await;
            let found = Found { orphans, stale, missing, dangling, count: (live.len() as u64, stored) };
            self.repair(uid, tables, words, &found).await?;
            report.repaired = true;
        }
        Ok(report)
    }

    /// Which of `numbers` are live now: named by the id in their record, with codes.
    async fn live_now(
        &self,
        uid: u64,
        numbers: &[u32],
        tables: usize,
        words: usize,
    ) -> Result<HashMap<u32, Vec<u64>>, StoreError> {
        let mut live = HashMap::new();
        for chunk in numbers.chunks(PAGE) {
            let bodies = self.bodies(uid, chunk, false).await?;
            let still = self.still_named(uid, chunk, &bodies).await?;
            let named: Vec<u32> = chunk.iter().zip(still).filter_map(|(&n, named)| named.then_some(n)).collect();
            for (number, codes) in named.iter().zip(self.codes(uid, &named, tables, words).await?) {
                if let Some(codes) = codes {
                    live.insert(*number, codes.codes);
                }
            }
        }
        Ok(live)
    }

    /// Repairs what a check found, after reading again what a writer may have changed since:
    /// records and entries of items committed meanwhile stay; an id is removed only if it
    /// still names the item without records.
    async fn repair(&self, uid: u64, tables: usize, words: usize, found: &Found) -> Result<(), StoreError> {
        let mut questioned: Vec<u32> = found.orphans.clone();
        questioned.extend(found.stale.iter().flat_map(|(_, entries)| entries.iter().map(|e| e.number)));
        questioned.sort_unstable();
        questioned.dedup();
        let live = self.live_now(uid, &questioned, tables, words).await?;
        let mut cmds = Vec::new();
        for number in found.orphans.iter().filter(|n| !live.contains_key(n)) {
            let mut cmd = redis::cmd("UNLINK");
            Part::ALL.iter().for_each(|&part| {
                cmd.arg(keys::item(uid, *number, part));
            });
            cmds.push(cmd);
        }
        for ((table, code), entries) in &found.stale {
            let belongs = |n: u32| live.get(&n).is_some_and(|codes| codes.get(*table as usize) == Some(code));
            // A second entry of a live item goes (one occurrence); an entry of an item live now
            // with this code stays.
            let removable: Vec<u32> =
                entries.iter().filter(|e| e.duplicate || !belongs(e.number)).map(|e| e.number).collect();
            if removable.is_empty() {
                continue;
            }
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(REMOVE_ENTRIES).arg(1).arg(keys::bucket(uid, *table, *code)).arg(keys::encode_numbers(&removable));
            cmds.push(cmd);
        }
        for &(table, code, number) in &found.missing {
            let mut cmd = redis::cmd("APPEND");
            cmd.arg(keys::bucket(uid, table, code)).arg(keys::encode_numbers(&[number]));
            cmds.push(cmd);
        }
        for (id, number) in &found.dangling {
            // Only if it still names that item: a client may have ingested the id again.
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(REMOVE_IF_NAMES).arg(1).arg(keys::id(uid, id)).arg(*number).arg(keys::TOMBSTONE_SECS);
            cmds.push(cmd);
        }
        self.run_all::<redis::Value>(cmds).await?;
        // By the difference found, so that writes meanwhile keep their counts.
        let (counted, stored) = found.count;
        if counted != stored {
            let delta = counted as i64 - stored as i64;
            self.run::<i64>(redis::cmd("INCRBY").arg(keys::count(uid)).arg(delta)).await?;
        }
        self.acknowledge().await.map(drop)
    }
}

/// What a check found to repair.
struct Found {
    orphans: Vec<u32>,
    stale: Vec<((u16, u64), Vec<StaleEntry>)>,
    missing: Vec<(u16, u64, u32)>,
    /// Ids naming an item without records, with that item.
    dangling: Vec<(String, u32)>,
    /// Live items counted, and the count stored, when checked.
    count: (u64, u64),
}

/// A bucket entry that no live item accounts for, when checked.
struct StaleEntry {
    number: u32,
    /// A second entry of an item live with this code (the first stays).
    duplicate: bool,
}

/// Replaces the id key KEYS[1] by a tombstone for ARGV[2] seconds if it still names item
/// ARGV[1] (as a delete does: a late commit of that item cannot name it again).
const REMOVE_IF_NAMES: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], '-' .. ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
"#;

/// Takes each entry of ARGV[1] (packed u32) out of the bucket KEYS[1] once, atomically, so
/// that entries appended meanwhile stay. Deletes the bucket when nothing is left.
const REMOVE_ENTRIES: &str = r#"
local bucket = redis.call('GET', KEYS[1])
if not bucket then return 0 end
local remove = {}
for i = 1, #ARGV[1], 4 do
  local e = string.sub(ARGV[1], i, i + 3)
  remove[e] = (remove[e] or 0) + 1
end
local kept, removed = {}, 0
for i = 1, #bucket - 3, 4 do
  local e = string.sub(bucket, i, i + 3)
  if remove[e] and remove[e] > 0 then
    remove[e] = remove[e] - 1
    removed = removed + 1
  else
    kept[#kept + 1] = e
  end
end
if #kept == 0 then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], table.concat(kept)) end
return removed
"#;
