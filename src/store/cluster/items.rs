//! Items in the cluster: a batch's writes in the order that keeps every item whole or
//! invisible, deletes, and the reads of a query (buckets, codes, records, embeddings).

use std::collections::HashMap;

use prost::Message;

use super::keys::{self, IdValue, Part};
use super::{AckReport, ClusterStore};
use crate::storage_proto::ItemRecord;
use crate::store::StoreError;

/// An item as a batch writes it (its number is handed out by the store).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedWrite {
    pub id: String,
    pub label: String,
    pub metadata: HashMap<String, String>,
    pub codes: Vec<u64>,
    pub sketch: Vec<u64>,
    /// `None` where the index keeps no embeddings.
    pub vector: Option<Vec<f32>>,
    pub thumbnail: Option<Vec<u8>>,
}

/// What a batch's write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteReport {
    /// Items whose id named an item before (now replaced).
    pub replaced: u32,
    pub ack: AckReport,
}

/// An item's codes (one per table) and sketch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemCodes {
    pub codes: Vec<u64>,
    pub sketch: Vec<u64>,
}

/// An item's record, and its embedding when asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemBody {
    pub id: String,
    pub label: String,
    pub metadata: HashMap<String, String>,
    pub vector: Option<Vec<f32>>,
}

impl ClusterStore {
    /// Writes a batch (ids distinct) and waits for its acknowledgement: item numbers from the
    /// index's sequence; bucket entries and the items' records; then the id keys (the commit);
    /// then the replaced items' records go.
    pub async fn write(&self, uid: u64, items: &[SharedWrite]) -> Result<WriteReport, StoreError> {
        let count = items.len() as u64;
        let last: u64 = self.run(redis::cmd("INCRBY").arg(keys::sequence(uid)).arg(count)).await?;
        if last > u64::from(u32::MAX) {
            return Err(StoreError::ItemNumbersExhausted(format!("uid {uid}")));
        }
        let first = (last - count) as u32 + 1;
        let numbers: Vec<u32> = (first..=last as u32).collect();

        // Buckets: one APPEND per bucket touched.
        let mut buckets: HashMap<(u16, u64), Vec<u32>> = HashMap::new();
        for (item, &number) in items.iter().zip(&numbers) {
            for (table, &code) in item.codes.iter().enumerate() {
                buckets.entry((table as u16, code)).or_default().push(number);
            }
        }
        let mut writes: Vec<(String, redis::Cmd)> = buckets
            .into_iter()
            .map(|((table, code), entries)| {
                let key = keys::bucket(uid, table, code);
                let mut cmd = redis::cmd("APPEND");
                cmd.arg(&key).arg(keys::encode_numbers(&entries));
                (key, cmd)
            })
            .collect();

        // Records: unseen until an id names them, so sent with the bucket entries, in one
        // round trip (no order between them matters before the commit). An item's parts share
        // its slot: one MSET each (one command for the primary and its replicas, not four).
        for (item, &number) in items.iter().zip(&numbers) {
            let record = ItemRecord {
                id: item.id.clone(),
                label: item.label.clone(),
                metadata: item.metadata.clone(),
                codes: Vec::new(),
            };
            let key = keys::item(uid, number, Part::Codes);
            let mut cmd = redis::cmd("MSET");
            cmd.arg(&key).arg(keys::encode_codes(&item.codes, &item.sketch));
            cmd.arg(keys::item(uid, number, Part::Record)).arg(record.encode_to_vec());
            if let Some(vector) = &item.vector {
                cmd.arg(keys::item(uid, number, Part::Vector)).arg(crate::store::keys::encode_f32s(vector));
            }
            if let Some(thumbnail) = &item.thumbnail {
                cmd.arg(keys::item(uid, number, Part::Thumbnail)).arg(thumbnail.as_slice());
            }
            writes.push((key, cmd));
        }
        self.run_grouped(writes).await?;
        crate::failpoint::crash_point("cluster-records-written");

        // The commit: each id names its new item unless it names a newer one already, or a
        // delete left a tombstone of a newer one (a compare-and-set, so that a commit sent
        // twice, by a retry after a lost reply or a pipeline re-sent after a moved slot,
        // changes nothing the second time, even after a delete of the id in between).
        let commits = items
            .iter()
            .zip(&numbers)
            .map(|(item, &number)| {
                let key = keys::id(uid, &item.id);
                let cmd = commit_command(&key, number);
                (key, cmd)
            })
            .collect();
        let outcomes: Vec<(i64, i64)> = decode_all(self.run_grouped(commits).await?)?;
        crate::failpoint::crash_point("cluster-ids-written");
        let mut replaced = Vec::new();
        let mut superseded = Vec::new();
        let mut added = 0i64;
        for (&(named, set), &number) in outcomes.iter().zip(&numbers) {
            match (set, named) {
                // New, or after a delete's tombstone.
                (1, previous) if previous <= 0 => added += 1,
                (1, previous) => replaced.push(previous as u32),
                // Already ours (a repeated commit): what it replaced was counted the first time.
                (_, current) if current == i64::from(number) => {}
                // A newer item of this id was committed meanwhile (by another replica), or ours
                // was committed and deleted since (the delete's tombstone): its records go
                // (again; removing them twice is harmless).
                _ => superseded.push(number),
            }
        }
        let count = replaced.len() as u32;
        replaced.extend(superseded);
        self.forget(uid, &replaced, added).await?;
        let ack = self.acknowledge().await?;
        Ok(WriteReport { replaced: count, ack })
    }

