//! Reads of a shared index, each stage one batched round trip to the cluster: the probed
//! buckets of every table; the candidates' codes and sketches (dead and stale entries drop out
//! here, and votes are counted from the codes); the records (and embeddings) of the best; the
//! id keys that say which of those are live.

use super::super::hits::{rank_hits, votes_of};
use super::*;
use crate::store::cluster::ItemBody;

/// Candidates (most votes first) whose codes a query reads: beyond this, items with few votes
/// are left out. Covers `ASYMMETRIC_PRESELECTION ×` the default depth many times over.
const MAX_CANDIDATE_READS: usize = 4096;

impl SharedIndex {
    pub async fn query(&self, by: QueryBy, options: &QueryOptions) -> Result<QueryResult, IndexError> {
        let query::Resolved { top_k, probes, rerank, depth } = query::Resolved::from(options)?;
        if options.plan == SearchPlan::Scan {
            return Err(IndexError::InvalidArgument(format!(
                "index {:?} is on the cluster store, which answers from its tables: a scan would read every item",
                self.def.name
            )));
        }
        let (vector, exclude) = self.query_vector(by).await?;
        let probed = query::probed_codes(&self.planes, &vector, probes)?;
        let numbers = self.bucket_entries(&probed).await?;
        let candidates = numbers.len() as u32;
        let min_votes = options.min_votes.max(1);
        let contenders = self.contenders(numbers, exclude, &probed, min_votes).await?;
        let depth = depth.max(top_k);
        let ranked = match (rerank, &self.sketch) {
            (false, _) => {
                // As the embedded store: every item tied with the `top_k`-th by votes goes on to
                // the hits, which order ties by id (and a few more, for items found dead there).
                let mut by_votes: Vec<Ranked> =
                    contenders.iter().map(|c| Ranked { number: c.number, votes: c.votes, similarity: 0.0 }).collect();
                by_votes.sort_by_key(|r| std::cmp::Reverse(r.votes));
                let cut = by_votes.get((2 * top_k).min(by_votes.len()).saturating_sub(1)).map_or(0, |r| r.votes);
                by_votes.retain(|r| r.votes >= cut);
                by_votes
            }
            (true, Some(sketch)) => {
                let query = QuerySketch::new(sketch, &vector)?;
                let bits = self.def.sketch_bits;
                let (preselect, keep) = query::sketch_depths(&self.def, top_k, depth);
                // Candidates by position in `contenders`, whose sketches lie in one flat array.
                let words = query.words.len();
                let sketches: Vec<u64> = contenders.iter().flat_map(|c| c.sketch.iter().copied()).collect();
                let mut nearest_first: Vec<Candidate> = contenders
                    .iter()
                    .enumerate()
                    .map(|(i, c)| Candidate {
                        number: i as u32,
                        votes: c.votes,
                        distance: hamming(&query.words, &c.sketch),
                    })
                    .collect();
                rank::nearest(&mut nearest_first, preselect, bits);
                let kept = query.rescore(&sketches, nearest_first, |c| c.number, keep.max(2 * top_k));
                debug_assert!(sketches.len() == contenders.len() * words);
                kept.into_iter()
                    .map(|c| Ranked {
                        number: contenders[c.number as usize].number,
                        votes: c.votes,
                        similarity: estimated_cosine(c.distance, bits),
                    })
                    .collect()
            }
            (true, None) => contenders
                .iter()
                .take(depth)
                .map(|c| Ranked { number: c.number, votes: c.votes, similarity: 0.0 })
                .collect(),
        };
        let exact = rerank && self.def.stores_vectors;
        let hits = self.hits(ranked, &vector, exact, top_k).await?;
        Ok(QueryResult { hits, candidates, plan: SearchPlan::Tables })
    }

    /// The query's embedding, and the item to leave out of the hits (a query by id).
    async fn query_vector(&self, by: QueryBy) -> Result<(Vec<f32>, Option<u32>), IndexError> {
        match by {
            QueryBy::Vector(v) => {
                super::super::ingest::check_vector(&self.def, &v).map_err(IndexError::InvalidArgument)?;
                Ok((v, None))
            }
            QueryBy::Id(id) => {
                if !self.def.stores_vectors {
                    return Err(IndexError::InvalidArgument(format!(
                        "index {:?} does not store embeddings: query it by embedding or image",
                        self.def.name
                    )));
                }
                let not_found = || IndexError::ItemNotFound { index: self.def.name.clone(), id: id.clone() };
                let number =
                    self.store.numbers(self.uid, &[id.as_str()]).await?.pop().flatten().ok_or_else(not_found)?;
                let body = self.store.bodies(self.uid, &[number], true).await?.pop().flatten();
                let vector = body.filter(|b| b.id == id).and_then(|b| b.vector).ok_or_else(not_found)?;
                Ok((vector, Some(number)))
            }
        }
    }

