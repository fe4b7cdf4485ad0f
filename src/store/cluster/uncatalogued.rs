//! Keys under a uid that no catalog entry names: left by a create that stopped between its
//! matrices and its catalog entry, or written by a replica that was mid-write to an index
//! while a drop scanned its keys. No name leads to them, so no query sees them; they only take
//! memory, and `check` (which walks the catalog) would never meet them.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::ClusterStore;
use super::keys;
use crate::store::StoreError;

/// The keys found under one uid the catalog does not name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uncatalogued {
    pub uid: u64,
    pub keys: u64,
}

/// What a pass over every key found, and removed with `repair`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UncataloguedCheck {
    pub found: Vec<Uncatalogued>,
    pub removed: u64,
}

impl ClusterStore {
    /// Scans every key of the store for uids the catalog does not name. With `repair`, the keys
    /// of each uid still unnamed after `grace` (read again: a create finishes its catalog entry
    /// in milliseconds, and one stalled past the grace finds its matrices gone and undoes its
    /// entry) are removed.
    pub async fn check_uncatalogued(&self, repair: bool, grace: Duration) -> Result<UncataloguedCheck, StoreError> {
        let mut per_uid: BTreeMap<u64, u64> = BTreeMap::new();
        let mut scan = self.scan_matching(keys::ALL_KEYS.to_string()).await?;
        while let Some(page) = scan.next_page().await? {
            for uid in page.iter().filter_map(|key| keys::uid_of(key)) {
                *per_uid.entry(uid).or_default() += 1;
            }
        }
        // The catalog read after the scan: an index created during it is named by now.
        let named = self.catalogued_uids().await?;
        let found: Vec<Uncatalogued> = per_uid
            .into_iter()
            .filter(|(uid, _)| !named.contains(uid))
            .map(|(uid, keys)| Uncatalogued { uid, keys })
            .collect();
        let mut report = UncataloguedCheck { found, removed: 0 };
        if repair && !report.found.is_empty() {
            tokio::time::sleep(grace).await;
            let named = self.catalogued_uids().await?;
            for leftover in report.found.iter().filter(|l| !named.contains(&l.uid)) {
                report.removed += self.remove_keys(leftover.uid).await?;
            }
        }
        Ok(report)
    }

    async fn catalogued_uids(&self) -> Result<HashSet<u64>, StoreError> {
        Ok(self.list().await?.into_iter().map(|index| index.uid).collect())
    }
}