    /// Deletes the items these ids name; returns how many existed.
    pub async fn delete(&self, uid: u64, ids: &[String]) -> Result<(usize, AckReport), StoreError> {
        let removals = ids
            .iter()
            .map(|id| {
                let key = keys::id(uid, id);
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(DELETE).arg(1).arg(&key).arg(keys::TOMBSTONE_SECS);
                (key, cmd)
            })
            .collect();
        let outcomes: Vec<i64> = decode_all(self.run_grouped(removals).await?)?;
        // A tombstone found (negative) may be this delete's own, run before its reply was
        // lost: the item's records go all the same (again, if they went already), uncounted.
        let removed = outcomes.iter().filter(|&&n| n > 0).count();
        let gone: Vec<u32> = outcomes.iter().filter(|&&n| n != 0).map(|n| n.unsigned_abs() as u32).collect();
        self.forget(uid, &gone, -(removed as i64)).await?;
        let ack = self.acknowledge().await?;
        Ok((removed, ack))
    }

    /// Removes the records of items no id names any more (invisible already) and moves the
    /// live count by `delta`.
    async fn forget(&self, uid: u64, numbers: &[u32], delta: i64) -> Result<(), StoreError> {
        let cmds: Vec<(String, redis::Cmd)> = numbers
            .iter()
            .map(|&number| {
                // All parts share the item's slot: one command.
                let mut cmd = redis::cmd("UNLINK");
                Part::ALL.iter().for_each(|&part| {
                    cmd.arg(keys::item(uid, number, part));
                });
                (keys::item(uid, number, Part::Codes), cmd)
            })
            .collect();
        self.run_grouped(cmds).await?;
        if delta != 0 {
            // Alone, not in a pipeline that a moved slot would send again.
            self.run::<i64>(redis::cmd("INCRBY").arg(keys::count(uid)).arg(delta)).await?;
        }
        Ok(())
    }

    /// The item numbers in each of these buckets, in order (entries of dead items included).
    pub async fn buckets(&self, uid: u64, wanted: &[(u16, u64)]) -> Result<Vec<Vec<u32>>, StoreError> {
        let keys: Vec<String> = wanted.iter().map(|&(table, code)| keys::bucket(uid, table, code)).collect();
        let values = self.mget(keys).await?;
        Ok(values.into_iter().map(|v| v.map_or_else(Vec::new, |b| keys::decode_numbers(&b).collect())).collect())
    }

    /// The codes and sketches of these items (`None`: no such item); a value of another shape
    /// is damage.
    pub async fn codes(
        &self,
        uid: u64,
        numbers: &[u32],
        tables: usize,
        words: usize,
    ) -> Result<Vec<Option<ItemCodes>>, StoreError> {
        let keys = numbers.iter().map(|&n| keys::item(uid, n, Part::Codes)).collect();
        let values = self.mget(keys).await?;
        values
            .into_iter()
            .zip(numbers)
            .map(|(value, number)| {
                value
                    .map(|bytes| {
                        keys::decode_codes(&bytes, tables, words)
                            .map(|(codes, sketch)| ItemCodes { codes, sketch })
                            .ok_or_else(|| StoreError::Corrupt(format!("codes of item {number} (uid {uid})")))
                    })
                    .transpose()
            })
            .collect()
    }

