//! Compaction while `watch` runs: one task for the whole process stores the
//! runs of every database as its chain grows (see [`crate::compact`]).
//!
//! A sync that carries a chain past a multiple of the smallest level reports
//! it here. The only other wake-up is for a database that came to rest with
//! objects still inside the exact window: it is passed over once more when
//! they have all aged past it, so that they go although nothing more is
//! written (`rest_pass_at`); after that a database at rest costs nothing.
//! Passes run a few at a time, one per database at once, beside the syncs
//! and never in their way: a database's lag does not wait on its compaction.
//! A failed pass is housekeeping (what it would have stored is written by a
//! later pass): it is tried again as the chain grows, or, at rest, after a
//! backoff that grows to `REST_RETRY_MAX`.
//!
//! `watch` forgets a database here when it releases it or its settings
//! change, so that no pass at rest runs with settings it no longer has.
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};
use tracing::{debug, warn};

use crate::compact::{self, Replaced, Report};
use crate::encryption::Keys;
use crate::status::Board;
use crate::storage::Storage;

/// Passes running at once, over all databases: each reads up to one level's
/// worth of objects, eight at a time.
const PASSES_AT_ONCE: usize = 2;

/// The first wait before a database at rest is passed over again when its
/// aged objects did not go (a failing store); it doubles up to
/// `REST_RETRY_MAX`.
const REST_RETRY_FIRST: Duration = Duration::from_secs(5);
const REST_RETRY_MAX: Duration = Duration::from_secs(600);
/// The furthest ahead a pass at rest is planned (a window of years would
/// overflow the timer): if it comes before the objects have aged, the pass
/// deletes nothing and plans again.
const REST_PLAN_MAX: Duration = Duration::from_secs(30 * 24 * 3600);

/// A database whose chain has grown past a multiple of its smallest level.
#[derive(Clone)]
pub struct Due {
    pub prefix: String,
    /// The mirror `storage` is (`None`: `[storage]`); each store's chain is
    /// compacted on its own.
    pub store: Option<String>,
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

impl Due {
    /// What this task keeps apart: one database in one store.
    fn track(&self) -> String {
        match &self.store {
            None => self.prefix.clone(),
            Some(name) => format!("{}\0{name}", self.prefix),
        }
    }
}

/// True if `track` is `prefix` in some store.
fn of_prefix(track: &str, prefix: &str) -> bool {
    track
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('\0'))
}

enum Message {
    Due(Due),
    /// Released, or its settings changed: what this task knows of it and
    /// any pass at rest planned for it go.
    Forget(String),
}

/// The handle a running `watch` reports to.
#[derive(Clone)]
pub struct Compactor {
    tx: mpsc::UnboundedSender<Message>,
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
        let _ = self.tx.send(Message::Due(due));
    }

    /// Forgets `prefix`: `watch` no longer replicates it with the settings
    /// it last reported (its next report starts afresh, with a listing).
    pub fn forget(&self, prefix: &str) {
        let _ = self.tx.send(Message::Forget(prefix.to_string()));
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
    /// The newest report, whose settings and head a pass at rest uses.
    last: Option<Due>,
    /// Its entry in the schedule of passes at rest, if it has one.
    rest: Option<delay_queue::Key>,
    /// Passes in a row after which objects past the window were still
    /// stored (a failing store): the wait before the next grows with it.
    rest_retries: u32,
}

