//! Work on every primary of the cluster: what no key routes (a drop's and a check's scans).

use redis::aio::MultiplexedConnection;

use super::{ClusterStore, backend, keys};
use crate::store::StoreError;

/// Keys per `SCAN` step and per `UNLINK`.
const SCAN_COUNT: usize = 1000;

impl ClusterStore {
    /// A connection to each primary, from `CLUSTER NODES` (the crate keeps its own map private).
    pub(super) async fn primaries(&self) -> Result<Vec<MultiplexedConnection>, StoreError> {
        let nodes: String = self.run(redis::cmd("CLUSTER").arg("NODES")).await?;
        let mut connections = Vec::new();
        for address in primary_addresses(&nodes) {
            let client = redis::Client::open(format!("redis://{address}")).map_err(backend)?;
            connections.push(client.get_multiplexed_async_connection().await.map_err(backend)?);
        }
        if connections.is_empty() {
            return Err(StoreError::Unavailable("the cluster lists no primary".into()));
        }
        Ok(connections)
    }

    /// The keys of index `uid`, a page at a time, primary by primary.
    pub(super) async fn scan(&self, uid: u64) -> Result<KeyScan, StoreError> {
        self.scan_matching(format!("{}*", glob_escape(&keys::prefix(uid)))).await
    }

    /// The keys matching a `SCAN` pattern, a page at a time, primary by primary.
    pub(super) async fn scan_matching(&self, pattern: String) -> Result<KeyScan, StoreError> {
        let nodes = self.primaries().await?;
        Ok(KeyScan { nodes, cursor: None, pattern })
    }

    /// Removes every key of index `uid` (after its catalog entry is gone); returns how many.
    pub(super) async fn remove_keys(&self, uid: u64) -> Result<u64, StoreError> {
        let mut scan = self.scan(uid).await?;
        let mut removed = 0u64;
        while let Some(page) = scan.next_page().await? {
            // One key per UNLINK (keys of several slots may not share one), one pipeline per
            // primary. The store's keys are UTF-8 (built from text).
            let unlinks = page
                .into_iter()
                .map(|key| {
                    let key = String::from_utf8_lossy(&key).into_owned();
                    let mut cmd = redis::cmd("UNLINK");
                    cmd.arg(&key);
                    (key, cmd)
                })
                .collect();
            for reply in self.run_grouped(unlinks).await? {
                removed += redis::from_redis_value::<u64>(reply).unwrap_or(0);
            }
        }
        Ok(removed)
    }
}

/// A `SCAN` of one pattern over every primary.
pub(super) struct KeyScan {
    /// The primaries not yet finished, the one being scanned last.
    nodes: Vec<MultiplexedConnection>,
    /// The cursor in the last node (`None`: not started).
    cursor: Option<u64>,
    pattern: String,
}

impl KeyScan {
    /// The next non-empty page of keys; `None` when every primary is done.
    pub(super) async fn next_page(&mut self) -> Result<Option<Vec<Vec<u8>>>, StoreError> {
        loop {
            let Some(node) = self.nodes.last_mut() else { return Ok(None) };
            let (next, page): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(self.cursor.unwrap_or(0))
                .arg("MATCH")
                .arg(&self.pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(node)
                .await
                .map_err(backend)?;
            if next == 0 {
                self.nodes.pop();
                self.cursor = None;
            } else {
                self.cursor = Some(next);
            }
            if !page.is_empty() {
                return Ok(Some(page));
            }
        }
    }
}

/// `host:port` of each primary in `CLUSTER NODES` output that is not failed.
fn primary_addresses(nodes: &str) -> Vec<String> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let address = fields.nth(1)?;
            let flags = fields.next()?;
            let flags: Vec<&str> = flags.split(',').collect();
            let usable = flags.contains(&"master") && !flags.iter().any(|f| matches!(*f, "fail" | "fail?" | "noaddr"));
            // `ip:port@cport[,hostname]`
            usable.then(|| address.split('@').next().unwrap_or(address).to_string())
        })
        .collect()
}

/// `s` matched literally by SCAN's glob.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primaries_are_read_from_cluster_nodes() {
        let nodes = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002 master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@40003,host-3 master - 0 1426238318243 3 connected 10923-16383
6ec2 127.0.0.1:30005@40005 master,fail - 1426238316232 1426238316232 5 disconnected
e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
";
        assert_eq!(primary_addresses(nodes), ["127.0.0.1:30002", "127.0.0.1:30003", "127.0.0.1:30001"]);
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("lsh:7:"), "lsh:7:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
