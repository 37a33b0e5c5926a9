//! The watch loop: one file watcher for every database, a schedule of which
//! database to sync when, and a bounded pool of syncs in flight.
//!
//! A database at rest costs its [`Replica`] and a few words here: no task, no
//! timer. A WAL change event (or a retry or checkpoint that is due) puts it on
//! the schedule, at most once per sync interval; a sync (which first opens the
//! database if needed) then runs on the shared runtime and hands the replica
//! back. A database that fails (missing file, corrupt WAL, storage errors on its
//! prefix) is retried with backoff on its own; the others go on.
//!
//! With a configuration file the set of databases is live: files appearing in
//! or disappearing from a watched directory or glob, and edits of the file
//! itself, are picked up without a restart. An invalid edit is refused with an
//! error and the running set is kept. On shutdown every database gets a final
//! flush within a deadline, and those that could not be flushed are named.
//!
//! This file is the loop (`Fleet`) and what it does on each message; its parts
//! live beside it: `watcher` (file events to "this database changed"),
//! `schedule` (which database is looked at when), `due` (when after a
//! job), `budget` (open descriptors), `slot` (one database in the fleet),
//! `plan` (which databases) and `shutdown`.
//!
//! Why this file is long: it is the loop and what it does on each message, all
//! reading and writing the one `Fleet`; the parts that stand on their own are
//! in the files beside it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::chain::ObjectRef;
use crate::compactor::{self, Compactor};
use crate::config::{self, Config, WatchSettings};
use crate::control::{self, SyncRequest};
use crate::db::wal_path_of;
use crate::mirror::Mirror;
use crate::replica::{self, Replica, SyncOptions, SyncReport};
use crate::status::{self, Board, State};
use crate::storage::Storage;
use crate::tips;

mod budget;
mod due;
mod plan;
mod schedule;
mod shutdown;
mod slot;
mod watcher;

