//! Compaction while `watch` runs: one task for the whole process stores the
//! runs of every database as its chain grows (see [`crate::compact`]).
//!
//! A sync that carries a chain past a multiple of the smallest level reports
//! it here; nothing else wakes the task, so a database at rest costs nothing.
//! Passes run a few at a time, one per database at once, beside the syncs
//! and never in their way: a database's lag does not wait on its compaction,
//! and a failed pass is only tried again when the chain next grows (it is
//! housekeeping; what it would have stored is written by a later pass).
//!
//! The first pass of a database in this process, and the first after a
//! snapshot, lists its chain and fills in every run it lacks
//! ([`compact::compact_chain`]); later ones name their inputs from the rule
//! that places runs and list nothing ([`compact::compact_since`]).
//!
//! After compacting, a pass deletes the objects of smallest-level runs that
//! have grown older than the exact window ([`compact::delete_replaced`]):
//! this process remembers those runs (a few bytes each, about an hour's
//! worth per database), so deleting lists nothing either.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::compact::{self, Replaced, Report};
use crate::encryption::Keys;
use crate::status::Board;
use crate::storage::Storage;

/// Passes running at once, over all databases: each reads up to one level's
/// worth of objects, eight at a time.
const PASSES_AT_ONCE: usize = 2;

/// A database whose chain has grown past a multiple of its smallest level.
pub struct Due {
    pub prefix: String,
    pub storage: Arc<dyn Storage>,
    pub keys: Option<Arc<Keys>>,
    pub levels: Arc<[u64]>,
    /// Objects a run stands for go once this old; `None` keeps them.
    pub window: Option<Duration>,
    /// The newest durable object.
    pub head: u64,
    /// The newest snapshot at or before `head`.
    pub snapshot: u64,
}

/// The handle a running `watch` reports to.
#[derive(Clone)]
pub struct Compactor {
    tx: mpsc::UnboundedSender<Due>,
}

impl Compactor {
    /// Starts the task; it ends with `stop` (a pass cut short stores nothing
    /// half-made: each run is one create-only write).
    pub fn start(board: Board, scratch: PathBuf, stop: CancellationToken) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, board, scratch, stop));
        Self { tx }
    }

    pub fn due(&self, due: Due) {
        // Gone only once `watch` is stopping: nothing left to compact for.
        let _ = self.tx.send(due);
    }
}

/// What this process knows of a database's runs.
#[derive(Default)]
struct Track {
    /// Every run ending at or before this sequence is stored; `None` until
    /// a listing pass has succeeded.
    done: Option<u64>,
    /// Smallest-level runs whose objects may still be stored, oldest first.
    replaced: VecDeque<Replaced>,
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Due>,
    board: Board,
    scratch: PathBuf,
    stop: CancellationToken,
) {
    let mut tracks: HashMap<String, Track> = HashMap::new();
    // The newest report of each database not yet started, in arrival order.
    let mut waiting: HashMap<String, Due> = HashMap::new();
    let mut order: VecDeque<String> = VecDeque::new();
    let mut running: JoinSet<(Option<u64>, VecDeque<Replaced>)> = JoinSet::new();
    // The database of each pass running.
    let mut busy: HashMap<tokio::task::Id, String> = HashMap::new();
    loop {
        // Start what may start: one pass per database, a few in all.
        let mut held = Vec::new();
        while running.len() < PASSES_AT_ONCE {
            let Some(prefix) = order.pop_front() else {
                break;
            };
            if busy.values().any(|p| *p == prefix) {
                held.push(prefix);
                continue;
            }
            let Some(due) = waiting.remove(&prefix) else {
                continue;
            };
            let track = tracks.entry(prefix.clone()).or_default();
            let (done, replaced) = (track.done, std::mem::take(&mut track.replaced));
            let (board, scratch) = (board.clone(), scratch.clone());
            let task =
                running.spawn(async move { pass(&due, (done, replaced), &board, &scratch).await });
            busy.insert(task.id(), prefix);
        }
        for prefix in held.into_iter().rev() {
            order.push_front(prefix);
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            Some(finished) = running.join_next_with_id(), if !running.is_empty() => {
                let (id, done, replaced) = match finished {
                    Ok((id, (done, replaced))) => (id, done, replaced),
                    // A pass that panicked: the next listing pass finds its runs.
                    Err(e) => (e.id(), None, VecDeque::new()),
                };
                if let Some(prefix) = busy.remove(&id) {
                    let track = tracks.entry(prefix).or_default();
                    track.done = done.or(track.done);
                    track.replaced = replaced;
                }
            }
            received = rx.recv() => {
                let Some(due) = received else { return };
                let prefix = due.prefix.clone();
                if waiting.insert(prefix.clone(), due).is_none() {
                    order.push_back(prefix);
                }
            }
        }
    }
}

