//! What the crash and power-cut harnesses share: streams that ingest, replace and delete while
//! the server is killed, each remembering what was acknowledged, and the check of a restarted
//! server against that memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::common::{Rng, TestServer, batch, ingest, query_vector, vector_item};
use imagelsh::proto::{self, SearchPlan};

/// The index the harness writes, and its shape.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub index: &'static str,
    pub dim: usize,
    pub hash_bits: u32,
    pub tables: u32,
    /// Ids each stream draws from (replacements and deletes hit earlier ones).
    pub ids_per_stream: u64,
}

/// What an id holds: the version written (its label is `v{version}`), or deleted (with the
/// embedding it had, so that the check can query for it).
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    Written { version: u64, vector: Vec<f32> },
    Deleted { last: Option<Vec<f32>> },
}

/// What one stream knows: each id's last acknowledged fate, and the write in flight when the
/// server died (it may or may not have become durable).
#[derive(Debug, Default)]
pub struct StreamModel {
    pub acked: HashMap<String, Fate>,
    pub in_flight: HashMap<String, Fate>,
    /// Writes and deletes acknowledged since the model was last checked.
    pub acks: u64,
}

impl StreamModel {
    pub fn live(&self) -> usize {
        self.acked.values().filter(|f| matches!(f, Fate::Written { .. })).count()
    }

    pub fn deleted(&self) -> usize {
        self.acked.values().filter(|f| matches!(f, Fate::Deleted { last: Some(_) })).count()
    }

    /// The embedding an id was last known by (acknowledged or in flight).
    fn last_vector(&self, id: &str) -> Option<Vec<f32>> {
        match self.acked.get(id) {
            Some(Fate::Written { vector, .. }) => Some(vector.clone()),
            Some(Fate::Deleted { last }) => last.clone(),
            None => None,
        }
    }
}

fn vector_of(rng: &mut Rng, dim: usize) -> Vec<f32> {
    (0..dim).map(|_| rng.unit()).collect()
}

/// A long note (near the 16 KiB metadata limit) on one item in four: 64 such records make a
/// record chunk large enough for sled to write it as a blob file of its own.
fn note_of(version: u64) -> Option<String> {
    version.is_multiple_of(4).then(|| format!("{version:016x}").repeat(950))
}

fn item(id: &str, version: u64, vector: &[f32]) -> proto::Item {
    let mut item = vector_item(id, format!("v{version}"), vector);
    item.metadata.insert("version".into(), version.to_string());
    if let Some(note) = note_of(version) {
        item.metadata.insert("note".into(), note);
    }
    item
}

/// Writes until the server stops answering (or `stop` is set): batches of upserts (new ids and
/// replacements) and deletes, one at a time, each recorded once acknowledged.
pub async fn writer(
    target: Target,
    addr: String,
    stream: usize,
    seed: u64,
    mut model: StreamModel,
    stop: Arc<AtomicBool>,
) -> StreamModel {
    let mut rng = Rng::new(seed);
    let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await else {
        return model;
    };
    let mut client = proto::image_index_client::ImageIndexClient::new(channel);
    while !stop.load(Ordering::Relaxed) {
        let op = rng.next_u64() % 10;
        let count = 1 + (rng.next_u64() % 30) as usize;
        let ids: Vec<String> =
            (0..count).map(|_| format!("s{stream}-{}", rng.next_u64() % target.ids_per_stream)).collect();
        if op < 8 {
            let mut fates = HashMap::new();
            let items: Vec<proto::Item> = ids
                .iter()
                .map(|id| {
                    let version = rng.next_u64() >> 1;
                    let vector = vector_of(&mut rng, target.dim);
                    // Of a repeated id the last one wins, on the server as here.
                    fates.insert(id.clone(), Fate::Written { version, vector: vector.clone() });
                    item(id, version, &vector)
                })
                .collect();
            model.in_flight = fates;
            match ingest(&mut client, vec![batch(target.index, 0, items)]).await {
                Ok(acks) if acks.len() == 1 && acks[0].errors.is_empty() => {
                    model.acked.extend(model.in_flight.drain());
                    model.acks += 1;
                }
                Ok(acks) => panic!("refused items: {acks:?}"),
                Err(_) => return model,
            }
        } else {
            model.in_flight =
                ids.iter().map(|id| (id.clone(), Fate::Deleted { last: model.last_vector(id) })).collect();
            match client.delete(proto::DeleteRequest { index: target.index.into(), ids }).await {
                Ok(_) => {
                    model.acked.extend(model.in_flight.drain());
                    model.acks += 1;
                }
                Err(_) => return model,
            }
        }
    }
    model.in_flight.clear();
    model
}