pub use budget::raise_open_file_limit;
use budget::{Holding, descriptor_budget};
use plan::canonical;
pub use plan::{DbSpec, Plan, in_canonical_dir};
use schedule::Schedule;
pub use shutdown::Outcome;
use slot::*;
use watcher::{Msg, Routes};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("starting the file watcher: {0}")]
    Watch(#[source] notify::Error),
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("control socket: {0}")]
    Control(#[source] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A finished job: the slot, its replica (if open), what happened.
type Done = (usize, Option<Replica>, replica::Result<SyncReport>);

/// What the loop reports to the rest of the process.
#[derive(Debug, Default)]
pub struct Hooks {
    /// Told once every database named at start has been synced once (or has
    /// failed its first attempt, which is logged): when sidecar mode starts
    /// the app.
    pub first_pass: Option<oneshot::Sender<()>>,
    /// Where each database's state is posted.
    pub board: Board,
    /// Serve `walsync sync` requests on this Unix socket.
    pub control: Option<PathBuf>,
}

/// Replicates the databases of `plan` until `shutdown`.
pub async fn run(plan: Plan, shutdown: CancellationToken, hooks: Hooks) -> Result<Outcome> {
    let (tx, rx) = mpsc::unbounded_channel::<Msg>();
    let (sync_tx, sync_rx) = mpsc::unbounded_channel::<SyncRequest>();
    let control_stop = CancellationToken::new();
    let _control_stop = control_stop.clone().drop_guard();
    if let Some(path) = hooks.control {
        let listener = control::bind(&path).await.map_err(Error::Control)?;
        tokio::spawn(control::serve(listener, path, sync_tx, control_stop));
    }
    let routes: Routes = Arc::new(RwLock::new(HashMap::new()));
    let router = watcher::Router {
        routes: routes.clone(),
        config_files: plan.config_files(),
        tx,
    };
    let watcher = watcher::start(router, plan.watch().poll).map_err(Error::Watch)?;
    // Compaction stops when shutdown starts: the final flush is what counts.
    let compaction_stop = shutdown.child_token();
    let _compaction_stop = compaction_stop.clone().drop_guard();
    let config_text = plan
        .config_file()
        .and_then(|p| std::fs::read_to_string(p).ok());
    let mut fleet = Fleet {
        plan,
        slots: HashMap::new(),
        by_key: HashMap::new(),
        next_id: 0,
        routes,
        watcher,
        watched: HashMap::new(),
        schedule: Schedule::default(),
        ready: VecDeque::new(),
        to_close: VecDeque::new(),
        waiting_room: VecDeque::new(),
        in_flight: JoinSet::new(),
        job_of: HashMap::new(),
        releasing: HashMap::new(),
        rescan_at: None,
        config_text,
        config_parsed: true,
        holding: Holding::default(),
        budget: 0,
        last_trim: None,
        trim_at: None,
        first_pass: HashSet::new(),
        first_pass_done: hooks.first_pass,
        compactor: Compactor::start(
            hooks.board.clone(),
            std::env::temp_dir(),
            compaction_stop.clone(),
        ),
        board: hooks.board,
        listing: None,
    };
    fleet.budget = fleet
        .plan
        .watch()
        .max_open
        .unwrap_or_else(|| descriptor_budget(fleet.plan.watch().parallelism));
    debug!(budget = fleet.budget, "databases kept open at most");
    fleet.watch_roots();
    let targets = fleet.plan.targets()?;
    fleet.list_storage(&targets).await;
    fleet.apply(targets);
    fleet.first_pass = fleet.slots.keys().copied().collect();
    fleet.first_pass_progress(None);
    fleet.run(rx, sync_rx, shutdown).await;
    fleet.shutdown().await
}

struct Fleet {
    plan: Plan,
    slots: HashMap<usize, Slot>,
    by_key: HashMap<PathBuf, usize>,
    next_id: usize,
    routes: Routes,
    watcher: Box<dyn Watcher + Send>,
    /// Directories watched (and whether recursively), each with the
    /// identity (device, inode) it had then: one removed and made again is
    /// a new directory, which the old watch does not see.
    watched: HashMap<(PathBuf, bool), (u64, u64)>,
    schedule: Schedule,
    /// Databases due for a sync, in order.
    ready: VecDeque<usize>,
    /// Open databases to close (idle, or beyond the budget); started only
    /// when no sync waits, within the same parallelism bound.
    to_close: VecDeque<usize>,
    /// Syncs that would open a database, held back while at the budget.
    waiting_room: VecDeque<usize>,
    in_flight: JoinSet<Done>,
    /// The database of each job in flight, so that one whose task panicked
    /// is handed back (and reopened by its next sync) instead of being left
    /// marked as running for good.
    job_of: HashMap<tokio::task::Id, usize>,
    /// Databases released (by a configuration edit) whose last job or final
    /// flush is still running, by their old id: their file and prefix. A
    /// new entry for either waits for it, so that one process never writes
    /// a prefix twice at once (a prefix handed from one database to another
    /// in one edit would find its next sequence taken, as if by a second
    /// writer, and stop).
    releasing: HashMap<usize, (PathBuf, String)>,
    /// A rescan is due at this time (events are debounced).
    rescan_at: Option<Instant>,
    /// The configuration text last applied.
    config_text: Option<String>,
    /// Whether the file as last read parsed (a refused text is not parsed
    /// again until it changes, but stays refused).
    config_parsed: bool,
    /// Databases held open, being opened, or closing; and how many may be
    /// held open.
    holding: Holding,
    budget: usize,
    /// When freed memory was last handed back to the system.
    last_trim: Option<Instant>,
    /// Freed memory is due to be handed back then (after a burst of closes).
    trim_at: Option<Instant>,
    /// Databases named at start that have not finished a first sync attempt.
    first_pass: HashSet<usize>,
    first_pass_done: Option<oneshot::Sender<()>>,
    board: Board,
    /// The whole storage listed once at start, for first opens.
    listing: Option<StartListing>,
    compactor: Compactor,
}

/// The stores listed once at start: when, the tips of the chains by prefix
/// (see [`tips::Tips::found`]) for each store (`[storage]`, then the
/// mirrors; see [`StoreListing`] for one that failed or did not answer),
/// and the prefixes whose first open used it.
type StartListing = (Instant, Vec<StoreListing>, HashSet<String>);

/// How one store's start-up listing ended.
enum StoreListing {
    Listed(Tips),
    /// It failed: each database lists its prefix there itself.
    Failed,
    /// A mirror that had not answered when `[storage]` had: no database
    /// waits for it at open.
    Unanswered,
}

/// One store's tips by prefix.
type Tips = HashMap<String, Option<Vec<ObjectRef>>>;

/// One store's start-up listing (`name`: a mirror's, or `None` for
/// `[storage]`), or `None` where it failed.
async fn list_store(
    name: Option<&str>,
    storage: &Arc<dyn Storage>,
    pages: &AtomicU64,
) -> Option<Tips> {
    let store = crate::mirror::Label::of(name);
    match tips::list_tips_counted(storage.as_ref(), "", pages).await {
        Ok(found) => {
            info!(
                %store,
                databases = found.found.len(),
                "listed the store once for the start-up"
            );
            for (name, why) in &found.refused {
                warn!(%store, name = ?name, why, "ignoring a database name in storage that is not valid");
            }
            Some(found.found.into_iter().map(|f| (f.name, f.tips)).collect())
        }
        Err(e) => {
            warn!(%store, error = %e, "listing the store failed; each database lists its own prefix there");
            None
        }
    }
}

/// Fleets at least this big list their storage once at start rather than
/// once per database.
const LIST_ONCE_FROM: usize = 32;
/// Longest the start-up sweep of unfinished uploads may hold up the start.
const SWEEP_AT_START: Duration = Duration::from_secs(30);
/// A start-up listing is used for first opens this long; later ones list
/// their prefix themselves.
const LISTING_FRESH: Duration = Duration::from_secs(120);
/// A mirror's start-up listing that, once `[storage]`'s has ended, reads no
/// page for this long is given up on: one that hangs must not hold back
/// the start, while one that is only slower (a large store) is waited for.
const MIRROR_LISTING_GRACE: Duration = Duration::from_secs(10);

/// Closing databases frees memory in many small pieces; hand it back to the
/// system at most this often.
const TRIM_EVERY: Duration = Duration::from_secs(1);

const RESCAN_DEBOUNCE: Duration = Duration::from_millis(200);

/// How often a directory to watch that does not exist is looked for.
const MISSING_ROOT_RECHECK: Duration = Duration::from_secs(2);

/// What an edit of settings read at start only leaves running, or `None`
/// when the edit changes none of them. Those keep their running values
/// (the stores under running chains, the watcher, the sockets) until
/// walsync is restarted.
fn restart_needed(old: &Config, new: &Config) -> Option<String> {
    let (was, now) = (&old.watch, &new.watch);
    let changed: Vec<&str> = [
        ("[storage]", old.storage != new.storage),
        ("[[mirrors]]", old.mirrors != new.mirrors),
        ("[watch] listen", was.listen != now.listen),
        (
            "[watch] control_socket",
            was.control_socket != now.control_socket,
        ),
        (
            "[watch] watcher",
            was.poll != now.poll || was.poll_interval != now.poll_interval,
        ),
        ("[watch] max_open", was.max_open != now.max_open),
    ]
    .into_iter()
    .filter_map(|(what, differs)| differs.then_some(what))
    .collect();
    (!changed.is_empty()).then(|| {
        format!(
            "the file's {} differ from what is running, which is read at start only: the old \
             settings stay in use until walsync is restarted",
            changed.join(", ")
        )
    })
}

/// Keeps what [`restart_needed`] names at its running value in `new`.
fn keep_start_only(old: &Config, new: &mut Config) {
    new.storage = old.storage.clone();
    new.mirrors = old.mirrors.clone();
    let (was, now) = (&old.watch, &mut new.watch);
    now.listen = was.listen;
    now.control_socket = was.control_socket.clone();
    now.poll = was.poll;
    now.poll_interval = was.poll_interval;
    now.max_open = was.max_open;
}

impl Fleet {
    async fn run(
        &mut self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        mut sync_rx: mpsc::UnboundedReceiver<SyncRequest>,
        shutdown: CancellationToken,
    ) {
        let watch = self.plan.watch().clone();
        let mut poll = tokio::time::interval(watch.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = self.schedule.next();
            let next = [next, self.rescan_at, self.trim_at]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                Some(done) = self.in_flight.join_next_with_id(), if !self.in_flight.is_empty() => {
                    match done {
                        Ok((task, done)) => {
                            self.job_of.remove(&task);
                            self.finished(done);
                        }
                        Err(e) => {
                            error!(error = %e, "a sync task failed; its database is opened again");
                            let id = self.job_of.remove(&e.id()).unwrap_or(usize::MAX);
                            let path = self.slots.get(&id).map(|s| s.spec.path.clone());
                            let failed = replica::Error::Worker {
                                path: path.unwrap_or_default(),
                                message: format!("the sync task failed: {e}"),
                            };
                            self.finished((id, None, Err(failed)));
                        }
                    }
                }
                Some(msg) = rx.recv() => match msg {
                    Msg::Db(id) => {
                        if let Some(slot) = self.slots.get(&id) {
                            slot.queued.store(false, Ordering::Release);
                        }
                        self.changed(id);
                    }
                    Msg::Rescan => {
                        self.rescan_at.get_or_insert(Instant::now() + RESCAN_DEBOUNCE);
                    }
                },
                Some(request) = sync_rx.recv() => self.sync_request(request),
                _ = poll.tick(), if watch.poll => {
                    self.poll_files();
                    self.rescan();
                }
                _ = sleep_until(next), if next.is_some() => {
                    if self.rescan_at.is_some_and(|t| t <= Instant::now()) {
                        self.rescan_at = None;
                        self.rescan();
                    }
                    self.trim_if_due(Instant::now());
                    self.pop_due();
                }
            }
        }
    }

    /// Poll mode: a database whose file or WAL changed size or modification
    /// time since the last poll counts as changed.
    fn poll_files(&mut self) {
        fn stamp(path: &Path) -> (u64, i64, i64) {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(path)
                .map(|m| (m.len(), m.mtime(), m.mtime_nsec()))
                .unwrap_or((0, 0, 0))
        }
        let mut changed = Vec::new();
        for (id, slot) in &mut self.slots {
            let now = [stamp(&slot.key), stamp(&wal_path_of(&slot.key))];
            if slot.seen.is_some_and(|seen| seen != now) {
                changed.push(*id);
            }
            slot.seen = Some(now);
        }
        for id in changed {
            self.changed(id);
        }
    }

    /// Watches the directories the plan needs: those not watched yet, and
    /// those removed and made again since. One that does not exist (yet, or
    /// any more) is looked for again every few seconds: nothing else would
    /// say when it comes back.
    fn watch_roots(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let roots = self.plan.roots();
        let gone: Vec<(PathBuf, bool)> = self
            .watched
            .keys()
            .filter(|root| !roots.contains(*root))
            .cloned()
            .collect();
        for root in gone {
            let _ = self.watcher.unwatch(&root.0);
            self.watched.remove(&root);
        }
        let mut missing = false;
        for (dir, recursive) in roots {
            let identity = std::fs::metadata(&dir)
                .ok()
                .filter(|m| m.is_dir())
                .map(|m| (m.dev(), m.ino()));
            let root = (dir, recursive);
            match (self.watched.get(&root), identity) {
                (Some(watched), Some(now)) if *watched == now => continue,
                (Some(_), _) => {
                    let _ = self.watcher.unwatch(&root.0);
                    self.watched.remove(&root);
                }
                (None, _) => {}
            }
            let Some(identity) = identity else {
                missing = true;
                continue;
            };
            let mode = if recursive {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            match self.watcher.watch(&root.0, mode) {
                Ok(()) => {
                    debug!(dir = %root.0.display(), "watching directory");
                    self.watched.insert(root, identity);
                }
                Err(e) => warn!(dir = %root.0.display(), error = %e, "cannot watch directory"),
            }
        }
        if missing {
            let again = Instant::now() + MISSING_ROOT_RECHECK;
            self.rescan_at = Some(self.rescan_at.map_or(again, |at| at.min(again)));
        }
    }

    /// Re-reads the configuration if it changed and re-discovers databases.
    /// Stores are not swapped under running chains: a changed `[storage]`
    /// or mirror is said, and used from the next start.
    fn rescan(&mut self) {
        if let Plan::Config { config, .. } = &mut self.plan {
            let text = std::fs::read_to_string(&config.source).ok();
            if text.is_some() && text != self.config_text {
                let Some(text) = text else { return };
                match Config::parse(&text, &config.source) {
                    Ok(mut new) => {
                        let restart = restart_needed(config, &new);
                        if let Some(why) = &restart {
                            warn!(config = %config.source.display(), "{why}");
                        }
                        self.board.config_restart_needed(restart);
                        keep_start_only(config, &mut new);
                        *config = new;
                        info!(config = %config.source.display(), "configuration reloaded");
                        self.config_parsed = true;
                    }
                    Err(e) => {
                        error!(error = %e, "configuration edit refused; the running set is kept");
                        self.board.config_refused(e.to_string());
                        self.config_parsed = false;
                        self.config_text = Some(text);
                        return;
                    }
                }
                self.config_text = Some(text);
            }
        }
        self.watch_roots();
        match self.plan.targets() {
            Ok(targets) => {
                self.apply(targets);
                if self.config_parsed {
                    self.board.config_accepted();
                }
            }
            Err(e) => {
                error!(error = %e, "database discovery refused; the running set is kept");
                // The file parses, but what it names cannot all be watched
                // (two entries for one path or prefix, an unreadable
                // directory): it is not what runs.
                if matches!(self.plan, Plan::Config { .. }) {
                    self.board.config_refused(e.to_string());
                }
            }
        }
    }

    /// Makes the running set equal `targets`.
    fn apply(&mut self, targets: Vec<DbSpec>) {
        let wanted: HashMap<PathBuf, DbSpec> = targets
            .into_iter()
            .map(|spec| (canonical(&spec.path), spec))
            .collect();
        let gone: Vec<usize> = self
            .slots
            .iter()
            .filter(|(_, slot)| match wanted.get(&slot.key) {
                None => true,
                Some(spec) => spec.prefix != slot.spec.prefix,
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.release(id);
        }
        for (key, spec) in wanted {
            match self.by_key.get(&key).copied() {
                Some(id) => {
                    if let Some(slot) = self.slots.get_mut(&id)
                        && slot.spec.sync != spec.sync
                    {
                        info!(db = %spec.path.display(), "sync settings changed");
                        let (old, new) = (&slot.spec.sync, &spec.sync);
                        if old.compaction != new.compaction
                            || old.exact_window != new.exact_window
                            || old.encryption != new.encryption
                        {
                            // No pass runs with the settings it had; the
                            // next report brings the new ones.
                            self.compactor.forget(&slot.spec.prefix);
                        }
                        if let Some(replica) = slot.replica.as_mut() {
                            replica.set_options(spec.sync.clone());
                        }
                        slot.spec.sync = spec.sync;
                    }
                }
                None => self.add(key, spec),
            }
        }
    }

    fn add(&mut self, key: PathBuf, spec: DbSpec) {
        let id = self.next_id;
        self.next_id += 1;
        info!(
            db = %spec.path.display(),
            prefix = %spec.prefix,
            storage = %spec.storage.describe(),
            "watching"
        );
        let queued = Arc::new(AtomicBool::new(false));
        if let Ok(mut routes) = self.routes.write() {
            routes.insert(wal_path_of(&key), (id, queued.clone()));
            routes.insert(key.clone(), (id, queued.clone()));
        }
        self.by_key.insert(key.clone(), id);
        self.board.update(&spec.prefix, |d| {
            d.path = spec.path.display().to_string();
            d.state = State::Waiting;
            d.sync_interval_ms = spec.sync.sync_interval.as_millis() as u64;
            d.pending_since_ms.get_or_insert_with(status::now_ms);
        });
        self.slots.insert(
            id,
            Slot {
                spec,
                key,
                replica: None,
                last_sync: None,
                job: Job::Idle,
                dirty: true,
                failures: 0,
                queued,
                attached: false,
                seen: None,
                rechecks: 0,
                changed_during_job: None,
                jobs_started: 0,
                waiters: Vec::new(),
                refused: None,
                wal_warned: None,
                wal_bytes_at_sync: 0,
                compaction_reported: 0,
            },
        );
        self.schedule_at(id, Instant::now());
    }

    /// Stops replicating a database, after a last flush if it is open.
    fn release(&mut self, id: usize) {
        let Some(mut slot) = self.slots.remove(&id) else {
            return;
        };
        info!(db = %slot.spec.path.display(), prefix = %slot.spec.prefix, "released");
        self.board.remove(&slot.spec.prefix);
        self.compactor.forget(&slot.spec.prefix);
        for (_, waiter) in slot.waiters.drain(..) {
            let _ = waiter.send((
                slot.spec.prefix.clone(),
                Err("released while waiting".into()),
            ));
        }
        self.holding.release(&slot);
        self.schedule.remove(id);
        self.first_pass_progress(Some(id));
        if let Ok(mut routes) = self.routes.write() {
            routes.remove(&slot.key);
            routes.remove(&wal_path_of(&slot.key));
        }
        self.by_key.remove(&slot.key);
        // A running job hands its replica back to a slot that is gone; it is dropped then.
        if slot.job.running() {
            self.releasing.insert(id, (slot.key, slot.spec.prefix));
        } else if let Some(mut replica) = slot.replica.take()
            && slot.spec.path.exists()
        {
            let task = self.in_flight.spawn(async move {
                let result = replica.flush().await;
                (id, None, result)
            });
            self.job_of.insert(task.id(), id);
            self.releasing.insert(id, (slot.key, slot.spec.prefix));
        }
    }

    /// Whether a released database's last write is still running on this
    /// slot's file or prefix.
    fn waits_for_release(&self, slot: &Slot) -> bool {
        self.releasing
            .values()
            .any(|(key, prefix)| slot.shares(key, prefix))
    }

    fn changed(&mut self, id: usize) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        slot.dirty = true;
        if slot.job.running() {
            slot.changed_during_job.get_or_insert_with(status::now_ms);
        } else {
            self.board.update(&slot.spec.prefix, |d| {
                d.pending_since_ms.get_or_insert_with(status::now_ms);
            });
        }
        if slot.job.running() || slot.stopped().is_some() {
            return;
        }
        let now = Instant::now();
        let mut at = match slot.last_sync {
            Some(t) => (t + slot.spec.sync.sync_interval).max(now),
            None => now,
        };
        if at > now && wal_outruns_interval(slot) {
            at = now;
        }
        // A database waiting out a failure backoff keeps waiting.
        if self
            .schedule
            .due(id)
            .is_none_or(|d| d > at && slot.failures == 0)
        {
            self.schedule_at(id, at);
        }
    }

    fn schedule_at(&mut self, id: usize, at: Instant) {
        if self.slots.contains_key(&id) {
            self.schedule.set(id, at);
        }
    }

    fn pop_due(&mut self) {
        for id in self.schedule.take_due(Instant::now()) {
            let Some(slot) = self.slots.get_mut(&id) else {
                continue;
            };
            // A look at an open database idle long enough is a close.
            // A retry after a failure is a sync, never a close.
            let idle = !slot.dirty
                && slot.failures == 0
                && self.plan.watch().close_idle_after.is_some_and(|d| {
                    slot.replica
                        .as_ref()
                        .is_some_and(|r| r.can_close() && r.last_change().elapsed() >= d)
                });
            if idle {
                if slot.job == Job::Idle {
                    self.holding.set_job(&mut slot.job, Job::CloseQueued);
                    self.to_close.push_back(id);
                }
            } else {
                self.ready.push_back(id);
            }
        }
        self.start_ready();
    }

    /// Starts queued jobs up to the parallelism bound: syncs first, then
    /// closes, except at the descriptor budget, where closes make room first.
    fn start_ready(&mut self) {
        let limit = self.plan.watch().parallelism.max(1);
        while self.in_flight.len() < limit {
            let over = self.holding.attached >= self.budget;
            let room = self.holding.attached + self.holding.opening < self.budget;
            if over && let Some(id) = self.to_close.pop_front() {
                self.start_close(id);
            } else if room && let Some(id) = self.waiting_room.pop_front() {
                self.start_sync(id);
            } else if let Some(id) = self.ready.pop_front() {
                // Opening one more database past the budget would run the
                // process out of descriptors: it waits for a close.
                if !room && self.slots.get(&id).is_some_and(Slot::needs_open) {
                    self.waiting_room.push_back(id);
                } else {
                    self.start_sync(id);
                }
            } else if let Some(id) = self.to_close.pop_front() {
                self.start_close(id);
            } else {
                break;
            }
        }
        // Opens wait for room and nothing is being closed to make it.
        if !self.waiting_room.is_empty() && self.holding.closing == 0 && self.shed() > 0 {
            self.start_ready();
        }
    }

    fn start_sync(&mut self, id: usize) {
        // Started once the release it waits for ends (`finished`).
        if self
            .slots
            .get(&id)
            .is_some_and(|s| self.waits_for_release(s))
        {
            return;
        }
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        if slot.job.running() {
            return;
        }
        // A database queued to close that changed meanwhile syncs instead:
        // its close, when its turn comes, finds it no longer queued.
        let opens = slot.needs_open();
        self.holding.set_job(&mut slot.job, Job::Sync { opens });
        slot.dirty = false;
        slot.jobs_started += 1;
        slot.wal_bytes_at_sync = wal_bytes(&slot.spec.path).unwrap_or(0);
        let replica = slot.replica.take();
        let spec = slot.spec.clone();
        // Only a first open uses the start-up listing: a retry lists again.
        let listed = match &mut self.listing {
            Some((at, stores, used)) if replica.is_none() && at.elapsed() < LISTING_FRESH => {
                if used.insert(spec.prefix.clone()) {
                    // A prefix a listing did not find has no chain in that store.
                    stores
                        .iter_mut()
                        .map(|store| match store {
                            StoreListing::Listed(tips) => {
                                match tips.remove(&spec.prefix).unwrap_or(Some(Vec::new())) {
                                    Some(objects) => replica::Listed::Objects(objects),
                                    None => replica::Listed::Here,
                                }
                            }
                            StoreListing::Failed => replica::Listed::Here,
                            StoreListing::Unanswered => replica::Listed::Unanswered,
                        })
                        .collect()
                } else {
                    Vec::new()
                }
            }
            _ => Vec::new(),
        };
        let task = self.in_flight.spawn(async move {
            let mut replica = match replica {
                Some(r) => r,
                None => match spec.open(listed).await {
                    Ok(r) => r,
                    Err(e) => return (id, None, Err(e)),
                },
            };
            let result = replica.sync().await;
            (id, Some(replica), result)
        });
        self.job_of.insert(task.id(), id);
    }

    /// Closes an open database at rest (shipping its last frames and sealing
    /// its WAL first). Closing only saves resources: one that cannot be sealed
    /// right now stays open and is looked at again later.
    fn start_close(&mut self, id: usize) {
        // Syncing or closing already, or no longer queued: nothing to do.
        let Some(slot) = self
            .slots
            .get_mut(&id)
            .filter(|s| s.job == Job::CloseQueued)
        else {
            return;
        };
        let replica = match slot.replica.take() {
            Some(r) if !slot.dirty && r.is_attached() => r,
            other => {
                // Changed or closed since it was queued: nothing to do.
                slot.replica = other;
                self.holding.set_job(&mut slot.job, Job::Idle);
                return;
            }
        };
        self.holding.set_job(&mut slot.job, Job::Close);
        slot.jobs_started += 1;
        let mut replica = replica;
        let task = self.in_flight.spawn(async move {
            let result = replica.detach().await.map(|_| SyncReport::default());
            (id, Some(replica), result)
        });
        self.job_of.insert(task.id(), id);
    }

    /// With many databases on one storage, one listing of the whole storage
    /// (a request per thousand objects) replaces one listing per database.
    async fn list_storage(&mut self, targets: &[DbSpec]) {
        let Plan::Config {
            storage, mirrors, ..
        } = &self.plan
        else {
            return;
        };
        if targets.len() < LIST_ONCE_FROM {
            return;
        }
        // As each database does before its own listing (see
        // `Replica::load_head`), once for all of them: `[storage]` only.
        let prefixes: HashSet<&str> = targets.iter().map(|t| t.prefix.as_str()).collect();
        let ours = |key: &str| {
            key.rsplit_once('/').is_some_and(|(prefix, name)| {
                prefixes.contains(prefix) && crate::segment::is_walsync_name(name)
            })
        };
        replica::sweep_store(storage.as_ref(), "[storage]", "", &ours, SWEEP_AT_START).await;
        // Every store at once. A mirror whose listing has stopped answering
        // once `[storage]`'s is done is given up on: no database waits for
        // it at open (it is listed again once it answers).
        let (storage_done, done) = tokio::sync::watch::channel(false);
        let primary = async {
            let listed = list_store(None, storage, &AtomicU64::new(0)).await;
            let _ = storage_done.send(true);
            listed.map_or(StoreListing::Failed, StoreListing::Listed)
        };
        let others = futures_util::future::join_all(mirrors.iter().map(|m| {
            let mut done = done.clone();
            let pages = AtomicU64::new(0);
            async move {
                let given_up = async {
                    let _ = done.wait_for(|done| *done).await;
                    let mut seen = pages.load(Ordering::Relaxed);
                    loop {
                        tokio::time::sleep(MIRROR_LISTING_GRACE).await;
                        let now = pages.load(Ordering::Relaxed);
                        if now == seen {
                            break;
                        }
                        seen = now;
                    }
                };
                tokio::select! {
                    listed = list_store(Some(m.name.as_str()), &m.storage, &pages) => {
                        listed.map_or(StoreListing::Failed, StoreListing::Listed)
                    }
                    () = given_up => {
                        let store = crate::mirror::Label::of(Some(m.name.as_str()));
                        warn!(
                            %store,
                            "listing the store read nothing for {MIRROR_LISTING_GRACE:?} after [storage]'s \
                             ended; it is listed again once it answers"
                        );
                        StoreListing::Unanswered
                    }
                }
            }
        }));
        let (first, rest) = tokio::join!(primary, others);
        let listed: Vec<StoreListing> = std::iter::once(first).chain(rest).collect();
        if !listed.iter().all(|l| matches!(l, StoreListing::Failed)) {
            self.listing = Some((Instant::now(), listed, HashSet::new()));
        }
    }

    fn trim_if_due(&mut self, now: Instant) {
        if self.trim_at.is_some_and(|t| t <= now) {
            self.trim_at = None;
            self.last_trim = Some(now);
            // SAFETY: malloc_trim only returns free heap memory to the system.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// Notes that `id` (if any) finished its first sync attempt, and reports
    /// when every database named at start has.
    fn first_pass_progress(&mut self, id: Option<usize>) {
        if let Some(id) = id {
            self.first_pass.remove(&id);
        }
        if self.first_pass.is_empty()
            && let Some(done) = self.first_pass_done.take()
        {
            info!("every database synced once");
            let _ = done.send(());
        }
    }

    fn finished(&mut self, (id, replica, result): Done) {
        let now = Instant::now();
        self.first_pass_progress(Some(id));
        let Some(slot) = self.slots.get_mut(&id) else {
            // Released while running (or a release flush): nothing to keep.
            if let Err(e) = result {
                warn!(error = %e, "final sync of a released database failed");
            }
            // What waited for it (the same file or prefix, newly
            // configured) starts now.
            if let Some((key, prefix)) = self.releasing.remove(&id) {
                let waiting: Vec<usize> = self
                    .slots
                    .iter()
                    .filter(|(_, s)| s.shares(&key, &prefix))
                    .map(|(id, _)| *id)
                    .collect();
                for id in waiting {
                    self.schedule_at(id, now);
                }
            }
            self.start_ready();
            return;
        };
        self.holding.set_job(&mut slot.job, Job::Idle);
        slot.last_sync = Some(now);
        slot.replica = replica;
        // Settings reloaded while it ran (a key rotation among them) apply now.
        if let Some(replica) = slot.replica.as_mut()
            && *replica.options() != slot.spec.sync
        {
            replica.set_options(slot.spec.sync.clone());
        }
        let attached = slot.replica.as_ref().is_some_and(Replica::is_attached);
        let closed = self.holding.set_attached(slot, attached) && !attached;
        if closed {
            // Closes come in bursts: trim now, or once the burst is over.
            self.trim_at = Some(match self.last_trim {
                Some(t) if now.duration_since(t) < TRIM_EVERY => t + TRIM_EVERY,
                _ => now,
            });
            self.trim_if_due(now);
        }
        if self.holding.attached.saturating_sub(self.holding.closing) > self.budget {
            self.shed();
        }
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        let wakeup = slot
            .replica
            .as_ref()
            .and_then(|r| r.next_wakeup())
            .map(Instant::from_std);
        post(&self.board, slot, &result);
        answer_waiters(slot, &result);
        let mut backoff = None;
        match result {
            Ok(report) => {
                if slot.failures > 0 {
                    info!(db = %slot.spec.path.display(), "replicating again");
                }
                slot.failures = 0;
                slot.wal_warned = None;
                debug!(db = %slot.spec.path.display(), ?report, "synced");
                report_compaction(&self.compactor, slot);
            }
            Err(e) if e.is_fatal() => {
                error!(
                    db = %slot.spec.path.display(),
                    prefix = %slot.spec.prefix,
                    error = %e,
                    "replication stopped"
                );
                if slot.replica.is_none() {
                    slot.refused = Some(e.to_string());
                }
                for (_, waiter) in slot.waiters.drain(..) {
                    let _ = waiter.send((slot.spec.prefix.clone(), Err(e.to_string())));
                }
                self.start_ready();
                return;
            }
            Err(e) => {
                slot.failures += 1;
                let wait = sync_backoff(&e, slot.failures);
                warn!(
                    db = %slot.spec.path.display(),
                    prefix = %slot.spec.prefix,
                    error = %e,
                    retry_in = ?wait,
                    "sync failed"
                );
                backoff = Some(wait);
                warn_if_wal_outgrows(slot, now);
            }
        }
        let idle = match (self.plan.watch().close_idle_after, &slot.replica) {
            (Some(idle), Some(replica)) if replica.is_attached() && replica.stopped().is_none() => {
                Some((Instant::from_std(replica.last_change()), idle))
            }
            _ => None,
        };
        let (next, rechecks) = due::next_due(&due::AfterJob {
            now,
            dirty: slot.dirty,
            failures: slot.failures,
            backoff,
            sync_interval: slot.spec.sync.sync_interval,
            rechecks: slot.rechecks,
            wants_recheck: slot.replica.as_ref().is_some_and(Replica::wants_recheck),
            wakeup,
            idle,
            waited_on: !slot.waiters.is_empty(),
        });
        slot.rechecks = rechecks;
        if let Some(at) = next {
            self.schedule_at(id, at.max(now));
        }
        self.start_ready();
    }

    /// A `walsync sync` request: every database it names syncs now, and its
    /// outcome is reported once a sync that started after the request is done.
    fn sync_request(&mut self, request: SyncRequest) {
        let ids: Vec<usize> = self
            .slots
            .iter()
            .filter(|(_, s)| request.prefix.as_ref().is_none_or(|p| *p == s.spec.prefix))
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            let why = match &request.prefix {
                Some(p) => format!("no database with prefix {p:?} is being replicated"),
                None => "no databases are being replicated".into(),
            };
            let _ = request.accepted.send(Err(why));
            return;
        }
        let _ = request.accepted.send(Ok(ids.len()));
        let now = Instant::now();
        for id in ids {
            let Some(slot) = self.slots.get_mut(&id) else {
                continue;
            };
            if let Some(reason) = slot.stopped() {
                let _ = request
                    .outcomes
                    .send((slot.spec.prefix.clone(), Err(reason.to_string())));
                continue;
            }
            slot.waiters
                .push((slot.jobs_started + 1, request.outcomes.clone()));
            slot.dirty = true;
            if !slot.job.running() {
                self.schedule_at(id, now);
            }
        }
        self.start_ready();
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
