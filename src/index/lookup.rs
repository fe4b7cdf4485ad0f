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
    /// A JPEG, when asked for and the item has one.
    pub thumbnail: Option<Vec<u8>>,
}

/// What a lookup returns besides labels and metadata.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LookupFields {
    pub embeddings: bool,
    pub thumbnails: bool,
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
    pub fn get_items(&self, ids: &[String], fields: LookupFields) -> Result<Lookup, IndexError> {
        if fields.embeddings && !self.def().stores_vectors {
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
        let mut found_numbers = Vec::new();
        for (id, number) in asked {
            // An item replaced between the id's lookup and its record's read holds a newer
            // number: it is reported missing, as if asked a moment earlier.
            match number.and_then(|n| records.remove(&n).filter(|item| &item.id == id).map(|item| (n, item))) {
                Some((number, item)) => {
                    let embedding = fields.embeddings.then(|| self.store.vector(number)).transpose()?;
                    let (id, label, metadata) = (item.id, item.label, item.metadata);
                    lookup.found.push(FoundItem { id, label, metadata, embedding, thumbnail: None });
                    found_numbers.push(number);
                }
                None => lookup.missing.push(id.clone()),
            }
        }
        if fields.thumbnails && self.def().thumbnails {
            for (found, thumbnail) in lookup.found.iter_mut().zip(self.thumbnails(&found_numbers)?) {
                found.thumbnail = thumbnail;
            }
        }
        Ok(lookup)
    }
}