/// Checks every id of the models against the restarted server, and settles each write that was
/// in flight by what the server holds; returns how many ids were checked. Every acknowledged
/// delete is queried by the embedding the id last had.
pub async fn verify(target: Target, server: &TestServer, models: &mut [StreamModel]) -> usize {
    let mut client = server.client().await;
    let mut checked = 0;
    let (mut least, mut most) = (0u64, 0u64);
    for model in models.iter_mut() {
        let ids: std::collections::BTreeSet<String> =
            model.acked.keys().chain(model.in_flight.keys()).cloned().collect();
        for id in ids {
            let acked = model.acked.get(&id).cloned().unwrap_or(Fate::Deleted { last: None });
            let in_flight = model.in_flight.get(&id).cloned();
            let allowed: Vec<Fate> = std::iter::once(acked.clone()).chain(in_flight.clone()).collect();
            let present = allowed.iter().filter(|f| matches!(f, Fate::Written { .. })).count();
            least += u64::from(present == allowed.len());
            most += u64::from(present > 0);
            let mut held = None;
            for fate in &allowed {
                if let Fate::Written { version, vector } = fate
                    && find(target, &mut client, &id, *version, vector, checked % 5 == 0).await
                {
                    assert!(held.is_none(), "{id}: two versions found");
                    held = Some(fate.clone());
                }
            }
            let held = match held {
                Some(fate) => fate,
                None if present < allowed.len() => {
                    // Deleted (or never written): none of its embeddings finds it.
                    let mut last = None;
                    for fate in &allowed {
                        let vector = match fate {
                            Fate::Written { vector, .. } => vector,
                            Fate::Deleted { last: Some(vector) } => vector,
                            Fate::Deleted { last: None } => continue,
                        };
                        let found = find(target, &mut client, &id, u64::MAX, vector, false).await;
                        assert!(!found, "{id} deleted but found");
                        last = Some(vector.clone());
                    }
                    Fate::Deleted { last }
                }
                None => panic!("{id}: acknowledged {acked:?}, in flight {in_flight:?}, not found"),
            };
            model.acked.insert(id, held);
            checked += 1;
        }
        model.in_flight.clear();
        model.acks = 0;
    }
    let info = client.get_index(proto::GetIndexRequest { name: target.index.into() }).await.unwrap().into_inner();
    assert!((least..=most).contains(&info.items), "{} items, expected {least}..={most}", info.items);
    checked
}

/// Whether the item `id` is there with this version: first hit for its own embedding, in
/// every table, with its label and metadata (with `scan`, by the full-scan plan too). With
/// `version` u64::MAX: whether any item `id` shows up at all.
async fn find(
    target: Target,
    client: &mut proto::image_index_client::ImageIndexClient<tonic::transport::Channel>,
    id: &str,
    version: u64,
    vector: &[f32],
    scan: bool,
) -> bool {
    let plans: &[SearchPlan] = if scan { &[SearchPlan::Tables, SearchPlan::Scan] } else { &[SearchPlan::Tables] };
    let mut found = Vec::new();
    for &plan in plans {
        let request = proto::QueryRequest {
            probes: Some(0),
            rerank_depth: 1000,
            plan: plan.into(),
            ..query_vector(target.index, vector, 5)
        };
        let hits = client.query(request).await.unwrap().into_inner().hits;
        if version == u64::MAX {
            found.push(hits.iter().any(|h| h.id == id));
            continue;
        }
        let this = hits.first().filter(|h| h.id == id && h.label == format!("v{version}"));
        if let Some(hit) = this {
            assert_eq!(hit.votes, target.tables, "{id} is in {} of {} tables", hit.votes, target.tables);
            assert!(hit.similarity > 0.9999, "{id}: stored embedding differs ({})", hit.similarity);
            assert_eq!(hit.metadata.get("version"), Some(&version.to_string()), "{id}: metadata");
            assert_eq!(hit.metadata.get("note"), note_of(version).as_ref(), "{id}: its long note");
        }
        found.push(this.is_some());
    }
    assert!(found.iter().all(|&f| f == found[0]), "{id}: the plans disagree ({found:?})");
    found[0]
}
