//! The cluster store: every replica's shared index on a Valkey/Redis Cluster (`serve --store
//! redis://h1:p1,h2:p2,…`), spoken through the `redis` crate, which routes each key to its
//! slot's primary, follows MOVED/ASK through a failover, and splits `MGET` by slot.
//!
//! Nothing of an index lives in a replica's memory but what never changes (definition and
//! planes, under a uid that is never reused): item numbers come from `INCRBY`, liveness and
//! sketches are read per query, so no replica's writes can make another replica's state wrong.
//!
//! Layout (`keys`): a batch's bucket entries and its items' records are written first (in one
//! round trip: one pipeline per primary, `slots`), the items' id keys last, and that is the
//! commit. A bucket entry counts only when
//! the item's codes exist and match the bucket, and a record only when its id key names it: an
//! ingest that crashes half-way, a retried batch, a replaced or deleted item leave entries and
//! records that no query sees (`imagelsh check --repair` removes them). No cross-slot
//! transaction is needed.
//!
//! The acknowledgement point is the cluster's: writes, then `WAIT`/`WAITAOF` at the level
//! configured (`AckLevel`); a batch whose replicas fall short is refused as unavailable.

mod check;
mod items;
pub mod keys;
mod nodes;
mod slots;
mod uncatalogued;

use std::time::Duration;

use prost::Message;
use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, RedisError};

pub use check::{ClusterCheck, ClusterProblems};
pub use items::{ItemBody, ItemCodes, SharedWrite, WriteReport, commit_command};
pub use uncatalogued::{Uncatalogued, UncataloguedCheck};

use super::{IndexDef, IndexParams, StoreError, def_of, record_of};
use crate::storage_proto::IndexRecord;

/// What an acknowledged write has reached before its ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckLevel {
    /// The primaries' memory (and their AOF as `appendfsync` says): a failover can lose it.
    Local,
    /// `WAIT 1`: the memory of at least one replica of every primary written.
    #[default]
    Replica,
    /// `WAITAOF 1 1`: fsynced on the primary and on at least one replica (Valkey, Redis ≥ 7.2).
    ReplicaFsync,
}

impl std::str::FromStr for AckLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [AckLevel::Local, AckLevel::Replica, AckLevel::ReplicaFsync]
            .into_iter()
            .find(|level| level.as_str() == s)
            .ok_or_else(|| format!("{s:?}: expected local, replica or replica-fsync"))
    }
}

impl std::fmt::Display for AckLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AckLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            AckLevel::Local => "local",
            AckLevel::Replica => "replica",
            AckLevel::ReplicaFsync => "replica-fsync",
        }
    }
}

/// How the cluster store acknowledges writes.
#[derive(Debug, Clone, Copy)]
pub struct AckPolicy {
    pub level: AckLevel,
    /// How long `WAIT`/`WAITAOF` waits for the replicas before the batch is refused.
    pub timeout: Duration,
}

/// What a write's acknowledgement obtained: the fewest replicas (and, for `ReplicaFsync`, the
/// fewest fsyncs on the primaries) across the primaries asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckReport {
    pub level: AckLevel,
    pub replicas: u32,
}

/// One connection to the cluster (multiplexed, cloned per task) and the ack policy.
#[derive(Clone)]
pub struct ClusterStore {
    connection: ClusterConnection,
    ack: AckPolicy,
    /// Which primary serves each slot, to send a batch's commands in one pipeline per primary.
    slots: std::sync::Arc<slots::SharedSlotMap>,
}

/// An index as the catalog names it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterIndex {
    pub def: IndexDef,
    pub uid: u64,
    /// Its catalog entry as stored (a drop removes exactly this one).
    record: Vec<u8>,
}

/// The matrices an index was created with.
#[derive(Debug, Clone, Default)]
pub struct IndexMatrices {
    pub hyperplanes: Vec<f32>,
    pub center: Option<Vec<f32>>,
    pub sketch_planes: Option<Vec<f32>>,
}

/// The seed nodes of a `redis://h1:p1,h2:p2` URL, as `redis://h:p` each.
pub fn seed_nodes(url: &str) -> Result<Vec<String>, StoreError> {
    let hosts = url
        .strip_prefix("redis://")
        .ok_or_else(|| StoreError::Backend(format!("{url:?} is not a redis:// URL of cluster nodes").into()))?;
    let seeds: Vec<String> =
        hosts.split(',').map(str::trim).filter(|h| !h.is_empty()).map(|h| format!("redis://{h}")).collect();
    if seeds.is_empty() {
        return Err(StoreError::Backend(format!("{url:?} names no cluster node").into()));
    }
    Ok(seeds)
}