    /// The item numbers in the probed buckets, each with the tables that hold it (an entry
    /// counted once per table, whatever retries appended).
    async fn bucket_entries(&self, probed: &[Vec<u64>]) -> Result<HashMap<u32, u32>, IndexError> {
        let wanted: Vec<(u16, u64)> = probed
            .iter()
            .enumerate()
            .flat_map(|(table, codes)| codes.iter().map(move |&code| (table as u16, code)))
            .collect();
        let buckets = self.store.buckets(self.uid, &wanted).await?;
        let mut tables_of: HashMap<u32, u32> = HashMap::new();
        let mut start = 0;
        for codes in probed {
            let mut table: Vec<u32> = buckets[start..start + codes.len()].iter().flatten().copied().collect();
            start += codes.len();
            table.sort_unstable();
            table.dedup();
            table.into_iter().for_each(|n| *tables_of.entry(n).or_default() += 1);
        }
        Ok(tables_of)
    }

    /// The candidates with at least `min_votes` whose codes exist and match the buckets they
    /// were found in (votes recounted from the codes), most votes first.
    async fn contenders(
        &self,
        entries: HashMap<u32, u32>,
        exclude: Option<u32>,
        probed: &[Vec<u64>],
        min_votes: u32,
    ) -> Result<Vec<Contender>, IndexError> {
        let mut by_votes: Vec<(u32, u32)> =
            entries.into_iter().filter(|&(n, votes)| votes >= min_votes && Some(n) != exclude).collect();
        // Most votes first; among equals the newer item (higher number).
        by_votes.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
        by_votes.truncate(MAX_CANDIDATE_READS);
        let numbers: Vec<u32> = by_votes.iter().map(|&(n, _)| n).collect();
        let words = self.def.sketch_bits as usize / 64;
        let codes = self.store.codes(self.uid, &numbers, self.def.tables as usize, words).await?;
        let mut sorted_probes = probed.to_vec();
        sorted_probes.iter_mut().for_each(|codes| codes.sort_unstable());
        let contenders = numbers
            .into_iter()
            .zip(codes)
            .filter_map(|(number, codes)| {
                let codes = codes?;
                let votes = votes_of(&codes.codes, &sorted_probes);
                (votes >= min_votes).then_some(Contender { number, votes, sketch: codes.sketch })
            })
            .collect();
        Ok(contenders)
    }

    /// The hits among `ranked` (best first by estimate): their records read, those that an id
    /// no longer names dropped, similarities made exact where asked, ordered by the one tie
    /// rule (similarity, votes, id).
    async fn hits(
        &self,
        ranked: Vec<Ranked>,
        vector: &[f32],
        exact: bool,
        top_k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        let numbers: Vec<u32> = ranked.iter().map(|r| r.number).collect();
        let bodies = self.store.bodies(self.uid, &numbers, exact).await?;
        let live = self.store.still_named(self.uid, &numbers, &bodies).await?;
        let tables = self.def.tables as f32;
        let mut hits: Vec<Hit> = ranked
            .into_iter()
            .zip(bodies)
            .zip(live)
            .filter_map(|((r, body), live)| {
                let body = body.filter(|_| live)?;
                let similarity = match (exact, &body.vector) {
                    (true, Some(stored)) => cosine(vector, stored),
                    (true, None) => return None,
                    (false, _) => r.similarity,
                };
                Some(Hit {
                    id: body.id,
                    label: body.label,
                    votes: r.votes,
                    score: r.votes as f32 / tables,
                    similarity,
                    metadata: body.metadata,
                })
            })
            .collect();
        rank_hits(&mut hits, top_k);
        Ok(hits)
    }

    /// The live items with these ids (a repeated id once), with what `fields` asks for.
    pub async fn get_items(&self, ids: &[String], fields: LookupFields) -> Result<Lookup, IndexError> {
        if fields.embeddings && !self.def.stores_vectors {
            return Err(IndexError::InvalidArgument(format!(
                "index {:?} does not store embeddings: ask without with_embeddings",
                self.def.name
            )));
        }
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        let asked: Vec<&str> = ids.iter().map(String::as_str).filter(|id| seen.insert(*id)).collect();
        let numbers = self.store.numbers(self.uid, &asked).await?;
        let named: Vec<u32> = numbers.iter().flatten().copied().collect();
        let mut bodies = self.store.bodies(self.uid, &named, fields.embeddings).await?.into_iter();
        let mut lookup = Lookup::default();
        let mut found_numbers = Vec::new();
        for (id, number) in asked.into_iter().zip(numbers) {
            // An id replaced between its read and its record's is reported missing, as if
            // asked a moment earlier.
            let body = number.and_then(|_| bodies.next().flatten()).filter(|b| b.id == id);
            match (number, body) {
                (Some(number), Some(body)) => {
                    let ItemBody { id, label, metadata, vector } = body;
                    lookup.found.push(FoundItem { id, label, metadata, embedding: vector, thumbnail: None });
                    found_numbers.push(number);
                }
                _ => lookup.missing.push(id.to_string()),
            }
        }
        if fields.thumbnails && self.def.thumbnails {
            let thumbnails = self.store.thumbnails(self.uid, &found_numbers).await?;
            for (found, thumbnail) in lookup.found.iter_mut().zip(thumbnails) {
                found.thumbnail = thumbnail;
            }
        }
        Ok(lookup)
    }
}

/// A candidate whose codes matched: its votes and sketch.
struct Contender {
    number: u32,
    votes: u32,
    sketch: Vec<u64>,
}
