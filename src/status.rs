//! What every database is doing: the board the replication loop writes and
//! `/metrics`, `/health`, the status page and `walsync status` read.
//!
//! The loop updates an entry when a database is added, changes, finishes a
//! job or is released, never on a timer, so an idle fleet costs nothing here.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a database stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Not opened yet (or not since its last failure).
    #[default]
    Waiting,
    /// Open and replicating.
    Open,
    /// Closed at rest; reopened on its next change.
    Closed,
    /// Its last sync failed; retried with backoff.
    Failing,
    /// Replication stopped for good (another writer on its prefix).
    Stopped,
}

/// One database, as the board shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DbStatus {
    pub path: String,
    pub prefix: String,
    pub state: State,
    /// Newest sequence in storage.
    pub head: Option<u64>,
    /// Unix milliseconds of the last sync that succeeded.
    pub last_sync_ms: Option<u64>,
    /// Unix milliseconds of the oldest change not yet shipped.
    pub pending_since_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Least time between syncs: with it, the lag a healthy database may have.
    pub sync_interval_ms: u64,
    pub segments: u64,
    pub bytes: u64,
    /// Snapshots by why they were taken.
    pub snapshots: BTreeMap<String, u64>,
    /// Checkpoints by mode.
    pub checkpoints: BTreeMap<String, u64>,
    /// Failed syncs by kind of error.
    pub errors: BTreeMap<String, u64>,
}

/// Changes may wait this long beyond `sync_interval` before `/health` fails.
pub const HEALTH_GRACE: Duration = Duration::from_secs(10);

impl DbStatus {
    /// Seconds the oldest unshipped change has waited (0 when caught up).
    pub fn lag_seconds(&self, now_ms: u64) -> f64 {
        self.pending_since_ms
            .map_or(0.0, |t| now_ms.saturating_sub(t) as f64 / 1000.0)
    }

    /// Why this database is unhealthy, if it is.
    pub fn unhealthy(&self, now_ms: u64) -> Option<String> {
        match self.state {
            State::Stopped | State::Failing => {
                return Some(self.last_error.clone().unwrap_or_else(|| "failing".into()));
            }
            _ => {}
        }
        let limit = self.sync_interval_ms + HEALTH_GRACE.as_millis() as u64;
        let lag = self.lag_seconds(now_ms);
        (lag * 1000.0 > limit as f64).then(|| format!("changes unshipped for {lag:.1} s"))
    }
}

/// The whole fleet's status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub started_ms: u64,
    pub now_ms: u64,
    pub databases: Vec<DbStatus>,
}

/// Shared between the replication loop (writer) and the listeners (readers).
#[derive(Debug, Clone)]
pub struct Board {
    inner: Arc<Mutex<BTreeMap<String, DbStatus>>>,
    started_ms: u64,
}

impl Default for Board {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            started_ms: now_ms(),
        }
    }
}

pub use crate::segment::now_ms;

impl Board {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, DbStatus>> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes (or creates) the entry for `prefix`.
    pub fn update(&self, prefix: &str, f: impl FnOnce(&mut DbStatus)) {
        let mut dbs = self.lock();
        let entry = dbs.entry(prefix.to_string()).or_insert_with(|| DbStatus {
            prefix: prefix.to_string(),
            ..DbStatus::default()
        });
        f(entry);
    }

    pub fn remove(&self, prefix: &str) {
        self.lock().remove(prefix);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            started_ms: self.started_ms,
            now_ms: now_ms(),
            databases: self.lock().values().cloned().collect(),
        }
    }
}

impl Snapshot {
    /// The databases that are not healthy, with why.
    pub fn unhealthy(&self) -> Vec<(String, String)> {
        self.databases
            .iter()
            .filter_map(|d| d.unhealthy(self.now_ms).map(|why| (d.prefix.clone(), why)))
            .collect()
    }

    /// A plain-text table, one database per line.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<32} {:<8} {:>9} {:>10} {:<24} {}\n",
            "PREFIX", "STATE", "LAG", "HEAD", "LAST SYNC", "LAST ERROR"
        );
        for d in &self.databases {
            out.push_str(&format!(
                "{:<32} {:<8} {:>8.1}s {:>10} {:<24} {}\n",
                d.prefix,
                format!("{:?}", d.state).to_lowercase(),
                d.lag_seconds(self.now_ms),
                d.head.map_or("-".into(), |h| h.to_string()),
                d.last_sync_ms.map_or("-".into(), crate::restore::format_ms),
                d.last_error.as_deref().unwrap_or("")
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_lag_and_failures() {
        let board = Board::default();
        let now = now_ms();
        board.update("a", |d| {
            d.state = State::Open;
            d.sync_interval_ms = 1000;
            d.pending_since_ms = Some(now - 2000);
        });
        board.update("b", |d| {
            d.state = State::Open;
            d.sync_interval_ms = 1000;
            d.pending_since_ms = Some(now - 60_000);
        });
        board.update("c", |d| {
            d.state = State::Failing;
            d.last_error = Some("storage down".into());
        });
        let unhealthy = board.snapshot().unhealthy();
        let names: Vec<&str> = unhealthy.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(names, vec!["b", "c"]);
        assert_eq!(unhealthy[1].1, "storage down");
        board.remove("b");
        assert_eq!(board.snapshot().databases.len(), 2);
    }
}
