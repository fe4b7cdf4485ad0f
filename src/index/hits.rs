//! Hit assembly: ranked candidates with their records, votes counted from their codes,
//! ordered by similarity, then votes, then id.

use super::*;

impl Index {
    /// Hits for ranked candidates, in rank order; equal scores are ordered by id. With `probed`
    /// (the codes the query visits in each table, each table's sorted), votes are counted from
    /// the items' codes.
    pub(super) fn hits(
        &self,
        ranked: Vec<Ranked>,
        top_k: usize,
        probed: Option<&[Vec<u64>]>,
    ) -> Result<Vec<Hit>, IndexError> {
        let numbers: Vec<u32> = ranked.iter().map(|r| r.number).collect();
        let by_number: HashMap<u32, Ranked> = ranked.iter().map(|r| (r.number, *r)).collect();
        let tables = self.def().tables as f32;
        let mut hits: Vec<Hit> = self
            .items(&numbers)?
            .into_iter()
            .map(|item| {
                let mut r = by_number[&item.number];
                if let Some(probed) = probed {
                    r.votes = votes_of(&item.codes, probed);
                }
                Hit {
                    id: item.id,
                    label: item.label,
                    votes: r.votes,
                    score: r.votes as f32 / tables,
                    similarity: r.similarity,
                    metadata: item.metadata,
                }
            })
            .collect();
        rank_hits(&mut hits, top_k);
        Ok(hits)
    }
}

/// The best `top_k` hits in answer order: similarity, then votes, then id (both stores).
pub(super) fn rank_hits(hits: &mut Vec<Hit>, top_k: usize) {
    hits.sort_by(|a, b| {
        b.similarity.total_cmp(&a.similarity).then(b.votes.cmp(&a.votes)).then_with(|| a.id.cmp(&b.id))
    });
    hits.truncate(top_k);
}

/// The tables in which an item's code is one the query visits (`probed`: each table's sorted).
pub(super) fn votes_of(codes: &[u64], probed: &[Vec<u64>]) -> u32 {
    codes.iter().zip(probed).filter(|(code, visited)| visited.binary_search(code).is_ok()).count() as u32
}
