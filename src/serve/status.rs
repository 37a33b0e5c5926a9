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
    /// Replication stopped for good (another writer on its prefix, or a
    /// file that is not a SQLite database).
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
    /// Continuity losses shipped as only the pages that differed (or as
    /// nothing) instead of a snapshot.
    #[serde(default)]
    pub deltas: u64,
    /// Times the chain could not be continued (a snapshot or a delta followed).
    #[serde(default)]
    pub continuity_losses: u64,
    /// Checkpoints by mode.
    pub checkpoints: BTreeMap<String, u64>,
    /// Failed syncs by kind of error.
    pub errors: BTreeMap<String, u64>,
    /// Unix milliseconds of the newest continuity losses, oldest first: at
    /// most [`DEGRADED_LOSSES`], all it takes to tell whether the database is
    /// degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_continuity_losses_ms: Vec<u64>,
    /// Why the chain could last not be continued.
    #[serde(default)]
    pub last_continuity_loss: Option<String>,
    /// Why the database is degraded as of the snapshot's `now_ms`, if it is
    /// (filled in by [`Board::snapshot`] from the losses above).
    #[serde(default)]
    pub degraded: Option<String>,
    /// Why the chain in storage needs attention: two objects claim one
    /// sequence (found when the database was opened). Restore still works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked: Option<String>,
    /// Stores of its chain (`[storage]` or a mirror) that are behind or
    /// stopped, one line each; the others go on meanwhile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stores: Vec<String>,
    /// Runs `watch` stored by compacting this database's chain.
    #[serde(default)]
    pub runs_stored: u64,
    /// Bytes of those runs.
    #[serde(default)]
    pub runs_bytes: u64,
    /// Objects and runs it read to build them.
    #[serde(default)]
    pub compaction_reads: u64,
    /// Compaction passes that failed (tried again as the chain grows).
    #[serde(default)]
    pub compaction_failures: u64,
    /// Objects deleted once older than the exact window, a run standing for them.
    #[serde(default)]
    pub replaced_deleted: u64,
}

/// Changes may wait this long beyond `sync_interval` before `/health` fails.
pub const HEALTH_GRACE: Duration = Duration::from_secs(10);

/// This many continuity losses within [`DEGRADED_WINDOW`] make a database
/// degraded: one is an event (the app wrote while walsync was stopped),
/// several in an hour are a cause that is still there. (A database found
/// at start exactly as shipped, such as a restored file, lost nothing and
/// is not counted.)
pub const DEGRADED_LOSSES: usize = 3;
/// See [`DEGRADED_LOSSES`].
pub const DEGRADED_WINDOW: Duration = Duration::from_secs(3600);

/// What an operator reads when a database becomes degraded.
pub const DEGRADED_HINT: &str = "another process is likely checkpointing or restarting the WAL \
     past what walsync shipped (an app running wal_checkpoint(RESTART) or (TRUNCATE), a second \
     replicator such as Litestream, or a filesystem without POSIX locks, e.g. some network \
     filesystems), or the database file keeps being replaced; each loss costs a read of the whole database, \
     and a full snapshot where there is no state record";

/// What a refused edit of the configuration file leaves running.
pub const CONFIG_KEPT: &str =
    "the databases and settings of the last file accepted stay in use until it is mended";

impl DbStatus {
    /// Seconds the oldest unshipped change has waited (0 when caught up).
    pub fn lag_seconds(&self, now_ms: u64) -> f64 {
        self.pending_since_ms
            .map_or(0.0, |t| now_ms.saturating_sub(t) as f64 / 1000.0)
    }

    /// Notes a continuity loss (a snapshot taken because the chain could not
    /// be continued) at `at_ms`. True if it is the one that made the database
    /// degraded: it was not just before.
    pub fn record_continuity_loss(&mut self, at_ms: u64, reason: &str) -> bool {
        let was = self.is_degraded(at_ms);
        let losses = &mut self.recent_continuity_losses_ms;
        if losses.len() >= DEGRADED_LOSSES {
            losses.drain(..=losses.len() - DEGRADED_LOSSES);
        }
        losses.push(at_ms);
        self.last_continuity_loss = Some(reason.to_string());
        !was && self.is_degraded(at_ms)
    }

    /// True while [`DEGRADED_LOSSES`] continuity losses fall within the
    /// [`DEGRADED_WINDOW`] before `now_ms`.
    pub fn is_degraded(&self, now_ms: u64) -> bool {
        let losses = &self.recent_continuity_losses_ms;
        losses.len() >= DEGRADED_LOSSES
            && now_ms.saturating_sub(losses[losses.len() - DEGRADED_LOSSES])
                < DEGRADED_WINDOW.as_millis() as u64
    }

