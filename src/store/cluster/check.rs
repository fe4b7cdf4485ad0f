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
                    _ => dangling.push(id.clone()),
                }
            }
        }
        let mut problems = ClusterProblems { dangling_ids: dangling.len() as u64, ..Default::default() };
        let orphans: Vec<u32> = with_records.iter().filter(|n| !live.contains_key(n)).copied().collect();
        problems.orphan_records = orphans.len() as u64;
        // Entries by bucket: stale ones to take out, and which live items each bucket holds.
        let mut stale: Vec<((u16, u64), Vec<u32>)> = Vec::new();
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
                    gone.push(number);
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
            self.repair(uid, &orphans, &stale, &missing, &dangling, live.len() as u64).await?;
            report.repaired = true;
        }
        Ok(report)
    }

    async fn repair(
        &self,
        uid: u64,
        orphans: &[u32],
        stale: &[((u16, u64), Vec<u32>)],
        missing: &[(u16, u64, u32)],
        dangling: &[String],
        count: u64,
    ) -> Result<(), StoreError> {
        // Records still unnamed after the grace (read again: a writer may have committed one).
        let mut still: Vec<u32> = Vec::new();
        for chunk in orphans.chunks(PAGE) {
            let bodies = self.bodies(uid, chunk, false).await?;
            let named_ids: Vec<&str> = bodies.iter().flatten().map(|b| b.id.as_str()).collect();
            let named = self.numbers(uid, &named_ids).await?;
            let mut named = named.into_iter();
            for (&number, body) in chunk.iter().zip(&bodies) {
                let now_named = body.is_some() && named.next().flatten() == Some(number);
                if !now_named {
                    still.push(number);
                }
            }
        }
        let still_set: HashSet<u32> = still.iter().copied().collect();
        let mut cmds = Vec::new();
        for &number in &still {
            let mut cmd = redis::cmd("UNLINK");
            Part::ALL.iter().for_each(|&part| {
                cmd.arg(keys::item(uid, number, part));
            });
            cmds.push(cmd);
        }
        for ((table, code), numbers) in stale {
            // Entries of orphans not yet removable stay (a writer may be committing them).
            let removable: Vec<u32> =
                numbers.iter().filter(|n| still_set.contains(n) || !orphans.contains(n)).copied().collect();
            if removable.is_empty() {
                continue;
            }
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(REMOVE_ENTRIES).arg(1).arg(keys::bucket(uid, *table, *code)).arg(keys::encode_numbers(&removable));
            cmds.push(cmd);
        }
        for &(table, code, number) in missing {
            let mut cmd = redis::cmd("APPEND");
            cmd.arg(keys::bucket(uid, table, code)).arg(keys::encode_numbers(&[number]));
            cmds.push(cmd);
        }
        for id in dangling {
            let mut cmd = redis::cmd("UNLINK");
            cmd.arg(keys::id(uid, id));
            cmds.push(cmd);
        }
        let mut cmd = redis::cmd("SET");
        cmd.arg(keys::count(uid)).arg(count);
        self.run_all::<redis::Value>(cmds).await?;
        self.run::<()>(&cmd).await?;
        self.acknowledge().await.map(drop)
    }
}

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
