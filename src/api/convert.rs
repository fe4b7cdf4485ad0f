//! Wire messages ⇄ domain types.

use tonic::Status;

use crate::index::{FoundItem, Hit, IndexInfo, ItemFailure, Lookup, QueryOptions, SearchPlan};
use crate::proto::{self, item::Content, query_request::Query};
use crate::usecase::{IncomingItem, ItemContent, NewIndex, QueryInput};

impl From<proto::CreateIndexRequest> for NewIndex {
    fn from(r: proto::CreateIndexRequest) -> Self {
        NewIndex {
            name: r.name,
            dim: r.dim,
            hash_bits: r.hash_bits,
            tables: r.tables,
            seed: r.seed,
            center: r.center,
            no_center: r.no_center,
            sketch_bits: r.sketch_bits,
            store_embeddings: r.store_embeddings,
            thumbnails: r.thumbnails,
        }
    }
}

impl From<proto::Item> for IncomingItem {
    fn from(item: proto::Item) -> Self {
        let proto::Item { id, label, metadata, content } = item;
        let content = match content {
            Some(Content::Embedding(e)) => ItemContent::Embedding(e.values),
            Some(Content::Image(bytes)) => ItemContent::Image(bytes),
            None => ItemContent::Missing,
        };
        IncomingItem { id, label, metadata, content }
    }
}

/// A query request as the use case takes it: the index's name, what to look up, and how.
pub fn query_call(r: proto::QueryRequest) -> Result<(String, QueryInput, QueryOptions), Status> {
    let plan = proto::SearchPlan::try_from(r.plan)
        .map_err(|_| Status::invalid_argument(format!("unknown search plan {}", r.plan)))?;
    let input = match r.query {
        Some(Query::Embedding(e)) => QueryInput::Embedding(e.values),
        Some(Query::Id(id)) => QueryInput::Id(id),
        Some(Query::Image(bytes)) => QueryInput::Image(bytes),
        None => return Err(Status::invalid_argument("a query needs an image, an embedding or an id")),
    };
    let options = QueryOptions {
        top_k: r.top_k,
        min_votes: r.min_votes,
        probes: r.probes,
        rerank: r.rerank,
        rerank_depth: r.rerank_depth,
        plan: plan.into(),
    };
    Ok((r.index, input, options))
}

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
            thumbnails: d.thumbnails,
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

impl From<FoundItem> for proto::StoredItem {
    fn from(item: FoundItem) -> Self {
        proto::StoredItem {
            id: item.id,
            label: item.label,
            metadata: item.metadata,
            embedding: item.embedding.map(|values| proto::Embedding { values }),
            thumbnail: item.thumbnail.unwrap_or_default(),
        }
    }
}

impl From<Lookup> for proto::GetItemsResponse {
    fn from(lookup: Lookup) -> Self {
        proto::GetItemsResponse { items: lookup.found.into_iter().map(Into::into).collect(), missing: lookup.missing }
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
