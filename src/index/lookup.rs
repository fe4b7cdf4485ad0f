//! Items read back by id: what a client asks for to see what an index holds (a bulk job that
//! resumes asks which of its ids are there).

use super::*;

/// An item as a client reads it back.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundItem {
    pub id: String,
    pub label: String,
    pub metadata: HashMap<String, String>,
    /// When asked for (and the index stores embeddings).
    pub embedding: Option<Vec<f32>>,
}

/// The answer to a lookup by ids.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lookup {
    /// The items found, in the order their ids were asked for; a repeated id once.
    pub found: Vec<FoundItem>,
    /// The ids the index does not hold, in order; a repeated id once.
    pub missing: Vec<String>,
}

impl Index {
    /// The live items with these ids, acknowledged ones whether applied or not.
    pub fn get_items(&self, ids: &[String], with_embeddings: bool) -> Result<Lookup, IndexError> {
        if with_embeddings && !self.def().stores_vectors {
            return Err(IndexError::InvalidArgument(format!(
                "index {:?} does not store embeddings: ask without with_embeddings",
                self.def().name
            )));
        }
        // As a query: no reclaim frees a record while it is read.
        let _reading = self.readers.read().unwrap_or_else(|e| e.into_inner());
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        let mut asked = Vec::with_capacity(ids.len());
        for id in ids {
            if seen.insert(id.as_str()) {
                asked.push((id, self.item_number(id)?));
            }
        }
        let numbers: Vec<u32> = asked.iter().filter_map(|(_, number)| *number).collect();
        let mut records: HashMap<u32, StoredItem> =
            self.items(&numbers)?.into_iter().map(|item| (item.number, item)).collect();
        let mut lookup = Lookup::default();
        for (id, number) in asked {
            // An item replaced between the id's lookup and its record's read holds a newer
            // number: it is reported missing, as if asked a moment earlier.
            match number.and_then(|n| records.remove(&n).filter(|item| &item.id == id).map(|item| (n, item))) {
                Some((number, item)) => {
                    let embedding = with_embeddings.then(|| self.store.vector(number)).transpose()?;
                    lookup.found.push(FoundItem { id: item.id, label: item.label, metadata: item.metadata, embedding });
                }
                None => lookup.missing.push(id.clone()),
            }
        }
        Ok(lookup)
    }
}
