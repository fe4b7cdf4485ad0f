//! Commands of many slots sent as one pipeline per primary: the crate's cluster pipelines
//! refuse keys of several slots and its `MGET` becomes one request per slot, which at a
//! batch's few thousand keys is what writes and queries would cost. So the store groups
//! single-key commands by the primary that serves their slot (from `CLUSTER SLOTS`), and sends
//! each group through the crate, routed by its first key's slot. A group that meets a moved
//! slot or a failover is answered with an error: the map is read again and the commands
//! regrouped, a few times, before the batch fails. Groups that answered keep their replies
//! and only the others are sent again, but a group whose connection broke may have run before
//! its reply was lost (and the crate re-sends a whole group to a MOVED target), so only
//! commands that a repeat leaves right go this way: `GET`, `SET` of a record, `UNLINK`, `APPEND` of bucket
//! entries (a repeated entry counts once per table, and `check --repair` removes it), the
//! commit's compare-and-set (a repeat finds its own number, or the tombstone a delete left
//! of it, and changes nothing), the delete's swap of a number for its tombstone (a repeat finds
//! the tombstone: the item's records are removed all the same, but the delete reports and
//! counts fewer ids than it removed; `check --repair` recounts). Counters go alone.

use std::sync::{Arc, RwLock};

use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Value};

use super::{ClusterStore, backend};
use crate::store::StoreError;

pub const SLOTS: usize = 16384;
/// Rounds of regrouping after a moved slot or a lost node before a batch fails.
const ROUNDS: usize = 4;

/// The Redis Cluster slot of a key: CRC16 (XMODEM) of its hash tag (the text between the
/// first `{` and the next `}`, when not empty), or of the whole key.
pub fn slot_of(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter().position(|&b| b == b'}').map(|close| &rest[..close])
        })
        .filter(|tag| !tag.is_empty());
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS as u16
}

/// Which primary serves each slot, as `CLUSTER SLOTS` said when last read.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotMap {
    /// Index into `nodes`, per slot (`u16::MAX`: no primary).
    owners: Vec<u16>,
    nodes: Vec<String>,
}

impl SlotMap {
    /// Reads a `CLUSTER SLOTS` reply: `[start, end, [host, port, …], replicas…]` per range.
    pub fn parse(reply: &Value) -> Option<Self> {
        let Value::Array(ranges) = reply else { return None };
        let mut map = SlotMap { owners: vec![u16::MAX; SLOTS], nodes: Vec::new() };
        for range in ranges {
            let Value::Array(fields) = range else { return None };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return None;
            };
            let host = match primary.first()? {
                Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                Value::SimpleString(text) => text.clone(),
                _ => return None,
            };
            let Value::Int(port) = primary.get(1)? else { return None };
            let node = format!("{host}:{port}");
            let index = match map.nodes.iter().position(|n| *n == node) {
                Some(i) => i,
                None => {
                    map.nodes.push(node);
                    map.nodes.len() - 1
                }
            };
            let (start, end) = (usize::try_from(*start).ok()?, usize::try_from(*end).ok()?);
            if start > end || end >= SLOTS {
                return None;
            }
            map.owners[start..=end].iter_mut().for_each(|o| *o = index as u16);
        }
        Some(map)
    }

    fn owner(&self, slot: u16) -> u16 {
        self.owners[slot as usize]
    }
}

/// The slot map a store shares between its clones.
#[derive(Default)]
pub struct SharedSlotMap(RwLock<Option<Arc<SlotMap>>>);