/// When a database that stays at rest should be passed over again so that
/// the objects its runs stand for go once past `window`: when the newest
/// such object ages, or, where objects that have aged are still stored (the
/// last pass failed), after a backoff that grows with `retries` (counted
/// here). `None` when nothing is left that a pass at `head` could delete:
/// the run ending at the head keeps its objects until the chain moves on,
/// and a later report takes care of them.
fn rest_pass_at(
    replaced: &VecDeque<Replaced>,
    head: u64,
    window: Duration,
    now: SystemTime,
    retries: &mut u32,
) -> Option<SystemTime> {
    let mut deletable = replaced.iter().take_while(|r| r.last < head).peekable();
    deletable.peek()?;
    // A run found by a listing has its time read when a pass reaches it, in
    // order: the newest time known does, or a window from now. (The newest,
    // not the last: after the clock stepped back, a pass stops at the first
    // run not yet aged.)
    let since = match deletable.filter_map(|r| r.timestamp_ms).max() {
        Some(ms) => SystemTime::UNIX_EPOCH + Duration::from_millis(ms),
        None => now,
    };
    let aged = since
        .checked_add(window)
        .and_then(|t| t.checked_add(Duration::from_millis(100)))
        .map_or(now + REST_PLAN_MAX, |t| t.min(now + REST_PLAN_MAX));
    if aged > now {
        *retries = 0;
        return Some(aged);
    }
    let wait = REST_RETRY_FIRST
        .saturating_mul(1u32 << (*retries).min(16))
        .min(REST_RETRY_MAX);
    *retries = retries.saturating_add(1);
    Some(now + wait)
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Message>,
    board: Board,
    scratch: PathBuf,
    stop: CancellationToken,
) {
    let mut tracks: HashMap<String, Track> = HashMap::new();
    // The newest report of each database not yet started, in arrival order.
    let mut waiting: HashMap<String, Due> = HashMap::new();
    let mut order: VecDeque<String> = VecDeque::new();
    let mut running: JoinSet<(Option<u64>, VecDeque<Replaced>)> = JoinSet::new();
    // The database of each pass running, and how to stop it.
    let mut busy: HashMap<tokio::task::Id, (String, AbortHandle)> = HashMap::new();
    // Passes of databases forgotten while they ran: stopped, their outcome
    // dropped.
    let mut forgotten: HashSet<tokio::task::Id> = HashSet::new();
    // Passes at rest (see `rest_pass_at`), one entry per database at most.
    let mut at_rest: DelayQueue<String> = DelayQueue::new();
    loop {
        // Start what may start: one pass per database, a few in all.
        let mut held = Vec::new();
        while running.len() < PASSES_AT_ONCE {
            let Some(prefix) = order.pop_front() else {
                break;
            };
            if busy.values().any(|(p, _)| *p == prefix) {
                held.push(prefix);
                continue;
            }
            let Some(due) = waiting.remove(&prefix) else {
                continue;
            };
            let track = tracks.entry(prefix.clone()).or_default();
            let (done, replaced) = (track.done, std::mem::take(&mut track.replaced));
            track.last = Some(due.clone());
            let (board, scratch) = (board.clone(), scratch.clone());
            let task =
                running.spawn(async move { pass(&due, (done, replaced), &board, &scratch).await });
            busy.insert(task.id(), (prefix, task));
        }
        for prefix in held.into_iter().rev() {
            order.push_front(prefix);
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            Some(finished) = running.join_next_with_id(), if !running.is_empty() => {
                let (id, outcome) = match finished {
                    Ok((id, outcome)) => (id, Some(outcome)),
                    Err(e) => (e.id(), None),
                };
                let Some((prefix, _)) = busy.remove(&id) else { continue };
                if forgotten.remove(&id) {
                    continue;
                }
                let track = tracks.entry(prefix.clone()).or_default();
                match outcome {
                    Some((done, replaced)) => {
                        track.done = done.or(track.done);
                        track.replaced = replaced;
                    }
                    // A pass that panicked: the next pass lists the chain
                    // and finds its runs.
                    None => {
                        track.done = None;
                        track.replaced.clear();
                    }
                }
                let plan = track.last.as_ref().and_then(|due| {
                    let window = due.window?;
                    let now = SystemTime::now();
                    let at = rest_pass_at(&track.replaced, due.head, window, now, &mut track.rest_retries)?;
                    Some(tokio::time::Instant::now() + at.duration_since(now).unwrap_or_default())
                });
                match (plan, track.rest.as_ref()) {
                    (Some(at), Some(key)) => at_rest.reset_at(key, at),
                    (Some(at), None) => track.rest = Some(at_rest.insert_at(prefix, at)),
                    (None, Some(_)) => {
                        if let Some(key) = track.rest.take() {
                            at_rest.remove(&key);
                        }
                    }
                    (None, None) => {}
                }
            }
            Some(expired) = std::future::poll_fn(|cx| at_rest.poll_expired(cx)), if !at_rest.is_empty() => {
                let prefix = expired.into_inner();
                let Some(track) = tracks.get_mut(&prefix) else { continue };
                track.rest = None;
                // A report waiting or a pass running sets the next time.
                if waiting.contains_key(&prefix) || busy.values().any(|(p, _)| *p == prefix) {
                    continue;
                }
                let Some(due) = track.last.clone() else { continue };
                debug!(prefix = %prefix, head = due.head, "passing over a database at rest");
                waiting.insert(prefix.clone(), due);
                order.push_back(prefix);
            }
            received = rx.recv() => match received {
                None => return,
                Some(Message::Due(due)) => {
                    let prefix = due.track();
                    if waiting.insert(prefix.clone(), due).is_none() {
                        order.push_back(prefix);
                    }
                }
                Some(Message::Forget(prefix)) => {
                    waiting.retain(|track, _| !of_prefix(track, &prefix));
                    let gone: Vec<String> =
                        tracks.keys().filter(|t| of_prefix(t, &prefix)).cloned().collect();
                    for track in gone {
                        if let Some(key) = tracks.remove(&track).and_then(|t| t.rest) {
                            at_rest.remove(&key);
                        }
                    }
                    // A pass running with the old settings deletes nothing more.
                    for (id, (p, task)) in &busy {
                        if of_prefix(p, &prefix) {
                            task.abort();
                            forgotten.insert(*id);
                        }
                    }
                }
            },
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
                store = %crate::mirror::Label::of(due.store.as_deref()),
                error = %e,
                "deleting objects older than the exact window failed; tried again as the chain grows or after a while at rest"
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
                store = %crate::mirror::Label::of(due.store.as_deref()),
                error = %e,
                "compaction failed; it is tried again as the chain grows or after a while at rest"
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(first: u64, last: u64, timestamp_ms: Option<u64>) -> Replaced {
        Replaced {
            first,
            last,
            timestamp_ms,
        }
    }

    fn at_ms(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    const WINDOW: Duration = Duration::from_secs(60);

    #[test]
    fn a_database_at_rest_is_passed_over_once_its_newest_replaced_object_ages() {
        let replaced = [run(2, 4, Some(1_000)), run(5, 8, Some(9_000))].into();
        let mut retries = 3;
        let at = rest_pass_at(&replaced, 12, WINDOW, at_ms(10_000), &mut retries);
        assert_eq!(at, Some(at_ms(9_000 + 60_000 + 100)));
        assert_eq!(retries, 0);
        // Runs found by a listing and not yet read: the newest time known.
        let listed = [run(2, 4, Some(1_000)), run(5, 8, None)].into();
        let at = rest_pass_at(&listed, 12, WINDOW, at_ms(10_000), &mut retries);
        assert_eq!(at, Some(at_ms(1_000 + 60_000 + 100)));
        let unknown = [run(2, 4, None)].into();
        let at = rest_pass_at(&unknown, 12, WINDOW, at_ms(10_000), &mut retries);
        assert_eq!(at, Some(at_ms(10_000 + 60_000 + 100)));
    }

    /// The run ending at the head keeps its objects until the chain moves
    /// on: a pass at the same head could delete nothing, so none is planned
    /// (planning one re-fired at once, for ever).
    #[test]
    fn nothing_is_planned_where_only_the_heads_run_is_left() {
        let mut retries = 0;
        let head_only = [run(9, 12, Some(1_000))].into();
        assert_eq!(
            rest_pass_at(&head_only, 12, WINDOW, at_ms(1_000_000), &mut retries),
            None
        );
        assert_eq!(
            rest_pass_at(&VecDeque::new(), 12, WINDOW, at_ms(0), &mut retries),
            None
        );
        // Runs before the head's are planned for, the head's is not.
        let both = [run(5, 8, Some(5_000)), run(9, 12, Some(90_000))].into();
        assert_eq!(
            rest_pass_at(&both, 12, WINDOW, at_ms(10_000), &mut retries),
            Some(at_ms(5_000 + 60_000 + 100))
        );
    }

    /// A window of years plans no further than a month ahead (the timer
    /// refuses more, and a time past `SystemTime`'s range overflows); the
    /// newest time counts even where the clock stepped back.
    #[test]
    fn a_long_window_is_planned_a_month_at_a_time() {
        let mut retries = 0;
        let replaced = [run(1, 4, Some(5_000)), run(5, 8, Some(2_000))].into();
        let now = at_ms(10_000);
        for window in [Duration::from_secs(3 * 365 * 24 * 3600), Duration::MAX] {
            assert_eq!(
                rest_pass_at(&replaced, 12, window, now, &mut retries),
                Some(now + REST_PLAN_MAX)
            );
        }
        assert_eq!(
            rest_pass_at(&replaced, 12, WINDOW, now, &mut retries),
            Some(at_ms(5_000 + 60_000 + 100))
        );
    }

    /// Objects past the window still stored after a pass (the store failed)
    /// are tried again after a wait that doubles, never in a tight loop.
    #[test]
    fn a_failing_store_is_tried_again_after_a_growing_wait() {
        let replaced = [run(2, 4, Some(1_000))].into();
        let now = at_ms(1_000_000);
        let mut retries = 0;
        let mut waits = Vec::new();
        for _ in 0..12 {
            let at = rest_pass_at(&replaced, 12, WINDOW, now, &mut retries).unwrap();
            waits.push(at.duration_since(now).unwrap().as_secs());
        }
        assert_eq!(
            waits,
            [5, 10, 20, 40, 80, 160, 320, 600, 600, 600, 600, 600]
        );
        // Once they go, the count starts again.
        let later = [run(5, 8, Some(2_000_000))].into();
        rest_pass_at(&later, 12, WINDOW, now, &mut retries);
        assert_eq!(retries, 0);
    }
}
