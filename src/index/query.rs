//! A query: options resolved once, the plan chosen, and the candidates gathered, from the
//! tables (votes over the probed buckets) or from a scan of every live sketch.

use super::*;

impl Index {
    pub fn query(&self, by: QueryBy, options: &QueryOptions) -> Result<QueryResult, IndexError> {
        let _reading = self.readers.read().unwrap_or_else(|e| e.into_inner());
        let Resolved { top_k, probes, rerank, depth } = Resolved::from(options)?;
        let (vector, exclude) = match by {
            QueryBy::Vector(v) => {
                super::ingest::check_vector(self.def(), &v).map_err(IndexError::InvalidArgument)?;
                (v, None)
            }
            QueryBy::Id(id) => {
                if !self.def().stores_vectors {
                    return Err(IndexError::InvalidArgument(format!(
                        "index {:?} does not store embeddings: query it by embedding or image",
                        self.def().name
                    )));
                }
                let number = self
                    .item_number(&id)?
                    .ok_or_else(|| IndexError::ItemNotFound { index: self.def().name.clone(), id: id.clone() })?;
                (self.store.vector(number)?, Some(number))
            }
        };
        if self.plan(options.plan, rerank, options.min_votes)? == SearchPlan::Scan {
            return self.scan(&vector, exclude, probes, top_k, depth.max(top_k));
        }
        VOTES.with_borrow_mut(|votes| {
            votes.clear();
            self.gather_votes(&vector, probes, votes)?;
            if let Some(number) = exclude {
                votes.remove(number);
            }
            let ranked = if rerank {
                self.rank_by_similarity(&vector, &mut *votes, options.min_votes, top_k, depth.max(top_k))?
            } else {
                Self::rank_by_votes(votes, options.min_votes, top_k)
            };
            let candidates = votes.candidates() as u32;
            Ok(QueryResult { hits: self.hits(ranked, top_k, None)?, candidates, plan: SearchPlan::Tables })
        })
    }

    /// The plan a query runs: `Tables` or `Scan`.
    fn plan(&self, asked: SearchPlan, rerank: bool, min_votes: u32) -> Result<SearchPlan, IndexError> {
        // A scan ranks by similarity and counts votes for the hits alone: it cannot rank by
        // votes or filter by them.
        let scannable = rerank && min_votes == 0 && self.sketch.is_some();
        match asked {
            SearchPlan::Tables => Ok(SearchPlan::Tables),
            SearchPlan::Scan if scannable => Ok(SearchPlan::Scan),
            SearchPlan::Scan => Err(IndexError::InvalidArgument(match self.sketch {
                None => format!("index {:?} keeps no sketches (layout < 3): it cannot be scanned", self.def().name),
                Some(_) => "a scan ranks by similarity: it needs rerank and no min_votes".into(),
            })),
            SearchPlan::Auto => {
                let bytes = 8 * self.state().sketches().len() as u64;
                let small = self.full_scan_threshold > 0 && bytes <= self.full_scan_threshold;
                Ok(if scannable && small { SearchPlan::Scan } else { SearchPlan::Tables })
            }
        }
    }

    /// How many Hamming-nearest candidates a query keeps for the asymmetric re-score, and how
    /// many of those it keeps for the exact re-rank (with embeddings) or as hits (without: the
    /// sketch's estimate is then the similarity, and ranks by Hamming distance alone).
    pub(super) fn sketch_depths(&self, top_k: usize, depth: usize) -> (usize, usize) {
        sketch_depths(self.def(), top_k, depth)
    }

    /// The `SearchPlan::Scan` query: every live item's sketch against the query's, the
    /// `ASYMMETRIC_PRESELECTION × depth` nearest re-scored by the asymmetric estimate, the best
    /// `depth` re-ranked exactly (without embeddings: the `top_k` nearest by their sketch's
    /// estimate), votes for the hits.
    fn scan(
        &self,
        vector: &[f32],
        exclude: Option<u32>,
        probes: u32,
        top_k: usize,
        depth: usize,
    ) -> Result<QueryResult, IndexError> {
        let sketch = self.sketch.as_ref().ok_or_else(|| IndexError::InvalidArgument("no sketches to scan".into()))?;
        let query = QuerySketch::new(sketch, vector)?;
        let (preselect, keep) = self.sketch_depths(top_k, depth);
        let (nearest, scanned) = {
            let state = self.state();
            let (words, live) = (state.sketches(), state.live_words());
            let by_hamming = nearest_sketches(&query.words, words, live, exclude, preselect);
            let scanned: u32 = live.iter().map(|w| w.count_ones()).sum();
            (query.rescore(words, by_hamming, |&(number, _)| number, keep), scanned)
        };
        // Votes are counted below, for the hits alone.
        let ranked = self.similarities(
            vector,
            nearest.into_iter().map(|(number, distance)| Candidate { number, votes: 0, distance }).collect(),
        )?;
        let mut probed = self.probed_codes(vector, probes)?;
        probed.iter_mut().for_each(|codes| codes.sort_unstable());
        let hits = self.hits(best_first(ranked, top_k), top_k, Some(&probed))?;
        // A query by id scans its own item too, but it is no candidate.
        Ok(QueryResult {
            hits,
            candidates: scanned.saturating_sub(u32::from(exclude.is_some())),
            plan: SearchPlan::Scan,
        })
    }