    /// Why this database is degraded, if it is: it keeps losing continuity.
    /// Its data is still safe (every loss was caught and snapshotted), so
    /// this does not make it unhealthy.
    pub fn degraded_at(&self, now_ms: u64) -> Option<String> {
        if !self.is_degraded(now_ms) {
            return None;
        }
        let total = self.continuity_losses;
        Some(format!(
            "continuity lost {DEGRADED_LOSSES} times within {} ({total} since walsync started), \
             last: {}",
            humantime::format_duration(DEGRADED_WINDOW),
            self.last_continuity_loss.as_deref().unwrap_or("unknown")
        ))
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
    /// The configuration file's edits (`watch --config` reloads it).
    #[serde(default)]
    pub config: ConfigStatus,
}

/// Whether the configuration file as it stands is the one in use.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigStatus {
    /// Why the file as it stands was refused; the databases and settings of
    /// the last file accepted stay in use until it is mended.
    pub refused: Option<String>,
    /// Edits refused since start.
    pub edits_refused: u64,
    /// Set while the file names other stores than those in use: `[storage]`
    /// and `[[mirrors]]` are read at start only.
    #[serde(default)]
    pub restart_needed: Option<String>,
}

/// Shared between the replication loop (writer) and the listeners (readers).
#[derive(Debug, Clone)]
pub struct Board {
    inner: Arc<Mutex<BTreeMap<String, DbStatus>>>,
    config: Arc<Mutex<ConfigStatus>>,
    started_ms: u64,
}

impl Default for Board {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            config: Arc::default(),
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

    fn config(&self) -> MutexGuard<'_, ConfigStatus> {
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes (or creates) the entry for `prefix`; returns what `f` does.
    pub fn update<R>(&self, prefix: &str, f: impl FnOnce(&mut DbStatus) -> R) -> R {
        let mut dbs = self.lock();
        let entry = dbs.entry(prefix.to_string()).or_insert_with(|| DbStatus {
            prefix: prefix.to_string(),
            ..DbStatus::default()
        });
        f(entry)
    }

    pub fn remove(&self, prefix: &str) {
        self.lock().remove(prefix);
    }

    /// The configuration file as edited was refused for `why` (counted once
    /// however often the same refusal is met again).
    pub fn config_refused(&self, why: String) {
        let mut config = self.config();
        if config.refused.as_ref() != Some(&why) {
            config.edits_refused += 1;
            config.refused = Some(why);
        }
    }

    /// The configuration file as it stands is in use.
    pub fn config_accepted(&self) {
        self.config().refused = None;
    }

    /// Whether the file, accepted, names other stores than those in use.
    pub fn config_restart_needed(&self, why: Option<String>) {
        self.config().restart_needed = why;
    }

