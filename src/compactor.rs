//! Compaction while `watch` runs: one task for the whole process stores the
//! runs of every database as its chain grows (see [`crate::compact`]).
//!
//! A sync that carries a chain past a multiple of the smallest level reports
//! it here. The only other wake-up is for a database that came to rest with
//! objects still inside the exact window: it is passed over once more when
//! they have all aged past it, so that they go although nothing is written;
//! after that a database at rest costs nothing.
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
#[derive(Clone)]
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
    /// The newest report of this database, to pass over it again once its
    /// replaced objects are old enough to go, should it stay idle till then.
    last: Option<Due>,
    /// When that is, as of the last pass.
    aged_at: Option<std::time::SystemTime>,
    /// Whether the schedule holds an entry for it (one at most: a busy
    /// database moves its time on at every pass, and the entry follows).
    scheduled: bool,
}

/// When the objects of `replaced` will all be older than `window`, if known:
/// a database at rest is passed over once more then (one wake-up), so that
/// its objects go although its chain no longer grows.
fn all_aged_at(replaced: &VecDeque<Replaced>, window: Duration) -> Option<std::time::SystemTime> {
    let newest = replaced
        .back()?
        .timestamp_ms
        .or(replaced.front()?.timestamp_ms)?;
    let at = std::time::UNIX_EPOCH + Duration::from_millis(newest) + window;
    // A little after, so that the pass finds them past the window.
    Some(at + Duration::from_millis(100))
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
    // Databases to pass over again when their replaced objects have aged
    // (see `all_aged_at`), soonest first.
    let mut aging: std::collections::BinaryHeap<
        std::cmp::Reverse<(std::time::SystemTime, String)>,
    > = std::collections::BinaryHeap::new();
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
            track.last = Some(due.clone());
            let (done, replaced) = (track.done, std::mem::take(&mut track.replaced));
            let (board, scratch) = (board.clone(), scratch.clone());
            let task =
                running.spawn(async move { pass(&due, (done, replaced), &board, &scratch).await });
            busy.insert(task.id(), prefix);
        }
        for prefix in held.into_iter().rev() {
            order.push_front(prefix);
        }
        let next_aged = aging.peek().map(|std::cmp::Reverse((at, _))| {
            let wait = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::Instant::now() + wait
        });
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            () = tokio::time::sleep_until(next_aged.unwrap_or_else(tokio::time::Instant::now)), if next_aged.is_some() => {
                let now = std::time::SystemTime::now();
                while let Some(std::cmp::Reverse((at, _))) = aging.peek() {
                    if *at > now {
                        break;
                    }
                    let Some(std::cmp::Reverse((_, prefix))) = aging.pop() else { break };
                    let Some(track) = tracks.get_mut(&prefix) else { continue };
                    match track.aged_at {
                        // Passes since moved the time on: wait for that.
                        Some(later) if later > now => {
                            aging.push(std::cmp::Reverse((later, prefix)));
                            continue;
                        }
                        Some(_) => {}
                        None => {
                            track.scheduled = false;
                            continue;
                        }
                    }
                    track.scheduled = false;
                    track.aged_at = None;
                    // A newer report waiting already does as well (and must
                    // not be replaced by this older one).
                    if waiting.contains_key(&prefix) {
                        continue;
                    }
                    let Some(due) = track.last.clone() else { continue };
                    waiting.insert(prefix.clone(), due);
                    order.push_back(prefix);
                }
            }
            Some(finished) = running.join_next_with_id(), if !running.is_empty() => {
                let (id, done, replaced) = match finished {
                    Ok((id, (done, replaced))) => (id, done, replaced),
                    // A pass that panicked: the next listing pass finds its runs.
                    Err(e) => (e.id(), None, VecDeque::new()),
                };
                if let Some(prefix) = busy.remove(&id) {
                    let track = tracks.entry(prefix.clone()).or_default();
                    track.done = done.or(track.done);
                    track.replaced = replaced;
                    let window = track.last.as_ref().and_then(|d| d.window);
                    track.aged_at = window.and_then(|w| all_aged_at(&track.replaced, w));
                    if let Some(at) = track.aged_at
                        && !track.scheduled
                    {
                        track.scheduled = true;
                        aging.push(std::cmp::Reverse((at, prefix)));
                    }
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