/// One pass over a database, given what the last one left: the sequence up
/// to which its runs now stand (`None` if the pass failed), and the runs
/// whose objects may still be stored.
async fn pass(
    due: &Due,
    (done, mut replaced): (Option<u64>, VecDeque<Replaced>),
    board: &Board,
    scratch: &std::path::Path,
) -> (Option<u64>, VecDeque<Replaced>) {
    let done = pass_compact(due, done, &mut replaced, board, scratch).await;
    if let (Some(window), Some(_)) = (due.window, done) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let storage = due.storage.as_ref();
        match compact::delete_replaced(
            storage,
            &due.prefix,
            &mut replaced,
            (window, due.head, now_ms),
        )
        .await
        {
            Ok(0) => {}
            Ok(deleted) => {
                board.update(&due.prefix, |s| s.replaced_deleted += deleted);
                debug!(prefix = %due.prefix, deleted, "deleted objects older than the exact window");
            }
            Err(e) => warn!(
                prefix = %due.prefix,
                error = %e,
                "deleting objects older than the exact window failed; tried again as the chain grows"
            ),
        }
    }
    (done, replaced)
}

/// The compaction part of [`pass`]: a listing pass replaces `replaced`
/// with what it found, a later one adds the runs it placed.
async fn pass_compact(
    due: &Due,
    done: Option<u64>,
    replaced: &mut VecDeque<Replaced>,
    board: &Board,
    scratch: &std::path::Path,
) -> Option<u64> {
    let storage = due.storage.as_ref();
    let incremental = match done {
        Some(done) if done >= due.snapshot => Some(
            compact::compact_since(
                storage,
                &due.prefix,
                &due.levels,
                (done, due.head, due.snapshot),
                due.keys.clone(),
                scratch,
            )
            .await,
        ),
        _ => None,
    };
    let result = match incremental {
        Some(Ok(report)) => {
            replaced.extend(report.replaced.iter().copied());
            Ok(report)
        }
        other => {
            if let Some(Err(e)) = other {
                debug!(prefix = %due.prefix, error = %e, "compacting from a listing instead");
            }
            let listed = compact::compact_chain(
                storage,
                &due.prefix,
                &due.levels,
                due.keys.clone(),
                scratch,
            )
            .await;
            if let Ok(report) = &listed {
                *replaced = report.replaced.iter().copied().collect();
            }
            listed
        }
    };
    match result {
        Ok(report) => {
            record(board, &due.prefix, &report);
            debug!(
                prefix = %due.prefix,
                head = due.head,
                runs = report.built.len(),
                present = report.present,
                read = report.read,
                "compacted"
            );
            Some(due.head)
        }
        Err(e) if e.went_meanwhile() => {
            debug!(prefix = %due.prefix, error = %e, "an object went while compacting; listed again next pass");
            None
        }
        Err(e) => {
            board.update(&due.prefix, |s| s.compaction_failures += 1);
            warn!(
                prefix = %due.prefix,
                error = %e,
                "compaction failed; it is tried again as the chain grows"
            );
            None
        }
    }
}

fn record(board: &Board, prefix: &str, report: &Report) {
    board.update(prefix, |s| {
        s.runs_stored += report.built.len() as u64;
        s.compaction_reads += report.read as u64;
        s.runs_bytes += report.bytes;
    });
}