    pub fn snapshot(&self) -> Snapshot {
        let now = now_ms();
        let mut databases: Vec<DbStatus> = self.lock().values().cloned().collect();
        for d in &mut databases {
            d.degraded = d.degraded_at(now);
        }
        Snapshot {
            started_ms: self.started_ms,
            now_ms: now,
            databases,
            config: self.config().clone(),
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

    /// The databases that keep losing continuity, with why.
    pub fn degraded(&self) -> Vec<(String, String)> {
        self.databases
            .iter()
            .filter_map(|d| {
                d.degraded_at(self.now_ms)
                    .map(|why| (d.prefix.clone(), why))
            })
            .collect()
    }

    /// The databases whose chain in storage forks, with where.
    pub fn forked(&self) -> Vec<(String, String)> {
        self.databases
            .iter()
            .filter_map(|d| d.forked.clone().map(|why| (d.prefix.clone(), why)))
            .collect()
    }

    /// The databases, problems first: unhealthy, then degraded or forked,
    /// then the rest, each group by prefix.
    pub fn problems_first(&self) -> Vec<&DbStatus> {
        let mut dbs: Vec<&DbStatus> = self.databases.iter().collect();
        dbs.sort_by_key(|d| {
            if d.unhealthy(self.now_ms).is_some() {
                0
            } else if d.is_degraded(self.now_ms) || d.forked.is_some() || !d.stores.is_empty() {
                1
            } else {
                2
            }
        });
        dbs
    }

    /// What the state column shows: the state, or `degraded` for a database
    /// that works but keeps losing continuity.
    pub fn shown_state(&self, d: &DbStatus) -> String {
        match d.state {
            State::Failing | State::Stopped => {}
            _ if d.is_degraded(self.now_ms) => return "degraded".into(),
            _ => {}
        }
        format!("{:?}", d.state).to_lowercase()
    }

    /// What is wrong with a database, in a few words: its last error (or,
    /// without one, why it is unhealthy: changes unshipped for too long),
    /// and why it is degraded.
    pub fn problem(&self, d: &DbStatus) -> String {
        let mut parts: Vec<String> = d.last_error.iter().cloned().collect();
        if parts.is_empty() {
            parts.extend(d.unhealthy(self.now_ms));
        }
        if let Some(why) = d.degraded_at(self.now_ms) {
            parts.push(format!("degraded: {why}"));
        }
        if let Some(why) = &d.forked {
            parts.push(why.clone());
        }
        parts.extend(d.stores.iter().cloned());
        parts.join("; ")
    }

    /// A plain-text table, one database per line, problems first.
    pub fn table(&self) -> String {
        let mut out = String::new();
        if let Some(why) = &self.config.refused {
            out.push_str(&format!(
                "configuration edit refused: {why}; {CONFIG_KEPT}\n"
            ));
        }
        if let Some(why) = &self.config.restart_needed {
            out.push_str(&format!("configuration: {why}\n"));
        }
        out += &format!(
            "{:<32} {:<8} {:>9} {:>10} {:<24} {}\n",
            "PREFIX", "STATE", "LAG", "HEAD", "LAST SYNC", "PROBLEM"
        );
        for d in self.problems_first() {
            out.push_str(&format!(
                "{:<32} {:<8} {:>8.1}s {:>10} {:<24} {}\n",
                d.prefix,
                self.shown_state(d),
                d.lag_seconds(self.now_ms),
                d.head.map_or("-".into(), |h| h.to_string()),
                d.last_sync_ms.map_or("-".into(), crate::restore::format_ms),
                self.problem(d)
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

    const HOUR: u64 = 3_600_000;
    const MINUTE: u64 = 60_000;

    fn lose(d: &mut DbStatus, at_ms: u64) -> bool {
        d.continuity_losses += 1;
        d.record_continuity_loss(at_ms, "the database file was replaced")
    }

    #[test]
    fn three_losses_within_an_hour_degrade_once() {
        let mut d = DbStatus::default();
        let t = 10 * HOUR;
        assert!(!lose(&mut d, t));
        assert!(!lose(&mut d, t + 10 * MINUTE));
        assert!(!d.is_degraded(t + 10 * MINUTE));
        assert!(lose(&mut d, t + 30 * MINUTE), "the third within the hour");
        assert!(d.is_degraded(t + 30 * MINUTE));
        // Further losses while degraded are not news.
        assert!(!lose(&mut d, t + 40 * MINUTE));
        assert!(!lose(&mut d, t + 50 * MINUTE));
        assert_eq!(
            d.recent_continuity_losses_ms.len(),
            DEGRADED_LOSSES,
            "only the newest are kept"
        );
        let why = d.degraded_at(t + 50 * MINUTE).unwrap();
        assert!(why.contains("3 times within 1h"), "{why}");
        assert!(why.contains("(5 since walsync started)"), "{why}");
        assert!(why.contains("the database file was replaced"), "{why}");
    }

    #[test]
    fn degraded_ends_when_fewer_fall_within_the_hour_and_can_start_again() {
        let mut d = DbStatus::default();
        let t = 10 * HOUR;
        lose(&mut d, t);
        lose(&mut d, t + MINUTE);
        assert!(lose(&mut d, t + 2 * MINUTE));
        // An hour after the first, only two remain within the window.
        assert!(d.is_degraded(t + HOUR - 1));
        assert!(!d.is_degraded(t + HOUR));
        assert!(d.degraded_at(t + HOUR).is_none());
        // Losses after recovering: news again once three fall within an hour.
        assert!(!lose(&mut d, t + HOUR + 30 * MINUTE));
        assert!(!lose(&mut d, t + HOUR + 31 * MINUTE));
        assert!(lose(&mut d, t + HOUR + 32 * MINUTE));
        // Exactly an hour after the oldest of the three is outside the window.
        let mut edge = DbStatus::default();
        lose(&mut edge, t);
        lose(&mut edge, t + MINUTE);
        assert!(!lose(&mut edge, t + HOUR));
        // Spread out losses never degrade.
        let mut spread = DbStatus::default();
        for i in 0..10 {
            assert!(!lose(&mut spread, t + i * 31 * MINUTE));
            assert!(!spread.is_degraded(t + i * 31 * MINUTE));
        }
    }

    #[test]
    fn degraded_is_shown_but_not_unhealthy_and_problems_come_first() {
        let board = Board::default();
        let now = now_ms();
        for prefix in ["a", "b", "c"] {
            board.update(prefix, |d| {
                d.state = State::Open;
                d.sync_interval_ms = 1000;
            });
        }
        board.update("c", |d| {
            for i in 0..3 {
                lose(d, now - (3 - i) * MINUTE);
            }
        });
        board.update("b", |d| {
            d.state = State::Failing;
            d.last_error = Some("storage down".into());
        });
        let snap = board.snapshot();
        assert!(snap.unhealthy().iter().all(|(p, _)| p != "c"));
        let degraded = snap.degraded();
        assert_eq!(degraded.len(), 1);
        assert_eq!(degraded[0].0, "c");
        let c = &snap.databases[2];
        assert_eq!(c.degraded.as_deref(), Some(degraded[0].1.as_str()));
        let order: Vec<&str> = snap
            .problems_first()
            .iter()
            .map(|d| d.prefix.as_str())
            .collect();
        assert_eq!(order, vec!["b", "c", "a"]);
        let table = snap.table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[2].starts_with("c ") && lines[2].contains("degraded"),
            "{table}"
        );
        assert!(
            lines[2].contains("the database file was replaced"),
            "{table}"
        );
        // What `walsync status` reads back is what was served.
        let json = serde_json::to_string(&snap).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        assert_eq!(back.degraded(), degraded);
    }
}
