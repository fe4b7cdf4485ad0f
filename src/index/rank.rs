//! Ranking candidates: by votes, by sketch distance then the asymmetric estimate, exactly by
//! cosine; and the one top-k selection with its tie rule.

use super::*;

impl Index {
    /// Candidates with their votes, ordered best first by votes (ties: every item tied with the
    /// `top_k`-th, to be broken by id once the ids are read).
    pub(super) fn rank_by_votes(votes: &VoteCounter, min_votes: u32, top_k: usize) -> Vec<Ranked> {
        let mut ranked: Vec<Ranked> = votes
            .contenders(top_k, min_votes)
            .into_iter()
            .map(|(number, votes)| Ranked { number, votes, similarity: 0.0 })
            .collect();
        ranked.sort_by_key(|r| std::cmp::Reverse(r.votes));
        ranked
    }

    /// Candidates ordered by cosine similarity with the query, best first, at most `top_k`.
    ///
    /// With sketches, all candidates are ranked by Hamming distance first (a few popcounts
    /// each), the nearest `ASYMMETRIC_PRESELECTION × depth` re-scored against the query's
    /// projections, and only the best `depth` compared exactly; without stored embeddings the
    /// sketch distance gives the (estimated) similarity itself. An index without sketches
    /// compares every candidate exactly.
    pub(super) fn rank_by_similarity(
        &self,
        vector: &[f32],
        votes: &mut VoteCounter,
        min_votes: u32,
        top_k: usize,
        depth: usize,
    ) -> Result<Vec<Ranked>, IndexError> {
        let Some(sketch) = &self.sketch else {
            let candidates: Vec<Candidate> = votes
                .at_least(min_votes)
                .into_iter()
                .map(|(number, votes)| Candidate { number, votes, distance: 0 })
                .collect();
            return Ok(best_first(self.exact(vector, &candidates)?, top_k));
        };
        let query = QuerySketch::new(sketch, vector)?;
        let bits = self.def().sketch_bits;
        let words = query.words.len();
        let (preselect, keep) = self.sketch_depths(top_k, depth);
        let mut by_distance: Vec<Candidate> = Vec::new();
        {
            let state = self.state();
            let sketches = state.sketches();
            votes.for_each_at_least(min_votes, |number, votes| {
                let start = number as usize * words;
                // An item without a sketch (not expected) ranks last rather than failing the query.
                let distance = sketches.get(start..start + words).map_or(bits, |s| hamming(&query.words, s));
                by_distance.push(Candidate { number, votes, distance });
            });
            nearest(&mut by_distance, preselect, bits);
            by_distance = query.rescore(sketches, std::mem::take(&mut by_distance), |c| c.number, keep);
        }
        Ok(best_first(self.similarities(vector, by_distance)?, top_k))
    }

    /// The similarity of each candidate with the query: exact, against
    /// the stored embedding, or the sketch's estimate where the index keeps no embeddings.
    pub(super) fn similarities(&self, vector: &[f32], nearest: Vec<Candidate>) -> Result<Vec<Ranked>, IndexError> {
        if self.def().stores_vectors {
            return self.exact(vector, &nearest);
        }
        let bits = self.def().sketch_bits;
        Ok(nearest
            .into_iter()
            .map(|c| Ranked { number: c.number, votes: c.votes, similarity: estimated_cosine(c.distance, bits) })
            .collect())
    }

    /// Exact cosine similarity of `vector` with each candidate's stored embedding.
    fn exact(&self, vector: &[f32], candidates: &[Candidate]) -> Result<Vec<Ranked>, IndexError> {
        let numbers: Vec<u32> = candidates.iter().map(|c| c.number).collect();
        let mut ranked = Vec::with_capacity(candidates.len());
        self.store.for_each_vector(&numbers, &mut |i, stored| {
            let Candidate { number, votes, .. } = candidates[i];
            ranked.push(Ranked { number, votes, similarity: cosine(vector, stored) });
        })?;
        Ok(ranked)
    }
}

/// The `top_k` best by similarity, best first, and any more tied with the `top_k`-th: `hits`
/// orders ties by votes, then id (a scan knows votes only once the hits' records are read).
pub(super) fn best_first(mut ranked: Vec<Ranked>, top_k: usize) -> Vec<Ranked> {
    ranked.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
    let Some(last) = ranked.get(top_k.saturating_sub(1)).map(|r| r.similarity) else {
        return ranked;
    };
    let end = top_k + ranked[top_k..].iter().take_while(|r| r.similarity == last).count();
    ranked.truncate(end);
    ranked
}

/// Keeps the `keep` candidates of smallest distance (distances ≤ `bits`), in
/// ascending item order as they came. A histogram of the distances finds the cut-off in one
/// pass, where a selection would shuffle thousands of entries.
pub(super) fn nearest(entries: &mut Vec<Candidate>, keep: usize, bits: u32) {
    if entries.len() <= keep {
        return;
    }
    let mut histogram = vec![0usize; bits as usize + 1];
    entries.iter().for_each(|e| histogram[e.distance.min(bits) as usize] += 1);
    let (mut cutoff, mut below) = (0u32, 0usize);
    for (distance, &count) in histogram.iter().enumerate() {
        if below + count >= keep {
            cutoff = distance as u32;
            break;
        }
        below += count;
    }
    // All entries nearer than the cut-off, and as many at it as fit.
    let mut at_cutoff = keep - below;
    entries.retain(|e| {
        e.distance < cutoff
            || (e.distance == cutoff && at_cutoff > 0 && {
                at_cutoff -= 1;
                true
            })
    });
}

/// A query against the sketches: its own sketch for Hamming distances, and its projections
/// for the asymmetric re-score of the nearest.
pub(super) struct QuerySketch {
    pub(super) words: Vec<u64>,
    projections: Vec<f32>,
}

impl QuerySketch {
    pub(super) fn new(sketch: &Hyperplanes, vector: &[f32]) -> Result<Self, IndexError> {
        let projections = sketch.project_one(vector)?;
        let words = sketch.codes_of(projections.view()).row(0).to_vec();
        Ok(Self { words, projections: projections.row(0).to_vec() })
    }

    /// The `keep` of the Hamming-nearest `entries` that the asymmetric estimate ranks best (all
    /// of them, untouched, when they fit).
    pub(super) fn rescore<E: Copy>(
        &self,
        sketches: &[u64],
        entries: Vec<E>,
        number: impl Fn(&E) -> u32,
        keep: usize,
    ) -> Vec<E> {
        if entries.len() <= keep {
            return entries;
        }
        let asymmetric = AsymmetricQuery::new(&self.projections);
        rescore_nearest(&asymmetric, sketches, self.words.len(), &entries, number, keep)
    }
}

/// A candidate before its similarity is known: its item, the votes it gathered, and its
/// sketch's Hamming distance to the query's (0 where not computed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Candidate {
    pub(super) number: u32,
    pub(super) votes: u32,
    pub(super) distance: u32,
}

/// A candidate's place in a ranking.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ranked {
    pub(super) number: u32,
    pub(super) votes: u32,
    /// Cosine with the query (exact or estimated); 0 when ranked by votes.
    pub(super) similarity: f32,
}