impl ClusterStore {
    /// Connects to the cluster that `url` (`redis://h1:p1,h2:p2,…`) seeds, and checks that its
    /// servers can give the acknowledgement asked for.
    pub async fn connect(url: &str, ack: AckPolicy) -> Result<Self, StoreError> {
        let seeds = seed_nodes(url)?;
        let client = redis::cluster::ClusterClientBuilder::new(seeds)
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(Duration::from_secs(10) + ack.timeout)
            // A failover takes the node timeout (seconds) to promote a replica: retries with
            // back-off cover it, and a batch that still fails is refused as unavailable.
            .retries(8)
            .build()
            .map_err(backend)?;
        let connection = client.get_async_connection().await.map_err(backend)?;
        let store = Self { connection, ack, slots: Default::default() };
        if ack.level == AckLevel::ReplicaFsync && !store.has_command("WAITAOF").await? {
            return Err(StoreError::Backend(
                "--ack replica-fsync needs WAITAOF (Valkey, or Redis 7.2 or later); this cluster's servers lack it: \
                 use --ack replica, or upgrade them"
                    .into(),
            ));
        }
        Ok(store)
    }

    /// Runs one command (routed by the crate: by key, or to every primary for WAIT).
    async fn run<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        cmd.query_async(&mut connection).await.map_err(backend)
    }

    /// Runs commands concurrently on the multiplexed connections (one round trip per node
    /// involved, whatever their number); the first failure fails them all.
    async fn run_all<T: FromRedisValue>(&self, cmds: Vec<Cmd>) -> Result<Vec<T>, StoreError> {
        let calls = cmds.into_iter().map(|cmd| {
            let mut connection = self.connection.clone();
            async move { cmd.query_async::<T>(&mut connection).await }
        });
        futures::future::try_join_all(calls).await.map_err(backend)
    }

    async fn has_command(&self, name: &str) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("COMMAND");
        cmd.arg("INFO").arg(name);
        let mut connection = self.connection.clone();
        let value = connection.req_packed_command(&cmd).await.map_err(backend)?;
        // An array with one entry: the command's description, or nil where it does not exist.
        Ok(match value {
            redis::Value::Array(entries) => entries.first().is_some_and(|e| !matches!(e, redis::Value::Nil)),
            _ => false,
        })
    }

    /// Creates an index: its matrices first, the catalog entry last (`HSETNX`, so two
    /// replicas creating one name cannot both succeed).
    pub async fn create(&self, def: &IndexDef, params: IndexParams<'_>) -> Result<ClusterIndex, StoreError> {
        if self.find(&def.name).await?.is_some() {
            return Err(StoreError::AlreadyExists(def.name.clone()));
        }
        let uid: u64 = self.run(redis::cmd("INCR").arg(keys::UIDS)).await?;
        let mut sets = vec![set(keys::hyperplanes(uid), super::keys::encode_f32s(params.hyperplanes))];
        if let Some(center) = params.center {
            sets.push(set(keys::center(uid), super::keys::encode_f32s(center)));
        }
        if let Some(planes) = params.sketch_planes {
            sets.push(set(keys::sketch_planes(uid), super::keys::encode_f32s(planes)));
        }
        self.run_all::<()>(sets).await?;
        self.acknowledge().await?;
        crate::failpoint::crash_point("cluster-create-matrices-written");
        let record = record_of(def, uid).encode_to_vec();
        let created: bool = self.run(redis::cmd("HSETNX").arg(keys::CATALOG).arg(&def.name).arg(&record)).await?;
        if !created {
            // Another replica won the name: its matrices are the index's, ours go.
            self.remove_keys(uid).await?;
            return Err(StoreError::AlreadyExists(def.name.clone()));
        }
        let index = ClusterIndex { def: def.clone(), uid, record };
        // A create stalled past `check --repair`'s grace may have lost its matrices to it (keys
        // no catalog entry named): then the entry goes too, rather than name an index without
        // planes.
        let planes: bool = self.run(redis::cmd("EXISTS").arg(keys::hyperplanes(uid))).await?;
        if !planes {
            self.drop_index(&index).await?;
            return Err(StoreError::Unavailable(format!(
                "index {:?}: its matrices were removed while it was being created (check --repair ran meanwhile); \
                 create it again",
                def.name
            )));
        }
        self.acknowledge().await?;
        Ok(index)
    }

    /// The index of that name now (another replica may have dropped or re-created it).
    pub async fn find(&self, name: &str) -> Result<Option<ClusterIndex>, StoreError> {
        let record: Option<Vec<u8>> = self.run(redis::cmd("HGET").arg(keys::CATALOG).arg(name)).await?;
        record.map(|bytes| decode_index(&bytes)).transpose()
    }

    pub async fn list(&self) -> Result<Vec<ClusterIndex>, StoreError> {
        let records: Vec<Vec<u8>> = self.run(redis::cmd("HVALS").arg(keys::CATALOG)).await?;
        let mut indexes = records.iter().map(|bytes| decode_index(bytes)).collect::<Result<Vec<_>, _>>()?;
        indexes.sort_by(|a, b| a.def.name.cmp(&b.def.name));
        Ok(indexes)
    }

    /// Drops an index: its catalog entry first (then no replica finds it), its keys after.
    /// Returns whether it existed.
    pub async fn drop_index(&self, index: &ClusterIndex) -> Result<bool, StoreError> {
        // Only this uid's entry: a replica that re-created the name meanwhile keeps its index.
        const REMOVE_IF_SAME: &str = "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0";
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(REMOVE_IF_SAME).arg(1).arg(keys::CATALOG).arg(&index.def.name).arg(&index.record);
        let removed: i64 = self.run(&cmd).await?;
        if removed != 1 {
            return Ok(false);
        }
        self.acknowledge().await?;
        self.remove_keys(index.uid).await?;
        Ok(true)
    }

    pub async fn matrices(&self, uid: u64) -> Result<IndexMatrices, StoreError> {
        let mut cmd = redis::cmd("MGET");
        cmd.arg(keys::hyperplanes(uid)).arg(keys::center(uid)).arg(keys::sketch_planes(uid));
        let values: Vec<Option<Vec<u8>>> = self.run(&cmd).await?;
        let mut values = values.into_iter().map(|v| v.map(|b| super::keys::decode_f32s(&b)));
        let hyperplanes = values
            .next()
            .flatten()
            .ok_or_else(|| StoreError::Corrupt(format!("index uid {uid} has no hyperplanes in the cluster")))?;
        Ok(IndexMatrices { hyperplanes, center: values.next().flatten(), sketch_planes: values.next().flatten() })
    }

    /// Waits for the acknowledgement level configured; refuses (unavailable) when the
    /// replicas do not confirm within the timeout.
    pub async fn acknowledge(&self) -> Result<AckReport, StoreError> {
        let ms = self.ack.timeout.as_millis().max(1) as u64;
        let level = self.ack.level;
        let replicas = match level {
            AckLevel::Local => return Ok(AckReport { level, replicas: 0 }),
            // Routed to every primary; the crate answers with the smallest count.
            AckLevel::Replica => self.run::<i64>(redis::cmd("WAIT").arg(1).arg(ms)).await?,
            AckLevel::ReplicaFsync => {
                let counts: Vec<i64> = self.run(redis::cmd("WAITAOF").arg(1).arg(1).arg(ms)).await?;
                let (local, replicas) = (counts.first().copied().unwrap_or(0), counts.get(1).copied().unwrap_or(0));
                if local < 1 {
                    return Err(StoreError::Unavailable(format!(
                        "a primary did not fsync the write within {ms} ms (is appendonly on?): not acknowledged"
                    )));
                }
                replicas
            }
        };
        if replicas < 1 {
            return Err(StoreError::Unavailable(format!(
                "no replica confirmed the write within {ms} ms (--ack {}): not acknowledged; retry",
                level.as_str()
            )));
        }
        Ok(AckReport { level, replicas: replicas as u32 })
    }
}

fn set(key: String, value: Vec<u8>) -> Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg(value);
    cmd
}

fn decode_index(bytes: &[u8]) -> Result<ClusterIndex, StoreError> {
    let record = IndexRecord::decode(bytes)?;
    Ok(ClusterIndex { def: def_of(&record), uid: record.uid, record: bytes.to_vec() })
}

/// The crate's error as the store's: what a retry may cure (a connection lost, a failover
/// under way, too few replicas) is `Unavailable`, by the crate's typed retry advice and the
/// server's error code, never by message text.
fn backend(e: RedisError) -> StoreError {
    // A wrong password or a reply the crate cannot parse is no passing state.
    let lasting = matches!(e.kind(), redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::Parse);
    let transient = !lasting && !matches!(e.retry_method(), redis::RetryMethod::NoRetry)
        || e.is_io_error()
        || matches!(e.code(), Some("NOREPLICAS" | "CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "READONLY" | "LOADING"));
    if transient {
        StoreError::Unavailable(format!("the cluster store: {e}"))
    } else {
        StoreError::Backend(Box::new(e))
    }
}