    fn probed_codes(&self, vector: &[f32], probes: u32) -> Result<Vec<Vec<u64>>, IndexError> {
        probed_codes(&self.planes, vector, probes)
    }

    /// Adds the live items of the buckets of the query's codes, and `probes` more per table,
    /// to `votes`: the store's applied part of each bucket and the logged tail's.
    fn gather_votes(&self, vector: &[f32], probes: u32, votes: &mut VoteCounter) -> Result<(), IndexError> {
        let probed = self.probed_codes(vector, probes)?;
        // The tail's part first, the store's second (see `QueryState::tail_bucket`).
        let tails: Vec<Vec<Vec<u32>>> = {
            let state = self.state();
            let tail_of = |(table, codes): (usize, &Vec<u64>)| -> Vec<Vec<u32>> {
                codes.iter().map(|&code| state.tail_bucket(table, code).to_vec()).collect()
            };
            probed.iter().enumerate().map(tail_of).collect()
        };
        let mut bucket = Vec::new();
        for (table, (codes, tails)) in probed.iter().zip(&tails).enumerate() {
            // An item is in one bucket per table, so visiting several counts it at most once.
            for (&code, tail) in codes.iter().zip(tails) {
                bucket.clear();
                self.store.bucket(table as u16, code, &mut bucket)?;
                let applied_up_to = bucket.iter().max().copied();
                bucket.extend(tail.iter().filter(|&&n| applied_up_to.is_none_or(|highest| n > highest)));
                // Items replaced or deleted since the store's copy was written.
                let state = self.state();
                bucket.retain(|&n| state.is_live(n));
                drop(state);
                votes.add_bucket(&bucket);
            }
        }
        Ok(())
    }
}

/// A query's options with their defaults filled in, within their hard limits.
#[derive(Debug, Clone, Copy)]
pub(super) struct Resolved {
    pub(super) top_k: usize,
    pub(super) probes: u32,
    pub(super) rerank: bool,
    /// Candidates re-ranked exactly (never fewer than `top_k` where it counts).
    pub(super) depth: usize,
}

impl Resolved {
    pub(super) fn from(options: &QueryOptions) -> Result<Self, IndexError> {
        let top_k = match options.top_k {
            0 => DEFAULT_TOP_K,
            k if k > MAX_TOP_K => {
                return Err(IndexError::InvalidArgument(format!("top_k {k} is over the limit of {MAX_TOP_K}")));
            }
            k => k,
        } as usize;
        let probes = options.probes.unwrap_or(DEFAULT_PROBES);
        if probes > MAX_PROBES {
            return Err(IndexError::InvalidArgument(format!("probes {probes} is over the limit of {MAX_PROBES}")));
        }
        if options.rerank_depth > MAX_RERANK_DEPTH {
            return Err(IndexError::InvalidArgument(format!(
                "rerank_depth {} is over the limit of {MAX_RERANK_DEPTH}",
                options.rerank_depth
            )));
        }
        let rerank = options.rerank.unwrap_or(true);
        let depth = (if options.rerank_depth == 0 { DEFAULT_RERANK_DEPTH } else { options.rerank_depth }) as usize;
        Ok(Self { top_k, probes, rerank, depth })
    }
}

/// The codes a query visits in each table: its own, then `probes` more, nearest first.
pub(super) fn probed_codes(planes: &Hyperplanes, vector: &[f32], probes: u32) -> Result<Vec<Vec<u64>>, IndexError> {
    let projections = planes.project_one(vector)?;
    let codes = planes.codes_of(projections.view());
    let k = planes.shape().hash_bits as usize;
    let probed = codes
        .row(0)
        .iter()
        .enumerate()
        .map(|(table, &code)| {
            let table_projections = projections.row(0).slice(ndarray::s![table * k..(table + 1) * k]).to_vec();
            std::iter::once(code).chain(probe_codes(&table_projections, code, probes as usize)).collect()
        })
        .collect();
    Ok(probed)
}

/// How many Hamming-nearest candidates a query of index `def` keeps for the asymmetric
/// re-score, and how many of those for the exact re-rank (`Index::sketch_depths`).
pub(super) fn sketch_depths(def: &IndexDef, top_k: usize, depth: usize) -> (usize, usize) {
    if def.stores_vectors { (depth.saturating_mul(ASYMMETRIC_PRESELECTION), depth) } else { (top_k, top_k) }
}
