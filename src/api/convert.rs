//! Wire messages ⇄ domain types.

use crate::index::{Hit, IndexInfo, ItemFailure, SearchPlan};
use crate::proto;

impl From<IndexInfo> for proto::IndexInfo {
    fn from(info: IndexInfo) -> Self {
        let d = info.def;
        proto::IndexInfo {
            name: d.name,
            dim: d.dim,
            hash_bits: d.hash_bits,
            tables: d.tables,
            seed: d.seed,
            items: info.items,
            model: d.model,
            centered: info.centered,
            stores_embeddings: d.stores_vectors,
            sketch_bits: d.sketch_bits,
        }
    }
}

impl From<Hit> for proto::Hit {
    fn from(h: Hit) -> Self {
        proto::Hit {
            id: h.id,
            label: h.label,
            votes: h.votes,
            score: h.score,
            similarity: h.similarity,
            metadata: h.metadata,
        }
    }
}

impl From<ItemFailure> for proto::ItemError {
    fn from(f: ItemFailure) -> Self {
        proto::ItemError { position: f.position, id: f.id, message: f.message }
    }
}

impl From<proto::SearchPlan> for SearchPlan {
    fn from(plan: proto::SearchPlan) -> Self {
        match plan {
            proto::SearchPlan::Auto => SearchPlan::Auto,
            proto::SearchPlan::Tables => SearchPlan::Tables,
            proto::SearchPlan::Scan => SearchPlan::Scan,
        }
    }
}

impl From<SearchPlan> for proto::SearchPlan {
    fn from(plan: SearchPlan) -> Self {
        match plan {
            SearchPlan::Auto => proto::SearchPlan::Auto,
            SearchPlan::Tables => proto::SearchPlan::Tables,
            SearchPlan::Scan => proto::SearchPlan::Scan,
        }
    }
}