impl ClusterStore {
    async fn slot_map(&self, refresh: bool) -> Result<Arc<SlotMap>, StoreError> {
        if !refresh && let Some(map) = self.slots.0.read().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(map);
        }
        let reply: Value = self.run(redis::cmd("CLUSTER").arg("SLOTS")).await?;
        let map =
            Arc::new(SlotMap::parse(&reply).ok_or_else(|| {
                StoreError::Unavailable("the cluster answered CLUSTER SLOTS with no slot map".into())
            })?);
        *self.slots.0.write().unwrap_or_else(|e| e.into_inner()) = Some(map.clone());
        Ok(map)
    }

    /// Runs single-key commands (each with its key) as one pipeline per primary, concurrently;
    /// the replies in order. A reply that is an error fails the call.
    pub(super) async fn run_grouped(&self, cmds: Vec<(String, Cmd)>) -> Result<Vec<Value>, StoreError> {
        let slots: Vec<u16> = cmds.iter().map(|(key, _)| slot_of(key.as_bytes())).collect();
        let mut replies: Vec<Option<Value>> = vec![None; cmds.len()];
        let mut unanswered: Vec<usize> = (0..cmds.len()).collect();
        let mut last_error = None;
        for round in 0..ROUNDS {
            if unanswered.is_empty() {
                break;
            }
            let map = self.slot_map(round > 0).await?;
            let failed = self.send_grouped(&map, &cmds, &slots, &unanswered, &mut replies).await.map_err(backend)?;
            match failed {
                Some(Unanswered { positions, error }) => {
                    tracing::debug!(%error, round, "cluster topology changed under a batch; regrouping");
                    unanswered = positions;
                    last_error = Some(error);
                }
                None => unanswered.clear(),
            }
        }
        if !unanswered.is_empty() {
            return Err(last_error
                .map_or_else(|| StoreError::Unavailable("the cluster topology keeps changing".into()), backend));
        }
        Ok(replies.into_iter().map(|reply| reply.unwrap_or(Value::Nil)).collect())
    }

    /// Sends the commands at `positions`, one pipeline per primary, and keeps the replies of
    /// the groups that answered; the groups that met a moved slot or a lost node come back
    /// to be sent again (only they: a commit's or a delete's first reply says what it
    /// changed, a repeat's would not). Any other error fails the call.
    async fn send_grouped(
        &self,
        map: &SlotMap,
        cmds: &[(String, Cmd)],
        slots: &[u16],
        positions: &[usize],
        replies: &mut [Option<Value>],
    ) -> redis::RedisResult<Option<Unanswered>> {
        // Per primary: its pipeline, the positions of its commands, a slot it serves.
        let mut groups: Vec<(redis::Pipeline, Vec<usize>, u16)> = Vec::new();
        let mut group_of: Vec<Option<usize>> = vec![None; map.nodes.len() + 1];
        for &i in positions {
            let slot = slots[i];
            // Slots no primary serves go together, to the slot's route (the crate finds one or fails).
            let owner = map.owner(slot).min(map.nodes.len() as u16) as usize;
            let g = *group_of[owner].get_or_insert_with(|| {
                groups.push((redis::pipe(), Vec::new(), slot));
                groups.len() - 1
            });
            groups[g].0.add_command(cmds[i].1.clone());
            groups[g].1.push(i);
        }
        let sends = groups.into_iter().map(|(pipe, positions, slot)| {
            let mut connection = self.connection.clone();
            async move {
                let count = positions.len();
                let route = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
                let answer = connection.route_pipeline(pipe, 0, count, route).await.and_then(|values| {
                    match values.iter().find_map(|v| if let Value::ServerError(e) = v { Some(e.clone()) } else { None })
                    {
                        Some(e) => Err(e.into()),
                        None => Ok(values),
                    }
                });
                (positions, answer)
            }
        });
        let mut unanswered: Option<Unanswered> = None;
        for (positions, answer) in futures::future::join_all(sends).await {
            match answer {
                Ok(values) => {
                    for (position, value) in positions.into_iter().zip(values) {
                        replies[position] = Some(value);
                    }
                }
                Err(error) if is_redirect_or_lost(&error) => match &mut unanswered {
                    Some(u) => u.positions.extend(positions),
                    None => unanswered = Some(Unanswered { positions, error }),
                },
                Err(error) => return Err(error),
            }
        }
        Ok(unanswered)
    }
}

/// The commands of a round whose groups met a moved slot or a lost node, and one such error.
struct Unanswered {
    positions: Vec<usize>,
    error: redis::RedisError,
}

/// A slot served elsewhere now, or a node gone: worth reading the slot map again.
fn is_redirect_or_lost(e: &redis::RedisError) -> bool {
    e.is_cluster_error() || e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_cluster_spec() {
        // The specification's check value, and hash tags.
        assert_eq!(slot_of(b"123456789"), 12739);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"{user1000}.followers"));
        assert_eq!(slot_of(b"foo{}{bar}"), crc16::State::<crc16::XMODEM>::calculate(b"foo{}{bar}") % 16384);
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
        assert_eq!(slot_of(b"foo{bar}{zap}"), slot_of(b"bar"));
    }

    #[test]
    fn a_cluster_slots_reply_maps_every_slot_to_its_primary() {
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(5460), node(7000), node(7003)]),
            Value::Array(vec![Value::Int(5461), Value::Int(10922), node(7001)]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node(7000)]),
        ]);
        let map = SlotMap::parse(&reply).expect("a map");
        assert_eq!(map.nodes, ["127.0.0.1:7000", "127.0.0.1:7001"]);
        assert_eq!((map.owner(0), map.owner(5461), map.owner(16383)), (0, 1, 0));
        assert_eq!(
            SlotMap::parse(&Value::Array(vec![Value::Array(vec![Value::Int(3), Value::Int(1), node(1)])])),
            None
        );
    }
}