    /// The records of these items (`None`: no such item), with their embeddings when asked:
    /// one `MGET` per item (its parts share a slot).
    pub async fn bodies(&self, uid: u64, numbers: &[u32], vectors: bool) -> Result<Vec<Option<ItemBody>>, StoreError> {
        let gets = numbers
            .iter()
            .map(|&number| {
                let key = keys::item(uid, number, Part::Record);
                let mut cmd = redis::cmd("MGET");
                cmd.arg(&key);
                if vectors {
                    cmd.arg(keys::item(uid, number, Part::Vector));
                }
                (key, cmd)
            })
            .collect();
        let values: Vec<Vec<Option<Vec<u8>>>> = decode_all(self.run_grouped(gets).await?)?;
        let mut bodies = Vec::with_capacity(numbers.len());
        for parts in values {
            let mut parts = parts.into_iter();
            let Some(record) = parts.next().flatten() else {
                bodies.push(None);
                continue;
            };
            let record = ItemRecord::decode(record.as_slice())?;
            let vector = parts.next().flatten().map(|v| crate::store::keys::decode_f32s(&v));
            bodies.push(Some(ItemBody { id: record.id, label: record.label, metadata: record.metadata, vector }));
        }
        Ok(bodies)
    }

    /// The item number each id names now (`None`: none, or deleted).
    pub async fn numbers(&self, uid: u64, ids: &[&str]) -> Result<Vec<Option<u32>>, StoreError> {
        let keys = ids.iter().map(|id| keys::id(uid, id)).collect();
        let values = self.mget(keys).await?;
        values
            .into_iter()
            .map(|value| match value.as_deref().map(keys::parse_id_value) {
                None | Some(Some(IdValue::Deleted(_))) => Ok(None),
                Some(Some(IdValue::Names(number))) => Ok(Some(number)),
                Some(None) => Err(StoreError::Corrupt(format!("an id key of uid {uid} holds no item number"))),
            })
            .collect()
    }

    /// Whether each item's id still names it (committed, neither replaced nor deleted since),
    /// given its record as read (`None`: no record, so no).
    pub async fn still_named(
        &self,
        uid: u64,
        numbers: &[u32],
        bodies: &[Option<ItemBody>],
    ) -> Result<Vec<bool>, StoreError> {
        let ids: Vec<&str> = bodies.iter().flatten().map(|b| b.id.as_str()).collect();
        let mut named = self.numbers(uid, &ids).await?.into_iter();
        Ok(numbers
            .iter()
            .zip(bodies)
            .map(|(&number, body)| body.is_some() && named.next().flatten() == Some(number))
            .collect())
    }

    pub async fn thumbnails(&self, uid: u64, numbers: &[u32]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.mget(numbers.iter().map(|&n| keys::item(uid, n, Part::Thumbnail)).collect()).await
    }

    /// Live items (as counted by writes and deletes; `check --repair` recounts).
    pub async fn count(&self, uid: u64) -> Result<u64, StoreError> {
        let count: Option<i64> = self.run(redis::cmd("GET").arg(keys::count(uid))).await?;
        Ok(count.unwrap_or(0).max(0) as u64)
    }

    /// The values of these keys (`None`: no such key): `GET`s in one pipeline per primary.
    async fn mget(&self, keys: Vec<String>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let gets = keys
            .into_iter()
            .map(|key| {
                let mut cmd = redis::cmd("GET");
                cmd.arg(&key);
                (key, cmd)
            })
            .collect();
        decode_all(self.run_grouped(gets).await?)
    }
}

/// Sets the id key KEYS[1] to item ARGV[1] unless it names a newer (or the same) item or holds
/// the tombstone of one; returns {what it held before (a number, a negated number for a
/// tombstone, or 0), 1 if set else 0}. `SET` drops the tombstone's expiry.
const COMMIT: &str = r#"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local number = tonumber(ARGV[1])
if math.abs(current) >= number then return {current, 0} end
redis.call('SET', KEYS[1], ARGV[1])
return {current, 1}
"#;

/// The commit of one id (its key, `keys::id`): it names item `number` unless it names a newer
/// one or holds a newer one's tombstone. Replies {what the key held (0: nothing; negative: a
/// tombstone), 1 if set else 0}. Public so that a test can send a commit again, as a lost
/// reply or a moved slot makes the crate do.
pub fn commit_command(id_key: &str, number: u32) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(COMMIT).arg(1).arg(id_key).arg(number);
    cmd
}

/// Replaces the item number in the id key KEYS[1] by its tombstone for ARGV[1] seconds;
/// returns the number it named, the tombstone's (negative) when deleted already (a repeat
/// changes nothing), or 0 when the id names nothing.
const DELETE: &str = r#"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current <= 0 then return current end
redis.call('SET', KEYS[1], '-' .. current, 'EX', ARGV[1])
return current
"#;

/// Replies as values of one type; one of another type is damage.
fn decode_all<T: redis::FromRedisValue>(replies: Vec<redis::Value>) -> Result<Vec<T>, StoreError> {
    replies
        .into_iter()
        .map(|reply| {
            redis::from_redis_value(reply)
                .map_err(|e| StoreError::Corrupt(format!("a reply of the cluster store: {e}")))
        })
        .collect()
}
